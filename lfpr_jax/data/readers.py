"""Readers for the upstream TAP/M4C data files: imdb, region features, vocabularies.

What is on disk (docs/TAP.md §3.1) and how each file is read here:

* **imdb** `*.npy`: a pickled 1-D object array; element 0 is a metadata dict and is
  skipped, elements 1.. are per-question dicts (`read_imdb`). The pythia loader hacks are
  kept: `question_str` stands in for a missing `question`; a missing `answers` is taken
  from `valid_answers` (preferred) or `all_answers`; a trailing `"<copy>"` answer is
  dropped; `feature_path` defaults to `<image_id>.npy`. Every entry is validated up front.
* **object / OCR region features** `<dir>/<feature_path>`: a float array `[n, 2048]`
  next to `<stem>_info.npy`, a pickled dict read with `encoding='latin1'`
  (`read_object_features`, `read_ocr_features`). Row counts are cross-checked.
* **object class names** `1600-400-20/objects_vocab.txt` with `background` prepended
  (`read_object_class_names`).
* **BERT WordPiece** `vocab.txt` of `bert-base-uncased` (`BertTokenizer`), reproducing
  pytorch-transformers 1.2 `BertTokenizer.encode(text, add_special_tokens=True)` with the
  maintained HF `tokenizers` library. Not in the TAP data release: `BERT_VOCAB_SOURCE`.
* **FastText** `wiki.en.bin` (`FastTextVectors`), or a deterministic subword-hashing
  stand-in when no model file is given. Not in the TAP data release:
  `FASTTEXT_MODEL_SOURCE`; `check_setup_files` checks both before any long work.
* **Directory layouts** of TextVQA / ST-VQA as the TAP configs name them (`DataLayout`);
  one release root holds both.

Every missing file or directory is a `FileNotFoundError` that names the path and what it
should contain; every malformed input is one `ValueError` naming the file (and entry).
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
from typing import Any, Mapping, Sequence

import numpy as np

BERT_SPECIAL_IDS: Mapping[str, int] = types.MappingProxyType(
    {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103})
"""Ids of the BERT special tokens in `bert-base-uncased`; the TAP pipeline relies on
`[PAD]` = 0 (the text mask is `ids != 0`) and `[SEP]` = 102 (forced by the collator)."""

BACKGROUND_CLASS: str = "background"
COPY_ANSWER: str = "<copy>"
FASTTEXT_PIP_PACKAGE: str = "fasttext-wheel"
FASTTEXT_INSTALL: str = ("pip install -e '.[real]' (the optional extra installs "
                         f"{FASTTEXT_PIP_PACKAGE}), or pip install {FASTTEXT_PIP_PACKAGE}")
BERT_VOCAB_SOURCE: str = (
    "vocab.txt of bert-base-uncased (30522 lines) from the Hugging Face model page "
    "https://huggingface.co/bert-base-uncased (Files: vocab.txt)")
FASTTEXT_MODEL_SOURCE: str = (
    "wiki.en.bin (English, 300-d, bin+text zip) from "
    "https://fasttext.cc/docs/en/pretrained-vectors.html; loading it takes ~8 GB of RAM")
# fastText binary models start with this int32 magic, then an int32 version.
_FASTTEXT_MAGIC: int = 793712314


def require_file(path: str | os.PathLike, what: str) -> str:
  """`path` as a string; FileNotFoundError naming it and `what` it holds if absent."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    kind = "is a directory, not a file" if os.path.isdir(path) else "not found"
    raise FileNotFoundError(f"{path}: {kind}; expected {what}.")
  return path


def require_dir(path: str | os.PathLike, what: str) -> str:
  """`path` as a string; FileNotFoundError naming it and `what` it holds if absent."""
  path = os.fspath(path)
  if not os.path.isdir(path):
    kind = "is a file, not a directory" if os.path.isfile(path) else "not found"
    raise FileNotFoundError(f"directory {path}: {kind}; expected {what}.")
  return path


# ----------------------------------------------------------------------------------
# Directory layouts
# ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SplitFiles:
  """Where one split's files live, relative to `DataLayout.root`.

  Attributes:
    imdb: the imdb `.npy` file.
    obj_features: directory of object features (`<feature_path>` + `_info.npy`).
    ocr_features: directory of OCR features (`<feature_path>` + `_info.npy`).
  """
  imdb: str
  obj_features: str
  ocr_features: str


