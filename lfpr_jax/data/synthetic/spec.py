"""What a synthetic dataset is made of: `SyntheticSpec` and the world it draws from.

The constants name everything a scene or a question can contain (splits, question
types, object classes, colours, number words, position directions, relations); a
`SyntheticSpec` picks from them and fixes every size, probability and signal scale, so
the generated files are a function of the spec alone (`writer.generate`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from lfpr_jax.models.config import dataclass_from_dict, dataclass_to_dict

SPLITS: tuple[str, ...] = ("train", "val", "test")

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
token maximising w_x * c_x + w_y * c_y over normalised box centres (`scenes.position_answer`)."""

RELATIONS: tuple[tuple[str, str], ...] = (
    ("left", "to the left of"), ("right", "to the right of"), ("above", "above"),
    ("below", "below"))

POSITION_MARGIN: float = 0.05
"""Default lead (normalised box-centre units) the `ocr_position` answer must have over
the runner-up (`SyntheticSpec.position_margin`, `scenes.position_answer`)."""


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
      `ocr_position` question must beat the runner-up by (`scenes.position_answer`); scenes
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
  position_margin: float = POSITION_MARGIN
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
    out = dataclass_to_dict(self)
    out["type_fractions"] = self.fractions
    return out

  @classmethod
  def from_dict(cls, data: Mapping[str, Any]) -> "SyntheticSpec":
    """Inverse of `to_dict`; unknown keys raise a ValueError."""
    return dataclass_from_dict(cls, data)
