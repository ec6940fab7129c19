"""The TAP data release end to end: CLI build, `prepare_data`, shared builds, setup errors.

Runs on `release_mock` (a hand-written mock of the release layout, Python-2 `_info.npy`
files included), with 8-d region features and the fastText stand-in where the package or
the 8 GB model would be needed.
"""

from __future__ import annotations

import logging
import os
import pathlib
import sys
import types

import numpy as np
import pytest

from configs import common
from lfpr_jax.data import pipeline, prepare, readers, samples, tfds_builder
from tests.data import release_mock as mock

NUM_ANSWERS = len(mock.ANSWER_WORDS)


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> pathlib.Path:
  return mock.write_release(tmp_path_factory.mktemp("release") / "tap_data")


@pytest.fixture(scope="module")
def cli_built(release):
  """Both datasets built through the CLI, at its default place."""
  for dataset in ("textvqa", "stvqa"):
    tfds_builder.main(["--data_dir", str(release), "--dataset", dataset,
                       "--fasttext_model", "none", "--feat_dim", str(mock.FEAT_DIM)])
  return release


def _config(model: str, dataset: str, root: pathlib.Path, **data):
  config = common.real_data_config(model, dataset)
  config.data.root = str(root)
  config.data.fasttext_model = "none"
  config.data.update(data)
  config.model.obj_feat_dim = mock.FEAT_DIM
  config.model.ocr_feat_dim = mock.FEAT_DIM
  return config


def _example(built: str, dataset: str, split: str, index: int) -> dict:
  source = pipeline.open_source(tfds_builder.default_built_dir(built, dataset), split)
  return pipeline.PrepareExample().map(source[index])


def _mtimes(path: str) -> dict[str, int]:
  return {str(p): p.stat().st_mtime_ns for p in pathlib.Path(path).rglob("*")}


def test_cli_builds_both_datasets_in_the_release(cli_built):
  for dataset, sizes in (("textvqa", {"train": 3, "val": 2}),
                         ("stvqa", {"train": 3, "val": 1})):
    for split, n in sizes.items():
      path = tfds_builder.dataset_dir(
          tfds_builder.default_built_dir(cli_built, dataset), dataset, split)
      assert path.startswith(str(cli_built / "lfpr_jax_built" / dataset))
      assert os.path.isfile(os.path.join(path, "dataset_info.json"))
      assert len(pipeline.open_source(path, split)) == n


def test_textvqa_examples(cli_built):
  no_ocr = _example(cli_built, "textvqa", "train", 0)
  # 0 OCR tokens: OCR segment [SEP][SEP] then padding; no OCR rows.
  assert no_ocr["ocr_num"] == 0 and no_ocr["obj_num"] == 3
  np.testing.assert_array_equal(no_ocr["cmb_text"][20:23], [102, 102, 0])
  assert not no_ocr["image_feature_1"].any() and not no_ocr["context_feature_0"].any()
  # Object rows are seed + row/1000; boxes [r, 2r, r+4, 2r+4] / (W, H, W, H).
  np.testing.assert_allclose(no_ocr["image_feature_0"][2], 1.002, rtol=1e-6)
  np.testing.assert_allclose(no_ocr["obj_bbox_coordinates"][1],
                             [1 / 1024, 2 / 768, 5 / 1024, 6 / 768], rtol=1e-6)
  assert no_ocr["question_id"] == 34602 and no_ocr["image_id"] == b"0054c91397f2fe05"
  stop = mock.ANSWER_WORDS.index("stop")
  assert no_ocr["targets"][0, stop] == 1.0 and no_ocr["train_loss_mask"][0] == 1.0

  many = _example(cli_built, "textvqa", "train", 1)
  # 120 OCR tokens are cut to 100 slots; 130 objects: obj_num is the unclipped count.
  assert many["ocr_num"] == 100 and many["obj_num"] == 130
  assert many["context_tokens"][99] == b"w99"
  np.testing.assert_allclose(many["image_feature_1"][99], -2.099, rtol=1e-6)
  np.testing.assert_allclose(many["ocr_bbox_coordinates"][99],
                             np.array(mock.ocr_box(99)) / [800, 600, 800, 600],
                             rtol=1e-6)
  # The answer "w99" is copied from OCR slot 99 (index num_answers + 99).
  assert many["targets"][0, NUM_ANSWERS + 99] > 0

  cjk = _example(cli_built, "textvqa", "train", 2)
  # Non-ASCII OCR tokens survive the Python-2 pickle, lower-cased by word_tokenize.
  assert list(cjk["context_tokens"][:5]) == [t.encode("utf-8") for t in
                                             ("北京", "café", "ñandú", "stop", "2019")]
  assert cjk["targets"][0, mock.ANSWER_WORDS.index("北京")] > 0
  assert cjk["targets"][0, NUM_ANSWERS + 0] > 0  # and copyable from slot 0
  assert cjk["context_feature_0"][:5].any(axis=1).all()
  assert not cjk["context_feature_0"][5:].any()


