"""Selection heuristics (docs/LFPR.md §4): upstream's outputs and a brute-force oracle."""

import numpy as np
import pytest

from lfpr_jax.pruning import selection
from lfpr_jax.models.config import TapConfig
from lfpr_jax.pruning.selection import (ParamCosts, cfg_txt, full_mmt_params, layer_params,
                                mmt_params, param_costs, parse_cfg_txt, select_sum,
                                select_thre)
from tests import golden

TAP = TapConfig.tap()
TAP12 = TapConfig.tap12()
CONFIGS = {"tap": TAP, "tap12": TAP12}
CONSTRAINTS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
PERCENTILES = (10, 20, 30, 40, 50, 60, 70, 80, 90)


def golden_pruning(arch):
  return golden.npz(arch, "pruning"), golden.pruning_meta(arch)


# Parameter accounting (invariant 5) -----------------------------------------------
def test_parameter_formula():
  costs = param_costs(TAP)
  assert costs == ParamCosts(head=196_800, neuron=1_537, layer=4_608,
                             search_constant=2_304)
  assert layer_params(TAP, 12, 3072) == 7_087_872
  assert layer_params(TAP, 0, 0) == 4_608
  assert layer_params(TAP, 5, 1511) == 196_800 * 5 + 1_537 * 1511 + 4_608
  assert full_mmt_params(TAP) == mmt_params(TAP) == 28_351_488
  assert full_mmt_params(TAP12) == mmt_params(TAP12) == 85_054_464
  pruned = TAP.pruned((5, 3, 0, 2), (1511, 0, 1483, 1480))
  assert full_mmt_params(pruned) == 28_351_488  # the model it came from
  assert mmt_params(pruned) == 196_800 * 10 + 1_537 * 4474 + 4 * 4_608
  # Any width: d = 128, dh = 32 -> head 4·32·128 + 96, neuron 257, layer 768.
  small = TapConfig(arch="custom", hidden_size=128, head_dim=32, text_ffn=48,
                    mmt_heads=(4, 2), mmt_ffn=(48, 7))
  assert layer_params(small, 3, 5) == 3 * (4 * 32 * 128 + 96) + 5 * 257 + 768
  assert full_mmt_params(small) == 2 * layer_params(small, 4, 48)
  assert mmt_params(small) == layer_params(small, 4, 48) + layer_params(small, 2, 7)


def test_pruned_state_dict_shapes_of_upstream():
  """mmt_params of the pruned config = count of upstream's pruned MMT tensors."""
  for arch, config in CONFIGS.items():
    _, meta = golden_pruning(arch)
    shapes = meta["pruned_state_dict_shapes"]
    count = sum(int(np.prod(s)) for k, s in shapes.items()
                if k.startswith("mmt.encoder.") and not k.endswith("mask.mask"))
    pruned = config.pruned(meta["sum"]["0.4"]["cfg_head"], meta["sum"]["0.4"]["cfg_ffn"])
    assert mmt_params(pruned) == count == meta["sum"]["0.4"]["kept_encoder_params"]


# Golden selections -----------------------------------------------------------------
def _near_tie_ok(sel, head, ffn, c, config, upstream_heads):
  """Whether upstream's H has a value within rel 1e-6 of ours (float32 vs float64)."""
  costs = param_costs(config)
  budget = c * full_mmt_params(config)
  hs = np.sort(head.reshape(-1).astype(np.float64))[::-1]
  fs = np.sort(ffn.reshape(-1).astype(np.float64))[::-1]
  n = max(0, int((budget - (costs.head * upstream_heads + costs.search_constant))
                 / costs.neuron))
  value = hs[:upstream_heads].sum() + fs[:n].sum()
  return abs(value - sel.kept_importance) <= 1e-6 * sel.kept_importance


