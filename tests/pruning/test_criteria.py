"""Importance criteria (LFPR.md §8) on small shapes: registry, label check, l1, alg,
fisher and lfpr behind one interface."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lfpr_jax.pruning import criteria
from lfpr_jax.pruning import scoring as importance
from lfpr_jax.pruning import selection
from lfpr_jax.models.batch import model_inputs
from lfpr_jax.models.losses import m4c_decoding_bce
from lfpr_jax.models.params import abstract_params
from lfpr_jax.models.tap import TAP
from tests.helpers import TINY, model_batch, random_batch, random_params


@pytest.fixture(scope="module")
def small_model():
  return TAP(TINY), random_params(TINY, 7)


# One compiled per-batch gradient shared by the tests (same model, shapes and keys).
GRADS = jax.jit(criteria.loss_mask_grads, static_argnums=0)


def labelled_batch(batch_size: int, seed: int) -> dict:
  """Model inputs with ground-truth teacher forcing, targets, has_answers."""
  raw = random_batch(TINY, batch_size, seed)
  rng = np.random.default_rng(seed)
  raw["targets"] = (rng.random(raw["targets"].shape) < 0.05).astype(np.float32)
  raw["train_loss_mask"] = (np.arange(TINY.decode_steps)[None]
                            < rng.integers(1, TINY.decode_steps + 1, (batch_size, 1))
                            ).astype(np.float32)
  out = {k: np.asarray(v) for k, v in model_inputs(raw, TINY, with_targets=True).items()}
  out["has_answers"] = np.ones(batch_size, bool)
  return out


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
  owo = criteria.get_criterion("owo")
  assert not owo.defined
  model, params = small_model
  for exc in (NotImplementedError, ValueError):
    with pytest.raises(exc, match="'owo' is not defined.*§8.5"):
      criteria.compute_scores("owo", model, params, [labelled_batch(4, 0)])


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


def test_labelled_criterion_refuses_unlabelled_batches_before_work(small_model,
                                                                   monkeypatch):
  model, params = small_model
  calls = []

  def spy(*args, **kwargs):
    def fn(params, batch):
      calls.append(1)
      raise AssertionError("gradients computed on unlabelled data")
    return fn
  monkeypatch.setattr(criteria, "make_loss_grads_fn", spy)
  batch = labelled_batch(4, 0)
  batch["has_answers"] = np.array([True, False, True, True])
  with pytest.raises(ValueError, match="'alg' needs ground-truth answers.*batch 0"):
    criteria.compute_scores("alg", model, params, [batch])
  del batch["has_answers"]
  with pytest.raises(ValueError, match="has_answers"):
    criteria.compute_scores("fisher", model, params, [batch])
  assert not calls


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
  out = criteria.compute_scores("l1", model, params)   # no data needed
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
  fn = criteria.make_loss_grads_fn(model, group_size=4)
  assert criteria.make_loss_grads_fn(model, group_size=4) is fn   # cached
  gh, gf, rows = (np.asarray(x) for x in fn(params, batch))
  assert gh.shape == (2, 2, 2) and gf.shape == (2, 2, 16)
  np.testing.assert_array_equal(rows, [4, 3])
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


def test_alg_and_fisher_accumulate_per_batch_gradients(small_model):
  model, params = small_model
  batches = [labelled_batch(8, 10 + i) for i in range(2)]
  batches[1]["weight"] = np.array([1] * 5 + [0] * 3, np.float32)   # partial last batch
  batches[1]["has_answers"][5:] = False                           # padding: unchecked
  mesh = criteria.parallel.make_mesh()                            # 4 CPU devices
  fisher = criteria.compute_scores("fisher", model, params, batches, group_size=4,
                                   mesh=mesh)
  # The per-batch gradients, group by group (the unsharded function checked above).
  fn = criteria.make_loss_grads_fn(model, group_size=4)
  want_h, want_f = [], []
  for b in batches:
    gh, gf, rows = (np.asarray(x) for x in fn(params, criteria._with_weight(b)))
    want_h.extend(gh[rows > 0])
    want_f.extend(gf[rows > 0])
  want_h, want_f = np.stack(want_h), np.stack(want_f)
  assert fisher.head_grads.shape == (4, 2, 2) and fisher.ffn_grads.shape == (4, 2, 16)
  np.testing.assert_allclose(fisher.head_grads, want_h, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(fisher.ffn_grads, want_f, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(fisher.head, (want_h.astype(np.float64) ** 2).sum(0),
                             rtol=1e-4)
  np.testing.assert_allclose(fisher.ffn, (want_f.astype(np.float64) ** 2).sum(0),
                             rtol=1e-4)
  assert fisher.num_samples == 13 and fisher.num_batches == 4

  alg = criteria.compute_scores("alg", model, params, batches, group_size=4,
                                normalize_by_layer=False)
  raw_h, raw_f = np.abs(want_h).sum(0), np.abs(want_f).sum(0)
  np.testing.assert_allclose(alg.head, raw_h, rtol=1e-4)
  np.testing.assert_allclose(alg.ffn, raw_f, rtol=1e-4)
  np.testing.assert_allclose(alg.head_grads, fisher.head_grads, rtol=1e-4, atol=1e-6)
  # Default: each layer's head scores divided by the layer's L2 norm; neurons raw.
  alg = criteria.compute_scores("alg", model, params, batches, group_size=4)
  np.testing.assert_allclose(alg.head, raw_h / np.linalg.norm(raw_h, axis=1,
                                                               keepdims=True), rtol=1e-4)
  np.testing.assert_allclose(np.linalg.norm(alg.head, axis=1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(alg.ffn, raw_f, rtol=1e-4)
  assert alg.options["normalize_by_layer"] and not alg.options["global_minmax"]


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


# ------------------------------------------------------------------------- lfpr


def test_lfpr_criterion_delegates_to_importance(small_model, monkeypatch):
  """`lfpr` = importance.py's per-sample gradients, accumulated as upstream, with
  the faithful per-batch gradients kept (the gradients themselves are tested in
  test_lfpr.py)."""
  model, params = small_model
  batches = []
  for i in range(2):
    b = {k: np.asarray(v) for k, v in model_batch(TINY, 4, seed=20 + i).items()}
    b["question_id"] = np.arange(4 * i, 4 * i + 4, dtype=np.int32)
    batches.append(b)
  batches[1]["weight"] = np.array([1, 1, 1, 0], np.float32)
  seen = []
  real = importance.make_grads_fn

  def spy(*args, **kwargs):
    fn = real(*args, **kwargs)

    def wrapped(*a):
      out = fn(*a)
      seen.append([np.asarray(x) for x in out])
      return out
    return wrapped
  monkeypatch.setattr(importance, "make_grads_fn", spy)
  out = criteria.compute_scores("lfpr", model, params, batches, group_size=2,
                                t_star=0, bos_index=1)
  acc = importance.ImportanceAccumulator((2, 2), (2, 16), group_size=2)
  gs_h = []
  for (_, gh, gf), keep in zip(seen, ([0, 1, 2, 3], [0, 1, 2])):
    assert gh.shape == (4, 2, 2)
    acc.add_samples(gh[keep], gf[keep], np.arange(len(keep)))
    gs_h.extend(gh[keep])
  imp = acc.result(0)
  np.testing.assert_allclose(out.head, imp.head, rtol=1e-6)
  np.testing.assert_allclose(out.ffn, imp.ffn, rtol=1e-6)
  assert out.head_grads.shape == (4, 2, 2) and out.num_samples == 7
  gs_h = np.stack(gs_h)
  want = np.stack([gs_h[0:2].sum(0), gs_h[2:4].sum(0), gs_h[4:6].sum(0), gs_h[6]])
  np.testing.assert_allclose(out.head_grads, want, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose((out.ffn_grads.astype(np.float64) ** 2).sum(0), out.ffn,
                             rtol=1e-4)
  assert np.abs(out.head_grads).max() > 0
  assert out.options == {"group_size": 2, "t_star": 0, "dropout": False}
  with pytest.raises(ValueError, match="t_star and bos_index"):
    criteria.compute_scores("lfpr", model, params, batches)
  with pytest.raises(ValueError, match="pass batches"):
    criteria.compute_scores("fisher", model, params)


def test_recording_accumulator_partial_group():
  rng = np.random.default_rng(0)
  gh, gf = rng.normal(size=(5, 2, 3)), rng.normal(size=(5, 2, 4))
  acc = criteria.RecordingImportanceAccumulator((2, 3), (2, 4), group_size=2)
  acc.add_samples(gh[:3], gf[:3], np.arange(3))
  acc.add_samples(gh[3:], gf[3:], np.arange(3, 5))
  imp = acc.result(0)
  bh, bf = acc.batch_grads()
  np.testing.assert_allclose(bh, np.stack([gh[:2].sum(0), gh[2:4].sum(0), gh[4]]),
                             rtol=1e-6)
  np.testing.assert_allclose((bh.astype(np.float64) ** 2).sum(0), imp.head, rtol=1e-6)
  np.testing.assert_allclose((bf.astype(np.float64) ** 2).sum(0), imp.ffn, rtol=1e-6)


def test_scores_save_load(tmp_path):
  s = criteria.CriterionScores("fisher", np.ones((2, 2)), np.ones((2, 3)),
                               np.zeros((4, 2, 2), np.float32),
                               np.zeros((4, 2, 3), np.float32), num_samples=9,
                               options={"group_size": 8})
  s.save(str(tmp_path / "s.npz"))
  back = criteria.CriterionScores.load(str(tmp_path / "s.npz"))
  assert back.criterion == "fisher" and back.num_batches == 4 and back.num_samples == 9
  assert back.options == {"group_size": 8}
  l1 = criteria.CriterionScores("l1", np.ones((2, 2)), np.ones((2, 3)))
  l1.save(str(tmp_path / "l1.npz"))
  assert criteria.CriterionScores.load(str(tmp_path / "l1.npz")).head_grads is None
