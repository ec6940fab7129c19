"""cache: checked loads of cached npz / json files and their provenance."""

import json
import os

import numpy as np
import pytest

from lfpr_jax import cache

HINT = "python -m lfpr_jax.experiments.lfpr --stage scores"
WHAT = "importance scores"


def _load_npz(path, **kw):
  return cache.load_npz(path, what=WHAT, recompute_hint=HINT, **kw)


def _load_json(path, **kw):
  return cache.load_json(path, what=WHAT, recompute_hint=HINT, **kw)


def _assert_message(e, path):
  text = str(e.value)
  assert str(path) in text and WHAT in text and HINT in text
  assert "allow_pickle" not in text
  assert "\n" not in text


def test_npz_round_trip_with_provenance(tmp_path):
  path = tmp_path / "scores.npz"
  prov = cache.provenance(config={"prune.batches": 8, "shape": (2, 3)})
  cache.save_npz(path, {"head": np.arange(6.0).reshape(2, 3), "ids": np.array(["a"])},
                 provenance=prov)
  data = _load_npz(path, keys=["head"], provenance=prov)
  assert sorted(data) == ["head", "ids"]
  np.testing.assert_array_equal(data["head"], np.arange(6.0).reshape(2, 3))


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "npy"])
def test_npz_damaged(tmp_path, damage):
  path = tmp_path / "scores.npz"
  cache.save_npz(path, {"head": np.ones((50, 50))})
  raw = path.read_bytes()
  if damage == "truncated":
    path.write_bytes(raw[:len(raw) // 2])
  elif damage == "garbage":
    path.write_bytes(b"this is not a zip archive at all" * 10)
  elif damage == "empty":
    path.write_bytes(b"")
  else:
    np.save(tmp_path / "x.npy", np.ones(3))
    os.replace(tmp_path / "x.npy", path)
  with pytest.raises(cache.CorruptCacheError) as e:
    _load_npz(path)
  _assert_message(e, path)


def test_npz_truncated_inside_member(tmp_path):
  """Central directory intact but a member's bytes damaged (CRC / zlib errors)."""
  path = tmp_path / "scores.npz"
  np.savez_compressed(path, head=np.random.default_rng(0).normal(size=(200, 200)))
  raw = bytearray(path.read_bytes())
  mid = len(raw) // 2
  raw[mid:mid + 64] = b"\xff" * 64
  path.write_bytes(bytes(raw))
  with pytest.raises(cache.CorruptCacheError) as e:
    _load_npz(path)
  _assert_message(e, path)


def test_npz_with_pickled_objects_is_refused_without_suggesting_pickle(tmp_path):
  path = tmp_path / "scores.npz"
  np.savez(path, head=np.array([{"a": 1}], dtype=object))
  with pytest.raises(cache.CorruptCacheError, match="pickled Python objects") as e:
    _load_npz(path)
  _assert_message(e, path)
  with pytest.raises(ValueError, match="dtype object"):
    cache.save_npz(tmp_path / "o.npz", {"x": np.array([None], dtype=object)})


def test_npz_missing_keys_and_file(tmp_path):
  path = tmp_path / "scores.npz"
  cache.save_npz(path, {"head": np.ones(2)})
  with pytest.raises(cache.CorruptCacheError, match=r"missing arrays \['ffn'\]") as e:
    _load_npz(path, keys=["head", "ffn"])
  _assert_message(e, path)
  with pytest.raises(FileNotFoundError) as e:
    _load_npz(tmp_path / "absent.npz")
  assert HINT in str(e.value) and "absent.npz" in str(e.value)


@pytest.mark.parametrize("content", [b'{"head": [1, 2', b"\xff\xfe\x00garbage",
                                     b"[1, 2]", b""])
def test_json_damaged(tmp_path, content):
  path = tmp_path / "metrics.json"
  path.write_bytes(content)
  with pytest.raises(cache.CorruptCacheError) as e:
    _load_json(path)
  _assert_message(e, path)


def test_json_round_trip_and_missing_keys(tmp_path):
  path = tmp_path / "metrics.json"
  prov = cache.provenance(config={"lr": 1e-4}, digests={"model": "ab" * 32})
  cache.save_json(path, {"acc": 0.5, "loss": float("nan")}, provenance=prov)
  assert _load_json(path, keys=["acc"], provenance=prov) == {"acc": 0.5, "loss": None}
  with pytest.raises(cache.CorruptCacheError, match=r"missing keys \['f1'\]"):
    _load_json(path, keys=["acc", "f1"])


def test_provenance_mismatch_names_file_and_keys(tmp_path):
  model = tmp_path / "model.bin"
  model.write_bytes(b"weights v1")
  path = tmp_path / "scores.npz"
  stored = cache.provenance(config={"batches": 8, "seed": 0}, inputs={"model": model})
  cache.save_npz(path, {"head": np.ones(2)}, provenance=stored)
  model.write_bytes(b"weights v2")
  now = cache.provenance(config={"batches": 16, "seed": 0}, inputs={"model": model})
  with pytest.raises(cache.StaleCacheError) as e:
    _load_npz(path, provenance=now)
  text = str(e.value)
  assert str(path) in text and HINT in text
  assert "config.batches: stored 8, now 16" in text
  assert "inputs.model" in text and "config.seed" not in text
  # Without an expected provenance the file loads (the caller opted out).
  assert sorted(_load_npz(path)) == ["head"]


def test_provenance_absent_is_stale(tmp_path):
  path = tmp_path / "metrics.json"
  cache.save_json(path, {"acc": 1.0})
  with pytest.raises(cache.StaleCacheError, match="records no provenance"):
    _load_json(path, provenance=cache.provenance(config={"a": 1}))
  path.write_text('{"acc": 1.0, "__provenance__": [1]}')
  with pytest.raises(cache.StaleCacheError, match="unreadable provenance"):
    _load_json(path, provenance=cache.provenance(config={"a": 1}))


def test_file_sha256_of_dirs(tmp_path):
  d = tmp_path / "d"
  (d / "sub").mkdir(parents=True)
  (d / "sub" / "a").write_bytes(b"1")
  first = cache.file_sha256(d)
  (d / "sub" / "a").write_bytes(b"2")
  assert cache.file_sha256(d) != first
  (d / "sub" / "a").write_bytes(b"1")
  assert cache.file_sha256(d) == first
  (d / "sub" / "a").rename(d / "sub" / "b")
  assert cache.file_sha256(d) != first
  assert json.dumps(cache.provenance(inputs={"d": d}))
