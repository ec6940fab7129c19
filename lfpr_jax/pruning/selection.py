"""Which MMT heads and FFN neurons to keep: LFPR's selection heuristics (docs/LFPR.md §4).

Given importance scores of every head `[L, H]` and every FFN neuron `[L, F]` of the
multimodal transformer, `select_sum` keeps the units with the largest total importance
under a parameter budget (the "sum" heuristic, adapted from Kwon et al.'s `search_mac`)
and `select_thre` keeps the units scored strictly above a percentile (the "thre"
heuristic). Both return a `Selection`: binary masks for `lfpr_jax.pruning.surgery.prune`, the
per-layer widths of the pruned model (upstream's `cfg.txt`) and the numbers worth
reporting.

Parameter accounting is exact and holds for any `TapConfig` (masks excluded): an MMT
layer with h heads and n neurons has

    P_layer(h, n) = 4·(dh·h·d) + 3·dh·h + d + 2d  +  d·n + n + d·n + d + 2d
                  = 196,800·h + 1,537·n + 4,608       (TAP: d = 768, dh = 64).

The "sum" search charges an approximation of it, as upstream does: 196,800 per head,
1,537 per neuron and the constant 2,304 (output bias + attention LayerNorm) once in
total instead of 4,608 per layer.

A FLOPs constraint (Kwon et al.'s `search_mac`, docs/LFPR.md §9.2) uses the same search with
`costs=flops_costs(config)`: per head 4·s·d·dh + 2·s²·dh and per neuron 2·s·d
multiply-accumulates for a sequence of s positions (TAP: s = 382, 93,782,528 per head
and 586,752 per neuron), search constant 0 and no per-layer constant, so the budget is
c times the prunable MACs of the unpruned MMT, L·(H·head + F·neuron). The Selection
then reports the budget and costs in that unit (`cost_unit` "flops") while
`full_params` / `mmt_params` stay parameter counts.

Everything here is host-side numpy: selection runs once per pruning job.
"""

from __future__ import annotations

import ast
import dataclasses
import math
from collections.abc import Callable
from typing import ClassVar, Optional, Union

import numpy as np

from lfpr_jax.models.config import TapConfig


@dataclasses.dataclass(frozen=True)
class ParamCosts:
  """Parameter counts of one MMT layer, split by unit (docs/LFPR.md §4.1).

  Attributes:
    head: parameters of one attention head: Q, K, V and output weights plus the Q, K,
      V biases, `4·dh·d + 3·dh` (196,800 for TAP).
    neuron: parameters of one FFN neuron: a column of W1, its bias, a row of W2,
      `2·d + 1` (1,537).
    layer: per-layer constant: output and W2 biases and both LayerNorms, `6·d` (4,608).
    search_constant: what the "sum" search charges once in total instead of `layer`
      per layer: the output bias and the attention LayerNorm, `3·d` (2,304).
  """

  head: int
  neuron: int
  layer: int
  search_constant: int

  def layer_params(self, heads: int, neurons: int) -> int:
    """Exact parameters of one layer with `heads` heads and `neurons` neurons."""
    return self.head * int(heads) + self.neuron * int(neurons) + self.layer

  def charged(self, heads: int, neurons: int) -> int:
    """What the "sum" search charges for `heads` heads and `neurons` neurons in total."""
    return self.head * int(heads) + self.search_constant + self.neuron * int(neurons)

  # The interface shared with FlopsCosts.
  unit: ClassVar[str] = "params"

  @property
  def params(self) -> "ParamCosts":
    """The parameter costs (itself)."""
    return self

  def layer_cost(self, heads: int, neurons: int) -> int:
    """The cost of one layer in `unit`: here `layer_params`."""
    return self.layer_params(heads, neurons)


def param_costs(config: TapConfig) -> ParamCosts:
  """The per-unit parameter counts of `config`'s MMT layers."""
  d, dh = config.hidden_size, config.head_dim
  return ParamCosts(head=4 * dh * d + 3 * dh, neuron=2 * d + 1, layer=6 * d,
                    search_constant=3 * d)


