"""Tests for converters.torch_pickle: reading torch checkpoints without torch or code execution."""

from __future__ import annotations

import argparse
import builtins
import collections
import importlib
import io
import os
import pickle
import shutil
import struct
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from converters.torch_pickle import Placeholder, TorchFileError, load
from tests.converters.torch_writer import LEGACY_MAGIC, _glob, _int, _str, _tuple
from tests.golden import GOLDEN

FIXTURES = GOLDEN / "torch_files"
STEMS = ("zip", "legacy", "module_prefix", "bare_state_dict", "dtypes")
TRUE_DTYPES = {"dtypes/bf16": np.dtype(ml_dtypes.bfloat16)}  # expected.npz keeps bf16 as f32


@pytest.fixture(scope="module")
def expected() -> dict[str, np.ndarray]:
  with np.load(FIXTURES / "expected.npz") as npz:
    return {k: npz[k] for k in npz.files}


def _fixture_bytes(name: str) -> bytes:
  return (FIXTURES / name).read_bytes()


def _state_dict(obj):
  return obj["model"] if "model" in obj else obj


def _expected_for(expected, stem):
  return {k.split("/", 1)[1]: v for k, v in expected.items() if k.split("/", 1)[0] == stem}


# --- hand-built protocol-2 pickle opcodes and torch file writers ----------------------------

def _tensor(stype, key, numel, offset, shape, stride, legacy=False, view=None, v3_dtype=None):
  """Opcodes rebuilding one tensor as torch.save writes it (persistent-id storage)."""
  extra = b"N" if view is None else _tuple(_str(view[0]), _int(view[1]), _int(view[2]))
  pid = _tuple(_str("storage"), _glob("torch", stype), _str(key), _str("cuda:0"), _int(numel),
               *([extra] if legacy else []))
  args = [pid + b"Q", _int(offset), _tuple(*map(_int, shape)), _tuple(*map(_int, stride)),
          b"\x89", _glob("collections", "OrderedDict") + b")R"]
  if v3_dtype:
    args.append(_glob("torch", v3_dtype))
  rebuild = "_rebuild_tensor_v3" if v3_dtype else "_rebuild_tensor_v2"
  return _glob("torch._utils", rebuild) + _tuple(*args) + b"R"


def _ordered_dict(entries: dict[str, bytes]) -> bytes:
  body = b"".join(_str(k) + v for k, v in entries.items())
  return b"\x80\x02" + _glob("collections", "OrderedDict") + b")R(" + body + b"u."


def _call(module: str, name: str, *args: bytes) -> bytes:
  return b"\x80\x02" + _glob(module, name) + _tuple(*args) + b"R."


def _write_zip(path: Path, pkl: bytes, storages: dict[str, bytes], byteorder=b"little") -> Path:
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("archive/data.pkl", pkl)
    zf.writestr("archive/byteorder", byteorder)
    for key, data in storages.items():
      zf.writestr(f"archive/data/{key}", data)
    zf.writestr("archive/version", b"3\n")
  return path


def _write_legacy(path: Path, pkl: bytes, storages: dict[str, tuple[int, bytes]]) -> Path:
  sys_info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"int": 4}}
  parts = [pickle.dumps(x, protocol=2) for x in (LEGACY_MAGIC, 1001, sys_info)]
  parts += [pkl, pickle.dumps(list(storages), protocol=2)]
  parts += [struct.pack("<q", n) + data for n, data in storages.values()]
  path.write_bytes(b"".join(parts))
  return path


class _Reduce:
  """Pickles as `fn(*args)`: the classic malicious-pickle payload."""

  def __init__(self, fn, *args):
    self.fn, self.args = fn, args

  def __reduce__(self):
    return self.fn, self.args


# --- golden fixtures written by real torch -----------------------------------------------------

@pytest.mark.parametrize("stem", STEMS)
def test_every_expected_entry_matches(expected, stem):
  want = _expected_for(expected, stem)
  assert want, stem
  got = _state_dict(load(FIXTURES / f"{stem}.ckpt"))
  for key, ref in want.items():
    arr = got[key]
    assert isinstance(arr, np.ndarray), key
    assert arr.dtype == TRUE_DTYPES.get(f"{stem}/{key}", ref.dtype), key
    assert arr.shape == ref.shape, key
    np.testing.assert_array_equal(arr.astype(ref.dtype), ref, err_msg=key, strict=True)