_TEXTVQA_SPLITS = types.MappingProxyType({
    "train": SplitFiles("imdb/m4c_textvqa/imdb_train_ocr_en.npy", "feat_resx/train",
                        "ocr_feat_resx/textvqa_conf/train_images"),
    # TextVQA val images live in the train feature folders (docs/TAP.md §12 item 16).
    "val": SplitFiles("imdb/m4c_textvqa/imdb_val_ocr_en.npy", "feat_resx/train",
                      "ocr_feat_resx/textvqa_conf/train_images"),
    "test": SplitFiles("imdb/m4c_textvqa/imdb_test_ocr_en.npy", "feat_resx/test",
                       "ocr_feat_resx/textvqa_conf/test_images"),
})
_STVQA_SPLITS = types.MappingProxyType({
    "train": SplitFiles("original_dl/ST-VQA/m4c_stvqa/imdb_subtrain.npy",
                        "feat_resx/stvqa/train", "ocr_feat_resx/stvqa_conf"),
    "val": SplitFiles("original_dl/ST-VQA/m4c_stvqa/imdb_subval.npy",
                      "feat_resx/stvqa/train", "ocr_feat_resx/stvqa_conf"),
    "test": SplitFiles("original_dl/ST-VQA/m4c_stvqa/imdb_test_task3.npy",
                       "feat_resx/stvqa/test_task3",
                       "ocr_feat_resx/stvqa_conf/test_task3"),
})
# `lfpr_jax.data.synthetic.generate` writes this layout (its manifest's `paths`).
_SYNTHETIC_SPLITS = types.MappingProxyType({
    split: SplitFiles(f"imdb/imdb_{split}.npy", f"feat_resx/{split}",
                      f"ocr_feat_resx/{split}")
    for split in ("train", "val", "test")})
_LAYOUT_DEFAULTS: Mapping[str, Mapping[str, Any]] = types.MappingProxyType({
    "textvqa": dict(splits=_TEXTVQA_SPLITS,
                    answer_vocab="m4c_vocabs/textvqa/fixed_answer_vocab_textvqa_5k.txt"),
    "stvqa": dict(splits=_STVQA_SPLITS,
                  answer_vocab="m4c_vocabs/stvqa/fixed_answer_vocab_stvqa_5k.txt"),
    # The synthetic benchmark ships no FastText model: the stand-in vectors are used.
    "synthetic": dict(splits=_SYNTHETIC_SPLITS,
                      answer_vocab="vocabs/fixed_answer_vocab.txt",
                      bert_vocab="bert/vocab.txt", fasttext_model=None),
})
DATASET_NAMES: tuple[str, ...] = tuple(_LAYOUT_DEFAULTS)