@dataclasses.dataclass(frozen=True)
class FlopsCosts:
  """Multiply-accumulates of one MMT layer split by unit (Kwon et al., docs/LFPR.md §9.2).

  Kwon's `efficiency/mac.py`: a head costs its Q, K, V and output projections,
  4·s·d·dh, plus the attention logits and the weighted sum of values, 2·s²·dh; a
  neuron costs its two FFN matrix columns, 2·s·d. LayerNorms, biases, softmax and
  residuals are not counted (`layer = search_constant = 0`, as in `search_mac`), so a
  FLOPs constraint c keeps c times the prunable MACs. One unit is one
  multiply-accumulate (a ratio constraint does not change with the factor 2 of FLOPs).

  Attributes:
    head: MACs of one head, 4·s·d·dh + 2·s²·dh (TAP, s = 382: 93,782,528).
    neuron: MACs of one FFN neuron, 2·s·d (TAP: 586,752).
    seq_len: s, the sequence length the costs are computed for.
    params: the parameter costs of the same layers (the Selection's parameter
      accounting).
    layer: per-layer constant (0).
    search_constant: the constant the search charges once (0).
  """

  head: int
  neuron: int
  seq_len: int
  params: ParamCosts
  layer: int = 0
  search_constant: int = 0

  unit: ClassVar[str] = "flops"

  def layer_cost(self, heads: int, neurons: int) -> int:
    """MACs of one layer with `heads` heads and `neurons` neurons."""
    return self.head * int(heads) + self.neuron * int(neurons) + self.layer

  def charged(self, heads: int, neurons: int) -> int:
    """What the search charges for `heads` heads and `neurons` neurons in total."""
    return self.head * int(heads) + self.search_constant + self.neuron * int(neurons)


def flops_costs(config: TapConfig, seq_len: Optional[int] = None) -> FlopsCosts:
  """Kwon's per-head and per-neuron MACs of `config`'s MMT layers (docs/LFPR.md §9.2).

  Args:
    config: the model.
    seq_len: s; default `config.mmt_len` = text_len + obj_max + ocr_max +
      decode_steps (382 for TAP). Every layer is charged for all s rows (TAP's last
      layer computes only its OCR and decoder query rows; the search ignores that,
      as Kwon's formula ignores padding).

  Returns:
    The FlopsCosts; pass it to `select_sum(..., costs=...)`.
  """
  s = config.mmt_len if seq_len is None else int(seq_len)
  if s < 1:
    raise ValueError(f"seq_len must be >= 1, got {seq_len}.")
  d, dh = config.hidden_size, config.head_dim
  return FlopsCosts(head=4 * s * d * dh + 2 * s * s * dh, neuron=2 * s * d,
                    seq_len=s, params=param_costs(config))


COST_KINDS = ("params", "flops")


def constraint_costs(config: TapConfig, kind: str = "params"
                     ) -> Union[ParamCosts, FlopsCosts]:
  """The unit costs of a constraint kind: "params" (LFPR) or "flops" (Kwon's MACs).

  Raises:
    ValueError: an unknown kind (the message lists the valid ones).
  """
  if kind == "params":
    return param_costs(config)
  if kind == "flops":
    return flops_costs(config)
  raise ValueError(f"unknown constraint kind {kind!r}; valid kinds: "
                   f"{', '.join(COST_KINDS)}.")


def layer_params(config: TapConfig, heads: int, neurons: int) -> int:
  """Exact parameters of one MMT layer of `config` with the given widths."""
  return param_costs(config).layer_params(heads, neurons)


def full_heads(config: TapConfig) -> int:
  """Heads of an unpruned layer: `hidden_size // head_dim` (12 for TAP)."""
  return config.hidden_size // config.head_dim


def full_ffn(config: TapConfig) -> int:
  """Neurons of an unpruned layer: `text_ffn` (3072), as `TapConfig.is_unpruned`."""
  return config.text_ffn


