r"""Label-free importance of heads and FFN neurons (LFPR.md §2-3).

* **t\*** (§2.3): greedy-decode the unpruned model (eval mode) over the sample set; for
  each sample the decoding step holding its largest logit (first occurrence in (t, c)
  order; `batch_search` reproduces upstream's search over the whole batch tensor);
  t\* = int(linear-interpolated median).
* **Objective** (§3.1): sum over samples of the max logit at step t\*, with the head
  and neuron masks as differentiable inputs at ones. The t\* greedy prefix runs in the
  cached decoder (its argmaxes carry no gradient, exactly as upstream's earlier
  passes), so the gradient is that of upstream's last pass.
* **Gradients** (§3.2-3.3): per-sample gradients with `jax.vmap(jax.grad(...))`; from
  them both the faithful per-batch score, sum_b (sum_{i in b} g_i)^2 over consecutive
  groups of 8 in the recorded sample order, and the per-sample score sum_i g_i^2 are
  accumulated in float64 while streaming. With the faithful dropout switch the
  samples interact, so group gradients are taken directly (one `grad` per group of 8,
  the same dropout key for every group, as upstream re-seeds every forward call).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from lfpr_jax import atomic
from lfpr_jax.training import parallel
from lfpr_jax.models.decoding import greedy_decode
from lfpr_jax.models.config import TapConfig
from lfpr_jax.models.tap import TAP

PyTree = Any
Array = jax.Array


# ----------------------------------------------------------------------------- t*


def first_max_steps(scores: Array, *, batch_search: bool = False) -> Array:
  """Per sample, the decoding step of its largest score (LFPR.md §2.3 steps 1-2).

  Args:
    scores: `[B, T, C]` final-pass greedy scores.
    batch_search: upstream's quirk: look the sample's maximum up in the whole batch
      tensor and take the step of the first hit in (b, t, c) order.

  Returns:
    `[B]` int32 step indices.
  """
  b, t, c = scores.shape
  flat = scores.reshape(b, t * c)
  if not batch_search:
    return (jnp.argmax(flat, axis=1) // c).astype(jnp.int32)  # argmax: first hit
  peak = jnp.max(flat, axis=1)
  hit = jnp.argmax(scores.reshape(1, -1) == peak[:, None], axis=1)
  return ((hit % (t * c)) // c).astype(jnp.int32)


def t_star_of(steps: np.ndarray, decode_steps: int) -> int:
  r"""t\* = int(numpy's linear-interpolated median of the per-sample steps)."""
  steps = np.asarray(steps)
  if steps.size == 0:
    raise ValueError("t* needs at least one sample.")
  value = int(np.percentile(steps, 50))
  check_t_star(value, decode_steps)
  return value


def check_t_star(t_star: int, decode_steps: int) -> None:
  if not 0 <= int(t_star) < decode_steps:
    raise ValueError(f"t* must be a decoding step in [0, {decode_steps}), got {t_star}.")


def make_max_steps_fn(model: TAP, mesh: Mesh, *, bos_index: int,
                      batch_search: bool = False) -> Callable[[PyTree, dict], Array]:
  """Jitted `(params, batch) -> [B]` first-max steps of eval-mode greedy decoding."""
  def fn(params, batch):
    scores, _ = greedy_decode(model, {"params": params}, batch, bos_index=bos_index)
    return first_max_steps(scores, batch_search=batch_search)
  return jax.jit(fn, in_shardings=(parallel.replicated(mesh), parallel.data_sharded(mesh)),
                 out_shardings=parallel.replicated(mesh))


# ----------------------------------------------------------------------- gradients


def mask_shapes(config: TapConfig) -> tuple[tuple[int, int], tuple[int, int]]:
  """`([L, H], [L, F])` of the scoring masks (every layer must have the same width)."""
  if len(set(config.mmt_heads)) != 1 or len(set(config.mmt_ffn)) != 1:
    raise ValueError(
        "importance scoring needs an unpruned model (the same heads and FFN width in "
        f"every MMT layer), got heads {config.mmt_heads} and FFN {config.mmt_ffn}.")
  return ((config.mmt_layers, config.mmt_heads[0]),
          (config.mmt_layers, config.mmt_ffn[0]))


def max_logit_objective(model: TAP, params: PyTree, inputs: Mapping[str, Array],
                        head_mask: Array, ffn_mask: Array, weights: Array, *,
                        t_star: int, bos_index: int, train: bool = False,
                        rng: Array | None = None) -> Array:
  r"""sum_i w_i max_c scores_i[t\*, c] of greedy decoding with the given masks.

  `weights` (1 for real samples, 0 for padding) keeps padded rows of a partial last
  batch out of the objective.
  """
  scores, _ = greedy_decode(model, {"params": params}, dict(inputs),
                            bos_index=bos_index, num_steps=t_star + 1,
                            head_mask=head_mask, ffn_mask=ffn_mask, train=train,
                            rng=rng)
  return jnp.sum(weights * jnp.max(scores[:, t_star], axis=-1))


def per_sample_mask_grads(model: TAP, params: PyTree, inputs: Mapping[str, Array],
                          weights: Array, *, t_star: int, bos_index: int
                          ) -> tuple[Array, Array, Array]:
  """`vmap(grad)`: per-sample objective values `[B]` and gradients `[B,L,H]`, `[B,L,F]`.

  Dropout off, masks at ones.
  """
  (hs, fs) = mask_shapes(model.config)
  ones_h, ones_f = jnp.ones(hs, jnp.float32), jnp.ones(fs, jnp.float32)

  def one(sample, w):
    single = jax.tree.map(lambda a: a[None], sample)
    return jax.value_and_grad(
        lambda h, f: max_logit_objective(model, params, single, h, f, w[None],
                                         t_star=t_star, bos_index=bos_index),
        argnums=(0, 1))(ones_h, ones_f)

  values, (gh, gf) = jax.vmap(one)(dict(inputs), weights)
  return values, gh, gf


def group_mask_grads(model: TAP, params: PyTree, inputs: Mapping[str, Array],
                     weights: Array, rng: Array, *, t_star: int, bos_index: int,
                     group_size: int) -> tuple[Array, Array, Array]:
  """Faithful-dropout scoring: one gradient per consecutive group of `group_size`.

  Every group is decoded in train mode (dropout on) with the same key, mirroring
  upstream's `torch.manual_seed(0)` at each forward call. Returns group objective
  values `[G]` and gradients `[G,L,H]`, `[G,L,F]`.
  """
  (hs, fs) = mask_shapes(model.config)
  ones_h, ones_f = jnp.ones(hs, jnp.float32), jnp.ones(fs, jnp.float32)
  b = weights.shape[0]
  groups = b // group_size
  regroup = lambda a: a.reshape((groups, group_size) + a.shape[1:])

  def one(group, w):
    return jax.value_and_grad(
        lambda h, f: max_logit_objective(model, params, group, h, f, w, t_star=t_star,
                                         bos_index=bos_index, train=True, rng=rng),
        argnums=(0, 1))(ones_h, ones_f)

  values, (gh, gf) = jax.vmap(one)(jax.tree.map(regroup, dict(inputs)), regroup(weights))
  return values, gh, gf


def make_grads_fn(model: TAP, mesh: Mesh, *, t_star: int, bos_index: int,
                  dropout: bool = False, group_size: int = 8) -> Callable[..., tuple]:
  """Jitted `(params, batch, weights, rng) -> (values, head_grads, ffn_grads)`.

  Per-sample gradients (leading axis B) with dropout off; group gradients (leading
  axis B / group_size) with `dropout=True`. The batch is sharded on `data`.
  """
  check_t_star(t_star, model.config.decode_steps)
  if dropout:
    def fn(params, batch, weights, rng):
      return group_mask_grads(model, params, batch, weights, rng, t_star=t_star,
                              bos_index=bos_index, group_size=group_size)
  else:
    def fn(params, batch, weights, rng):
      del rng
      return per_sample_mask_grads(model, params, batch, weights, t_star=t_star,
                                   bos_index=bos_index)
  rep, data = parallel.replicated(mesh), parallel.data_sharded(mesh)
  return jax.jit(fn, in_shardings=(rep, data, data, rep), out_shardings=rep)


# -------------------------------------------------------------------- accumulation


@dataclasses.dataclass
class Importance:
  """Importance scores of heads `[L, H]` and neurons `[L, F]` (float64).

  Attributes:
    head, ffn: faithful per-batch scores sum_b G_b^2 (groups of `group_size`
      consecutive samples in `question_ids` order).
    head_per_sample, ffn_per_sample: sum_i g_i^2 (None with faithful dropout).
    t_star: the decoding step scored.
    group_size: samples per faithful batch.
    num_samples: samples scored.
    question_ids: the samples in scoring order (the recorded permutation).
  """
  head: np.ndarray
  ffn: np.ndarray
  head_per_sample: np.ndarray | None
  ffn_per_sample: np.ndarray | None
  t_star: int
  group_size: int
  num_samples: int
  question_ids: np.ndarray

  def scores(self, per_sample: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(head, ffn) of the chosen variant."""
    if per_sample:
      if self.head_per_sample is None:
        raise ValueError("per-sample importance is not available with faithful "
                         "(dropout-on) scoring; use the per-batch scores.")
      return self.head_per_sample, self.ffn_per_sample
    return self.head, self.ffn

  def save(self, path: str) -> None:
    """Writes an `.npz` atomically."""
    arrays = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
    atomic.savez(path, **{k: np.asarray(v) for k, v in arrays.items()})

  @classmethod
  def load(cls, path: str) -> Importance:
    with np.load(path) as d:
      get = lambda k: d[k] if k in d else None
      return cls(head=d["head"], ffn=d["ffn"], head_per_sample=get("head_per_sample"),
                 ffn_per_sample=get("ffn_per_sample"), t_star=int(d["t_star"]),
                 group_size=int(d["group_size"]), num_samples=int(d["num_samples"]),
                 question_ids=d["question_ids"])


class ImportanceAccumulator:
  """Streams gradients into float64 importance sums (LFPR.md §3.2-3.3).

  Feed samples in the recorded order: `add_samples` with per-sample gradients (groups
  of `group_size` consecutive samples form the faithful batches; a group may span two
  calls), or `add_groups` with group gradients (faithful dropout).
  """

  def __init__(self, head_shape: tuple[int, int], ffn_shape: tuple[int, int], *,
               group_size: int = 8):
    if group_size < 1:
      raise ValueError(f"group_size must be >= 1, got {group_size}.")
    self.group_size = group_size
    self.head = np.zeros(head_shape, np.float64)
    self.ffn = np.zeros(ffn_shape, np.float64)
    self.head_ps: np.ndarray | None = np.zeros(head_shape, np.float64)
    self.ffn_ps: np.ndarray | None = np.zeros(ffn_shape, np.float64)
    self._open_h = np.zeros(head_shape, np.float64)  # the unfinished group
    self._open_f = np.zeros(ffn_shape, np.float64)
    self._open_n = 0
    self.num_samples = 0
    self.question_ids: list[int] = []

  def add_samples(self, head_grads: np.ndarray, ffn_grads: np.ndarray,
                  question_ids: np.ndarray) -> None:
    gh = np.asarray(head_grads, np.float64)
    gf = np.asarray(ffn_grads, np.float64)
    self.head_ps += np.einsum("bij,bij->ij", gh, gh)
    self.ffn_ps += np.einsum("bij,bij->ij", gf, gf)
    for i in range(gh.shape[0]):
      self._open_h += gh[i]
      self._open_f += gf[i]
      self._open_n += 1
      if self._open_n == self.group_size:
        self._close_group()
    self.num_samples += gh.shape[0]
    self.question_ids.extend(int(q) for q in np.asarray(question_ids).reshape(-1))

  def add_groups(self, head_grads: np.ndarray, ffn_grads: np.ndarray,
                 question_ids: np.ndarray) -> None:
    gh = np.asarray(head_grads, np.float64)
    gf = np.asarray(ffn_grads, np.float64)
    self.head += np.einsum("bij,bij->ij", gh, gh)
    self.ffn += np.einsum("bij,bij->ij", gf, gf)
    self.head_ps = self.ffn_ps = None
    ids = np.asarray(question_ids).reshape(-1)
    self.num_samples += ids.size
    self.question_ids.extend(int(q) for q in ids)

  def _close_group(self) -> None:
    self.head += self._open_h ** 2
    self.ffn += self._open_f ** 2
    self._open_h[:] = 0
    self._open_f[:] = 0
    self._open_n = 0

  def result(self, t_star: int) -> Importance:
    """The scores; a final partial group counts as one (smaller) batch."""
    if self._open_n:
      self._close_group()
    check_importance(self.head, self.ffn)
    return Importance(head=self.head.copy(), ffn=self.ffn.copy(),
                      head_per_sample=None if self.head_ps is None else self.head_ps.copy(),
                      ffn_per_sample=None if self.ffn_ps is None else self.ffn_ps.copy(),
                      t_star=int(t_star), group_size=self.group_size,
                      num_samples=self.num_samples,
                      question_ids=np.asarray(self.question_ids, np.int64))


def check_importance(head: np.ndarray, ffn: np.ndarray) -> None:
  """Importances must be finite and not all zero (else nothing can be ranked)."""
  for name, a in (("head", head), ("ffn", ffn)):
    if not np.all(np.isfinite(a)):
      raise ValueError(f"{name} importances are not finite "
                       f"({int(np.sum(~np.isfinite(a)))} non-finite entries).")
  if not (np.any(head) or np.any(ffn)):
    raise ValueError("all importances are zero: the mask gradients vanished (is t* a "
                     "step where every sample has already stopped decoding?).")