@dataclasses.dataclass(frozen=True)
class DataLayout:
  """An upstream-layout data directory: which file holds what.

  Paths are relative to `root` (absolute paths are kept as they are). The defaults are
  the paths of the TAP configs (`configs/vqa/m4c_*/tap_refine.yml`); one release root
  holds both TextVQA and ST-VQA. The BERT vocabulary and the FastText model are not part
  of the release (pytorch-transformers and pythia download them: `BERT_VOCAB_SOURCE`,
  `FASTTEXT_MODEL_SOURCE`), so here they sit under `root` by default and may be
  anywhere else (absolute paths).

  Attributes:
    root: the data directory (upstream `data_root_dir`).
    splits: split name -> `SplitFiles`.
    answer_vocab: the fixed answer vocabulary file.
    object_vocab: the object class names (`objects_vocab.txt`, 1600 lines).
    bert_vocab: the `bert-base-uncased` WordPiece `vocab.txt`.
    fasttext_model: `wiki.en.bin`, or None for the deterministic stand-in vectors.
    dataset: informational name (`textvqa`, `stvqa`, `synthetic`, `custom`).
  """
  root: str
  splits: Mapping[str, SplitFiles]
  answer_vocab: str
  object_vocab: str = "1600-400-20/objects_vocab.txt"
  bert_vocab: str = "bert-base-uncased/vocab.txt"
  fasttext_model: str | None = ".vector_cache/wiki.en.bin"
  dataset: str = "custom"

  def __post_init__(self):
    object.__setattr__(self, "root", os.fspath(self.root))
    object.__setattr__(self, "splits", types.MappingProxyType(
        {str(k): v if isinstance(v, SplitFiles) else SplitFiles(**v)
         for k, v in dict(self.splits).items()}))

  @classmethod
  def for_dataset(cls, dataset: str, root: str | os.PathLike,
                  **overrides: Any) -> "DataLayout":
    """The TAP layout of `dataset` (`textvqa`, `stvqa` or `synthetic`) under `root`.

    Args:
      dataset: dataset name.
      root: the data directory.
      **overrides: replace any other attribute (e.g. `fasttext_model=None`).

    Returns:
      The layout.
    """
    if dataset not in _LAYOUT_DEFAULTS:
      raise ValueError(f"unknown dataset {dataset!r}; known: {list(DATASET_NAMES)}.")
    fields = dict(_LAYOUT_DEFAULTS[dataset], dataset=dataset, root=os.fspath(root))
    fields.update(overrides)
    return cls(**fields)

  @classmethod
  def from_json(cls, path: str | os.PathLike) -> "DataLayout":
    """Reads a layout written by `to_json` (a relative `root` is relative to the file)."""
    path = require_file(path, "a JSON data layout (see DataLayout.to_json)")
    with open(path, encoding="utf-8") as f:
      fields = json.load(f)
    root = fields.get("root", ".")
    fields["root"] = os.path.join(os.path.dirname(os.path.abspath(path)), root)
    return cls(**fields)

  def to_json(self) -> str:
    """JSON text of the layout (round-trips through `from_json`)."""
    fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    fields["splits"] = {k: dataclasses.asdict(v) for k, v in self.splits.items()}
    return json.dumps(fields, indent=2, sort_keys=True)

  def path(self, relative: str) -> str:
    """`relative` resolved against `root`."""
    return os.path.join(self.root, relative)

  def split(self, name: str) -> SplitFiles:
    """The resolved (absolute-or-root-joined) files of split `name`."""
    if name not in self.splits:
      raise ValueError(f"data layout of {self.root} ({self.dataset}) has no split "
                       f"{name!r}; known: {sorted(self.splits)}.")
    files = self.splits[name]
    return SplitFiles(imdb=self.path(files.imdb),
                      obj_features=self.path(files.obj_features),
                      ocr_features=self.path(files.ocr_features))

  def fasttext_path(self) -> str | None:
    return None if self.fasttext_model is None else self.path(self.fasttext_model)


# ----------------------------------------------------------------------------------
# imdb
# ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ImdbEntry:
  """The fields of one imdb question that the TAP pipeline reads.

  Attributes:
    index: dataset index (the imdb array element is `index + 1`).
    question: the question string.
    question_id: the question id.
    image_id: the image id as a string (upstream turns int ids into str).
    image_width, image_height: image size in pixels (boxes are divided by them).
    feature_path: file name relative to each feature directory (ends in `.npy`).
    answers: the raw answers (after the `<copy>` hack), None for test sets.
  """
  index: int
  question: str
  question_id: int
  image_id: str
  image_width: float
  image_height: float
  feature_path: str
  answers: tuple[str, ...] | None


def _entry_error(path: str, i: int, message: str) -> ValueError:
  return ValueError(f"imdb {path}: entry {i} (array element {i + 1}): {message}")


