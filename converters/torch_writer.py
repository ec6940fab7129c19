"""Writes PyTorch checkpoint files (`torch.save` layouts) without importing torch.

The inverse of `converters.torch_pickle`: `save(path, obj)` writes `obj` (dicts,
OrderedDicts, lists, tuples, str/int/float/bool/None, numpy arrays as tensors) as
`torch.save(obj, path)` would, so that `torch.load(path, weights_only=True)` accepts it.
The pickle is built from explicit protocol-2 opcodes, so exactly the globals torch writes
appear in it (`torch._utils._rebuild_tensor_v2`, `torch.<Type>Storage`,
`collections.OrderedDict`) and nothing is ever imported to resolve a name.

* Zip layout (default, torch >= 1.6): `archive/data.pkl`, one uncompressed member
  `archive/data/<key>` of raw little-endian bytes per tensor (aligned to 64 bytes in the
  file, as torch aligns them for `mmap=True` loading), `archive/byteorder` ("little")
  and `archive/version` ("3").
* Legacy layout (`legacy=True`, torch <= 1.5, e.g. the released TAP checkpoints):
  pickles of the magic number, protocol 1001 and sys info, the object pickle, the
  storage key list, then per storage its 8-byte element count and raw bytes.

Each array gets its own storage (no sharing between tensors), written contiguous.
"""

from __future__ import annotations

import collections
import os
import pickle
import struct
import zipfile
from typing import Any, BinaryIO, NamedTuple

import ml_dtypes
import numpy as np

from lfpr_jax import atomic

__all__ = ["LEGACY_MAGIC", "Instance", "dumps", "save", "write_text"]

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
ALIGNMENT = 64  # torch.save aligns every storage record's data to 64 bytes

_STORAGE_NAMES = {np.dtype(k): f"{v}Storage" for k, v in {
    np.float32: "Float", np.float64: "Double", np.float16: "Half",
    ml_dtypes.bfloat16: "BFloat16", np.int64: "Long", np.int32: "Int",
    np.int16: "Short", np.int8: "Char", np.uint8: "Byte", np.bool_: "Bool"}.items()}


class Instance(NamedTuple):
  """An object pickled as a no-argument call of the global `module.name` (e.g. a
  config class the reader will only see as a placeholder)."""
  module: str
  name: str


# ----------------------------------------------------------- protocol-2 opcodes


def op_global(module: str, name: str) -> bytes:
  """GLOBAL: pushes `module.name` (resolved by the loader, never by us)."""
  return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def op_str(text: str) -> bytes:
  data = text.encode()
  return b"X" + struct.pack("<I", len(data)) + data


def op_int(value: int) -> bytes:
  if -2**31 <= value < 2**31:
    return b"J" + struct.pack("<i", value)
  data = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
  return b"\x8a" + bytes([len(data)]) + data  # LONG1


def op_tuple(*items: bytes) -> bytes:
  return b"(" + b"".join(items) + b"t"


def _tensor(key: str, arr: np.ndarray, legacy: bool, location: str) -> bytes:
  """`_rebuild_tensor_v2(storage, 0, size, stride, False, OrderedDict())`."""
  if arr.dtype not in _STORAGE_NAMES:
    raise ValueError(f"cannot write a tensor of dtype {arr.dtype}; supported: "
                     f"{sorted(str(d) for d in _STORAGE_NAMES)}.")
  strides = tuple(int(np.prod(arr.shape[i + 1:])) for i in range(arr.ndim))
  pid = op_tuple(op_str("storage"), op_global("torch", _STORAGE_NAMES[arr.dtype]),
                 op_str(key), op_str(location), op_int(arr.size),
                 *([b"N"] if legacy else []))  # legacy: no storage view
  args = [pid + b"Q", op_int(0), op_tuple(*map(op_int, arr.shape)),
          op_tuple(*map(op_int, strides)), b"\x89",
          op_global("collections", "OrderedDict") + b")R"]
  return op_global("torch._utils", "_rebuild_tensor_v2") + op_tuple(*args) + b"R"


