"""Kwon et al.'s retraining-free pieces (docs/LFPR.md §9): FLOPs costs and search, mask
rearrangement against brute force, layer-wise mask tuning and folding on small shapes,
and the label-free variant (no answer field is read)."""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lfpr_jax.models.batch import MODEL_INPUTS, model_inputs
from lfpr_jax.models.config import TapConfig
from lfpr_jax.models.decoding import greedy_decode
from lfpr_jax.models.tap import TAP
from lfpr_jax.pruning import kwon, scoring, selection
from tests.helpers import TINY, random_batch, random_params

TAP_CONFIG = TapConfig.tap()


# ------------------------------------------------------------------ FLOPs costs


def mac_per_head(seq_len: int, hidden_size: int, head_dim: int) -> int:
  """Kwon's MACs of one head: Q, K, V, output projections 4·s·d·dh + attention 2·s²·dh."""
  return 4 * seq_len * hidden_size * head_dim + 2 * seq_len * seq_len * head_dim


def mac_per_neuron(seq_len: int, hidden_size: int) -> int:
  """Kwon's MACs of one FFN neuron: 2·s·d."""
  return 2 * seq_len * hidden_size


def test_flops_costs_of_tap():
  costs = selection.flops_costs(TAP_CONFIG)
  assert costs.seq_len == 382 == 170 + 100 + 100 + 12
  assert costs.head == 4 * 382 * 768 * 64 + 2 * 382 ** 2 * 64 == 93_782_528
  assert costs.neuron == 2 * 382 * 768 == 586_752
  assert costs.head == mac_per_head(382, 768, 64)
  assert costs.neuron == mac_per_neuron(382, 768)
  assert costs.search_constant == 0 and costs.layer == 0 and costs.unit == "flops"
  assert costs.params == selection.param_costs(TAP_CONFIG)
  assert costs.layer_cost(12, 3072) == 12 * 93_782_528 + 3072 * 586_752
  assert selection.flops_costs(TapConfig.tap12()).head == costs.head
  assert selection.flops_costs(TAP_CONFIG, seq_len=128).neuron == 2 * 128 * 768
  assert selection.constraint_costs(TAP_CONFIG, "flops") == costs
  assert selection.constraint_costs(TAP_CONFIG) == selection.param_costs(TAP_CONFIG)
  with pytest.raises(ValueError, match="valid kinds: params, flops"):
    selection.constraint_costs(TAP_CONFIG, "latency")
  with pytest.raises(ValueError, match="seq_len"):
    selection.flops_costs(TAP_CONFIG, seq_len=0)
  assert kwon.teacher_constraint(0.25) == 0.5


def kwon_search_mac(head, ffn, c, head_mac, neuron_mac):
  """Plain-Python transcription of Kwon's `search_mac` (stable sorts)."""
  num_layers, h = head.shape
  f = ffn.shape[1]
  max_mac = c * num_layers * (h * head_mac + f * neuron_mac)
  hv, fv = list(head.reshape(-1)), list(ffn.reshape(-1))
  hi = sorted(range(len(hv)), key=lambda i: -hv[i])
  fi = sorted(range(len(fv)), key=lambda i: -fv[i])
  best, best_h, best_n = 0, None, None
  for nh in range(1, len(hv) + 1):
    nn = max(int((max_mac - head_mac * nh) / neuron_mac), 0)
    total = sum(hv[i] for i in hi[:nh]) + sum(fv[i] for i in fi[:nn])
    if total > best:
      best, best_h, best_n = total, nh, nn
  hm = np.zeros(len(hv), np.float32)
  hm[hi[:best_h]] = 1
  fm = np.zeros(len(fv), np.float32)
  fm[fi[:best_n]] = 1
  return hm.reshape(head.shape), fm.reshape(ffn.shape)


