"""Losses of TAP fine-tuning (`m4c_decoding_bce_with_mask`, docs/TAP.md §8)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def m4c_decoding_bce(scores: jax.Array, targets: jax.Array,
                     loss_mask: jax.Array) -> jax.Array:
  """Masked BCE-with-logits summed over classes and steps / number of active steps.

  Args:
    scores: logits `[B, T, C]`.
    targets: soft targets `[B, T, C]`.
    loss_mask: `[B, T]`, 1 on supervised decoding steps.

  Returns:
    Scalar: sum_{b,t,c} m[b,t] * bce[b,t,c] / max(sum m, 1). Not divided by C or B,
    so it is about 3.7e3 for a random model (upstream normalisation).
  """
  per_step = _bce_per_step(scores, targets) * loss_mask
  return jnp.sum(per_step) / jnp.maximum(jnp.sum(loss_mask), 1.0)


def m4c_bce_per_sample(scores: jax.Array, targets: jax.Array,
                       loss_mask: jax.Array) -> jax.Array:
  """`[B]`: sum_{t,c} m[b,t] * bce[b,t,c] of every sample, not normalised (the caller
  weights it); arguments as `m4c_decoding_bce`."""
  return jnp.sum(_bce_per_step(scores, targets) * loss_mask, axis=-1)


def _bce_per_step(scores: jax.Array, targets: jax.Array) -> jax.Array:
  """`[B, T]`: BCE-with-logits summed over classes, in float32 (stable form)."""
  s = scores.astype(jnp.float32)
  bce = jax.nn.relu(s) - s * targets + jnp.log1p(jnp.exp(-jnp.abs(s)))
  return jnp.sum(bce, axis=-1)