def _parse_entry(path: str, i: int, raw: Any, num_answers: int | None) -> ImdbEntry:
  if not isinstance(raw, Mapping):
    raise _entry_error(path, i, f"is a {type(raw).__name__}, expected a dict.")
  if "question" in raw:
    question = raw["question"]
  elif "question_str" in raw:
    question = raw["question_str"]
  else:
    raise _entry_error(path, i, "missing field 'question' (nor 'question_str').")
  if not isinstance(question, str):
    raise _entry_error(path, i, f"field 'question' is a {type(question).__name__}, "
                       "expected str.")
  for field in ("question_id", "image_id", "image_width", "image_height"):
    if field not in raw:
      raise _entry_error(path, i, f"missing field {field!r}.")
  try:
    question_id = int(raw["question_id"])
  except (TypeError, ValueError):
    raise _entry_error(path, i, f"field 'question_id' = {raw['question_id']!r} is not "
                       "an integer.") from None
  sizes = []
  for field in ("image_width", "image_height"):
    value = raw[field]
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float,
                                                                       np.number)):
      raise _entry_error(path, i, f"field {field!r} = {value!r} is not a number.")
    if not value > 0:
      raise _entry_error(path, i, f"field {field!r} = {value!r} must be > 0.")
    sizes.append(float(value))
  image_id = raw["image_id"]
  image_id = str(image_id) if isinstance(image_id, (int, np.integer)) else image_id
  if not isinstance(image_id, str):
    raise _entry_error(path, i, f"field 'image_id' is a {type(image_id).__name__}, "
                       "expected str or int.")
  feature_path = raw.get("feature_path", f"{image_id}.npy")
  if not isinstance(feature_path, str) or not feature_path.endswith(".npy"):
    raise _entry_error(path, i, f"field 'feature_path' = {feature_path!r} must be a "
                       "file name ending in '.npy'.")
  # Hacks of pythia's ImageDatabase for older imdbs.
  answers = raw.get("answers")
  if answers is None:
    if "valid_answers" in raw:
      answers = raw["valid_answers"]
    elif "all_answers" in raw:
      answers = raw["all_answers"]
  if answers is not None:
    if isinstance(answers, str) or not isinstance(answers, (Sequence, np.ndarray)):
      raise _entry_error(path, i, f"field 'answers' is a {type(answers).__name__}, "
                         "expected a list of strings.")
    answers = list(answers)
    if answers and answers[-1] == COPY_ANSWER:
      answers = answers[:-1]
    bad = [a for a in answers if not isinstance(a, str)]
    if bad:
      raise _entry_error(path, i, f"field 'answers' holds non-strings {bad[:3]!r}.")
    if num_answers is not None and len(answers) != num_answers:
      raise _entry_error(path, i, f"field 'answers' has {len(answers)} answers; the M4C "
                         f"answer processor needs exactly {num_answers} (ST-VQA-style "
                         "imdbs tile their answers).")
    answers = tuple(answers)
  return ImdbEntry(index=i, question=question, question_id=question_id,
                   image_id=image_id, image_width=sizes[0], image_height=sizes[1],
                   feature_path=feature_path, answers=answers)


def read_imdb(path: str | os.PathLike, *, num_answers: int | None = 10
              ) -> list[ImdbEntry]:
  """Reads and validates an imdb file.

  Args:
    path: the `.npy` imdb (a pickled object array, element 0 = metadata).
    num_answers: required number of answers per entry that has answers (None: any).

  Returns:
    One `ImdbEntry` per question, in file order (dataset index i = element i + 1).

  Raises:
    FileNotFoundError: the file does not exist.
    ValueError: the file is not an imdb, or an entry lacks a needed field (one error
      naming the file, the entry and the field).
  """
  path = require_file(path, "an M4C/TAP imdb .npy file (pickled array of question "
                      "dicts, element 0 = metadata)")
  try:
    imdb = np.load(path, allow_pickle=True)
  except (ValueError, OSError, EOFError) as e:
    raise ValueError(f"imdb {path}: not a readable .npy file ({e}).") from e
  if not isinstance(imdb, np.ndarray) or imdb.ndim != 1 or imdb.dtype != object:
    shape = getattr(imdb, "shape", None)
    raise ValueError(f"imdb {path}: expected a 1-D object array of dicts, got "
                     f"{type(imdb).__name__} of shape {shape}.")
  if len(imdb) < 1:
    raise ValueError(f"imdb {path}: empty array (element 0 must be the metadata).")
  return [_parse_entry(path, i, raw, num_answers) for i, raw in enumerate(imdb[1:])]


# ----------------------------------------------------------------------------------
# Region features
# ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _RegionFeatures:
  """Rows of one feature file with their boxes and one token per row."""
  path: str
  features: np.ndarray
  boxes: np.ndarray
  tokens: tuple[str, ...]

  @property
  def num_rows(self) -> int:
    return int(self.features.shape[0])


@dataclasses.dataclass(frozen=True)
class ObjectFeatures(_RegionFeatures):
  """One image's object detections.

  Attributes:
    path: the feature file.
    features: `[n_obj, d]` region features (as stored).
    boxes: `[n_obj, 4]` pixel boxes x1, y1, x2, y2 (as stored).
    tokens: class name per region (from `object_tokens`, or `objects` ids looked up
      in the class names).
  """


@dataclasses.dataclass(frozen=True)
class OcrFeatures(_RegionFeatures):
  """One image's OCR tokens.

  Attributes:
    path: the feature file.
    features: `[n_ocr, d]` OCR-box features (as stored).
    boxes: `[n_ocr, 4]` pixel boxes x1, y1, x2, y2 (`[0, 4]` when empty).
    tokens: the raw OCR tokens.
  """


