r"""The one streaming loop that scores heads and FFN neurons with any criterion.

`compute(criterion, model, params, batches, ...)` runs a criterion of
`lfpr_jax.pruning.criteria` over global batches (docs/LFPR.md §3, §8): it jits the
criterion's pure gradient function with the batch sharded on `data`, brings the
gradients, weights and question ids to the host, drops padding rows and groups, and
streams everything into one `Accumulator`:

* per-sample gradients g_i (LFPR without dropout) are summed over consecutive groups of
  `group_size` samples in the recorded order into the faithful batch gradients G_b
  (a group may span two batches; a final partial group counts as one smaller batch),
  and the per-sample score Σ_i g_i² is accumulated alongside (docs/LFPR.md §3.2-3.3);
* group gradients G_b (LFPR with faithful dropout, the labelled criteria) are taken as
  they are.

From the G_b the accumulator keeps Σ_b G_b² and Σ_b |G_b| in float64 and, with
`keep_batches`, every G_b (float32; Kwon's rearrangement needs them). The criterion's
`reduction` picks one sum and its `postprocess` gives the final `Scores`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from lfpr_jax import atomic
from lfpr_jax.models import trim
from lfpr_jax.models.batch import select
from lfpr_jax.pruning import criteria
from lfpr_jax.pruning.selection import check_importances
from lfpr_jax.training import parallel

PyTree = Any


# ------------------------------------------------------------------------ results


@dataclasses.dataclass
class Scores:
  """Importance scores of one criterion, in the shapes selection and Kwon take.

  Attributes:
    criterion: the criterion's name.
    head, ffn: final scores `[L, H]`, `[L, F]` (float64; LFPR: the faithful per-batch
      scores Σ_b G_b²; `alg`: post-processed).
    head_grads, ffn_grads: the batch gradients G_b `[num_batches, L, H]`,
      `[num_batches, L, F]` (float32), None for `l1` or when not kept.
    head_per_sample, ffn_per_sample: Σ_i g_i² (LFPR without dropout only, else None).
    num_samples: samples scored (0 for `l1`).
    question_ids: `[num_samples]` the samples in scoring order (the recorded
      permutation; empty for `l1`).
    meta: the criterion's options (`t_star`, `dropout` for LFPR; the normalisations
      for `alg`) and `group_size` (JSON-able).
  """

  criterion: str
  head: np.ndarray
  ffn: np.ndarray
  head_grads: Optional[np.ndarray] = None
  ffn_grads: Optional[np.ndarray] = None
  head_per_sample: Optional[np.ndarray] = None
  ffn_per_sample: Optional[np.ndarray] = None
  num_samples: int = 0
  question_ids: np.ndarray = dataclasses.field(
      default_factory=lambda: np.zeros(0, np.int64))
  meta: dict = dataclasses.field(default_factory=dict)

  @property
  def num_batches(self) -> int:
    return 0 if self.head_grads is None else int(self.head_grads.shape[0])

  @property
  def t_star(self) -> Optional[int]:
    """The scored decoding step (LFPR), else None."""
    return self.meta.get("t_star")

  def scores(self, per_sample: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(head, ffn) of the chosen variant: per batch (default) or per sample."""
    if per_sample:
      if self.head_per_sample is None:
        raise ValueError("per-sample importance is not available with faithful "
                         "(dropout-on) scoring or a non-LFPR criterion; use the "
                         "per-batch scores.")
      return self.head_per_sample, self.ffn_per_sample
    return self.head, self.ffn

  def save(self, path: str) -> None:
    """Writes an `.npz` atomically (None fields are left out)."""
    arrays = {"head": self.head, "ffn": self.ffn, "question_ids": self.question_ids,
              "meta": np.asarray(json.dumps({"criterion": self.criterion,
                                             "num_samples": self.num_samples,
                                             "meta": self.meta}))}
    for k in ("head_grads", "ffn_grads", "head_per_sample", "ffn_per_sample"):
      if getattr(self, k) is not None:
        arrays[k] = getattr(self, k)
    atomic.savez(path, **{k: np.asarray(v) for k, v in arrays.items()})

  @classmethod
  def load(cls, path: str) -> Scores:
    with np.load(path) as d:
      meta = json.loads(str(d["meta"]))
      get = lambda k: d[k] if k in d else None
      return cls(criterion=meta["criterion"], head=d["head"], ffn=d["ffn"],
                 head_grads=get("head_grads"), ffn_grads=get("ffn_grads"),
                 head_per_sample=get("head_per_sample"),
                 ffn_per_sample=get("ffn_per_sample"),
                 num_samples=int(meta["num_samples"]), question_ids=d["question_ids"],
                 meta=meta["meta"])