def test_stvqa_examples(cli_built):
  ex = _example(cli_built, "stvqa", "train", 1)
  assert ex["image_id"] == b"COCO_train2014_000000000036"
  assert [a.decode() for a in ex["answers"]] == mock.tile("coca", "coca cola")
  assert ex["ocr_num"] == 2 and list(ex["context_tokens"][:3]) == [b"stop", b"coca",
                                                                   b"<pad>"]
  np.testing.assert_allclose(ex["image_feature_0"][3], 4.003, rtol=1e-6)
  empty = _example(cli_built, "stvqa", "train", 2)  # imdb/ source folder, no OCR
  assert empty["ocr_num"] == 0 and empty["image_width"] == 300
  val = _example(cli_built, "stvqa", "val", 0)  # sandwich/, 105 OCR tokens
  assert val["ocr_num"] == 100 and val["obj_num"] == 6
  assert not val["targets"][0, NUM_ANSWERS:].any()  # "w104" fell off slot 100


def test_tap_and_tap12_share_the_cli_build(cli_built, tmp_path, caplog):
  target = tfds_builder.dataset_dir(
      tfds_builder.default_built_dir(cli_built, "textvqa"), "textvqa", "train")
  before = _mtimes(target)
  prepared = {}
  with caplog.at_level(logging.INFO):
    for model in ("tap", "tap12"):
      prepared[model] = prepare.prepare_data(_config(model, "textvqa", cli_built),
                                             str(tmp_path / model))
  assert prepared["tap"].model_config.mmt_layers == 4
  assert prepared["tap12"].model_config.mmt_layers == 12
  assert prepared["tap"].built_dir == prepared["tap12"].built_dir == \
      tfds_builder.default_built_dir(str(cli_built), "textvqa")
  assert _mtimes(target) == before  # reused, not rebuilt
  assert "rebuilding" not in caplog.text
  assert not (tmp_path / "tap" / "tfds").exists()


def test_changed_input_rebuilds_and_says_why(tmp_path, caplog):
  root = mock.write_release(tmp_path / "tap_data")
  config = _config("tap", "stvqa", root, splits=("train", "val"))
  first = prepare.prepare_data(config, str(tmp_path / "w1"))
  val_dir = tfds_builder.dataset_dir(first.built_dir, "stvqa", "val")
  val_before = _mtimes(val_dir)
  info = root / "ocr_feat_resx/stvqa_conf" / mock.STVQA_IMAGES[0]
  info = info.with_name(info.name.replace(".npy", "_info.npy"))
  mock.write_py2_npy(info, dict(ocr_tokens=["GO", "Coca"], ocr_boxes=np.ones((2, 4))))
  os.utime(info, ns=(1, 1))  # a different mtime whatever the clock resolution
  with caplog.at_level(logging.WARNING):
    built = tfds_builder.build_dataset(None, first.built_dir, ("train", "val"),
                                       layout=first.layout, config=first.model_config,
                                       progress=False)
  assert not built["train"].reused and built["val"].reused
  assert _mtimes(val_dir) == val_before
  assert "coco-text/COCO_train2014_000000000036_info.npy" in built["train"].reason
  assert "rebuilding" in caplog.text and "1 feature/info file(s) changed" in caplog.text
  ex = pipeline.open_source(built["train"].path, "train")[0]
  assert ex["context_tokens"][0] == b"go"
  # A different example shape (OCR slots) is named too.
  again = tfds_builder.build_dataset(
      None, first.built_dir, ("val",), layout=first.layout,
      config=first.model_config.__class__(**{**first.model_config.to_dict(),
                                             "ocr_max": 50}), progress=False)
  assert "ocr_max 100 -> 50" in again["val"].reason