def info_path(feature_path: str | os.PathLike) -> str:
  """The companion info file of a feature file (upstream: `<stem>_info.npy`)."""
  feature_path = os.fspath(feature_path)
  return "{}_info.npy".format(feature_path.split(".npy")[0])


def _load_features(path: str, what: str) -> tuple[np.ndarray, dict]:
  """Loads `path` (a 2-D float array) and its `_info.npy` dict."""
  path = require_file(path, f"the {what} features of one image (a [n, 2048] float .npy)")
  info_file = require_file(info_path(path), f"the {what} info of {path} (a pickled dict "
                           "saved with numpy)")
  try:
    feats = np.load(path, allow_pickle=False)
  except (ValueError, OSError, EOFError) as e:
    raise ValueError(f"{what} features {path}: not a readable numeric .npy ({e}).") from e
  if feats.ndim == 1 and feats.size == 0:
    feats = feats.reshape(0, 0)  # an image without regions saved as a flat empty array
  if feats.ndim != 2 or not np.issubdtype(feats.dtype, np.number):
    raise ValueError(f"{what} features {path}: expected a 2-D numeric array [n, d], got "
                     f"{feats.dtype} of shape {feats.shape}.")
  try:
    info = np.load(info_file, allow_pickle=True, encoding="latin1")
  except (ValueError, OSError, EOFError) as e:
    raise ValueError(f"{what} info {info_file}: not a readable .npy ({e}).") from e
  info = info.item() if isinstance(info, np.ndarray) and info.dtype == object \
      and info.ndim == 0 else info
  if not isinstance(info, Mapping):
    raise ValueError(f"{what} info {info_file}: expected a pickled dict, got "
                     f"{type(info).__name__}.")
  # Python 2 `str` keys arrive as `str` through encoding='latin1'; keys pickled as
  # Python 3 `bytes` (re-saved files) are decoded the same way.
  return feats, {k.decode("latin1") if isinstance(k, bytes) else k: v
                 for k, v in info.items()}


def _token_str(token: Any) -> str:
  """A token as str: `bytes` (re-saved Python 3 files) are UTF-8 (else latin-1)."""
  if isinstance(token, bytes):
    try:
      return token.decode("utf-8")
    except UnicodeDecodeError:
      return token.decode("latin1")
  return str(token)


def _boxes(info: Mapping[str, Any], key: str, file: str) -> np.ndarray:
  boxes = np.asarray(info[key])
  if boxes.size == 0:
    return np.zeros((0, 4), np.float32)
  if boxes.ndim != 2 or boxes.shape[1] != 4 or not np.issubdtype(boxes.dtype, np.number):
    raise ValueError(f"{file}: {key!r} must be a numeric [n, 4] array, got "
                     f"{boxes.dtype} of shape {boxes.shape}.")
  return boxes


def read_object_features(path: str | os.PathLike, class_names: Sequence[str]
                         ) -> ObjectFeatures:
  """Reads an object feature file and its `_info.npy`.

  Args:
    path: `<obj_features>/<feature_path>`.
    class_names: class id -> name, `background` at 0 (`read_object_class_names`).

  Returns:
    The `ObjectFeatures`.

  Raises:
    FileNotFoundError: the feature or info file is missing.
    ValueError: `bbox` or `objects`/`object_tokens` is missing, a class id is out of
      range, or the row counts of features, boxes and classes disagree.
  """
  path = os.fspath(path)
  feats, info = _load_features(path, "object")
  file = info_path(path)
  if "bbox" not in info:
    raise ValueError(f"object info {file}: missing key 'bbox' (keys: {sorted(info)}).")
  boxes = _boxes(info, "bbox", f"object info {file}")
  if "object_tokens" in info:
    tokens = [_token_str(t) for t in info["object_tokens"]]
  elif "objects" in info:
    ids = np.asarray(info["objects"]).reshape(-1)
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
      raise ValueError(f"object info {file}: 'objects' must hold integer class ids, got "
                       f"{ids.dtype}.")
    bad = [int(k) for k in ids if not 0 <= k < len(class_names)]
    if bad:
      raise ValueError(f"object info {file}: class ids {bad[:5]} are outside "
                       f"[0, {len(class_names)}) of the object class names.")
    tokens = [class_names[int(k)] for k in ids]
  else:
    raise ValueError(f"object info {file}: missing key 'objects' (nor 'object_tokens'); "
                     f"keys: {sorted(info)}.")
  n = feats.shape[0]
  if boxes.shape[0] != n or len(tokens) != n:
    raise ValueError(
        f"object features {path} have shape {feats.shape} but {file} has 'bbox' of "
        f"shape {boxes.shape} and {len(tokens)} object classes; the row counts must "
        "agree.")
  return ObjectFeatures(path=path, features=feats, boxes=boxes, tokens=tuple(tokens))


