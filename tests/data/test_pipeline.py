"""TFDS ArrayRecord build (reuse, rebuild, atomicity) and the Grain loader."""

from __future__ import annotations

import os
import pathlib
import types

import numpy as np
import pytest

from lfpr_jax.models import batch as batch_lib
from lfpr_jax.data import pipeline, readers, samples, tfds_builder
from lfpr_jax.models.config import TapConfig
from tests.data.upstream_layout import ANSWER_WORDS, layout_of, write_data_dir

CONFIG = TapConfig(num_answers=len(ANSWER_WORDS))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """The tiny data directory, built once for the loader tests."""
  root = write_data_dir(tmp_path_factory.mktemp("pipe") / "data")
  out = root.parent / "built"
  results = tfds_builder.build_dataset(None, out, ("train", "val", "test"),
                                       layout=layout_of(root), progress=False)
  return root, out, results


def _mtimes(path: str) -> dict[str, int]:
  return {str(p): p.stat().st_mtime_ns for p in pathlib.Path(path).rglob("*")}


def _ids(batches) -> list[int]:
  return [int(q) for b in batches for q in b["question_id"]]


def test_build_round_trip(built):
  root, out, results = built
  assert {k: r.num_examples for k, r in results.items()} == \
      {"train": 4, "val": 2, "test": 2}
  assert all(not r.reused for r in results.values())
  train = results["train"]
  assert train.path == tfds_builder.dataset_dir(out, "textvqa", "train")
  assert os.path.isfile(os.path.join(train.path, "metadata.json"))
  source = pipeline.open_source(out, "train")
  builder = samples.SampleBuilder.from_layout(layout_of(root), "train")
  entries = readers.read_imdb(root / "imdb/m4c_textvqa/imdb_train_ocr_en.npy")
  assert len(source) == 4
  for i, entry in enumerate(entries):  # disable_shuffling keeps imdb order
    got = pipeline.PrepareExample().map(source[i])
    want = builder.build(entry)
    assert set(got) == set(want)
    for key in want:
      assert got[key].dtype == want[key].dtype, key
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_reuse_and_rebuild(tmp_path):
  root = write_data_dir(tmp_path / "data")
  out = tmp_path / "built"
  layout = layout_of(root)
  first = tfds_builder.build_dataset(None, out, ("val",), layout=layout, progress=False)
  before = _mtimes(first["val"].path)
  second = tfds_builder.build_dataset(None, out, ("val",), layout=layout, progress=False)
  assert second["val"].reused and second["val"].fingerprint == first["val"].fingerprint
  assert _mtimes(second["val"].path) == before  # nothing rewritten
  # Change one feature file the split reads: the split is rebuilt.
  feature = root / "feat_resx/train/img0.npy"
  np.save(feature, np.ones((5, 2048), np.float32))
  third = tfds_builder.build_dataset(None, out, ("val",), layout=layout, progress=False)
  assert not third["val"].reused and third["val"].fingerprint != first["val"].fingerprint
  example = pipeline.open_source(out, "val")[0]
  assert example["image_feature_0"][:5].min() == 1.0
  # force rebuilds an unchanged split.
  forced = tfds_builder.build_dataset(None, out, ("val",), layout=layout, force=True,
                                      progress=False)
  assert not forced["val"].reused


def test_interrupted_build_leaves_nothing(tmp_path, monkeypatch):
  root = write_data_dir(tmp_path / "data")
  out = tmp_path / "built"
  layout = layout_of(root)
  calls = []
  real_build = samples.SampleBuilder.build

  def failing_build(self, entry):
    calls.append(entry.index)
    if len(calls) == 2:
      raise KeyboardInterrupt("simulated interruption")
    return real_build(self, entry)

  monkeypatch.setattr(samples.SampleBuilder, "build", failing_build)
  with pytest.raises(KeyboardInterrupt):
    tfds_builder.build_dataset(None, out, ("train",), layout=layout, progress=False)
  target = tfds_builder.dataset_dir(out, "textvqa", "train")
  assert not os.path.exists(target)
  with pytest.raises(FileNotFoundError, match="no built split 'train'"):
    tfds_builder.find_split(out, "train")
  # A leftover of a killed build (TFDS's temporary dir) is ignored, then cleaned up.
  leftover = pathlib.Path(os.path.dirname(target)) / "incomplete.ABC123_1.0.0"
  leftover.mkdir(parents=True)
  (leftover / "dataset_info.json").write_text("{}")
  with pytest.raises(FileNotFoundError):
    tfds_builder.find_split(out, "train")
  monkeypatch.setattr(samples.SampleBuilder, "build", real_build)
  result = tfds_builder.build_dataset(None, out, ("train",), layout=layout,
                                      progress=False)
  assert result["train"].num_examples == 4 and not leftover.exists()


