"""Measured speed: a per-device latency table of the MMT layer, latency budgets, and
greedy-decoding latency/throughput of whole models (docs/LFPR.md §9.2).

Kwon et al. budget pruning in latency rather than parameters: they time one attention
block with h heads and one FFN block with n neurons on the target device and fit each
as *flat up to a threshold, then linear* (small widths do not fill the hardware, so
they cost about the same as none). We do the same with jitted Flax `BertLayer`s of
this project's model at the model's MMT sequence length and a given batch size:

    T_layer(h, n) ≈ T_attn(h) + T_ffn(n),
    T_attn(h) = time of a layer with h heads and 0 neurons,
    T_ffn(n)  = time of a layer with 0 heads and n neurons − time of the empty layer,

so the shared residual/LayerNorm cost is counted once. A latency budget c keeps
c · L · T_layer(H, F) of the unpruned MMT's modelled latency; `select_latency` then
maximises the kept importance under it, with exact per-layer costs (a layer's
latency depends on its own widths, not on the total). Tables are cached as JSON keyed
by the device kind, the shapes and the batch size.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from lfpr_jax import atomic
from lfpr_jax.models.config import TapConfig
from lfpr_jax.models.tap import BertLayer, additive_mask
from lfpr_jax.pruning import selection

TABLE_FORMAT = "lfpr_jax.latency_table/1"


def median_seconds(fn: Callable[[], Any], *, repeats: int = 5, warmup: int = 1) -> float:
  """Median wall time of `fn()` (its outputs blocked on), after `warmup` calls."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def layer_seconds(config: TapConfig, heads: int, neurons: int, *, batch_size: int,
                  seq_len: int, repeats: int = 5) -> float:
  """Median seconds of one jitted MMT layer with the given widths on `[B, S, d]`."""
  layer = BertLayer(heads, neurons, config)
  x = jnp.zeros((batch_size, seq_len, config.hidden_size), jnp.float32)
  mask = additive_mask(jnp.ones((batch_size, 1, 1, seq_len), bool))
  params = jax.jit(layer.init)(jax.random.key(0), x, mask)
  fn = jax.jit(lambda p, x, m: layer.apply(p, x, m))
  return median_seconds(lambda: fn(params, x, mask), repeats=repeats)


def fit_flat_then_linear(xs: Sequence[float], ys: Sequence[float]
                         ) -> tuple[float, float, float]:
  """Least-squares `y = a` for x ≤ t, `a + b·(x − t)` above; t among the xs.

  Returns:
    (a, b, t) with b ≥ 0 (latency never falls with width).
  """
  xs, ys = np.asarray(xs, np.float64), np.asarray(ys, np.float64)
  if xs.size < 2 or xs.size != ys.size:
    raise ValueError(f"need >= 2 paired points to fit, got {xs.size} and {ys.size}.")
  best = None
  for t in xs[:-1]:
    feat = np.maximum(xs - t, 0.0)
    design = np.stack([np.ones_like(xs), feat], 1)
    (a, b), *_ = np.linalg.lstsq(design, ys, rcond=None)
    if b < 0:
      a, b = float(np.mean(ys)), 0.0
    err = float(np.sum((a + b * feat - ys) ** 2))
    if best is None or err < best[0]:
      best = (err, float(a), float(b), float(t))
  return best[1], best[2], best[3]


