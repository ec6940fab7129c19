"""Parity of the Flax TAP with the upstream PyTorch TAP (tests/golden/{tap,tap12}).

Weights come from the golden numpy rule, mapped through the converter's state-dict
mapping; every recorded upstream output is compared. Tolerances (issue 3): scores on
valid slots 1e-4 absolute, losses 1e-5 relative, mask gradients 1e-4 relative to their
max, greedy argmax equal wherever the upstream top-2 margin exceeds 1e-3.

Full-size compiles dominate this file's time, so each architecture is compiled once
per process: the plain teacher-forced forward (also driving the 12-pass reference
loop), one jitted call computing every other run of the unpruned model
(`unpruned_runs`), and one for the pruned model.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from converters.torch_to_flax import PRETRAIN_PREFIXES, params_to_state_dict
from lfpr_jax.models.batch import model_inputs
from lfpr_jax.models.decoding import greedy_decode, greedy_decode_reference
from lfpr_jax.models.losses import m4c_decoding_bce
from lfpr_jax.models import trim
from lfpr_jax.models.tap import TAP
from lfpr_jax.pruning.surgery import prune
from tests import golden as golden_files

SCORE_ATOL = 1e-4
LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-4
MARGIN = 1e-3
ARCHS = ["tap", "tap12"]
STEPS = (0, 1, 2)  # the LFPR decoding steps t recorded upstream (from 0, contiguous)
VARIANTS = ("tf", "greedy")


def lfpr_gradients(model: TAP, params, inputs, variant: str) -> dict:
  """The LFPR objective `sum_b max_c scores[b, t, c]` and its mask gradients.

  Masks at ones, for each t in STEPS; `variant` 'tf' (teacher forcing) or 'greedy'.
  Samples do not interact, so each sample runs on its own (a batch of one, vmapped
  over the batch): one forward, then one backward per t (vmapped over one-hot
  cotangents) gives that sample's objective and mask gradients. The whole-batch
  objective and gradients are their sums over the samples (the objective is a sum
  over samples and the gradient is linear), which is what upstream's one backward of
  the batch objective computes, up to float summation order. This costs B x 3
  single-sample backward passes, where one vjp of the batch per (sample, t)
  cotangent would cost (B + 1) x 3 batch-sized ones.

  Returns arrays with a leading axis over STEPS: `objective` [3], `head_grad`
  [3, L, 12], `ffn_grad` [3, L, 3072], `objective_per_sample` [3, B],
  `head_grad_per_sample` [3, B, L, 12], `ffn_grad_per_sample` [3, B, L, 3072].
  """
  c = model.config
  steps = len(STEPS)

  def best(head_mask, ffn_mask, sample):  # [1, steps]: max_c scores[0, t, c]
    if variant == "tf":
      scores = model.apply({"params": params}, sample, head_mask=head_mask,
                           ffn_mask=ffn_mask)
    else:
      # Steps after t do not change step t, so one decode of len(STEPS) steps serves
      # every t (upstream runs t + 1 passes and differentiates the last).
      scores, _ = greedy_decode(model, {"params": params}, sample, num_steps=steps,
                                head_mask=head_mask, ffn_mask=ffn_mask)
    return jnp.max(scores[:, :steps], axis=-1)

  ones = (jnp.ones((c.mmt_layers, max(c.mmt_heads))),
          jnp.ones((c.mmt_layers, max(c.mmt_ffn))))

  def one_sample(sample):  # leaves [1, ...] -> [steps], [steps, L, H], [steps, L, F]
    value, vjp = jax.vjp(lambda h, f: best(h, f, sample), *ones)
    head, ffn = jax.vmap(vjp)(jnp.eye(steps)[:, None, :])
    return value[0], head, ffn

  value, head, ffn = jax.vmap(one_sample)(jax.tree.map(lambda x: x[:, None], inputs))
  per_step = lambda g: jnp.swapaxes(g, 0, 1)  # [B, steps, ...] -> [steps, B, ...]
  return {"objective": value.sum(0), "head_grad": head.sum(0), "ffn_grad": ffn.sum(0),
          "objective_per_sample": value.T, "head_grad_per_sample": per_step(head),
          "ffn_grad_per_sample": per_step(ffn)}


def unpruned_runs(model: TAP, params, inputs, head_mask, ffn_mask) -> dict:
  """Every run of the unpruned model except the plain forward, for one jitted call.

  `head_mask` [L, 12] / `ffn_mask` [L, 3072]: the binary masks of the golden
  constraint-0.4 selection. Returns teacher-forced scores [B, 12, C] and the
  intermediates (the path that computes every MMT row), greedy scores and decoder
  inputs, the same two runs with the masks as apply arguments, and the LFPR
  gradients of both variants.
  """
  variables = {"params": params}
  scores, state = model.apply(variables, inputs, mutable=["intermediates"])
  inter = jax.tree.map(lambda v: v[0], state["intermediates"],
                       is_leaf=lambda v: isinstance(v, tuple))
  greedy_scores, greedy_prev = greedy_decode(model, variables, inputs)
  return {
      "tf": scores, "intermediates": inter, "greedy": greedy_scores,
      "greedy_prev": greedy_prev,
      "masked_tf": model.apply(variables, inputs, head_mask=head_mask, ffn_mask=ffn_mask),
      "masked_greedy": greedy_decode(model, variables, inputs, head_mask=head_mask,
                                     ffn_mask=ffn_mask)[0],
      "lfpr": {v: lfpr_gradients(model, params, inputs, v) for v in VARIANTS},
  }


class CompiledForward:
  """A `TAP` stand-in whose `apply` is the compiled plain forward (no masks).

  `greedy_decode_reference` runs its 12 passes eagerly around it, so the loop costs
  no compile of its own.
  """

  def __init__(self, config, forward):
    self.config = config
    self._forward = forward

  def apply(self, variables, inputs, *, head_mask=None, ffn_mask=None):
    if head_mask is not None or ffn_mask is not None:
      raise ValueError("CompiledForward runs the unmasked model only; got masks.")
    return self._forward(variables["params"], inputs)


class Golden:
  """Model, params, batch, upstream outputs and our runs of one golden architecture.

  Runs are computed on first use and kept for the module (a module-scoped fixture).
  """

  def __init__(self, arch: str, config, params):
    self.arch = arch
    self.config = config
    self.params = params
    self.model = TAP(config)
    self.batch = golden_files.batch(arch)
    self.out = golden_files.outputs(arch)
    self.pruned_out = golden_files.npz(arch, "outputs_pruned_0.4")
    self.pruning_meta = golden_files.pruning_meta(arch)
    self.inputs = model_inputs(self.batch, config, with_targets=True)
    ocr_valid = np.arange(config.ocr_max)[None] < self.batch["ocr_num"][:, None]
    valid = np.concatenate(
        [np.ones((len(ocr_valid), config.num_answers), bool), ocr_valid], -1)
    self.valid = np.broadcast_to(valid[:, None], self.out["tf_scores"].shape)
    model = self.model
    self.forward = jax.jit(lambda p, x: model.apply({"params": p}, x))

  @functools.cached_property
  def runs(self) -> dict:
    masks = self.pruned_out["head_mask"], self.pruned_out["ffn_mask"]
    fn = jax.jit(functools.partial(unpruned_runs, self.model))
    return jax.tree.map(np.asarray, fn(self.params, self.inputs, *masks))

  @functools.cached_property
  def pruned(self):
    """(params, config, tf scores, greedy scores, greedy decoder inputs) at 0.4."""
    params, config = prune(self.params, self.config, self.pruned_out["head_mask"],
                           self.pruned_out["ffn_mask"])
    model = TAP(config)

    def run(p, x):
      return model.apply({"params": p}, x), *greedy_decode(model, {"params": p}, x)
    return (params, config, *(np.asarray(a) for a in jax.jit(run)(params, self.inputs)))


@pytest.fixture(scope="session")
def golden_runs() -> dict[str, Golden]:
  """arch -> its `Golden`, kept for the session: pytest may set the module-scoped `g`
  up again for an architecture (e.g. after the tap-only test in between), and that
  must not recompute (or recompile) its runs."""
  return {}


@pytest.fixture(scope="module", params=[golden_files.arch_param(a) for a in ARCHS])
def g(request, golden_models, golden_runs) -> Golden:
  if request.param not in golden_runs:
    _, config, params = golden_models.get(request.param)
    golden_runs[request.param] = Golden(request.param, config, params)
  return golden_runs[request.param]


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


def test_intermediate_activations(g):
  inter = g.runs["intermediates"]
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


def test_teacher_forced_scores_and_loss(g):
  scores = g.runs["tf"]
  assert_scores_close(scores, g.out["tf_scores"], g.valid, "teacher-forced scores")
  assert_argmax_equal(scores, g.out["tf_argmax"], g.out["tf_top2_margin"], "tf argmax")
  loss = m4c_decoding_bce(scores, g.inputs["targets"], g.inputs["train_loss_mask"])
  assert_loss_close(loss, g.out["tf_loss"], "teacher-forced loss")
  # Sample 1 has no OCR tokens: every copy score sits at -10000 + x.
  assert np.all(scores[1, :, g.config.num_answers:] < -9000)


def test_trimmed_teacher_forcing(g):
  """The golden batch through the variable-length path (models/trim.py): trimmed to
  bucketed lengths (every later wordpiece moves), run, restored to the padded layout,
  within the same tolerances as the padded model."""
  inputs = {k: np.asarray(v) for k, v in g.inputs.items()}
  trimmed, config, info = trim.trim_batch(inputs, g.config)
  assert info.sizes[0] < g.config.question_len        # the question was cut
  scores = jax.jit(lambda p, x: TAP(config).apply({"params": p}, x))(g.params, trimmed)
  scores = trim.restore_scores(np.asarray(scores), g.config, info)
  assert_scores_close(scores, g.out["tf_scores"], g.valid, "trimmed teacher forcing")
  assert_argmax_equal(scores, g.out["tf_argmax"], g.out["tf_top2_margin"],
                      "trimmed tf argmax")
  loss = m4c_decoding_bce(scores, g.inputs["targets"], g.inputs["train_loss_mask"])
  assert_loss_close(loss, g.out["tf_loss"], "trimmed teacher-forced loss")


def test_variable_length_greedy_and_lfpr_gradients(g):
  """Greedy decoding and the whole-batch LFPR mask gradients (both variants, every t)
  of the golden batch through the variable-length path: trimmed with the row-wise work
  packed onto the non-padding rows (`trim_batch(pack=True)`) and, for TAP, trimmed
  only (TAP12's trimmed-only program differs only by the packing and costs 30 s)."""
  for pack in (True, False) if g.config.text_bert_layers else (True,):
    _check_variable_length_greedy_and_gradients(g, pack)


def _check_variable_length_greedy_and_gradients(g, pack):
  inputs = {k: np.asarray(v) for k, v in g.inputs.items()}
  trimmed, config, info = trim.trim_batch(inputs, g.config, pack=pack)
  assert any(config.pack_rows) == pack
  model = TAP(config)
  steps = len(STEPS)
  ones = (jnp.ones((config.mmt_layers, max(config.mmt_heads))),
          jnp.ones((config.mmt_layers, max(config.mmt_ffn))))

  @jax.jit
  def run(p, x):
    def objective(h, f, variant):  # [steps]: sum_b max_c scores[b, t, c]
      if variant == "tf":
        scores = model.apply({"params": p}, x, head_mask=h, ffn_mask=f)
      else:
        scores, _ = greedy_decode(model, {"params": p}, x, num_steps=steps,
                                  head_mask=h, ffn_mask=f)
      return jnp.max(scores[:, :steps], axis=-1).sum(0)
    grads = {v: jax.jacrev(lambda h, f, v=v: objective(h, f, v), argnums=(0, 1))(*ones)
             for v in VARIANTS}
    return greedy_decode(model, {"params": p}, x), grads

  (scores, prev), grads = jax.tree.map(np.asarray, run(g.params, trimmed))
  scores = trim.restore_scores(scores, g.config, info)
  what = "packed" if pack else "trimmed"
  assert_scores_close(scores, g.out["greedy_scores"], g.valid, f"{what} greedy scores")
  assert_argmax_equal(scores, g.out["greedy_argmax"], g.out["greedy_top2_margin"],
                      f"{what} greedy argmax")
  sure = np.all(g.out["greedy_top2_margin"] > MARGIN, axis=1)
  np.testing.assert_array_equal(prev[sure], g.out["greedy_prev_inds"][sure])
  for variant in VARIANTS:
    head, ffn = grads[variant]
    for i, t in enumerate(STEPS):
      key = f"lfpr_{variant}_%s_t{t}"
      assert_grad_close(head[i], g.out[key % "head_grad"], f"{what} {variant} head t={t}")
      assert_grad_close(ffn[i], g.out[key % "ffn_grad"], f"{what} {variant} ffn t={t}")


def test_greedy_decoding_cached(g):
  scores, prev = g.runs["greedy"], g.runs["greedy_prev"]
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


def test_teacher_forcing_on_greedy_inputs(g):
  """Independent of argmax ties: feed upstream's final-pass decoder inputs."""
  inputs = {**g.inputs, "train_prev_inds": jnp.asarray(g.out["greedy_prev_inds"])}
  scores = g.forward(g.params, inputs)
  assert_scores_close(np.asarray(scores), g.out["greedy_scores"], g.valid,
                      "teacher forcing on greedy_prev_inds")


@pytest.mark.parametrize("g", [golden_files.arch_param("tap")], indirect=True)
def test_reference_loop_equals_cached_and_upstream(g):
  model = CompiledForward(g.config, g.forward)
  ref_scores, ref_prev = (np.asarray(a) for a in
                          greedy_decode_reference(model, {"params": g.params}, g.inputs))
  assert_scores_close(ref_scores, g.out["greedy_scores"], g.valid, "12-pass loop")
  np.testing.assert_array_equal(ref_prev, g.out["greedy_prev_inds"])
  scores, prev = g.runs["greedy"], g.runs["greedy_prev"]
  np.testing.assert_array_equal(prev, ref_prev)
  assert_scores_close(scores, ref_scores, g.valid, "cached vs 12-pass")


@pytest.mark.parametrize("variant", VARIANTS)
def test_lfpr_mask_gradients(g, variant):
  """jax.grad w.r.t. the explicit masks equals upstream's LFPR mask gradients."""
  got = g.runs["lfpr"][variant]
  for i, t in enumerate(STEPS):
    key = f"lfpr_{variant}_%s_t{t}"
    assert_loss_close(got["objective"][i], g.out[key % "objective"], f"objective t={t}")
    for b, want in enumerate(g.out[key % "objective_per_sample"]):
      assert_loss_close(got["objective_per_sample"][i, b], want,
                        f"objective of sample {b}, t={t}")
    assert_grad_close(got["head_grad"][i], g.out[key % "head_grad"],
                      f"{variant} head grad t={t}")
    assert_grad_close(got["ffn_grad"][i], g.out[key % "ffn_grad"],
                      f"{variant} ffn grad t={t}")
    ph, pf = got["head_grad_per_sample"][i], got["ffn_grad_per_sample"][i]
    assert_grad_close(ph, g.out[key % "head_grad_per_sample"], f"per-sample head t={t}")
    assert_grad_close(pf, g.out[key % "ffn_grad_per_sample"], f"per-sample ffn t={t}")
    assert_grad_close((ph ** 2).sum(0), g.out[key % "head_fisher_per_sample"],
                      f"per-sample head Fisher t={t}")
    assert_grad_close((pf ** 2).sum(0), g.out[key % "ffn_fisher_per_sample"],
                      f"per-sample ffn Fisher t={t}")


def test_pruned_model_of_pruning_json(g):
  """The pruned model (constraint 0.4, some layers with 0 heads) equals upstream,
  and equals the unpruned model run with the binary masks (surgery = masking).

  A layer left with 0 heads is also checked on small shapes, pruned against masked
  (tests/pruning/test_surgery.py), and sliced as upstream on the golden 0.2 selection.
  """
  pruned_out, meta = g.pruned_out, g.pruning_meta
  head_mask, ffn_mask = pruned_out["head_mask"], pruned_out["ffn_mask"]
  np.testing.assert_array_equal(head_mask.sum(1), meta["sum"]["0.4"]["cfg_head"])
  np.testing.assert_array_equal(ffn_mask.sum(1), meta["sum"]["0.4"]["cfg_ffn"])

  # Surgery on the Flax tree (tests/pruning/test_surgery.py checks it against a
  # transcription of upstream's create_pruned_model tensor by tensor).
  params, config, tf, gs, _ = g.pruned
  shapes = {k: list(v.shape) for k, v in params_to_state_dict(params, config).items()}
  assert shapes == {k: v for k, v in meta["pruned_state_dict_shapes"].items()
                    if not k.startswith(PRETRAIN_PREFIXES)}
  assert list(config.mmt_heads) == meta["sum"]["0.4"]["cfg_head"]
  assert config.learnable_masks

  assert_scores_close(tf, pruned_out["tf_scores"], g.valid, "pruned teacher forcing")
  assert_argmax_equal(tf, pruned_out["tf_argmax"], pruned_out["tf_top2_margin"],
                      "pruned tf argmax")
  loss = m4c_decoding_bce(tf, g.inputs["targets"], g.inputs["train_loss_mask"])
  assert_loss_close(loss, pruned_out["tf_loss"], "pruned loss")

  assert_scores_close(gs, pruned_out["greedy_scores"], g.valid, "pruned greedy")
  assert_argmax_equal(gs, pruned_out["greedy_argmax"], pruned_out["greedy_top2_margin"],
                      "pruned greedy argmax")
  loss = m4c_decoding_bce(gs, g.inputs["targets"], g.inputs["train_loss_mask"])
  assert_loss_close(loss, pruned_out["greedy_loss"], "pruned greedy loss")

  # The unpruned model with binary masks as apply arguments.
  assert_scores_close(g.runs["masked_tf"], pruned_out["masked_full_tf_scores"], g.valid,
                      "masked unpruned teacher forcing")
  assert_scores_close(g.runs["masked_greedy"], pruned_out["masked_full_greedy_scores"],
                      g.valid, "masked unpruned greedy")
