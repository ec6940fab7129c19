"""Variable-length execution (lfpr_jax.models.trim): trimmed TAP == padded TAP."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lfpr_jax.models import trim
from lfpr_jax.models.batch import model_inputs
from lfpr_jax.models.config import TapConfig
from lfpr_jax.models.decoding import greedy_decode
from lfpr_jax.models.losses import m4c_decoding_bce
from lfpr_jax.models.params import abstract_params
from lfpr_jax.models.tap import MASK_VALUE, TAP, valid_rows
from tests.helpers import BASE, random_batch, random_params

# BASE: question 8, OCR words 12, object names 10, 10 objects, 12 OCR slots.
BUCKETS = (2, 4, 6)
# Per example: (question, OCR words, object names, objects, OCR slots) valid lengths.
CASES = {
    # Every extreme in one batch: full everything, nothing, and lengths in between.
    "mixed": [(8, 5, 10, 10, 12), (1, 1, 1, 0, 0), (5, 3, 7, 4, 6), (2, 0, 3, 10, 1),
              (8, 5, 0, 0, 12)],
    # Everything short, so every segment is actually cut, and no OCR token anywhere
    # (the decoder never copies; the OCR segment shrinks to its smallest bucket).
    "short_no_ocr": [(4, 3, 2, 3, 0), (2, 1, 1, 0, 0), (3, 2, 2, 1, 0)],
}
TOL = dict(atol=2e-5, rtol=2e-5)


def make_batch(config, lengths, seed=0):
  """Canonical inputs + targets with the given per-example segment lengths."""
  lengths = np.asarray(lengths)
  b = random_batch(config, len(lengths), seed)
  rng = np.random.default_rng(seed + 1)
  c = config
  text = b["cmb_text"]
  starts = (0, c.question_len, c.question_len + c.ocr_text_len)
  for i, (q, o, t, n_obj, n_ocr) in enumerate(lengths):
    for start, full, n in zip(starts, trim.segment_sizes(c)[:3], (q, o, t)):
      text[i, start + n:start + full] = 0
  b["image_info_0"]["max_features"] = lengths[:, 3]
  b["context_info_0"]["max_features"] = lengths[:, 4]
  prev = rng.integers(2, c.num_answers, (len(lengths), c.decode_steps))
  prev[:, 0] = 1
  targets = np.zeros((len(lengths), c.decode_steps, c.num_classes), np.float32)
  for i, n_ocr in enumerate(lengths[:, 4]):
    if n_ocr:  # copy valid OCR slots at some steps, and make them targets
      slots = rng.integers(0, n_ocr, 3)
      prev[i, 2:5] = c.num_answers + slots
      targets[i, 1:4][np.arange(3), c.num_answers + slots] = 1.0
    targets[i, 0, rng.integers(0, c.num_answers)] = 1.0
  b["train_prev_inds"] = prev
  b["targets"] = targets
  return {k: np.array(v) for k, v in model_inputs(b, c, with_targets=True).items()}


def _valid_columns(config, ocr_num):
  """[B, C] bool: fixed-vocabulary columns and each example's valid OCR slots."""
  ocr = np.arange(config.ocr_max)[None] < np.asarray(ocr_num)[:, None]
  return np.concatenate([np.ones((len(ocr), config.num_answers), bool), ocr], -1)


def _run_all(config, params, inputs):
  """Teacher-forced scores, loss, greedy decoding and mask gradients of one model."""
  model = TAP(config)

  def tf(p, x, head_mask=None, ffn_mask=None):
    return model.apply({"params": p}, x, head_mask=head_mask, ffn_mask=ffn_mask)

  ones_h = [jnp.ones((h,)) for h in config.mmt_heads]
  ones_f = [jnp.ones((f,)) for f in config.mmt_ffn]

  def loss(hm, fm, p, x):
    return m4c_decoding_bce(tf(p, x, hm, fm), x["targets"], x["train_loss_mask"])

  def label_free(hm, fm, p, x):
    # LFPR's objective at step t = 2: sum_b max_c scores[b, t, c] (greedy decoding).
    scores, _ = greedy_decode(model, {"params": p}, x, num_steps=3, head_mask=hm,
                              ffn_mask=fm)
    return jnp.sum(jnp.max(scores[:, 2], axis=-1))

  @jax.jit
  def run(p, x):
    return dict(
        tf=tf(p, x), loss=loss(ones_h, ones_f, p, x),
        greedy=greedy_decode(model, {"params": p}, x),
        loss_grad=jax.grad(loss, argnums=(0, 1))(ones_h, ones_f, p, x),
        lf_grad=jax.grad(label_free, argnums=(0, 1))(ones_h, ones_f, p, x))
  return jax.tree.map(np.asarray, run(params, inputs))


