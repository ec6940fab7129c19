"""Parity of the Flax TAP with the upstream PyTorch TAP (../shared/golden/{tap,tap12}).

Weights come from the golden numpy rule, mapped through the converter's state-dict
mapping; every recorded upstream output is compared. Tolerances (issue 3): scores on
valid slots 1e-4 absolute, losses 1e-5 relative, mask gradients 1e-4 relative to their
max, greedy argmax equal wherever the upstream top-2 margin exceeds 1e-3.
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from converters.torch_to_flax import (PRETRAIN_PREFIXES, infer_config,
                                      params_to_state_dict, state_dict_to_params)
from lfpr_jax.models.batch import model_inputs
from lfpr_jax.models.decoding import greedy_decode, greedy_decode_reference
from lfpr_jax.models.losses import m4c_decoding_bce
from lfpr_jax.models.tap import TAP
from lfpr_jax.pruning.surgery import prune
from tests.conftest import GOLDEN, golden_state_dict

SCORE_ATOL = 1e-4
LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-4
MARGIN = 1e-3
ARCHS = ["tap", "tap12"]


class Golden:
  """Model, params, batch and upstream outputs of one golden architecture."""

  def __init__(self, arch: str):
    sd = golden_state_dict(arch)
    self.state_dict = sd
    self.config = infer_config(sd)
    self.params = state_dict_to_params(sd, self.config)
    self.model = TAP(self.config)
    self.batch = dict(np.load(GOLDEN / arch / "batch.npz"))
    self.out = dict(np.load(GOLDEN / arch / "outputs.npz"))
    self.inputs = model_inputs(self.batch, self.config, with_targets=True)
    ocr_valid = np.arange(self.config.ocr_max)[None] < self.batch["ocr_num"][:, None]
    self.valid = np.concatenate(
        [np.ones((len(ocr_valid), self.config.num_answers), bool), ocr_valid], -1)
    self.valid = np.broadcast_to(self.valid[:, None], self.out["tf_scores"].shape)

  @functools.cached_property
  def teacher_forced(self):
    fn = jax.jit(lambda p, x: self.model.apply({"params": p}, x,
                                               mutable=["intermediates"]))
    scores, state = fn(self.params, self.inputs)
    inter = jax.tree.map(lambda v: np.asarray(v[0]), state["intermediates"],
                         is_leaf=lambda v: isinstance(v, tuple))
    return np.asarray(scores), inter

  @functools.cached_property
  def greedy(self):
    fn = jax.jit(lambda p, x: greedy_decode(self.model, {"params": p}, x))
    return tuple(np.asarray(a) for a in fn(self.params, self.inputs))


@functools.lru_cache(maxsize=None)
def golden(arch: str) -> Golden:
  return Golden(arch)


def assert_scores_close(got, want, valid, what):
  err = np.abs(np.where(valid, got - want, 0.0)).max()
  assert err <= SCORE_ATOL, f"{what}: max |diff| on valid slots {err:.3g} > {SCORE_ATOL}"


def assert_argmax_equal(got_scores, want_argmax, margin, what):
  sure = margin > MARGIN
  got = np.argmax(got_scores, -1)
  assert sure.any()
  np.testing.assert_array_equal(got[sure], want_argmax[sure], err_msg=what)


def assert_loss_close(got, want, what):
  rel = abs(float(got) - float(want)) / abs(float(want))
  assert rel <= LOSS_RTOL, f"{what}: {float(got)} vs upstream {float(want)} (rel {rel:.2g})"


def assert_grad_close(got, want, what):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, (what, got.shape, want.shape)
  scale = np.abs(want).max()
  assert scale > 0
  err = np.abs(got - want).max() / scale
  assert err <= GRAD_RTOL, f"{what}: max |diff| / max |ref| = {err:.3g} > {GRAD_RTOL}"


@pytest.mark.parametrize("arch", ARCHS)
def test_intermediate_activations(arch):
  g = golden(arch)
  _, inter = g.teacher_forced
  pairs = {"txt_emb": "tf_txt_emb", "obj_mmt_in": "tf_obj_mmt_in",
           "ocr_mmt_in": "tf_ocr_mmt_in", "dec_emb": "tf_dec_emb",
           "fixed_scores": "tf_fixed_scores"}
  for i in range(g.config.text_bert_layers):
    got = inter["text_bert"][f"layer_out_{i}"]
    np.testing.assert_allclose(got, g.out[f"tf_text_bert_layer_{i}"], atol=SCORE_ATOL,
                               rtol=0, err_msg=f"text-BERT layer {i}")
  for name, ref in pairs.items():
    np.testing.assert_allclose(inter[name], g.out[ref], atol=SCORE_ATOL, rtol=0,
                               err_msg=name)
  recorded = [i for i in range(g.config.mmt_layers) if f"tf_mmt_layer_{i}" in g.out]
  assert 0 in recorded and g.config.mmt_layers - 1 in recorded
  for i in recorded:
    np.testing.assert_allclose(inter[f"mmt_out_{i}"], g.out[f"tf_mmt_layer_{i}"],
                               atol=SCORE_ATOL, rtol=0, err_msg=f"MMT layer {i}")
  np.testing.assert_allclose(inter[f"mmt_out_{g.config.mmt_layers - 1}"],
                             g.out["tf_mmt_seq_output"], atol=SCORE_ATOL, rtol=0)
  assert_scores_close(inter["ocr_scores"], g.out["tf_ocr_scores"],
                      g.valid[..., g.config.num_answers:], "OCR copy scores")


@pytest.mark.parametrize("arch", ARCHS)
def test_teacher_forced_scores_and_loss(arch):
  g = golden(arch)
  scores, _ = g.teacher_forced
  assert_scores_close(scores, g.out["tf_scores"], g.valid, "teacher-forced scores")
  assert_argmax_equal(scores, g.out["tf_argmax"], g.out["tf_top2_margin"], "tf argmax")
  loss = m4c_decoding_bce(scores, g.inputs["targets"], g.inputs["train_loss_mask"])
  assert_loss_close(loss, g.out["tf_loss"], "teacher-forced loss")
  # Sample 1 has no OCR tokens: every copy score sits at -10000 + x.
  assert np.all(scores[1, :, g.config.num_answers:] < -9000)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_decoding_cached(arch):
  g = golden(arch)
  scores, prev = g.greedy
  assert_scores_close(scores, g.out["greedy_scores"], g.valid, "greedy scores")
  assert_argmax_equal(scores, g.out["greedy_argmax"], g.out["greedy_top2_margin"],
                      "greedy argmax")
  sure = np.all(g.out["greedy_top2_margin"] > MARGIN, axis=1)
  np.testing.assert_array_equal(prev[sure], g.out["greedy_prev_inds"][sure])
  loss = m4c_decoding_bce(scores, g.inputs["targets"], g.inputs["train_loss_mask"])
  assert_loss_close(loss, g.out["greedy_loss"], "greedy loss")
  # Per-sample step of the largest score (the t* statistic of LFPR).
  np.testing.assert_array_equal(scores.max(-1).argmax(-1), g.out["greedy_max_time_step"])
  # Both decoder feedback paths are exercised: fixed-vocabulary and OCR copies.
  assert (prev >= g.config.num_answers).any() and (prev[:, 1:] < g.config.num_answers).any()


@pytest.mark.parametrize("arch", ARCHS)
def test_teacher_forcing_on_greedy_inputs(arch):
  """Independent of argmax ties: feed upstream's final-pass decoder inputs."""
  g = golden(arch)
  inputs = {**g.inputs, "train_prev_inds": jnp.asarray(g.out["greedy_prev_inds"])}
  scores = jax.jit(lambda p, x: g.model.apply({"params": p}, x))(g.params, inputs)
  assert_scores_close(np.asarray(scores), g.out["greedy_scores"], g.valid,
                      "teacher forcing on greedy_prev_inds")


