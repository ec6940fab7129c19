"""t* (docs/LFPR.md §2.3): per-sample first-max steps, the median rule, the streaming pass."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from lfpr_jax.models.decoding import greedy_decode_reference
from lfpr_jax.models.tap import TAP
from lfpr_jax.pruning import tstar
from lfpr_jax.training import parallel
from tests.helpers import TINY, model_batch, random_params


def test_t_star_percentile_then_truncate():
  assert tstar.t_star_of(np.array([0, 1]), 12) == 0        # median 0.5 -> 0
  assert tstar.t_star_of(np.array([1, 2, 2, 3]), 12) == 2
  assert tstar.t_star_of(np.array([3, 1, 2, 2, 9]), 12) == 2
  with pytest.raises(ValueError, match="t\\* must be"):
    tstar.check_t_star(12, 12)
  with pytest.raises(ValueError, match="at least one"):
    tstar.t_star_of(np.array([]), 12)


def test_first_max_step_ties_and_batch_search():
  s = np.zeros((2, 3, 4), np.float32)
  s[0, 1, 2] = s[0, 2, 0] = 5.0          # tie inside sample 0: first in (t, c) order
  s[1, 2, 3] = 5.0                        # sample 1's max equals sample 0's
  s[1, 0, 0] = 1.0
  np.testing.assert_array_equal(tstar.first_max_steps(jnp.asarray(s)), [1, 2])
  # Upstream's whole-batch search finds sample 0's value first for sample 1 too.
  np.testing.assert_array_equal(
      tstar.first_max_steps(jnp.asarray(s), batch_search=True), [1, 1])


def test_compute_tstar_streams_global_batches():
  """Steps of the real rows = first maxima of the 12-pass reference decoder."""
  model, params = TAP(TINY), random_params(TINY, 7)
  mesh = parallel.make_mesh()
  batches, want, qids = [], [], []
  for i in range(2):
    b = {k: np.asarray(v) for k, v in model_batch(TINY, 4, seed=30 + i).items()}
    b["weight"] = np.array([1, 1, 1, float(i == 0)], np.float32)
    b["question_id"] = np.arange(4 * i, 4 * i + 4, dtype=np.int32)
    scores, _ = greedy_decode_reference(model, {"params": params}, dict(b))
    steps = np.asarray(tstar.first_max_steps(scores))
    keep = b["weight"] > 0
    want.extend(steps[keep].tolist())
    qids.extend(b["question_id"][keep].tolist())
    batches.append(parallel.global_batch(b, mesh))
  out = tstar.compute_tstar(model, params, batches, mesh=mesh, bos_index=1)
  assert out["max_time_steps"] == want and out["question_ids"] == qids
  assert out["t_star"] == int(np.percentile(want, 50))
  assert sum(out["histogram"]) == 7 and len(out["histogram"]) == TINY.decode_steps
