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
