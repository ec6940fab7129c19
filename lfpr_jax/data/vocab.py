"""The fixed answer vocabulary of the M4C decoder (`VocabDict` + the processor's checks).

Upstream (`LFPR: TAP/pythia/utils/text_utils.py` `VocabDict`, checked by
`M4CAnswerProcessor.__init__`; docs/TAP.md §3.6):

* the file is plain text, one entry per line, each line stripped; index = line number
  (a blank line is an entry too, as with `readlines()`);
* if `<unk>` is not among the lines it is PREPENDED, shifting every index by one;
* PAD/BOS/EOS are looked up by string (`<pad>`, `<s>`, `</s>`); upstream asserts they
  exist (are not UNK) and that `<pad>` is index 0. Here a violation raises one
  `ValueError` naming the file and every problem (upstream: a bare `AssertionError`).

Answer-space layout per decoding step: `[0, V_a)` vocabulary words, `[V_a, V_a + 100)`
OCR slot i at `V_a + i`, with `V_a = num_vocab` = number of entries.

Divergence kept on purpose: with duplicate lines, upstream's word-to-index dict keeps
the LAST occurrence (reproduced by `index`) but offsets OCR copies by the dict's
length, not by the number of lines; this port always uses `num_vocab` (the classifier
width). Real M4C vocabularies have no duplicates, so the two agree.
"""

from __future__ import annotations

import dataclasses
import os
import types
from typing import Iterable, Mapping

PAD_TOKEN: str = "<pad>"
BOS_TOKEN: str = "<s>"
EOS_TOKEN: str = "</s>"
UNK_TOKEN: str = "<unk>"


@dataclasses.dataclass(frozen=True)
class AnswerVocab:
  """A validated answer vocabulary.

  Build with `AnswerVocab.from_file(path)` or `AnswerVocab.from_words(words)`.

  Attributes:
    words: the entries in index order (with `<unk>` prepended if the source lacked it).
    source: where the entries came from (the file path, or `'<memory>'`).
    word2idx: entry -> index (last occurrence wins, as upstream).
  """
  words: tuple[str, ...] = dataclasses.field(repr=False)
  source: str
  word2idx: Mapping[str, int] = dataclasses.field(repr=False, compare=False)

  @classmethod
  def from_words(cls, words: Iterable[str], source: str = "<memory>") -> "AnswerVocab":
    """Builds a vocabulary from entries in index order (each entry is stripped).

    Args:
      words: the entries, e.g. the lines of a vocabulary file.
      source: a name for error messages.

    Returns:
      The vocabulary.

    Raises:
      ValueError: `<pad>`, `<s>` or `</s>` is missing, or `<pad>` is not at index 0
        (which also happens when `<unk>` is missing and gets prepended).
    """
    entries = [str(w).strip() for w in words]
    if UNK_TOKEN not in entries:
      entries = [UNK_TOKEN] + entries
    word2idx = {w: i for i, w in enumerate(entries)}
    problems = []
    missing = [t for t in (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN) if t not in word2idx]
    if missing:
      problems.append(f"missing required token(s) {missing}")
    if PAD_TOKEN in word2idx and word2idx[PAD_TOKEN] != 0:
      problems.append(
          f"'{PAD_TOKEN}' must be at index 0 but is at {word2idx[PAD_TOKEN]}"
          + (" ('<unk>' was absent and got prepended)" if entries[0] == UNK_TOKEN
             else ""))
    if problems:
      raise ValueError(
          f"answer vocabulary {source}: " + "; ".join(problems) + ". An M4C answer "
          "vocabulary starts with the lines <pad>, <s>, </s>, <unk> (indices 0..3).")
    return cls(words=tuple(entries), source=source,
               word2idx=types.MappingProxyType(word2idx))

  @classmethod
  def from_file(cls, path: str | os.PathLike) -> "AnswerVocab":
    """Reads a vocabulary file: one entry per line, stripped, index = line number.

    Raises:
      FileNotFoundError: the file does not exist.
      ValueError: see `from_words`.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"answer vocabulary file not found: {path}")
    with open(path, encoding="utf-8") as f:
      lines = f.readlines()
    return cls.from_words(lines, source=path)

  @property
  def num_vocab(self) -> int:
    """V_a: number of entries, the classifier width and the first OCR copy index."""
    return len(self.words)

  def __len__(self) -> int:
    return len(self.words)

  def __contains__(self, word: object) -> bool:
    return word in self.word2idx

  @property
  def pad_idx(self) -> int:
    return self.word2idx[PAD_TOKEN]

  @property
  def bos_idx(self) -> int:
    return self.word2idx[BOS_TOKEN]

  @property
  def eos_idx(self) -> int:
    return self.word2idx[EOS_TOKEN]

  @property
  def unk_idx(self) -> int:
    return self.word2idx[UNK_TOKEN]

  def index(self, word: str) -> int:
    """Index of `word`, or the `<unk>` index if absent (upstream `word2idx`)."""
    return self.word2idx.get(word, self.unk_idx)

  def word(self, index: int) -> str:
    """Entry at `index` (upstream `idx2word`); raises IndexError outside `[0, V_a)`."""
    index = int(index)
    if not 0 <= index < len(self.words):
      raise IndexError(f"vocabulary index {index} outside [0, {len(self.words)}).")
    return self.words[index]