def read_ocr_features(path: str | os.PathLike) -> OcrFeatures:
  """Reads an OCR feature file and its `_info.npy` (Microsoft-OCR "msocr" mode).

  Args:
    path: `<ocr_features>/<feature_path>`.

  Returns:
    The `OcrFeatures`.

  Raises:
    FileNotFoundError: the feature or info file is missing.
    ValueError: `ocr_tokens` or `ocr_boxes` is missing, or the row counts of features,
      boxes and tokens disagree.
  """
  path = os.fspath(path)
  feats, info = _load_features(path, "OCR")
  file = info_path(path)
  for key in ("ocr_tokens", "ocr_boxes"):
    if key not in info:
      raise ValueError(f"OCR info {file}: missing key {key!r} (keys: {sorted(info)}).")
  tokens = [_token_str(t) for t in info["ocr_tokens"]]
  boxes = _boxes(info, "ocr_boxes", f"OCR info {file}")
  n = feats.shape[0]
  if boxes.shape[0] != n or len(tokens) != n:
    raise ValueError(
        f"OCR features {path} have shape {feats.shape} but {file} has 'ocr_boxes' of "
        f"shape {boxes.shape} and {len(tokens)} 'ocr_tokens'; the row counts must agree.")
  return OcrFeatures(path=path, features=feats, boxes=boxes, tokens=tuple(tokens))


def read_object_class_names(path: str | os.PathLike) -> tuple[str, ...]:
  """Object class names: `background`, then one stripped line per class.

  Args:
    path: `objects_vocab.txt` (1600 lines for the Visual Genome detector).

  Returns:
    The names; class id k is entry k.
  """
  path = require_file(path, "the object class names (objects_vocab.txt, one per line)")
  with open(path, encoding="utf-8") as f:
    names = [line.strip() for line in f]
  if not names:
    raise ValueError(f"object class names {path}: the file is empty.")
  return (BACKGROUND_CLASS,) + tuple(names)


# ----------------------------------------------------------------------------------
# BERT WordPiece
# ----------------------------------------------------------------------------------
def read_bert_vocab(path: str | os.PathLike) -> dict[str, int]:
  """Reads and checks a `bert-base-uncased` WordPiece `vocab.txt`.

  Args:
    path: the vocabulary, one wordpiece per line, id = line number.

  Returns:
    wordpiece -> id (pytorch-transformers `load_vocab`).

  Raises:
    FileNotFoundError: the file is missing (names where to get it).
    ValueError: not UTF-8 text, or a special token is missing or not at its
      `bert-base-uncased` id (`BERT_SPECIAL_IDS`): the TAP collator writes 102 as
      `[SEP]` and the model masks id 0.
  """
  path = require_file(path, f"the BERT WordPiece vocabulary: {BERT_VOCAB_SOURCE}")
  vocab: dict[str, int] = {}
  try:
    with open(path, encoding="utf-8") as f:
      for index, line in enumerate(f):
        vocab[line.rstrip("\n")] = index
  except UnicodeDecodeError as e:
    raise ValueError(f"BERT vocabulary {path}: not UTF-8 text ({e}); expected "
                     f"{BERT_VOCAB_SOURCE}.") from e
  wrong = {tok: vocab.get(tok) for tok, idx in BERT_SPECIAL_IDS.items()
           if vocab.get(tok) != idx}
  if wrong:
    raise ValueError(
        f"BERT vocabulary {path}: special tokens must sit at the bert-base-uncased ids "
        f"{dict(BERT_SPECIAL_IDS)}; found {wrong} (None = absent). Expected "
        f"{BERT_VOCAB_SOURCE}.")
  return vocab