@pytest.mark.parametrize("stem", STEMS)
def test_state_dict_is_mapping_in_original_order(expected, stem):
  sd = _state_dict(load(FIXTURES / f"{stem}.ckpt"))
  assert isinstance(sd, collections.OrderedDict)
  assert list(sd) == list(_expected_for(expected, stem))


def test_dtypes_fixture_details(expected):
  sd = load(FIXTURES / "dtypes.ckpt")["model"]
  assert sd["f16"].dtype == np.float16 and sd["f64"].dtype == np.float64
  assert sd["i64"].dtype == np.int64 and sd["bool"].dtype == np.bool_
  assert sd["scalar"].shape == () and sd["empty"].shape == (0, 768)
  for arr in sd.values():
    assert arr.flags.c_contiguous and arr.flags.writeable
  assert not np.shares_memory(sd["shared_a"], sd["shared_b"])


@pytest.mark.parametrize("stem", ["zip", "legacy"])
def test_pythia_checkpoint_fields(expected, stem):
  ckpt = load(FIXTURES / f"{stem}.ckpt")
  assert list(ckpt) == ["model", "optimizer", "best_iteration", "best_metric_value", "config",
                        "git/branch"]
  assert ckpt["best_iteration"] == 24000 and type(ckpt["best_iteration"]) is int
  assert ckpt["best_metric_value"] == 0.4991 and ckpt["git/branch"] == "master"
  state = ckpt["optimizer"]["state"][0]
  assert state["step"] == 3 and state["exp_avg"].dtype == np.float32
  assert state["exp_avg"].shape == (8,)
  assert ckpt["optimizer"]["param_groups"] == [{"lr": 0.0001}]
  config = ckpt["config"]
  assert isinstance(config, Placeholder)
  assert (config.module, config.name) == ("__main__", "ConfigNode")
  assert config.items == {"model": "m4c_split", "lr": 0.0001}
  sd = ckpt["model"]  # tied weights were one tensor, so they stay one array
  assert sd["cls.decoder.weight"] is sd["text_bert.embeddings.word_embeddings.weight"]


def test_truncated_fixture_refused(expected):
  with pytest.raises(TorchFileError, match=r"truncated\.ckpt: zip archive is truncated"):
    load(FIXTURES / "truncated.ckpt")


def test_malicious_fixture_refused_without_side_effect(expected, monkeypatch):
  # malicious.ckpt REDUCEs __builtin__.exec("import os; os.environ['LFPR_PWNED'] = '1'").
  monkeypatch.delenv("LFPR_PWNED", raising=False)
  with pytest.raises(TorchFileError,
                     match=r"malicious\.ckpt: refusing global '__builtin__\.exec'"):
    load(FIXTURES / "malicious.ckpt")
  assert "LFPR_PWNED" not in os.environ


# --- synthetic hostile files ---------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["zip", "legacy"])
@pytest.mark.parametrize("fn, make_args, name", [
    (os.system, lambda m: (f"touch {m}",), "system"),
    (builtins.eval, lambda m: (f"open({str(m)!r}, 'w')",), "eval"),
    (builtins.exec, lambda m: (f"open({str(m)!r}, 'w')",), "exec"),
    (subprocess.Popen, lambda m: (["touch", str(m)],), "Popen"),
    (shutil.rmtree, lambda m: (str(m.parent),), "rmtree"),
    (importlib.import_module, lambda m: ("colorsys",), "import_module"),
    (pickle.loads, lambda m: (b"N.",), "loads"),
    (builtins.open, lambda m: (str(m), "w"), "open"),
])
def test_reduce_payloads_refused_and_not_run(tmp_path, fmt, fn, make_args, name):
  marker = tmp_path / "victim" / "pwned"
  marker.parent.mkdir()
  had_colorsys = "colorsys" in sys.modules
  payload = pickle.dumps(
      {"model": collections.OrderedDict(), "x": _Reduce(fn, *make_args(marker))}, protocol=2)
  path = tmp_path / "evil.ckpt"
  (_write_zip if fmt == "zip" else _write_legacy)(path, payload, {})
  with pytest.raises(TorchFileError, match=rf"evil\.ckpt: refusing global '[\w.]*\b{name}'"):
    load(path)
  assert marker.parent.is_dir() and not marker.exists()
  assert had_colorsys or "colorsys" not in sys.modules


