"""A small synthetic Text-VQA benchmark written in the upstream TAP/M4C file formats.

Real TextVQA cannot be downloaded everywhere this project runs, so it ships its own
task. `generate(out_dir, spec)` writes a complete dataset directory that the real
readers consume exactly like a TextVQA release (TAP.md §3.1):

```
<out_dir>/
  manifest.json                          paths, spec, counts, model sizes, baselines
  imdb/imdb_{train,val,test}.npy         element 0 = metadata, then one dict per question
  feat_resx/<split>/<image_id>.npy       float32 [n_obj, feat_dim] object region features
  feat_resx/<split>/<image_id>_info.npy  {bbox, objects, image_width, image_height, num_boxes}
  ocr_feat_resx/<split>/<image_id>.npy   float32 [n_ocr, feat_dim] OCR region features
  ocr_feat_resx/<split>/<image_id>_info.npy  {ocr_tokens, ocr_boxes, ocr_conf}
  1600-400-20/objects_vocab.txt          object class names (id k <-> line k-1, 0 = background)
  vocabs/fixed_answer_vocab.txt          <pad> <s> </s> <unk> + answer words (no OCR words)
  bert/vocab.txt                         small lower-case WordPiece vocabulary
```

No FastText model is written: the readers use their deterministic stand-in.

Every question is answerable only with what TAP is built for (question types in
`QUESTION_TYPES`): copying OCR tokens chosen by their boxes (`ocr_position`: the
leftmost/topmost/... word or the one nearest a corner; `ocr_relation`: the word next to
an object), by the object they are written on (`ocr_on_object`), several tokens in
reading order (`ocr_multi`), fixed-vocabulary answers read from the object features
(`count`, `colour`, `exists`), and OCR questions on images without text (`no_ocr`,
answer `unanswerable`). Scenes are built constructively and every answer is then
re-derived from the final (integer-pixel) geometry by the rules documented on each
type; a scene whose rules do not give the planted answer is redrawn.

Features are planted structure plus Gaussian noise (`SyntheticSpec.feature_noise`):

* object row = class_signal * E_class[c] + colour_signal * E_colour[k] + noise;
* OCR row = token_signal * E_token[word] + ocr_context_signal * E_class[host] + noise,
  where `host` is the class of the object the token is written on (no term otherwise),
  as a real crop of text on a bus also looks like a bus.

E_* are fixed N(0, 1) tables drawn from the seed. The OCR lexicon consists of made-up
lower-case syllable words and numbers (normalisation is the identity on them) that are
never answer-vocabulary words, so OCR answers must be copied; val/test images draw a
`novel_word_fraction` of their tokens from a held-out lexicon never used in train.

Randomness: one `numpy.random.SeedSequence(spec.seed)` is spawned into independent
streams (lexicon, embedding tables, one per split) that are passed down explicitly, so
e.g. changing the val size leaves train unchanged. The same spec gives byte-identical
files.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import shutil
import tempfile
from typing import Any, Container, Mapping, Sequence

import numpy as np

from lfpr_jax.data.text import word_tokenize
from lfpr_jax.data.metrics import textvqa_accuracy

FORMAT_VERSION: int = 1
GENERATOR_NAME: str = "lfpr_jax.data.synthetic"
MANIFEST_NAME: str = "manifest.json"
SPLITS: tuple[str, ...] = ("train", "val", "test")
NUM_ANSWERS: int = 10
MAX_DECODE_STEPS: int = 12

QUESTION_TYPES: tuple[str, ...] = (
    "ocr_position", "ocr_relation", "ocr_on_object", "ocr_multi",
    "count", "colour", "exists", "no_ocr")
"""All question types, in the order used by manifests and `type_fractions`."""

OCR_COPY_TYPES: tuple[str, ...] = (
    "ocr_position", "ocr_relation", "ocr_on_object", "ocr_multi")
"""Types whose correct answer is copied from OCR tokens (never vocabulary words)."""

DEFAULT_TYPE_FRACTIONS: tuple[tuple[str, float], ...] = (
    ("ocr_position", 0.25), ("ocr_relation", 0.05), ("ocr_on_object", 0.30),
    ("ocr_multi", 0.15), ("count", 0.0), ("colour", 0.05), ("exists", 0.10),
    ("no_ocr", 0.10))
"""The benchmark's mix: 75% OCR copies (what TAP is built for), 15% fixed-vocabulary
answers read from the objects, 10% images without text. `count` (and most of `colour`)
is left out: the reduced TAP of `configs/synthetic.py` stays at chance on both within
its minutes of training, so they would only dilute the learnability figure; both
remain available through `SyntheticSpec.type_fractions`."""

OBJECT_CLASSES: tuple[tuple[str, str], ...] = (
    ("sign", "signs"), ("car", "cars"), ("bus", "buses"), ("bottle", "bottles"),
    ("banner", "banners"), ("shirt", "shirts"), ("cup", "cups"), ("book", "books"),
    ("board", "boards"), ("truck", "trucks"), ("door", "doors"), ("box", "boxes"),
    ("screen", "screens"), ("phone", "phones"), ("clock", "clocks"), ("bag", "bags"),
    ("train", "trains"), ("laptop", "laptops"), ("boat", "boats"), ("plane", "planes"))
"""(singular, plural) of every available class; a spec uses the first N."""

MULTI_TEXT_CLASSES: frozenset[str] = frozenset({"sign", "banner", "board", "screen"})
"""Classes that carry a line of 2-3 words (`ocr_multi`); the others carry one word."""

COLOURS: tuple[str, ...] = (
    "red", "green", "blue", "yellow", "white", "black", "orange", "purple")
NUMBER_WORDS: tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
UNANSWERABLE: str = "unanswerable"

POSITIONS: tuple[tuple[str, tuple[float, float], tuple[str, ...]], ...] = (
    ("left", (-1.0, 0.0), ("what is the leftmost word?", "what word is furthest to the left?")),
    ("right", (1.0, 0.0), ("what is the rightmost word?", "what word is furthest to the right?")),
    ("top", (0.0, -1.0), ("what is the topmost word?", "what word is highest up?")),
    ("bottom", (0.0, 1.0), ("what is the bottommost word?", "what word is lowest down?")),
    ("top left", (-1.0, -1.0), ("what word is at the top left?",
                                "what word is closest to the top left corner?")),
    ("top right", (1.0, -1.0), ("what word is at the top right?",
                                "what word is closest to the top right corner?")),
    ("bottom left", (-1.0, 1.0), ("what word is at the bottom left?",
                                  "what word is closest to the bottom left corner?")),
    ("bottom right", (1.0, 1.0), ("what word is at the bottom right?",
                                  "what word is closest to the bottom right corner?")),
)
"""`ocr_position` directions: (name, (w_x, w_y), question templates). The answer is the
token maximising w_x * c_x + w_y * c_y over normalised box centres (`position_answer`)."""

RELATIONS: tuple[tuple[str, str], ...] = (
    ("left", "to the left of"), ("right", "to the right of"), ("above", "above"),
    ("below", "below"))

ANSWER_SPECIALS: tuple[str, ...] = ("<pad>", "<s>", "</s>", "<unk>")
BERT_PAD, BERT_UNK, BERT_CLS, BERT_SEP, BERT_MASK = 0, 100, 101, 102, 103

_TEMPLATES: Mapping[str, tuple[str, ...]] = {
    "ocr_relation": ("what word is {rel} the {name}?", "what is written {rel} the {name}?"),
    "ocr_on_object": ("what is written on the {name}?", "what does the {name} say?"),
    "ocr_multi": ("what is written on the {name}?", "what does the {name} say?"),
    "count": ("how many {plural} are there?", "how many {plural} can you see?"),
    "colour": ("what colour is the {name}?", "what color is the {name}?"),
    "exists": ("is there {article} {name}?", "is there {article} {name} in the image?"),
}
_EXTRA_ANSWER_WORDS: tuple[str, ...] = (
    "yes", "no", UNANSWERABLE, "nothing", "sign", "text", "word", "the", "a", "of",
    "and", "left", "right", "top", "bottom")
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
_FINALS = "nrslt"
_PUNCTUATION = ("!", '"', "'", "(", ")", ",", "-", ".", "/", ":", ";", "?")
_POSITION_MARGIN = 0.05  # how much the position answer must beat the runner-up by
_MAX_SCENE_TRIES = 500
_MAX_PLACE_TRIES = 60


# ------------------------------------------------------------------------------ spec


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
  """Everything that determines a synthetic dataset (the files are a function of it).

  Attributes:
    seed: root seed of every random stream.
    num_train, num_val, num_test: questions per split.
    questions_per_image: questions asked about each image (images ~ questions / this).
    feat_dim: width of the object and OCR region features (the model's fc7 width).
    max_objects, min_objects: object rows per image.
    max_ocr, min_ocr: OCR tokens per image that has text.
    num_object_classes: classes used, the first N of `OBJECT_CLASSES` (8..20).
    ocr_lexicon_size: words OCR tokens of train (and most of val/test) come from.
    novel_lexicon_size: held-out words, used only in val/test.
    novel_word_fraction: probability that a val/test OCR token is a held-out word.
    numeric_token_fraction: fraction of the lexicon that are numbers (11..9999).
    feature_noise: std of the Gaussian noise added to every feature entry.
    class_signal: scale of the planted class embedding in object features.
    colour_signal: scale of the planted colour embedding in object features.
    token_signal: scale of the planted word embedding in OCR features.
    ocr_context_signal: scale of the host-object class embedding in the OCR features
      of a token written on an object (0 makes `ocr_on_object` purely geometric).
    text_on_distractor_prob: probability that a free OCR token gets its own distractor
      object (of a class no question is about) around it.
    answer_variant_prob: probability that 1-2 of the 10 answers are a variant (another
      OCR token, a prefix, a neighbouring number, ...), exercising soft scores.
    max_count: largest answer of `count` questions.
    shuffle_ocr: shuffle OCR rows (else the reading order of the builder leaks).
    position_margin: how much (in normalised box-centre units) the answer of an
      `ocr_position` question must beat the runner-up by (`position_answer`); scenes
      where no asked direction has such a clear winner are redrawn.
    position_directions: which `POSITIONS` `ocr_position` asks about. The corners are
      off by default: TAP embeds a box as LayerNorm(Linear(box)), which at
      initialisation keeps only the box's direction from the image origin, so "top
      left" vs "bottom right" (same direction, different distance) is learned late.
    bert_whole_ocr_words: put the train lexicon into `bert/vocab.txt` as whole words
      (one wordpiece per train OCR token: a short OCR text stream); held-out words are
      always split into syllable pieces, as rare words are by a real BERT vocabulary.
    image_width_range, image_height_range: inclusive pixel ranges of image sizes.
    type_fractions: (question type, fraction) pairs over `QUESTION_TYPES`, summing to
      1; a mapping is accepted and normalised to pairs in `QUESTION_TYPES` order.
  """
  seed: int = 0
  num_train: int = 6000
  num_val: int = 1000
  num_test: int = 1000
  questions_per_image: int = 2
  feat_dim: int = 128
  max_objects: int = 10
  min_objects: int = 4
  max_ocr: int = 8
  min_ocr: int = 3
  num_object_classes: int = 12
  ocr_lexicon_size: int = 500
  novel_lexicon_size: int = 150
  novel_word_fraction: float = 0.3
  numeric_token_fraction: float = 0.1
  feature_noise: float = 0.5
  class_signal: float = 1.0
  colour_signal: float = 1.0
  token_signal: float = 1.0
  ocr_context_signal: float = 1.0
  text_on_distractor_prob: float = 0.3
  answer_variant_prob: float = 0.3
  max_count: int = 4
  shuffle_ocr: bool = True
  bert_whole_ocr_words: bool = True
  position_margin: float = _POSITION_MARGIN
  position_directions: tuple[str, ...] = ("left", "right", "top", "bottom")
  image_width_range: tuple[int, int] = (512, 1024)
  image_height_range: tuple[int, int] = (384, 768)
  type_fractions: tuple[tuple[str, float], ...] = DEFAULT_TYPE_FRACTIONS

  def __post_init__(self):
    fractions = self.type_fractions
    if hasattr(fractions, "items"):  # a dict, or an ml_collections ConfigDict
      items = dict(fractions.items())
    else:
      items = {}
      for pair in fractions:
        name, value = pair
        if name in items:
          raise ValueError(f"type_fractions lists {name!r} twice.")
        items[name] = value
    unknown = sorted(set(items) - set(QUESTION_TYPES))
    if unknown:
      raise ValueError(f"unknown question type(s) {unknown}; known: {list(QUESTION_TYPES)}.")
    normalised = tuple((t, float(items.get(t, 0.0))) for t in QUESTION_TYPES)
    object.__setattr__(self, "type_fractions", normalised)
    object.__setattr__(self, "position_directions", tuple(self.position_directions))
    object.__setattr__(self, "image_width_range", tuple(int(v) for v in self.image_width_range))
    object.__setattr__(self, "image_height_range",
                       tuple(int(v) for v in self.image_height_range))
    self._validate()

  def _validate(self) -> None:
    problems = []
    for name in ("num_train", "num_val", "num_test"):
      if getattr(self, name) < 0:
        problems.append(f"{name} must be >= 0")
    if self.num_train < 1:
      problems.append("num_train must be >= 1")
    if self.questions_per_image < 1:
      problems.append("questions_per_image must be >= 1")
    if self.feat_dim < 1:
      problems.append("feat_dim must be >= 1")
    if not 1 <= self.min_objects <= self.max_objects <= 100:
      problems.append("need 1 <= min_objects <= max_objects <= 100")
    if not 1 <= self.min_ocr <= self.max_ocr <= 100:
      problems.append("need 1 <= min_ocr <= max_ocr <= 100")
    if self.max_ocr < 3 * self.questions_per_image + 1:
      problems.append("max_ocr must be >= 3 * questions_per_image + 1 (planted text)")
    if self.max_objects < self.max_count * self.questions_per_image:
      problems.append("max_objects must be >= max_count * questions_per_image")
    if not 1 <= self.max_count < len(NUMBER_WORDS) - 1:
      problems.append(f"max_count must be in [1, {len(NUMBER_WORDS) - 2}]")
    if not 8 <= self.num_object_classes <= len(OBJECT_CLASSES):
      problems.append(f"num_object_classes must be in [8, {len(OBJECT_CLASSES)}]")
    else:
      n_multi = sum(name in MULTI_TEXT_CLASSES for name in self.class_names)
      if dict(self.type_fractions)["ocr_multi"] > 0 and self.questions_per_image > n_multi:
        problems.append(f"questions_per_image must be <= {n_multi}, the number of "
                        "multi-word classes among the first num_object_classes")
    if self.ocr_lexicon_size < self.max_ocr:
      problems.append("ocr_lexicon_size must be >= max_ocr")
    if self.novel_word_fraction > 0 and self.novel_lexicon_size < self.max_ocr:
      problems.append("novel_lexicon_size must be >= max_ocr when novel_word_fraction > 0")
    if not 0.0 <= self.position_margin < 1.0:
      problems.append("position_margin must be in [0, 1)")
    for name in ("novel_word_fraction", "numeric_token_fraction",
                 "text_on_distractor_prob", "answer_variant_prob"):
      if not 0.0 <= getattr(self, name) <= 1.0:
        problems.append(f"{name} must be in [0, 1]")
    for name in ("feature_noise", "class_signal", "colour_signal", "token_signal",
                 "ocr_context_signal"):
      if not (getattr(self, name) >= 0.0 and math.isfinite(getattr(self, name))):
        problems.append(f"{name} must be finite and >= 0")
    for name in ("image_width_range", "image_height_range"):
      lo_hi = getattr(self, name)
      if len(lo_hi) != 2 or not 128 <= lo_hi[0] <= lo_hi[1]:
        problems.append(f"{name} must be (lo, hi) with 128 <= lo <= hi")
    known = [name for name, _, _ in POSITIONS]
    directions = self.position_directions
    if (any(d not in known for d in directions) or len(set(directions)) != len(directions)
        or len(directions) < self.questions_per_image):
      problems.append(f"position_directions must be >= questions_per_image distinct "
                      f"names from {known}, got {list(directions)}")
    values = [v for _, v in self.type_fractions]
    if any(v < 0 or not math.isfinite(v) for v in values):
      problems.append("type_fractions must be finite and >= 0")
    elif abs(sum(values) - 1.0) > 1e-6:
      problems.append(f"type_fractions must sum to 1, got {sum(values):.6f}")
    if problems:
      raise ValueError("invalid SyntheticSpec: " + "; ".join(problems) + ".")

  @property
  def fractions(self) -> dict[str, float]:
    """`type_fractions` as a dict (every type, in `QUESTION_TYPES` order)."""
    return dict(self.type_fractions)

  @property
  def class_names(self) -> tuple[str, ...]:
    """Names of the classes in use; class id k (1-based) is `class_names[k - 1]`."""
    return tuple(name for name, _ in OBJECT_CLASSES[:self.num_object_classes])

  def num_questions(self, split: str) -> int:
    """Number of questions of `split`."""
    if split not in SPLITS:
      raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}.")
    return getattr(self, f"num_{split}")

  def to_dict(self) -> dict[str, Any]:
    """JSON-ready dict (tuples become lists, `type_fractions` a dict)."""
    out = dataclasses.asdict(self)
    out["type_fractions"] = self.fractions
    out["image_width_range"] = list(self.image_width_range)
    out["image_height_range"] = list(self.image_height_range)
    out["position_directions"] = list(self.position_directions)
    return out

  @classmethod
  def from_dict(cls, data: Mapping[str, Any]) -> "SyntheticSpec":
    """Inverse of `to_dict`; unknown keys raise a ValueError."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
      raise ValueError(f"unknown SyntheticSpec field(s) {unknown}.")
    return cls(**dict(data))


# ---------------------------------------------------------------------- vocabularies


def _syllables() -> list[str]:
  return [c + v for c in _CONSONANTS for v in _VOWELS]


def _template_words() -> list[str]:
  """Every word the question templates can produce, excluding class names."""
  words = []
  templates = [t for group in _TEMPLATES.values() for t in group]
  templates += [t for _, _, group in POSITIONS for t in group]
  for template in templates:
    for token in template.replace("?", " ").split():
      if not token.startswith("{"):
        words.append(token)
  for _, phrase in RELATIONS:
    words.extend(phrase.split())
  words.extend(["a", "an"])
  return list(dict.fromkeys(words))


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
  content += _template_words()
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


def wordpiece_tokenize(text: str, vocab: Container[str],
                       max_chars_per_word: int = 100) -> list[str]:
  """Lower-case BERT tokenisation (basic + greedy longest-match WordPiece).

  Matches `BertTokenizer(do_lower_case=True)` on the ASCII text this module writes:
  whitespace split, punctuation split off, then longest-prefix matching with `##`
  continuations; a word that cannot be covered becomes `[UNK]`.

  Args:
    text: the string to tokenise.
    vocab: the vocabulary (anything supporting `in`).
    max_chars_per_word: longer words become `[UNK]` (BERT's default 100).

  Returns:
    The wordpieces, without `[CLS]`/`[SEP]`.
  """
  words = []
  for chunk in text.lower().split():
    current = ""
    for ch in chunk:
      code = ord(ch)
      if 33 <= code <= 47 or 58 <= code <= 64 or 91 <= code <= 96 or 123 <= code <= 126:
        if current:
          words.append(current)
        words.append(ch)
        current = ""
      else:
        current += ch
    if current:
      words.append(current)
  pieces = []
  for word in words:
    if len(word) > max_chars_per_word:
      pieces.append("[UNK]")
      continue
    start, sub_pieces = 0, []
    while start < len(word):
      end, match = len(word), None
      while start < end:
        candidate = word[start:end] if start == 0 else "##" + word[start:end]
        if candidate in vocab:
          match = candidate
          break
        end -= 1
      if match is None:
        sub_pieces = ["[UNK]"]
        break
      sub_pieces.append(match)
      start = end
    pieces.extend(sub_pieces)
  return pieces


def _make_lexicon(rng: np.random.Generator, size: int, numeric_fraction: float,
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


# ------------------------------------------------------------------------ scenes


@dataclasses.dataclass
class _Obj:
  cls: int  # 0-based index into spec.class_names
  colour: int
  box: np.ndarray  # float [4] x1, y1, x2, y2 (pixels)


@dataclasses.dataclass
class _Tok:
  word: str
  box: np.ndarray
  host: int  # index into the scene's objects, -1 when not written on an object


@dataclasses.dataclass
class _Plan:
  qtype: str  # entry of QUESTION_TYPES
  kind: str  # template family (for no_ocr: the OCR template it borrows)
  cls: int = -1
  count: int = 0
  side: str = ""
  direction: int = -1  # index into POSITIONS
  host: int = -1  # object index the question is about
  words: tuple[str, ...] = ()


@dataclasses.dataclass
class _Question:
  qtype: str
  question: str
  answer: str
  variants: tuple[str, ...]


def _intersects(a: np.ndarray, b: np.ndarray, pad: float = 2.0) -> bool:
  return bool(a[0] < b[2] + pad and b[0] < a[2] + pad and a[1] < b[3] + pad
              and b[1] < a[3] + pad)


def _free(box: np.ndarray, occupied: Sequence[np.ndarray]) -> bool:
  return not any(_intersects(box, other) for other in occupied)


def _contains(outer: np.ndarray, inner: np.ndarray) -> bool:
  return bool(outer[0] <= inner[0] and outer[1] <= inner[1] and inner[2] <= outer[2]
              and inner[3] <= outer[3])


def _text_width(rng: np.random.Generator, word_len: int, height: float) -> float:
  return max(word_len, 1) * height * float(rng.uniform(0.5, 0.7))


def _place_text_host(rng: np.random.Generator, width: int, height: int,
                     lengths: Sequence[int], occupied: Sequence[np.ndarray]
                     ) -> tuple[np.ndarray, list[np.ndarray]] | None:
  """An object box holding one line of words (left to right), clear of `occupied`."""
  for _ in range(_MAX_PLACE_TRIES):
    th = float(rng.uniform(0.035, 0.07)) * height
    widths = [_text_width(rng, n, th) for n in lengths]
    gap = th * float(rng.uniform(0.4, 0.8))
    line = sum(widths) + gap * (len(widths) - 1)
    mx = rng.uniform(0.05, 0.5, size=2) * line + 4.0
    my = rng.uniform(0.3, 2.0, size=2) * th + 4.0
    hw, hh = line + mx.sum(), th + my.sum()
    if hw > width - 2 or hh > height - 2:
      continue
    x1, y1 = float(rng.uniform(0, width - hw)), float(rng.uniform(0, height - hh))
    host = np.array([x1, y1, x1 + hw, y1 + hh])
    if not _free(host, occupied):
      continue
    boxes, x = [], x1 + mx[0]
    for w in widths:
      boxes.append(np.array([x, y1 + my[0], x + w, y1 + my[0] + th]))
      x += w + gap
    return host, boxes
  return None


def _random_box(rng: np.random.Generator, width: int, height: int, lo: float = 0.06,
                hi: float = 0.35) -> np.ndarray:
  w, h = float(rng.uniform(lo, hi)) * width, float(rng.uniform(lo, hi)) * height
  x1, y1 = float(rng.uniform(0, width - w)), float(rng.uniform(0, height - h))
  return np.array([x1, y1, x1 + w, y1 + h])


def _place_relation(rng: np.random.Generator, width: int, height: int, word_len: int,
                    occupied: Sequence[np.ndarray]
                    ) -> tuple[np.ndarray, str, np.ndarray | None, list[np.ndarray]] | None:
  """An object box, a side, a token box right next to it and the rects to reserve.

  With `word_len == 0` (no text in the image) only the object and side are drawn.
  """
  for _ in range(_MAX_PLACE_TRIES):
    obj = _random_box(rng, width, height, 0.08, 0.3)
    if not _free(obj, occupied):
      continue
    th = float(rng.uniform(0.03, 0.07)) * height
    tw = _text_width(rng, word_len, th)
    gap = float(rng.uniform(0.005, 0.02)) * width
    ox1, oy1, ox2, oy2 = obj
    options = []
    if ox2 + gap + tw <= width - 1:
      options.append("right")
    if ox1 - gap - tw >= 0:
      options.append("left")
    if oy1 - gap - th >= 0:
      options.append("above")
    if oy2 + gap + th <= height - 1:
      options.append("below")
    if not options:
      continue
    side = options[int(rng.integers(len(options)))]
    if word_len == 0:
      return obj, side, None, [obj]
    if side in ("left", "right"):
      cy = float(rng.uniform(oy1 + 0.3 * (oy2 - oy1), oy2 - 0.3 * (oy2 - oy1)))
      ty1 = min(max(cy - th / 2, 0.0), height - 1 - th)
      tx1 = ox2 + gap if side == "right" else ox1 - gap - tw
      token = np.array([tx1, ty1, tx1 + tw, ty1 + th])
      corridor = np.array([min(ox2, tx1), oy1, max(ox1, tx1 + tw), oy2])
    else:
      cx = float(rng.uniform(ox1 + 0.3 * (ox2 - ox1), ox2 - 0.3 * (ox2 - ox1)))
      tx1 = min(max(cx - tw / 2, 0.0), width - 1 - tw)
      ty1 = oy2 + gap if side == "below" else oy1 - gap - th
      token = np.array([tx1, ty1, tx1 + tw, ty1 + th])
      corridor = np.array([ox1, min(oy2, ty1), ox2, max(oy1, ty1 + th)])
    # Token centre must lie within the object's perpendicular extent (the rule below).
    if side in ("left", "right"):
      if not oy1 <= (token[1] + token[3]) / 2 <= oy2:
        continue
    elif not ox1 <= (token[0] + token[2]) / 2 <= ox2:
      continue
    if not (_free(token, occupied) and _free(corridor, occupied)):
      continue
    return obj, side, token, [obj, token, corridor]
  return None


def relation_answer(obj_box: np.ndarray, side: str, token_boxes: np.ndarray) -> int:
  """The `ocr_relation` rule: index of the token answering "what word is <side> the X".

  Candidates lie entirely on that side of the object box (e.g. `x1 >= obj.x2` for
  right) with their centre inside the object's perpendicular extent; the answer is
  the candidate with the smallest gap. Returns -1 if there is none or the two nearest
  gaps tie.
  """
  ox1, oy1, ox2, oy2 = obj_box
  gaps = []
  for i, (x1, y1, x2, y2) in enumerate(np.asarray(token_boxes).reshape(-1, 4)):
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    if side == "right" and x1 >= ox2 and oy1 <= cy <= oy2:
      gaps.append((x1 - ox2, i))
    elif side == "left" and x2 <= ox1 and oy1 <= cy <= oy2:
      gaps.append((ox1 - x2, i))
    elif side == "above" and y2 <= oy1 and ox1 <= cx <= ox2:
      gaps.append((oy1 - y2, i))
    elif side == "below" and y1 >= oy2 and ox1 <= cx <= ox2:
      gaps.append((y1 - oy2, i))
  if not gaps:
    return -1
  gaps.sort()
  if len(gaps) > 1 and gaps[1][0] == gaps[0][0]:
    return -1
  return gaps[0][1]


def position_answer(direction: int | str, token_boxes: np.ndarray, width: int,
                    height: int, margin: float = _POSITION_MARGIN) -> int:
  """The `ocr_position` rule: index of THE token "at the <direction>", or -1.

  With normalised box centres (c_x, c_y) and the direction's weights (w_x, w_y) from
  `POSITIONS` (e.g. leftmost = (-1, 0), top left = (-1, -1)), the answer maximises
  w_x * c_x + w_y * c_y and must beat every other token by at least `margin` - a
  linear function of the boxes, so the pointer network can express it directly.

  Args:
    direction: index into `POSITIONS` or its name (e.g. `"top left"`).
    token_boxes: `[n, 4]` pixel boxes x1, y1, x2, y2.
    width, height: image size in pixels.
    margin: required lead over the runner-up.

  Returns:
    The token index, or -1 when there is no token or the lead is below `margin`.
  """
  if isinstance(direction, str):
    names = [name for name, _, _ in POSITIONS]
    if direction not in names:
      raise ValueError(f"unknown direction {direction!r}; expected one of {names}.")
    direction = names.index(direction)
  wx, wy = POSITIONS[int(direction)][1]
  boxes = np.asarray(token_boxes, np.float64).reshape(-1, 4)
  if not len(boxes):
    return -1
  score = (wx * (boxes[:, 0] + boxes[:, 2]) / (2 * width)
           + wy * (boxes[:, 1] + boxes[:, 3]) / (2 * height))
  order = np.argsort(-score, kind="stable")
  if len(order) > 1 and score[order[0]] - score[order[1]] < margin:
    return -1
  return int(order[0])


def text_on_object(host_box: np.ndarray, token_boxes: np.ndarray) -> list[int]:
  """The `ocr_on_object`/`ocr_multi` rule: tokens inside the box, in reading order.

  Reading order is by `x1` (the planted words sit on one line).
  """
  boxes = np.asarray(token_boxes).reshape(-1, 4)
  inside = [i for i in range(len(boxes)) if _contains(host_box, boxes[i])]
  return sorted(inside, key=lambda i: (boxes[i][0], i))


def _round_box(box: np.ndarray, width: int, height: int) -> np.ndarray:
  out = np.round(np.asarray(box, np.float64))
  out[[0, 2]] = np.clip(out[[0, 2]], 0, width - 1)
  out[[1, 3]] = np.clip(out[[1, 3]], 0, height - 1)
  return out


class _Scene:
  """One image under construction: its size, objects, OCR tokens and reserved rects."""

  def __init__(self, width: int, height: int):
    self.width, self.height = width, height
    self.objects: list[_Obj] = []
    self.tokens: list[_Tok] = []
    self.occupied: list[np.ndarray] = []


def _pick_class(rng: np.random.Generator, candidates: Sequence[int],
                constrained: Mapping[int, int]) -> int:
  free = [c for c in candidates if c not in constrained]
  if not free:
    return -1
  return int(free[int(rng.integers(len(free)))])


def _build_scene(rng: np.random.Generator, spec: SyntheticSpec, qtypes: Sequence[str],
                 has_ocr: bool, words: Sequence[str]
                 ) -> tuple[_Scene, list[_Question]] | None:
  """Draws one image for the given question types; None if this draw failed."""
  width = int(rng.integers(spec.image_width_range[0], spec.image_width_range[1] + 1))
  height = int(rng.integers(spec.image_height_range[0], spec.image_height_range[1] + 1))
  scene = _Scene(width, height)
  names = spec.class_names
  all_classes = list(range(len(names)))
  multi_classes = [c for c in all_classes if names[c] in MULTI_TEXT_CLASSES]
  single_classes = [c for c in all_classes if names[c] not in MULTI_TEXT_CLASSES]
  constrained: dict[int, int] = {}  # class -> exact number of instances
  word_iter = iter(words)
  plans: list[_Plan] = []

  for qtype in qtypes:
    kind = qtype
    if qtype == "no_ocr":
      kind = OCR_COPY_TYPES[int(rng.integers(len(OCR_COPY_TYPES)))]
    plan = _Plan(qtype=qtype, kind=kind)
    if kind == "ocr_on_object":
      plan.cls, plan.count = _pick_class(rng, single_classes, constrained), 1
    elif kind == "ocr_multi":
      plan.cls, plan.count = _pick_class(rng, multi_classes, constrained), 1
    elif kind in ("ocr_relation", "colour"):
      plan.cls, plan.count = _pick_class(rng, all_classes, constrained), 1
    elif kind == "count":
      plan.cls = _pick_class(rng, all_classes, constrained)
      plan.count = int(rng.integers(1, spec.max_count + 1))
    elif kind == "exists":
      plan.cls = _pick_class(rng, all_classes, constrained)
      plan.count = int(rng.integers(1, 3)) if rng.random() < 0.5 else 0
    if kind != "ocr_position":
      if plan.cls < 0:
        return None
      constrained[plan.cls] = plan.count
    plans.append(plan)

  # Objects the OCR questions are about, placed clear of each other's text.
  for plan in plans:
    if plan.kind in ("ocr_on_object", "ocr_multi"):
      n_words = 1 if plan.kind == "ocr_on_object" else int(rng.integers(2, 4))
      planted = [next(word_iter) for _ in range(n_words)] if has_ocr else []
      lengths = [len(w) for w in planted] or list(rng.integers(3, 9, size=n_words))
      placed = _place_text_host(rng, width, height, lengths, scene.occupied)
      if placed is None:
        return None
      host_box, boxes = placed
      plan.host = len(scene.objects)
      scene.objects.append(_Obj(plan.cls, int(rng.integers(len(COLOURS))), host_box))
      scene.occupied.append(host_box)
      for word, box in zip(planted, boxes):
        scene.tokens.append(_Tok(word, box, plan.host))
      plan.words = tuple(planted)
    elif plan.kind == "ocr_relation":
      word = next(word_iter) if has_ocr else ""
      placed = _place_relation(rng, width, height, len(word), scene.occupied)
      if placed is None:
        return None
      obj_box, plan.side, token_box, reserve = placed
      plan.host = len(scene.objects)
      scene.objects.append(_Obj(plan.cls, int(rng.integers(len(COLOURS))), obj_box))
      scene.occupied.extend(reserve)
      if token_box is not None:
        scene.tokens.append(_Tok(word, token_box, -1))
        plan.words = (word,)

  # Remaining instances of constrained classes (plain objects; may overlap anything).
  for cls, count in constrained.items():
    have = sum(o.cls == cls for o in scene.objects)
    for _ in range(count - have):
      scene.objects.append(_Obj(cls, int(rng.integers(len(COLOURS))),
                                _random_box(rng, width, height)))
  if len(scene.objects) > spec.max_objects:
    return None

  # Free OCR tokens, some written on a distractor object of their own.
  unconstrained = [c for c in all_classes if c not in constrained]
  if has_ocr:
    n_planted = len(scene.tokens)
    if n_planted > spec.max_ocr:
      return None
    n_total = int(rng.integers(max(spec.min_ocr, n_planted, 1), spec.max_ocr + 1))
    for _ in range(n_total - n_planted):
      word = next(word_iter)
      for _ in range(_MAX_PLACE_TRIES):
        th = float(rng.uniform(0.03, 0.08)) * height
        tw = _text_width(rng, len(word), th)
        x1, y1 = float(rng.uniform(0, width - 1 - tw)), float(rng.uniform(0, height - 1 - th))
        box = np.array([x1, y1, x1 + tw, y1 + th])
        if _free(box, scene.occupied):
          break
      else:
        continue  # crowded image: fewer tokens
      host = -1
      if (unconstrained and len(scene.objects) < spec.max_objects
          and rng.random() < spec.text_on_distractor_prob):
        margin = rng.uniform(0.1, 1.5, size=4) * th + 3.0
        host_box = np.array([box[0] - margin[0], box[1] - margin[1], box[2] + margin[2],
                             box[3] + margin[3]])
        host_box = np.clip(host_box, 0, [width - 1, height - 1, width - 1, height - 1])
        host = len(scene.objects)
        cls = unconstrained[int(rng.integers(len(unconstrained)))]
        scene.objects.append(_Obj(cls, int(rng.integers(len(COLOURS))), host_box))
      scene.tokens.append(_Tok(word, box, host))
      scene.occupied.append(box)

  # Distractor objects (classes no question is about).
  n_objects = int(rng.integers(max(spec.min_objects, len(scene.objects)), spec.max_objects + 1))
  while unconstrained and len(scene.objects) < n_objects:
    cls = unconstrained[int(rng.integers(len(unconstrained)))]
    scene.objects.append(_Obj(cls, int(rng.integers(len(COLOURS))),
                              _random_box(rng, width, height)))

  # Integer pixel boxes, then shuffled rows (keeping host links).
  for item in scene.objects + scene.tokens:
    item.box = _round_box(item.box, width, height)
  obj_perm = rng.permutation(len(scene.objects))
  new_index = np.empty(len(obj_perm), np.int64)
  new_index[obj_perm] = np.arange(len(obj_perm))
  scene.objects = [scene.objects[i] for i in obj_perm]
  for tok in scene.tokens:
    tok.host = int(new_index[tok.host]) if tok.host >= 0 else -1
  for plan in plans:
    plan.host = int(new_index[plan.host]) if plan.host >= 0 else -1
  if spec.shuffle_ocr and scene.tokens:
    scene.tokens = [scene.tokens[i] for i in rng.permutation(len(scene.tokens))]

  questions = _make_questions(rng, spec, scene, plans, has_ocr)
  if questions is None:
    return None
  return scene, questions


def _variants_answers(rng: np.random.Generator, correct: str, variants: Sequence[str],
                      prob: float) -> list[str]:
  answers = [correct] * NUM_ANSWERS
  variants = [v for v in dict.fromkeys(variants) if v and v != correct]
  if variants and rng.random() < prob:
    n_var = int(rng.integers(1, 3))
    for i in rng.choice(NUM_ANSWERS, size=n_var, replace=False):
      answers[int(i)] = variants[int(rng.integers(len(variants)))]
  return answers


def _make_questions(rng: np.random.Generator, spec: SyntheticSpec, scene: _Scene,
                    plans: Sequence[_Plan], has_ocr: bool) -> list[_Question] | None:
  """Derives every answer from the final geometry; None if a rule is ambiguous."""
  names = spec.class_names
  token_boxes = np.array([t.box for t in scene.tokens]).reshape(-1, 4)
  token_words = [t.word for t in scene.tokens]
  used_directions: set[int] = set()
  seen_questions: set[str] = set()
  out = []
  for plan in plans:
    kind = plan.kind
    name = names[plan.cls] if plan.cls >= 0 else ""
    fmt = {"name": name, "plural": OBJECT_CLASSES[plan.cls][1] if plan.cls >= 0 else "",
           "article": "an" if name[:1] in "aeiou" else "a"}
    answer, variants = "", []
    templates = _TEMPLATES.get(kind, ())
    if kind == "ocr_position":
      options = [d for d, (name, _, _) in enumerate(POSITIONS)
                 if name in spec.position_directions and d not in used_directions]
      if has_ocr:
        options = [d for d in options
                   if position_answer(d, token_boxes, scene.width, scene.height,
                                      spec.position_margin) >= 0]
      if not options:
        return None
      plan.direction = options[int(rng.integers(len(options)))]
      used_directions.add(plan.direction)
      templates = POSITIONS[plan.direction][2]
      if has_ocr:
        answer = token_words[position_answer(plan.direction, token_boxes, scene.width,
                                             scene.height, spec.position_margin)]
    elif kind in ("ocr_on_object", "ocr_multi"):
      if has_ocr:
        inside = text_on_object(scene.objects[plan.host].box, token_boxes)
        if tuple(token_words[i] for i in inside) != plan.words:
          return None
        answer = " ".join(plan.words)
        variants = [" ".join(plan.words[:j]) for j in range(1, len(plan.words))]
    elif kind == "ocr_relation":
      fmt["rel"] = dict(RELATIONS)[plan.side]
      if has_ocr:
        index = relation_answer(scene.objects[plan.host].box, plan.side, token_boxes)
        if index < 0 or token_words[index] != plan.words[0]:
          return None
        answer = plan.words[0]
    elif kind == "count":
      count = sum(o.cls == plan.cls for o in scene.objects)
      answer = NUMBER_WORDS[count]
      variants = [NUMBER_WORDS[c] for c in (count - 1, count + 1) if c >= 1]
    elif kind == "colour":
      matches = [o for o in scene.objects if o.cls == plan.cls]
      if len(matches) != 1:
        return None
      answer = COLOURS[matches[0].colour]
      variants = [c for c in COLOURS if c != answer]
    elif kind == "exists":
      present = any(o.cls == plan.cls for o in scene.objects)
      answer = "yes" if present else "no"
      variants = ["no" if present else "yes"]
    if plan.qtype == "no_ocr":
      answer, variants = UNANSWERABLE, ["nothing"]
    elif kind in OCR_COPY_TYPES and kind != "ocr_multi":
      variants = [w for w in token_words if w != answer]
    question = templates[int(rng.integers(len(templates)))].format(**fmt)
    if question in seen_questions:
      return None
    seen_questions.add(question)
    answers = _variants_answers(rng, answer, variants, spec.answer_variant_prob)
    out.append(_Question(plan.qtype, question, answer, tuple(answers)))
  return out


# --------------------------------------------------------------------- generation


def _type_counts(spec: SyntheticSpec, n: int) -> dict[str, int]:
  """Exact per-type counts for `n` questions (largest remainder rounding)."""
  raw = {t: f * n for t, f in spec.type_fractions}
  counts = {t: int(math.floor(v)) for t, v in raw.items()}
  order = sorted(QUESTION_TYPES, key=lambda t: (-(raw[t] - counts[t]),
                                                QUESTION_TYPES.index(t)))
  for t in order[:n - sum(counts.values())]:
    counts[t] += 1
  return counts


def _group_questions(rng: np.random.Generator, spec: SyntheticSpec, n: int
                     ) -> list[tuple[bool, list[str]]]:
  """Question types per image as (has_ocr, types): `no_ocr` questions get text-free images."""
  types_list = [t for t, c in _type_counts(spec, n).items() for _ in range(c)]
  types_list = [types_list[i] for i in rng.permutation(len(types_list))]
  no_text = [t for t in types_list if t == "no_ocr"]
  with_text = [t for t in types_list if t != "no_ocr"]
  k = spec.questions_per_image
  images = [(False, no_text[i:i + k]) for i in range(0, len(no_text), k)]
  images += [(True, with_text[i:i + k]) for i in range(0, len(with_text), k)]
  return [images[i] for i in rng.permutation(len(images))]


@dataclasses.dataclass(frozen=True)
class _Lexicon:
  train_words: tuple[str, ...]
  novel_words: tuple[str, ...]
  row: Mapping[str, int]  # word -> row of the token embedding table


def _image_words(rng: np.random.Generator, spec: SyntheticSpec, lexicon: _Lexicon,
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


def _save_pickled(path: pathlib.Path, obj: Any) -> None:
  np.save(path, obj, allow_pickle=True)


def _write_split(root: pathlib.Path, spec: SyntheticSpec, split: str,
                 rng: np.random.Generator, lexicon: _Lexicon,
                 tables: Mapping[str, np.ndarray], id_offset: int) -> list[dict[str, Any]]:
  """Generates one split's images and features; returns its imdb entries."""
  obj_dir = root / "feat_resx" / split
  ocr_dir = root / "ocr_feat_resx" / split
  obj_dir.mkdir(parents=True)
  ocr_dir.mkdir(parents=True)
  entries = []
  for image_index, (has_ocr, qtypes) in enumerate(
      _group_questions(rng, spec, spec.num_questions(split))):
    for _ in range(_MAX_SCENE_TRIES):
      words = _image_words(rng, spec, lexicon, split)
      built = _build_scene(rng, spec, qtypes, has_ocr, words)
      if built is not None:
        break
    else:
      raise RuntimeError(
          f"could not build a {split} image for question types {qtypes} in "
          f"{_MAX_SCENE_TRIES} tries; the spec is too crowded (raise max_objects/max_ocr "
          "or the image size).")
    scene, questions = built
    image_id = f"{split}_{image_index:06d}"
    d = spec.feat_dim

    objects = scene.objects
    obj_feat = (spec.class_signal * tables["class"][[o.cls for o in objects]]
                + spec.colour_signal * tables["colour"][[o.colour for o in objects]]
                + spec.feature_noise * rng.standard_normal((len(objects), d)))
    obj_info = {
        "bbox": np.array([o.box for o in objects], np.float32).reshape(-1, 4),
        "objects": np.array([o.cls + 1 for o in objects], np.int64),
        "image_width": scene.width,
        "image_height": scene.height,
        "num_boxes": len(objects),
    }
    np.save(obj_dir / f"{image_id}.npy", obj_feat.astype(np.float32))
    _save_pickled(obj_dir / f"{image_id}_info.npy", obj_info)

    tokens = scene.tokens
    ocr_feat = np.zeros((len(tokens), d))
    if tokens:
      context = np.array([tables["class"][objects[t.host].cls] if t.host >= 0
                          else np.zeros(d) for t in tokens])
      ocr_feat = (spec.token_signal * tables["token"][[lexicon.row[t.word] for t in tokens]]
                  + spec.ocr_context_signal * context
                  + spec.feature_noise * rng.standard_normal((len(tokens), d)))
    ocr_info = {
        "ocr_tokens": [t.word for t in tokens],
        "ocr_boxes": np.array([t.box for t in tokens], np.float32).reshape(-1, 4),
        "ocr_conf": rng.uniform(0.8, 1.0, size=len(tokens)).astype(np.float32),
    }
    np.save(ocr_dir / f"{image_id}.npy", ocr_feat.astype(np.float32))
    _save_pickled(ocr_dir / f"{image_id}_info.npy", ocr_info)

    for q in questions:
      entries.append({
          "question": q.question,
          "question_id": id_offset + len(entries),
          "image_id": image_id,
          "image_width": scene.width,
          "image_height": scene.height,
          "feature_path": f"{image_id}.npy",
          "answers": list(q.variants),
          "set_name": split,
          "question_type": q.qtype,
      })
  return entries


def _question_only_baseline(train: Sequence[Mapping[str, Any]],
                            evaluated: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """Accuracy of answering with the most frequent train answer of the same question."""
  by_question: dict[str, dict[str, int]] = {}
  overall: dict[str, int] = {}
  for e in train:
    majority = max(set(e["answers"]), key=lambda a: (e["answers"].count(a), a))
    table = by_question.setdefault(e["question"], {})
    table[majority] = table.get(majority, 0) + 1
    overall[majority] = overall.get(majority, 0) + 1
  fallback = max(overall, key=lambda a: (overall[a], a)) if overall else ""
  totals: dict[str, list[float]] = {}
  for e in evaluated:
    table = by_question.get(e["question"])
    pred = max(table, key=lambda a: (table[a], a)) if table else fallback
    totals.setdefault(e["question_type"], []).append(textvqa_accuracy(pred, e["answers"]))
  all_scores = [s for v in totals.values() for s in v]
  return {
      "accuracy": float(np.mean(all_scores)) if all_scores else 0.0,
      "per_type": {t: float(np.mean(totals[t])) for t in QUESTION_TYPES if t in totals},
  }


def _relative_paths() -> dict[str, Any]:
  return {
      "imdb": {s: f"imdb/imdb_{s}.npy" for s in SPLITS},
      "obj_feat_dir": {s: f"feat_resx/{s}" for s in SPLITS},
      "ocr_feat_dir": {s: f"ocr_feat_resx/{s}" for s in SPLITS},
      "objects_vocab": "1600-400-20/objects_vocab.txt",
      "answer_vocab": "vocabs/fixed_answer_vocab.txt",
      "bert_vocab": "bert/vocab.txt",
      "fasttext": None,
  }


def _write_text_lines(path: pathlib.Path, lines: Sequence[str]) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")


def _generate_into(root: pathlib.Path, spec: SyntheticSpec) -> dict[str, Any]:
  """Writes every file of the dataset under `root`; returns the manifest dict."""
  lex_seq, emb_seq, *split_seqs = np.random.SeedSequence(spec.seed).spawn(2 + len(SPLITS))
  answer_words = answer_vocab_words(spec)
  forbidden = set(answer_words) | set(_template_words()) | set(bert_vocab_tokens(spec))
  forbidden |= {w for pair in OBJECT_CLASSES for w in pair}
  all_words = _make_lexicon(np.random.default_rng(lex_seq),
                            spec.ocr_lexicon_size + spec.novel_lexicon_size,
                            spec.numeric_token_fraction, forbidden)
  lexicon = _Lexicon(train_words=tuple(all_words[:spec.ocr_lexicon_size]),
                     novel_words=tuple(all_words[spec.ocr_lexicon_size:]),
                     row={w: i for i, w in enumerate(all_words)})
  bert_tokens = bert_vocab_tokens(
      spec, lexicon.train_words if spec.bert_whole_ocr_words else ())
  emb_rng = np.random.default_rng(emb_seq)
  tables = {
      "class": emb_rng.standard_normal((spec.num_object_classes, spec.feat_dim)),
      "colour": emb_rng.standard_normal((len(COLOURS), spec.feat_dim)),
      "token": emb_rng.standard_normal((len(all_words), spec.feat_dim)),
  }

  paths = _relative_paths()
  _write_text_lines(root / paths["objects_vocab"], spec.class_names)
  _write_text_lines(root / paths["answer_vocab"], answer_words)
  _write_text_lines(root / paths["bert_vocab"], bert_tokens)
  (root / "imdb").mkdir()

  entries_by_split: dict[str, list[dict[str, Any]]] = {}
  for split_index, (split, seq) in enumerate(zip(SPLITS, split_seqs)):
    entries = _write_split(root, spec, split, np.random.default_rng(seq), lexicon, tables,
                           id_offset=split_index * 10_000_000)
    metadata = {"dataset_name": "synthetic_textvqa", "generator": GENERATOR_NAME,
                "format_version": FORMAT_VERSION, "split": split, "seed": spec.seed,
                "has_answer": True, "num_questions": len(entries)}
    imdb = np.empty(len(entries) + 1, dtype=object)
    imdb[0] = metadata
    for i, entry in enumerate(entries):
      imdb[i + 1] = entry
    np.save(root / paths["imdb"][split], imdb, allow_pickle=True)
    entries_by_split[split] = entries

  return _manifest(root, spec, paths, entries_by_split, lexicon, answer_words, bert_tokens)


def _manifest(root: pathlib.Path, spec: SyntheticSpec, paths: Mapping[str, Any],
              entries_by_split: Mapping[str, Sequence[Mapping[str, Any]]],
              lexicon: _Lexicon, answer_words: Sequence[str],
              bert_tokens: Sequence[str]) -> dict[str, Any]:
  """Counts, observed sequence lengths and baselines of a freshly written dataset."""
  bert_vocab = frozenset(bert_tokens)
  cache: dict[str, int] = {}

  def pieces(text: str) -> int:
    total = 0
    for word in text.split():
      if word not in cache:
        tokens = wordpiece_tokenize(word, bert_vocab)
        if "[UNK]" in tokens:
          raise RuntimeError(f"internal error: {word!r} is not covered by bert/vocab.txt")
        cache[word] = len(tokens)
      total += cache[word]
    return total + 2  # [CLS] ... [SEP]

  names = spec.class_names
  train_words = set(lexicon.train_words)
  max_q = max_ocr_text = max_obj_text = max_words = 0
  counts: dict[str, Any] = {}
  for split, entries in entries_by_split.items():
    image_ids = sorted({e["image_id"] for e in entries})
    n_tokens = n_novel = n_no_text = 0
    for image_id in image_ids:
      ocr_info = np.load(root / paths["ocr_feat_dir"][split] / f"{image_id}_info.npy",
                         allow_pickle=True).item()
      obj_info = np.load(root / paths["obj_feat_dir"][split] / f"{image_id}_info.npy",
                         allow_pickle=True).item()
      tokens = ocr_info["ocr_tokens"]
      n_tokens += len(tokens)
      n_novel += sum(t not in train_words for t in tokens)
      n_no_text += not tokens
      max_ocr_text = max(max_ocr_text, pieces(" ".join(tokens)))
      max_obj_text = max(max_obj_text,
                         pieces(" ".join(names[int(k) - 1] for k in obj_info["objects"])))
    per_type = {t: 0 for t in QUESTION_TYPES}
    for e in entries:
      per_type[e["question_type"]] += 1
      max_q = max(max_q, pieces(e["question"]))
      max_words = max(max_words, max(len(a.split()) for a in e["answers"]))
    counts[split] = {
        "questions": len(entries), "images": len(image_ids), "per_type": per_type,
        "images_without_ocr": n_no_text, "ocr_tokens": n_tokens,
        "novel_ocr_tokens": n_novel,
    }
  baselines = {s: _question_only_baseline(entries_by_split["train"], entries_by_split[s])
               for s in SPLITS if s != "train" and entries_by_split[s]}
  return {
      "generator": GENERATOR_NAME,
      "format_version": FORMAT_VERSION,
      "dataset_name": "synthetic_textvqa",
      "spec": spec.to_dict(),
      "paths": dict(paths),
      "counts": counts,
      "sizes": {
          "feat_dim": spec.feat_dim,
          "max_objects": spec.max_objects,
          "max_ocr": spec.max_ocr,
          "num_object_classes": spec.num_object_classes,
          "answer_vocab_size": len(answer_words),
          "bert_vocab_size": len(bert_tokens),
          "max_question_len": max_q,
          "max_ocr_text_len": max_ocr_text,
          "max_obj_text_len": max_obj_text,
          "max_answer_words": max_words,
          "max_decode_steps": min(max_words + 1, MAX_DECODE_STEPS),
          "ocr_lexicon_size": len(lexicon.train_words),
          "novel_lexicon_size": len(lexicon.novel_words),
      },
      "question_only_baseline": baselines,
  }


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
  """Loads a manifest, given its path or the dataset directory.

  Raises:
    FileNotFoundError: there is no manifest.
    ValueError: the file is not a manifest written by this module.
  """
  path = pathlib.Path(path)
  if path.is_dir():
    path = path / MANIFEST_NAME
  if not path.is_file():
    raise FileNotFoundError(f"no synthetic dataset manifest at {path}")
  manifest = json.loads(path.read_text(encoding="utf-8"))
  if not isinstance(manifest, dict) or manifest.get("generator") != GENERATOR_NAME:
    raise ValueError(f"{path} is not a manifest written by {GENERATOR_NAME}.")
  return manifest


def _check_reusable(root: pathlib.Path, spec: SyntheticSpec) -> pathlib.Path:
  """Path of the existing manifest if it matches `spec`; raises otherwise."""
  manifest_path = root / MANIFEST_NAME
  manifest = read_manifest(manifest_path)
  if manifest.get("format_version") != FORMAT_VERSION:
    raise ValueError(
        f"{root} holds a synthetic dataset of format version "
        f"{manifest.get('format_version')}, this code writes {FORMAT_VERSION}; pass "
        "overwrite=True to regenerate it.")
  wanted = json.loads(json.dumps(spec.to_dict()))
  if manifest.get("spec") != wanted:
    diff = sorted(k for k in set(wanted) | set(manifest.get("spec", {}))
                  if wanted.get(k) != manifest.get("spec", {}).get(k))
    raise ValueError(
        f"{root} holds a synthetic dataset generated from a different spec (fields "
        f"{diff} differ); pass overwrite=True to replace it or choose another out_dir.")
  missing = []
  for value in manifest["paths"].values():
    for rel in (value.values() if isinstance(value, dict) else [value]):
      if rel is not None and not (root / rel).exists():
        missing.append(rel)
  if missing:
    raise ValueError(f"{root} is an incomplete synthetic dataset (missing {missing}); "
                     "pass overwrite=True to regenerate it.")
  return manifest_path


def generate(out_dir: str | os.PathLike, spec: SyntheticSpec | None = None, *,
             overwrite: bool = False) -> pathlib.Path:
  """Writes the synthetic Text-VQA dataset of `spec` to `out_dir` (atomically).

  The files are written into a temporary sibling directory that is renamed into place
  once complete, so `out_dir` is either absent or complete.

  Args:
    out_dir: dataset root to create.
    spec: what to generate (defaults to `SyntheticSpec()`).
    overwrite: replace an existing synthetic dataset at `out_dir`. Without it an
      existing dataset with the same spec is reused and returned as is.

  Returns:
    Path of `<out_dir>/manifest.json`.

  Raises:
    ValueError: `out_dir` holds a dataset of another spec/format, or an incomplete one
      (without `overwrite`), or a `manifest.json` this module did not write.
    FileExistsError: `out_dir` exists, is not empty and is not a synthetic dataset
      (never deleted, not even with `overwrite`).
  """
  spec = SyntheticSpec() if spec is None else spec
  root = pathlib.Path(out_dir)
  manifest_path = root / MANIFEST_NAME
  if root.exists():
    if not root.is_dir():
      raise FileExistsError(f"{root} exists and is not a directory.")
    if manifest_path.is_file():
      read_manifest(manifest_path)  # raises if it is not ours
      if not overwrite:
        return _check_reusable(root, spec)
    elif any(root.iterdir()):
      raise FileExistsError(
          f"{root} exists, is not empty and has no {MANIFEST_NAME}: not a synthetic "
          "dataset, refusing to touch it.")
  root.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
  tmp.chmod(0o755)  # mkdtemp makes it private; the dataset is meant to be shared
  try:
    manifest = _generate_into(tmp, spec)
    (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n",
                                     encoding="utf-8")
    old = None
    if root.exists():
      if any(root.iterdir()):
        old = pathlib.Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
        os.rename(root, old / "data")
      else:
        root.rmdir()
    try:
      os.rename(tmp, root)
    except OSError:
      if old is not None:  # put the previous dataset back
        os.rename(old / "data", root)
        old.rmdir()
      elif manifest_path.is_file() and not overwrite:
        # Another process finished the same directory first: reuse it if it matches.
        shutil.rmtree(tmp, ignore_errors=True)
        return _check_reusable(root, spec)
      raise
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return manifest_path
