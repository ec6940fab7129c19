"""Pruning surgery (docs/LFPR.md §5): upstream's slicing, and surgery = masking (§11.1)."""

import dataclasses
import functools

import flax
import jax
import numpy as np
import pytest

from converters.torch_to_flax import (infer_config, params_to_state_dict,
                                      state_dict_to_params)
from lfpr_jax.models.batch import model_inputs
from lfpr_jax.models.decoding import greedy_decode
from lfpr_jax.models.config import TapConfig
from lfpr_jax.models.params import abstract_params, check_params
from lfpr_jax.models.tap import TAP
from lfpr_jax.pruning.selection import mmt_params
from lfpr_jax.pruning.surgery import prune
from tests import golden
from tests.helpers import random_batch

ATOL = 1e-5


def upstream_create_pruned_model(sd, head_mask, ffn_mask, head_dim=64):
  """numpy transcription of LFPR's `create_pruned_model` (docs/LFPR.md §5.2-5.3).

  Kept heads/neurons in ascending original order; Q/K/V rows and output-dense
  columns of kept heads, intermediate rows and output columns of kept neurons;
  learnable masks at ones (`[1, h, 1, 1]` and `[f]`). Everything else is copied.
  """
  out = dict(sd)
  for l in range(head_mask.shape[0]):
    base = f"mmt.encoder.layer.{l}."
    heads = np.flatnonzero(head_mask[l])
    rows = (heads[:, None] * head_dim + np.arange(head_dim)[None]).reshape(-1)
    neurons = np.flatnonzero(ffn_mask[l])
    for n in ("query", "key", "value"):
      out[base + f"attention.self.{n}.weight"] = sd[base + f"attention.self.{n}.weight"][rows]
      out[base + f"attention.self.{n}.bias"] = sd[base + f"attention.self.{n}.bias"][rows]
    w = sd[base + "attention.output.dense.weight"]
    out[base + "attention.output.dense.weight"] = w[:, rows]
    out[base + "intermediate.dense.weight"] = sd[base + "intermediate.dense.weight"][neurons]
    out[base + "intermediate.dense.bias"] = sd[base + "intermediate.dense.bias"][neurons]
    out[base + "output.dense.weight"] = sd[base + "output.dense.weight"][:, neurons]
    out[base + "attention.self.head_mask.mask"] = np.ones((1, len(heads), 1, 1), np.float32)
    out[base + "intermediate.ffn_mask.mask"] = np.ones((len(neurons),), np.float32)
  return out


def flat(tree):
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep="/")


def assert_trees_equal(got, want):
  got, want = flat(got), flat(want)
  assert sorted(got) == sorted(want)
  for k in want:
    assert np.shape(got[k]) == np.shape(want[k]), k
    np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=k)


# (a) Upstream's slicing on the golden weights and selections ---------------------
@pytest.mark.xdist_group("golden_tap")  # shares the golden TAP with the parity tests
@pytest.mark.parametrize("constraint", ["0.4", "0.2"])
def test_prune_equals_upstream_create_pruned_model(constraint, golden_models):
  sd, config, params = golden_models.get("tap")
  pruning = golden.npz("tap", "pruning")
  meta = golden.pruning_meta("tap")
  head_mask = pruning[f"sum_{constraint}_head_mask"]
  ffn_mask = pruning[f"sum_{constraint}_ffn_mask"]

  up_sd = upstream_create_pruned_model(sd, head_mask, ffn_mask)
  if constraint == "0.4":  # the fixture records upstream's pruned shapes for 0.4
    shapes = {k: list(v.shape) for k, v in up_sd.items()}
    assert shapes == meta["pruned_state_dict_shapes"]
  up_config = infer_config(up_sd)
  up_params = state_dict_to_params(up_sd, up_config)

  new_params, new_config = prune(params, config, head_mask, ffn_mask)
  assert new_config == up_config
  assert list(new_config.mmt_heads) == meta["sum"][constraint]["cfg_head"]
  assert list(new_config.mmt_ffn) == meta["sum"][constraint]["cfg_ffn"]
  check_params(new_params, new_config)
  assert_trees_equal(new_params, up_params)
  # Back in the upstream layout: the same tensors as create_pruned_model's
  # (pretraining heads aside), zero-size blocks of 0-head layers included.
  back = params_to_state_dict(new_params, new_config)
  assert set(back) <= set(up_sd)
  for k, v in back.items():
    np.testing.assert_array_equal(v, up_sd[k], err_msg=k)
  # Masks excluded, the MMT holds exactly the accounted parameters.
  mmt = {k: v for k, v in flat(new_params).items()
         if k.startswith("mmt_layer_") and not k.endswith("_mask")}
  assert sum(v.size for v in mmt.values()) == mmt_params(new_config)
  assert mmt_params(new_config) == meta["sum"][constraint]["kept_encoder_params"]
  if constraint == "0.2":
    assert 0 in new_config.mmt_heads


