r"""Importance criteria of MMT heads and FFN neurons, one small object each (docs/LFPR.md §8).

Every criterion scores the same units, the head masks ξ `[L, H]` and neuron masks ν
`[L, F]` of the unpruned model, so its scores feed the same selection
(`lfpr_jax.pruning.selection`) and surgery (`lfpr_jax.pruning.surgery`) code:

| name     | labels | data | score of unit u |
| -------- | ------ | ---- | --------------- |
| `lfpr`   | no     | yes  | Σ_b (∂ Σ_i max_c s_i[t\*, c] / ∂m_u)²: LFPR's label-free score (§2-3) |
| `l1`     | no     | no   | weight L1 norms (§8.2 (a)) |
| `alg`    | yes    | yes  | Σ_b abs(∂L_b/∂m_u), heads divided by their layer's L2 norm (Michel et al., §8.3) |
| `fisher` | yes    | yes  | Σ_b (∂L_b/∂m_u)² (Kwon et al., §8.4) |
| `owo`    | ?      | ?    | undefined (§8.5): raises `UndefinedCriterionError` |

A criterion object says what it reads (`fields`), gives a pure gradient function
(`grads_fn`, or `weights_only` scores for `l1`), how batch gradients G_b are reduced
(`reduction`: "square" Σ_b G_b², "abs" Σ_b |G_b|) and a `postprocess` of the reduced
scores, as a jaxpruner pruner class gives `calculate_scores`. The one streaming loop
that runs them is `lfpr_jax.pruning.scoring.compute`.

* **LFPR** (§3.1-3.3): the sum over samples of the max logit at step t\*, with the
  masks as differentiable inputs at ones; its t\* greedy prefix runs in the cached
  decoder (the argmaxes carry no gradient, exactly as upstream's earlier passes), so
  the gradient is that of upstream's last pass. Per-sample gradients
  (`jax.vmap(jax.grad(...))`) are grouped into faithful batches by the loop; with the
  faithful dropout switch the samples interact, so group gradients are taken directly
  (one `grad` per group, the same dropout key for every group, as upstream re-seeds
  every forward call).
* **Labelled criteria** (§8.1): the M4C decoding BCE with the ground-truth `targets`,
  eval mode and teacher forcing on the ground-truth `train_prev_inds`; L_b is the loss
  of one batch of `group_size` samples, normalised by its supervised steps (the
  upstream loss). `check_labels` refuses data without answers before any gradient is
  computed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from lfpr_jax.models.batch import MODEL_INPUTS, STEP_FIELDS, select
from lfpr_jax.models.config import TapConfig
from lfpr_jax.models.decoding import greedy_decode
from lfpr_jax.models.losses import m4c_decoding_bce
from lfpr_jax.models.tap import TAP
from lfpr_jax.pruning import tstar

PyTree = Any
Array = jax.Array
# `fn(params, batch, rng) -> (head_grads [N, L, H], ffn_grads [N, L, F])`.
GradsFn = Callable[[PyTree, Mapping[str, Array], Array], tuple[Array, Array]]

QKV = ("query", "key", "value")


class UndefinedCriterionError(NotImplementedError, ValueError):
  """A criterion that has a named slot but no known definition (OWO)."""


# ----------------------------------------------------------------- mask gradients


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


# ---------------------------------------------------------------------------- l1


def l1_scores(params: PyTree, config: TapConfig) -> tuple[np.ndarray, np.ndarray]:
  """Weight-magnitude scores (docs/LFPR.md §8.2 (a)), float64 `[L, H]` and `[L, F]`.

  In PyTorch's `[out, in]` layout head h owns rows 64h … 64h+63 of W_Q, W_K, W_V and
  the same columns of W_O; its score sums the L1 norms of those rows and columns. In
  the Flax layout the rows of W_Q are `query/kernel[:, h, k]` (`[d, h, dh]`) and the
  columns of W_O are `out/kernel[h, k, :]` (`[h, dh, d]`). Neuron n:
  ‖W1[n, :]‖₁ + ‖W2[:, n]‖₁ = Σ|`wi/kernel[:, n]`| + Σ|`wo/kernel[n, :]`|. Weights
  only: no biases, no learnable masks. Needs no data.
  """
  (num_layers, h), (_, f) = mask_shapes(config)
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
  hs, fs = mask_shapes(model.config)
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


def postprocess_alg(head: np.ndarray, ffn: np.ndarray, *, normalize_by_layer: bool = True,
                    normalize_ffn_by_layer: bool = False, global_minmax: bool = False
                    ) -> tuple[np.ndarray, np.ndarray]:
  """Michel et al.'s normalisations of the absolute-gradient scores (docs/LFPR.md §8.3).

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


