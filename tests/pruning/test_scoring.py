"""The one scoring loop (docs/LFPR.md §3, §8): accumulation, grouping, padding, the label
check before work, every criterion through `scoring.compute`, Scores save/load."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from lfpr_jax.models.tap import TAP
from lfpr_jax.pruning import criteria
from lfpr_jax.pruning import scoring
from lfpr_jax.training import parallel
from tests.helpers import TINY, labelled_batch, model_batch, random_params

FISHER, LFPR = criteria.Fisher(), criteria.Lfpr(t_star=0, bos_index=1)


@pytest.fixture(scope="module")
def small_model():
  return TAP(TINY), random_params(TINY, 7)


# -------------------------------------------------------------------- accumulator


def test_accumulator_per_batch_and_per_sample():
  rng = np.random.default_rng(0)
  gh, gf = rng.normal(size=(10, 2, 3)), rng.normal(size=(10, 2, 5))
  acc = scoring.Accumulator((2, 3), (2, 5), group_size=4)
  acc.add_samples(gh[:3], gf[:3], np.arange(3))      # a group spans two calls
  acc.add_samples(gh[3:], gf[3:], np.arange(3, 10))
  imp = acc.result(LFPR)
  groups = [slice(0, 4), slice(4, 8), slice(8, 10)]  # the last group is partial
  np.testing.assert_allclose(imp.head, sum(gh[g].sum(0) ** 2 for g in groups))
  np.testing.assert_allclose(imp.ffn, sum(gf[g].sum(0) ** 2 for g in groups))
  np.testing.assert_allclose(imp.head_per_sample, (gh ** 2).sum(0))
  np.testing.assert_allclose(imp.head_grads, np.stack([gh[g].sum(0) for g in groups]),
                             rtol=1e-6)
  assert imp.num_samples == 10 and list(imp.question_ids) == list(range(10))
  assert imp.num_batches == 3 and imp.t_star == 0 and imp.meta["group_size"] == 4
  alg = acc.result(criteria.Alg(normalize_by_layer=False))
  np.testing.assert_allclose(alg.head, sum(np.abs(gh[g].sum(0)) for g in groups))
  with pytest.raises(ValueError, match="all importances are zero"):
    scoring.Accumulator((1, 1), (1, 1)).result(LFPR)
  acc = scoring.Accumulator((1, 1), (1, 1), keep_batches=False)
  acc.add_groups(np.array([[[np.nan]]]), np.ones((1, 1, 1)), [0])
  with pytest.raises(ValueError, match="non-finite"):
    acc.result(FISHER)


def test_accumulator_groups_and_errors():
  rng = np.random.default_rng(1)
  gh, gf = rng.normal(size=(3, 2, 3)), rng.normal(size=(3, 2, 4))
  acc = scoring.Accumulator((2, 3), (2, 4), group_size=2, keep_batches=False)
  acc.add_groups(gh, gf, np.arange(5))
  out = acc.result(FISHER)
  np.testing.assert_allclose(out.head, (gh ** 2).sum(0))
  assert out.head_grads is None and out.head_per_sample is None and out.num_samples == 5
  with pytest.raises(ValueError, match="per-sample"):
    out.scores(per_sample=True)
  with pytest.raises(ValueError, match="cannot follow"):
    acc.add_samples(gh, gf, np.arange(3))
  with pytest.raises(ValueError, match="do not stack"):
    acc.add_groups(gh[:, :1], gf, np.arange(3))
  with pytest.raises(ValueError, match="group_size"):
    scoring.Accumulator((1, 1), (1, 1), group_size=0)


def test_scores_save_load(tmp_path):
  s = scoring.Scores("fisher", np.ones((2, 2)), np.ones((2, 3)),
                     np.zeros((4, 2, 2), np.float32), np.zeros((4, 2, 3), np.float32),
                     num_samples=9, question_ids=np.arange(9), meta={"group_size": 8})
  s.save(str(tmp_path / "s.npz"))
  back = scoring.Scores.load(str(tmp_path / "s.npz"))
  assert back.criterion == "fisher" and back.num_batches == 4 and back.num_samples == 9
  assert back.meta == {"group_size": 8} and back.head_per_sample is None
  np.testing.assert_array_equal(back.question_ids, np.arange(9))
  lfpr = scoring.Scores("lfpr", np.ones((2, 2)), np.ones((2, 3)),
                        head_per_sample=np.full((2, 2), 2.0),
                        ffn_per_sample=np.full((2, 3), 2.0), meta={"t_star": 1})
  lfpr.save(str(tmp_path / "l.npz"))
  back = scoring.Scores.load(str(tmp_path / "l.npz"))
  assert back.head_grads is None and back.t_star == 1
  np.testing.assert_array_equal(back.scores(per_sample=True)[0], np.full((2, 2), 2.0))


# --------------------------------------------------------------------------- loop


def test_labelled_criterion_refuses_unlabelled_batches_before_work(small_model,
                                                                   monkeypatch):
  model, params = small_model
  calls = []

  def spy(*args, **kwargs):
    def fn(params, batch, rng):
      calls.append(1)
      raise AssertionError("gradients computed on unlabelled data")
    return fn
  monkeypatch.setattr(scoring, "make_grads_fn", spy)
  batch = labelled_batch(4, 0)
  batch["has_answers"] = np.array([True, False, True, True])
  with pytest.raises(ValueError, match="'alg' needs ground-truth answers.*batch 0"):
    scoring.compute("alg", model, params, [batch], group_size=4)
  del batch["has_answers"]
  with pytest.raises(ValueError, match="has_answers"):
    scoring.compute("fisher", model, params, [batch], group_size=4)
  with pytest.raises(ValueError, match="not a multiple of group_size 8"):
    scoring.compute("fisher", model, params, [labelled_batch(4, 0)])
  assert not calls


def test_alg_and_fisher_accumulate_per_batch_gradients(small_model):
  model, params = small_model
  batches = [labelled_batch(8, 10 + i) for i in range(2)]
  batches[1]["weight"] = np.array([1] * 5 + [0] * 3, np.float32)   # partial last batch
  batches[1]["has_answers"][5:] = False                           # padding: unchecked
  mesh = parallel.make_mesh()                                     # 4 CPU devices
  fisher = scoring.compute("fisher", model, params, batches, group_size=4, mesh=mesh)
  # The per-batch gradients, group by group (unsharded; tested in test_criteria).
  fn = jax.jit(FISHER.grads_fn(model, group_size=4))
  want_h, want_f = [], []
  for b in batches:
    b = {"weight": np.ones(8, np.float32), **b}
    gh, gf = (np.asarray(x) for x in fn(params, b, None))
    rows = (b["weight"] > 0).reshape(-1, 4).sum(1)
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
  assert list(fisher.question_ids) == list(range(13))   # default ids: a running count

  alg = scoring.compute("alg", model, params, batches, group_size=4,
                        normalize_by_layer=False)
  raw_h, raw_f = np.abs(want_h).sum(0), np.abs(want_f).sum(0)
  np.testing.assert_allclose(alg.head, raw_h, rtol=1e-4)
  np.testing.assert_allclose(alg.ffn, raw_f, rtol=1e-4)
  np.testing.assert_allclose(alg.head_grads, fisher.head_grads, rtol=1e-4, atol=1e-6)
  # Default: each layer's head scores divided by the layer's L2 norm; neurons raw.
  alg = scoring.compute("alg", model, params, batches, group_size=4)
  np.testing.assert_allclose(alg.head, raw_h / np.linalg.norm(raw_h, axis=1,
                                                               keepdims=True), rtol=1e-4)
  np.testing.assert_allclose(np.linalg.norm(alg.head, axis=1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(alg.ffn, raw_f, rtol=1e-4)
  assert alg.meta["normalize_by_layer"] and not alg.meta["global_minmax"]


@pytest.mark.parametrize("dropout", [False, True])
def test_lfpr_groups_samples_and_keeps_batch_grads(small_model, monkeypatch, dropout):
  """`lfpr`: the criterion's gradients (tested in test_criteria), padding rows and
  all-padding groups dropped, per-sample gradients summed into groups of 2."""
  model, params = small_model
  batches = []
  for i in range(2):
    b = {k: np.asarray(v) for k, v in model_batch(TINY, 4, seed=20 + i).items()}
    b["question_id"] = np.arange(4 * i, 4 * i + 4, dtype=np.int32)
    batches.append(b)
  batches[1]["weight"] = np.array([1, 1, 0, 0], np.float32)
  seen = []
  real = scoring.make_grads_fn

  def spy(*args, **kwargs):
    fn = real(*args, **kwargs)

    def wrapped(*a):
      out = fn(*a)
      seen.append([np.asarray(x) for x in out])
      return out
    return wrapped
  monkeypatch.setattr(scoring, "make_grads_fn", spy)
  out = scoring.compute("lfpr", model, params, batches, group_size=2, t_star=0,
                        bos_index=1, dropout=dropout, seed=5)
  assert out.num_samples == 6 and list(out.question_ids) == [0, 1, 2, 3, 4, 5]
  if dropout:   # group gradients [2, L, H] per batch; the all-padding group dropped
    assert seen[0][0].shape == (2, 2, 2) and out.head_per_sample is None
    want = np.concatenate([seen[0][0], seen[1][0][:1]])
  else:         # per-sample gradients [4, L, H]; padding rows dropped
    assert seen[0][0].shape == (4, 2, 2)
    gs = np.concatenate([seen[0][0], seen[1][0][:2]]).astype(np.float64)
    want = gs.reshape(3, 2, 2, 2).sum(1)
    np.testing.assert_allclose(out.head_per_sample, (gs ** 2).sum(0), rtol=1e-12)
  np.testing.assert_allclose(out.head_grads, want, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(out.head, (want.astype(np.float64) ** 2).sum(0),
                             rtol=1e-5)
  np.testing.assert_allclose((out.ffn_grads.astype(np.float64) ** 2).sum(0), out.ffn,
                             rtol=1e-4)
  assert np.abs(out.head_grads).max() > 0
  assert out.meta == {"t_star": 0, "bos_index": 1, "dropout": dropout, "group_size": 2}
  with pytest.raises(ValueError, match="t_star and bos_index"):
    scoring.compute("lfpr", model, params, batches)
  with pytest.raises(ValueError, match="pass batches"):
    scoring.compute("fisher", model, params)


@pytest.mark.parametrize("criterion", ["fisher", "lfpr"])
def test_packed_scoring_equals_padded_and_packs_whole_groups_only(small_model,
                                                                  monkeypatch, criterion):
  """Trimmed + packed batches (`trim_batch(pack=True)`): the scores are the padded
  ones; packing is kept where the batch is one group (fisher, group_size = batch) and
  dropped where the criterion runs per sample (its row counts are the batch's)."""
  from lfpr_jax.models import trim  # noqa: PLC0415
  model, params = small_model
  batches = []
  for i in range(2):
    b = {k: np.array(v) for k, v in labelled_batch(4, seed=40 + i).items()}
    b["obj_num"] = np.array([1, 3, 0, 2]) + i
    b["ocr_num"] = np.array([0, 2, 1, 3])
    ocr_cols = np.arange(TINY.ocr_max)[None, None] < b["ocr_num"][:, None, None]
    b["targets"][..., TINY.num_answers:] *= ocr_cols
    b["train_prev_inds"] = np.minimum(b["train_prev_inds"], TINY.num_answers - 1)
    b["cmb_text"][:, -3:] = 0
    batches.append(b)
  items = [trim.trim_batch(b, TINY, buckets=(1, 2, 4), pack=True) for b in batches]
  for cut, _, info in items:  # batch-first, as parallel.trimmed_global_batches gives it
    cut["text_position_ids"] = np.broadcast_to(info.text_columns, cut["cmb_text"].shape)
  assert all(tc.pack_rows[1] for _, tc, _ in items)
  built = []
  real = scoring.make_grads_fn

  def spy(crit, m, *args, **kwargs):
    built.append(m.config)
    return real(crit, m, *args, **kwargs)
  monkeypatch.setattr(scoring, "make_grads_fn", spy)
  # lfpr without dropout: per-sample gradients (LFPR's label-free objective).
  options = dict(t_star=0, bos_index=1, dropout=False) if criterion == "lfpr" else {}
  padded = scoring.compute(criterion, model, params, batches, group_size=4, **options)
  packed = scoring.compute(criterion, model, params, items, group_size=4,
                           trimmed=True, **options)
  for name in ("head", "ffn"):
    want, got = getattr(padded, name), getattr(packed, name)
    assert np.abs(want).max() > 0
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
  cut = [c for c in built if c.text_len != TINY.text_len or c.obj_max != TINY.obj_max]
  assert cut
  per_sample = criterion == "lfpr"
  assert all(any(c.pack_rows) != per_sample for c in cut)