@dataclasses.dataclass(frozen=True)
class LatencyCosts:
  """Modelled seconds of one MMT layer by width (fitted from measurements).

  Attributes:
    attn: `[H + 1]` seconds of the attention part with h = 0..H heads (fitted).
    ffn_a, ffn_b, ffn_t: FFN part `a` for n ≤ t, `a + b·(n − t)` above, `0` at n = 0.
    max_heads, max_neurons: H and F of the unpruned layer.
    params: parameter costs of the same layers (the Selection's accounting).
    device: the device kind the table was measured on; batch_size, seq_len: the shapes.
    measured: the raw medians, for plots and reports.
  """
  attn: tuple[float, ...]
  ffn_a: float
  ffn_b: float
  ffn_t: float
  max_heads: int
  max_neurons: int
  params: selection.ParamCosts
  device: str = ""
  batch_size: int = 0
  seq_len: int = 0
  measured: Optional[dict] = None
  search_constant: float = 0.0

  unit = "latency"

  def ffn(self, n: np.ndarray | int) -> np.ndarray:
    n = np.asarray(n, np.float64)
    t = np.where(n <= self.ffn_t, self.ffn_a, self.ffn_a + self.ffn_b * (n - self.ffn_t))
    return np.where(n > 0, t, 0.0)

  def layer_cost(self, heads: int, neurons: int) -> float:
    return float(self.attn[int(heads)] + self.ffn(int(neurons)))

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["params"] = dataclasses.asdict(self.params)
    return d

  @classmethod
  def from_dict(cls, d: dict) -> "LatencyCosts":
    d = dict(d)
    d["params"] = selection.ParamCosts(**d["params"])
    d["attn"] = tuple(d["attn"])
    return cls(**d)


def table_key(config: TapConfig, batch_size: int, seq_len: int, neuron_step: int
              ) -> str:
  device = jax.devices()[0].device_kind
  shape = dict(device=device, platform=jax.devices()[0].platform,
               jax=jax.__version__, hidden=config.hidden_size, head_dim=config.head_dim,
               heads=max(config.mmt_heads), ffn=max(config.mmt_ffn),
               batch=batch_size, seq=seq_len, step=neuron_step)
  return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:16]