# ------------------------------------------------------------------ the criteria


@dataclasses.dataclass(frozen=True)
class Criterion:
  """One importance criterion (subclasses set the class attributes).

  Attributes:
    name: registry name.
    needs_labels: scores from a loss on ground-truth answers (refuses unlabelled data).
    needs_data: scores from data (False: `weights_only`).
    reduction: how batch gradients G_b are accumulated: "square" (Σ_b G_b²), "abs"
      (Σ_b |G_b|) or None (not gradient based).
    description: one line for reports.
    defined: False for a named slot without a definition (using it raises).
    fields: batch fields the gradient function reads (besides `weight`).
    per_sample: `grads_fn` returns one gradient per sample (the loop groups them into
      batches of `group_size`), else one per group of `group_size` rows.
  """

  name: ClassVar[str] = ""
  needs_labels: ClassVar[bool] = False
  needs_data: ClassVar[bool] = True
  reduction: ClassVar[Optional[str]] = None
  description: ClassVar[str] = ""
  defined: ClassVar[bool] = True
  fields: ClassVar[tuple[str, ...]] = MODEL_INPUTS

  @property
  def per_sample(self) -> bool:
    return False

  def require_defined(self) -> None:
    """Raises `UndefinedCriterionError` for a criterion without a definition."""
    if not self.defined:
      raise UndefinedCriterionError(
          f"importance criterion {self.name!r} is not defined: the paper's table names "
          "OWO, but the acronym is not expanded anywhere reachable (README, code "
          "history, abstract; docs/LFPR.md §8.5), so no formula is implemented. Use one of "
          f"{', '.join(n for n, c in REGISTRY.items() if c.defined)}, and report OWO's "
          "table values as external numbers.")

  def grads_fn(self, model: TAP, *, group_size: int) -> GradsFn:
    """The pure (unjitted) gradient function of a data criterion."""
    raise NotImplementedError(f"criterion {self.name!r} has no gradient function.")

  def weights_only(self, params: PyTree, config: TapConfig
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Scores from the weights alone (criteria with `needs_data` False)."""
    raise NotImplementedError(f"criterion {self.name!r} scores from data.")

  def postprocess(self, head: np.ndarray, ffn: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The final scores from the reduced ones (identity by default)."""
    return head, ffn

  def options(self) -> dict:
    """The criterion's settings (JSON-able), stored with its scores."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclasses.dataclass(frozen=True)
class Lfpr(Criterion):
  """LFPR's label-free score (docs/LFPR.md §2-3).

  Attributes:
    t_star: the scored decoding step.
    bos_index: the decoder's BOS index.
    dropout: faithful train-mode scoring (group gradients with one dropout key).
  """

  name: ClassVar[str] = "lfpr"
  reduction: ClassVar[Optional[str]] = "square"
  description: ClassVar[str] = ("LFPR label-free score: squared per-batch gradient "
                                "of the summed max logit at step t*")
  t_star: Optional[int] = None
  bos_index: Optional[int] = None
  dropout: bool = False

  @property
  def per_sample(self) -> bool:
    return not self.dropout

  def grads_fn(self, model: TAP, *, group_size: int) -> GradsFn:
    if self.t_star is None or self.bos_index is None:
      raise ValueError("criterion 'lfpr' needs t_star and bos_index.")
    tstar.check_t_star(self.t_star, model.config.decode_steps)
    t_star, bos_index = int(self.t_star), int(self.bos_index)
    if self.dropout:
      def fn(params, batch, rng):
        inputs = select(batch, MODEL_INPUTS)
        return group_mask_grads(model, params, inputs, batch["weight"], rng,
                                t_star=t_star, bos_index=bos_index,
                                group_size=group_size)[1:]
    else:
      def fn(params, batch, rng):
        del rng
        inputs = select(batch, MODEL_INPUTS)
        return per_sample_mask_grads(model, params, inputs, batch["weight"],
                                     t_star=t_star, bos_index=bos_index)[1:]
    return fn


@dataclasses.dataclass(frozen=True)
class L1(Criterion):
  """Weight magnitudes (docs/LFPR.md §8.2 (a)); needs no data."""

  name: ClassVar[str] = "l1"
  needs_data: ClassVar[bool] = False
  description: ClassVar[str] = ("weight magnitudes: L1 norms of a head's Q/K/V rows "
                                "and output columns, of a neuron's W1 row and W2 column")

  def weights_only(self, params: PyTree, config: TapConfig
                   ) -> tuple[np.ndarray, np.ndarray]:
    return l1_scores(params, config)


@dataclasses.dataclass(frozen=True)
class _Labelled(Criterion):
  """A criterion from per-batch gradients of the labelled loss (docs/LFPR.md §8.1)."""

  needs_labels: ClassVar[bool] = True
  fields: ClassVar[tuple[str, ...]] = STEP_FIELDS

  def grads_fn(self, model: TAP, *, group_size: int) -> GradsFn:
    def fn(params, batch, rng):
      del rng
      batch = select(batch, STEP_FIELDS + ("weight",))
      return group_loss_mask_grads(model, params, batch, group_size=group_size)
    return fn


@dataclasses.dataclass(frozen=True)
class Alg(_Labelled):
  """Michel et al.'s absolute loss gradient (docs/LFPR.md §8.3); see `postprocess_alg`."""

  name: ClassVar[str] = "alg"
  reduction: ClassVar[Optional[str]] = "abs"
  description: ClassVar[str] = ("absolute loss gradient (Michel et al. 2019): sum of "
                                "|dL_b/dm| over batches, heads normalised per layer")
  normalize_by_layer: bool = True
  normalize_ffn_by_layer: bool = False
  global_minmax: bool = False

  def postprocess(self, head: np.ndarray, ffn: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    return postprocess_alg(head, ffn, normalize_by_layer=self.normalize_by_layer,
                           normalize_ffn_by_layer=self.normalize_ffn_by_layer,
                           global_minmax=self.global_minmax)


@dataclasses.dataclass(frozen=True)
class Fisher(_Labelled):
  """Kwon et al.'s empirical Fisher (docs/LFPR.md §8.4)."""

  name: ClassVar[str] = "fisher"
  reduction: ClassVar[Optional[str]] = "square"
  description: ClassVar[str] = ("empirical Fisher (Kwon et al. 2022): sum of "
                                "(dL_b/dm)^2 over batches")


@dataclasses.dataclass(frozen=True)
class Owo(Criterion):
  """OWO: a named slot of the paper's table without a definition (docs/LFPR.md §8.5)."""

  name: ClassVar[str] = "owo"
  description: ClassVar[str] = "OWO: undefined (docs/LFPR.md §8.5)"
  defined: ClassVar[bool] = False


# name -> criterion class, in the paper's table order.
REGISTRY: Mapping[str, type[Criterion]] = {
    "lfpr": Lfpr, "l1": L1, "alg": Alg, "fisher": Fisher, "owo": Owo}
CRITERIA: tuple[str, ...] = tuple(REGISTRY)


def get_criterion(name: Union[str, Criterion], **options: Any) -> Criterion:
  """The criterion `name` with its options (a Criterion is returned as it is).

  Raises:
    ValueError: an unknown name (the message lists the valid ones), or options the
      criterion does not take. A known but undefined criterion (`owo`) is returned;
      using it raises.
  """
  if isinstance(name, Criterion):
    if options:
      raise ValueError(f"options {sorted(options)} given with a Criterion object.")
    return name
  if not isinstance(name, str) or name not in REGISTRY:
    raise ValueError(f"unknown importance criterion {name!r}; valid criteria: "
                     f"{', '.join(CRITERIA)}.")
  cls = REGISTRY[name]
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(options) - known)
  if unknown:
    raise ValueError(f"criterion {name!r} takes the options {sorted(known)}, got "
                     f"{unknown}.")
  return cls(**options)


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
  of `has_answers` flags. `scoring.compute` checks every batch before its gradients.

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
        f"({', '.join(n for n in CRITERIA if not REGISTRY[n].needs_labels and REGISTRY[n].defined)}).")
