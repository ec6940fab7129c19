"""Latency tables, latency budgets and rounded FFN widths (pruning/latency.py,
selection.round_ffn_widths)."""

import itertools

import numpy as np
import pytest

from lfpr_jax.models.config import TapConfig
from lfpr_jax.pruning import latency, selection

TINY = TapConfig(arch="custom", text_bert_layers=0, mmt_heads=(2, 2), mmt_ffn=(16, 16),
                 hidden_size=32, head_dim=16, text_heads=2, text_ffn=16, vocab_size=50,
                 question_len=4, text_len=8, ocr_text_len=2, num_answers=10, obj_max=3,
                 ocr_max=3, decode_steps=2, obj_feat_dim=8, ocr_feat_dim=8, fc7_dim=8,
                 ptr_query_key_size=32, max_position_embeddings=16)


def _costs(h_max=4, f_max=32):
  # Heads: 1.0 each above a flat 2.0 for up to 2 heads; FFN flat 3.0 to 8, then 0.25/neuron.
  hs = np.arange(h_max + 1)
  attn = np.where(hs <= 2, 2.0, 2.0 + (hs - 2) * 1.0)
  attn[0] = 0.5
  return latency.LatencyCosts(attn=tuple(attn), ffn_a=3.0, ffn_b=0.25, ffn_t=8.0,
                              max_heads=h_max, max_neurons=f_max,
                              params=selection.param_costs(TapConfig()))


def test_fit_recovers_flat_then_linear():
  xs = np.array([1, 2, 3, 4, 6, 8, 10, 12], float)
  ys = np.where(xs <= 4, 5.0, 5.0 + 0.5 * (xs - 4))
  a, b, t = latency.fit_flat_then_linear(xs, ys)
  assert (a, b, t) == pytest.approx((5.0, 0.5, 4.0))


def test_layer_cost_model():
  c = _costs()
  assert c.layer_cost(0, 0) == 0.5
  assert c.layer_cost(2, 8) == 2.0 + 3.0
  assert c.layer_cost(4, 16) == 4.0 + 3.0 + 0.25 * 8


def _prefix_candidates(head, ffn, costs, budget):
  """Brute force over (H, N) prefixes of the global orders, per-layer costs exact."""
  ho, fo = np.argsort(-head.ravel(), kind="stable"), np.argsort(-ffn.ravel(), kind="stable")
  best = -np.inf
  for nh, nf in itertools.product(range(head.size + 1), range(ffn.size + 1)):
    hc = np.bincount(ho[:nh] // head.shape[1], minlength=head.shape[0])
    fc = np.bincount(fo[:nf] // ffn.shape[1], minlength=ffn.shape[0])
    cost = sum(costs.layer_cost(h, n) for h, n in zip(hc, fc))
    if cost <= budget:
      best = max(best, head.ravel()[ho[:nh]].sum() + ffn.ravel()[fo[:nf]].sum())
  return best


@pytest.mark.parametrize("c", [0.3, 0.5, 0.8, 1.0])
def test_select_latency_meets_budget_and_is_best_prefix(c):
  rng = np.random.default_rng(int(c * 10))
  head, ffn = rng.random((3, 4)) * 5, rng.random((3, 32))
  costs = _costs()
  sel = latency.select_latency(head, ffn, c, costs=costs)
  assert sel.cost <= sel.budget + 1e-9
  assert sel.budget == pytest.approx(c * 3 * costs.layer_cost(4, 32))
  assert sel.kept_importance == pytest.approx(_prefix_candidates(head, ffn, costs,
                                                                 sel.budget))


def test_select_latency_rounds_and_rejects_impossible_budgets():
  rng = np.random.default_rng(0)
  head, ffn = rng.random((3, 4)), rng.random((3, 32))
  sel = latency.select_latency(head, ffn, 0.6, costs=_costs(), round_to=8)
  assert all(n % 8 == 0 for n in sel.cfg_ffn) and sel.cost <= sel.budget
  with pytest.raises(ValueError, match="below what an MMT with no heads and no neurons"):
    latency.select_latency(head, ffn, 0.01, costs=_costs())
  with pytest.raises(ValueError, match="latency table is for layers of 4 heads"):
    latency.select_latency(rng.random((3, 2)), ffn, 0.5, costs=_costs())


@pytest.mark.parametrize("cost", ["params", "flops"])
@pytest.mark.parametrize("m", [8, 64, 128])
def test_select_sum_round_to_keeps_budget(cost, m):
  config = TapConfig()
  rng = np.random.default_rng(m)
  head, ffn = rng.random((4, 12)), rng.random((4, 3072))
  costs = selection.constraint_costs(config, cost)
  plain = selection.select_sum(head, ffn, 0.4, costs=costs, strict_budget=True)
  sel = selection.select_sum(head, ffn, 0.4, costs=costs, strict_budget=True,
                             round_to=m)
  assert all(n % m == 0 for n in sel.cfg_ffn) and sel.round_to == m
  assert sel.charged_cost <= sel.budget
  assert sel.cfg_head == plain.cfg_head
  # Rounding loses less than one block per layer of the unrounded neurons.
  assert plain.neurons - 4 * m < sel.neurons <= plain.neurons + m


def test_round_ffn_widths_fills_by_importance():
  imp = np.array([[9, 8, 1, 1], [5, 5, 5, 5]], np.float64)
  mask = np.array([[1, 1, 1, 0], [1, 0, 0, 0]], np.float32)   # widths 3 and 1
  out = selection.round_ffn_widths(imp, mask, np.ones((2, 1)), 2,
                                   lambda h, f: sum(f) <= 4)
  # Round down to (2, 0); then the best block of 2 is layer 1's (10 > 2).
  np.testing.assert_array_equal(out, [[1, 1, 0, 0], [1, 1, 0, 0]])
  for bad in (-8, 3, 2.5, True):
    with pytest.raises(ValueError, match="round_to"):
      selection.check_round_to(bad, 4096 if bad == 3 else 3072)


def test_measure_table_fits_and_caches(tmp_path, monkeypatch):
  calls = []
  real = latency.layer_seconds

  def counted(*a, **k):
    calls.append(a[1:3])
    return real(*a, **k)
  monkeypatch.setattr(latency, "layer_seconds", counted)
  t1 = latency.measure_table(TINY, batch_size=1, repeats=1, neuron_step=8,
                              cache_dir=str(tmp_path))
  assert len(calls) == 3 + 2 and len(t1.attn) == 3 and t1.max_neurons == 16
  t2 = latency.measure_table(TINY, batch_size=1, repeats=1, neuron_step=8,
                              cache_dir=str(tmp_path))
  assert len(calls) == 5 and t2 == t1          # reused from the cache
  latency.measure_table(TINY, batch_size=2, repeats=1, neuron_step=8,
                        cache_dir=str(tmp_path))
  assert len(calls) == 10                      # another batch is another table
