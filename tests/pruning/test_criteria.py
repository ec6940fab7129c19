"""Importance criteria (docs/LFPR.md §3, §8) on small shapes: registry, label check, l1, the
labelled and label-free mask gradients, alg post-processing."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lfpr_jax.pruning import criteria
from lfpr_jax.pruning import scoring
from lfpr_jax.pruning import selection
from lfpr_jax.models.losses import m4c_decoding_bce
from lfpr_jax.models.decoding import greedy_decode_reference
from lfpr_jax.models.params import init_params
from lfpr_jax.models.tap import TAP
from tests.helpers import TINY, labelled_batch, model_batch, random_params


@pytest.fixture(scope="module")
def small_model():
  return TAP(TINY), random_params(TINY, 7)


# One compiled per-batch gradient shared by the tests (same model, shapes and keys).
GRADS = jax.jit(criteria.loss_mask_grads, static_argnums=0)


# ------------------------------------------------------------------------ registry


def test_registry_and_errors(small_model):
  assert criteria.CRITERIA == ("lfpr", "l1", "alg", "fisher", "owo")
  needs = {n: criteria.get_criterion(n).needs_labels for n in criteria.CRITERIA[:4]}
  assert needs == {"lfpr": False, "l1": False, "alg": True, "fisher": True}
  assert criteria.get_criterion("alg").reduction == "abs"
  assert criteria.get_criterion("fisher").reduction == "square"
  assert not criteria.get_criterion("l1").needs_data
  for bad in ("L1", "taylor", "", None, 3):
    with pytest.raises(ValueError, match="valid criteria: lfpr, l1, alg, fisher, owo"):
      criteria.get_criterion(bad)
  assert all(isinstance(criteria.get_criterion(n), criteria.REGISTRY[n])
             for n in criteria.CRITERIA)
  lfpr = criteria.get_criterion("lfpr", t_star=2, bos_index=1, dropout=True)
  assert (lfpr.t_star, lfpr.dropout, lfpr.per_sample) == (2, True, False)
  assert criteria.get_criterion(lfpr) is lfpr
  with pytest.raises(ValueError, match="takes the options"):
    criteria.get_criterion("fisher", t_star=1)
  owo = criteria.get_criterion("owo")
  assert not owo.defined
  model, params = small_model
  for exc in (NotImplementedError, ValueError):
    with pytest.raises(exc, match="'owo' is not defined.*§8.5"):
      scoring.compute("owo", model, params, [labelled_batch(4, 0)])


def test_check_labels():
  for name in ("alg", "fisher"):
    with pytest.raises(ValueError, match="needs ground-truth answers.*2 of 3"):
      criteria.check_labels(name, np.array([True, False, False]))
    with pytest.raises(ValueError, match="1 of 1 examples of the data"):
      criteria.check_labels(name, False)
    with pytest.raises(ValueError, match="no 'has_answers' field"):
      criteria.check_labels(name, {"cmb_text": np.zeros((2, 3))})
    criteria.check_labels(name, True)
    # Padding rows (weight 0) are not examples.
    criteria.check_labels(name, {"has_answers": np.array([True, False]),
                                 "weight": np.array([1.0, 0.0])})
  for name in ("lfpr", "l1"):
    criteria.check_labels(name, False)      # label-free: anything goes
  with pytest.raises(ValueError, match="label-free criterion \\(lfpr, l1\\)"):
    criteria.check_labels("fisher", {"has_answers": np.zeros(4, bool)})


# ---------------------------------------------------------------------------- l1


def test_l1_against_pytorch_layout_hand_computation(small_model):
  model, params = small_model
  head, ffn = criteria.l1_scores(params, TINY)
  d, dh, h = TINY.hidden_size, TINY.head_dim, 2
  assert head.shape == (2, 2) and ffn.shape == (2, 16) and head.dtype == np.float64
  for i in range(2):
    layer = jax.tree.map(np.asarray, params[f"mmt_layer_{i}"])
    a, f = layer["attention"], layer["ffn"]
    # PyTorch Linear weights [out, in].
    wq, wk, wv = (a[n]["kernel"].reshape(d, h * dh).T for n in ("query", "key", "value"))
    wo = a["out"]["kernel"].reshape(h * dh, d).T          # [d, h·dh]
    w1, w2 = f["wi"]["kernel"].T, f["wo"]["kernel"].T      # [F, d], [d, F]
    for j in range(h):
      want = 0.0
      for r in range(dh * j, dh * (j + 1)):
        want += (np.abs(wq[r, :]).sum() + np.abs(wk[r, :]).sum()
                 + np.abs(wv[r, :]).sum() + np.abs(wo[:, r]).sum())
      np.testing.assert_allclose(head[i, j], want, rtol=1e-6)
    for n in range(16):
      np.testing.assert_allclose(ffn[i, n], np.abs(w1[n, :]).sum() + np.abs(w2[:, n]).sum(),
                                 rtol=1e-6)
  out = scoring.compute("l1", model, params)   # no data needed
  np.testing.assert_array_equal(out.head, head)
  assert out.head_grads is None and out.num_samples == 0
  assert selection.select_sum(out.head, out.ffn, 0.5, config=TINY).heads >= 1


# ------------------------------------------------------------- labelled gradients


def test_loss_mask_grads_equal_independent_gradients(small_model):
  model, params = small_model
  batch = {k: jnp.asarray(v) for k, v in labelled_batch(4, 1).items()}

  # 1. jax.grad of the loss written out here w.r.t. explicit masks.
  def loss(h, f):
    scores = model.apply({"params": params}, batch, head_mask=h, ffn_mask=f)
    s = scores.astype(jnp.float32)
    bce = jnp.maximum(s, 0) - s * batch["targets"] + jnp.log1p(jnp.exp(-jnp.abs(s)))
    m = batch["train_loss_mask"]
    return jnp.sum(bce.sum(-1) * m) / jnp.sum(m)

  # 2. Without masks at all: dL/dν_n = Σ_k W2[n,k] dL/dW2[n,k] and
  #    dL/dξ_h = Σ W_O[h] · dL/dW_O[h] (the mask scales exactly these inputs).
  def plain(p):
    scores = model.apply({"params": p}, batch)
    return m4c_decoding_bce(scores, batch["targets"], batch["train_loss_mask"])

  @jax.jit   # one compilation for both references
  def references():
    return (jax.grad(loss, argnums=(0, 1))(jnp.ones((2, 2)), jnp.ones((2, 16))),
            jax.grad(plain)(params))
  gh, gf = GRADS(model, params, batch)
  (rh, rf), gp = references()
  assert gh.shape == (2, 2) and gf.shape == (2, 16)
  np.testing.assert_allclose(gh, rh, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(gf, rf, rtol=1e-4, atol=1e-6)
  for i in range(2):
    layer, glayer = params[f"mmt_layer_{i}"], gp[f"mmt_layer_{i}"]
    wo, gwo = layer["ffn"]["wo"]["kernel"], glayer["ffn"]["wo"]["kernel"]
    np.testing.assert_allclose(gf[i], (wo * gwo).sum(1), rtol=1e-3, atol=1e-6)
    o, go = layer["attention"]["out"]["kernel"], glayer["attention"]["out"]["kernel"]
    np.testing.assert_allclose(gh[i], (o * go).sum((1, 2)), rtol=1e-3, atol=1e-6)
  assert np.abs(np.asarray(gh)).min() > 0 and np.abs(np.asarray(gf)).max() > 0


def test_group_grads_and_padding(small_model):
  model, params = small_model
  batch = labelled_batch(8, 2)
  batch["weight"] = np.array([1, 1, 1, 1, 1, 1, 1, 0], np.float32)   # last row padding
  crit = criteria.get_criterion("fisher")
  assert not crit.per_sample
  fn = jax.jit(crit.grads_fn(model, group_size=4))
  gh, gf = (np.asarray(x) for x in fn(params, batch, None))
  assert gh.shape == (2, 2, 2) and gf.shape == (2, 2, 16)
  # A padding row adds no loss and no supervised steps: as if its loss mask were 0
  # (samples do not interact in eval mode, so = the batch of the 3 real rows).
  sub = lambda sl: {k: jnp.asarray(v[sl]) for k, v in batch.items() if k != "weight"}
  second = sub(slice(4, 8))
  second["train_loss_mask"] = second["train_loss_mask"].at[3].set(0.0)
  want = [GRADS(model, params, sub(slice(0, 4))), GRADS(model, params, second)]
  for g in range(2):
    np.testing.assert_allclose(gh[g], want[g][0], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(gf[g], want[g][1], rtol=1e-4, atol=1e-6)
  with pytest.raises(ValueError, match="not a multiple of group_size"):
    criteria.group_loss_mask_grads(model, params, batch, group_size=3)


def test_postprocess_alg():
  head = np.array([[3.0, 4.0], [1.0, 0.0]])
  ffn = np.array([[1.0, 2.0, 2.0], [0.0, 0.0, 4.0]])
  h, f = criteria.postprocess_alg(head, ffn)
  np.testing.assert_allclose(h, [[0.6, 0.8], [1.0, 0.0]])
  np.testing.assert_array_equal(f, ffn)
  h, f = criteria.postprocess_alg(head, ffn, normalize_by_layer=False,
                                  normalize_ffn_by_layer=True, global_minmax=True)
  np.testing.assert_allclose(h, [[0.75, 1.0], [0.25, 0.0]])
  np.testing.assert_allclose(f, [[1 / 3, 2 / 3, 2 / 3], [0, 0, 1]])
  assert head[0, 0] == 3.0   # inputs untouched


# ------------------------------------------------------------- label-free (LFPR)


@pytest.fixture(scope="module")
def ptr_model():
  params = init_params(TINY, jax.random.key(3))
  # Larger pointer queries so that OCR copies win some steps, as in the golden model.
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: x * 4 if "ocr_ptr_net" in jax.tree_util.keystr(p) else x, params)
  return TAP(TINY), params


@pytest.mark.parametrize("t_star", [0, 2])
def test_per_sample_grads_equal_upstream_structure(ptr_model, t_star):
  """vmap(grad) through the cached decoder equals grad of upstream's last pass
  (t*+1 full passes, earlier passes only feed argmaxes), sample by sample."""
  model, params = ptr_model
  inputs = model_batch(TINY, 4)
  w = jnp.array([1.0, 1.0, 1.0, 0.0])
  values, gh, gf = jax.jit(lambda x, w: criteria.per_sample_mask_grads(
      model, params, x, w, t_star=t_star, bos_index=1))(inputs, w)
  ones = (jnp.ones((2, 2)), jnp.ones((2, 16)))

  def upstream(h, f, x):
    scores, _ = greedy_decode_reference(model, {"params": params}, x,
                                        num_steps=t_star + 1, head_mask=h, ffn_mask=f)
    return jnp.sum(jnp.max(scores[:, t_star], axis=-1))
  upstream_grad = jax.jit(jax.value_and_grad(upstream, argnums=(0, 1)))
  for i in range(4):
    xi = jax.tree.map(lambda a: a[i:i + 1], inputs)
    v, (rh, rf) = upstream_grad(*ones, xi)
    scale = float(w[i])
    np.testing.assert_allclose(values[i], scale * v, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gh[i], scale * rh, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(gf[i], scale * rf, rtol=1e-4, atol=1e-5)
  assert np.abs(np.asarray(gh[:3])).max() > 0   # the test can fail: grads are non-zero


def test_group_grads_are_sums_of_sample_grads(ptr_model):
  """Invariant 3: with dropout rates 0, a batch's gradient = sum of per-sample ones."""
  model, params = ptr_model
  inputs = model_batch(TINY, 8, seed=5)
  w = jnp.ones(8)
  _, gh, gf = jax.jit(lambda x, w: criteria.per_sample_mask_grads(
      model, params, x, w, t_star=1, bos_index=1))(inputs, w)
  _, Gh, Gf = jax.jit(lambda x, w: criteria.group_mask_grads(
      model, params, x, w, jax.random.key(0), t_star=1, bos_index=1, group_size=4))(
          inputs, w)
  np.testing.assert_allclose(Gh, gh.reshape(2, 4, 2, 2).sum(1), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(Gf, gf.reshape(2, 4, 2, 16).sum(1), rtol=1e-4, atol=1e-5)
