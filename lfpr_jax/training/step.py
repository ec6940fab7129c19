"""The jitted data-parallel training step and greedy prediction (pure + jit factories).

`train_step` is a pure function of (state, frozen params, batch, key); `make_train_step`
and `make_predict` jit it over a `data` mesh. Which parameters train and at which rates
is `optim`'s job; the loop around the step is `loop.run_steps`; scoring predictions is
`evaluate`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from lfpr_jax.models.decoding import greedy_decode
from lfpr_jax.models.losses import m4c_decoding_bce
from lfpr_jax.models.tap import TAP
from lfpr_jax.training import parallel
from lfpr_jax.training.optim import merge_params

PyTree = Any
Array = jax.Array


@flax.struct.dataclass
class TrainState:
  """Trainable params + optimiser state; frozen params travel separately."""
  step: Array
  params: PyTree
  opt_state: PyTree


def init_state(trainable: PyTree, tx: optax.GradientTransformation) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=trainable,
                    opt_state=tx.init(trainable))


def sharded_loss(scores: Array, targets: Array, loss_mask: Array, shards: int = 1
                 ) -> Array:
  """The M4C BCE normalised per shard of the batch, averaged over the shards.

  `shards=1` normalises by the global number of supervised steps (clean); upstream's
  DDP ReSt normalises on each GPU's 8 samples and averages the gradients (docs/LFPR.md
  §6.4), which `shards=2` on a batch of 16 reproduces.
  """
  if shards == 1:
    return m4c_decoding_bce(scores, targets, loss_mask)
  b = scores.shape[0]
  if b % shards:
    raise ValueError(f"batch {b} is not divisible into {shards} loss shards.")
  split = lambda a: a.reshape((shards, b // shards) + a.shape[1:])
  return jnp.mean(jax.vmap(m4c_decoding_bce)(split(scores), split(targets),
                                              split(loss_mask)))


def train_step(state: TrainState, frozen: PyTree, batch: Mapping[str, Array],
               rng: Array, *, model: TAP, tx: optax.GradientTransformation,
               loss_shards: int = 1, fixed_dropout_key: bool = False
               ) -> tuple[TrainState, dict[str, Array]]:
  """One optimiser step on the M4C decoding BCE with dropout on (pure).

  Only `state.params` (the trainable subtree) is differentiated, so the clipping norm
  of `tx` sees trainable gradients only. `fixed_dropout_key` reuses `rng` at every
  step (upstream re-seeds torch to 0 in every forward); otherwise the key is folded
  with the step number.
  """
  dropout_rng = rng if fixed_dropout_key else jax.random.fold_in(rng, state.step)

  def loss_fn(trainable):
    scores = model.apply({"params": merge_params(trainable, frozen)}, batch,
                         train=True, rngs={"dropout": dropout_rng})
    return sharded_loss(scores, batch["targets"], batch["train_loss_mask"],
                        loss_shards)

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def make_train_step(model: TAP, tx: optax.GradientTransformation, mesh: Mesh, *,
                    loss_shards: int = 1, fixed_dropout_key: bool = False
                    ) -> Callable[..., tuple[TrainState, dict]]:
  """`train_step` jitted over the mesh: batch sharded on `data`, the rest replicated."""
  rep = parallel.replicated(mesh)
  return jax.jit(
      lambda s, f, b, r: train_step(s, f, b, r, model=model, tx=tx,
                                    loss_shards=loss_shards,
                                    fixed_dropout_key=fixed_dropout_key),
      in_shardings=(rep, rep, parallel.data_sharded(mesh), rep),
      out_shardings=(rep, rep), donate_argnums=(0,))


def make_predict(model: TAP, mesh: Mesh, bos_index: int) -> Callable[..., Array]:
  """Jitted greedy decoding returning the per-step argmax indices `[B, T]`."""
  def predict(params, batch):
    scores, _ = greedy_decode(model, {"params": params}, batch, bos_index=bos_index)
    return jnp.argmax(scores, axis=-1)
  return jax.jit(predict, in_shardings=(parallel.replicated(mesh),
                                        parallel.data_sharded(mesh)),
                 out_shardings=parallel.replicated(mesh))