def test_flops_constrained_selection():
  rng = np.random.default_rng(0)
  head = rng.chisquare(4.0, (4, 12)) * 300 * 10 ** rng.uniform(-2.5, 0, (4, 12))
  ffn = rng.chisquare(4.0, (4, 3072))
  costs = selection.flops_costs(TAP_CONFIG)
  full = 4 * (12 * costs.head + 3072 * costs.neuron)
  for c in (0.2, 0.4, 0.6, 0.8, 0.9):
    sel = selection.select_sum(head, ffn, c, costs=costs)
    assert sel.cost_unit == "flops" and sel.full_cost == full
    assert sel.budget == c * full
    assert sel.charged_cost == sel.cost   # no constants: the charged MACs are exact
    assert sel.cost <= sel.budget
    if sel.neurons < 4 * 3072:         # not saturated: less than a neuron left over
      assert sel.budget - sel.cost < costs.neuron
    assert sel.charged_params is None
    # Parameters are still reported in parameters.
    assert sel.full_params == selection.full_mmt_params(TAP_CONFIG)
    assert sel.mmt_params == selection.mmt_params(sel.pruned_config(TAP_CONFIG))
    hm, fm = kwon_search_mac(head, ffn, c, costs.head, costs.neuron)
    np.testing.assert_array_equal(sel.head_mask, hm)
    np.testing.assert_array_equal(sel.ffn_mask, fm)
    strict = selection.select_sum(head, ffn, c, costs=costs, strict_budget=True)
    assert strict.cost <= strict.budget
  # A parameter selection of the same scores reports its costs in parameters.
  p = selection.select_sum(head, ffn, 0.4, config=TAP_CONFIG)
  assert (p.cost_unit, p.cost, p.full_cost) == ("params", p.mmt_params, p.full_params)
  assert p.charged_cost == p.charged_params
  # Heads cost relatively more in FLOPs (160 neurons) than in params (128 neurons).
  f = selection.select_sum(head, ffn, 0.4, costs=costs)
  assert f.heads <= p.heads
  s = kwon.search_masks(head, ffn, 0.36, config=TAP_CONFIG)
  assert s.teacher.constraint == pytest.approx(0.6) and s.student.constraint == 0.36
  assert s.teacher.cost >= s.student.cost and s.teacher.cost_unit == "flops"


# ---------------------------------------------------------------- rearrangement


def kwon_greedy_reference(mask, grads, from_mask=False):
  """Literal transcription of Kwon's `greedy_rearrange` (direct complement norms)."""
  mask = np.asarray(mask)
  num_pruned = int(np.sum(mask == 0))
  if num_pruned in (0, mask.size):
    return mask.astype(np.float32)
  g = np.asarray(grads, np.float64).T
  sq = (g ** 2).sum(1)
  idx = sorted(range(mask.size), key=lambda i: sq[i])   # stable ascending
  if from_mask:
    masked = [i for i in idx if mask[i] == 0]
    rest = [i for i in idx if mask[i] != 0]
  else:
    masked, rest = idx[:num_pruned], idx[num_pruned:]
  for index in rest:
    masked.append(index)
    vecs = g[masked]
    complement = vecs.sum(0) - vecs
    lengths = (complement ** 2).sum(1)
    del masked[int(np.argmin(lengths))]
  out = np.ones(mask.size, np.float32)
  out[masked] = 0
  return out


def brute_force_optimum(grads, num_pruned):
  g = np.asarray(grads, np.float64)
  return min(kwon.rearrange_objective(s, g)
             for s in itertools.combinations(range(g.shape[1]), num_pruned))


def test_rearrangement_against_brute_force():
  rng = np.random.default_rng(0)
  improved = optimal = 0
  cases = 0
  for trial in range(60):
    n = 6
    batches = 1 + trial % 4
    grads = rng.normal(size=(batches, n)) * rng.uniform(0.1, 3, n)
    for num_pruned in (2, 3):
      mask = np.ones(n, np.float32)
      mask[rng.permutation(n)[:num_pruned]] = 0
      for from_mask in (False, True):
        got = kwon.greedy_rearrange(mask, grads, from_mask=from_mask)
        np.testing.assert_array_equal(
            got, kwon_greedy_reference(mask, grads, from_mask), err_msg=str(trial))
        assert int((got == 0).sum()) == num_pruned            # count unchanged
        pruned = np.flatnonzero(got == 0)
        obj = kwon.rearrange_objective(pruned, grads)
        if from_mask:
          start = np.flatnonzero(mask == 0)
        else:
          start = np.argsort((grads ** 2).sum(0), kind="stable")[:num_pruned]
        start_obj = kwon.rearrange_objective(start, grads)
        best = brute_force_optimum(grads, num_pruned)
        assert best - 1e-9 <= obj <= start_obj + 1e-9
        cases += 1
        improved += obj < start_obj - 1e-9
        optimal += obj <= best + 1e-9
  # The swaps matter and often reach the optimum (not guaranteed: it is greedy).
  assert improved > cases // 4 and optimal > cases // 2


