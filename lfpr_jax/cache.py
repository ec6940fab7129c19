"""Checked loads of cached outputs, and the provenance that says what produced them.

A cached `.npz` / `.json` (importance scores, pseudo-labels, metrics) can be truncated
by an interrupted run on a file system without atomic rename, damaged, or produced
under another config. Loading it through `load_npz` / `load_json` turns each of those
into one error that names the file, what it is, and how to recompute it, instead of a
`zipfile.BadZipFile` traceback deep inside numpy.

Provenance: `provenance(config=..., inputs=...)` is a small JSON-able dict of the
config values an output depends on and the SHA-256 of its input files. `save_npz` /
`save_json` store it with the output; `load_npz` / `load_json` given the expected
provenance refuse a file whose stored one differs, naming the differing keys.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
import zlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from lfpr_jax import atomic

PROVENANCE_KEY = "__provenance__"


class CorruptCacheError(ValueError):
  """A cached file that is truncated, garbage, or lacks expected entries."""


class StaleCacheError(ValueError):
  """A cached file produced under another config or from other inputs."""


def _missing(path: str, what: str, recompute_hint: str) -> FileNotFoundError:
  return FileNotFoundError(f"{what} {path} does not exist; compute it with "
                           f"{recompute_hint}.")


def _corrupt(path: str, what: str, recompute_hint: str, reason: str
             ) -> CorruptCacheError:
  return CorruptCacheError(
      f"{what} {path} is unreadable ({reason}); it is truncated or not written by "
      f"lfpr_jax: delete it and recompute it with {recompute_hint}.")


# ------------------------------------------------------------------- provenance


def file_sha256(path: str | os.PathLike) -> str:
  """SHA-256 of a file's bytes, or of a directory's files (relative names + bytes)."""
  path = os.fspath(path)
  h = hashlib.sha256()
  if os.path.isdir(path):
    for root, dirs, files in os.walk(path):
      dirs.sort()
      for name in sorted(files):
        full = os.path.join(root, name)
        h.update(os.path.relpath(full, path).encode("utf-8") + b"\0")
        h.update(file_sha256(full).encode("ascii"))
    return h.hexdigest()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def provenance(*, config: Mapping[str, Any] | None = None,
               inputs: Mapping[str, str | os.PathLike] | None = None,
               digests: Mapping[str, str] | None = None) -> dict[str, Any]:
  """What an output was produced from, as a JSON-able dict.

  Args:
    config: the config values the output depends on (only those: a change of an
      unrelated key must not invalidate it), e.g. `{"prune.num_batches": 8}`.
    inputs: name -> file or directory whose content the output depends on; stored as
      its SHA-256 (`file_sha256`).
    digests: name -> an already known digest (e.g. `params_sha256` of a model).

  Returns:
    `{"config": {...}, "inputs": {name: sha256}}` with JSON-normalised values
    (tuples as lists, non-finite floats as None), so it compares equal to itself
    after a round trip through a file.
  """
  hashes = {name: file_sha256(p) for name, p in (inputs or {}).items()}
  hashes.update(digests or {})
  return atomic.json_safe({"config": dict(config or {}), "inputs": hashes})


def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, Mapping):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def check_provenance(path: str | os.PathLike, stored: Mapping[str, Any] | None,
                     expected: Mapping[str, Any], *, what: str,
                     recompute_hint: str) -> None:
  """Raises `StaleCacheError` naming `path` and each differing key.

  Args:
    path: the cached file (for the message).
    stored: the provenance stored with it (None: it has none).
    expected: `provenance(...)` of the current run.
    what: what the file is, e.g. "importance scores".
    recompute_hint: the command (or step) that recomputes it.
  """
  path = os.fspath(path)
  if stored is None:
    raise StaleCacheError(f"{what} {path} records no provenance, so it cannot be "
                          f"checked against this run; delete it and recompute it with "
                          f"{recompute_hint}.")
  if not isinstance(stored, Mapping):
    raise StaleCacheError(f"{what} {path} has an unreadable provenance "
                          f"({type(stored).__name__}); delete it and recompute it with "
                          f"{recompute_hint}.")
  old, new = _flat(stored), _flat(atomic.json_safe(expected))
  diffs = []
  for key in sorted(set(old) | set(new)):
    if old.get(key, "<absent>") != new.get(key, "<absent>"):
      diffs.append(f"{key}: stored {_short(old.get(key, '<absent>'))}, now "
                   f"{_short(new.get(key, '<absent>'))}")
  if diffs:
    raise StaleCacheError(f"{what} {path} was produced under other settings ("
                          + "; ".join(diffs) + f"); delete it and recompute it with "
                          f"{recompute_hint}, or restore the settings it was made with.")


def _short(value: Any) -> str:
  text = repr(value)
  return text if len(text) <= 40 else text[:37] + "..."


# ------------------------------------------------------------------------- npz


def save_npz(path: str | os.PathLike, arrays: Mapping[str, np.ndarray], *,
             provenance: Mapping[str, Any] | None = None) -> None:
  """Writes `arrays` atomically (`atomic.savez`), with `provenance` if given.

  The provenance is stored as a JSON string entry `PROVENANCE_KEY` (no pickling).
  """
  arrays = {k: np.asarray(v) for k, v in arrays.items()}
  if PROVENANCE_KEY in arrays:
    raise ValueError(f"array name {PROVENANCE_KEY!r} is reserved for the provenance.")
  for name, value in arrays.items():
    if value.dtype == object:
      raise ValueError(f"array {name!r} has dtype object, which would need pickling; "
                       "store numeric or string arrays.")
  if provenance is not None:
    arrays[PROVENANCE_KEY] = np.asarray(json.dumps(atomic.json_safe(provenance),
                                                   sort_keys=True, allow_nan=False))
  atomic.savez(path, **arrays)


def load_npz(path: str | os.PathLike, *, what: str, recompute_hint: str,
             keys: Iterable[str] = (), provenance: Mapping[str, Any] | None = None
             ) -> dict[str, np.ndarray]:
  """Reads every array of an `.npz` into memory, checking it.

  Args:
    path: the file.
    what: what it holds, for messages (e.g. "importance scores").
    recompute_hint: the command or step that recomputes it, for messages.
    keys: arrays that must be present.
    provenance: when given, the expected `provenance(...)`; the stored one must match.

  Returns:
    name -> array (the provenance entry excluded).

  Raises:
    FileNotFoundError: no such file.
    CorruptCacheError: truncated / not an npz / holds pickled objects / lacks `keys`.
    StaleCacheError: provenance mismatch.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise _missing(path, what, recompute_hint)
  with open(path, "rb") as f:
    head = f.read(4)
  if head not in (b"PK\x03\x04", b"PK\x05\x06"):  # local file / empty archive
    raise _corrupt(path, what, recompute_hint, "not an .npz (zip) archive" +
                   (", it is empty" if not head else ""))
  try:
    # Eager: a lazy NpzFile would raise on first access, far from here.
    with np.load(path, allow_pickle=False) as f:
      data = {name: f[name] for name in f.files}
  except ValueError as e:
    if "pickle" in str(e):
      # Never suggest allowing pickles: lfpr_jax writes none, so this file is foreign.
      raise _corrupt(path, what, recompute_hint, "it holds pickled Python objects, "
                     "which lfpr_jax never writes") from None
    raise _corrupt(path, what, recompute_hint, _reason(e)) from e
  except (zipfile.BadZipFile, EOFError, OSError, KeyError, UnicodeDecodeError,
          zlib.error) as e:
    raise _corrupt(path, what, recompute_hint, _reason(e)) from e
  stored = data.pop(PROVENANCE_KEY, None)
  if stored is not None and provenance is not None:
    try:
      stored = json.loads(str(stored))
    except ValueError as e:
      raise _corrupt(path, what, recompute_hint,
                     f"its provenance is not JSON: {_reason(e)}") from e
  _check_contents(path, data, stored, keys=keys, provenance=provenance, what=what,
                  recompute_hint=recompute_hint, kind="arrays")
  return data