@pytest.mark.parametrize("module, name", [
    ("builtins", "getattr"), ("__builtin__", "__import__"), ("torch", "load"),
    ("torch._C", "_load_for_lite_interpreter"), ("torch.serialization", "load"),
    ("collections", "OrderedDict.__init__"), ("numpy", "load"), ("runpy", "run_path"),
    ("ctypes", "CDLL"), ("webbrowser", "open"), ("operator", "attrgetter"),
    ("functools", "partial"), ("types", "FunctionType"), ("sys", "modules"),
    ("torch._utils", "_rebuild_qtensor"), ("_codecs", "decode"),
])
def test_dangerous_globals_refused(tmp_path, module, name):
  path = _write_zip(tmp_path / "g.ckpt", _call(module, name, _str("x")), {})
  with pytest.raises(TorchFileError, match=f"refusing global '{module}.{name}'"):
    load(path)


@pytest.mark.parametrize("target, state", [
    (_glob("torch._utils", "_rebuild_tensor_v2"), b"}" + _str("__defaults__") + b"Ns"),
    (_glob("collections", "OrderedDict") + b")R", b"N}" + _str("__class__") + b"Ns\x86"),
    (_glob("numpy", "dtype") + _tuple(_str("f8"), b"\x89\x88") + b"R",  # dtype flags
     _tuple(_int(3), _str("<"), b"NNN", _int(-1), _int(-1), _int(63))),
    (_glob("numpy", "dtype") + _tuple(_str("f8"), b"\x89\x88") + b"R",  # add fields
     _tuple(_int(3), _str("|"), b"N", _tuple(_str("a")), b"}", _int(8), _int(1), _int(0))),
])
def test_build_restricted(tmp_path, target, state):
  path = _write_zip(tmp_path / "b.ckpt", b"\x80\x02" + target + state + b"b.", {})
  with pytest.raises(TorchFileError, match=r"b\.ckpt: pickle sets state on unsupported object"):
    load(path)
  test_synthetic_zip_dtypes_and_views(tmp_path)  # allow-listed functions are unharmed


def test_numpy_object_arrays_refused(tmp_path):
  pkl = pickle.dumps({"o": np.array([1, "a"], dtype=object)}, protocol=2)
  with pytest.raises(TorchFileError, match="unsupported numpy dtype 'O8'"):
    load(_write_zip(tmp_path / "o.ckpt", pkl, {}))


def test_unknown_classes_become_inert_placeholders(tmp_path):
  namespace = pickle.dumps(argparse.Namespace(seed=1), protocol=2)[2:-1]
  pkl = (b"\x80\x02}(" + _str("cfg") + _glob("not_importable_pkg.config", "Cfg")
         + _tuple(_int(7)) + b"\x81}" + _str("lr") + _int(3) + b"sb" + _str("ns") + namespace
         + b"u.")
  obj = load(_write_zip(tmp_path / "p.ckpt", pkl, {}))
  cfg, ns = obj["cfg"], obj["ns"]
  assert isinstance(cfg, Placeholder)
  assert (cfg.module, cfg.name, cfg.args, cfg.state) == (
      "not_importable_pkg.config", "Cfg", (7,), {"lr": 3})
  assert isinstance(ns, Placeholder) and ns.name == "Namespace" and ns.state == {"seed": 1}
  assert "not_importable_pkg" not in sys.modules


# --- synthetic unusual layouts ---------------------------------------------------------------

def test_synthetic_zip_dtypes_and_views(tmp_path):
  base = np.arange(24, dtype=np.float32)
  pkl = _ordered_dict({
      "t": _tensor("FloatStorage", "0", 24, 2, (3, 4), (1, 6)),
      "s": _tensor("FloatStorage", "0", 24, 23, (), ()),
      "z": _tensor("ComplexFloatStorage", "1", 2, 0, (2,), (1,)),
      "u16": _tensor("UntypedStorage", "2", 6, 1, (2,), (1,), v3_dtype="uint16"),
  })
  storages = {"0": base.tobytes(), "1": np.array([1 + 2j, 3 - 4j], np.complex64).tobytes(),
              "2": np.array([9, 700, 65535], np.uint16).tobytes()}
  got = load(_write_zip(tmp_path / "v.ckpt", pkl, storages))
  want_t = np.lib.stride_tricks.as_strided(base[2:], (3, 4), (4, 24))
  np.testing.assert_array_equal(got["t"], want_t, strict=True)
  assert got["s"].shape == () and got["s"] == 23
  np.testing.assert_array_equal(got["z"], np.array([1 + 2j, 3 - 4j], np.complex64), strict=True)
  np.testing.assert_array_equal(got["u16"], np.array([700, 65535], np.uint16), strict=True)