def test_rearrangement_reaches_the_optimum_on_a_cancelling_pair():
  # Units 0 and 1 have the smallest Fisher but push the loss the same way; unit 2
  # cancels unit 0. The optimal 2-unit pruned set is {0, 2}; greedy finds it.
  grads = np.array([[1.0, 1.0, -1.0, 3.0, 4.0, 5.0],
                    [1.0, 1.2, -1.1, -3.0, 4.0, -5.0]])
  mask = np.array([1, 1, 1, 0, 0, 1], np.float32)    # a mask pruning two units
  start = [0, 1]                                      # smallest Σ g²
  assert kwon.rearrange_objective(start, grads) > brute_force_optimum(grads, 2)
  got = kwon.greedy_rearrange(mask, grads)
  np.testing.assert_array_equal(np.flatnonzero(got == 0), [0, 2])
  assert kwon.rearrange_objective([0, 2], grads) == pytest.approx(
      brute_force_optimum(grads, 2))


def test_rearrange_masks_per_layer():
  rng = np.random.default_rng(1)
  masks = np.array([[1, 0, 1, 0, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0],
                    [0, 1, 1, 0, 0]], np.float32)
  grads = rng.normal(size=(7, 4, 5))
  out = kwon.rearrange_masks(masks, grads)
  np.testing.assert_array_equal(out.sum(1), masks.sum(1))        # cfg unchanged
  np.testing.assert_array_equal(out[1], masks[1])                  # nothing pruned
  np.testing.assert_array_equal(out[2], masks[2])                  # all pruned
  for i in (0, 3):
    np.testing.assert_array_equal(out[i], kwon_greedy_reference(masks[i], grads[:, i]))
  with pytest.raises(ValueError, match="num_batches, L, n"):
    kwon.rearrange_masks(masks, grads[:, :3])
  with pytest.raises(ValueError, match="0 batches"):
    kwon.rearrange_masks(masks, grads[:0])


# ----------------------------------------------------------------- least squares


def test_lsmr_solve():
  rng = np.random.default_rng(2)
  a = rng.normal(size=(40, 4))
  b = rng.normal(size=40)
  q, r = a.T @ a, a.T @ b
  scales, status = kwon.lsmr_solve(q, r)
  assert status < 3
  # Damped LSMR on (Q, r − Q·1): δ = (QᵀQ + I)⁻¹ Qᵀ (r − Q·1).
  rhs = r - q.sum(1)
  want = 1 + np.linalg.solve(q.T @ q + np.eye(4), q.T @ rhs)
  np.testing.assert_allclose(scales, want, rtol=1e-5, atol=1e-8)
  # The fit never gets worse than at scales 1.
  f = lambda s: np.sum((a @ s - b) ** 2)
  assert f(scales) <= f(np.ones(4))
  undamped, _ = kwon.lsmr_solve(q, r, damp=0.0)
  np.testing.assert_allclose(undamped, np.linalg.lstsq(a, b, rcond=None)[0], rtol=1e-5)
  # A single unknown: solved directly, no damping; a zero Gram is refused.
  s, status = kwon.lsmr_solve(np.array([[4.0]]), np.array([2.0]))
  assert status == 0 and s[0] == pytest.approx(0.5)
  s, status = kwon.lsmr_solve(np.zeros((1, 1)), np.ones(1))
  assert status >= 3


# ------------------------------------------------------------------ mask tuning


@pytest.fixture(scope="module")
def tuning_setup():
  model = TAP(TINY)
  params = random_params(TINY, 11, scale=0.2)
  batches = []
  for seed in (0, 1):
    raw = random_batch(TINY, 4, seed)
    x = {k: np.asarray(v) for k, v in model_inputs(raw, TINY).items()}
    x["weight"] = np.array([1, 1, 1, float(seed == 0)], np.float32)
    batches.append(x)
  teacher_h = np.ones((2, 2), np.float32)
  teacher_f = np.ones((2, 16), np.float32)
  teacher_f[:, :2] = 0
  student_h = np.array([[1, 0], [0, 1]], np.float32)
  student_f = np.ones((2, 16), np.float32)
  student_f[:, ::3] = 0
  return model, params, batches, (teacher_h, teacher_f, student_h, student_f)