def measure_table(config: TapConfig, *, batch_size: int = 1,
                  seq_len: Optional[int] = None, neuron_step: Optional[int] = None,
                  repeats: int = 5, cache_dir: Optional[str] = None,
                  progress: Callable[[str], None] = lambda s: None) -> LatencyCosts:
  """Times the attention and FFN parts of the MMT layer and fits them (cached).

  Args:
    config: the unpruned model (its widest MMT layer sets H and F).
    batch_size: the batch the latency budget is for (1 = single-query latency).
    seq_len: rows per example; default the model's MMT length (`config.mmt_len`).
    neuron_step: FFN widths are timed at 0, step, 2·step, ..., F (default F / 8).
    repeats: timed calls per width (median).
    cache_dir: where tables are kept; a table of the same device, shapes and batch is
      reused.
    progress: called with a short status string per measured width.

  Returns:
    The fitted LatencyCosts.
  """
  if batch_size < 1:
    raise ValueError(f"latency batch size must be >= 1, got {batch_size}.")
  h_max, f_max = max(config.mmt_heads), max(config.mmt_ffn)
  s = config.mmt_len if seq_len is None else int(seq_len)
  step = max(1, f_max // 8) if neuron_step is None else int(neuron_step)
  path = None
  if cache_dir:
    path = os.path.join(cache_dir, f"latency_{table_key(config, batch_size, s, step)}.json")
    if os.path.exists(path):
      with open(path) as f:
        stored = json.load(f)
      if stored.get("format") == TABLE_FORMAT:
        return LatencyCosts.from_dict(stored["costs"])
  kw = dict(batch_size=batch_size, seq_len=s, repeats=repeats)
  attn = []
  for h in range(h_max + 1):
    progress(f"attention {h}/{h_max} heads")
    attn.append(layer_seconds(config, h, 0, **kw))
  widths = sorted(set(list(range(0, f_max, step)) + [f_max]))
  ffn = [0.0]   # n = 0 is the empty layer, timed above
  for n in widths[1:]:
    progress(f"FFN {n}/{f_max} neurons")
    ffn.append(layer_seconds(config, 0, n, **kw) - attn[0])
  ah = np.asarray(attn)
  a_a, a_b, a_t = fit_flat_then_linear(range(1, h_max + 1), ah[1:])
  hs = np.arange(h_max + 1, dtype=np.float64)
  attn_fit = np.where(hs <= a_t, a_a, a_a + a_b * (hs - a_t))
  attn_fit[0] = ah[0]
  f_a, f_b, f_t = fit_flat_then_linear(widths[1:], ffn[1:])
  costs = LatencyCosts(
      attn=tuple(float(v) for v in attn_fit), ffn_a=max(f_a, 0.0), ffn_b=f_b,
      ffn_t=f_t, max_heads=h_max, max_neurons=f_max,
      params=selection.param_costs(config), device=jax.devices()[0].device_kind,
      batch_size=batch_size, seq_len=s,
      measured={"heads": list(range(h_max + 1)), "attn": attn, "neurons": widths,
                "ffn": ffn})
  if path:
    atomic.write_json(path, {"format": TABLE_FORMAT, "costs": costs.to_dict()})
  return costs


def _layer_counts(order: np.ndarray, width: int, num_layers: int) -> np.ndarray:
  """`[K + 1, L]`: per-layer counts of the first k units of a layer-major order."""
  onehot = np.zeros((order.size + 1, num_layers), np.int64)
  onehot[np.arange(1, order.size + 1), order // width] = 1
  return np.cumsum(onehot, 0)


def select_latency(head_importance: object, ffn_importance: object, constraint: float,
                   *, costs: LatencyCosts, round_to: int = 0) -> selection.Selection:
  """Most total importance with modelled MMT latency ≤ c · the unpruned latency.

  For every total head count H the best H heads fix each layer's heads h_l and the
  attention latency Σ T_attn(h_l); the largest N whose best N neurons fit the rest of
  the budget (Σ T_ffn(n_l), monotone in N: a binary search) completes the candidate.
  The candidate with the most importance wins (H = 0 included: a layer may lose all
  its heads, or every layer may).

  Args:
    head_importance: `[L, H]`; ffn_importance: `[L, F]`.
    constraint: c ∈ (0, 1], the kept fraction of the MMT's modelled latency.
    costs: the device's table (`measure_table`).
    round_to: keep FFN widths at multiples of this (0 = any width).

  Raises:
    ValueError: bad scores or constraint, or a budget below the latency of an MMT
      with no heads and no neurons.
  """
  head, ffn = selection.check_importances(
      head_importance, ffn_importance, None)
  if not 0.0 < float(constraint) <= 1.0:
    raise ValueError(f"constraint must be in (0, 1] (the kept fraction of the MMT "
                     f"latency), got {constraint!r}.")
  num_layers, h_max = head.shape
  f_max = ffn.shape[1]
  if (h_max, f_max) != (costs.max_heads, costs.max_neurons):
    raise ValueError(f"the latency table is for layers of {costs.max_heads} heads and "
                     f"{costs.max_neurons} neurons, the scores for {h_max} and {f_max}.")
  full = num_layers * costs.layer_cost(h_max, f_max)
  budget = float(constraint) * full
  floor = num_layers * costs.layer_cost(0, 0)
  if budget < floor:
    raise ValueError(
        f"latency budget {budget * 1e3:.3f} ms (c = {constraint}) is below what an MMT "
        f"with no heads and no neurons takes on {costs.device or 'this device'} "
        f"({floor * 1e3:.3f} ms, {floor / full:.3f} of the unpruned latency).")
  head_flat, ffn_flat = head.reshape(-1), ffn.reshape(-1)
  head_order = np.argsort(-head_flat, kind="stable")
  ffn_order = np.argsort(-ffn_flat, kind="stable")
  a = np.concatenate([[0.0], np.cumsum(head_flat[head_order], dtype=np.float64)])
  phi = np.concatenate([[0.0], np.cumsum(ffn_flat[ffn_order], dtype=np.float64)])
  h_counts = _layer_counts(head_order, h_max, num_layers)
  n_counts = _layer_counts(ffn_order, f_max, num_layers)
  attn = np.asarray(costs.attn)
  ffn_lat = costs.ffn(n_counts).sum(1)          # [K + 1], nondecreasing in N
  best = None
  for n_heads in range(head_flat.size + 1):
    rest = budget - attn[h_counts[n_heads]].sum()
    if rest < 0:
      break
    n = int(np.searchsorted(ffn_lat, rest, side="right")) - 1
    value = a[n_heads] + phi[n]
    if best is None or value > best[0]:
      best = (value, n_heads, n)
  _, n_heads, n_kept = best
  head_mask = np.zeros(head_flat.size, np.float32)
  head_mask[head_order[:n_heads]] = 1.0
  ffn_mask = np.zeros(ffn_flat.size, np.float32)
  ffn_mask[ffn_order[:n_kept]] = 1.0
  head_mask, ffn_mask = head_mask.reshape(head.shape), ffn_mask.reshape(ffn.shape)
  if round_to:
    def fits(cfg_head, cfg_ffn):
      return sum(costs.layer_cost(h, n) for h, n in zip(cfg_head, cfg_ffn)) <= budget
    ffn_mask = selection.round_ffn_widths(ffn, ffn_mask, head_mask, round_to, fits)
  return selection._finish(  # noqa: SLF001  (one Selection constructor)
      "sum", head_mask, ffn_mask, head, ffn, costs, constraint=float(constraint),
      budget=budget, charged_cost=sum(
          costs.layer_cost(h, n) for h, n in zip(head_mask.sum(1), ffn_mask.sum(1))))


def mmt_seconds(config: TapConfig, *, batch_size: int, seq_len: Optional[int] = None,
                repeats: int = 5) -> float:
  """Measured median seconds of the model's whole MMT stack (its own widths)."""
  s = config.mmt_len if seq_len is None else int(seq_len)
  layers = [BertLayer(h, n, config) for h, n in zip(config.mmt_heads, config.mmt_ffn)]
  x = jnp.zeros((batch_size, s, config.hidden_size), jnp.float32)
  mask = additive_mask(jnp.ones((batch_size, 1, 1, s), bool))
  keys = jax.random.split(jax.random.key(0), len(layers))
  params = [jax.jit(l.init)(k, x, mask) for l, k in zip(layers, keys)]

  @jax.jit
  def stack(params, x, mask):
    for layer, p in zip(layers, params):
      x = layer.apply(p, x, mask)
    return x
  return median_seconds(lambda: stack(params, x, mask), repeats=repeats)


def greedy_speed(config: TapConfig, params: Any, *, batch_sizes: Sequence[int] = (1, 32),
                 bos_index: int = 1, repeats: int = 5) -> dict[str, Any]:
  """Measured greedy-decoding speed of a model on this process's first device.

  Every object and OCR slot is in use (the model's fixed shapes), so the figures do
  not depend on the data. The program is jitted and warm; each figure is the median
  of `repeats` calls.

  Args:
    config, params: the model (any pruned shape).
    batch_sizes: the first is reported as latency (ms per call), the others as
      throughput (questions per second).
    bos_index: `<s>` in the answer vocabulary.

  Returns:
    `{"device", "latency_ms": {b: ms}, "throughput_qps": {b: q/s},
    "xla_flops": {b: FLOPs of one call, from XLA's cost analysis (None if absent)}}`.
  """
  # Local imports keep this module importable without the model's decoding stack.
  from lfpr_jax.models.decoding import greedy_decode  # noqa: PLC0415
  from lfpr_jax.models.params import dummy_inputs  # noqa: PLC0415
  from lfpr_jax.models.tap import TAP  # noqa: PLC0415
  model = TAP(config)
  fn = jax.jit(lambda p, x: greedy_decode(model, {"params": p}, x,
                                          bos_index=bos_index)[1])
  out: dict[str, Any] = {"device": jax.devices()[0].device_kind, "latency_ms": {},
                         "throughput_qps": {}, "xla_flops": {}}
  for b in batch_sizes:
    x = dummy_inputs(config, b)
    x["obj_num"] = jnp.full((b,), config.obj_max, jnp.int32)
    x["ocr_num"] = jnp.full((b,), config.ocr_max, jnp.int32)
    compiled = fn.lower(params, x).compile()   # compiled once, timed and analysed
    try:
      cost = compiled.cost_analysis()
      cost = cost[0] if isinstance(cost, (list, tuple)) else cost
      out["xla_flops"][b] = float(cost["flops"]) if cost and "flops" in cost else None
    except Exception:  # pylint: disable=broad-except  (cost analysis is optional)
      out["xla_flops"][b] = None
    seconds = median_seconds(lambda: compiled(params, x), repeats=repeats)
    out["latency_ms"][b] = 1e3 * seconds
    out["throughput_qps"][b] = b / seconds
  return out
