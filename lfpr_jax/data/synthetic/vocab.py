"""Vocabularies: the answer and BERT vocabulary files and the made-up OCR lexicon.

The OCR lexicon consists of made-up lower-case syllable words and numbers that are
never answer-vocabulary, template or class words, so an OCR answer must be copied; the
held-out (novel) part of it appears only in val/test images. `bert/vocab.txt` covers
every word the dataset writes with lower-case WordPiece pieces
(`readers.BertTokenizer` never yields `[UNK]` on it; `writer` checks this).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np

from lfpr_jax.data.synthetic.questions import template_words
from lfpr_jax.data.synthetic.spec import (
    COLOURS, NUMBER_WORDS, OBJECT_CLASSES, UNANSWERABLE, SyntheticSpec)
from lfpr_jax.data.text import word_tokenize

ANSWER_SPECIALS: tuple[str, ...] = ("<pad>", "<s>", "</s>", "<unk>")
_EXTRA_ANSWER_WORDS: tuple[str, ...] = (
    "yes", "no", UNANSWERABLE, "nothing", "sign", "text", "word", "the", "a", "of",
    "and", "left", "right", "top", "bottom")
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
_FINALS = "nrslt"
_PUNCTUATION = ("!", '"', "'", "(", ")", ",", "-", ".", "/", ":", ";", "?")


@dataclasses.dataclass(frozen=True)
class Lexicon:
  """The OCR words of a dataset."""
  train_words: tuple[str, ...]
  novel_words: tuple[str, ...]  # held out: val/test only
  row: Mapping[str, int]  # word -> row of the token embedding table


def _syllables() -> list[str]:
  return [c + v for c in _CONSONANTS for v in _VOWELS]


def answer_vocab_words(spec: SyntheticSpec) -> list[str]:
  """Lines of `fixed_answer_vocab.txt`: the four specials, then answer words.

  Holds yes/no, `unanswerable`, number words and digits 0..10, colours, the class
  names and a few common words, but no OCR lexicon word.
  """
  words = list(ANSWER_SPECIALS) + list(_EXTRA_ANSWER_WORDS) + list(NUMBER_WORDS)
  words += [str(i) for i in range(len(NUMBER_WORDS))]
  words += list(COLOURS) + list(spec.class_names)
  return list(dict.fromkeys(words))


def bert_vocab_tokens(spec: SyntheticSpec, ocr_words: Sequence[str] = ()) -> list[str]:
  """Lines of `bert/vocab.txt`.

  BERT special ids sit at their `bert-base-uncased` indices ([PAD]=0, [UNK]=100,
  [CLS]=101, [SEP]=102, [MASK]=103; 1..99 are `[unusedN]`), followed by punctuation,
  single characters and their `##` continuations (so every lower-case alphanumeric
  word is covered), whole words of questions, class names, plurals, colours and
  answers, the lexicon syllables as word starts and `##` continuations, and finally
  `ocr_words` as whole words (the train lexicon when `spec.bert_whole_ocr_words`). The
  list is padded with further `[unusedN]` entries to a multiple of 8.

  Args:
    spec: the dataset spec (class names in use).
    ocr_words: extra whole words appended last.

  Returns:
    The vocabulary lines in id order.
  """
  tokens = ["[PAD]"] + [f"[unused{i}]" for i in range(99)]
  tokens += ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
  content = list(_PUNCTUATION)
  chars = list("abcdefghijklmnopqrstuvwxyz0123456789")
  content += chars + ["##" + c for c in chars]
  content += template_words()
  content += [w for pair in OBJECT_CLASSES[:spec.num_object_classes] for w in pair]
  content += ["background"]
  content += [w for w in answer_vocab_words(spec) if w not in ANSWER_SPECIALS]
  syllables = _syllables()
  content += syllables + ["##" + s for s in syllables] + ["##s", "##es"]
  content += list(ocr_words)
  seen = set(tokens)
  for token in content:
    if token not in seen:
      seen.add(token)
      tokens.append(token)
  unused = 99
  while len(tokens) % 8:
    tokens.append(f"[unused{unused}]")
    unused += 1
  return tokens


def build_lexicon(rng: np.random.Generator, spec: SyntheticSpec) -> Lexicon:
  """The train and held-out OCR words, none of them a word the dataset uses elsewhere.

  Args:
    rng: the lexicon's own random stream.
    spec: sizes (`ocr_lexicon_size`, `novel_lexicon_size`) and numeric share.

  Returns:
    The lexicon; `row` numbers the train words first, then the held-out ones.
  """
  forbidden = (set(answer_vocab_words(spec)) | set(template_words())
               | set(bert_vocab_tokens(spec)))
  forbidden |= {w for pair in OBJECT_CLASSES for w in pair}
  all_words = _make_words(rng, spec.ocr_lexicon_size + spec.novel_lexicon_size,
                          spec.numeric_token_fraction, forbidden)
  return Lexicon(train_words=tuple(all_words[:spec.ocr_lexicon_size]),
                 novel_words=tuple(all_words[spec.ocr_lexicon_size:]),
                 row={w: i for i, w in enumerate(all_words)})


def _make_words(rng: np.random.Generator, size: int, numeric_fraction: float,
                forbidden: set[str]) -> list[str]:
  """`size` distinct made-up lower-case words (2-3 syllables, maybe a final) / numbers."""
  syllables = _syllables()
  seen: set[str] = set()
  out: list[str] = []
  while len(out) < size:
    if rng.random() < numeric_fraction:
      word = str(int(rng.integers(11, 10000)))
    else:
      n_syl = int(rng.integers(2, 4))
      word = "".join(syllables[int(i)] for i in rng.integers(0, len(syllables), n_syl))
      if rng.random() < 0.3:
        word += _FINALS[int(rng.integers(len(_FINALS)))]
    if word in seen or word in forbidden or word_tokenize(word) != word:
      continue
    seen.add(word)
    out.append(word)
  return out


def image_words(rng: np.random.Generator, spec: SyntheticSpec, lexicon: Lexicon,
                split: str) -> list[str]:
  """`max_ocr` distinct words for one image (a novel share outside train)."""
  k = spec.max_ocr
  n_novel = 0
  if split != "train" and lexicon.novel_words and spec.novel_word_fraction > 0:
    n_novel = int(rng.binomial(k, spec.novel_word_fraction))
  base = rng.choice(len(lexicon.train_words), size=k - n_novel, replace=False)
  novel = rng.choice(len(lexicon.novel_words), size=n_novel, replace=False) if n_novel else []
  words = [lexicon.train_words[int(i)] for i in base]
  words += [lexicon.novel_words[int(i)] for i in novel]
  return [words[int(i)] for i in rng.permutation(len(words))]