@pytest.mark.parametrize("arch", ["tap", "tap12"])
def test_sum_reproduces_upstream(arch):
  npz, meta = golden_pruning(arch)
  config = CONFIGS[arch]
  head, ffn = npz["head_importance"], npz["ffn_importance"]
  for c in CONSTRAINTS:
    key = str(c)
    want = meta["sum"][key]
    sel = select_sum(head, ffn, c, config=config)
    mask_h, mask_f = npz[f"sum_{key}_head_mask"], npz[f"sum_{key}_ffn_mask"]
    if int(mask_h.sum()) != sel.heads:
      # Only a float32-vs-float64 near tie may move H; none exists in these fixtures.
      assert _near_tie_ok(sel, head, ffn, c, config, int(mask_h.sum())), (arch, c)
      continue
    np.testing.assert_array_equal(sel.head_mask, mask_h, err_msg=f"{arch} c={c}")
    np.testing.assert_array_equal(sel.ffn_mask, mask_f, err_msg=f"{arch} c={c}")
    assert sel.head_mask.dtype == np.float32 and sel.ffn_mask.dtype == np.float32
    assert sel.cfg_head == tuple(want["cfg_head"])
    assert sel.cfg_ffn == tuple(want["cfg_ffn"])
    assert (sel.heads, sel.neurons) == (want["heads"], want["neurons"])
    assert sel.budget == want["budget_constraint_x_full"]
    assert sel.full_params == meta["full_encoder_params"] == full_mmt_params(config)
    assert sel.mmt_params == want["kept_encoder_params"]
    assert sel.mmt_params == mmt_params(sel.pruned_config(config))
    np.testing.assert_allclose(sel.kept_importance, want["kept_importance"], rtol=1e-6)
    # The charged size is 4,608·L − 2,304 below the exact one (docs/LFPR.md §4.1).
    assert sel.charged_params == sel.mmt_params - (4_608 * config.mmt_layers - 2_304)


@pytest.mark.parametrize("arch", ["tap", "tap12"])
def test_thre_reproduces_upstream(arch):
  npz, meta = golden_pruning(arch)
  head, ffn = npz["head_importance"], npz["ffn_importance"]
  for p in PERCENTILES:
    want = meta["thre"][str(p)]
    sel = select_thre(head, ffn, p, config=CONFIGS[arch])
    np.testing.assert_array_equal(sel.head_mask, npz[f"thre_{p}_head_mask"])
    np.testing.assert_array_equal(sel.ffn_mask, npz[f"thre_{p}_ffn_mask"])
    assert sel.cfg_head == tuple(want["cfg_head"])
    assert sel.cfg_ffn == tuple(want["cfg_ffn"])
    assert (sel.heads, sel.neurons) == (want["heads"], want["neurons"])
    assert sel.threshold == want["threshold_np_percentile"]
    assert sel.mmt_params == want["kept_encoder_params"]


def test_config_of_a_custom_model():
  """Scores of a model whose MMT is narrower than text-BERT: budget = its own size."""
  config = TapConfig(arch="custom", hidden_size=64, head_dim=32, text_heads=2,
                     text_ffn=32, mmt_heads=(2, 2), mmt_ffn=(16, 16))
  rng = np.random.default_rng(1)
  head, ffn = rng.random((2, 2)) * 10, rng.random((2, 16))
  sel = select_sum(head, ffn, 0.5, config=config)
  assert sel.full_params == mmt_params(config) == 2 * layer_params(config, 2, 16)
  assert sel.charged_params <= sel.budget == 0.5 * sel.full_params
  assert sel.heads >= 1 and sel.ffn_mask.shape == (2, 16)
  assert select_thre(head, ffn, 50, config=config).full_params == sel.full_params


def test_some_golden_layer_has_no_heads():
  npz, _ = golden_pruning("tap")
  sel = select_sum(npz["head_importance"], npz["ffn_importance"], 0.2)  # TAP default
  assert 0 in sel.cfg_head