@pytest.mark.parametrize("pack", [False, True], ids=["trimmed", "trimmed+packed"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_trimmed_equals_padded(case, pack):
  """Scores, loss, greedy decoding and mask gradients; with `pack` the row-wise work
  also runs on the non-padding rows only (`TapConfig.pack_rows`)."""
  config = BASE
  params = random_params(config, seed=3)
  inputs = make_batch(config, CASES[case], seed=len(case))
  trimmed, tc, info = trim.trim_batch(inputs, config, buckets=BUCKETS, pack=pack)
  if pack:  # packing is on for both the text-BERT and the MMT rows
    rows = np.asarray(CASES[case])
    n_text = rows[:, :3].sum()  # every valid wordpiece
    assert n_text <= tc.pack_rows[0] < len(rows) * tc.text_len
    assert tc.pack_rows[1] >= n_text + rows[:, 3].sum() + rows[:, 4].sum()
    assert 0 < tc.pack_rows[1] < len(rows) * tc.encoder_len
  else:
    assert tc.pack_rows == (0, 0)
  want = np.minimum(np.asarray(CASES[case]).max(0), trim.segment_sizes(config))
  assert info.sizes == tuple(trim.bucket_size(int(n), f, BUCKETS)
                             for n, f in zip(want, trim.segment_sizes(config)))
  assert tc.mmt_len == sum(info.sizes) + config.decode_steps
  if case == "short_no_ocr":
    assert info.sizes == (4, 4, 2, 4, 2) and tc.mmt_len <= config.mmt_len / 2

  full = _run_all(config, params, inputs)
  cut = _run_all(tc, params, trimmed)
  valid = _valid_columns(config, inputs["ocr_num"])[:, None]
  extra = config.ocr_max - info.ocr_max

  tf = trim.restore_scores(cut["tf"], config, info)
  assert tf.shape == full["tf"].shape
  np.testing.assert_allclose(np.where(valid, tf, 0), np.where(valid, full["tf"], 0),
                             **TOL)
  if extra:
    assert np.all(tf[..., config.num_classes - extra:] == MASK_VALUE)
  assert np.all(tf[~np.broadcast_to(valid, tf.shape)] < -9000)
  np.testing.assert_array_equal(tf.argmax(-1), full["tf"].argmax(-1))
  np.testing.assert_allclose(cut["loss"], full["loss"], rtol=1e-6)
  # The loss of the restored scores against the untrimmed targets is the same value.
  np.testing.assert_allclose(
      m4c_decoding_bce(tf, inputs["targets"], inputs["train_loss_mask"]), full["loss"],
      rtol=1e-6)

  g_scores, g_prev = cut["greedy"]
  np.testing.assert_array_equal(g_prev, full["greedy"][1])
  g_scores = trim.restore_scores(g_scores, config, info)
  np.testing.assert_allclose(np.where(valid, g_scores, 0),
                             np.where(valid, full["greedy"][0], 0), **TOL)
  np.testing.assert_array_equal(g_scores.argmax(-1), full["greedy"][0].argmax(-1))

  for what in ("loss_grad", "lf_grad"):
    for got, ref in zip(jax.tree.leaves(cut[what]), jax.tree.leaves(full[what])):
      assert got.shape == ref.shape
      if not ref.size:  # a layer without heads / FFN neurons
        continue
      scale = max(np.abs(ref).max(), 1e-30)
      np.testing.assert_allclose(got / scale, ref / scale, atol=1e-5, rtol=0,
                                 err_msg=what)
    assert max(np.abs(x).max(initial=0) for x in jax.tree.leaves(full[what])) > 0


def test_positions_and_token_types_are_the_padded_ones():
  """Trimming the question moves the OCR and object wordpieces left; without the
  original position ids their embeddings (and the scores) would change."""
  config = BASE
  params = random_params(config, seed=4)
  inputs = make_batch(config, CASES["short_no_ocr"], seed=1)
  trimmed, tc, info = trim.trim_batch(inputs, config, buckets=BUCKETS)
  np.testing.assert_array_equal(
      trimmed["text_position_ids"],
      [0, 1, 2, 3, 8, 9, 10, 11, 20, 21])
  model = TAP(tc)
  valid = _valid_columns(tc, inputs["ocr_num"])[:, None]
  good = np.asarray(model.apply({"params": params}, trimmed))
  no_ids = {k: v for k, v in trimmed.items() if k != "text_position_ids"}
  bad = np.asarray(model.apply({"params": params}, no_ids))
  assert np.abs(np.where(valid, good - bad, 0)).max() > 1e-3
  ref = np.asarray(TAP(config).apply({"params": params}, inputs))
  restored = trim.restore_scores(good, config, info)
  assert np.abs(np.where(_valid_columns(config, inputs["ocr_num"])[:, None],
                         restored - ref, 0)).max() < 2e-5


def test_params_do_not_depend_on_lengths():
  for config in (BASE, TapConfig.tap()):
    small = trim.trimmed_config(config, (1, 1, 1, 1, 1))
    shapes = jax.tree.map(lambda x: (x.shape, x.dtype), abstract_params(config))
    assert jax.tree.map(lambda x: (x.shape, x.dtype), abstract_params(small)) == shapes


def test_buckets_and_shape_count():
  tap = TapConfig.tap()
  assert trim.segment_sizes(tap) == (20, 100, 50, 100, 100)
  assert trim.segment_buckets(tap)[0] == (8, 16, 20)
  assert trim.segment_buckets(tap)[2] == (8, 16, 32, 50)
  assert trim.num_shapes(tap) == 3 * 5 * 4 * 5 * 5
  assert [trim.bucket_size(n, 20) for n in (0, 1, 8, 9, 16, 17, 20)] == [
      8, 8, 8, 16, 16, 20, 20]
  assert [trim.bucket_size(n, 100) for n in (33, 64, 65, 100)] == [64, 64, 100, 100]
  assert trim.bucket_size(3, 4, (8,)) == 4  # a bucket above the full size is unused
  with pytest.raises(ValueError, match="buckets must be"):
    trim.bucket_size(3, 10, (0, 4))


def test_prev_inds_keep_the_ocr_slots_they_feed_back():
  """A decoder input may copy an OCR slot beyond ocr_num; that slot is kept."""
  inputs = make_batch(BASE, [(3, 2, 2, 3, 0), (3, 2, 2, 3, 0)])
  inputs["train_prev_inds"][1, 3] = BASE.num_answers + 4
  _, tc, info = trim.trim_batch(inputs, BASE, buckets=BUCKETS)
  assert info.lengths[4] == 5 and tc.ocr_max == 6


def test_targets_on_dropped_columns_raise():
  inputs = make_batch(BASE, [(3, 2, 2, 3, 1), (3, 2, 2, 3, 0)])
  inputs["targets"][1, 2, BASE.num_answers + 7] = 1.0
  with pytest.raises(ValueError, match="OCR slot 7 of example 1"):
    trim.trim_batch(inputs, BASE, buckets=BUCKETS)


def test_bad_inputs_raise():
  inputs = make_batch(BASE, [(3, 2, 2, 3, 1)])
  trimmed, _, _ = trim.trim_batch(inputs, BASE, buckets=BUCKETS)
  with pytest.raises(ValueError, match="already trimmed"):
    trim.trim_batch(trimmed, BASE, buckets=BUCKETS)
  with pytest.raises(ValueError, match="missing field 'ocr_num'"):
    trim.trim_batch({k: v for k, v in inputs.items() if k != "ocr_num"}, BASE)
  bad = dict(inputs, image_feature_1=inputs["image_feature_1"][:, :5])
  with pytest.raises(ValueError, match="'image_feature_1' has shape"):
    trim.trim_batch(bad, BASE)
  with pytest.raises(ValueError, match="global_lengths must return"):
    trim.trim_batch(inputs, BASE, global_lengths=lambda n: n - 1)
  scores = np.zeros((1, 12, BASE.num_classes))
  info = trim.trim_batch(inputs, BASE, buckets=BUCKETS)[2]
  with pytest.raises(ValueError, match="scores have"):
    trim.restore_scores(scores, BASE, info)


def test_global_lengths_hook_sets_the_shapes():
  """Another process's longer batch widens this process's shapes to match."""
  inputs = make_batch(BASE, CASES["short_no_ocr"])
  other = np.array([7, 2, 2, 2, 12])
  trimmed, tc, info = trim.trim_batch(inputs, BASE, buckets=BUCKETS,
                                      global_lengths=lambda n: np.maximum(n, other))
  assert info.sizes == (8, 4, 2, 4, 12)
  assert trimmed["cmb_text"].shape == (3, 14) and tc.ocr_max == 12
  np.testing.assert_array_equal(trim.default_global_lengths(other), other)


def test_trimmed_fn_compiles_once_per_shape():
  params = random_params(BASE, seed=5)
  calls = []

  def scores(config, x, p):
    calls.append(config)  # runs at trace time only
    return TAP(config).apply({"params": p}, x)
  run = trim.TrimmedFn(scores, BASE, buckets=BUCKETS)
  a = make_batch(BASE, CASES["short_no_ocr"], seed=1)
  b = make_batch(BASE, [(3, 4, 1, 3, 0)], seed=2)  # same buckets, other batch size
  c = make_batch(BASE, CASES["mixed"], seed=3)
  for x in (a, a, c):
    out, info = run(x, params)
    ref = TAP(BASE).apply({"params": params}, x)
    valid = _valid_columns(BASE, x["ocr_num"])[:, None]
    np.testing.assert_allclose(np.where(valid, run.restore(out, info), 0),
                               np.where(valid, ref, 0), **TOL)
  run(b, params)
  assert run.num_specialisations == 2
  assert len(calls) == 3  # a, c, and a retrace of a's shape for b's batch size


def test_per_shape_builds_once_per_config():
  built = []

  def build(config):
    built.append(config)
    return lambda x: (config.mmt_len, x)
  fns = trim.PerShape(build)
  short = trim.trimmed_config(BASE, (2, 2, 2, 1, 1))
  assert fns(BASE)(1) == (BASE.mmt_len, 1)
  assert fns(short)(2) == (short.mmt_len, 2)
  assert fns(BASE) is fns(BASE)
  assert built == [BASE, short] and len(fns) == 2


def test_pack_bucket_and_counts():
  assert trim.pack_bucket(0, 80) == 10 and trim.pack_bucket(10, 80) == 10
  assert trim.pack_bucket(11, 80) == 20 and trim.pack_bucket(70, 80) == 70
  assert trim.pack_bucket(71, 80) == 0   # would round up to the full size: off
  assert {trim.pack_bucket(n, 6112) for n in range(6113)} - {0} == {
      764 * k for k in range(1, 8)}
  x = make_batch(BASE, CASES["mixed"], seed=4)
  text = (x["cmb_text"] != 0).sum()
  enc = text + np.minimum(x["obj_num"], BASE.obj_max).sum() + np.minimum(
      x["ocr_num"], BASE.ocr_max).sum()
  full_text, full_enc = 5 * BASE.text_len, 5 * BASE.encoder_len
  assert trim.packed_rows(x, BASE) == (trim.pack_bucket(text, full_text),
                                       trim.pack_bucket(enc, full_enc))
  packed = dataclasses.replace(BASE, pack_rows=(10, 20))
  assert trim.unpacked(packed) == BASE and trim.unpacked(BASE) is BASE
  # A whole batch's count applied to one sample is cut to that sample's rows; the
  # padding entries point past the end (B*S).
  np.testing.assert_array_equal(
      valid_rows(jnp.asarray([[True, False, True]]), 10), [0, 2, 3])


def test_sort_by_length_round_trip():
  lengths = np.array([[5, 1], [2, 9], [5, 0], [2, 9], [1, 3]])
  indices = np.array([10, 11, 12, 13, 14])
  sorted_idx, inverse = trim.sort_by_length(indices, lengths)
  np.testing.assert_array_equal(sorted_idx, [14, 11, 13, 12, 10])  # stable
  results = sorted_idx * 2  # a per-example result computed in sorted order
  np.testing.assert_array_equal(results[inverse], indices * 2)
  s1, inv1 = trim.sort_by_length(indices, lengths[:, 1])
  np.testing.assert_array_equal(s1, [12, 10, 14, 11, 13])
  np.testing.assert_array_equal(s1[inv1], indices)
  with pytest.raises(ValueError, match="need indices"):
    trim.sort_by_length(indices, lengths[:3])