class BertTokenizer:
  """`bert-base-uncased` WordPiece as pytorch-transformers 1.2 `BertTokenizer` applies it.

  Built on the maintained HF `tokenizers` library: `BertNormalizer` (clean text, pad CJK
  characters, strip accents, lower-case) + `BertPreTokenizer` (whitespace and
  punctuation) + `WordPiece` (`[UNK]`, 100 characters per word at most). The special
  tokens are matched verbatim in the raw text first, as pytorch-transformers 1.2 splits on
  `all_special_tokens` before tokenising (so a literal `[SEP]` in a question is id 102).
  `encode` adds `[CLS] ... [SEP]` like `encode(text, add_special_tokens=True)`.
  """

  def __init__(self, vocab_path: str | os.PathLike):
    """Loads a WordPiece vocabulary.

    Args:
      vocab_path: `vocab.txt`, one wordpiece per line, id = line number. The BERT
        special tokens must sit at their `bert-base-uncased` ids (`BERT_SPECIAL_IDS`):
        the TAP collator writes 102 as `[SEP]` and the model masks id 0.

    Raises:
      FileNotFoundError: the file does not exist.
      ValueError: a special token is missing or at another id.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers  # noqa: PLC0415

    self.vocab_path = os.fspath(vocab_path)
    vocab = read_bert_vocab(self.vocab_path)
    self.vocab_size = max(vocab.values()) + 1
    self.cls_id = BERT_SPECIAL_IDS["[CLS]"]
    self.sep_id = BERT_SPECIAL_IDS["[SEP]"]
    self.pad_id = BERT_SPECIAL_IDS["[PAD]"]
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]",
                                           max_input_chars_per_word=100))
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=True, lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.add_special_tokens(list(BERT_SPECIAL_IDS))
    self._tokenizer = tokenizer

  def wordpieces(self, text: str) -> list[int]:
    """Wordpiece ids of `text` without `[CLS]`/`[SEP]`."""
    return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

  def encode(self, text: str) -> list[int]:
    """`[CLS] + wordpieces(text) + [SEP]` (`encode(text, add_special_tokens=True)`)."""
    return [self.cls_id] + self.wordpieces(text) + [self.sep_id]

  def encode_segment(self, text: str, max_len: int) -> tuple[np.ndarray, int]:
    """One stream of the TAP text input (upstream `BertTokenizerProcessor`).

    Args:
      text: the question, or the space-joined OCR / object tokens.
      max_len: segment length (20 question, 100 OCR, 50 objects).

    Returns:
      (ids, length): `[max_len]` int32 `[CLS] ... [SEP]` truncated to `max_len` (a long
      input loses its final `[SEP]`) and zero-padded; length = number of kept ids.
    """
    ids = self.encode(text)[:max_len]
    out = np.zeros(max_len, np.int32)
    out[:len(ids)] = ids
    return out, len(ids)


# ----------------------------------------------------------------------------------
# FastText
# ----------------------------------------------------------------------------------
def _fnv1a(data: bytes) -> int:
  """32-bit FNV-1a, the string hash fastText uses for subword buckets."""
  h = 2166136261
  for byte in data:
    h = ((h ^ byte) * 16777619) & 0xFFFFFFFF
  return h


def import_fasttext(model_path: str | os.PathLike):
  """The `fasttext` module; one ImportError naming the package and how to install it."""
  try:
    import fasttext  # noqa: PLC0415
  except ImportError as e:
    raise ImportError(
        f"reading the FastText model {os.fspath(model_path)} needs the Python package "
        f"{FASTTEXT_PIP_PACKAGE} (module 'fasttext'), which is not installed: "
        f"{FASTTEXT_INSTALL}.") from e
  return fasttext


def check_fasttext_model(path: str | os.PathLike) -> str:
  """Checks that `path` is a fastText binary model without loading it (8 bytes read).

  Returns:
    `path` as a string.

  Raises:
    FileNotFoundError: the file is missing (names where to get it).
    ValueError: the file does not start with the fastText magic number (e.g. the
      text-format `wiki.en.vec`, or a truncated download).
  """
  path = require_file(path, f"the fastText binary model: {FASTTEXT_MODEL_SOURCE}")
  with open(path, "rb") as f:
    head = f.read(4)
  magic = int.from_bytes(head, "little") if len(head) == 4 else None
  if magic != _FASTTEXT_MAGIC:
    raise ValueError(f"FastText model {path}: not a fastText binary model (it does not "
                     f"start with the fastText magic number); expected "
                     f"{FASTTEXT_MODEL_SOURCE}.")
  return path


def check_setup_files(layout: DataLayout) -> int:
  """Checks the inputs that are not in the TAP data release, before any long work.

  The BERT vocabulary is read and checked; the fastText model's header is checked and
  the `fasttext` package imported (the model itself, ~8 GB, is not loaded).

  Args:
    layout: the data layout (`bert_vocab`, `fasttext_model`).

  Returns:
    The BERT vocabulary size.

  Raises:
    FileNotFoundError / ValueError / ImportError: one message naming the file or
      package and where to get it.
  """
  vocab_size = max(read_bert_vocab(layout.path(layout.bert_vocab)).values()) + 1
  if layout.fasttext_path() is not None:
    require_file(layout.fasttext_path(),
                 f"the fastText binary model: {FASTTEXT_MODEL_SOURCE}")
    import_fasttext(layout.fasttext_path())
    check_fasttext_model(layout.fasttext_path())
  return vocab_size


class FastTextVectors:
  """FastText word vectors of OCR tokens (docs/TAP.md §3.2 step 5).

  With a model file, vectors come from the fastText package's `get_word_vector` (the
  upstream `wiki.en.bin`, 300-d, subword-aware). With `model_path=None` a deterministic
  **stand-in** is used instead, for synthetic data and tests only: each character n-gram
  (n = 3..6 of `<word>`, plus `<word>` itself, fastText's boundary convention) is hashed
  with FNV-1a into one of `buckets` rows of a fixed Gaussian table drawn from `seed`; the
  word vector is the mean of its rows, so words sharing n-grams get similar vectors. The
  empty string maps to zeros. The stand-in carries no semantics.

  A token vector is the mean over its space-separated parts, as upstream
  `WordToVectorDict` (a normalised OCR token such as `joe 's` has two parts).
  """

  def __init__(self, model_path: str | os.PathLike | None, *, dim: int = 300,
               seed: int = 0, buckets: int = 1 << 14):
    """Loads the model or builds the stand-in table.

    Args:
      model_path: `wiki.en.bin`, or None for the stand-in.
      dim: stand-in dimension (a real model has its own).
      seed: stand-in table seed.
      buckets: stand-in table rows.

    Raises:
      FileNotFoundError: `model_path` does not exist.
      ValueError: `model_path` is not a fastText binary model.
      ImportError: the fastText package is missing (names the pip package).
    """
    self.model_path = None if model_path is None else os.fspath(model_path)
    self._model = None
    self._table = None
    if self.model_path is not None:
      require_file(self.model_path, f"the fastText binary model: {FASTTEXT_MODEL_SOURCE}")
      fasttext = import_fasttext(self.model_path)
      check_fasttext_model(self.model_path)
      try:
        self._model = fasttext.load_model(self.model_path)
      except (ValueError, RuntimeError, MemoryError) as e:
        raise ValueError(f"FastText model {self.model_path}: fastText could not load it "
                         f"({e}); expected {FASTTEXT_MODEL_SOURCE}.") from e
      self.dim = int(self._model.get_dimension())
    else:
      if dim < 1 or buckets < 1:
        raise ValueError(f"dim and buckets must be >= 1, got {dim}, {buckets}.")
      self.dim = dim
      rng = np.random.default_rng([seed, 0xFA57])
      self._table = (rng.standard_normal((buckets, dim), dtype=np.float32)
                     / np.float32(np.sqrt(dim)))
    self.description = (f"fastText {self.model_path}" if self._model is not None
                        else f"stand-in(dim={dim}, seed={seed}, buckets={buckets})")

  @property
  def is_stand_in(self) -> bool:
    return self._model is None

  def word_vector(self, word: str) -> np.ndarray:
    """`[dim]` float32 vector of one word (no splitting)."""
    if self._model is not None:
      return np.asarray(self._model.get_word_vector(word), np.float32)
    if not word:
      return np.zeros(self.dim, np.float32)
    padded = f"<{word}>"
    grams = [padded] + [padded[i:i + n] for n in range(3, 7)
                        for i in range(len(padded) - n + 1)]
    rows = [_fnv1a(g.encode("utf-8")) % self._table.shape[0] for g in grams]
    return self._table[rows].mean(axis=0)

  def token_vector(self, token: str) -> np.ndarray:
    """`[dim]` float32 mean of `word_vector` over `token.split(" ")`."""
    return np.mean([self.word_vector(w) for w in token.split(" ")], axis=0
                   ).astype(np.float32, copy=False)

  def matrix(self, tokens: Sequence[str], max_len: int) -> np.ndarray:
    """`[max_len, dim]` float32: rows of the first `max_len` tokens, zeros after."""
    out = np.zeros((max_len, self.dim), np.float32)
    for i, token in enumerate(list(tokens)[:max_len]):
      out[i] = self.token_vector(token)
    return out