# Brute-force oracle of §4.2 (invariant 6) -----------------------------------------
def oracle_sum(head, ffn, c, num_layers):
  """Plain-Python transcription of upstream `prune_constrained_sum_of_importance`."""
  full = num_layers * (196_800 * 12 + 1_537 * 3072 + 4_608)
  budget = c * full
  hv = [float(v) for v in head.reshape(-1)]
  fv = [float(v) for v in ffn.reshape(-1)]
  # Stable descending sort (Python's sort is stable).
  h_idx = sorted(range(len(hv)), key=lambda i: -hv[i])
  f_idx = sorted(range(len(fv)), key=lambda i: -fv[i])
  h_sorted = [hv[i] for i in h_idx]
  f_sorted = [fv[i] for i in f_idx]
  best, best_h, best_n = 0, None, None
  for h in range(1, num_layers * 12 + 1):
    head_params = (h * 64) * 768 * 3 + (h * 64) * 3 + 768 * (h * 64) + 768 + 768 * 2
    n = max(int((budget - head_params) / 1537), 0)
    # Upstream: sorted_head[:H].sum() + sorted_ffn[:N].sum().
    head_sum = ffn_sum = 0.0
    for v in h_sorted[:h]:
      head_sum += v
    for v in f_sorted[:n]:
      ffn_sum += v
    total = head_sum + ffn_sum
    if total > best:
      best, best_h, best_n = total, h, n
  head_mask = np.zeros(len(hv), np.float32)
  head_mask[h_idx[:best_h]] = 1
  ffn_mask = np.zeros(len(fv), np.float32)
  ffn_mask[f_idx[:best_n]] = 1
  return (head_mask.reshape(head.shape), ffn_mask.reshape(ffn.shape), best_h, best_n,
          best)


def random_scores(rng, num_layers, kind):
  head_shape, ffn_shape = (num_layers, 12), (num_layers, 3072)
  if kind == "chi2":
    return (rng.chisquare(4.0, head_shape) * 300 * 10 ** rng.uniform(-2.5, 0, head_shape),
            rng.chisquare(4.0, ffn_shape))
  if kind == "heavy_heads":
    # Pareto head scores that dwarf every neuron: the search wants many heads.
    return (1e4 * (rng.pareto(0.8, head_shape) + 1), rng.random(ffn_shape))
  if kind == "ties":
    # Small integers: many exactly equal scores (sort ties) and exact sums.
    return (rng.integers(0, 4, head_shape).astype(np.float32) * 100,
            rng.integers(0, 3, ffn_shape).astype(np.float32))
  raise AssertionError(kind)


@pytest.mark.parametrize("num_layers", [4, 12])
@pytest.mark.parametrize("kind", ["chi2", "heavy_heads", "ties"])
def test_sum_equals_brute_force(num_layers, kind):
  rng = np.random.default_rng([num_layers, len(kind)])
  head, ffn = random_scores(rng, num_layers, kind)
  over_budget = 0
  for c in CONSTRAINTS:
    sel = select_sum(head, ffn, c, costs=param_costs(TAP))
    mask_h, mask_f, h, n, value = oracle_sum(head, ffn, c, num_layers)
    assert (sel.heads, sel.neuron_budget) == (h, n), (kind, c)
    np.testing.assert_array_equal(sel.head_mask, mask_h, err_msg=f"{kind} c={c}")
    np.testing.assert_array_equal(sel.ffn_mask, mask_f, err_msg=f"{kind} c={c}")
    assert sel.kept_importance == value
    assert sel.neurons == min(n, num_layers * 3072)
    over_budget += sel.charged_params > sel.budget
  if kind == "heavy_heads":
    assert over_budget, "heavy-tailed head scores never triggered the over-budget case"


def test_over_budget_and_strict_budget():
  rng = np.random.default_rng(3)
  head, ffn = random_scores(rng, 4, "heavy_heads")
  sel = select_sum(head, ffn, 0.2, config=TAP)
  assert sel.heads == 48 and sel.neurons == 0  # upstream: heads beyond the budget
  assert sel.charged_params == 196_800 * 48 + 2_304 > sel.budget
  for c in CONSTRAINTS:
    for kind in ("heavy_heads", "chi2"):
      head, ffn = random_scores(np.random.default_rng([4, int(c * 10)]), 4, kind)
      strict = select_sum(head, ffn, c, config=TAP, strict_budget=True)
      assert strict.strict_budget
      assert strict.charged_params <= strict.budget
      assert strict.heads <= (strict.budget - 2_304) // 196_800
      loose = select_sum(head, ffn, c, config=TAP)
      assert strict.kept_importance <= loose.kept_importance
      if loose.charged_params <= loose.budget:
        np.testing.assert_array_equal(strict.head_mask, loose.head_mask)
  with pytest.raises(ValueError, match="not even one head fits"):
    select_sum(head, ffn, 0.001, config=TAP, strict_budget=True)


