"""Writes that leave nothing half-written: fill a temporary sibling, then rename."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator

import numpy as np


def savez(path: str, **arrays: np.ndarray) -> None:
  """`np.savez(path, **arrays)` through a temporary file in the same directory."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}-", suffix=".npz",
                             dir=directory)
  os.close(fd)
  try:
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


@contextlib.contextmanager
def directory(path: str) -> Iterator[str]:
  """Yields a temporary sibling directory that replaces `path` on success."""
  path = os.path.abspath(path)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-",
                         dir=os.path.dirname(path))
  try:
    yield tmp
    if os.path.exists(path):
      shutil.rmtree(path)
    os.replace(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def write_text(path: str, text: str) -> None:
  """Writes `text` to `path` through a temporary file in the same directory."""
  directory_ = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory_, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}-", dir=directory_)
  try:
    with os.fdopen(fd, "w") as f:
      f.write(text)
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


def write_json(path: str, obj) -> None:
  """Strict JSON (no NaN) through a temporary file; see `write_text`."""
  import json  # noqa: PLC0415
  write_text(path, json.dumps(obj, indent=1, allow_nan=False) + "\n")