def full_mmt_params(config: TapConfig) -> int:
  """P_full: the MMT encoder parameters of the unpruned model of `config`.

  Every layer counted at the unpruned width (`full_heads`, `full_ffn`), whatever
  `config.mmt_heads` / `config.mmt_ffn` say, so a pruned TAP config gives the size of
  the model it was pruned from: 28,351,488 for TAP, 85,054,464 for TAP12 (upstream
  `calc_full_params_tap`). A TapConfig does not record the width a custom model was
  pruned from; for a custom unpruned MMT narrower than `text_ffn` use
  `mmt_params(config)` (what `Selection.full_params` holds).
  """
  return config.mmt_layers * layer_params(config, full_heads(config), full_ffn(config))


def mmt_params(config: TapConfig) -> int:
  """Exact MMT encoder parameters of `config` (masks and decoder embeddings excluded)."""
  costs = param_costs(config)
  return sum(costs.layer_params(h, n) for h, n in zip(config.mmt_heads, config.mmt_ffn))


@dataclasses.dataclass(frozen=True, eq=False)
class Selection:
  """The result of a selection heuristic.

  Attributes:
    heuristic: "sum" or "thre".
    head_mask: `[L, H]` float32, 1 = keep the head.
    ffn_mask: `[L, F]` float32, 1 = keep the neuron.
    cfg_head: kept heads per layer (upstream `cfg_head`).
    cfg_ffn: kept neurons per layer (upstream `cfg_ffn`).
    heads: kept heads in total (for "sum" the chosen H).
    neurons: kept neurons in total (for "sum" min(N(H), L·F)).
    kept_importance: sum of the kept units' importances (float64; for "sum" the
      maximised value(H)).
    full_params: exact MMT parameters of the scored model, L·P_layer(H, F): the base
      of the constraint (= `mmt_params(config)`).
    mmt_params: exact MMT parameters of the pruned model, Σ_l P_layer(h_l, n_l).
    constraint: "sum": the kept fraction c of `full_params`.
    budget: "sum": c · full_params.
    neuron_budget: "sum": N(H) before saturation (may exceed L·F, then every neuron
      is kept).
    charged_params: "sum": the search's approximate count of the selection,
      196,800·H + 2,304 + 1,537·neurons for TAP (may exceed `budget`, see `select_sum`).
    strict_budget: "sum": whether H was capped so that the heads fit the budget.
    percentile: "thre": p.
    threshold: "thre": θ, the p-th percentile of all scores; units > θ are kept.
    cost_unit: the unit of the search's costs: "params" (`param_costs`) or "flops"
      (`flops_costs`); with "flops", `budget` is c times the full MACs.
    full_cost: the scored model's cost in `cost_unit` (`full_params` for "params").
    cost: the pruned model's cost in `cost_unit` (`mmt_params` for "params").
    charged_cost: "sum": what the search charged in `cost_unit` (`charged_params`
      for "params"; `charged_params` is None for "flops").
    round_to: FFN widths were rounded to multiples of this (0: not rounded).
  """

  heuristic: str
  head_mask: np.ndarray
  ffn_mask: np.ndarray
  cfg_head: tuple[int, ...]
  cfg_ffn: tuple[int, ...]
  heads: int
  neurons: int
  kept_importance: float
  full_params: int
  mmt_params: int
  constraint: Optional[float] = None
  budget: Optional[float] = None
  neuron_budget: Optional[int] = None
  charged_params: Optional[int] = None
  strict_budget: Optional[bool] = None
  percentile: Optional[float] = None
  threshold: Optional[float] = None
  cost_unit: str = "params"
  full_cost: Optional[int] = None
  cost: Optional[int] = None
  charged_cost: Optional[int] = None
  round_to: int = 0

  @property
  def kept_fraction(self) -> float:
    """Exact kept fraction of the MMT encoder parameters."""
    return self.mmt_params / self.full_params

  def pruned_config(self, config: TapConfig, *, learnable_masks: bool = True
                    ) -> TapConfig:
    """`config` with this selection's per-layer widths."""
    return config.pruned(self.cfg_head, self.cfg_ffn, learnable_masks=learnable_masks)


# Validation ------------------------------------------------------------------------
def _as_scores(x: object, name: str) -> np.ndarray:
  a = np.asarray(x)
  if a.dtype == bool or not np.issubdtype(a.dtype, np.number):
    raise ValueError(f"{name} must be a numeric array, got dtype {a.dtype}.")
  if not np.issubdtype(a.dtype, np.floating):
    a = a.astype(np.float64)
  return a


