"""Model directories: an Orbax parameter checkpoint plus `arch.json`.

Layout of a model directory (written atomically: a temporary sibling directory is
filled, then renamed into place, so an interrupted write leaves nothing half-written):

    DIR/arch.json     {"format": "lfpr_jax.model/1", "config": TapConfig fields, ...}
    DIR/params/       Orbax StandardCheckpointer tree of float32 parameters

`load_model(DIR)` rebuilds the model from these two alone. Only this module imports
orbax, so a later move to the Orbax V1 API stays local.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from lfpr_jax import atomic
from lfpr_jax.models.config import TapConfig
from lfpr_jax.models.params import abstract_params, check_params

PyTree = Any
FORMAT = "lfpr_jax.model/1"
ARCH_FILE = "arch.json"
PARAMS_DIR = "params"


def has_format(path: str, name: str, fmt: str) -> bool:
  """Whether `path/name` is a JSON file whose `format` is `fmt`.

  Recognises directories written before `atomic.MARKER` existed, so `overwrite` can
  still replace them; anything unreadable is not recognised.
  """
  try:
    with open(os.path.join(path, name), encoding="utf-8") as f:
      return json.load(f).get("format") == fmt
  except (OSError, ValueError, AttributeError):
    return False


def _is_model_dir(path: str) -> bool:
  return has_format(path, ARCH_FILE, FORMAT)


def check_output_dir(path: str, *, overwrite: bool = False,
                     recognise: Callable[[str], bool] = _is_model_dir) -> None:
  """Fails early (before long work) if `path` may not be written.

  Raises:
    atomic.ForeignDirectoryError: `path` exists but is not a model or delta directory
      lfpr_jax wrote (a file, a link, a folder of other files); it is never deleted,
      with or without `overwrite`.
    FileExistsError: `path` exists and `overwrite` is not set.
    PermissionError: the parent directory is not writable.
  """
  atomic.check_replaceable(path, recognise=recognise)
  if os.path.lexists(path) and not overwrite:
    raise FileExistsError(f"output {path} already exists; pass --overwrite "
                          "(overwrite=True) to replace it.")
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  if not os.access(parent, os.W_OK):
    raise PermissionError(f"cannot write into {parent} (for output {path}).")


def save_model(path: str, config: TapConfig, params: PyTree, *,
               overwrite: bool = False, extra: Mapping[str, Any] | None = None
               ) -> None:
  """Writes `params` (validated against `config`) and `arch.json` to `path`.

  With `overwrite`, an existing model directory lfpr_jax wrote is replaced; any other
  existing path raises (see `check_output_dir`) and is left untouched.
  """
  check_params(params, config)
  check_output_dir(path, overwrite=overwrite)
  with atomic.directory(path, overwrite=overwrite, recognise=_is_model_dir) as tmp:
    save_params(os.path.join(tmp, PARAMS_DIR), params)
    meta = {"format": FORMAT, "config": config.to_dict(), **dict(extra or {})}
    atomic.write_json(os.path.join(tmp, ARCH_FILE), meta)


def save_params(path: str, params: PyTree) -> PyTree:
  """Saves float32 host copies of `params` with Orbax; returns them."""
  host = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(path, host)
  ckptr.wait_until_finished()
  return host


def restore_params(path: str, abstract: PyTree = None) -> PyTree:
  """Reads a parameter tree written by `save_params` (shapes from `abstract` if given)."""
  return ocp.StandardCheckpointer().restore(os.path.abspath(path), abstract)


def load_config(path: str) -> TapConfig:
  """The architecture stored in a model directory."""
  arch = os.path.join(path, ARCH_FILE)
  if not os.path.isfile(arch):
    raise FileNotFoundError(
        f"{path} is not an lfpr_jax model directory (no {ARCH_FILE}); convert an "
        "upstream checkpoint with `python -m converters.torch_to_flax`.")
  with open(arch) as f:
    meta = json.load(f)
  if meta.get("format") != FORMAT:
    raise ValueError(f"{arch}: unknown format {meta.get('format')!r}, "
                     f"expected {FORMAT!r}.")
  return TapConfig.from_dict(meta["config"])


def load_model(path: str) -> tuple[TapConfig, PyTree]:
  """Reads `(config, params)` from a model directory written by `save_model`."""
  config = load_config(path)
  abstract = abstract_params(config)
  params = ocp.StandardCheckpointer().restore(
      os.path.join(os.path.abspath(path), PARAMS_DIR), abstract)
  check_params(params, config)
  return config, params


# ------------------------------------------------------------------ fingerprints


def params_sha256(params: PyTree) -> str:
  """SHA-256 over every leaf (path, dtype, shape, float32 bytes) in sorted path order."""
  import hashlib

  import flax
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/")
  h = hashlib.sha256()
  for path in sorted(flat):
    a = np.ascontiguousarray(np.asarray(flat[path], np.float32))
    h.update(f"{path}|{a.shape}|".encode())
    h.update(a.tobytes())
  return h.hexdigest()


def directory_bytes(path: str) -> int:
  """Bytes of all files under `path`."""
  total = 0
  for root, _, files in os.walk(path):
    total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
  return total


# ------------------------------------------------------------- training checkpoints


def train_manager(directory: str) -> ocp.CheckpointManager:
  """An Orbax manager keeping the latest training checkpoint under `directory`."""
  return ocp.CheckpointManager(
      os.path.abspath(directory),
      options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True,
                                           enable_async_checkpointing=False))


def save_train_checkpoint(manager: ocp.CheckpointManager, step: int, state: PyTree,
                          loader: Any, meta: Mapping[str, Any] | None = None) -> None:
  """Saves the train state, the Grain iterator position and a JSON `meta` at `step`."""
  import grain
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(jax.device_get(state)),
      loader=grain.checkpoint.CheckpointSave(loader),
      meta=ocp.args.JsonSave(dict(meta or {}))))
  manager.wait_until_finished()


def restore_train_checkpoint(manager: ocp.CheckpointManager, step: int,
                             abstract_state: PyTree, loader: Any
                             ) -> tuple[PyTree, dict[str, Any]]:
  """Restores `(state, meta)`; the iterator position is restored in place."""
  import grain
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state),
      loader=grain.checkpoint.CheckpointRestore(loader),
      meta=ocp.args.JsonRestore()))
  return restored["state"], dict(restored["meta"] or {})