def dumps(obj: Any, *, legacy: bool = False, location: str = "cpu"
          ) -> tuple[bytes, dict[str, np.ndarray]]:
  """The object pickle torch writes for `obj`, and its storages by key.

  Args:
    obj: the object (see the module docstring for the supported types).
    legacy: storage persistent ids of the legacy layout (with a view slot).
    location: the device the tensors claim to come from ("cpu" loads anywhere).

  Returns:
    `(pickle bytes, {storage key: C-contiguous little-endian array})`.
  """
  storages: dict[str, np.ndarray] = {}

  def dump(x: Any) -> bytes:
    if isinstance(x, np.ndarray):
      key = str(len(storages))
      storages[key] = np.ascontiguousarray(x).astype(x.dtype.newbyteorder("<"),
                                                     copy=False)
      return _tensor(key, storages[key], legacy, location)
    if isinstance(x, Instance):
      return op_global(x.module, x.name) + b")R"
    if isinstance(x, collections.OrderedDict):
      items = b"".join(dump(k) + dump(v) for k, v in x.items())
      return op_global("collections", "OrderedDict") + b")R(" + items + b"u"
    if isinstance(x, dict):
      return b"}(" + b"".join(dump(k) + dump(v) for k, v in x.items()) + b"u"
    if isinstance(x, list):
      return b"](" + b"".join(dump(v) for v in x) + b"e"
    if isinstance(x, tuple):
      return op_tuple(*(dump(v) for v in x))
    if x is None:
      return b"N"
    if isinstance(x, bool):
      return b"\x88" if x else b"\x89"
    if isinstance(x, (int, np.integer)):
      return op_int(int(x))
    if isinstance(x, (float, np.floating)):
      return b"G" + struct.pack(">d", float(x))
    if isinstance(x, str):
      return op_str(x)
    raise ValueError(f"cannot write a {type(x).__name__} into a torch checkpoint.")

  return b"\x80\x02" + dump(obj) + b".", storages


def _write_aligned(zf: zipfile.ZipFile, name: str, data: bytes) -> None:
  """An uncompressed member whose data starts at a multiple of `ALIGNMENT`."""
  info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
  info.compress_type = zipfile.ZIP_STORED
  header = 30 + len(name.encode())  # local file header without the extra field
  pad = -(zf.fp.tell() + header + 4) % ALIGNMENT
  # One extra-field record (id "FB", as torch writes it) of `pad` filler bytes.
  info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
  zf.writestr(info, data)


def _legacy_bytes(pkl: bytes, storages: dict[str, np.ndarray]) -> bytes:
  sys_info = {"protocol_version": LEGACY_PROTOCOL, "little_endian": True,
              "type_sizes": {"short": 2, "int": 4, "long": 4}}
  parts = [pickle.dumps(x, protocol=2) for x in (LEGACY_MAGIC, LEGACY_PROTOCOL, sys_info)]
  parts += [pkl, pickle.dumps(list(storages), protocol=2)]
  parts += [struct.pack("<q", a.size) + a.tobytes() for a in storages.values()]
  return b"".join(parts)


def write_text(path: str | os.PathLike, text: str) -> None:
  """Writes `text` (UTF-8) to `path` atomically."""
  atomic.write_text(path, text)


def save(path: str | os.PathLike, obj: Any, *, legacy: bool = False,
         location: str = "cpu") -> None:
  """Writes `obj` as `torch.save(obj, path)` would, atomically (temp file, rename).

  Args:
    path: output file; replaced if it exists (callers decide whether that is allowed).
    obj: dicts/OrderedDicts/lists/tuples of numpy arrays, strings and numbers.
    legacy: the pre-1.6 layout instead of zip.
    location: device name recorded for every storage.
  """
  pkl, storages = dumps(obj, legacy=legacy, location=location)

  def write(f: BinaryIO) -> None:
    if legacy:
      f.write(_legacy_bytes(pkl, storages))
      return
    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as zf:
      _write_aligned(zf, "archive/data.pkl", pkl)
      _write_aligned(zf, "archive/byteorder", b"little")
      for key, arr in storages.items():
        _write_aligned(zf, f"archive/data/{key}", arr.tobytes())
      _write_aligned(zf, "archive/version", b"3\n")
  atomic.write_stream(path, write)