# (b) Surgery = masking on a small random model -----------------------------------
SMALL = TapConfig(arch="custom", text_bert_layers=1, mmt_heads=(4, 4), mmt_ffn=(48, 48),
                  hidden_size=128, head_dim=32, text_heads=4, text_ffn=48,
                  vocab_size=300, question_len=4, text_len=14, ocr_text_len=6,
                  num_answers=40, obj_max=6, ocr_max=5, decode_steps=4,
                  obj_feat_dim=32, ocr_feat_dim=32, fc7_dim=32, fasttext_dim=30,
                  phoc_dim=20, order_dim=10, ptr_query_key_size=64)


@functools.lru_cache(maxsize=None)
def small_setup():
  # Random numpy weights on the model's abstract tree (no init compile); biases and
  # LayerNorms are random too, so every sliced tensor matters.
  rng = np.random.default_rng(0)
  params = flax.traverse_util.unflatten_dict({
      k: ((1.0 if k[-1] == "scale" else 0.0)
          + rng.normal(0, 0.05, v.shape)).astype(np.float32)
      for k, v in flax.traverse_util.flatten_dict(abstract_params(SMALL)).items()})
  batch = random_batch(SMALL, 3, seed=1)
  batch["context_info_0"]["max_features"] = np.array([SMALL.ocr_max, 2, 0])
  inputs = model_inputs(batch, SMALL)
  ocr_num = batch["context_info_0"]["max_features"]
  ocr_valid = np.arange(SMALL.ocr_max)[None] < ocr_num[:, None]
  valid = np.concatenate([np.ones((3, SMALL.num_answers), bool), ocr_valid], -1)[:, None]
  return params, inputs, valid


class Runners:
  """Jitted teacher forcing and greedy decoding per config, compiled once per module."""

  def __init__(self):
    self._by_config = {}

  def __call__(self, config):
    if config not in self._by_config:
      model = TAP(config)
      tf = jax.jit(lambda p, x, h, f: model.apply({"params": p}, x, head_mask=h,
                                                   ffn_mask=f))
      greedy = jax.jit(lambda p, x, h, f: greedy_decode(model, {"params": p}, x,
                                                        head_mask=h, ffn_mask=f))
      self._by_config[config] = tf, greedy
    return self._by_config[config]


@pytest.fixture(scope="module")
def runners():
  return Runners()


def outputs(runners, params, config, inputs, head_mask=None, ffn_mask=None):
  tf, greedy = runners(config)
  scores, prev = greedy(params, inputs, head_mask, ffn_mask)
  forced = tf(params, {**inputs, "train_prev_inds": prev}, head_mask, ffn_mask)
  tf_scores = tf(params, inputs, head_mask, ffn_mask)
  return [np.asarray(a) for a in (tf_scores, scores, prev, forced)]


def assert_same_outputs(got, want, valid, what):
  tf, scores, prev, forced = got
  tf_w, scores_w, prev_w, forced_w = want
  for name, a, b in (("teacher forcing", tf, tf_w), ("greedy", scores, scores_w),
                     ("forced on greedy inputs", forced, forced_w)):
    err = np.abs(np.where(valid, a - b, 0.0)).max()
    assert err <= ATOL, f"{what}, {name}: max |diff| on valid slots {err:.3g}"
  np.testing.assert_array_equal(prev, prev_w, err_msg=f"{what}: greedy argmax")
  np.testing.assert_array_equal(scores.argmax(-1), scores_w.argmax(-1))


def small_masks(seed):
  rng = np.random.default_rng(seed)
  return ((rng.random((2, 4)) < 0.6).astype(np.float32),
          (rng.random((2, 48)) < 0.5).astype(np.float32))


# Between them: partial layers, a layer without heads, one without neurons, and one
# without either (its output is LayerNorm(b_O + x) then LayerNorm(b_2 + ...)).
MASK_CASES = {
    "layer0_no_heads_layer1_no_neurons": (
        np.array([[0, 0, 0, 0], [1, 0, 1, 1]], np.float32),
        np.concatenate([small_masks(4)[1][:1], np.zeros((1, 48), np.float32)])),
    "layer1_empty": (np.array([[1, 1, 0, 1], [0, 0, 0, 0]], np.float32),
                     np.concatenate([small_masks(5)[1][:1],
                                     np.zeros((1, 48), np.float32)])),
}