def test_big_endian_byteorder(tmp_path):
  f32, c64 = np.array([1.5, -2.0, 3.25], ">f4"), np.array([1 + 2j], ">c8")
  bf16 = np.array([0.5, -8.0], ml_dtypes.bfloat16)
  pkl = _ordered_dict({"f": _tensor("FloatStorage", "0", 3, 0, (3,), (1,)),
                       "c": _tensor("ComplexFloatStorage", "1", 1, 0, (1,), (1,)),
                       "b": _tensor("BFloat16Storage", "2", 2, 0, (2,), (1,)),
                       "k": _tensor("BoolStorage", "3", 2, 0, (2,), (1,))})
  storages = {"0": f32.tobytes(), "1": c64.tobytes(),
              "2": bf16.view(np.uint16).astype(">u2").tobytes(), "3": b"\x01\x00"}
  got = load(_write_zip(tmp_path / "be.ckpt", pkl, storages, byteorder=b"big"))
  np.testing.assert_array_equal(got["f"], f32.astype(np.float32), strict=True)
  np.testing.assert_array_equal(got["c"], c64.astype(np.complex64), strict=True)
  assert got["b"].dtype == ml_dtypes.bfloat16
  assert got["b"].astype(np.float32).tolist() == [0.5, -8.0]
  assert got["k"].tolist() == [True, False]


def test_legacy_storage_views(tmp_path):
  root = np.arange(10, dtype=np.int64)
  pkl = _ordered_dict({
      "a": _tensor("LongStorage", "r", 10, 1, (2,), (1,), legacy=True, view=("v1", 4, 5)),
      "b": _tensor("LongStorage", "r", 10, 0, (2, 2), (1, 2), legacy=True),
  })
  got = load(_write_legacy(tmp_path / "lv.ckpt", pkl, {"r": (10, root.tobytes())}))
  assert got["a"].tolist() == [5, 6] and got["b"].tolist() == [[0, 2], [1, 3]]


@pytest.mark.parametrize("protocol", [2, 4])
def test_numpy_and_builtin_objects(tmp_path, protocol):
  obj = {"f": np.float64(1.5), "i": np.int32(-3), "arr": np.arange(6, dtype=">i4").reshape(2, 3),
         "raw": b"\x00\xffxy", "set": {1, 2}, "fs": frozenset({3}), "c": 1 + 2j,
         "sl": slice(1, 5, 2), "od": collections.OrderedDict(a=1), "t": (1, [2.0, None])}
  data = pickle.dumps(obj, protocol)
  got, ref = load(_write_zip(tmp_path / "np.ckpt", data, {})), pickle.loads(data)
  assert got.keys() == ref.keys()
  for key, value in ref.items():
    if isinstance(value, np.ndarray):
      np.testing.assert_array_equal(got[key], value, strict=True)
    else:
      assert got[key] == value and type(got[key]) is type(value), key


# --- synthetic corrupt files ---------------------------------------------------------------------

def test_missing_storage_member(tmp_path):
  pkl = _ordered_dict({"w": _tensor("FloatStorage", "0", 2, 0, (2,), (1,))})
  with pytest.raises(TorchFileError, match=r"m\.ckpt: archive member 'archive/data/0' is missing"):
    load(_write_zip(tmp_path / "m.ckpt", pkl, {}))


def test_short_storage_member(tmp_path):
  pkl = _ordered_dict({"w": _tensor("FloatStorage", "0", 4, 0, (4,), (1,))})
  with pytest.raises(TorchFileError, match=r"'archive/data/0' has 8 bytes but its storage needs"):
    load(_write_zip(tmp_path / "s.ckpt", pkl, {"0": bytes(8)}))


def test_view_beyond_storage(tmp_path):
  pkl = _ordered_dict({"w": _tensor("FloatStorage", "0", 4, 2, (3,), (1,))})
  with pytest.raises(TorchFileError, match="has 4 elements but a tensor .* needs 5"):
    load(_write_zip(tmp_path / "b.ckpt", pkl, {"0": bytes(16)}))


@pytest.mark.parametrize("keep", [0.3, 0.9, 0.99])
def test_zip_cut_short(tmp_path, keep):
  data = _fixture_bytes("zip.ckpt")
  path = tmp_path / "cut.ckpt"
  path.write_bytes(data[:int(len(data) * keep)])
  with pytest.raises(TorchFileError, match=r"cut\.ckpt: zip archive is truncated"):
    load(path)


