"""`SampleBuilder`: one fixed-shape example per imdb question (docs/TAP.md §3.2 + collation)."""

from __future__ import annotations

import numpy as np
import pytest

from lfpr_jax.models import batch as batch_lib
from lfpr_jax.data import readers, samples
from lfpr_jax.data.answers import process_answers
from lfpr_jax.data.phoc import phoc_matrix
from lfpr_jax.data.text import make_context_tokens, word_tokenize
from lfpr_jax.models.config import TapConfig
from tests.data.upstream_layout import ANSWER_WORDS, FEAT_DIM, layout_of

TRAIN_OCR = "ocr_feat_resx/textvqa_conf/train_images"


@pytest.fixture
def builder(data_dir):  # noqa: F811
  return samples.SampleBuilder.from_layout(layout_of(data_dir), "train")


@pytest.fixture
def train(data_dir, builder):  # noqa: F811
  entries = readers.read_imdb(data_dir / "imdb/m4c_textvqa/imdb_train_ocr_en.npy")
  return entries, [builder.build(e) for e in entries]


def _decode(array) -> list[str]:
  return [b.decode("utf-8") for b in np.asarray(array).reshape(-1)]


def test_shapes_and_dtypes(builder, train):
  _, examples = train
  c = builder.config
  expected = {
      "cmb_text": ((170,), np.int32), "image_feature_0": ((100, FEAT_DIM), np.float32),
      "obj_bbox_coordinates": ((100, 4), np.float32), "obj_num": ((), np.int32),
      "image_feature_1": ((100, FEAT_DIM), np.float32),
      "context_feature_0": ((100, 300), np.float32),
      "context_feature_1": ((100, 604), np.float32),
      "ocr_bbox_coordinates": ((100, 4), np.float32), "ocr_num": ((), np.int32),
      "train_prev_inds": ((12,), np.int32),
      "targets": ((12, len(ANSWER_WORDS) + 100), np.float32),
      "train_loss_mask": ((12,), np.float32), "has_answers": ((), np.bool_),
      "question_id": ((), np.int64), "image_id": ((), object),
      "image_width": ((), np.int32), "image_height": ((), np.int32),
      "context_tokens": ((100,), object), "answers": ((10,), object),
  }
  assert c.num_answers == len(ANSWER_WORDS)
  for ex in examples:
    assert set(ex) == set(expected)
    for key, (shape, dtype) in expected.items():
      assert ex[key].shape == shape and ex[key].dtype == dtype, key
  stacked = {k: np.stack([ex[k] for ex in examples]) for k in examples[0]}
  inputs = batch_lib.model_inputs(stacked, c, with_targets=True)
  assert inputs["cmb_text"].shape == (4, 170) and inputs["targets"].shape[-1] == \
      c.num_classes


def test_cmb_text_layout(builder, train):
  entries, examples = train
  tok = builder.tokenizer
  ex, entry = examples[0], entries[0]
  ocr_raw = ["Coca", "Cola's", "2019", "STOP?", "red,"]
  ocr_norm = [word_tokenize(t) for t in ocr_raw]
  assert ocr_norm == ["coca", "cola 's", "2019", "stop", "red"]
  q = tok.encode(entry.question)
  o = tok.encode(" ".join(ocr_norm))
  obj = readers.read_object_features(builder.feature_files(entry)[0],
                                     builder.class_names)
  b = tok.encode(" ".join(obj.tokens))
  cmb = ex["cmb_text"]
  assert cmb[:len(q)].tolist() == q and not cmb[len(q):20].any()
  assert cmb[20] == 102 and cmb[21:20 + len(o)].tolist() == o[1:]
  assert not cmb[20 + len(o):120].any()
  assert cmb[120] == 102 and cmb[121:120 + len(b)].tolist() == b[1:]
  assert not cmb[120 + len(b):].any()


def test_empty_ocr(train):
  _, examples = train
  ex = examples[1]  # image 7 has no OCR tokens
  assert ex["cmb_text"][20:23].tolist() == [102, 102, 0]
  assert not ex["cmb_text"][22:120].any()
  assert ex["ocr_num"] == 0 and ex["obj_num"] == 3
  assert _decode(ex["context_tokens"]) == ["<pad>"] * 100
  for key in ("image_feature_1", "context_feature_0", "context_feature_1",
              "ocr_bbox_coordinates"):
    assert not ex[key].any(), key
  assert ex["has_answers"] and ex["train_loss_mask"][:2].tolist() == [1, 1]


def test_truncation_and_counts(builder, train, data_dir):  # noqa: F811
  entries, examples = train
  ex = examples[2]  # 120 objects, 110 OCR tokens, long question
  q = builder.tokenizer.encode(entries[2].question)
  assert len(q) > 20 and ex["cmb_text"][:20].tolist() == q[:20]
  assert ex["cmb_text"][19] != 102  # lost its [SEP]
  assert ex["cmb_text"][119] not in (0, 102)  # OCR text truncated: no [SEP], no pad
  assert ex["obj_num"] == 120  # unclipped row count
  assert ex["ocr_num"] == 100  # tokens kept
  feats = np.load(data_dir / "feat_resx/train/img2.npy")
  np.testing.assert_array_equal(ex["image_feature_0"], feats[:100])
  ocr_feats = np.load(data_dir / TRAIN_OCR / "img2.npy")
  np.testing.assert_array_equal(ex["image_feature_1"], ocr_feats[:100])
  assert _decode(ex["context_tokens"]) == [f"word{i}" for i in range(100)]