# -------------------------------------------------------------------- accumulation


class Accumulator:
  """Streams mask gradients into float64 Σ_b G_b², Σ_b |G_b| (docs/LFPR.md §3.2-3.3, §8).

  Feed samples in the recorded order: `add_samples` with per-sample gradients g_i
  (groups of `group_size` consecutive samples form the batches G_b; a group may span
  two calls; Σ_i g_i² is kept too), or `add_groups` with batch gradients G_b.
  """

  def __init__(self, head_shape: tuple[int, int], ffn_shape: tuple[int, int], *,
               group_size: int = 8, keep_batches: bool = True):
    if group_size < 1:
      raise ValueError(f"group_size must be >= 1, got {group_size}.")
    self.head_shape, self.ffn_shape = tuple(head_shape), tuple(ffn_shape)
    self.group_size = group_size
    self.keep_batches = keep_batches
    self.sq_head = np.zeros(head_shape, np.float64)
    self.sq_ffn = np.zeros(ffn_shape, np.float64)
    self.abs_head = np.zeros(head_shape, np.float64)
    self.abs_ffn = np.zeros(ffn_shape, np.float64)
    # Σ_i g_i²: None once batch gradients were added (no per-sample view of them).
    self.head_ps: Optional[np.ndarray] = np.zeros(head_shape, np.float64)
    self.ffn_ps: Optional[np.ndarray] = np.zeros(ffn_shape, np.float64)
    self._open_h = np.zeros(head_shape, np.float64)  # the unfinished group
    self._open_f = np.zeros(ffn_shape, np.float64)
    self._open_n = 0
    self._batches_h: list[np.ndarray] = []
    self._batches_f: list[np.ndarray] = []
    self.num_batches = 0
    self.num_samples = 0
    self.question_ids: list[int] = []

  def _check(self, gh: np.ndarray, gf: np.ndarray) -> None:
    if gh.shape[1:] != self.head_shape or gf.shape[1:] != self.ffn_shape:
      raise ValueError(f"gradients {gh.shape} / {gf.shape} do not stack onto "
                       f"{self.head_shape} / {self.ffn_shape}.")
    if gh.shape[0] != gf.shape[0]:
      raise ValueError(f"{gh.shape[0]} head but {gf.shape[0]} neuron gradients.")

  def _add_batches(self, gh: np.ndarray, gf: np.ndarray) -> None:
    """Adds batch gradients `[G, L, H]`, `[G, L, F]` (float64) to the sums."""
    self.sq_head += np.einsum("bij,bij->ij", gh, gh)
    self.sq_ffn += np.einsum("bij,bij->ij", gf, gf)
    self.abs_head += np.abs(gh).sum(0)
    self.abs_ffn += np.abs(gf).sum(0)
    if self.keep_batches:
      self._batches_h.extend(gh.astype(np.float32))
      self._batches_f.extend(gf.astype(np.float32))
    self.num_batches += gh.shape[0]

  def _close_group(self) -> None:
    self._add_batches(self._open_h[None], self._open_f[None])
    self._open_h = np.zeros(self.head_shape, np.float64)
    self._open_f = np.zeros(self.ffn_shape, np.float64)
    self._open_n = 0

  def add_samples(self, head_grads: Any, ffn_grads: Any, question_ids: Any) -> None:
    """Per-sample gradients `[N, L, H]`, `[N, L, F]` of the samples `question_ids`."""
    gh = np.asarray(head_grads, np.float64)
    gf = np.asarray(ffn_grads, np.float64)
    self._check(gh, gf)
    if self.head_ps is None:
      raise ValueError("per-sample gradients cannot follow batch gradients.")
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

  def add_groups(self, head_grads: Any, ffn_grads: Any, question_ids: Any) -> None:
    """Batch gradients `[G, L, H]`, `[G, L, F]` of the samples `question_ids`."""
    gh = np.asarray(head_grads, np.float64)
    gf = np.asarray(ffn_grads, np.float64)
    self._check(gh, gf)
    if self._open_n:
      raise ValueError("batch gradients cannot follow an unfinished sample group.")
    self._add_batches(gh, gf)
    self.head_ps = self.ffn_ps = None
    ids = np.asarray(question_ids).reshape(-1)
    self.num_samples += ids.size
    self.question_ids.extend(int(q) for q in ids)

  def result(self, criterion: criteria.Criterion, *, meta: Optional[dict] = None
             ) -> Scores:
    """The criterion's scores; closes a final partial group as one smaller batch.

    Raises:
      ValueError: the scores are not finite or all zero (nothing to rank).
    """
    if self._open_n:
      self._close_group()
    if criterion.reduction == "square":
      head, ffn = self.sq_head.copy(), self.sq_ffn.copy()
    elif criterion.reduction == "abs":
      head, ffn = self.abs_head.copy(), self.abs_ffn.copy()
    else:
      raise ValueError(f"criterion {criterion.name!r} is not gradient based "
                       f"(reduction {criterion.reduction!r}).")
    head, ffn = criterion.postprocess(head, ffn)
    check_importances(head, ffn)
    bh, bf = self.batch_grads()
    per_sample = self.head_ps is not None and self.num_samples > 0
    return Scores(criterion.name, head, ffn, bh, bf,
                  head_per_sample=self.head_ps.copy() if per_sample else None,
                  ffn_per_sample=self.ffn_ps.copy() if per_sample else None,
                  num_samples=self.num_samples,
                  question_ids=np.asarray(self.question_ids, np.int64),
                  meta={**criterion.options(), "group_size": self.group_size,
                        **(meta or {})})

  def batch_grads(self) -> tuple[Optional[np.ndarray], Optional[np.ndarray]]:
    """The kept G_b in closing order, `[num_batches, L, H]`, `[num_batches, L, F]`."""
    if not self.keep_batches:
      return None, None
    if not self._batches_h:
      return (np.zeros((0,) + self.head_shape, np.float32),
              np.zeros((0,) + self.ffn_shape, np.float32))
    return np.stack(self._batches_h), np.stack(self._batches_f)