def test_tuning_stats_match_explicit_least_squares(tuning_setup):
  """Layer parts = the model's layers; Gram/rhs = AᵀA, AᵀB of explicitly built A, B."""
  model, params, batches, (th, tf, sh, sf) = tuning_setup
  batch = {k: jnp.asarray(v) for k, v in batches[1].items()}
  sh = sh.copy()
  sh[0, 0] = 0.7                       # a real-valued mask already tuned in layer 0

  @jax.jit
  def run():
    _, inter = model.apply({"params": params}, batch, head_mask=sh, ffn_mask=sf,
                           mutable=["intermediates"])
    x0, mask, enc = model.apply({"params": params}, batch, method=TAP.mmt_inputs)

    def chain(h, f):
      x, parts = x0, []
      for i in range(2):
        parts.append(kwon.layer_parts(model, params[f"mmt_layer_{i}"], x, mask, h[i],
                                      f[i]))
        x = parts[-1]["out"]
      return [x0] + [p["out"] for p in parts], parts
    return inter["intermediates"], chain(th, tf), chain(sh, sf), enc["enc_valid"]
  inter, (_, t_parts), (s_in, s_parts), enc_valid = run()
  for i in range(2):   # the hand-written layers reproduce the model
    np.testing.assert_allclose(s_in[i + 1], inter[f"mmt_out_{i}"][0], rtol=1e-4,
                               atol=1e-4)
    # The per-head outputs split the attention sum: Σ_h per_head + b_O + x.
    bias = params[f"mmt_layer_{i}"]["attention"]["out"]["bias"]
    np.testing.assert_allclose(s_parts[i]["per_head"].sum(1) + bias + s_in[i],
                               s_parts[i]["attn_sum"], rtol=1e-4, atol=1e-4)

  layer = 1
  stats = kwon.make_stats_fn(model)(params, batch, th, tf, sh, sf, jnp.asarray(layer))
  c = TINY
  start = c.encoder_len - c.ocr_max
  w = np.asarray(batch["weight"])
  rows = np.concatenate([np.asarray(enc_valid), np.ones((4, c.decode_steps), bool)], 1)
  rows[:, :start] = False              # last layer: OCR and decoder rows only
  rows &= (w > 0)[:, None]
  assert float(stats["rows"]) == rows.sum()
  sel = lambda a: np.asarray(a, np.float64)[rows]          # [N, ...] valid rows
  p = params[f"mmt_layer_{layer}"]
  per_head = np.asarray(s_parts[layer]["per_head"], np.float64).transpose(0, 2, 1, 3)
  cols = [sel(per_head[:, :, h]).reshape(-1) for h in range(2)]
  cols.append(np.ones_like(cols[0]))
  a = np.stack(cols, 1)
  b = (sel(t_parts[layer]["attn_sum"]) - np.asarray(p["attention"]["out"]["bias"])
       - sel(s_in[layer])).reshape(-1)
  np.testing.assert_allclose(stats["att_gram"], a.T @ a, rtol=2e-4, atol=1e-3)
  np.testing.assert_allclose(stats["att_rhs"], a.T @ b, rtol=2e-4, atol=1e-3)
  np.testing.assert_allclose(stats["att_bb"], b @ b, rtol=2e-4)
  # FFN: column n = a_n(token) · W2[n, :] over all valid tokens.
  act = sel(s_parts[layer]["act"])                           # [N, F]
  w2 = np.asarray(p["ffn"]["wo"]["kernel"], np.float64)      # [F, d]
  a = np.stack([(act[:, n:n + 1] * w2[n]).reshape(-1) for n in range(16)], 1)
  b = (sel(t_parts[layer]["ffn_sum"]) - np.asarray(p["ffn"]["wo"]["bias"])
       - sel(s_parts[layer]["y"])).reshape(-1)
  np.testing.assert_allclose(stats["ffn_gram"], a.T @ a, rtol=2e-4, atol=1e-4)
  np.testing.assert_allclose(stats["ffn_rhs"], a.T @ b, rtol=2e-4, atol=1e-4)
  np.testing.assert_allclose(stats["ffn_bb"], b @ b, rtol=2e-4)


