"""Shared experiment helpers (lfpr_jax/experiments/common.py)."""

import dataclasses
import os
import types

import ml_collections
import numpy as np
import pytest

from lfpr_jax.experiments import common
from lfpr_jax.pruning import latency, selection
from tests.helpers import TINY

# Two MMT layers of 2 heads x 32 and 64 neurons: a budget has something to choose.
CONFIG = dataclasses.replace(TINY, mmt_ffn=(64, 64))


def _setup(tmp_path):
  """What `select_budget` reads of a Setup: the model config, prune config and dir."""
  prune = ml_collections.ConfigDict(dict(latency_batch=1))
  return types.SimpleNamespace(
      base_config=CONFIG, config=ml_collections.ConfigDict(dict(prune=prune)),
      path=lambda *p: os.path.join(str(tmp_path), *p))


def _scores(seed=0):
  rng = np.random.default_rng(seed)
  return rng.random((2, 2)), rng.random((2, 64))


@pytest.mark.parametrize("cost", ["params", "flops"])
def test_select_budget_is_select_sum_under_the_cost(tmp_path, cost):
  head, ffn = _scores()
  got = common.select_budget(_setup(tmp_path), head, ffn, 0.5, cost=cost,
                             strict_budget=True, round_to=8)
  kw = (dict(config=CONFIG) if cost == "params"
        else dict(costs=selection.flops_costs(CONFIG)))
  want = selection.select_sum(head, ffn, 0.5, strict_budget=True, round_to=8, **kw)
  np.testing.assert_array_equal(got.head_mask, want.head_mask)
  np.testing.assert_array_equal(got.ffn_mask, want.ffn_mask)
  assert all(n % 8 == 0 for n in got.ffn_mask.sum(1))


def test_select_budget_latency_uses_the_workdir_table(tmp_path, monkeypatch):
  """cost="latency": the device table of `prune.latency_batch`, kept in the stage dir
  (its timing is tests/pruning/test_latency.py's subject; here a made-up table)."""
  table = latency.LatencyCosts(attn=(0.0, 1.0, 2.0), ffn_a=0.5, ffn_b=0.05, ffn_t=8.0,
                               max_heads=2, max_neurons=64,
                               params=selection.param_costs(CONFIG))
  calls = []

  def measure(config, *, batch_size, cache_dir):
    calls.append((config, batch_size, cache_dir))
    return table
  monkeypatch.setattr(latency, "measure_table", measure)
  s = _setup(tmp_path)
  s.config.prune.latency_batch = 4
  head, ffn = _scores(1)
  sel = common.select_budget(s, head, ffn, 0.5, cost="latency", strict_budget=False,
                             round_to=8)
  assert calls == [(CONFIG, 4, str(tmp_path / "latency"))]
  want = latency.select_latency(head, ffn, 0.5, costs=table, round_to=8)
  np.testing.assert_array_equal(sel.head_mask, want.head_mask)
  np.testing.assert_array_equal(sel.ffn_mask, want.ffn_mask)
  kept = sum(table.layer_cost(int(h), int(n)) for h, n in
             zip(sel.head_mask.sum(1), sel.ffn_mask.sum(1)))
  assert kept <= 0.5 * 2 * table.layer_cost(2, 64) + 1e-9
