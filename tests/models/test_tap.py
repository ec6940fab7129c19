"""Model behaviour on small shapes: decoding paths, masks, pruned shapes, config."""

import dataclasses

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from lfpr_jax.models.batch import DECODER_INPUTS, MODEL_INPUTS, model_inputs
from lfpr_jax.models.decoding import greedy_decode, greedy_decode_reference
from lfpr_jax.models.config import TapConfig
from lfpr_jax.models.losses import m4c_decoding_bce
from lfpr_jax.models import tap
from lfpr_jax.models.params import abstract_params, init_params
from lfpr_jax.models.tap import TAP
from tests.helpers import BASE, SMALL, random_batch, random_params

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


# Reduced precision (TapConfig.compute_dtype) -------------------------------------------

SMALL_BF16 = dataclasses.replace(SMALL, compute_dtype="bfloat16")
# bfloat16 keeps 8 significant bits: every matmul input is rounded with a relative
# error of up to 2^-9 ~ 2e-3. Through the ~10 matmuls in series of SMALL (encoders,
# text-BERT, two MMT layers, pointer net / classifier) these add up to ~0.3-1.3%
# relative L2 error in the scores and gradients (measured); 3e-2 leaves a 2x margin.
# The float32 path agrees with itself to ~1e-7, and the bfloat16 error is also
# required to exceed 1e-4, so a switch that silently stays float32 fails.
BF16_RTOL = 3e-2


def _rel_l2(ref, got):
  ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
  return np.linalg.norm(got - ref) / np.linalg.norm(ref)


def _loss_inputs(config, batch_size=2, seed=0):
  raw = random_batch(config, batch_size, seed)
  raw["context_info_0"]["max_features"] = np.full(batch_size, config.ocr_max)
  rng = np.random.default_rng(seed)
  raw["targets"] = (rng.random(raw["targets"].shape) < 0.05).astype(np.float32)
  full = model_inputs(raw, config, with_targets=True)
  return ({k: full[k] for k in MODEL_INPUTS + DECODER_INPUTS},
          full["targets"], full["train_loss_mask"])


def _scores_loss_grads(config, params, inputs, targets, loss_mask):
  """Scores, loss and its gradients w.r.t. params, head masks and FFN masks."""
  model = TAP(config)
  head = [jnp.ones(h) for h in config.mmt_heads]
  ffn = [jnp.ones(f) for f in config.mmt_ffn]

  def loss(p, hm, fm):
    s = model.apply({"params": p}, inputs, head_mask=hm, ffn_mask=fm)
    return m4c_decoding_bce(s, targets, loss_mask), s

  (l, s), g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(
      params, head, ffn)
  return s, l, g