def test_value_ties_pick_smallest_h():
  """A plateau of exactly equal values: upstream's strict '>' keeps the first H."""
  # Integer costs make the ties exact: every head after the second costs 2 neurons
  # and is worth 2 neurons, so value(H) is the same for H = 2 ... 48.
  costs = ParamCosts(head=2, neuron=1, layer=0, search_constant=0)
  head = np.full((4, 12), 2.0, np.float32)
  head[1, 3] = head[3, 0] = 1e6
  ffn = np.ones((4, 3072), np.float32)
  sel = select_sum(head, ffn, 0.5, costs=costs)
  budget = 0.5 * 4 * (2 * 12 + 3072)
  assert sel.budget == budget
  values = [sum(sorted(head.ravel(), reverse=True)[:h]) + (budget - 2 * h)
            for h in range(1, 49)]
  assert values[1:] == [values[1]] * 47 and values[0] < values[1]
  assert sel.heads == 2 and sel.neurons == budget - 4
  assert sel.cfg_head == (0, 1, 0, 1)
  # Sort ties (stable): the kept neurons are the first ones in flat order.
  np.testing.assert_array_equal(sel.ffn_mask.reshape(-1)[:sel.neurons], 1)
  assert sel.ffn_mask.sum() == sel.neurons


def test_saturating_neurons():
  """c = 0.7, H = 1 affords 12,782 > 12,288 neurons: all are kept, under budget."""
  head = np.zeros((4, 12), np.float32)
  head[2, 5] = 1.0
  ffn = np.full((4, 3072), 1.0, np.float32)
  sel = select_sum(head, ffn, 0.7, config=TAP)
  assert sel.heads == 1 and sel.neuron_budget == 12_782 and sel.neurons == 12_288
  assert sel.cfg_head == (0, 0, 1, 0) and sel.cfg_ffn == (3072,) * 4
  assert sel.charged_params < sel.budget


# thre edge cases (invariant 7) -------------------------------------------------------
def test_thre_units_at_threshold_are_pruned():
  head = np.array([[1.0, 2.0, 3.0]], np.float32)
  ffn = np.array([[2.0, 2.0, 5.0, 0.5]], np.float32)
  cfg = TapConfig(arch="custom", hidden_size=96, head_dim=32, text_ffn=4,
                  mmt_heads=(3,), mmt_ffn=(4,))
  sel = select_thre(head, ffn, 50, config=cfg)  # median of 7 scores = 2.0
  assert sel.threshold == 2.0
  np.testing.assert_array_equal(sel.head_mask, [[0, 0, 1]])
  np.testing.assert_array_equal(sel.ffn_mask, [[0, 0, 1, 0]])
  assert sel.mmt_params == layer_params(cfg, 1, 1)
  # p = 0: θ = min, everything strictly above the minimum survives.
  sel = select_thre(head, ffn, 0, config=cfg)
  assert sel.threshold == 0.5
  np.testing.assert_array_equal(sel.head_mask, [[1, 1, 1]])
  np.testing.assert_array_equal(sel.ffn_mask, [[1, 1, 1, 0]])
  # Ties at the minimum are all pruned; p = 100 keeps nothing.
  sel = select_thre(np.array([[0.5, 0.5, 1.0]]), ffn, 0, config=cfg)
  np.testing.assert_array_equal(sel.head_mask, [[0, 0, 1]])
  assert select_thre(head, ffn, 100, config=cfg).heads == 0
  # Linear interpolation between order statistics (numpy's default).
  sel = select_thre(head, ffn, 10, config=cfg)
  want = np.percentile(np.r_[head.ravel(), ffn.ravel()], 10)
  assert sel.threshold == pytest.approx(want) and 0.5 < want < 1.0


