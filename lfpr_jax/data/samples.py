"""One fixed-shape TAP example per imdb question (`load_item` + `BatchCollator`).

`SampleBuilder.build(entry)` reproduces docs/TAP.md §3.2 and the `BatchCollator` rule for one
question, with every field padded to a fixed shape so examples can be stored and batched
without ragged leaves:

* `cmb_text` = question(20) ⧺ OCR words(100) ⧺ object names(50) (the config's
  `question_len`, `ocr_text_len`, `obj_text_len`), each segment
  `[CLS] ... [SEP]`, truncated (losing its final `[SEP]`), zero-padded; the first id of
  the OCR and object segments is overwritten with 102 (`[SEP]`), so an empty OCR list
  gives `102 102 0 ...`;
* object / OCR features zero-padded or truncated to 100 rows; `obj_num` is the
  UNCLIPPED number of object rows in the file (upstream `image_info_0.max_features`),
  `ocr_num` the number of OCR tokens kept (at most 100; upstream
  `context_info_0.max_features`, docs/TAP.md §3.3);
* boxes divided by the imdb image width/height (float64 arithmetic, as upstream, then
  float32), zero-padded/truncated to 100 rows, not clipped;
* FastText and PHOC rows of the `simple_word`-normalised OCR tokens;
* `targets` / `train_prev_inds` / `train_loss_mask` from `process_answers` when the
  question has answers, zeros otherwise (`has_answers` False).

Ids and counts are int32, features float32; strings are numpy object arrays of UTF-8
`bytes` (what a TFDS round trip returns).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np

from lfpr_jax.data import readers
from lfpr_jax.data.answers import NUM_ANSWERS, process_answers
from lfpr_jax.data.phoc import phoc_matrix
from lfpr_jax.data.text import PAD_TOKEN, make_context_tokens, word_tokenize
from lfpr_jax.data.vocab import AnswerVocab
from lfpr_jax.models.config import TapConfig


META_FIELDS: tuple[str, ...] = (
    "has_answers", "question_id", "image_id", "image_width", "image_height",
    "context_tokens", "answers")
"""Fields for metrics and prediction files (not read by the model)."""
STRING_FIELDS: tuple[str, ...] = ("image_id", "context_tokens", "answers")


def _bytes_array(strings: Sequence[str]) -> np.ndarray:
  out = np.empty(len(strings), dtype=object)
  out[:] = [s.encode("utf-8") for s in strings]
  return out


def _pad_rows(array: np.ndarray, rows: int, dtype: np.dtype) -> np.ndarray:
  """`array[:rows]` zero-padded to `rows` rows (upstream `CopyProcessor`)."""
  out = np.zeros((rows,) + array.shape[1:], dtype)
  n = min(rows, array.shape[0])
  out[:n] = array[:n]
  return out


def normalise_boxes(boxes: np.ndarray, width: float, height: float) -> np.ndarray:
  """Pixel boxes x1, y1, x2, y2 divided by the image size, as upstream computes it.

  Upstream multiplies the stored array by the Python list `[1/W, 1/H, 1/W, 1/H]`,
  which numpy evaluates in float64, then casts to float32.

  Args:
    boxes: `[n, 4]` pixel boxes (any numeric dtype).
    width, height: the imdb image size.

  Returns:
    `[n, 4]` float32.
  """
  if boxes.shape[0] == 0:
    return np.zeros((0, 4), np.float32)
  scale = np.array([1. / width, 1. / height, 1. / width, 1. / height])
  return np.array(boxes * scale, dtype=np.float32)


@dataclasses.dataclass(frozen=True)
class Resources:
  """The split-independent inputs of `SampleBuilder`, loaded once per build.

  The fastText model takes ~8 GB of RAM and about a minute to load, so a build of
  several splits loads it once (`load_resources`) and shares it.

  Attributes:
    vocab: the answer vocabulary.
    tokenizer: BERT WordPiece.
    fasttext: OCR-token word vectors.
    class_names: object class names, `background` at 0.
  """
  vocab: AnswerVocab
  tokenizer: readers.BertTokenizer
  fasttext: readers.FastTextVectors
  class_names: tuple[str, ...]


def load_resources(layout: readers.DataLayout, fasttext_dim: int = 300) -> Resources:
  """Loads the vocabularies, the tokenizer and the FastText vectors named by `layout`.

  Args:
    layout: the data directory layout.
    fasttext_dim: width of the stand-in vectors when `layout.fasttext_model` is None.

  Returns:
    The resources.
  """
  return Resources(
      vocab=AnswerVocab.from_file(layout.path(layout.answer_vocab)),
      tokenizer=readers.BertTokenizer(layout.path(layout.bert_vocab)),
      fasttext=readers.FastTextVectors(layout.fasttext_path(), dim=fasttext_dim),
      class_names=readers.read_object_class_names(layout.path(layout.object_vocab)))


class SampleBuilder:
  """Builds fixed-shape TAP examples of one split.

  Attributes:
    obj_dir, ocr_dir: the split's object / OCR feature directories.
    config: the model's shapes (slot counts, feature widths, decoding steps).
    vocab: the answer vocabulary (its size must be `config.num_answers`).
    tokenizer: BERT WordPiece.
    fasttext: OCR-token word vectors.
    class_names: object class names, `background` at 0.
  """

  def __init__(self, obj_dir: str | os.PathLike, ocr_dir: str | os.PathLike,
               config: TapConfig, vocab: AnswerVocab, tokenizer: readers.BertTokenizer,
               fasttext: readers.FastTextVectors, class_names: Sequence[str]):
    """Checks that the pieces fit together.

    Raises:
      FileNotFoundError: a feature directory is missing.
      ValueError: the answer vocabulary does not have `config.num_answers` entries, the FastText width is not
        `config.fasttext_dim`, or the BERT vocabulary is larger than the model's.
    """
    self.obj_dir = readers.require_dir(
        obj_dir, "object features: <feature_path> .npy files with their _info.npy")
    self.ocr_dir = readers.require_dir(
        ocr_dir, "OCR features: <feature_path> .npy files with their _info.npy")
    if vocab.num_vocab != config.num_answers:
      raise ValueError(f"answer vocabulary {vocab.source} has {vocab.num_vocab} entries "
                       f"but the model config expects num_answers={config.num_answers}.")
    if fasttext.dim != config.fasttext_dim:
      raise ValueError(f"FastText vectors ({fasttext.description}) are {fasttext.dim}-d "
                       "but the model config expects "
                       f"fasttext_dim={config.fasttext_dim}.")
    if tokenizer.vocab_size > config.vocab_size:
      raise ValueError(f"BERT vocabulary {tokenizer.vocab_path} has "
                       f"{tokenizer.vocab_size} entries, more than the model's "
                       f"vocab_size={config.vocab_size}.")
    self.config = config
    self.vocab = vocab
    self.tokenizer = tokenizer
    self.fasttext = fasttext
    self.class_names = tuple(class_names)

  @classmethod
  def from_layout(cls, layout: readers.DataLayout, split: str,
                  config: TapConfig | None = None, *,
                  resources: Resources | None = None) -> "SampleBuilder":
    """The builder of `split`, loading what `layout` names unless `resources` is given.

    Args:
      layout: the data directory layout.
      split: split name (`train`, `val`, `test`).
      config: model shapes; default `TapConfig()` with `num_answers` set to the
        answer vocabulary's size.
      resources: already loaded vocabularies, tokenizer and FastText vectors (shared
        by the splits of one build); default: loaded from `layout`.

    Returns:
      The builder.
    """
    files = layout.split(split)
    if resources is None:
      resources = load_resources(
          layout, TapConfig().fasttext_dim if config is None else config.fasttext_dim)
    if config is None:
      config = TapConfig(num_answers=resources.vocab.num_vocab)
    return cls(
        obj_dir=files.obj_features, ocr_dir=files.ocr_features, config=config,
        vocab=resources.vocab, tokenizer=resources.tokenizer,
        fasttext=resources.fasttext, class_names=resources.class_names)

  def feature_files(self, entry: readers.ImdbEntry) -> tuple[str, str]:
    """(object feature file, OCR feature file) of `entry`."""
    return (os.path.join(self.obj_dir, entry.feature_path),
            os.path.join(self.ocr_dir, entry.feature_path))

  @staticmethod
  def _features(feats: np.ndarray, rows: int, dim: int, path: str) -> np.ndarray:
    """`[rows, dim]` float32: the stored rows, zero-padded or truncated."""
    if feats.shape[0] == 0:
      return np.zeros((rows, dim), np.float32)
    if feats.shape[1] != dim:
      raise ValueError(f"features {path} have shape {feats.shape}; the model expects "
                       f"{dim} columns.")
    return _pad_rows(feats, rows, np.float32)

  def build(self, entry: readers.ImdbEntry) -> dict[str, np.ndarray]:
    """The example of one imdb question.

    Args:
      entry: a validated imdb entry (`readers.read_imdb`).

    Returns:
      Fixed-shape numpy arrays (C = `config.num_classes`, T = `config.decode_steps`):
      `cmb_text` [170] int32, `image_feature_0` [100, 2048] f32,
      `obj_bbox_coordinates` [100, 4] f32, `obj_num` [] int32, `image_feature_1`
      [100, 2048] f32, `context_feature_0` [100, 300] f32, `context_feature_1`
      [100, 604] f32, `ocr_bbox_coordinates` [100, 4] f32, `ocr_num` [] int32,
      `train_prev_inds` [T] int32, `targets` [T, C] f32, `train_loss_mask` [T] f32,
      `has_answers` [] bool, `question_id` [] int64, `image_id` [] bytes,
      `image_width` / `image_height` [] int32, `context_tokens` [100] bytes
      (`<pad>`-padded), `answers` [10] bytes (empty strings without answers).

    Raises:
      FileNotFoundError / ValueError: from the feature readers, naming the file.
    """
    c = self.config
    obj_path, ocr_path = self.feature_files(entry)
    obj = readers.read_object_features(obj_path, self.class_names)
    ocr = readers.read_ocr_features(ocr_path)
    width, height = entry.image_width, entry.image_height

    question, _ = self.tokenizer.encode_segment(entry.question, c.question_len)
    obj_text, _ = self.tokenizer.encode_segment(" ".join(obj.tokens),
                                                 c.obj_text_len)
    raw_tokens = list(ocr.tokens[:c.ocr_max])
    ocr_tokens = [word_tokenize(t) for t in raw_tokens]
    ocr_text, _ = self.tokenizer.encode_segment(" ".join(ocr_tokens),
                                                 c.ocr_text_len)
    # BatchCollator: the OCR and object segments start with [SEP] instead of [CLS].
    ocr_text[0] = self.tokenizer.sep_id
    obj_text[0] = self.tokenizer.sep_id
    cmb_text = np.concatenate([question, ocr_text, obj_text]).astype(np.int32)

    context_tokens = make_context_tokens(raw_tokens, c.ocr_max, PAD_TOKEN)
    n_ocr = len(ocr_tokens)
    steps, classes = c.decode_steps, c.num_classes
    if entry.answers is not None:
      try:
        processed = process_answers(entry.answers, context_tokens, self.vocab,
                                    max_copy_steps=steps, num_ocr_slots=c.ocr_max)
      except ValueError as e:
        raise ValueError(f"question {entry.question_id} (imdb entry {entry.index}): "
                         f"{e}") from e
      targets = processed.targets
      prev_inds = processed.train_prev_inds.astype(np.int32)
      loss_mask = processed.train_loss_mask
      answers = list(entry.answers)
    else:
      targets = np.zeros((steps, classes), np.float32)
      prev_inds = np.zeros(steps, np.int32)
      loss_mask = np.zeros(steps, np.float32)
      answers = [""] * NUM_ANSWERS

    image_id = np.empty((), dtype=object)
    image_id[()] = entry.image_id.encode("utf-8")
    return {
        "cmb_text": cmb_text,
        "image_feature_0": self._features(obj.features, c.obj_max, c.obj_feat_dim,
                                          obj.path),
        "obj_bbox_coordinates": _pad_rows(normalise_boxes(obj.boxes, width, height),
                                          c.obj_max, np.float32),
        "obj_num": np.array(obj.num_rows, np.int32),
        "image_feature_1": self._features(ocr.features, c.ocr_max, c.ocr_feat_dim,
                                          ocr.path),
        "context_feature_0": self.fasttext.matrix(ocr_tokens, c.ocr_max),
        "context_feature_1": phoc_matrix(ocr_tokens, c.ocr_max),
        "ocr_bbox_coordinates": _pad_rows(
            normalise_boxes(ocr.boxes[:c.ocr_max], width, height), c.ocr_max,
            np.float32),
        "ocr_num": np.array(n_ocr, np.int32),
        "train_prev_inds": prev_inds,
        "targets": np.asarray(targets, np.float32),
        "train_loss_mask": np.asarray(loss_mask, np.float32),
        "has_answers": np.array(entry.answers is not None),
        "question_id": np.array(entry.question_id, np.int64),
        "image_id": image_id,
        "image_width": np.array(int(width), np.int32),
        "image_height": np.array(int(height), np.int32),
        "context_tokens": _bytes_array(context_tokens),
        "answers": _bytes_array(answers),
    }