def check_importances(head_importance: object, ffn_importance: object,
                      config: Optional[TapConfig] = None
                      ) -> tuple[np.ndarray, np.ndarray]:
  """Validated `[L, H]` and `[L, F]` float arrays (dtype kept when floating).

  Raises:
    ValueError: not numeric, wrong or mismatched shapes (against `config` if given),
      non-finite entries, or all zero (nothing to rank).
  """
  head = _as_scores(head_importance, "head_importance")
  ffn = _as_scores(ffn_importance, "ffn_importance")
  if head.ndim != 2 or ffn.ndim != 2:
    raise ValueError(
        f"importances must be [L, H] (heads) and [L, F] (neurons); got shapes "
        f"{head.shape} and {ffn.shape}.")
  if head.shape[0] != ffn.shape[0]:
    raise ValueError(
        f"head_importance has {head.shape[0]} layers but ffn_importance has "
        f"{ffn.shape[0]} (shapes {head.shape} and {ffn.shape}).")
  if 0 in head.shape or 0 in ffn.shape:
    raise ValueError(f"importances are empty: shapes {head.shape} and {ffn.shape}.")
  if config is not None:
    if len(set(config.mmt_heads)) != 1 or len(set(config.mmt_ffn)) != 1:
      raise ValueError(
          f"selection scores a model whose MMT layers all have the same width; the "
          f"{config.arch} config has heads {list(config.mmt_heads)} and FFN widths "
          f"{list(config.mmt_ffn)}.")
    want_h = (config.mmt_layers, config.mmt_heads[0])
    want_f = (config.mmt_layers, config.mmt_ffn[0])
    if head.shape != want_h or ffn.shape != want_f:
      raise ValueError(
          f"importances of shapes {head.shape} and {ffn.shape} do not match the "
          f"{config.arch} config: expected {want_h} and {want_f} (one score per head "
          f"and neuron of its MMT layers).")
  for name, a in (("head_importance", head), ("ffn_importance", ffn)):
    if not np.all(np.isfinite(a)):
      raise ValueError(f"{name} has {int(np.sum(~np.isfinite(a)))} non-finite "
                       "values (NaN or inf).")
  if not np.any(head) and not np.any(ffn):
    raise ValueError("all importances are zero (were the gradients collected?); "
                     "there is nothing to rank.")
  return head, ffn


Costs = Union[ParamCosts, FlopsCosts]


def _resolve_costs(config: Optional[TapConfig], costs: Optional[Costs]) -> Costs:
  if config is not None and costs is not None:
    raise ValueError("give config or costs, not both.")
  if costs is not None:
    if not isinstance(costs, (ParamCosts, FlopsCosts)):
      raise ValueError(f"costs must be a ParamCosts or FlopsCosts, got "
                       f"{type(costs).__name__}.")
    return costs
  return param_costs(config if config is not None else TapConfig())


def _finish(heuristic: str, head_mask: np.ndarray, ffn_mask: np.ndarray,
            head: np.ndarray, ffn: np.ndarray, costs: Costs,
            **info: object) -> Selection:
  """A Selection from binary masks; fills in the counts and the exact sizes."""
  cfg_head = tuple(int(v) for v in head_mask.sum(1))
  cfg_ffn = tuple(int(v) for v in ffn_mask.sum(1))
  num_layers, h_max = head.shape
  kept = (np.sum(head.astype(np.float64)[head_mask > 0])
          + np.sum(ffn.astype(np.float64)[ffn_mask > 0]))
  info.setdefault("kept_importance", float(kept))
  pc = costs.params
  return Selection(
      heuristic=heuristic, head_mask=head_mask, ffn_mask=ffn_mask,
      cfg_head=cfg_head, cfg_ffn=cfg_ffn, heads=sum(cfg_head), neurons=sum(cfg_ffn),
      full_params=num_layers * pc.layer_params(h_max, ffn.shape[1]),
      mmt_params=sum(pc.layer_params(h, n) for h, n in zip(cfg_head, cfg_ffn)),
      cost_unit=costs.unit,
      full_cost=num_layers * costs.layer_cost(h_max, ffn.shape[1]),
      cost=sum(costs.layer_cost(h, n) for h, n in zip(cfg_head, cfg_ffn)),
      **info)