def _dot_generals(jaxpr):
  """Every dot_general equation of a jaxpr, nested sub-jaxprs (pjit, ...) included."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      yield eqn
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      yield from _dot_generals(sub)


def test_compute_dtype_validated_and_round_trips():
  with pytest.raises(ValueError, match="compute_dtype must be one of"):
    TapConfig(compute_dtype="float16")
  assert TapConfig().compute_dtype == "float32"
  assert TapConfig.from_json(SMALL_BF16.to_json()) == SMALL_BF16


def test_bfloat16_close_to_float32_with_float32_outputs_and_grads():
  params = random_params(SMALL, 0)
  inputs, targets, loss_mask = _loss_inputs(SMALL)
  s32, l32, g32 = _scores_loss_grads(SMALL, params, inputs, targets, loss_mask)
  s16, l16, g16 = _scores_loss_grads(SMALL_BF16, params, inputs, targets, loss_mask)
  # Only the matmul inputs are bfloat16: outputs, loss and every gradient are float32,
  # and the parameters of a bfloat16 model are float32 too.
  assert s16.dtype == l16.dtype == jnp.float32
  assert {x.dtype for x in jax.tree.leaves(g16)} == {jnp.dtype(jnp.float32)}
  abstract = abstract_params(dataclasses.replace(SMALL_BF16, learnable_masks=True))
  assert {x.dtype for x in jax.tree.leaves(abstract)} == {jnp.dtype(jnp.float32)}
  assert (jax.tree.structure(abstract) == jax.tree.structure(
      abstract_params(dataclasses.replace(SMALL, learnable_masks=True))))

  assert 1e-4 < _rel_l2(s32, s16) < BF16_RTOL
  assert abs(float(l16) - float(l32)) < BF16_RTOL * abs(float(l32))
  # Head / neuron mask gradients (LFPR's importance scores) per layer.
  for ref, got in zip(jax.tree.leaves(g32[1:]), jax.tree.leaves(g16[1:])):
    assert _rel_l2(ref, got) < BF16_RTOL
  # Parameter gradients, skipping the attention key biases: their exact gradient is 0
  # (softmax ignores a per-query shift), so both precisions only show rounding noise.
  flat32 = jax.tree_util.tree_leaves_with_path(g32[0])
  for (path, ref), got in zip(flat32, jax.tree.leaves(g16[0])):
    name = jax.tree_util.keystr(path)
    if "['key']['bias']" in name and "ocr_ptr_net" not in name:
      assert np.abs(ref).max() < 1e-4, name
      continue
    assert _rel_l2(ref, got) < BF16_RTOL, name


def test_bfloat16_runs_every_matmul_on_bfloat16_inputs():
  inputs, _, _ = _loss_inputs(SMALL, batch_size=1)
  params = random_params(SMALL, 0)
  head = [jnp.ones(h) for h in SMALL.mmt_heads]

  def dots(config, grad):
    fn = lambda p, hm: TAP(config).apply({"params": p}, inputs, head_mask=hm).sum()
    fn = jax.grad(fn, argnums=(0, 1)) if grad else fn
    return [[v.aval.dtype for v in e.invars + e.outvars]
            for e in _dot_generals(jax.make_jaxpr(fn)(params, head).jaxpr)]

  bf16, f32 = jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)
  # Forward: 8 dense layers (object / OCR encoders, pointer-net query and key), per
  # BERT layer Q, K, V, QK^T, PV, out and 2 FFN (3 layers), the classifier and the
  # pointer scores: 8 + 3 * 8 + 2 = 34 products, all bf16 x bf16 -> f32.
  assert dots(SMALL_BF16, grad=False) == [[bf16, bf16, f32]] * 34
  # Backward (tap.bfloat16_einsum's custom VJP): the cotangent is cast to bfloat16 and
  # both transposed products of every forward product run bfloat16 x bfloat16 ->
  # float32 (XLA:CPU runs a float32 x bfloat16 product, or one with a bfloat16 result,
  # as a float32 product).
  backward = dots(SMALL_BF16, grad=True)
  assert backward == [[bf16, bf16, f32]] * (3 * 34)
  # float32 (the default) has no bfloat16 anywhere, forward or backward.
  assert {tuple(d) for d in dots(SMALL, grad=True)} == {(f32, f32, f32)}


def test_remat_keeps_param_names_outputs_and_gradients():
  """Dropout on: the rematerialised layers redraw the same dropout masks."""
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
      scores = TAP(c).apply({"params": p}, full, train=True, head_mask=head_mask,
                            rngs={"dropout": jax.random.key(7)})
      return m4c_decoding_bce(scores, targets, loss_mask)
    return jax.jit(jax.value_and_grad(loss_fn))(params)

  (loss, grads), (loss_r, grads_r) = loss_and_grads(config), loss_and_grads(remat)
  assert np.isfinite(float(loss)) and float(loss) > 0
  np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
  flat, flat_r = (jax.tree_util.tree_leaves_with_path(g) for g in (grads, grads_r))
  assert [p for p, _ in flat] == [p for p, _ in flat_r]
  largest = max(float(np.abs(g).max()) for g in jax.tree.leaves(grads))
  for (path, g), (_, g_r) in zip(flat, flat_r):
    name = jax.tree_util.keystr(path)
    if "['key']['bias']" in name and "ocr_ptr_net" not in name:
      # Exact gradient 0 (softmax ignores a per-query shift of the logits): both runs
      # hold rounding noise only, which recomputation may round differently.
      assert max(np.abs(g).max(), np.abs(g_r).max()) < 1e-6 * largest, name
      continue
    scale = max(float(np.abs(g).max()), 1e-6)
    np.testing.assert_allclose(g_r, g, atol=1e-5 * scale, rtol=1e-5, err_msg=name)
  # The text-BERT and every MMT layer receive gradients (the comparison is not vacuous).
  assert float(np.abs(grads["text_bert"]["layer_0"]["ffn"]["wi"]["kernel"]).max()) > 0
  assert float(np.abs(grads["mmt_layer_0"]["attention"]["head_mask"]).max()) > 0


@pytest.mark.parametrize("subscripts", ["ab,bc->ac", "bsd,dhk->bhsk", "bhqk,hkd->bqd",
                                        "bhqd,bhkd->bhqk", "btd,vd->btv"])
def test_bfloat16_einsum_gradients_are_the_transposed_products(subscripts):
  """The custom VJP equals autodiff of the same product on bfloat16-rounded operands
  and cotangent (both exact in float32), and every letter arrangement is handled."""
  ins, out = subscripts.split("->")
  sa, sb = ins.split(",")
  sizes = dict(zip("abcdefghijklmnopqrstuvwxyz", (3, 4, 5, 2, 6, 3, 4, 5, 2, 3) * 3))
  rng = np.random.default_rng(0)
  a, b, g = (jnp.asarray(rng.normal(size=[sizes[ch] for ch in t]), jnp.float32)
             for t in (sa, sb, out))
  r = lambda x: x.astype(jnp.bfloat16).astype(jnp.float32)  # noqa: E731
  y, vjp = jax.vjp(lambda a, b: tap.bfloat16_einsum(subscripts, a, b), a, b)
  y_ref, vjp_ref = jax.vjp(
      lambda a, b: jnp.einsum(subscripts, a, b, precision="highest"), r(a), r(b))
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  for got, ref in zip(vjp(g), vjp_ref(r(g))):
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_einsum_transposes_and_dot_general_subscripts():
  assert tap.einsum_transposes("bsd,dhk->bhsk") == ("bhsk,dhk->bsd", "bsd,bhsk->dhk")
  for bad in ("ab,bc", "ab->b", "aab,bc->ac", "abz,bc->ac", "ab,bc,cd->ad", "...a,ab->b"):
    with pytest.raises(ValueError, match="two operands"):
      tap.einsum_transposes(bad)
  # nn.Dense's call and a batched one: equal to lax.dot_general itself.
  rng = np.random.default_rng(1)
  for (ls, rs, dims) in [((2, 3, 4), (4, 5), (((2,), (0,)), ((), ()))),
                         ((2, 3, 4), (2, 4, 6), (((2,), (1,)), ((0,), (0,)))),
                         ((4, 3), (5, 4), (((0,), (1,)), ((), ())))]:
    x, w = rng.normal(size=ls), rng.normal(size=rs)
    sub = tap.dot_general_subscripts(len(ls), len(rs), dims)
    np.testing.assert_allclose(np.einsum(sub, x, w), jax.lax.dot_general(
        jnp.asarray(x), jnp.asarray(w), dims, precision="highest"), rtol=1e-5)
  with pytest.raises(ValueError, match="float32 operands"):
    tap.bfloat16_einsum("ab,bc->ac", jnp.ones((2, 2), jnp.bfloat16), jnp.ones((2, 2)))