def _check_contents(path: str | os.PathLike, data: Mapping[str, Any], stored: Any, *,
                    keys: Sequence[str], provenance: Mapping[str, Any] | None,
                    what: str, recompute_hint: str, kind: str) -> None:
  """Required entries present, and the stored provenance the expected one."""
  missing = [k for k in keys if k not in data]
  if missing:
    raise _corrupt(path, what, recompute_hint,
                   f"missing {kind} {missing}; it has {sorted(data)}")
  if provenance is not None:
    check_provenance(path, stored, provenance, what=what,
                     recompute_hint=recompute_hint)


def _reason(e: BaseException) -> str:
  text = str(e).splitlines()[0] if str(e) else ""
  return f"{type(e).__name__}: {text}" if text else type(e).__name__


# ------------------------------------------------------------------------ json


def save_json(path: str | os.PathLike, obj: Mapping[str, Any], *,
              provenance: Mapping[str, Any] | None = None) -> None:
  """Writes the object `obj` as strict JSON (`atomic.write_json`), with `provenance`.

  The provenance goes under the top-level key `PROVENANCE_KEY`.
  """
  obj = dict(obj)
  if PROVENANCE_KEY in obj:
    raise ValueError(f"key {PROVENANCE_KEY!r} is reserved for the provenance.")
  if provenance is not None:
    obj[PROVENANCE_KEY] = provenance
  atomic.write_json(path, obj)


def load_json(path: str | os.PathLike, *, what: str, recompute_hint: str,
              keys: Iterable[str] = (), provenance: Mapping[str, Any] | None = None
              ) -> dict[str, Any]:
  """Reads a JSON object, checking it (the `load_npz` contract for JSON files).

  Returns:
    The object, without the provenance entry.

  Raises:
    FileNotFoundError: no such file.
    CorruptCacheError: not UTF-8 JSON / not an object / lacks `keys`.
    StaleCacheError: provenance mismatch.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise _missing(path, what, recompute_hint)
  try:
    with open(path, encoding="utf-8") as f:
      obj = json.load(f)
  except (ValueError, OSError) as e:  # JSONDecodeError, UnicodeDecodeError
    raise _corrupt(path, what, recompute_hint, _reason(e)) from e
  if not isinstance(obj, dict):
    raise _corrupt(path, what, recompute_hint,
                   f"expected a JSON object, found a {type(obj).__name__}")
  stored = obj.pop(PROVENANCE_KEY, None)
  _check_contents(path, obj, stored, keys=keys, provenance=provenance, what=what,
                  recompute_hint=recompute_hint, kind="keys")
  return obj
