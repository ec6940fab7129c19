"""Writes numpy state dicts in PyTorch's file formats, without torch (test helper).

Hand-built protocol-2 pickle opcodes, exactly the globals and persistent ids that
`torch.save` writes, in the zip format (torch >= 1.6) or the legacy format (torch 1.4,
which wrote the released TAP checkpoints). Used to exercise the converter end to end.
"""

from __future__ import annotations

import pickle
import struct
import zipfile
from pathlib import Path
from typing import Mapping

import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def _glob(module: str, name: str) -> bytes:
  return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _str(text: str) -> bytes:
  data = text.encode()
  return b"X" + struct.pack("<I", len(data)) + data


def _int(value: int) -> bytes:
  return b"J" + struct.pack("<i", value)


def _tuple(*items: bytes) -> bytes:
  return b"(" + b"".join(items) + b"t"


def _tensor(key: str, arr: np.ndarray, legacy: bool) -> bytes:
  strides = tuple(s // arr.itemsize for s in arr.strides) if arr.size else tuple(
      int(np.prod(arr.shape[i + 1:])) for i in range(arr.ndim))
  pid = _tuple(_str("storage"), _glob("torch", "FloatStorage"), _str(key),
               _str("cuda:0"), _int(arr.size), *([b"N"] if legacy else []))
  args = [pid + b"Q", _int(0), _tuple(*map(_int, arr.shape)),
          _tuple(*map(_int, strides)), b"\x89",
          _glob("collections", "OrderedDict") + b")R"]
  return _glob("torch._utils", "_rebuild_tensor_v2") + _tuple(*args) + b"R"


def write_checkpoint(path: Path, state_dict: Mapping[str, np.ndarray], *,
                     legacy: bool = False, pythia: bool = True) -> Path:
  """Writes `state_dict` (float32) as torch.save would.

  Args:
    path: output file.
    state_dict: name -> array, written in this order.
    legacy: the pre-1.6 format instead of zip.
    pythia: wrap as a pythia checkpoint `{'model': sd, 'best_iteration': 24000,
      'config': pythia ConfigNode, ...}` instead of a bare state dict.
  """
  storages: dict[str, np.ndarray] = {}
  body = b""
  for i, (name, value) in enumerate(state_dict.items()):
    arr = np.ascontiguousarray(value, np.float32)
    storages[str(i)] = arr
    body += _str(name) + _tensor(str(i), arr, legacy)
  sd = _glob("collections", "OrderedDict") + b")R(" + body + b"u"
  if pythia:
    config = _glob("pythia.utils.configuration", "ConfigNode") + b")R"
    obj = (b"}(" + _str("model") + sd + _str("best_iteration") + _int(24000)
           + _str("config") + config + _str("git/branch") + _str("master") + b"u")
  else:
    obj = sd
  pkl = b"\x80\x02" + obj + b"."
  if legacy:
    sys_info = {"protocol_version": 1001, "little_endian": True,
                "type_sizes": {"short": 2, "int": 4, "long": 4}}
    parts = [pickle.dumps(x, protocol=2) for x in (LEGACY_MAGIC, 1001, sys_info)]
    parts += [pkl, pickle.dumps(list(storages), protocol=2)]
    parts += [struct.pack("<q", a.size) + a.tobytes() for a in storages.values()]
    path.write_bytes(b"".join(parts))
  else:
    with zipfile.ZipFile(path, "w") as zf:
      zf.writestr("archive/data.pkl", pkl)
      zf.writestr("archive/byteorder", b"little")
      for key, arr in storages.items():
        zf.writestr(f"archive/data/{key}", arr.tobytes())
      zf.writestr("archive/version", b"3\n")
  return path