def test_tune_masks_and_fold(tuning_setup):
  model, params, batches, (th, tf, sh, sf) = tuning_setup
  result = kwon.tune_masks(model, params, batches, teacher_head_mask=th,
                           teacher_ffn_mask=tf, head_mask=sh, ffn_mask=sf)
  assert result.stopped is None
  blocks = [(e["layer"], e["block"]) for e in result.log]
  assert blocks == [(0, "ffn"), (1, "attention"), (1, "ffn")]   # no attention at 0
  assert all(e["accepted"] and e["status"] < 3 for e in result.log)
  assert [e["unknowns"] for e in result.log] == [10, 1, 10]
  for e in result.log:
    if e["block"] == "ffn":      # no offset column: never worse than scales 1
      assert e["error_after"] <= e["error_before"]
  # Pruned units stay pruned, kept ones are rescaled.
  np.testing.assert_array_equal(result.head_mask == 0, sh == 0)
  np.testing.assert_array_equal(result.ffn_mask == 0, sf == 0)
  np.testing.assert_array_equal(result.head_mask[0], sh[0])     # layer 0: no heads
  assert not np.allclose(result.ffn_mask[sf != 0], 1.0)
  assert np.all(np.abs(result.ffn_mask) <= 10)

  # A solve that fails stops the tuning of this and every later layer.
  failed = kwon.tune_masks(model, params, batches, teacher_head_mask=th,
                           teacher_ffn_mask=tf, head_mask=sh, ffn_mask=sf,
                           scale_bound=1e-3)
  assert failed.stopped == {"layer": 0, "block": "ffn",
                            "reason": "a scale is outside [-0.001, 0.001]"}
  assert len(failed.log) == 1 and not failed.log[0]["accepted"]
  np.testing.assert_array_equal(failed.head_mask, sh)
  np.testing.assert_array_equal(failed.ffn_mask, sf)
  with pytest.raises(ValueError, match="teacher_ffn_mask has shape"):
    kwon.tune_masks(model, params, batches, teacher_head_mask=th,
                    teacher_ffn_mask=tf[:, :3], head_mask=sh, ffn_mask=sf)

  # Folding: the pruned model computes what the unpruned one does with the masks.
  pruned, config = kwon.fold_masks(params, TINY, result.head_mask, result.ffn_mask)
  assert config.mmt_heads == (1, 1) and config.mmt_ffn == (10, 10)
  assert not config.learnable_masks
  kept = np.flatnonzero(sf[1])
  np.testing.assert_allclose(pruned["mmt_layer_1"]["ffn"]["wo"]["kernel"],
                             np.asarray(params["mmt_layer_1"]["ffn"]["wo"]["kernel"])[kept]
                             * result.ffn_mask[1, kept][:, None], rtol=1e-6)
  np.testing.assert_allclose(
      pruned["mmt_layer_1"]["attention"]["out"]["kernel"],
      np.asarray(params["mmt_layer_1"]["attention"]["out"]["kernel"])[[1]]
      * result.head_mask[1, 1], rtol=1e-6)
  batch = {k: jnp.asarray(v) for k, v in batches[0].items()}
  full, small = jax.jit(lambda: (
      model.apply({"params": params}, batch, head_mask=result.head_mask,
                  ffn_mask=result.ffn_mask),
      TAP(config).apply({"params": pruned}, batch)))()
  np.testing.assert_allclose(small, full, rtol=1e-4, atol=1e-4)
  learn, lconfig = kwon.fold_masks(params, TINY, result.head_mask, result.ffn_mask,
                                   learnable_masks=True)
  assert lconfig.learnable_masks
  np.testing.assert_allclose(learn["mmt_layer_1"]["ffn"]["ffn_mask"],
                             result.ffn_mask[1, kept])