def test_fasttext_loaded_once_per_build(tmp_path, monkeypatch):
  root = mock.write_release(tmp_path / "tap_data")
  loads = []
  real = samples.load_resources

  def counting(*args, **kwargs):
    loads.append(args)
    return real(*args, **kwargs)

  monkeypatch.setattr(samples, "load_resources", counting)
  config = _config("tap", "textvqa", root)
  prepare.prepare_data(config, str(tmp_path / "w"))
  assert len(loads) == 1  # train and val share one load
  prepare.prepare_data(config, str(tmp_path / "w2"))
  assert len(loads) == 1  # nothing to build: nothing loaded


def test_missing_setup_files_fail_first(tmp_path, monkeypatch):
  root = mock.write_release(tmp_path / "tap_data", bert_vocab=False)
  built = root / "lfpr_jax_built"
  with pytest.raises(FileNotFoundError, match="huggingface.co/bert-base-uncased"):
    prepare.prepare_data(_config("tap", "textvqa", root), str(tmp_path / "w"))
  vocab = tmp_path / "elsewhere/vocab.txt"
  vocab.parent.mkdir()
  vocab.write_text("\n".join(mock.bert_vocab_lines()[:100]) + "\n")  # no [UNK]...
  with pytest.raises(ValueError, match=r"special tokens.*huggingface"):
    prepare.prepare_data(_config("tap", "textvqa", root, bert_vocab=str(vocab)),
                         str(tmp_path / "w"))
  vocab.write_text("\n".join(mock.bert_vocab_lines()) + "\n")
  config = _config("tap", "textvqa", root, bert_vocab=str(vocab), fasttext_model="")
  with pytest.raises(FileNotFoundError, match=r"wiki.en.bin.*fasttext.cc.*8 GB"):
    prepare.prepare_data(config, str(tmp_path / "w"))
  model = root / ".vector_cache/wiki.en.bin"
  mock.write_fasttext_header(model)
  monkeypatch.setitem(sys.modules, "fasttext", None)
  with pytest.raises(ImportError, match=r"fasttext-wheel.*pip install -e '\.\[real\]'"):
    prepare.prepare_data(config, str(tmp_path / "w"))
  monkeypatch.setitem(sys.modules, "fasttext", types.ModuleType("fasttext"))
  model.write_text("2519370 300\nthe 0.1 0.2\n")  # the text-format wiki.en.vec
  with pytest.raises(ValueError, match="not a fastText binary model"):
    prepare.prepare_data(config, str(tmp_path / "w"))
  assert not built.exists()  # every check ran before any build work
  with pytest.raises(ValueError, match="config.data.root is not set"):
    prepare.prepare_data(_config("tap", "textvqa", ""), str(tmp_path / "w"))


def test_overridden_paths_reach_the_layout(tmp_path):
  config = _config("tap", "stvqa", tmp_path, bert_vocab="/v/vocab.txt",
                   fasttext_model="ft/wiki.en.bin")
  layout = prepare.data_layout(config.data, str(tmp_path))
  assert layout.path(layout.bert_vocab) == "/v/vocab.txt"
  assert layout.fasttext_path() == str(tmp_path / "ft/wiki.en.bin")
  assert readers.DataLayout.for_dataset("stvqa", tmp_path).fasttext_path() == \
      str(tmp_path / ".vector_cache/wiki.en.bin")
