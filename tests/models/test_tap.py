"""Model behaviour on small shapes: decoding paths, masks, pruned shapes, config."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lfpr_jax.models.batch import model_inputs
from lfpr_jax.models.decoding import greedy_decode, greedy_decode_reference
from lfpr_jax.models.config import TapConfig
from lfpr_jax.models.losses import m4c_decoding_bce
from lfpr_jax.models.params import abstract_params, init_params
from lfpr_jax.models.tap import TAP
from tests.helpers import BASE, random_batch, random_params

def _setup(config, seed=0, batch_size=3):
  params = init_params(config, jax.random.key(seed))
  inputs = model_inputs(random_batch(config, batch_size, seed), config)
  return TAP(config), params, inputs


@pytest.mark.parametrize("learnable", [False, True])
def test_cached_greedy_equals_full_recompute(learnable):
  config = dataclasses.replace(BASE, learnable_masks=learnable)
  model, params, inputs = _setup(config)
  if learnable:  # real-valued masks, as after ReSt
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x * 0.3 + 0.9 if "mask" in str(p[-1]) else x, params)
  cached = jax.jit(lambda p, x: greedy_decode(model, {"params": p}, x))(params, inputs)
  ref = jax.jit(lambda p, x: greedy_decode_reference(model, {"params": p}, x))(
      params, inputs)
  np.testing.assert_array_equal(cached[1], ref[1])
  np.testing.assert_allclose(cached[0], ref[0], atol=1e-4, rtol=0)


def test_fewer_steps_are_a_prefix():
  model, params, inputs = _setup(BASE)
  full = jax.jit(lambda p, x: greedy_decode(model, {"params": p}, x))(params, inputs)
  part = jax.jit(lambda p, x: greedy_decode(model, {"params": p}, x, num_steps=4))(
      params, inputs)
  np.testing.assert_allclose(part[0], full[0][:, :4], atol=1e-5)
  np.testing.assert_array_equal(part[1], full[1][:, :4])
  with pytest.raises(ValueError, match="num_steps must be in"):
    greedy_decode(model, {"params": params}, inputs, num_steps=13)


def test_learnable_masks_act_like_mask_arguments():
  config = dataclasses.replace(BASE, learnable_masks=True)
  model, params, inputs = _setup(config)
  rng = np.random.default_rng(3)
  heads = [jnp.asarray(rng.random(h), jnp.float32) for h in config.mmt_heads]
  ffn = [jnp.asarray(rng.random(f), jnp.float32) for f in config.mmt_ffn]
  with_params = jax.tree.map(lambda x: x, params)  # a structural copy
  for i, (h, f) in enumerate(zip(heads, ffn)):
    layer = with_params[f"mmt_layer_{i}"]
    if h.size:
      layer["attention"]["head_mask"] = h
    if f.size:
      layer["ffn"]["ffn_mask"] = f
  a = model.apply({"params": with_params}, inputs)
  b = model.apply({"params": params}, inputs, head_mask=heads, ffn_mask=ffn)
  np.testing.assert_allclose(a, b, atol=1e-5)
  c = model.apply({"params": params}, inputs)
  assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-3


def test_masks_of_ones_are_a_no_op_and_zeros_prune():
  config = dataclasses.replace(BASE, mmt_heads=(2, 2), mmt_ffn=(64, 64))
  model, params, inputs = _setup(config)
  plain = model.apply({"params": params}, inputs)
  ones = model.apply({"params": params}, inputs, head_mask=jnp.ones((2, 2)),
                     ffn_mask=jnp.ones((2, 64)))
  np.testing.assert_array_equal(plain, ones)
  # Removing every head and neuron leaves LN(bias + x) blocks: the output then does
  # not depend on the attention / FFN kernels at all.
  zero = dict(head_mask=jnp.zeros((2, 2)), ffn_mask=jnp.zeros((2, 64)))
  out1 = model.apply({"params": params}, inputs, **zero)
  p2 = jax.tree_util.tree_map_with_path(
      lambda p, x: x * 2.0 if ("mmt_layer" in str(p[0]) and "kernel" in str(p[-1])
                               and ("query" in str(p) or "wi" in str(p)))
      else x, params)
  out2 = model.apply({"params": p2}, inputs, **zero)
  np.testing.assert_allclose(out1, out2, atol=1e-5)


def test_dropout_only_in_train_mode():
  config = dataclasses.replace(BASE, hidden_dropout=0.3)
  model, params, inputs = _setup(config)
  a = model.apply({"params": params}, inputs)
  b = model.apply({"params": params}, inputs)
  np.testing.assert_array_equal(a, b)
  k1, k2 = jax.random.split(jax.random.key(5))
  t1 = model.apply({"params": params}, inputs, train=True, rngs={"dropout": k1})
  t1b = model.apply({"params": params}, inputs, train=True, rngs={"dropout": k1})
  t2 = model.apply({"params": params}, inputs, train=True, rngs={"dropout": k2})
  np.testing.assert_array_equal(t1, t1b)
  assert np.abs(np.asarray(t1) - np.asarray(t2)).max() > 1e-3
  with pytest.raises(ValueError, match="needs an rng"):
    greedy_decode(model, {"params": params}, inputs, train=True)


def test_config_json_round_trip_and_validation():
  c = TapConfig.tap12().pruned([3] * 12, [100] * 12)
  assert TapConfig.from_json(c.to_json()) == c
  assert c.learnable_masks and c.mmt_layers == 12 and not c.is_unpruned
  assert TapConfig.tap().is_unpruned
  with pytest.raises(ValueError, match="mmt_heads has 2 layers but mmt_ffn has 1"):
    TapConfig(mmt_heads=(1, 2), mmt_ffn=(3,))
  with pytest.raises(ValueError, match=">= 0"):
    TapConfig(mmt_heads=(-1,), mmt_ffn=(3,))
  with pytest.raises(ValueError, match="unknown TapConfig fields \\['heads'\\]"):
    TapConfig.from_dict({"heads": 3})
  with pytest.raises(ValueError, match="need 4 per-layer"):
    TapConfig.tap().pruned([1, 2], [3, 4])


@pytest.mark.parametrize("train", [False, True])
def test_remat_keeps_param_names_outputs_and_gradients(train):
  # BASE has a layer without heads and one without FFN neurons; learnable masks and
  # mask arguments go through the rematerialised MMT layers too.
  config = dataclasses.replace(BASE, learnable_masks=True, hidden_dropout=0.2)
  remat = dataclasses.replace(config, remat=True)
  paths = lambda c: [jax.tree_util.keystr(p) for p, _ in
                     jax.tree_util.tree_leaves_with_path(abstract_params(c))]
  assert paths(remat) == paths(config)
  params = random_params(config, seed=1)
  raw = random_batch(config, 3, seed=2)
  full = model_inputs(raw, config, with_targets=True)
  targets, loss_mask = full.pop("targets"), full.pop("train_loss_mask")
  rng = np.random.default_rng(4)
  head_mask = [jnp.asarray(rng.random(h), jnp.float32) for h in config.mmt_heads]

  def loss_and_grads(c):
    def loss_fn(p):
      scores = TAP(c).apply({"params": p}, full, train=train, head_mask=head_mask,
                            rngs={"dropout": jax.random.key(7)} if train else {})
      return m4c_decoding_bce(scores, targets, loss_mask)
    return jax.jit(jax.value_and_grad(loss_fn))(params)

  (loss, grads), (loss_r, grads_r) = loss_and_grads(config), loss_and_grads(remat)
  assert np.isfinite(float(loss)) and float(loss) > 0
  np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
  flat, flat_r = (jax.tree_util.tree_leaves_with_path(g) for g in (grads, grads_r))
  assert [p for p, _ in flat] == [p for p, _ in flat_r]
  for (path, g), (_, g_r) in zip(flat, flat_r):
    scale = max(float(np.abs(g).max()), 1e-6)
    np.testing.assert_allclose(g_r, g, atol=1e-5 * scale, rtol=1e-5,
                               err_msg=jax.tree_util.keystr(path))
  # The text-BERT and every MMT layer receive gradients (the comparison is not vacuous).
  assert float(np.abs(grads["text_bert"]["layer_0"]["ffn"]["wi"]["kernel"]).max()) > 0
  assert float(np.abs(grads["mmt_layer_0"]["attention"]["head_mask"]).max()) > 0
