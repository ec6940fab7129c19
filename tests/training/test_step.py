"""The data-parallel train step: loss decreases, frozen params stay, 1 device == 4,
micro-batches == one pass."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lfpr_jax.models.batch import model_inputs
from lfpr_jax.models.params import init_params
from lfpr_jax.models.tap import TAP
from lfpr_jax.training import optim, parallel
from lfpr_jax.training.step import (init_state, make_predict, make_train_step,
                                    sample_weights, sharded_loss, train_step)
from tests.helpers import BASE, TINY, labelled_batch, random_batch, random_params

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


# ---------------------------------------------------------------- micro-batches

# SGD at rate 1 that also keeps the last gradient as its state, so the gradients are
# compared exactly as the step computed them (Adam's first step would amplify noise
# on near-zero entries).
SGD = optax.chain(
    optax.GradientTransformation(lambda p: jax.tree.map(jnp.zeros_like, p),
                                 lambda g, s, p=None: (g, g)),
    optax.sgd(1.0))


def _micro_setup(batch_size=8):
  params = random_params(TINY, 0)
  rules = [(r"^mmt_layer_1/", "base"), (r"^classifier", "base")]
  trainable, frozen = optim.split_params(params, rules)
  batch = labelled_batch(batch_size, 3)
  # Unequal supervised steps per sample and one sample without any, so the
  # normalisation by the whole batch's (or shard's) step count matters.
  mask = batch["train_loss_mask"].copy()
  mask[1] = 0
  batch["train_loss_mask"] = mask
  assert len(set(mask.sum(axis=1))) > 2
  return trainable, frozen, batch


@functools.partial(jax.jit, static_argnames=("loss_shards", "microbatches"))
def _micro_step(trainable, frozen, batch, *, loss_shards, microbatches):
  return train_step(init_state(trainable, SGD), frozen, batch, jax.random.key(5),
                    model=TAP(TINY), tx=SGD, loss_shards=loss_shards,
                    microbatches=microbatches)


def _assert_steps_close(a, b):
  """Equal loss, grad norm, gradients and SGD-updated params up to float summation
  noise (gradients to 1e-6 of the largest gradient entry)."""
  (sa, ma), (sb, mb) = a, b
  np.testing.assert_allclose(float(ma["loss"]), float(mb["loss"]), rtol=2e-6)
  np.testing.assert_allclose(float(ma["grad_norm"]), float(mb["grad_norm"]), rtol=2e-6)
  ga, gb = optim.flat(sa.opt_state[0]), optim.flat(sb.opt_state[0])
  scale = max(np.abs(np.asarray(g)).max() for g in ga.values())
  assert scale > 0
  for p, g in ga.items():
    np.testing.assert_allclose(np.asarray(gb[p]), np.asarray(g), rtol=0,
                               atol=1e-6 * scale, err_msg=p)
  pa, pb = optim.flat(sa.params), optim.flat(sb.params)
  for p, v in pa.items():
    np.testing.assert_allclose(np.asarray(pb[p]), np.asarray(v), rtol=1e-6,
                               atol=1e-6 * scale, err_msg=p)


@pytest.mark.parametrize("loss_shards", [1, 2])
def test_microbatches_equal_one_pass(loss_shards):
  trainable, frozen, batch = _micro_setup()
  one = _micro_step(trainable, frozen, batch, loss_shards=loss_shards, microbatches=1)
  assert float(one[1]["grad_norm"]) > 0
  for m in (2, 4):
    _assert_steps_close(one, _micro_step(trainable, frozen, batch,
                                         loss_shards=loss_shards, microbatches=m))


def test_sample_weights_make_the_sharded_loss():
  rng = np.random.default_rng(0)
  scores = rng.standard_normal((4, 3, 5)).astype(np.float32)
  targets = (rng.random((4, 3, 5)) > 0.7).astype(np.float32)
  mask = np.array([[1, 1, 1], [1, 0, 0], [1, 1, 0], [0, 0, 0]], np.float32)
  from lfpr_jax.models.losses import m4c_bce_per_sample  # noqa: PLC0415
  per_sample = m4c_bce_per_sample(scores, targets, mask)
  for shards in (1, 2, 4):
    w = sample_weights(mask, shards)
    np.testing.assert_allclose(float(jnp.sum(w * per_sample)),
                               float(sharded_loss(scores, targets, mask, shards)),
                               rtol=1e-6)
  np.testing.assert_allclose(sample_weights(mask, 2), [1 / 8, 1 / 8, 1 / 4, 1 / 4])


def test_microbatches_must_divide_the_batch():
  trainable, frozen, batch = _micro_setup(6)
  with pytest.raises(ValueError, match="batch 6 is not divisible into 4 micro-batches"):
    _micro_step(trainable, frozen, batch, loss_shards=1, microbatches=4)
  with pytest.raises(ValueError, match="microbatches must be an integer >= 1"):
    make_train_step(TAP(TINY), SGD, parallel.make_mesh(jax.devices()[:1]),
                    microbatches=0)


def test_microbatches_with_dropout_fold_the_index_into_the_key():
  """Dropout on: micro-batch m uses fold_in(key, m), so the masks differ from the
  one-pass step's but the step still runs and trains."""
  config = dataclasses.replace(TINY, hidden_dropout=0.3)
  trainable, frozen, batch = _micro_setup()
  model = TAP(config)
  def loss(microbatches):
    step = jax.jit(functools.partial(train_step, model=model, tx=SGD,
                                     microbatches=microbatches))
    return step(init_state(trainable, SGD), frozen, batch, jax.random.key(5))[1]["loss"]
  one, two = loss(1), loss(2)
  # The same micro-batch loss recomputed by hand with its folded key.
  key = jax.random.fold_in(jax.random.key(5), 0)  # the step folds in state.step = 0
  w = sample_weights(batch["train_loss_mask"])
  from lfpr_jax.models.losses import m4c_bce_per_sample  # noqa: PLC0415
  @jax.jit
  def part_loss(part, w_part, part_key):
    scores = model.apply({"params": optim.merge_params(trainable, frozen)}, part,
                         train=True, rngs={"dropout": part_key})
    return jnp.sum(w_part * m4c_bce_per_sample(scores, part["targets"],
                                               part["train_loss_mask"]))
  total = sum(float(part_loss({k: v[m::2] for k, v in batch.items()}, w[m::2],
                              jax.random.fold_in(key, m))) for m in range(2))
  np.testing.assert_allclose(float(two), total, rtol=1e-5)
  assert not np.isclose(float(one), float(two), rtol=1e-5)  # noise: < 2e-6


