"""Optimiser groups, trainable splits and the data-parallel train step."""

import dataclasses

import jax
import numpy as np
import pytest

from lfpr_jax.training import parallel
from lfpr_jax.training import step as train
from lfpr_jax.models.batch import model_inputs
from lfpr_jax.models.params import init_params
from lfpr_jax.models.tap import TAP
from tests.helpers import BASE, random_batch

CONFIG = dataclasses.replace(BASE, learnable_masks=True, hidden_dropout=0.0,
                             attention_dropout=0.0, obj_dropout=0.0, ocr_dropout=0.0)


def _setup(batch_size=8):
  params = init_params(CONFIG, jax.random.key(0))
  inputs = model_inputs(random_batch(CONFIG, batch_size), CONFIG, with_targets=True)
  return TAP(CONFIG), params, {k: np.asarray(v) for k, v in inputs.items()}


def test_groups_and_split():
  _, params, _ = _setup()
  groups = {p: train.group_of(p) for p in train.flat(params)}
  assert groups["text_bert/word/embedding"] == "text_bert"
  assert groups["obj_fc7/kernel"] == "fc7"
  assert groups["mmt_layer_0/attention/head_mask"] == "mask"
  assert groups["mmt_layer_0/ffn/ffn_mask"] == "mask"
  assert groups["classifier_embedding"] == "default"
  t, f = train.split_params(params, [r"mask$", r"^classifier", r"^mmt_layer_2/"])
  assert set(train.flat(t)) == {p for p in train.flat(params)
                                if p.endswith("mask") or p.startswith(("classifier",
                                                                        "mmt_layer_2/"))}
  merged = train.merge_params(t, f)
  assert jax.tree.structure(merged) == jax.tree.structure(params)
  with pytest.raises(ValueError, match="no parameter matches"):
    train.split_params(params, [r"^nothing$"])


def test_schedule_matches_pythia():
  s = train.upstream_schedule(1.0, warmup_steps=10, warmup_factor=0.2,
                              decay_steps=(20, 30), decay_ratio=0.1)
  np.testing.assert_allclose([float(s(i)) for i in (0, 5, 10, 11, 20, 29, 30)],
                             [0.2, 0.6, 1.0, 1.0, 0.1, 0.1, 0.01], rtol=1e-6)


def _run(mesh, steps=3, trainable=None):
  model, params, batch = _setup()
  host = jax.tree.map(np.array, params)  # the step donates (and deletes) its inputs
  t, f = train.split_params(params, trainable)
  tx = train.make_optimizer(t, lr=1e-3, warmup_steps=0)
  state = parallel.replicate(train.init_state(t, tx), mesh)
  f = parallel.replicate(f, mesh)
  step = train.make_train_step(model, tx, mesh)
  losses = []
  rng = jax.random.key(1)
  for _ in range(steps):
    state, m = step(state, f, parallel.global_batch(batch, mesh), rng)
    losses.append(float(m["loss"]))
  return state, f, losses, host


def test_loss_decreases_and_frozen_params_stay():
  mesh = parallel.make_mesh(jax.devices()[:1])
  state, frozen, losses, params = _run(mesh, steps=4,
                                       trainable=[r"mask$", r"^classifier", r"^ocr_ptr"])
  assert losses[-1] < losses[0]
  orig = train.flat(params)
  for p, v in train.flat(frozen).items():
    np.testing.assert_array_equal(np.asarray(v), np.asarray(orig[p]))
  moved = train.flat(state.params)
  assert any(np.abs(np.asarray(moved[p]) - np.asarray(orig[p])).max() > 0 for p in moved)


def test_data_parallel_equals_single_device():
  assert len(jax.devices()) >= 4, "conftest sets 4 fake CPU devices"
  one = _run(parallel.make_mesh(jax.devices()[:1]))
  four = _run(parallel.make_mesh(jax.devices()[:4]))
  np.testing.assert_allclose(one[2], four[2], rtol=1e-5)
  for p, v in train.flat(one[0].params).items():
    np.testing.assert_allclose(np.asarray(train.flat(four[0].params)[p]), np.asarray(v),
                               atol=2e-5, err_msg=p)


def test_batch_must_divide_devices():
  with pytest.raises(ValueError, match="not divisible"):
    parallel.check_batch_size(6, parallel.make_mesh(jax.devices()[:4]))
