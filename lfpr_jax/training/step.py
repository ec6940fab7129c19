"""The jitted data-parallel training step and greedy prediction (pure + jit factories).

`train_step` is a pure function of (state, frozen params, batch, key); `make_train_step`
and `make_predict` jit it over a `data` mesh. Which parameters train and at which rates
is `optim`'s job; the loop around the step is `loop.run_steps`; scoring predictions is
`evaluate`.

`microbatches=M > 1` accumulates the gradient of M micro-batches in a `lax.scan`
inside the step (one optimiser update), so only one micro-batch's activations are live
at a time: the same step up to float summation noise with dropout off, at a fraction of
the activation memory.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from lfpr_jax.models import trim
from lfpr_jax.models.decoding import greedy_decode
from lfpr_jax.models.losses import m4c_bce_per_sample, m4c_decoding_bce
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


def sample_weights(loss_mask: Array, shards: int = 1) -> Array:
  """Per-sample weights that turn summed per-sample BCEs into `sharded_loss`.

  `sum_b w_b * m4c_bce_per_sample(...)_b` equals `sharded_loss(..., shards)` (up to
  float summation order) for any grouping of the samples, which lets micro-batches of
  a batch each contribute their exact share of the whole batch's loss.

  Args:
    loss_mask: `[B, T]` of the whole batch, 1 on supervised decoding steps.
    shards: loss shards (see `sharded_loss`); B must be divisible by it.

  Returns:
    `[B]` float32: w_b = 1 / (shards * max(supervised steps of b's shard, 1)).
  """
  b = loss_mask.shape[0]
  if b % shards:
    raise ValueError(f"batch {b} is not divisible into {shards} loss shards.")
  steps = jnp.sum(loss_mask.astype(jnp.float32).reshape(shards, -1), axis=1)  # [S]
  w = 1.0 / (shards * jnp.maximum(steps, 1.0))
  return jnp.repeat(w, b // shards)


def split_microbatches(batch: Mapping[str, Array], microbatches: int
                       ) -> dict[str, Array]:
  """`[B, ...]` fields as `[M, B/M, ...]`; micro-batch m holds rows m, m+M, m+2M, ...

  Strided rather than contiguous rows: with the batch sharded on `data` in contiguous
  blocks, every device then keeps its share of every micro-batch (when B/M is
  divisible by the device count), so the micro-batches stay data-parallel.

  Raises:
    ValueError: a field's leading dimension is not divisible by `microbatches`, or
      the fields disagree on the batch size.
  """
  sizes = {k: v.shape[0] if v.ndim else None for k, v in batch.items()}
  if len(set(sizes.values())) != 1 or None in sizes.values():
    raise ValueError(f"every batch field needs the same leading batch dimension to "
                     f"split into micro-batches, got {sizes}.")
  b = next(iter(sizes.values()))
  if b % microbatches:
    raise ValueError(f"batch {b} is not divisible into {microbatches} micro-batches.")
  return {k: jnp.swapaxes(v.reshape((b // microbatches, microbatches) + v.shape[1:]),
                          0, 1) for k, v in batch.items()}


def _check_microbatches(microbatches: Any) -> None:
  if not isinstance(microbatches, int) or microbatches < 1:
    raise ValueError(f"microbatches must be an integer >= 1, got {microbatches!r}.")


def train_step(state: TrainState, frozen: PyTree, batch: Mapping[str, Array],
               rng: Array, *, model: TAP, tx: optax.GradientTransformation,
               loss_shards: int = 1, fixed_dropout_key: bool = False,
               microbatches: int = 1) -> tuple[TrainState, dict[str, Array]]:
  """One optimiser step on the M4C decoding BCE with dropout on (pure).

  Only `state.params` (the trainable subtree) is differentiated, so the clipping norm
  of `tx` sees trainable gradients only. `fixed_dropout_key` reuses `rng` at every
  step (upstream re-seeds torch to 0 in every forward); otherwise the key is folded
  with the step number.

  The loss is `sharded_loss` of the whole batch. With `microbatches=M > 1` it is
  written as a weighted sum of per-sample BCE sums (`sample_weights`, from the whole
  batch's `train_loss_mask`) and the batch is split into M micro-batches
  (`split_microbatches`) and a `lax.scan` accumulates each one's weighted loss and
  float32 gradient, so only one micro-batch's activations are live; one optimiser
  update follows. With dropout off this equals the one-shot step up to float
  summation noise. With dropout on, micro-batch m draws its masks from
  `fold_in(dropout key, m)`: the same distribution as the one-shot step, other masks.

  Args:
    state: trainable params and optimiser state.
    frozen: the parameters that do not train.
    batch: `STEP_FIELDS`, every field `[B, ...]`.
    rng: the dropout key.
    model, tx: the model and the optimiser.
    loss_shards: see `sharded_loss`.
    fixed_dropout_key: reuse `rng` at every step.
    microbatches: M, a divisor of B (1: the whole batch in one pass).

  Returns:
    (new state, {"loss", "grad_norm"} of the whole batch).

  Raises:
    ValueError: B is not divisible by `microbatches` or `loss_shards`.
  """
  _check_microbatches(microbatches)
  dropout_rng = rng if fixed_dropout_key else jax.random.fold_in(rng, state.step)

  def scores_of(trainable, part, key):
    return model.apply({"params": merge_params(trainable, frozen)}, part, train=True,
                       rngs={"dropout": key})

  if microbatches == 1:
    # The whole batch in one pass: `sharded_loss` as written (bit for bit the step of
    # earlier versions, so recorded runs reproduce exactly).
    def whole_loss(trainable):
      return sharded_loss(scores_of(trainable, batch, dropout_rng), batch["targets"],
                          batch["train_loss_mask"], loss_shards)
    loss, grads = jax.value_and_grad(whole_loss)(state.params)
  else:
    def part_loss(trainable, part, w, key):
      return jnp.sum(w * m4c_bce_per_sample(scores_of(trainable, part, key),
                                            part["targets"], part["train_loss_mask"]))

    weights = sample_weights(batch["train_loss_mask"], loss_shards)
    parts = split_microbatches({**batch, "weights": weights}, microbatches)

    def accumulate(carry, xs):
      index, part = xs
      fields = {k: v for k, v in part.items() if k != "weights"}
      loss, grads = jax.value_and_grad(part_loss)(
          state.params, fields, part["weights"], jax.random.fold_in(dropout_rng, index))
      total_loss, total = carry
      total = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), total, grads)
      return (total_loss + loss.astype(jnp.float32), total), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
    (loss, grads), _ = jax.lax.scan(
        accumulate, (jnp.zeros((), jnp.float32), zeros),
        (jnp.arange(microbatches), parts))
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def make_train_step(model: TAP, tx: optax.GradientTransformation, mesh: Mesh, *,
                    loss_shards: int = 1, fixed_dropout_key: bool = False,
                    microbatches: int = 1) -> Callable[..., tuple[TrainState, dict]]:
  """`train_step` jitted over the mesh: batch sharded on `data`, the rest replicated.

  `microbatches`: see `train_step` (B must be divisible by it; for data parallelism
  B / microbatches should be divisible by the device count).
  """
  _check_microbatches(microbatches)   # at construction, before any step runs
  rep = parallel.replicated(mesh)
  return jax.jit(
      lambda s, f, b, r: train_step(s, f, b, r, model=model, tx=tx,
                                    loss_shards=loss_shards,
                                    fixed_dropout_key=fixed_dropout_key,
                                    microbatches=microbatches),
      in_shardings=(rep, rep, parallel.data_sharded(mesh), rep),
      out_shardings=(rep, rep), donate_argnums=(0,))


def make_trimmed_train_step(model: TAP, tx: optax.GradientTransformation, mesh: Mesh,
                            **kwargs: Any) -> Callable[..., tuple[TrainState, dict]]:
  """`make_train_step` over trimmed batches: one jitted step per trimmed shape.

  The returned `step(state, frozen, item, rng)` takes the `(global batch, trimmed
  config, TrimInfo)` triples of `parallel.trimmed_global_batches` and runs the step of
  `model` rebuilt with the trimmed config (`lfpr_jax.models.trim`; no parameter shape
  depends on it). The M4C loss sums over answer columns, and a dropped OCR column
  holds target 0 at the masked score, so with dropout off the loss and gradients are
  the padded step's up to float summation order; with dropout on the masks are drawn
  for other shapes (the same distribution, other masks). `kwargs`: as
  `make_train_step`; with `microbatches > 1` packed configs run unpacked (their row
  counts are the whole batch's). `step.num_specialisations()` counts the compiled
  shapes.
  """
  def build(config):
    if kwargs.get("microbatches", 1) > 1:
      config = trim.unpacked(config)   # micro-batches: trimmed, not packed
    return make_train_step(model.clone(config=config), tx, mesh, **kwargs)
  steps = trim.PerShape(build)

  def step(state, frozen, item, rng):
    batch, config, _ = item
    return steps(config)(state, frozen, batch, rng)
  step.num_specialisations = lambda: len(steps)
  return step


def make_predict(model: TAP, mesh: Mesh, bos_index: int) -> Callable[..., Array]:
  """Jitted greedy decoding returning the per-step argmax indices `[B, T]`."""
  def predict(params, batch):
    scores, _ = greedy_decode(model, {"params": params}, batch, bos_index=bos_index)
    return jnp.argmax(scores, axis=-1)
  return jax.jit(predict, in_shardings=(parallel.replicated(mesh),
                                        parallel.data_sharded(mesh)),
                 out_shardings=parallel.replicated(mesh))
