"""Parameter trees of TAP: abstract shapes, random init, and strict validation."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp

from lfpr_jax.models.batch import INT_FIELDS, field_shapes
from lfpr_jax.models.config import TapConfig
from lfpr_jax.models.tap import TAP

PyTree = Any


def dummy_inputs(config: TapConfig, batch_size: int = 1) -> dict[str, jax.Array]:
  """Model inputs of the right shapes (for init / eval_shape); counts are 1, the rest 0."""
  out = {}
  for name, shape in field_shapes(config, batch_size).items():
    if name in INT_FIELDS:
      fill = 0 if name == "train_prev_inds" else 1
      out[name] = jnp.full(shape, fill, jnp.int32)
    else:
      out[name] = jnp.zeros(shape, jnp.float32)
  return out


def init_params(config: TapConfig, rng: jax.Array) -> PyTree:
  """Randomly initialised parameters (normal 0.02 weights, LayerNorm at 1/0)."""
  model = TAP(config)
  return jax.jit(lambda r: model.init(r, dummy_inputs(config))["params"])(rng)


def abstract_params(config: TapConfig) -> PyTree:
  """`jax.ShapeDtypeStruct` tree of the model's params, without allocating."""
  model = TAP(config)
  return jax.eval_shape(lambda: model.init(jax.random.key(0),
                                           dummy_inputs(config))["params"])


def check_params(params: PyTree, config: TapConfig) -> None:
  """Raises ValueError on a missing, extra or misshapen leaf (naming it)."""
  want = flax.traverse_util.flatten_dict(abstract_params(config), sep="/")
  have = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/")
  missing = sorted(set(want) - set(have))
  extra = sorted(set(have) - set(want))
  problems = []
  if missing:
    problems.append(f"missing parameters: {missing}")
  if extra:
    problems.append(f"unexpected parameters: {extra}")
  for k in sorted(set(want) & set(have)):
    if tuple(want[k].shape) != tuple(jnp.shape(have[k])):
      problems.append(f"parameter {k} has shape {tuple(jnp.shape(have[k]))}, the "
                      f"model expects {tuple(want[k].shape)}")
  if problems:
    raise ValueError(f"parameter tree does not match the {config.arch} model "
                     f"(heads {list(config.mmt_heads)}, ffn {list(config.mmt_ffn)}): "
                     + "; ".join(problems))


def count_params(params: PyTree) -> int:
  return int(sum(x.size for x in jax.tree.leaves(params)))