def test_reference_loop_equals_cached_and_upstream():
  g = golden("tap")
  fn = jax.jit(lambda p, x: greedy_decode_reference(g.model, {"params": p}, x))
  ref_scores, ref_prev = (np.asarray(a) for a in fn(g.params, g.inputs))
  assert_scores_close(ref_scores, g.out["greedy_scores"], g.valid, "12-pass loop")
  np.testing.assert_array_equal(ref_prev, g.out["greedy_prev_inds"])
  scores, prev = g.greedy
  np.testing.assert_array_equal(prev, ref_prev)
  assert_scores_close(scores, ref_scores, g.valid, "cached vs 12-pass")


STEPS = (0, 1, 2)


def _objective(g: Golden, variant: str):
  """(head_mask, ffn_mask, inputs, t) -> sum_b max_c scores[b, t, c]."""
  params = g.params

  def objective(head_mask, ffn_mask, inputs, t):
    if variant == "tf":
      scores = g.model.apply({"params": params}, inputs, head_mask=head_mask,
                             ffn_mask=ffn_mask)
    else:
      # Steps after t do not change step t, so one decode of max(STEPS) + 1 steps
      # serves every t (upstream runs t + 1 passes and differentiates the last).
      scores, _ = greedy_decode(g.model, {"params": params}, inputs,
                                num_steps=max(STEPS) + 1, head_mask=head_mask,
                                ffn_mask=ffn_mask)
    return jnp.sum(jnp.max(jnp.take(scores, t, axis=1), axis=-1))
  return objective