# cfg.txt ---------------------------------------------------------------------------
def test_cfg_txt_round_trip():
  npz, meta = golden_pruning("tap")
  sel = select_sum(npz["head_importance"], npz["ffn_importance"], 0.4, config=TAP)
  text = cfg_txt(sel)
  assert text == "[5,3,1,2]\n[1511,1494,1483,1480]\n"
  assert parse_cfg_txt(text) == ((5, 3, 1, 2), (1511, 1494, 1483, 1480))
  assert parse_cfg_txt("[3, 0]\n[1420, 0]") == ((3, 0), (1420, 0))
  assert cfg_txt(TAP12.pruned((1,) * 12, (0,) * 12)) == (
      "[" + ",".join(["1"] * 12) + "]\n[" + ",".join(["0"] * 12) + "]\n")
  for bad in ("[1,2]\n", "[1,2]\n[3]\n", "[1,-2]\n[3,4]\n", "[1,2.5]\n[3,4]\n",
              "(1,2)\n[3,4]\n", "[]\n[]\n", "[1,2]\n[3,4]\n[5,6]\n", "1,2\nfoo\n"):
    with pytest.raises(ValueError, match="cfg.txt"):
      parse_cfg_txt(bad)


# Bad input -------------------------------------------------------------------------
def test_bad_input():
  rng = np.random.default_rng(0)
  head, ffn = random_scores(rng, 4, "chi2")
  for c in (0.0, -0.1, 1.01, float("nan"), "0.4", None):
    with pytest.raises(ValueError, match="constraint must be in"):
      select_sum(head, ffn, c)
  assert select_sum(head, ffn, 1.0).heads >= 1
  for p in (-1, 100.5, float("nan"), None):
    with pytest.raises(ValueError, match="percentile must be in"):
      select_thre(head, ffn, p)
  for fn, arg in ((select_sum, 0.5), (select_thre, 50)):
    with pytest.raises(ValueError, match="non-finite"):
      fn(np.where(head > 100, np.nan, head), ffn, arg)
    with pytest.raises(ValueError, match="non-finite"):
      fn(head, np.where(ffn > 5, np.inf, ffn), arg)
    with pytest.raises(ValueError, match="all importances are zero"):
      fn(np.zeros_like(head), np.zeros_like(ffn), arg)
    with pytest.raises(ValueError, match="has 4 layers but ffn_importance has 3"):
      fn(head, ffn[:3], arg)
    with pytest.raises(ValueError, match="must be \\[L, H\\]"):
      fn(head.reshape(-1), ffn, arg)
    with pytest.raises(ValueError, match="do not match the tap12 config"):
      fn(head, ffn, arg, config=TAP12)
    with pytest.raises(ValueError, match="do not match the tap config"):
      fn(head[:, :8], ffn, arg, config=TAP)
    with pytest.raises(ValueError, match="all have the same width"):
      fn(head, ffn, arg, config=TAP.pruned((12, 12, 12, 11), (3072,) * 4))
    with pytest.raises(ValueError, match="numeric"):
      fn(head > 1, ffn, arg)
    with pytest.raises(ValueError, match="not both"):
      fn(head, ffn, arg, config=TAP, costs=param_costs(TAP))
  # Every value(H) <= 0: upstream never assigns a selection and crashes.
  with pytest.raises(ValueError, match="positive value"):
    select_sum(-np.ones_like(head), -np.ones_like(ffn), 0.5)
  # Negative scores are allowed as long as some value(H) is positive.
  assert select_sum(head - 1.0, ffn - 1.0, 0.5).heads >= 1


def test_selection_is_frozen():
  npz, _ = golden_pruning("tap")
  sel = select_sum(npz["head_importance"], npz["ffn_importance"], 0.4)
  with pytest.raises(AttributeError):
    sel.heads = 3
  assert sel.kept_fraction == pytest.approx(sel.mmt_params / 28_351_488)
  assert selection.Selection.__dataclass_params__.frozen
