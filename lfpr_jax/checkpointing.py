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
import shutil
import tempfile
from typing import Any, Mapping, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from lfpr_jax.models.config import TapConfig
from lfpr_jax.models.params import abstract_params, check_params

PyTree = Any
FORMAT = "lfpr_jax.model/1"
ARCH_FILE = "arch.json"
PARAMS_DIR = "params"


def check_output_dir(path: str, *, overwrite: bool = False) -> None:
  """Fails early (before long work) if `path` exists and may not be replaced."""
  if os.path.exists(path) and not overwrite:
    raise ValueError(f"output {path} already exists; pass overwrite to replace it.")
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  if not os.access(parent, os.W_OK):
    raise ValueError(f"cannot write into {parent}.")


def save_model(path: str, config: TapConfig, params: PyTree, *,
               overwrite: bool = False, extra: Optional[Mapping[str, Any]] = None
               ) -> None:
  """Writes `params` (validated against `config`) and `arch.json` to `path`."""
  check_params(params, config)
  check_output_dir(path, overwrite=overwrite)
  path = os.path.abspath(path)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-",
                         dir=os.path.dirname(path))
  try:
    host = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.join(tmp, PARAMS_DIR), host)
    ckptr.wait_until_finished()
    meta = {"format": FORMAT, "config": config.to_dict(), **dict(extra or {})}
    with open(os.path.join(tmp, ARCH_FILE), "w") as f:
      json.dump(meta, f, indent=1)
    if os.path.exists(path):
      shutil.rmtree(path)
    os.replace(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


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