def test_retraining_free_pipeline(tuning_setup):
  model, params, batches, _ = tuning_setup
  rng = np.random.default_rng(4)
  head_grads = rng.normal(size=(6, 2, 2)).astype(np.float32)
  ffn_grads = rng.normal(size=(6, 2, 16)).astype(np.float32)
  scores = scoring.Scores(
      "fisher", (head_grads.astype(np.float64) ** 2).sum(0),
      (ffn_grads.astype(np.float64) ** 2).sum(0), head_grads, ffn_grads)
  out = kwon.retraining_free(model, params, scores, 0.5, batches=batches)
  sel = out.search.student
  assert sel.cost_unit == "flops" and sel.cost <= sel.budget
  assert out.search.teacher.constraint == pytest.approx(math.sqrt(0.5))
  # Rearrangement keeps the per-layer counts, tuning keeps the kept set.
  assert out.config.mmt_heads == sel.cfg_head and out.config.mmt_ffn == sel.cfg_ffn
  np.testing.assert_array_equal(
      (out.head_mask != 0).astype(np.float32),
      kwon.rearrange_masks(sel.head_mask, head_grads))
  assert out.rearranged and out.tuning is not None
  l1 = scoring.Scores("l1", scores.head, scores.ffn)
  with pytest.raises(ValueError, match="per-batch gradients"):
    kwon.retraining_free(model, params, l1, 0.5, batches=batches)
  plain = kwon.retraining_free(model, params, l1, 0.5, rearrange=False, tune=False,
                               kind="params")
  assert plain.tuning is None and plain.search.student.cost_unit == "params"
  np.testing.assert_array_equal(plain.head_mask, plain.search.student.head_mask)
  # Another budget's search (the sweep's measured latency table): asked at c and
  # sqrt(c); the rearranged masks keep its per-layer counts.
  asked = []

  def select(h, f, c):
    asked.append(c)
    return selection.select_sum(h, f, c, config=model.config)
  other = kwon.retraining_free(model, params, scores, 0.5, select=select, tune=False)
  assert sorted(asked) == pytest.approx([0.5, math.sqrt(0.5)])
  assert other.search.student.cost_unit == "params"
  assert other.config.mmt_heads == other.search.student.cfg_head
  assert other.config.mmt_ffn == other.search.student.cfg_ffn


# ------------------------------------------------------------ label-free variant


def _answer_batches(model, seed0: int = 20):
  """Two batches of 4 with model inputs, weights and every answer field."""
  out = []
  for seed in (seed0, seed0 + 1):
    raw = random_batch(TINY, 4, seed)
    x = {k: np.asarray(v) for k, v in model_inputs(raw, TINY, with_targets=True).items()}
    x["weight"] = np.array([1, 1, 1, float(seed == seed0)], np.float32)
    x["has_answers"] = np.ones(4, bool)
    x["answers"] = np.array([[f"a{seed}{i}"] * 10 for i in range(4)], object)
    out.append(x)
  return out


def _poisoned(batches, seed: int):
  """The answer fields replaced by NaN / random values of the same shapes."""
  rng = np.random.default_rng(seed)
  out = []
  for b in batches:
    b = dict(b)
    b["targets"] = np.full(b["targets"].shape, np.nan, np.float32)
    b["train_loss_mask"] = np.full(b["train_loss_mask"].shape, np.nan, np.float32)
    b["train_prev_inds"] = rng.integers(0, TINY.num_answers + TINY.ocr_max,
                                        b["train_prev_inds"].shape).astype(np.int32)
    b["answers"] = rng.integers(0, 9, b["answers"].shape).astype(str).astype(object)
    b["has_answers"] = np.zeros(4, bool)
    out.append(b)
  return out


def _label_free_run(model, params, batches):
  scores = scoring.compute("lfpr", model, params, batches, group_size=2, t_star=1,
                           bos_index=1, keep_batch_grads=True)
  out = kwon.retraining_free_label_free(model, params, scores, 0.5, bos_index=1,
                                        batches=batches, kind="params")
  return scores, out


