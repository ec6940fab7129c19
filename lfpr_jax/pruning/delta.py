"""ReSt delta checkpoints: only the retrained tensors, the selection and the base hash.

Layout of a delta directory (written atomically):

    DIR/delta.json            {"format": "lfpr_jax.delta/1", "config": pruned TapConfig,
                               "base_sha256": ..., "num_params": ..., extra fields}
    DIR/params/               the trainable tensors (see `checkpointing.save_params`)
    DIR/selection_masks.npz   the binary head/neuron selection, stored as bits

With the unpruned base model directory `load_delta` rebuilds the retrained model; the
delta's size is what the paper's "File Size" column reports for ReSt (docs/LFPR.md §7.4).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from lfpr_jax import atomic
from lfpr_jax.models.config import TapConfig
from lfpr_jax.models.params import check_params
from lfpr_jax.pruning import surgery
from lfpr_jax.training import checkpointing
from lfpr_jax.training.optim import merge_params

PyTree = Any
DELTA_FORMAT = "lfpr_jax.delta/1"
DELTA_FILE = "delta.json"
MASKS_FILE = "selection_masks.npz"


def is_delta_dir(path: str) -> bool:
  """Whether `path` is a delta directory this project wrote (also before markers)."""
  return checkpointing.has_format(path, DELTA_FILE, DELTA_FORMAT)


def save_delta(path: str, *, trainable: PyTree, pruned_config: TapConfig,
               head_mask: np.ndarray, ffn_mask: np.ndarray, base_sha256: str,
               overwrite: bool = False, extra: Mapping[str, Any] | None = None
               ) -> None:
  """Writes a ReSt delta of the pruned model `pruned_config`.

  Args:
    path: the delta directory (refused if it exists, unless `overwrite`).
    trainable: the retrained tensors (a subtree of the pruned model's params).
    pruned_config: the pruned architecture.
    head_mask, ffn_mask: the binary selection `[L, H]`, `[L, F]` on the base model.
    base_sha256: `checkpointing.params_sha256` of the unpruned base parameters.
    overwrite: replace an existing directory.
    extra: further JSON-able fields for `delta.json`.
  """
  checkpointing.check_output_dir(path, overwrite=overwrite, recognise=is_delta_dir)
  with atomic.directory(path, overwrite=overwrite, recognise=is_delta_dir) as tmp:
    host = checkpointing.save_params(os.path.join(tmp, checkpointing.PARAMS_DIR),
                                     trainable)
    np.savez_compressed(os.path.join(tmp, MASKS_FILE),
                        head=np.packbits(np.asarray(head_mask) > 0, axis=-1),
                        ffn=np.packbits(np.asarray(ffn_mask) > 0, axis=-1),
                        head_shape=np.asarray(np.shape(head_mask)),
                        ffn_shape=np.asarray(np.shape(ffn_mask)))
    meta = {"format": DELTA_FORMAT, "config": pruned_config.to_dict(),
            "base_sha256": base_sha256,
            "num_params": int(sum(np.size(x) for x in jax.tree.leaves(host))),
            **dict(extra or {})}
    atomic.write_json(os.path.join(tmp, DELTA_FILE), meta)


def load_delta(path: str, base_dir: str) -> tuple[TapConfig, PyTree]:
  """Rebuilds a retrained model from its delta and the unpruned base model directory.

  Returns:
    `(pruned_config, params)` of the retrained model.

  Raises:
    ValueError: `path` is not a delta, the base model is not the one the delta was
      made from (hash mismatch), or the stored selection does not give the stored
      architecture.
  """
  with open(os.path.join(path, DELTA_FILE)) as f:
    meta = json.load(f)
  if meta.get("format") != DELTA_FORMAT:
    raise ValueError(f"{path}: not an lfpr_jax delta (format {meta.get('format')!r}).")
  base_config, base_params = checkpointing.load_model(base_dir)
  digest = checkpointing.params_sha256(base_params)
  if digest != meta["base_sha256"]:
    raise ValueError(f"{base_dir} is not the base model of the delta {path} "
                     f"(sha256 {digest[:12]}..., expected {meta['base_sha256'][:12]}...).")
  with np.load(os.path.join(path, MASKS_FILE)) as m:
    head = np.unpackbits(m["head"], axis=-1)[..., :int(m["head_shape"][-1])]
    ffn = np.unpackbits(m["ffn"], axis=-1)[..., :int(m["ffn_shape"][-1])]
  pruned, config = surgery.prune(base_params, base_config, head.astype(np.float32),
                                 ffn.astype(np.float32))
  expected = TapConfig.from_dict(meta["config"])
  if config != expected:
    raise ValueError(f"{path}: the stored selection gives {config.mmt_heads}/"
                     f"{config.mmt_ffn}, the delta expects {expected.mmt_heads}/"
                     f"{expected.mmt_ffn}.")
  trained = checkpointing.restore_params(os.path.join(path, checkpointing.PARAMS_DIR))
  params = merge_params(pruned, trained)
  check_params(params, config)
  return config, params
