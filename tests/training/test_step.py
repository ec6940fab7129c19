"""The data-parallel train step: loss decreases, frozen params stay, 1 device == 4."""

import dataclasses

import jax
import numpy as np
import pytest

from lfpr_jax.models.batch import model_inputs
from lfpr_jax.models.params import init_params
from lfpr_jax.models.tap import TAP
from lfpr_jax.training import optim, parallel
from lfpr_jax.training.step import init_state, make_predict, make_train_step, sharded_loss
from tests.helpers import BASE, random_batch

CONFIG = dataclasses.replace(BASE, learnable_masks=True, hidden_dropout=0.0,
                             attention_dropout=0.0, obj_dropout=0.0, ocr_dropout=0.0)


def _setup(batch_size=8):
  params = init_params(CONFIG, jax.random.key(0))
  inputs = model_inputs(random_batch(CONFIG, batch_size), CONFIG, with_targets=True)
  return TAP(CONFIG), params, {k: np.asarray(v) for k, v in inputs.items()}


def _run(mesh, steps=3, rules=((".*", "base"),)):
  model, params, batch = _setup()
  host = jax.tree.map(np.array, params)  # the step donates (and deletes) its inputs
  t, f = optim.split_params(params, rules)
  tx = optim.make_optimizer(t, rules, {"base": 1e-3, "mask": 1e-3}, warmup_steps=0)
  state = parallel.replicate(init_state(t, tx), mesh)
  f = parallel.replicate(f, mesh)
  step = make_train_step(model, tx, mesh)
  losses = []
  rng = jax.random.key(1)
  for _ in range(steps):
    state, m = step(state, f, parallel.global_batch(batch, mesh), rng)
    losses.append(float(m["loss"]))
  assert int(state.step) == steps
  return state, f, losses, host


def test_loss_decreases_and_frozen_params_stay():
  mesh = parallel.make_mesh(jax.devices()[:1])
  rules = [(r"mask$", "mask"), (r"^classifier", "base"), (r"^ocr_ptr", "base")]
  state, frozen, losses, params = _run(mesh, steps=4, rules=rules)
  assert losses[-1] < losses[0]
  orig = optim.flat(params)
  for p, v in optim.flat(frozen).items():
    np.testing.assert_array_equal(np.asarray(v), np.asarray(orig[p]))
  moved = optim.flat(state.params)
  assert any(np.abs(np.asarray(moved[p]) - np.asarray(orig[p])).max() > 0 for p in moved)


def test_data_parallel_equals_single_device():
  assert len(jax.devices()) >= 4, "conftest sets 4 fake CPU devices"
  one = _run(parallel.make_mesh(jax.devices()[:1]))
  four = _run(parallel.make_mesh(jax.devices()[:4]))
  np.testing.assert_allclose(one[2], four[2], rtol=1e-5)
  for p, v in optim.flat(one[0].params).items():
    np.testing.assert_allclose(np.asarray(optim.flat(four[0].params)[p]), np.asarray(v),
                               atol=2e-5, err_msg=p)


def test_sharded_loss_averages_per_shard_losses():
  rng = np.random.default_rng(0)
  scores = rng.standard_normal((4, 3, 5)).astype(np.float32)
  targets = (rng.random((4, 3, 5)) > 0.7).astype(np.float32)
  mask = np.array([[1, 1, 1], [1, 0, 0], [1, 1, 0], [0, 0, 0]], np.float32)
  halves = [sharded_loss(scores[i:i + 2], targets[i:i + 2], mask[i:i + 2])
            for i in (0, 2)]
  np.testing.assert_allclose(sharded_loss(scores, targets, mask, shards=2),
                             np.mean(halves), rtol=1e-6)
  assert not np.isclose(float(sharded_loss(scores, targets, mask)), np.mean(halves))
  with pytest.raises(ValueError, match="not divisible"):
    sharded_loss(scores, targets, mask, shards=3)


def test_predict_is_replicated_argmax():
  model, params, batch = _setup(4)
  mesh = parallel.make_mesh(jax.devices()[:2])
  out = make_predict(model, mesh, bos_index=1)(parallel.replicate(params, mesh),
                                               parallel.global_batch(batch, mesh))
  assert out.shape == (4, CONFIG.decode_steps) and out.sharding.is_fully_replicated


def test_batch_must_divide_devices():
  with pytest.raises(ValueError, match="not divisible"):
    parallel.check_batch_size(6, parallel.make_mesh(jax.devices()[:4]))