def test_build_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="data directory"):
    tfds_builder.build_dataset(tmp_path / "nope", tmp_path / "out", ("train",),
                               dataset="textvqa")
  root = write_data_dir(tmp_path / "data")
  (root / "ocr_feat_resx/textvqa_conf/train_images/img2_info.npy").unlink()
  with pytest.raises(FileNotFoundError, match="wiki.en.bin"):  # textvqa default
    tfds_builder.build_dataset(root, tmp_path / "out", ("train",), dataset="textvqa",
                               progress=False)
  with pytest.raises(FileNotFoundError, match="img2_info.npy"):
    tfds_builder.build_dataset(None, tmp_path / "out", ("train",),
                               layout=layout_of(root), progress=False)
  with pytest.raises(ValueError, match="no split 'dev'"):
    tfds_builder.build_dataset(None, tmp_path / "out", ("dev",), layout=layout_of(root))


def test_loader_batches(built):
  _, out, _ = built
  it = pipeline.make_loader(out, "train", 2, seed=0, shard_index=0, shard_count=1)
  batches = list(it)
  assert len(batches) == 2
  b = batches[0]
  assert b["cmb_text"].shape == (2, 170) and b["cmb_text"].dtype == np.int32
  assert b["image_feature_0"].shape == (2, 100, 2048)
  assert b["targets"].shape == (2, 12, CONFIG.num_classes)
  assert b["context_tokens"].shape == (2, 100) and b["context_tokens"].dtype == object
  assert isinstance(b["context_tokens"][0, 0], bytes)
  assert b["answers"].shape == (2, 10) and b["image_id"].shape == (2,)
  assert b["question_id"].dtype == np.int64
  inputs = batch_lib.model_inputs(b, CONFIG, with_targets=True)
  assert inputs["train_prev_inds"].shape == (2, 12)
  assert sorted(_ids(batches)) == [10, 11, 12, 13]
  assert pipeline.decode_strings(b["image_id"])[0] in ("img0", "7", "img2")


def test_loader_seeded_order(built):
  _, out, _ = built
  kwargs = dict(shard_index=0, shard_count=1, num_epochs=3, drop_remainder=False)
  a = _ids(pipeline.make_loader(out, "train", 1, seed=3, **kwargs))
  b = _ids(pipeline.make_loader(out, "train", 1, seed=3, **kwargs))
  assert a == b and len(a) == 12
  for epoch in range(3):
    assert sorted(a[4 * epoch:4 * epoch + 4]) == [10, 11, 12, 13]
  others = {tuple(_ids(pipeline.make_loader(out, "train", 1, seed=s, **kwargs)))
            for s in range(4, 10)}
  assert len(others | {tuple(a)}) > 1  # the seed matters
  plain = _ids(pipeline.make_loader(out, "train", 1, shuffle=False, shard_index=0,
                                    shard_count=1))
  assert plain == [10, 11, 12, 13]


@pytest.mark.parametrize("drop_remainder", [False, True])
def test_loader_shards(built, drop_remainder):
  _, out, _ = built
  shards = [_ids(pipeline.make_loader(out, "train", 1, seed=0, shard_index=i,
                                      shard_count=3, drop_remainder=drop_remainder))
            for i in range(3)]
  flat = [q for s in shards for q in s]
  assert len(flat) == len(set(flat))  # disjoint
  if drop_remainder:
    assert [len(s) for s in shards] == [1, 1, 1]
  else:
    assert sorted(flat) == [10, 11, 12, 13]  # cover the split
  with pytest.raises(ValueError, match="fewer than one batch"):
    pipeline.make_loader(out, "val", 2, shard_index=1, shard_count=2)


def test_loader_state_restore(built):
  _, out, _ = built
  kwargs = dict(seed=5, num_epochs=None, shard_index=0, shard_count=1)
  it = pipeline.make_loader(out, "train", 1, **kwargs)
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(6)]
  restored = pipeline.make_loader(out, "train", 1, **kwargs)
  restored.set_state(state)
  got = [next(restored) for _ in range(6)]
  assert _ids(got) == _ids(expected)
  for g, e in zip(got, expected):
    np.testing.assert_array_equal(g["cmb_text"], e["cmb_text"])


def test_loader_in_memory_source(built):
  root, _, _ = built
  builder = samples.SampleBuilder.from_layout(layout_of(root), "val")
  entries = readers.read_imdb(root / "imdb/m4c_textvqa/imdb_val_ocr_en.npy")
  examples = [builder.build(e) for e in entries]
  batches = list(pipeline.make_loader(examples, "val", 2, shuffle=False,
                                      drop_remainder=False, shard_index=0,
                                      shard_count=1))
  assert _ids(batches) == [20, 21] and batches[0]["answers"].shape == (2, 10)
  with pytest.raises(FileNotFoundError, match="no built split 'val'"):
    pipeline.make_loader(root, "val", 1)


def test_worker_processes_need_parsed_flags(built, monkeypatch):
  _, out, _ = built
  unparsed = types.SimpleNamespace(FLAGS=types.SimpleNamespace(is_parsed=lambda: False))
  monkeypatch.setattr(pipeline, "flags", unparsed)
  with pytest.raises(RuntimeError, match="mark_as_parsed"):
    pipeline.make_loader(out, "train", 1, worker_count=2, shard_index=0, shard_count=1)