@pytest.mark.parametrize("variant", ["tf", "greedy"])
@pytest.mark.parametrize("arch", ARCHS)
def test_lfpr_mask_gradients(arch, variant):
  """jax.grad w.r.t. the explicit masks equals upstream's LFPR mask gradients."""
  g = golden(arch)
  c = g.config
  ones = (jnp.ones((c.mmt_layers, 12)), jnp.ones((c.mmt_layers, 3072)))
  ts = jnp.asarray(STEPS)
  obj = _objective(g, variant)
  # One forward, one backward per t (vmap over the step index).
  batch_fn = jax.vmap(jax.value_and_grad(obj, argnums=(0, 1)),
                      in_axes=(None, None, None, 0))
  values, (gh, gf) = jax.jit(batch_fn)(*ones, g.inputs, ts)
  # Per-sample gradients: vmap(grad) over samples (a batch axis of size 1 each).
  per_sample_fn = jax.vmap(jax.vmap(jax.grad(obj, argnums=(0, 1)),
                                    in_axes=(None, None, 0, None)),
                           in_axes=(None, None, None, 0))
  inputs_1 = jax.tree.map(lambda x: x[:, None], g.inputs)
  ph, pf = jax.jit(per_sample_fn)(*ones, inputs_1, ts)
  for i, t in enumerate(STEPS):
    key = f"lfpr_{variant}_%s_t{t}"
    assert_loss_close(values[i], g.out[key % "objective"], f"objective t={t}")
    assert_grad_close(gh[i], g.out[key % "head_grad"], f"{variant} head grad t={t}")
    assert_grad_close(gf[i], g.out[key % "ffn_grad"], f"{variant} ffn grad t={t}")
    assert_grad_close(ph[i], g.out[key % "head_grad_per_sample"],
                      f"per-sample head t={t}")
    assert_grad_close(pf[i], g.out[key % "ffn_grad_per_sample"], f"per-sample ffn t={t}")
    assert_grad_close((ph[i] ** 2).sum(0), g.out[key % "head_fisher_per_sample"],
                      f"per-sample head Fisher t={t}")
    assert_grad_close((pf[i] ** 2).sum(0), g.out[key % "ffn_fisher_per_sample"],
                      f"per-sample ffn Fisher t={t}")


