"""Greedy decoding of TAP: cached incremental (default) and the upstream 12-pass loop.

Upstream (docs/TAP.md §4.10) re-runs text-BERT and the whole MMT 12 times, refilling every
later decoder input with the previous pass's argmaxes. Because encoder rows never
attend to decoder rows and decoder row t only sees rows <= t, the encoder can run once
and each step needs a single decoder row with cached keys/values: `greedy_decode`.
`greedy_decode_reference` keeps the upstream loop as a test oracle.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp

from lfpr_jax.models.tap import TAP, LayerMasks, init_decoder_cache

Array = jax.Array
PyTree = Any


def _rngs(rng: Optional[Array], train: bool) -> dict[str, Array]:
  if not train:
    return {}
  if rng is None:
    raise ValueError("train=True (dropout on) needs an rng key.")
  return {"dropout": rng}


def greedy_decode(model: TAP, variables: PyTree, inputs: dict[str, Array], *,
                  bos_index: int = 1, num_steps: Optional[int] = None,
                  head_mask: LayerMasks = None, ffn_mask: LayerMasks = None,
                  train: bool = False, rng: Optional[Array] = None
                  ) -> tuple[Array, Array]:
  """Greedy decoding with cached encoder and decoder keys/values.

  Args:
    model: the TAP module.
    variables: `{'params': ...}`.
    inputs: canonical model inputs (`lfpr_jax.models.batch.model_inputs`).
    bos_index: answer-vocabulary index of `<s>`.
    num_steps: decode this many steps (default `config.decode_steps`); LFPR scoring
      at step t* needs only t* + 1.
    head_mask, ffn_mask: per-layer masks as in `TAP.__call__` (differentiable).
    train: dropout on (upstream LFPR scores in train mode); needs `rng`.
    rng: dropout key; step t uses `fold_in(rng, t + 1)`, the encoder `fold_in(rng, 0)`.

  Returns:
    scores `[B, num_steps, C]` (equal to upstream's final-pass scores) and the decoder
    inputs `[B, num_steps]` that produced them (BOS, then the argmaxes).
  """
  config = model.config
  steps = config.decode_steps if num_steps is None else int(num_steps)
  if not 1 <= steps <= config.decode_steps:
    raise ValueError(f"num_steps must be in [1, {config.decode_steps}], got {steps}.")
  kw = dict(train=train, head_mask=head_mask, ffn_mask=ffn_mask)
  enc_rng = None if rng is None else jax.random.fold_in(rng, 0)
  cache = model.apply(variables, inputs, method=TAP.encode,
                      rngs=_rngs(enc_rng, train), **kw)
  batch_size = inputs["cmb_text"].shape[0]

  def step(carry, t):
    dec_kv, prev_t = carry
    step_rng = None if rng is None else jax.random.fold_in(rng, t + 1)
    scores_t, dec_kv = model.apply(variables, cache, dec_kv, prev_t, t,
                                   method=TAP.decode_step,
                                   rngs=_rngs(step_rng, train), **kw)
    nxt = jnp.argmax(scores_t, axis=-1).astype(prev_t.dtype)
    return (dec_kv, nxt), (scores_t, prev_t)

  init = (init_decoder_cache(config, batch_size),
          jnp.full((batch_size,), bos_index, jnp.int32))
  _, (scores, prev) = jax.lax.scan(step, init, jnp.arange(steps))
  return jnp.swapaxes(scores, 0, 1), jnp.swapaxes(prev, 0, 1)


def greedy_decode_reference(model: TAP, variables: PyTree, inputs: dict[str, Array],
                            *, bos_index: int = 1, num_steps: Optional[int] = None,
                            head_mask: LayerMasks = None, ffn_mask: LayerMasks = None
                            ) -> tuple[Array, Array]:
  """The upstream loop: `num_steps` full teacher-forced passes (eval mode).

  Returns the last pass's scores `[B, T, C]` and the decoder inputs it was fed.
  """
  config = model.config
  steps = config.decode_steps if num_steps is None else int(num_steps)
  batch_size = inputs["cmb_text"].shape[0]
  prev = jnp.zeros((batch_size, config.decode_steps), jnp.int32)
  prev = prev.at[:, 0].set(bos_index)
  scores = None
  for _ in range(steps):
    scores = model.apply(variables, {**inputs, "train_prev_inds": prev},
                         head_mask=head_mask, ffn_mask=ffn_mask)
    fed = prev
    prev = prev.at[:, 1:].set(jnp.argmax(scores, axis=-1)[:, :-1].astype(jnp.int32))
  return scores, fed