# Heuristics ------------------------------------------------------------------------
def select_sum(head_importance: object, ffn_importance: object, constraint: float, *,
               config: Optional[TapConfig] = None, costs: Optional[Costs] = None,
               strict_budget: bool = False, round_to: int = 0) -> Selection:
  """The "sum" heuristic: most total importance within c · P_full (docs/LFPR.md §4.2).

  Both score tensors are flattened layer-major and sorted in descending order (a
  stable sort: equal scores keep their flat order; upstream's torch sort is not
  guaranteed stable). For every total head count H = 1 … L·H_max (H = 0 is never
  tried) the search affords

      N(H) = max(0, trunc((B − (196,800·H + 2,304)) / 1,537)),   B = c · P_full,

  and scores value(H) = A(H) + Φ(N(H)), the sums of the H best head scores and the
  N(H) best neuron scores (Φ saturates at all neurons). The first H with the largest
  value wins (upstream keeps a running maximum from 0 with a strict ">", so ties go to
  the smallest H and value(H) must be > 0). The top-H heads and top-N(H) neurons are
  kept, with no per-layer quota: a layer can end with 0 heads or 0 neurons.

  Upstream does not cap H: when head scores dominate, the heads alone can cost more
  than B (e.g. TAP at c = 0.2, where 48 heads cost 9.45 M > B = 5.67 M), and then the
  selection exceeds the budget. This is reproduced; `strict_budget=True` instead only
  tries H ≤ floor((B − 2,304) / 196,800). Sums are float64 (upstream: float32), which
  can only matter in near-ties.

  Args:
    head_importance: `[L, H]` head scores.
    ffn_importance: `[L, F]` neuron scores.
    constraint: c ∈ (0, 1], the kept fraction of the MMT encoder parameters.
    config: the scored model (all MMT layers of one width); importances must be
      `[mmt_layers, mmt_heads[0]]` and `[mmt_layers, mmt_ffn[0]]`. It sets the
      per-unit costs; P_full is then `mmt_params(config)`.
    costs: per-unit costs instead of a config. Without either, TAP's (d = 768).
      `flops_costs(config)` gives Kwon's FLOPs (MACs) constraint: B = c · full
      MACs, 93,782,528 per head and 586,752 per neuron for TAP, search constant 0.
    strict_budget: cap H so that the charged heads fit the budget.
    round_to: keep every layer's FFN width a multiple of this (0: any width; see
      `round_ffn_widths`).

  Returns:
    The Selection (`heads` = the chosen H, `neuron_budget` = N(H)).

  Raises:
    ValueError: bad constraint or importances, or no H with a positive value (e.g.
      all-zero scores, where upstream crashes), or no head fits a strict budget.
  """
  head, ffn = check_importances(head_importance, ffn_importance, config)
  costs = _resolve_costs(config, costs)
  if not isinstance(constraint, (int, float, np.floating, np.integer)) or not (
      0.0 < float(constraint) <= 1.0):
    raise ValueError(f"constraint must be in (0, 1] (the kept fraction of the MMT "
                     f"parameters), got {constraint!r}.")
  c = float(constraint)
  num_layers, h_max = head.shape
  full = num_layers * costs.layer_cost(h_max, ffn.shape[1])
  budget = c * full

  head_flat, ffn_flat = head.reshape(-1), ffn.reshape(-1)
  head_order = np.argsort(-head_flat, kind="stable")
  ffn_order = np.argsort(-ffn_flat, kind="stable")
  # Prefix sums with a leading 0: a[k] = sum of the k best scores.
  a = np.concatenate([[0.0], np.cumsum(head_flat[head_order], dtype=np.float64)])
  phi = np.concatenate([[0.0], np.cumsum(ffn_flat[ffn_order], dtype=np.float64)])
  hs = np.arange(1, head_flat.size + 1)
  # Upstream: int((c · P_full − head_params) / 1537), clamped at 0 (float64 math).
  ns = np.trunc((budget - (costs.head * hs + costs.search_constant)) / costs.neuron)
  ns = np.maximum(ns, 0).astype(np.int64)
  values = a[hs] + phi[np.minimum(ns, ffn_flat.size)]
  if strict_budget:
    cap = math.floor((budget - costs.search_constant) / costs.head)
    if cap < 1:
      raise ValueError(
          f"with strict_budget not even one head fits the budget {budget:.0f} "
          f"(one head and the constant cost {costs.head + costs.search_constant}).")
    values = values[:cap]
  best = int(np.argmax(values))  # first maximum = smallest H on ties
  if not values[best] > 0:
    raise ValueError(
        "no head count H has a positive value A(H) + Φ(N(H)); the importances "
        "(all <= 0 where they count) cannot rank the units.")
  n_heads = best + 1
  n_budget = int(ns[best])
  n_kept = min(n_budget, ffn_flat.size)
  head_mask = np.zeros(head_flat.size, np.float32)
  head_mask[head_order[:n_heads]] = 1.0
  ffn_mask = np.zeros(ffn_flat.size, np.float32)
  ffn_mask[ffn_order[:n_kept]] = 1.0
  head_mask, ffn_mask = head_mask.reshape(head.shape), ffn_mask.reshape(ffn.shape)
  info = {}
  if round_to:
    ffn_mask = round_ffn_widths(
        ffn, ffn_mask, head_mask, round_to,
        lambda ch, cf: costs.charged(sum(ch), sum(cf)) <= budget)
    n_kept = int(ffn_mask.sum())
    info["round_to"] = int(round_to)
  else:
    info["kept_importance"] = float(values[best])
  return _finish(
      "sum", head_mask, ffn_mask, head, ffn,
      costs, **info, constraint=c, budget=budget,
      neuron_budget=n_budget,
      charged_params=(costs.charged(n_heads, n_kept) if costs.unit == "params"
                      else None),
      charged_cost=costs.charged(n_heads, n_kept), strict_budget=bool(strict_budget))