def test_label_free_restoration_reads_no_answer():
  """Scoring + rearrangement + tuning give bit-identical results whether the answer
  fields are present, poisoned (NaN / random) or absent."""
  model = TAP(TINY)
  params = random_params(TINY, 11, scale=0.2)
  clean = _answer_batches(model)
  stripped = [{k: v for k, v in b.items() if k not in kwon.ANSWER_FIELDS}
              for b in clean]
  assert "train_prev_inds" not in stripped[0] and "targets" not in stripped[0]
  # Stripping keeps exactly what label_free_batches reads (no answer field).
  assert set(kwon.label_free_batches(model, params, stripped, bos_index=1)[0]) == set(
      kwon.label_free_batches(model, params, clean, bos_index=1)[0])
  ref_scores, ref = _label_free_run(model, params, clean)
  assert ref.label_free and ref.rearranged and ref.tuning is not None
  assert ref.tuning.log and ref_scores.head_grads.shape == (4, 2, 2)
  # The rearrangement used LFPR's per-batch gradients.
  np.testing.assert_array_equal(
      (ref.head_mask != 0).astype(np.float32),
      kwon.rearrange_masks(ref.search.student.head_mask, ref_scores.head_grads))
  for variant in (_poisoned(clean, 0),):   # present but NaN / random
    scores, out = _label_free_run(model, params, variant)
    for k in ("head", "ffn", "head_grads", "ffn_grads", "head_per_sample",
              "ffn_per_sample"):
      np.testing.assert_array_equal(getattr(scores, k), getattr(ref_scores, k),
                                    err_msg=k)
    np.testing.assert_array_equal(out.head_mask, ref.head_mask)
    np.testing.assert_array_equal(out.ffn_mask, ref.ffn_mask)
    assert out.tuning.log == ref.tuning.log
    jax.tree.map(np.testing.assert_array_equal, out.params, ref.params)
  # The poison is not inert: the labelled tuning does read train_prev_inds.
  th, tf = ref.search.teacher.head_mask, ref.search.teacher.ffn_mask
  sh = (ref.head_mask != 0).astype(np.float32)
  sf = (ref.ffn_mask != 0).astype(np.float32)
  tune = lambda bs: kwon.tune_masks(
      model, params, [{k: v for k, v in b.items() if k != "answers"} for b in bs],
      teacher_head_mask=th, teacher_ffn_mask=tf, head_mask=sh, ffn_mask=sf)
  assert not np.array_equal(tune(clean).ffn_mask, tune(_poisoned(clean, 0)).ffn_mask)


def test_label_free_batches_and_refusals():
  model = TAP(TINY)
  params = random_params(TINY, 11, scale=0.2)
  clean = _answer_batches(model)
  out = kwon.label_free_batches(model, params, clean, bos_index=1)
  assert set(out[0]) == set(MODEL_INPUTS) | {"weight", "train_prev_inds"}
  # Decoder inputs = the unpruned model's own greedy inputs: BOS, then its argmaxes.
  inputs = {k: jnp.asarray(clean[0][k]) for k in MODEL_INPUTS}
  scores, prev = greedy_decode(model, {"params": params}, inputs, bos_index=1)
  np.testing.assert_array_equal(out[0]["train_prev_inds"], prev)
  np.testing.assert_array_equal(np.asarray(prev)[:, 0], 1)
  np.testing.assert_array_equal(np.asarray(prev)[:, 1:],
                                np.argmax(np.asarray(scores), -1)[:, :-1])
  assert not np.array_equal(prev, clean[0]["train_prev_inds"])
  no_text = {k: v for k, v in clean[1].items() if k != "cmb_text"}
  with pytest.raises(ValueError,
                     match="batch 1 lacks the model inputs \\[.cmb_text.\\]"):
    kwon.label_free_batches(model, params, [clean[0], no_text], bos_index=1)
  # Labelled scores are refused (ranking or rearranging with them reads answers).
  rng = np.random.default_rng(0)
  g = rng.normal(size=(3, 2, 2)).astype(np.float32), rng.normal(size=(3, 2, 16))
  fisher = scoring.Scores("fisher", np.ones((2, 2)), np.ones((2, 16)), g[0],
                          g[1].astype(np.float32))
  lfpr = scoring.Scores("lfpr", fisher.head, fisher.ffn, fisher.head_grads,
                        fisher.ffn_grads)
  for kw, match in (({"scores": fisher}, "criterion 'fisher', which reads "
                     "ground-truth answers; expected scores of lfpr, l1"),
                    ({"scores": lfpr, "rearrange_grads": fisher},
                     "rearrangement gradients of criterion 'fisher'"),
                    ({"scores": scoring.Scores("snip", fisher.head, fisher.ffn)},
                     "'snip', which is not a known label-free criterion")):
    with pytest.raises(ValueError, match=match):
      kwon.retraining_free_label_free(model, params, constraint=0.5, bos_index=1,
                                      batches=clean, **kw)
  # l1 ranks, LFPR's gradients rearrange.
  l1 = scoring.Scores("l1", *scoring.criteria.l1_scores(params, TINY))
  res = kwon.retraining_free_label_free(model, params, l1, 0.5, bos_index=1,
                                        rearrange_grads=lfpr, tune=False)
  assert res.rearranged and res.label_free and res.tuning is None
  np.testing.assert_array_equal(res.head_mask, kwon.rearrange_masks(
      res.search.student.head_mask, lfpr.head_grads))
  with pytest.raises(ValueError, match="'l1' scores have none"):
    kwon.retraining_free_label_free(model, params, l1, 0.5, bos_index=1, tune=False)
