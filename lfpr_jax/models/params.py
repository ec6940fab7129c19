"""Parameter trees of TAP: abstract shapes, random init, and strict validation."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp

from lfpr_jax.models.config import TapConfig
from lfpr_jax.models.tap import TAP

PyTree = Any


def dummy_inputs(config: TapConfig, batch_size: int = 1) -> dict[str, jax.Array]:
  """Zero model inputs of the right shapes (for init / eval_shape)."""
  c = config
  f32, i32 = jnp.float32, jnp.int32
  return {
      "cmb_text": jnp.ones((batch_size, c.text_len), i32),
      "image_feature_0": jnp.zeros((batch_size, c.obj_max, c.obj_feat_dim), f32),
      "obj_bbox_coordinates": jnp.zeros((batch_size, c.obj_max, 4), f32),
      "obj_num": jnp.ones((batch_size,), i32),
      "image_feature_1": jnp.zeros((batch_size, c.ocr_max, c.ocr_feat_dim), f32),
      "context_feature_0": jnp.zeros((batch_size, c.ocr_max, c.fasttext_dim), f32),
      "context_feature_1": jnp.zeros((batch_size, c.ocr_max, c.phoc_dim), f32),
      "ocr_bbox_coordinates": jnp.zeros((batch_size, c.ocr_max, 4), f32),
      "ocr_num": jnp.ones((batch_size,), i32),
      "train_prev_inds": jnp.zeros((batch_size, c.decode_steps), i32),
  }


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