# ---------------------------------------------------------------------------- loop


def _jit(fn, mesh: Optional[Mesh], num_args: int, *, data_args: tuple[int, ...]):
  """`fn` jitted with `data_args` sharded on `data`, the rest and outputs replicated."""
  if mesh is None:
    return jax.jit(fn)
  rep, data = parallel.replicated(mesh), parallel.data_sharded(mesh)
  return jax.jit(fn, in_shardings=tuple(data if i in data_args else rep
                                        for i in range(num_args)),
                 out_shardings=rep)


def make_grads_fn(criterion: criteria.Criterion, model: Any, mesh: Optional[Mesh], *,
                  group_size: int = 8):
  """The criterion's gradient function, jitted: `(params, batch, rng) -> (gh, gf)`.

  `batch` holds the criterion's `fields` and `weight` `[B]`, sharded on `data` (with a
  mesh); the gradients (`[B, L, H]`, `[B, L, F]` per sample or `[B / group_size, ...]`
  per group, see `criterion.per_sample`) come back replicated.
  """
  return _jit(criterion.grads_fn(model, group_size=group_size), mesh, 3,
              data_args=(1,))


def compute(criterion: Union[str, criteria.Criterion], model: Any, params: PyTree,
            batches: Optional[Iterable[Mapping[str, Any]]] = None, *,
            mesh: Optional[Mesh] = None, group_size: int = 8, seed: int = 0,
            keep_batch_grads: bool = True, trimmed: bool = False,
            **options: Any) -> Scores:
  r"""Scores every head and neuron of the unpruned `model` with one criterion.

  Args:
    criterion: a name of `criteria.CRITERIA` (built with `options`) or a Criterion.
    model, params: the unpruned TAP and its (replicated) parameters.
    batches: global batches, e.g. from `training.parallel.global_batches` (not needed for
      `l1`): mappings of batch-first arrays holding the criterion's `fields`,
      `weight` `[B]` (0 on padding rows; default all ones) and `question_id` `[B]`
      (default: a running count); the labelled criteria also need `has_answers`.
      B must be a multiple of `group_size`.
    mesh: the mesh the batches are sharded on (`data` axis); None: unsharded.
    group_size: samples per batch gradient G_b (LFPR and the baselines: 8).
    seed: the dropout key of LFPR's faithful (dropout-on) scoring.
    keep_batch_grads: keep the G_b in the result (Kwon's rearrangement).
    trimmed: the batches are `(global batch, trimmed config, TrimInfo)` triples of
      `parallel.trimmed_global_batches` (exact variable-length execution,
      `lfpr_jax.models.trim`): each runs with the model of its trimmed config, one
      jitted program per shape. The mask gradients do not depend on the trimming in
      eval mode (dropout off); with LFPR's faithful dropout the masks are drawn for
      other shapes, an equally distributed but different draw. The batch composition
      is the caller's (the faithful per-batch score needs upstream's).
    options: the criterion's options (`lfpr`: t_star, bos_index, dropout; `alg`:
      normalize_by_layer, normalize_ffn_by_layer, global_minmax).

  Returns:
    The Scores.

  Raises:
    UndefinedCriterionError: `owo`.
    ValueError: unknown criterion or option, missing arguments or fields, a batch that
      is not a multiple of `group_size`, or a labelled criterion on a batch without
      answers (raised before that batch's gradients).
  """
  crit = criteria.get_criterion(criterion, **options)
  crit.require_defined()
  hs, fs = criteria.mask_shapes(model.config)
  if not crit.needs_data:
    head, ffn = crit.weights_only(params, model.config)
    return Scores(crit.name, head, ffn, meta=crit.options())
  if batches is None:
    raise ValueError(f"criterion {crit.name!r} scores from data: pass batches.")
  # One jitted gradient function per (trimmed) config.
  grads_for = trim.PerShape(lambda config: make_grads_fn(
      crit, model.clone(config=config), mesh, group_size=group_size))

  def scoring_config(config, rows):
    # Packed row counts (`TapConfig.pack_rows`) are the whole batch's; the criteria
    # run the model per sample or per group (vmapped), which would gather that many
    # rows for each: pack only a batch that is one group.
    if crit.per_sample or rows != group_size:
      return trim.unpacked(config)
    return config
  grads_for(model.config)   # the criterion's own checks, before any batch is read
  # Weights, ids and answer flags to the host (all processes see the global rows).
  host_fields = ("weight", "question_id") + (("has_answers",) if crit.needs_labels
                                             else ())
  fetch = _jit(lambda b: b, mesh, 1, data_args=(0,))
  acc = Accumulator(hs, fs, group_size=group_size, keep_batches=keep_batch_grads)
  rng = jax.random.key(seed)
  next_id = 0
  for i, item in enumerate(batches):
    batch, config = (item[0], item[1]) if trimmed else (item, model.config)
    batch = dict(batch)
    n = np.shape(batch["cmb_text"])[0]
    if n % group_size:
      raise ValueError(f"the scoring batch of {n} rows is not a multiple of "
                       f"group_size {group_size}.")
    if "weight" not in batch:
      batch["weight"] = jnp.ones((n,), jnp.float32)
    if "question_id" not in batch:
      batch["question_id"] = jnp.arange(next_id, next_id + n, dtype=jnp.int32)
      next_id += n
    missing = [k for k in crit.fields + host_fields if k not in batch]
    if missing:
      raise ValueError(f"criterion {crit.name!r} needs batches with {missing}"
                       + (" (ground-truth teacher forcing, loss targets and answer "
                          "flags)." if crit.needs_labels else "."))
    host = {k: np.asarray(v) for k, v in fetch({k: batch[k]
                                                for k in host_fields}).items()}
    w, q = host["weight"], host["question_id"]
    if crit.needs_labels:
      criteria.check_labels(crit, host["has_answers"], weight=w, what=f"batch {i}")
    gh, gf = (np.asarray(x) for x in grads_for(scoring_config(config, n))(
        params, select(batch, crit.fields + ("weight",)), rng))
    if crit.per_sample:
      keep = w > 0
      acc.add_samples(gh[keep], gf[keep], q[keep])
    else:
      groups = w.reshape(-1, group_size).sum(1) > 0   # all-padding groups are no batches
      acc.add_groups(gh[groups], gf[groups], q[w > 0])
  return acc.result(crit)