@pytest.mark.parametrize("case", sorted(MASK_CASES))
def test_pruned_equals_masked(case, runners):
  params, inputs, valid = small_setup()
  head_mask, ffn_mask = MASK_CASES[case]
  pruned, config = prune(params, SMALL, head_mask, ffn_mask)
  check_params(pruned, config)
  assert config.mmt_heads == tuple(head_mask.sum(1).astype(int))
  assert config.mmt_ffn == tuple(ffn_mask.sum(1).astype(int))
  assert config.learnable_masks
  want = outputs(runners, params, SMALL, inputs, head_mask, ffn_mask)
  got = outputs(runners, pruned, config, inputs)
  assert_same_outputs(got, want, valid, case)
  # The masks are not a no-op on this model (the comparison has teeth).
  full = outputs(runners, params, SMALL, inputs, np.ones_like(head_mask),
                 np.ones_like(ffn_mask))
  assert np.abs(np.where(valid, full[0] - want[0], 0)).max() > 1e-3


def test_learnable_masks_are_sliced_or_folded(runners):
  """A model with (trained, non-unit) masks: surgery keeps what it computes."""
  params, inputs, valid = small_setup()
  ones = (np.ones((2, 4)), np.ones((2, 48)))
  with_masks, lm_config = prune(params, SMALL, *ones)  # adds masks at 1
  assert lm_config == dataclasses.replace(SMALL, learnable_masks=True)
  rng = np.random.default_rng(7)
  with_masks = jax.tree.map(lambda x: x, with_masks)
  for i in range(2):
    layer = with_masks[f"mmt_layer_{i}"]
    layer["attention"]["head_mask"] = rng.uniform(0.5, 1.5, 4).astype(np.float32)
    layer["ffn"]["ffn_mask"] = rng.uniform(0.5, 1.5, 48).astype(np.float32)
  head_mask, ffn_mask = small_masks(3)

  def scores(p, config, *masks):  # teacher forcing only: greedy is covered above
    return np.asarray(runners(config)[0](p, inputs, *(masks or (None, None))))
  want = scores(with_masks, lm_config, head_mask, ffn_mask)
  sliced, sliced_config = prune(with_masks, lm_config, head_mask, ffn_mask)
  for i in range(2):
    np.testing.assert_array_equal(
        sliced[f"mmt_layer_{i}"]["attention"]["head_mask"],
        with_masks[f"mmt_layer_{i}"]["attention"]["head_mask"][head_mask[i] > 0])
  folded, folded_config = prune(with_masks, lm_config, head_mask, ffn_mask,
                                learnable_masks=False)
  assert not folded_config.learnable_masks
  check_params(folded, folded_config)
  assert not any(k.endswith("_mask") for k in flat(folded))
  for what, p, config in (("sliced", sliced, sliced_config),
                          ("folded", folded, folded_config)):
    err = np.abs(np.where(valid, scores(p, config) - want, 0.0)).max()
    assert err <= ATOL, f"{what}: max |diff| on valid slots {err:.3g}"