@pytest.mark.parametrize("cut", [-1, -100, -1000, 1200, 1100, 600, 140, 20])
def test_legacy_cut_short(tmp_path, cut):
  path = tmp_path / "cut.ckpt"
  path.write_bytes(_fixture_bytes("legacy.ckpt")[:cut])
  with pytest.raises(TorchFileError, match=r"cut\.ckpt: .*truncated"):
    load(path)


@pytest.mark.parametrize("content", [b"", b"hello world\n", pickle.dumps({"a": 1}),
                                     b"\x93NUMPY\x01\x00" + bytes(60)])
def test_not_a_torch_file(tmp_path, content):
  path = tmp_path / "x.bin"
  path.write_bytes(content)
  with pytest.raises(TorchFileError, match=r"x\.bin: not a PyTorch checkpoint"):
    load(path)


def test_zip_without_data_pkl(tmp_path):
  path = tmp_path / "other.zip"
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("readme.txt", "hi")
  with pytest.raises(TorchFileError, match=r"other\.zip: zip archive has 0 data\.pkl records"):
    load(path)


def test_old_tar_format_refused(tmp_path):
  path = tmp_path / "old.tar"
  with tarfile.open(path, "w") as tar:
    for name in ("sys_info", "pickle", "storages", "tensors"):
      info = tarfile.TarInfo(name)
      info.size = 4
      tar.addfile(info, io.BytesIO(b"\x80\x02N."))
  with pytest.raises(TorchFileError, match=r"old\.tar: old tar-based torch format"):
    load(path)


# --- optional: compare with real torch ---------------------------------------------------------

@pytest.mark.torch
@pytest.mark.parametrize("zip_format", [True, False])
def test_matches_torch_load(tmp_path, zip_format):
  torch = pytest.importorskip("torch")
  gen = torch.Generator().manual_seed(0)
  base = torch.randn(6, 4, generator=gen)
  noted = torch.randn(3, generator=gen)
  noted.note = "python state"  # saved through _rebuild_from_type_v2
  sd = collections.OrderedDict(
      w=torch.randn(5, 3, generator=gen), t=base.t(), rows=base[2:4], col=base[:, 1],
      bf16=torch.randn(3, 4, generator=gen).to(torch.bfloat16),
      f16=torch.randn(2, 3, generator=gen).half(), f64=torch.randn(3, generator=gen).double(),
      i64=torch.arange(7), i32=torch.arange(4, dtype=torch.int32),
      i8=torch.tensor([-3, 4], dtype=torch.int8), u8=torch.tensor([0, 255], dtype=torch.uint8),
      flag=torch.tensor([True, False]), c64=torch.randn(3, dtype=torch.complex64, generator=gen),
      conj=torch.randn(3, dtype=torch.complex64, generator=gen).conj(), scalar=torch.tensor(2.5),
      empty=torch.zeros(0, 768), param=torch.nn.Parameter(torch.randn(2, 2, generator=gen)),
      noted=noted,
  )
  if zip_format:  # dtypes without a legacy Storage class go through _rebuild_tensor_v3
    sd["u16"] = torch.tensor([1, 700, 65535]).to(torch.uint16)
    sd["f8"] = torch.randn(4, generator=gen).to(torch.float8_e4m3fn)
  path = tmp_path / "real.ckpt"
  torch.save({"model": sd, "epoch": 3, "meta": {"lr": 0.1, "names": ["a", "b"]}}, path,
             _use_new_zipfile_serialization=zip_format)
  ours, ref = load(path), torch.load(path, weights_only=False)
  assert ours["epoch"] == 3 and ours["meta"] == ref["meta"]
  assert list(ours["model"]) == list(ref["model"])
  for key, tensor in ref["model"].items():
    arr, tensor = ours["model"][key], tensor.detach()
    assert arr.shape == tuple(tensor.shape) and arr.flags.c_contiguous, key
    if tensor.dtype in (torch.bfloat16, torch.float8_e4m3fn):  # numpy has no twin of these
      assert arr.dtype == getattr(ml_dtypes, str(tensor.dtype).removeprefix("torch.")), key
      np.testing.assert_array_equal(arr.astype(np.float32), tensor.float().numpy(), err_msg=key)
    else:
      np.testing.assert_array_equal(arr, tensor.resolve_conj().numpy(), err_msg=key, strict=True)
