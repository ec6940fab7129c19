r"""Importance criteria of MMT heads and FFN neurons behind one interface (LFPR.md §8).

Every criterion scores the same units, the head masks ξ `[L, H]` and neuron masks ν
`[L, F]` of the unpruned model, so its scores feed the same selection
(`lfpr_jax.pruning.selection`) and surgery (`lfpr_jax.pruning.surgery`) code:

| name     | labels | data | score of unit u |
| -------- | ------ | ---- | --------------- |
| `lfpr`   | no     | yes  | Σ_b (∂ Σ_i max_c s_i[t\*, c] / ∂m_u)²: LFPR's label-free score (`importance.py`) |
| `l1`     | no     | no   | weight L1 norms (§8.2 (a)) |
| `alg`    | yes    | yes  | Σ_b abs(∂L_b/∂m_u), heads divided by their layer's L2 norm (Michel et al., §8.3) |
| `fisher` | yes    | yes  | Σ_b (∂L_b/∂m_u)² (Kwon et al., §8.4) |
| `owo`    | ?      | ?    | undefined (§8.5): raises `UndefinedCriterionError` |

The labelled criteria use the M4C decoding BCE with the ground-truth `targets`, eval
mode (no dropout) and teacher forcing on the ground-truth `train_prev_inds`; L_b is the
loss of one batch of `group_size` samples, normalised by its supervised steps (the
upstream loss; §8.1). `check_labels` refuses data without answers before any gradient
is computed.

Per-batch gradients are kept (`CriterionScores.head_grads` `[num_batches, L, H]`,
`ffn_grads` `[num_batches, L, F]`): Kwon's mask rearrangement (`lfpr_jax.pruning.kwon`) works on
them, for any gradient criterion (LFPR's label-free batches included).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from lfpr_jax import atomic
from lfpr_jax.pruning import scoring as importance
from lfpr_jax.training import parallel
from lfpr_jax.models.batch import MODEL_INPUTS, STEP_FIELDS
from lfpr_jax.models.losses import m4c_decoding_bce
from lfpr_jax.models.config import TapConfig
from lfpr_jax.models.tap import TAP

PyTree = Any
Array = jax.Array

CRITERIA = ("lfpr", "l1", "alg", "fisher", "owo")

# Model inputs of the label-free score (greedy decoding reads no decoder inputs).
# What a labelled criterion reads: teacher-forcing inputs and the loss targets.
QKV = ("query", "key", "value")


class UndefinedCriterionError(NotImplementedError, ValueError):
  """A criterion that has a named slot but no known definition (OWO)."""


# ------------------------------------------------------------------------ registry


@dataclasses.dataclass(frozen=True)
class Criterion:
  """One importance criterion.

  Attributes:
    name: registry name.
    needs_labels: scores from a loss on ground-truth answers (refuses unlabelled data).
    needs_data: scores from data (False: from the weights alone).
    reduction: how per-batch mask gradients G_b are accumulated: "square" (Σ_b G_b²),
      "abs" (Σ_b |G_b|) or None (not gradient based).
    description: one line for reports.
    defined: False for a named slot without a definition (calling it raises).
  """

  name: str
  needs_labels: bool
  needs_data: bool
  reduction: Optional[str]
  description: str
  defined: bool = True

  def require_defined(self) -> None:
    """Raises `UndefinedCriterionError` for a criterion without a definition."""
    if not self.defined:
      raise UndefinedCriterionError(
          f"importance criterion {self.name!r} is not defined: the paper's table names "
          "OWO, but the acronym is not expanded anywhere reachable (README, code "
          "history, abstract; LFPR.md §8.5), so no formula is implemented. Use one of "
          f"{', '.join(n for n in CRITERIA if _REGISTRY[n].defined)}, and report OWO's "
          "table values as external numbers.")


_REGISTRY = {
    "lfpr": Criterion("lfpr", needs_labels=False, needs_data=True, reduction="square",
                      description="LFPR label-free score: squared per-batch gradient "
                      "of the summed max logit at step t*"),
    "l1": Criterion("l1", needs_labels=False, needs_data=False, reduction=None,
                    description="weight magnitudes: L1 norms of a head's Q/K/V rows "
                    "and output columns, of a neuron's W1 row and W2 column"),
    "alg": Criterion("alg", needs_labels=True, needs_data=True, reduction="abs",
                     description="absolute loss gradient (Michel et al. 2019): "
                     "sum of |dL_b/dm| over batches, heads normalised per layer"),
    "fisher": Criterion("fisher", needs_labels=True, needs_data=True,
                        reduction="square", description="empirical Fisher (Kwon et al. "
                        "2022): sum of (dL_b/dm)^2 over batches"),
    "owo": Criterion("owo", needs_labels=False, needs_data=True, reduction=None,
                     description="OWO: undefined (LFPR.md §8.5)", defined=False),
}
assert tuple(_REGISTRY) == CRITERIA


def get_criterion(name: Union[str, Criterion]) -> Criterion:
  """The registered criterion `name`.

  Raises:
    ValueError: an unknown name (the message lists the valid ones). A known but
      undefined criterion (`owo`) is returned; using it raises.
  """
  if isinstance(name, Criterion):
    return name
  if not isinstance(name, str) or name not in _REGISTRY:
    raise ValueError(f"unknown importance criterion {name!r}; valid criteria: "
                     f"{', '.join(CRITERIA)}.")
  return _REGISTRY[name]


# --------------------------------------------------------------------- label check


def _host(x: Any) -> np.ndarray:
  """A host copy of x (this process's rows of a globally sharded array)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
    return np.concatenate([np.asarray(s.data) for s in shards])
  return np.asarray(x)


def check_labels(criterion: Union[str, Criterion], has_answers: Any, *,
                 weight: Any = None, what: str = "the data") -> None:
  """Refuses labelled criteria on data without ground-truth answers.

  Call it before any work: with the dataset's flag (a bool), the first example or
  batch (a mapping with `has_answers`, and `weight` = 0 on padding rows), or an array
  of `has_answers` flags. `compute_scores` checks every batch before its gradients.

  Args:
    criterion: name or Criterion; label-free criteria always pass.
    has_answers: bool, array of flags, or a mapping holding `has_answers`.
    weight: optional per-row weights; rows with weight 0 (padding) are not checked.
    what: how to name the data in the error.

  Raises:
    ValueError: the criterion needs labels and some (real) example has none, or a
      mapping has no `has_answers` field.
  """
  crit = get_criterion(criterion)
  if not crit.needs_labels:
    return
  if isinstance(has_answers, Mapping):
    if "has_answers" not in has_answers:
      raise ValueError(
          f"criterion {crit.name!r} needs ground-truth answers, but {what} has no "
          "'has_answers' field to tell labelled examples (batches of the data "
          "pipeline carry it).")
    if weight is None:
      weight = has_answers.get("weight")
    has_answers = has_answers["has_answers"]
  flags = _host(has_answers).astype(bool).reshape(-1)
  if weight is not None:
    flags = flags[_host(weight).reshape(-1) > 0]
  missing = int(np.sum(~flags))
  if missing:
    raise ValueError(
        f"criterion {crit.name!r} needs ground-truth answers (a labelled loss), but "
        f"{missing} of {flags.size} examples of {what} have none (has_answers is "
        "False, e.g. a test split); use a split with answers or a label-free criterion "
        f"({', '.join(n for n in CRITERIA if not _REGISTRY[n].needs_labels and _REGISTRY[n].defined)}).")


# --------------------------------------------------------------------------- l1


def l1_scores(params: PyTree, config: TapConfig) -> tuple[np.ndarray, np.ndarray]:
  """Weight-magnitude scores (LFPR.md §8.2 (a)), float64 `[L, H]` and `[L, F]`.

  In PyTorch's `[out, in]` layout head h owns rows 64h … 64h+63 of W_Q, W_K, W_V and
  the same columns of W_O; its score sums the L1 norms of those rows and columns. In
  the Flax layout the rows of W_Q are `query/kernel[:, h, k]` (`[d, h, dh]`) and the
  columns of W_O are `out/kernel[h, k, :]` (`[h, dh, d]`). Neuron n:
  ‖W1[n, :]‖₁ + ‖W2[:, n]‖₁ = Σ|`wi/kernel[:, n]`| + Σ|`wo/kernel[n, :]`|. Weights
  only: no biases, no learnable masks. Needs no data.
  """
  (num_layers, h), (_, f) = importance.mask_shapes(config)
  head = np.zeros((num_layers, h), np.float64)
  ffn = np.zeros((num_layers, f), np.float64)
  for i in range(num_layers):
    layer = params[f"mmt_layer_{i}"]
    attn, mlp = layer["attention"], layer["ffn"]
    if h:
      for n in QKV:
        head[i] += np.abs(np.asarray(attn[n]["kernel"], np.float64)).sum(axis=(0, 2))
      head[i] += np.abs(np.asarray(attn["out"]["kernel"], np.float64)).sum(axis=(1, 2))
    if f:
      ffn[i] = (np.abs(np.asarray(mlp["wi"]["kernel"], np.float64)).sum(axis=0)
                + np.abs(np.asarray(mlp["wo"]["kernel"], np.float64)).sum(axis=1))
  return head, ffn


# ------------------------------------------------------------- labelled gradients


def labelled_loss(model: TAP, params: PyTree, batch: Mapping[str, Array],
                  head_mask: Array, ffn_mask: Array) -> Array:
  """M4C decoding BCE of teacher-forced eval-mode scores with the given masks.

  `batch` holds the model inputs with the ground-truth `train_prev_inds`, `targets`
  and `train_loss_mask`; an optional `weight` (0 on padding rows) multiplies the loss
  mask, so padding rows neither add loss nor count as supervised steps.
  """
  scores = model.apply({"params": params}, dict(batch), train=False,
                       head_mask=head_mask, ffn_mask=ffn_mask)
  loss_mask = batch["train_loss_mask"]
  if "weight" in batch:
    loss_mask = loss_mask * batch["weight"][:, None]
  return m4c_decoding_bce(scores, batch["targets"], loss_mask)


def loss_mask_grads(model: TAP, params: PyTree, batch: Mapping[str, Array]
                    ) -> tuple[Array, Array]:
  """Per-batch gradients of the labelled loss w.r.t. the masks at ones (pure, jittable).

  Returns:
    `(head_grads [L, H], ffn_grads [L, F])` = ∂L_b/∂ξ, ∂L_b/∂ν at ξ = ν = 1.
  """
  hs, fs = importance.mask_shapes(model.config)
  return jax.grad(lambda h, f: labelled_loss(model, params, batch, h, f),
                  argnums=(0, 1))(jnp.ones(hs, jnp.float32), jnp.ones(fs, jnp.float32))


def group_loss_mask_grads(model: TAP, params: PyTree, batch: Mapping[str, Array], *,
                          group_size: int) -> tuple[Array, Array]:
  """`loss_mask_grads` of every consecutive group of `group_size` rows (vmapped).

  Returns:
    `([G, L, H], [G, L, F])`, G = B / group_size: one loss (normalised by its own
    supervised steps) and one gradient per group.
  """
  b = batch["targets"].shape[0]
  if group_size < 1 or b % group_size:
    raise ValueError(f"the batch of {b} rows is not a multiple of group_size "
                     f"{group_size}.")
  regroup = lambda a: a.reshape((b // group_size, group_size) + a.shape[1:])
  groups = {k: regroup(v) for k, v in batch.items()}
  return jax.vmap(lambda g: loss_mask_grads(model, params, g))(groups)


@functools.lru_cache(maxsize=16)
def make_loss_grads_fn(model: TAP, *, group_size: int, mesh: Optional[Any] = None
                       ) -> Callable[[PyTree, Mapping[str, Array]], tuple]:
  """Jitted `(params, batch) -> (head_grads [G,L,H], ffn_grads [G,L,F], rows [G])`.

  `rows` counts the real (weight > 0) rows of each group. With a mesh the batch is
  sharded on `data` and the outputs replicated. Cached per (model, group_size, mesh),
  so repeated scoring (alg and fisher of one model) compiles once.
  """
  def fn(params, batch):
    batch = {k: batch[k] for k in STEP_FIELDS + ("weight",)}
    gh, gf = group_loss_mask_grads(model, params, batch, group_size=group_size)
    rows = (batch["weight"] > 0).reshape(-1, group_size).sum(1)
    return gh, gf, rows
  if mesh is None:
    return jax.jit(fn)
  return jax.jit(fn, in_shardings=(parallel.replicated(mesh), parallel.data_sharded(mesh)),
                 out_shardings=parallel.replicated(mesh))


# ------------------------------------------------------------------- accumulation


class GradientAccumulator:
  """Streams per-batch mask gradients G_b into float64 Σ_b|G_b| and Σ_b G_b².

  `add` takes a stack of batch gradients `[G, L, H]`, `[G, L, F]`; with
  `keep_batches` they are also kept (float32) for `batch_grads` (Kwon's
  rearrangement needs every G_b).
  """

  def __init__(self, head_shape: tuple[int, int], ffn_shape: tuple[int, int], *,
               keep_batches: bool = True):
    self.head_shape, self.ffn_shape = tuple(head_shape), tuple(ffn_shape)
    self.abs_head = np.zeros(head_shape, np.float64)
    self.abs_ffn = np.zeros(ffn_shape, np.float64)
    self.sq_head = np.zeros(head_shape, np.float64)
    self.sq_ffn = np.zeros(ffn_shape, np.float64)
    self.keep_batches = keep_batches
    self._batches_h: list[np.ndarray] = []
    self._batches_f: list[np.ndarray] = []
    self.num_batches = 0
    self.num_samples = 0

  def add(self, head_grads: Any, ffn_grads: Any, *, num_samples: int = 0) -> None:
    gh = np.asarray(head_grads, np.float64)
    gf = np.asarray(ffn_grads, np.float64)
    if gh.shape[1:] != self.head_shape or gf.shape[1:] != self.ffn_shape:
      raise ValueError(f"batch gradients {gh.shape} / {gf.shape} do not stack onto "
                       f"{self.head_shape} / {self.ffn_shape}.")
    if gh.shape[0] != gf.shape[0]:
      raise ValueError(f"{gh.shape[0]} head but {gf.shape[0]} neuron batch gradients.")
    self.abs_head += np.abs(gh).sum(0)
    self.abs_ffn += np.abs(gf).sum(0)
    self.sq_head += np.einsum("bij,bij->ij", gh, gh)
    self.sq_ffn += np.einsum("bij,bij->ij", gf, gf)
    if self.keep_batches:
      self._batches_h.extend(gh.astype(np.float32))
      self._batches_f.extend(gf.astype(np.float32))
    self.num_batches += gh.shape[0]
    self.num_samples += int(num_samples)

  def scores(self, reduction: str) -> tuple[np.ndarray, np.ndarray]:
    """(Σ|G|, Σ|G|) for "abs", (ΣG², ΣG²) for "square" (copies)."""
    if reduction == "abs":
      return self.abs_head.copy(), self.abs_ffn.copy()
    if reduction == "square":
      return self.sq_head.copy(), self.sq_ffn.copy()
    raise ValueError(f"reduction must be 'abs' or 'square', got {reduction!r}.")

  def batch_grads(self) -> tuple[Optional[np.ndarray], Optional[np.ndarray]]:
    """The kept G_b, `[num_batches, L, H]` and `[num_batches, L, F]` (None if not kept)."""
    if not self.keep_batches:
      return None, None
    if not self._batches_h:
      return (np.zeros((0,) + self.head_shape, np.float32),
              np.zeros((0,) + self.ffn_shape, np.float32))
    return np.stack(self._batches_h), np.stack(self._batches_f)


class RecordingImportanceAccumulator(importance.ImportanceAccumulator):
  """LFPR's accumulator that also keeps every faithful batch gradient G_b (float32).

  Same scores as `importance.ImportanceAccumulator` (LFPR.md §3.2-3.3); `batch_grads`
  returns the per-batch gradients in closing order (the last, partial group included
  once `result` has closed it).
  """

  def __init__(self, head_shape: tuple[int, int], ffn_shape: tuple[int, int], *,
               group_size: int = 8):
    super().__init__(head_shape, ffn_shape, group_size=group_size)
    self._batches_h: list[np.ndarray] = []
    self._batches_f: list[np.ndarray] = []

  def _close_group(self) -> None:
    self._batches_h.append(self._open_h.astype(np.float32))
    self._batches_f.append(self._open_f.astype(np.float32))
    super()._close_group()

  def add_groups(self, head_grads: np.ndarray, ffn_grads: np.ndarray,
                 question_ids: np.ndarray) -> None:
    super().add_groups(head_grads, ffn_grads, question_ids)
    self._batches_h.extend(np.asarray(head_grads, np.float32))
    self._batches_f.extend(np.asarray(ffn_grads, np.float32))

  def batch_grads(self) -> tuple[np.ndarray, np.ndarray]:
    shape_h, shape_f = self.head.shape, self.ffn.shape
    if not self._batches_h:
      return (np.zeros((0,) + shape_h, np.float32), np.zeros((0,) + shape_f, np.float32))
    return np.stack(self._batches_h), np.stack(self._batches_f)


def postprocess_alg(head: np.ndarray, ffn: np.ndarray, *, normalize_by_layer: bool = True,
                    normalize_ffn_by_layer: bool = False, global_minmax: bool = False
                    ) -> tuple[np.ndarray, np.ndarray]:
  """Michel et al.'s normalisations of the absolute-gradient scores (LFPR.md §8.3).

  As the bertology implementation: first (`normalize_by_layer`) each layer's head
  scores are divided by that layer's L2 norm (+1e-20), then (`global_minmax`) all
  head scores are min-max scaled to [0, 1] over every layer. Neurons are normalised per
  layer only with `normalize_ffn_by_layer`; min-max scales them separately from the
  heads. Division by the token count (a global constant) is left out: it changes no
  ranking. Note that normalising heads and not neurons changes their relative scale,
  which the "sum" search mixes.
  """
  head = np.asarray(head, np.float64).copy()
  ffn = np.asarray(ffn, np.float64).copy()
  if normalize_by_layer:
    head /= np.linalg.norm(head, axis=1, keepdims=True) + 1e-20
  if normalize_ffn_by_layer:
    ffn /= np.linalg.norm(ffn, axis=1, keepdims=True) + 1e-20
  if global_minmax:
    for a in (head, ffn):
      lo, hi = a.min(), a.max()
      if hi > lo:
        a -= lo
        a /= hi - lo
  return head, ffn


# ------------------------------------------------------------------------ results


@dataclasses.dataclass
class CriterionScores:
  """Scores of one criterion, in the shapes selection and rearrangement take.

  Attributes:
    criterion: the criterion's name.
    head, ffn: final scores `[L, H]`, `[L, F]` (float64; post-processed for `alg`).
    head_grads, ffn_grads: per-batch mask gradients `[num_batches, L, H]`,
      `[num_batches, L, F]` (float32), None for `l1` or when not kept.
    num_samples: samples scored (0 for `l1`).
    options: the criterion's settings (JSON-able).
  """

  criterion: str
  head: np.ndarray
  ffn: np.ndarray
  head_grads: Optional[np.ndarray] = None
  ffn_grads: Optional[np.ndarray] = None
  num_samples: int = 0
  options: dict = dataclasses.field(default_factory=dict)

  @property
  def num_batches(self) -> int:
    return 0 if self.head_grads is None else int(self.head_grads.shape[0])

  def save(self, path: str) -> None:
    """Writes an `.npz` atomically."""
    arrays = {"head": self.head, "ffn": self.ffn,
              "meta": np.asarray(json.dumps({"criterion": self.criterion,
                                             "num_samples": self.num_samples,
                                             "options": self.options}))}
    if self.head_grads is not None:
      arrays.update(head_grads=self.head_grads, ffn_grads=self.ffn_grads)
    atomic.savez(path, **arrays)

  @classmethod
  def load(cls, path: str) -> "CriterionScores":
    with np.load(path) as d:
      meta = json.loads(str(d["meta"]))
      return cls(criterion=meta["criterion"], head=d["head"], ffn=d["ffn"],
                 head_grads=d["head_grads"] if "head_grads" in d else None,
                 ffn_grads=d["ffn_grads"] if "ffn_grads" in d else None,
                 num_samples=int(meta["num_samples"]), options=meta["options"])


# ------------------------------------------------------------------------- driver


def _with_weight(batch: Mapping[str, Any]) -> dict:
  out = dict(batch)
  if "weight" not in out:
    n = np.shape(out["cmb_text"])[0]
    out["weight"] = jnp.ones((n,), jnp.float32)
  return out


def compute_scores(criterion: Union[str, Criterion], model: TAP, params: PyTree,
                   batches: Optional[Iterable[Mapping[str, Any]]] = None, *,
                   group_size: int = 8, mesh: Optional[Any] = None,
                   t_star: Optional[int] = None, bos_index: Optional[int] = None,
                   dropout: bool = False, seed: int = 0,
                   normalize_by_layer: bool = True, normalize_ffn_by_layer: bool = False,
                   global_minmax: bool = False, keep_batch_grads: bool = True
                   ) -> CriterionScores:
  r"""Scores every head and neuron of the unpruned `model` with one criterion.

  Args:
    criterion: a name of `CRITERIA` or a Criterion.
    model, params: the unpruned model and its parameters.
    batches: global batches, e.g. from `lfpr.stream` (not needed for `l1`). Each is a
      mapping of batch-first arrays: the model inputs, an optional `weight` (0 on
      padding rows; default all ones), an optional `question_id`; for `alg` /
      `fisher` also `train_prev_inds`, `targets`, `train_loss_mask` and
      `has_answers`. The batch size must be a multiple of `group_size`.
    group_size: samples per batch gradient G_b (LFPR and the baselines: 8).
    mesh: device mesh the batches are sharded on (`lfpr` defaults to all devices;
      the labelled criteria run unsharded without one).
    t_star, bos_index: `lfpr`: the scored decoding step and the BOS index.
    dropout: `lfpr`: faithful train-mode scoring (group gradients, same key).
    seed: `lfpr` with dropout: the dropout key.
    normalize_by_layer, normalize_ffn_by_layer, global_minmax: `alg` options
      (`postprocess_alg`).
    keep_batch_grads: keep the per-batch gradients in the result.

  Returns:
    The CriterionScores.

  Raises:
    UndefinedCriterionError: `owo`.
    ValueError: unknown criterion, missing arguments or fields, or a labelled
      criterion on a batch without answers (raised before that batch's gradients).
  """
  crit = get_criterion(criterion)
  crit.require_defined()
  hs, fs = importance.mask_shapes(model.config)
  if crit.name == "l1":
    head, ffn = l1_scores(params, model.config)
    return CriterionScores("l1", head, ffn, options={})
  if batches is None:
    raise ValueError(f"criterion {crit.name!r} scores from data: pass batches.")
  if crit.name == "lfpr":
    return _compute_lfpr(model, params, batches, group_size=group_size, mesh=mesh,
                         t_star=t_star, bos_index=bos_index, dropout=dropout, seed=seed,
                         keep_batch_grads=keep_batch_grads)

  grads_fn = make_loss_grads_fn(model, group_size=group_size, mesh=mesh)
  if mesh is None:
    meta_fn = jax.jit(lambda b: (b["weight"], b["has_answers"]))
  else:
    meta_fn = jax.jit(lambda b: (b["weight"], b["has_answers"]),
                      in_shardings=(parallel.data_sharded(mesh),),
                      out_shardings=parallel.replicated(mesh))
  acc = GradientAccumulator(hs, fs, keep_batches=keep_batch_grads)
  for i, batch in enumerate(batches):
    batch = _with_weight(batch)
    missing = [k for k in STEP_FIELDS + ("has_answers",) if k not in batch]
    if missing:
      raise ValueError(f"criterion {crit.name!r} needs batches with {missing} "
                       "(ground-truth teacher forcing and loss targets).")
    weight, has = (np.asarray(x) for x in meta_fn(
        {"weight": batch["weight"], "has_answers": batch["has_answers"]}))
    check_labels(crit, has, weight=weight, what=f"batch {i}")
    gh, gf, rows = (np.asarray(x) for x in grads_fn(params, batch))
    keep = rows > 0  # groups of padding only are no batches
    acc.add(gh[keep], gf[keep], num_samples=int(rows.sum()))
  head, ffn = acc.scores(crit.reduction)
  options: dict = {"group_size": group_size}
  if crit.name == "alg":
    head, ffn = postprocess_alg(head, ffn, normalize_by_layer=normalize_by_layer,
                                normalize_ffn_by_layer=normalize_ffn_by_layer,
                                global_minmax=global_minmax)
    options.update(normalize_by_layer=normalize_by_layer,
                   normalize_ffn_by_layer=normalize_ffn_by_layer,
                   global_minmax=global_minmax)
  importance.check_importance(head, ffn)
  bh, bf = acc.batch_grads()
  return CriterionScores(crit.name, head, ffn, bh, bf, num_samples=acc.num_samples,
                         options=options)


def _compute_lfpr(model: TAP, params: PyTree, batches: Iterable[Mapping[str, Any]], *,
                  group_size: int, mesh: Optional[Any], t_star: Optional[int],
                  bos_index: Optional[int], dropout: bool, seed: int,
                  keep_batch_grads: bool) -> CriterionScores:
  """LFPR's score through `importance.py`, keeping the per-batch gradients."""
  if t_star is None or bos_index is None:
    raise ValueError("criterion 'lfpr' needs t_star and bos_index.")
  mesh = parallel.make_mesh() if mesh is None else mesh
  grads_fn = importance.make_grads_fn(model, mesh, t_star=t_star, bos_index=bos_index,
                                      dropout=dropout, group_size=group_size)
  meta_fn = jax.jit(lambda b: (b["weight"], b["question_id"]),
                    in_shardings=(parallel.data_sharded(mesh),),
                    out_shardings=parallel.replicated(mesh))
  hs, fs = importance.mask_shapes(model.config)
  acc = RecordingImportanceAccumulator(hs, fs, group_size=group_size)
  rng = jax.random.key(seed)
  next_id = 0
  for batch in batches:
    batch = _with_weight(batch)
    if "question_id" not in batch:
      n = np.shape(batch["cmb_text"])[0]
      batch["question_id"] = jnp.arange(next_id, next_id + n, dtype=jnp.int32)
      next_id += n
    inputs = {k: batch[k] for k in MODEL_INPUTS}
    _, gh, gf = grads_fn(params, inputs, batch["weight"], rng)
    w, q = (np.asarray(x) for x in meta_fn({"weight": batch["weight"],
                                            "question_id": batch["question_id"]}))
    gh, gf = np.asarray(gh), np.asarray(gf)
    if dropout:
      groups = w.reshape(-1, group_size).sum(1) > 0
      acc.add_groups(gh[groups], gf[groups], q[w > 0])
    else:
      keep = w > 0
      acc.add_samples(gh[keep], gf[keep], q[keep])
  imp = acc.result(t_star)
  bh, bf = acc.batch_grads() if keep_batch_grads else (None, None)
  return CriterionScores("lfpr", imp.head, imp.ffn, bh, bf, num_samples=imp.num_samples,
                         options={"group_size": group_size, "t_star": int(t_star),
                                  "dropout": bool(dropout)})