def select_thre(head_importance: object, ffn_importance: object, percentile: float, *,
                config: Optional[TapConfig] = None,
                costs: Optional[Costs] = None) -> Selection:
  """The "thre" heuristic: keep every unit scored above a percentile (docs/LFPR.md §4.3).

  θ = `np.percentile` (linear interpolation) of all head and neuron scores together,
  in the scores' dtype (upstream: float32); a unit is kept iff its score > θ, so units
  equal to θ are pruned and p = 0 keeps everything strictly above the minimum. Heads
  and neurons share one scale, so θ is essentially a neuron percentile and the size
  of the result is not controlled (p = 100 keeps nothing).

  Args:
    head_importance: `[L, H]` head scores.
    ffn_importance: `[L, F]` neuron scores.
    percentile: p ∈ [0, 100].
    config: the scored model (shape check and per-unit costs), as in `select_sum`.
    costs: per-unit costs instead of a config. Without either, TAP's.

  Returns:
    The Selection (`threshold` = θ).

  Raises:
    ValueError: bad percentile or importances.
  """
  head, ffn = check_importances(head_importance, ffn_importance, config)
  costs = _resolve_costs(config, costs)
  if not isinstance(percentile, (int, float, np.floating, np.integer)) or not (
      0.0 <= float(percentile) <= 100.0):
    raise ValueError(f"percentile must be in [0, 100], got {percentile!r}.")
  z = np.concatenate([head.reshape(-1), ffn.reshape(-1)])
  theta = z.dtype.type(np.percentile(z, float(percentile)))
  return _finish("thre", (head > theta).astype(np.float32),
                 (ffn > theta).astype(np.float32), head, ffn, costs,
                 percentile=float(percentile), threshold=float(theta))


