"""Writes that leave nothing half-written and never delete what lfpr_jax did not write.

Every write fills a temporary sibling (same directory, hence same file system) and
renames it into place, so an interrupted run leaves either the old content or the new
one, never a mix. Written files and directories get the permissions a plain `open` /
`os.mkdir` would give them (0o666 / 0o777 minus the umask), not the 0o600 / 0o700 of
`tempfile`.

Directories written through `directory` carry a marker file, `MARKER`. An existing
directory is only ever replaced when it holds that marker (or when the caller
recognises it as its own, e.g. a model directory with the project's `arch.json`); a
directory of unrelated files is refused with one error naming it, and left untouched.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from typing import Any, BinaryIO

import numpy as np

MARKER = ".lfpr_jax"
_MARKER_TEXT = ("This directory was written by lfpr_jax; lfpr_jax may replace it "
                "(with overwrite) and deletes nothing without this file.\n")


class ForeignDirectoryError(ValueError):
  """An existing path that lfpr_jax refuses to replace (it did not write it)."""


# ------------------------------------------------------------------- permissions


def _umask() -> int:
  """The process umask, read without changing it where the OS allows."""
  try:  # Linux >= 4.7: no window in which another thread sees a different umask.
    with open("/proc/self/status", encoding="ascii") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except (OSError, ValueError):
    pass
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def _normal_mode(path: str, *, is_dir: bool) -> None:
  """Gives `path` the mode `os.mkdir` / `open` would have (umask honoured)."""
  os.chmod(path, (0o777 if is_dir else 0o666) & ~_umask())


# ------------------------------------------------------------------------ files


def _write_file(path: str | os.PathLike, write: Callable[[str], None], *,
                suffix: str = "") -> None:
  """Calls `write(tmp)` on a temporary sibling of `path`, then renames it to `path`."""
  path = os.fspath(path)
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", suffix=suffix,
                             dir=parent)
  os.close(fd)
  try:
    write(tmp)
    _normal_mode(tmp, is_dir=False)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
  """Writes `data` to `path` through a temporary file in the same directory."""
  def write(tmp: str) -> None:
    with open(tmp, "wb") as f:
      f.write(data)
  _write_file(path, write)


def write_stream(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
  """Calls `write(f)` on a binary file that replaces `path` only when it returns."""
  def to_tmp(tmp: str) -> None:
    with open(tmp, "wb") as f:
      write(f)
  _write_file(path, to_tmp)


def check_new_file(path: str | os.PathLike, *, overwrite: bool = False,
                   flag: str = "--overwrite") -> None:
  """Fails early unless `path` can be written as a file: absent, or a file that
  `overwrite` allows replacing (never a directory)."""
  path = os.fspath(path)
  if os.path.isdir(path):
    raise IsADirectoryError(f"{path} is a directory; expected a file name.")
  if os.path.lexists(path) and not overwrite:
    raise FileExistsError(f"{path} already exists; pass {flag} to replace it.")


def savez(path: str | os.PathLike, **arrays: np.ndarray) -> None:
  """`np.savez(path, **arrays)` through a temporary file in the same directory.

  `path` is used as given (no `.npz` is appended, unlike `np.savez`).
  """
  # The suffix keeps np.savez from appending ".npz" to the temporary name.
  _write_file(path, lambda tmp: np.savez(tmp, **arrays), suffix=".npz")


def write_text(path: str | os.PathLike, text: str) -> None:
  """Writes `text` (UTF-8) to `path` through a temporary file in the same directory."""
  def write(tmp: str) -> None:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
  _write_file(path, write)


def json_safe(obj: Any) -> Any:
  """`obj` with every non-finite float (NaN, +-inf) replaced by None, recursively.

  Mappings, lists and tuples are rebuilt (tuples become lists, as JSON has no
  tuples); numpy scalars and arrays become Python numbers and lists.
  """
  if isinstance(obj, np.ndarray):
    return json_safe(obj.tolist())
  if isinstance(obj, np.generic):
    return json_safe(obj.item())
  if isinstance(obj, float):
    return obj if math.isfinite(obj) else None
  if isinstance(obj, Mapping):
    return {k: json_safe(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [json_safe(v) for v in obj]
  return obj


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 1,
               sort_keys: bool = False) -> None:
  """Writes `obj` as strict JSON to `path` through a temporary file.

  Strict JSON has no NaN or Infinity (Python's `json` writes them as bare tokens that
  other readers reject): every non-finite float becomes `null` (`json_safe`), so a
  diverged metric is stored as null, not as a file that `jq` or a browser cannot
  parse.

  Raises:
    TypeError: `obj` holds something JSON cannot represent (nothing is written).
  """
  text = json.dumps(json_safe(obj), indent=indent, sort_keys=sort_keys,
                    allow_nan=False) + "\n"
  write_text(path, text)


# ------------------------------------------------------------------ directories


def mark(path: str | os.PathLike) -> None:
  """Writes the marker that lets lfpr_jax replace the directory `path` later."""
  with open(os.path.join(os.fspath(path), MARKER), "w", encoding="utf-8") as f:
    f.write(_MARKER_TEXT)
  _normal_mode(os.path.join(os.fspath(path), MARKER), is_dir=False)


def make_dir(path: str | os.PathLike) -> str:
  """`os.makedirs(path, exist_ok=True)` plus the marker; returns `path` as a string.

  For output directories the project creates itself (work dirs, caches), so a later
  `directory(..., overwrite=True)` or cleanup recognises them. An existing directory
  without the marker is left as it is (it is not claimed).
  """
  path = os.fspath(path)
  existed = os.path.isdir(path)
  os.makedirs(path, exist_ok=True)
  if not existed:
    mark(path)
  return path


def is_marked(path: str | os.PathLike) -> bool:
  """Whether `path` is a directory holding the lfpr_jax marker."""
  return os.path.isfile(os.path.join(os.fspath(path), MARKER))


def check_replaceable(path: str | os.PathLike, *,
                      recognise: Callable[[str], bool] | None = None) -> None:
  """Raises unless `path` is absent, empty, or a directory lfpr_jax wrote.

  Args:
    path: the directory that is about to be replaced.
    recognise: optional extra test for directories written before markers existed
      (e.g. a model directory whose `arch.json` has the project's format).

  Raises:
    ForeignDirectoryError: `path` is a file, a symbolic link, or a non-empty
      directory without the marker (and not recognised); names `path` and why.
  """
  path = os.fspath(path)
  if not os.path.lexists(path):
    return
  if os.path.islink(path):
    raise ForeignDirectoryError(
        f"refusing to replace {path}: it is a symbolic link, and lfpr_jax only "
        "replaces directories it wrote; remove it or choose another output path.")
  if not os.path.isdir(path):
    raise ForeignDirectoryError(
        f"refusing to replace {path}: it is a file, not a directory lfpr_jax wrote; "
        "remove it or choose another output path.")
  if is_marked(path) or (recognise is not None and recognise(path)):
    return
  if not os.listdir(path):  # an empty directory: replacing it loses nothing
    return
  raise ForeignDirectoryError(
      f"refusing to replace {path}: it is a directory lfpr_jax did not write (no "
      f"{MARKER} marker), so it may hold other files; remove it yourself or choose "
      "another output path.")


@contextlib.contextmanager
def directory(path: str | os.PathLike, *, overwrite: bool = False,
              recognise: Callable[[str], bool] | None = None) -> Iterator[str]:
  """Yields a temporary sibling directory that becomes `path` on success.

  The yielded directory already holds the marker. On success an existing `path` is
  replaced (only with `overwrite`, and only if `check_replaceable` accepts it): the
  old directory is first renamed aside, the new one renamed into place, then the old
  one deleted, so `path` is never half-written. On an exception the temporary
  directory is deleted and `path` is untouched.

  Args:
    path: the final directory.
    overwrite: allow replacing an existing directory lfpr_jax wrote.
    recognise: see `check_replaceable`.

  Raises:
    FileExistsError: `path` exists and `overwrite` is not set.
    ForeignDirectoryError: `path` exists and lfpr_jax did not write it.
  """
  path = os.path.abspath(os.fspath(path))
  # Checked before the caller's (possibly long) work, and again before the rename.
  _check_target(path, overwrite=overwrite, recognise=recognise)
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
  try:
    _normal_mode(tmp, is_dir=True)
    mark(tmp)
    yield tmp
    _check_target(path, overwrite=overwrite, recognise=recognise)
    old = _move_aside(path) if os.path.lexists(path) else None
    try:
      os.replace(tmp, path)
    except BaseException:
      if old is not None:  # put the previous directory back
        os.replace(os.path.join(old, "d"), path)
        os.rmdir(old)
      raise
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)


def _move_aside(path: str) -> str:
  """Renames `path` to `<hidden sibling>/d`; returns the sibling (to delete later)."""
  old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-",
                         dir=os.path.dirname(path))
  try:
    os.replace(path, os.path.join(old, "d"))
  except BaseException:
    os.rmdir(old)
    raise
  return old


def _check_target(path: str, *, overwrite: bool,
                  recognise: Callable[[str], bool] | None) -> None:
  # A foreign path first: suggesting overwrite for it would only lead to this error.
  check_replaceable(path, recognise=recognise)
  if os.path.lexists(path) and not overwrite:
    raise FileExistsError(f"output {path} already exists; pass overwrite to replace "
                          "it.")