# (c) Composition, purity, errors ----------------------------------------------------
def test_pruning_twice_equals_composed_masks():
  params, _, _ = small_setup()
  m1 = (np.array([[1, 0, 1, 1], [1, 1, 0, 1]], np.float32), small_masks(11)[1])
  once, config1 = prune(params, SMALL, *m1)
  # Trained masks of the pruned model must survive the second surgery.
  rng = np.random.default_rng(12)
  once = jax.tree.map(lambda x: x, once)
  for i in range(2):
    for block, name in (("attention", "head_mask"), ("ffn", "ffn_mask")):
      n = once[f"mmt_layer_{i}"][block][name].shape[0]
      once[f"mmt_layer_{i}"][block][name] = rng.uniform(0.5, 1.5, n).astype(np.float32)
  # Second masks on the pruned model: [L, max h_l], zeros past each layer's width.
  h2 = np.array([[0, 1, 1], [1, 0, 1]], np.float32)
  f2 = np.zeros((2, max(config1.mmt_ffn)), np.float32)
  for i, n in enumerate(config1.mmt_ffn):
    f2[i, :n] = rng.random(n) < 0.5
  f2[1, :] = 0  # and a layer left without neurons
  twice, config2 = prune(once, config1, h2, f2)
  check_params(twice, config2)

  composed_h = np.zeros_like(m1[0])
  composed_f = np.zeros_like(m1[1])
  for i in range(2):
    composed_h[i, np.flatnonzero(m1[0][i])[h2[i, :config1.mmt_heads[i]] > 0]] = 1
    composed_f[i, np.flatnonzero(m1[1][i])[f2[i, :config1.mmt_ffn[i]] > 0]] = 1
  direct, config_direct = prune(params, SMALL, composed_h, composed_f)
  assert config2 == config_direct
  direct = jax.tree.map(lambda x: x, direct)
  for i in range(2):  # the second surgery sliced the trained masks, not reset them
    for block, name, m in (("attention", "head_mask", h2), ("ffn", "ffn_mask", f2)):
      old = once[f"mmt_layer_{i}"][block].get(name)
      if name in direct[f"mmt_layer_{i}"][block]:
        direct[f"mmt_layer_{i}"][block][name] = old[m[i, :old.shape[0]] > 0]
  assert_trees_equal(twice, direct)
  # Lists of per-layer vectors work as well as padded arrays.
  listed, _ = prune(once, config1, [h2[i, :h] for i, h in enumerate(config1.mmt_heads)],
                    [f2[i, :n] for i, n in enumerate(config1.mmt_ffn)])
  assert_trees_equal(listed, twice)


def test_input_untouched_and_passthrough_shared():
  params, _, _ = small_setup()
  before = {k: np.array(v, copy=True) for k, v in flat(params).items()}
  before_keys = jax.tree.structure(params)
  head_mask, ffn_mask = MASK_CASES["layer0_no_heads_layer1_no_neurons"]
  new, _ = prune(params, SMALL, head_mask, ffn_mask)
  assert jax.tree.structure(params) == before_keys
  for k, v in flat(params).items():
    np.testing.assert_array_equal(v, before[k], err_msg=k)
  old, got = flat(params), flat(new)
  for k in ("classifier_embedding", "text_bert/layer_0/attention/query/kernel",
            "ocr_ptr_net/query/kernel", "mmt_layer_0/attn_ln/scale",
            "mmt_layer_0/attention/out/bias", "mmt_layer_1/ffn/wo/bias"):
    assert got[k] is old[k], k
  assert "mmt_layer_0/attention/query/kernel" not in got
  assert "mmt_layer_1/ffn/wi/kernel" not in got
  # Works on a FrozenDict and on jax arrays as well.
  frozen, _ = prune(flax.core.freeze(jax.tree.map(jax.numpy.asarray, params)), SMALL,
                    head_mask, ffn_mask)
  assert_trees_equal(frozen, new)


def test_bad_input():
  params, _, _ = small_setup()
  h, f = small_masks(3)
  cases = [
      ((h[:1], f), "head_mask must have shape \\(2, 4\\)"),
      ((h, f[:, :40]), "ffn_mask must have shape \\(2, 48\\)"),
      ((h * 0.5, f), "must be binary"),
      ((np.where(h > 0, np.nan, 0), f), "must be binary"),
      ((h, f.astype(str)), "numeric or boolean"),
      (([h[0]], f), "head_mask has 1 per-layer vectors"),
      (([h[0], h[1][:3]], f), "head_mask\\[1\\] has shape \\(3,\\)"),
  ]
  for args, match in cases:
    with pytest.raises(ValueError, match=match):
      prune(params, SMALL, *args)
  # Masks of units a pruned layer does not have.
  pruned, config = prune(params, SMALL, np.array([[1, 1, 0, 0], [1, 1, 1, 1]]), f)
  bad = np.array([[1, 0, 1, 0], [1, 1, 1, 1]])
  with pytest.raises(ValueError, match="head_mask\\[0\\] keeps heads past index 1"):
    prune(pruned, config, bad, np.ones((2, max(config.mmt_ffn))))
  # Params that do not match the config.
  with pytest.raises(ValueError, match="mmt_layer_0/attention/query/kernel has shape"):
    prune(params, dataclasses.replace(SMALL, mmt_heads=(3, 3)), h[:, :3], f)
  with pytest.raises(ValueError, match="params have no 'mmt_layer_1'"):
    prune({k: v for k, v in params.items() if k != "mmt_layer_1"}, SMALL, h, f)
  with pytest.raises(ValueError, match="MMT layers \\['mmt_layer_1'\\] beyond"):
    prune(params, dataclasses.replace(SMALL, mmt_heads=(4,), mmt_ffn=(48,)), h[:1], f[:1])