# cfg.txt -----------------------------------------------------------------------------
def cfg_txt(source: Union[Selection, TapConfig]) -> str:
  """Upstream's `cfg.txt`: `[h_0,…,h_{L-1}]` and `[n_0,…,n_{L-1}]`, one line each."""
  if isinstance(source, Selection):
    heads, ffn = source.cfg_head, source.cfg_ffn
  else:
    heads, ffn = source.mmt_heads, source.mmt_ffn
  return ("[" + ",".join(str(int(h)) for h in heads) + "]\n"
          + "[" + ",".join(str(int(n)) for n in ffn) + "]\n")


def parse_cfg_txt(text: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """Per-layer (heads, neurons) from a `cfg.txt` (inverse of `cfg_txt`).

  Raises:
    ValueError: not two lines of equally long lists of non-negative integers.
  """
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  if len(lines) != 2:
    raise ValueError(f"cfg.txt must have two lines ([heads per layer] and [neurons "
                     f"per layer]), got {len(lines)}: {text!r}.")
  out = []
  for name, line in zip(("heads", "neurons"), lines):
    try:
      values = ast.literal_eval(line)
    except (ValueError, SyntaxError) as e:
      raise ValueError(f"cfg.txt {name} line {line!r} is not a Python list.") from e
    if (not isinstance(values, list)
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                   for v in values)):
      raise ValueError(f"cfg.txt {name} line {line!r} must be a list of "
                       "non-negative integers.")
    out.append(tuple(values))
  if len(out[0]) != len(out[1]) or not out[0]:
    raise ValueError(f"cfg.txt lists {len(out[0])} head counts and {len(out[1])} "
                     "FFN widths; need one of each per MMT layer.")
  return out[0], out[1]


def check_round_to(round_to: object, ffn_width: int) -> int:
  """`round_to` as an int: 0 (off) or a positive divisor of the FFN width."""
  if isinstance(round_to, bool) or not isinstance(round_to, (int, np.integer)) or (
      round_to < 0):
    raise ValueError(f"round_to must be 0 (off) or a positive integer, got {round_to!r}.")
  if round_to and ffn_width % int(round_to):
    raise ValueError(f"round_to={round_to} does not divide the FFN width {ffn_width}; "
                     "use a divisor (e.g. 8, 64, 128 for 3072) so a full layer stays "
                     "expressible.")
  return int(round_to)


def round_ffn_widths(ffn_importance: np.ndarray, ffn_mask: np.ndarray,
                     head_mask: np.ndarray, multiple: int,
                     fits: "Callable[[tuple[int, ...], tuple[int, ...]], bool]"
                     ) -> np.ndarray:
  """FFN masks whose per-layer widths are multiples of `multiple`, within the budget.

  Each layer first keeps its best `floor(n_l / m)·m` neurons (never more than before,
  so the cost only falls). Then, while the budget allows, the block of the next m
  best neurons of some layer with the largest total importance is added (`fits`
  decides with the per-layer head and neuron counts). A layer may end with 0 neurons.

  Args:
    ffn_importance: `[L, F]` scores; ffn_mask: `[L, F]` the selection to round.
    head_mask: `[L, H]` the kept heads (passed to `fits`).
    multiple: m ≥ 1, a divisor of F.
    fits: whether per-layer widths `(cfg_head, cfg_ffn)` meet the budget.

  Returns:
    The rounded `[L, F]` float32 mask.
  """
  m = check_round_to(multiple, ffn_importance.shape[1])
  num_layers, width = ffn_importance.shape
  order = np.argsort(-ffn_importance, axis=1, kind="stable")   # best first per layer
  ranked = np.take_along_axis(ffn_importance.astype(np.float64), order, 1)
  kept = [int(n) // m * m for n in ffn_mask.sum(1)]
  cfg_head = tuple(int(h) for h in head_mask.sum(1))
  while True:
    best = None
    for l in range(num_layers):
      if kept[l] + m > width:
        continue
      value = ranked[l, kept[l]:kept[l] + m].sum()
      trial = kept.copy()
      trial[l] += m
      if (best is None or value > best[0]) and fits(cfg_head, tuple(trial)):
        best = (value, l)
    if best is None:
      break
    kept[best[1]] += m
  out = np.zeros_like(ffn_mask, dtype=np.float32)
  for l in range(num_layers):
    out[l, order[l, :kept[l]]] = 1.0
  return out