def test_boxes_fasttext_phoc(builder, train, data_dir):  # noqa: F811
  _, examples = train
  ex = examples[0]  # img0: 640 x 480, 5 objects, 5 OCR tokens
  info = np.load(data_dir / "feat_resx/train/img0_info.npy", allow_pickle=True).item()
  scale = np.array([1 / 640, 1 / 480, 1 / 640, 1 / 480])
  np.testing.assert_array_equal(ex["obj_bbox_coordinates"][:5],
                                (info["bbox"] * scale).astype(np.float32))
  assert not ex["obj_bbox_coordinates"][5:].any()
  ocr_info = np.load(data_dir / TRAIN_OCR / "img0_info.npy", allow_pickle=True).item()
  np.testing.assert_array_equal(ex["ocr_bbox_coordinates"][:5],
                                (ocr_info["ocr_boxes"] * scale).astype(np.float32))
  assert not ex["ocr_bbox_coordinates"][5:].any()
  tokens = [word_tokenize(t) for t in ocr_info["ocr_tokens"]]
  np.testing.assert_array_equal(ex["context_feature_0"],
                                builder.fasttext.matrix(tokens, 100))
  np.testing.assert_array_equal(
      ex["context_feature_0"][1],
      np.mean([builder.fasttext.word_vector("cola"), builder.fasttext.word_vector("'s")],
              axis=0))
  np.testing.assert_array_equal(ex["context_feature_1"], phoc_matrix(tokens, 100))
  feats = np.load(data_dir / "feat_resx/train/img0.npy")
  np.testing.assert_array_equal(ex["image_feature_0"][:5], feats)
  assert not ex["image_feature_0"][5:].any()
  assert ex["image_width"] == 640 and ex["image_height"] == 480
  assert ex["image_id"].item() == b"img0" and ex["question_id"] == 10


def test_targets_match_answer_processor(builder, train):
  entries, examples = train
  for entry, ex in zip(entries, examples):
    ocr = readers.read_ocr_features(builder.feature_files(entry)[1])
    ctx = make_context_tokens(ocr.tokens, 100)
    ref = process_answers(entry.answers, ctx, builder.vocab)
    np.testing.assert_array_equal(ex["targets"], ref.targets)
    np.testing.assert_array_equal(ex["train_prev_inds"], ref.train_prev_inds)
    np.testing.assert_array_equal(ex["train_loss_mask"], ref.train_loss_mask)
    assert _decode(ex["answers"]) == list(entry.answers)
    assert _decode(ex["context_tokens"]) == ctx
  # image 0: "coca" is in the vocabulary and OCR slot 0 -> both get the soft score.
  v = builder.vocab
  assert examples[0]["targets"][0, v.index("coca")] > 0
  assert examples[0]["targets"][0, v.num_vocab + 0] > 0
  # image 2: "word3" only in OCR slot 3; "word105" was truncated away.
  assert examples[2]["train_prev_inds"][:2].tolist() == [v.bos_idx, v.num_vocab + 3]


def test_question_without_answers(data_dir):  # noqa: F811
  builder = samples.SampleBuilder.from_layout(layout_of(data_dir), "test")
  entries = readers.read_imdb(data_dir / "imdb/m4c_textvqa/imdb_test_ocr_en.npy")
  ex = builder.build(entries[0])
  assert not ex["has_answers"]
  assert not ex["targets"].any() and not ex["train_prev_inds"].any()
  assert not ex["train_loss_mask"].any()
  assert _decode(ex["answers"]) == [""] * 10
  # object_tokens (not class ids) in this image's info
  assert ex["obj_num"] == 2 and ex["cmb_text"][120] == 102


def test_builder_errors(data_dir, tmp_path):  # noqa: F811
  layout = layout_of(data_dir)
  with pytest.raises(FileNotFoundError, match="object features"):
    samples.SampleBuilder.from_layout(
        layout_of(data_dir, splits={"train": readers.SplitFiles(
            "imdb/m4c_textvqa/imdb_train_ocr_en.npy", "feat_resx/nope", TRAIN_OCR)}),
        "train")
  with pytest.raises(ValueError, match="num_answers=5000"):
    samples.SampleBuilder.from_layout(layout, "train", TapConfig())
  with pytest.raises(FileNotFoundError, match="missing/objects_vocab.txt"):
    samples.SampleBuilder.from_layout(
        layout_of(data_dir, object_vocab="missing/objects_vocab.txt"), "train")
  with pytest.raises(FileNotFoundError, match="wiki.en.bin"):
    samples.SampleBuilder.from_layout(readers.DataLayout.for_dataset(
        "textvqa", data_dir), "train")
  vocab = data_dir / "m4c_vocabs/textvqa/fixed_answer_vocab_textvqa_5k.txt"
  vocab.write_text("\n".join(w for w in ANSWER_WORDS if w != "<pad>") + "\n")
  with pytest.raises(ValueError, match="<pad>"):
    samples.SampleBuilder.from_layout(layout, "train")


def test_missing_feature_file(builder, data_dir):  # noqa: F811
  entries = readers.read_imdb(data_dir / "imdb/m4c_textvqa/imdb_train_ocr_en.npy")
  (data_dir / TRAIN_OCR / "img0_info.npy").unlink()
  with pytest.raises(FileNotFoundError, match="img0_info.npy"):
    builder.build(entries[0])