def test_microbatches_data_parallel_equal_single_device_one_pass():
  """Strided micro-batches of a batch sharded on 4 devices == one pass on 1 device."""
  trainable, frozen, batch = _micro_setup(16)
  results = []
  for devices, m in ((1, 1), (4, 2)):
    mesh = parallel.make_mesh(jax.devices()[:devices])
    step = make_train_step(TAP(TINY), SGD, mesh, loss_shards=2, microbatches=m)
    state = parallel.replicate(init_state(jax.tree.map(np.array, trainable), SGD), mesh)
    results.append(step(state, parallel.replicate(frozen, mesh),
                        parallel.global_batch(batch, mesh), jax.random.key(5)))
  _assert_steps_close(*results)


@pytest.mark.parametrize("microbatches, want", [(1, (10, 20)), (2, (0, 0))])
def test_trimmed_step_runs_micro_batches_unpacked(monkeypatch, microbatches, want):
  """Packed row counts are the whole batch's: micro-batched steps run unpacked."""
  from lfpr_jax.training import step as step_module  # noqa: PLC0415
  built = []

  def fake_make_train_step(model, tx, mesh, **kwargs):
    built.append(model.config)
    return lambda *args: args
  monkeypatch.setattr(step_module, "make_train_step", fake_make_train_step)
  packed = dataclasses.replace(BASE, pack_rows=(10, 20))
  run = step_module.make_trimmed_train_step(TAP(BASE), None, None,
                                            microbatches=microbatches)
  run("state", "frozen", ("batch", packed, None), "rng")
  run("state", "frozen", ("batch", packed, None), "rng")
  assert [c.pack_rows for c in built] == [want]   # built once per shape
  assert run.num_specialisations() == 1