@pytest.mark.parametrize("arch", ARCHS)
def test_pruned_model_of_pruning_json(arch):
  """The pruned model (constraint 0.4, some layers with 0 heads) equals upstream,
  and equals the unpruned model run with the binary masks (surgery = masking)."""
  g = golden(arch)
  pruned_out = dict(np.load(GOLDEN / arch / "outputs_pruned_0.4.npz"))
  meta = json.loads((GOLDEN / arch / "pruning.json").read_text())
  head_mask, ffn_mask = pruned_out["head_mask"], pruned_out["ffn_mask"]
  np.testing.assert_array_equal(head_mask.sum(1), meta["sum"]["0.4"]["cfg_head"])
  np.testing.assert_array_equal(ffn_mask.sum(1), meta["sum"]["0.4"]["cfg_ffn"])

  # Surgery on the Flax tree (tests/test_surgery.py checks it against a transcription
  # of upstream's create_pruned_model tensor by tensor).
  params, config = prune(g.params, g.config, head_mask, ffn_mask)
  shapes = {k: list(v.shape) for k, v in params_to_state_dict(params, config).items()}
  assert shapes == {k: v for k, v in meta["pruned_state_dict_shapes"].items()
                    if not k.startswith(PRETRAIN_PREFIXES)}
  assert list(config.mmt_heads) == meta["sum"]["0.4"]["cfg_head"]
  assert config.learnable_masks
  model = TAP(config)

  tf = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, g.inputs)
  tf = np.asarray(tf)
  assert_scores_close(tf, pruned_out["tf_scores"], g.valid, "pruned teacher forcing")
  assert_argmax_equal(tf, pruned_out["tf_argmax"], pruned_out["tf_top2_margin"],
                      "pruned tf argmax")
  loss = m4c_decoding_bce(tf, g.inputs["targets"], g.inputs["train_loss_mask"])
  assert_loss_close(loss, pruned_out["tf_loss"], "pruned loss")

  gs, gp = jax.jit(lambda p, x: greedy_decode(model, {"params": p}, x))(params, g.inputs)
  gs, gp = np.asarray(gs), np.asarray(gp)
  assert_scores_close(gs, pruned_out["greedy_scores"], g.valid, "pruned greedy")
  assert_argmax_equal(gs, pruned_out["greedy_argmax"], pruned_out["greedy_top2_margin"],
                      "pruned greedy argmax")
  loss = m4c_decoding_bce(gs, g.inputs["targets"], g.inputs["train_loss_mask"])
  assert_loss_close(loss, pruned_out["greedy_loss"], "pruned greedy loss")

  # The unpruned model with binary masks as apply arguments.
  masked = jax.jit(lambda p, x, h, f: g.model.apply({"params": p}, x, head_mask=h,
                                                     ffn_mask=f))(
      g.params, g.inputs, head_mask, ffn_mask)
  assert_scores_close(np.asarray(masked), pruned_out["masked_full_tf_scores"], g.valid,
                      "masked unpruned teacher forcing")
  mg, _ = jax.jit(lambda p, x, h, f: greedy_decode(g.model, {"params": p}, x,
                                                   head_mask=h, ffn_mask=f))(
      g.params, g.inputs, head_mask, ffn_mask)
  assert_scores_close(np.asarray(mg), pruned_out["masked_full_greedy_scores"], g.valid,
                      "masked unpruned greedy")


def test_pruned_layer_without_heads_equals_masking():
  """Constraint 0.2 of the golden selection leaves MMT layer 1 with 0 heads: the
  sliced model (zero-size blocks dropped) equals the unpruned model with the masks."""
  g = golden("tap")
  pruning = np.load(GOLDEN / "tap" / "pruning.npz")
  head_mask, ffn_mask = pruning["sum_0.2_head_mask"], pruning["sum_0.2_ffn_mask"]
  assert (head_mask.sum(1) == 0).any()
  params, config = prune(g.params, g.config, head_mask, ffn_mask)
  assert 0 in config.mmt_heads
  model = TAP(config)
  pruned = jax.jit(lambda p, x: greedy_decode(model, {"params": p}, x))(params, g.inputs)
  masked = jax.jit(lambda p, x, h, f: greedy_decode(g.model, {"params": p}, x,
                                                    head_mask=h, ffn_mask=f))(
      g.params, g.inputs, head_mask, ffn_mask)
  assert_scores_close(np.asarray(pruned[0]), np.asarray(masked[0]), g.valid,
                      "0-head pruned vs masked (greedy)")
  np.testing.assert_array_equal(np.asarray(pruned[1]), np.asarray(masked[1]))
  tf = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, g.inputs)
  tf_masked = jax.jit(lambda p, x, h, f: g.model.apply({"params": p}, x, head_mask=h,
                                                        ffn_mask=f))(
      g.params, g.inputs, head_mask, ffn_mask)
  assert_scores_close(np.asarray(tf), np.asarray(tf_masked), g.valid,
                      "0-head pruned vs masked (teacher forcing)")
