"""Parameter groups and trainable sets as (regex, group) rules; upstream's schedule."""

import dataclasses

import jax
import numpy as np
import pytest

from lfpr_jax.models.params import abstract_params
from lfpr_jax.pruning import rest
from lfpr_jax.training import optim
from tests.helpers import BASE

CONFIG = dataclasses.replace(BASE, learnable_masks=True)


def _params():
  return jax.tree.map(lambda s: np.zeros(s.shape, np.float32), abstract_params(CONFIG))


def test_upstream_groups_first_match_wins():
  labels = optim.group_labels(_params(), optim.UPSTREAM_GROUPS)
  assert labels["text_bert/word/embedding"] == "text_bert"
  assert labels["obj_fc7/kernel"] == "fc7" and labels["ocr_fc7/kernel"] == "fc7"
  assert labels["mmt_layer_0/attention/head_mask"] == "mask"
  assert labels["mmt_layer_0/ffn/ffn_mask"] == "mask"
  assert labels["classifier_embedding"] == "base"
  assert None not in labels.values()


def test_split_merge_and_no_match():
  params = _params()
  rules = [(r"mask$", "mask"), (r"^classifier", "base"), (r"^mmt_layer_2/", "base")]
  t, f = optim.split_params(params, rules)
  assert set(optim.flat(t)) == {p for p in optim.flat(params)
                                if p.endswith("mask") or p.startswith(("classifier",
                                                                        "mmt_layer_2/"))}
  merged = optim.merge_params(t, f)
  assert jax.tree.structure(merged) == jax.tree.structure(params)
  # A rule with group None freezes what it matches, before later rules see it.
  t2, _ = optim.split_params(params, [(r"^classifier_bias$", None), (r".*", "base")])
  assert "classifier_bias" not in optim.flat(t2)
  with pytest.raises(ValueError, match="no parameter matches"):
    optim.split_params(params, [(r"^nothing$", "base")])
  with pytest.raises(ValueError, match="rule must be"):
    optim.split_params(params, [r".*"])


def test_rest_rules_are_the_paper_set():
  """docs/LFPR.md §6.3: every mask, classifier, pointer network, the last k MMT layers."""
  params = _params()
  for k in range(4):
    t, _ = optim.split_params(params, rest.trainable_rules(CONFIG, k))
    last = tuple(f"mmt_layer_{i}/" for i in range(3 - k, 3))
    want = {p for p in optim.flat(params)
            if p.endswith(("/head_mask", "/ffn_mask")) or p.startswith(
                ("classifier_", "ocr_ptr_net/")) or (last and p.startswith(last))}
    assert set(optim.flat(t)) == want, k
    labels = optim.group_labels(t, rest.trainable_rules(CONFIG, k))
    assert {p for p, g in labels.items() if g == "mask"} == {
        p for p in want if p.endswith("_mask")}
  with pytest.raises(ValueError, match="trailing"):
    rest.trainable_rules(CONFIG, 4)


def test_rest_settings_from_config():
  from configs.common import rest_section
  section = rest_section("tap", "textvqa", ckpt_every=7, loss_shards=2)
  s = rest.RestSettings.from_config(section, percent=73, layers=2)
  assert (s.percent, s.layers, s.lr, s.mask_lr, s.ckpt_every, s.loss_shards) == (
      73, 2, 5e-5, 1e-3, 7, 2)
  f = rest.RestSettings.from_config(section, percent=100, layers=3, lr=1e-4,
                                    mask_lr=1e-4)
  assert (f.lr, f.mask_lr, f.batch_size) == (1e-4, 1e-4, 16)


def test_schedule_matches_pythia():
  s = optim.upstream_schedule(1.0, warmup_steps=10, warmup_factor=0.2,
                              decay_steps=(20, 30), decay_ratio=0.1)
  np.testing.assert_allclose([float(s(i)) for i in (0, 5, 10, 11, 20, 29, 30)],
                             [0.2, 0.6, 1.0, 1.0, 0.1, 0.1, 0.01], rtol=1e-6)
  assert float(optim.upstream_schedule(3.0, warmup_steps=0)(100)) == 3.0


def _first_step_rates(rules, rates, clip_norm=None):
  """The learning rate each leaf got in Adam's first step: |update| / (|g|/(|g|+eps))."""
  params = _params()
  t, _ = optim.split_params(params, rules)
  tx = optim.make_optimizer(t, rules, rates, warmup_steps=0, clip_norm=clip_norm)
  grads = jax.tree.map(lambda x: np.full(x.shape, 0.5, np.float32), t)
  # Jitted: run eagerly, the update goes op by op over every leaf (~3x slower).
  updates, _ = jax.jit(tx.update)(grads, jax.jit(tx.init)(t), t)
  return {p: float(np.abs(np.asarray(u)).max()) for p, u in optim.flat(updates).items()}


def test_optimizer_rates_per_group():
  got = _first_step_rates(optim.UPSTREAM_GROUPS, optim.upstream_learning_rates(1e-3,
                                                                               5e-2))
  want = {"text_bert/word/embedding": 1e-4, "obj_fc7/kernel": 1e-4,
          "mmt_layer_0/attention/head_mask": 5e-2, "classifier_embedding": 1e-3}
  for p, lr in want.items():
    np.testing.assert_allclose(got[p], lr, rtol=1e-5, err_msg=p)
  # ReSt: masks at mask_lr, the rest of its set at lr; nothing else is updated.
  got = _first_step_rates(rest.trainable_rules(CONFIG, 1), {"base": 5e-5, "mask": 1e-3})
  assert got["mmt_layer_1/ffn/ffn_mask"] == pytest.approx(1e-3, rel=1e-5)
  assert got["mmt_layer_2/attention/query/kernel"] == pytest.approx(5e-5, rel=1e-5)
  assert "text_bert/word/embedding" not in got
  # Full fine-tuning is one rule: every leaf at one rate. The clip scales every
  # gradient alike, which only shows through Adam's eps.
  got = _first_step_rates([(".*", "base")], {"base": 1e-4}, clip_norm=0.25)
  leaves = optim.flat(_params())
  assert len(got) == len(leaves)
  g = 0.5 * 0.25 / (0.5 * np.sqrt(sum(np.size(x) for x in leaves.values())))
  np.testing.assert_allclose(list(got.values()), 1e-4 * g / (g + 1e-8), rtol=1e-5)


def test_optimizer_rejects_missing_rates_and_frozen_leaves():
  params = _params()
  with pytest.raises(ValueError, match="no learning rate.*mask"):
    optim.make_optimizer(params, optim.UPSTREAM_GROUPS, {"base": 1.0, "fc7": 1.0,
                                                        "text_bert": 1.0})
  with pytest.raises(ValueError, match="frozen by the rules"):
    optim.make_optimizer(params, [(r"^classifier", "base")], {"base": 1.0})
