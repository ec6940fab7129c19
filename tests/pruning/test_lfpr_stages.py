"""LFPR stages on small shapes: pseudo-labels, ReSt (data parallel,
resume, frozen set, non-finite loss), delta checkpoints and config checks."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from configs.synthetic import get_config
from configs import common as schedules
from lfpr_jax.data import prepare
from lfpr_jax.pruning import delta
from lfpr_jax.training import checkpointing
from lfpr_jax.experiments import common
from lfpr_jax.training import parallel
from lfpr_jax.pruning import pseudo_labels
from lfpr_jax.pruning import rest
from lfpr_jax.pruning import surgery
from lfpr_jax.training import loop
from lfpr_jax.training import optim
from lfpr_jax.training import step as train_step
from lfpr_jax.data.answers import decode_answer, process_answers
from lfpr_jax.data.pipeline import decode_strings, make_loader
from lfpr_jax.models.config import TapConfig
from lfpr_jax.models.params import abstract_params, init_params
from tests.helpers import setup_over

# The module-scoped prepared data and base model are built once (on one worker).
pytestmark = pytest.mark.xdist_group("lfpr_stages")


# ------------------------------------------------------------- schedules, subsets


def test_upstream_iteration_counts():
  """Invariant 10: ceil(ceil(N/2)/8) for the implied subset sizes of §6.2."""
  table = {3460: 217, 20760: 1298, 25370: 1586, 27670: 1730, 29975: 1874, 34602: 2163,
           2340: 147, 14070: 880, 16410: 1026, 17190: 1075, 18760: 1173, 20310: 1270,
           21095: 1319, 23446: 1466}
  upstream_iterations = lambda n, gpus=2, per_gpu=8: math.ceil(math.ceil(n / gpus)
                                                                / per_gpu)
  for n, it in table.items():
    assert upstream_iterations(n) == it, n
  assert rest.RestSettings(percent=10, layers=0).num_steps(33) == 3


def test_subsets_are_nested_and_seeded():
  a = pseudo_labels.subset_indices(1000, 10, seed=0)
  b = pseudo_labels.subset_indices(1000, 73, seed=0)
  assert len(a) == 100 and len(b) == 730 and set(a) <= set(b)
  np.testing.assert_array_equal(a, pseudo_labels.subset_indices(1000, 10, seed=0))
  assert not np.array_equal(a, pseudo_labels.subset_indices(1000, 10, seed=1))
  with pytest.raises(ValueError, match="\\(0, 100\\]"):
    pseudo_labels.subset_indices(10, 0, seed=0)


def test_trainable_count_formula():
  """Invariant 9 for TAP's shapes: 5,026,184 + masks + the last k layers."""
  heads, ffn = (3, 2, 0, 5), (1420, 0, 1362, 1387)
  config = TapConfig.tap().pruned(heads, ffn, learnable_masks=True)
  params = abstract_params(config)
  layer = lambda h, n: 196_800 * h + 1_537 * n + 4_608
  for k in range(5):
    got = sum(math.prod(x.shape) for x in jax.tree.leaves(
        rest.trainable_params(params, config, k)))
    want = 5_026_184 + sum(heads) + sum(ffn) + sum(
        layer(h, n) for h, n in list(zip(heads, ffn))[4 - k:])
    assert got == want, k
  with pytest.raises(ValueError, match="trailing"):
    rest.trainable_rules(config, 5)
  assert schedules.SUM[("tap12", "stvqa")][1] == (0.4, 60, 3)


# --------------------------------------------------------- data-backed ReSt tests


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """The :tiny synthetic dataset, a random base model and its pseudo-labels."""
  config = get_config("tiny")
  workdir = str(tmp_path_factory.mktemp("tiny"))
  data = prepare.prepare_data(config, workdir)
  mc = data.model_config
  params = init_params(mc, jax.random.key(0))
  mesh = parallel.make_mesh()
  labels = common.predict_train(setup_over(config, workdir, data, params, mesh,
                                          local=16, samples=np.arange(192)))
  head = np.ones((mc.mmt_layers, mc.mmt_heads[0]), np.float32)
  ffn = np.ones((mc.mmt_layers, mc.mmt_ffn[0]), np.float32)
  head[0, 1] = 0
  ffn[0, ::3] = 0
  pruned, pruned_config = surgery.prune(params, mc, head, ffn)
  return dict(data=data, params=params, labels=labels, pruned=pruned,
              pruned_config=pruned_config, masks=(head, ffn), workdir=workdir)


def test_pseudo_labels_cover_train_and_rebuild_targets(tiny):
  data, labels = tiny["data"], tiny["labels"]
  assert len(labels.question_ids) == 192
  transform = pseudo_labels.PseudoLabelTargets(labels, data.vocab, decode_steps=12,
                                               ocr_slots=tiny["pruned_config"].ocr_max)
  batch = next(make_loader(data.built_dir, "train", 4, shuffle=False))
  lookup = labels.lookup()
  for i in range(4):
    example = {k: v[i] for k, v in batch.items()}
    out = transform.map(example)
    ctx = decode_strings(example["context_tokens"])
    answer, _ = decode_answer(lookup[int(example["question_id"])], data.vocab, ctx)
    want = process_answers([answer] * 10, ctx, data.vocab,
                           num_ocr_slots=tiny["pruned_config"].ocr_max)
    np.testing.assert_array_equal(out["targets"], want.targets)
    np.testing.assert_array_equal(out["train_loss_mask"], want.train_loss_mask)
    assert decode_strings(out["answers"]) == [answer] * 10


def _retrain(tiny, directory, *, devices=None, stop_after=None, steps=None, layers=1,
             trim=False):
  data = tiny["data"]
  settings = rest.RestSettings(percent=50, layers=layers, batch_size=8, ckpt_every=2,
                               lr=1e-3)
  indices = pseudo_labels.subset_indices(192, 50, seed=0)[:steps * 8 if steps else None]
  transform = pseudo_labels.PseudoLabelTargets(
      tiny["labels"], data.vocab, decode_steps=12,
      ocr_slots=tiny["pruned_config"].ocr_max)
  return loop.train_subset(
      model_config=tiny["pruned_config"], params=tiny["pruned"],
      rules=rest.trainable_rules(tiny["pruned_config"], layers), settings=settings,
      built_dir=data.built_dir, split="train", indices=indices, transforms=[transform],
      directory=directory, mesh=parallel.make_mesh(devices), rng=jax.random.key(1),
      progress=False, stop_after=stop_after, trim=trim)


def _assert_trees(a, b, **kw):
  fa, fb = optim.flat(a), optim.flat(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_allclose(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k, **kw)


def test_rest_data_parallel_equals_single_device_and_freezes(tiny, tmp_path):
  assert jax.device_count() == 4
  single, s1 = _retrain(tiny, str(tmp_path / "one"), devices=jax.devices()[:1], steps=3)
  multi, s4 = _retrain(tiny, str(tmp_path / "four"), steps=3)
  assert s1["steps"] == s4["steps"] == 3
  _assert_trees(multi, single, rtol=2e-5, atol=2e-6)
  before, after = optim.flat(tiny["pruned"]), optim.flat(multi)
  trained = set(optim.flat(rest.trainable_params(multi, tiny["pruned_config"], 1)))
  changed = {k for k in before if not np.array_equal(before[k], after[k])}
  assert changed and changed <= trained       # frozen leaves are bit-identical
  assert any("mask" in k for k in changed)


def _record_compiled_steps(monkeypatch) -> list:
  """The configs `step.make_train_step` builds a step for, in order (a spy)."""
  compiled = []
  make = train_step.make_train_step

  def counting(model, *args, **kwargs):
    compiled.append(model.config)
    return make(model, *args, **kwargs)
  monkeypatch.setattr(train_step, "make_train_step", counting)
  return compiled


def test_rest_trimmed_equals_padded(tiny, tmp_path, monkeypatch):
  """Trimmed ReSt (one compiled step per shape) trains the padded run's parameters up
  to float noise (the tiny model has no dropout)."""
  assert tiny["pruned_config"].hidden_dropout == 0.0
  compiled = _record_compiled_steps(monkeypatch)
  cut, s1 = _retrain(tiny, str(tmp_path / "cut"), steps=6, trim=True)
  assert len(compiled) > 1 and all(c != tiny["pruned_config"] for c in compiled)
  padded, s2 = _retrain(tiny, str(tmp_path / "padded"), steps=6)
  assert s1["steps"] == s2["steps"] == 6
  np.testing.assert_allclose(s1["final_loss"], s2["final_loss"], rtol=1e-5)
  _assert_trees(cut, padded, rtol=2e-5, atol=2e-6)


def test_rest_packed_equals_padded(tiny, tmp_path, monkeypatch):
  """On one device trimmed ReSt also packs its rows (`TapConfig.pack_rows`): the
  parameter gradients of the packed steps train the padded run's parameters."""
  compiled = _record_compiled_steps(monkeypatch)
  one = jax.devices()[:1]
  cut, s1 = _retrain(tiny, str(tmp_path / "cut"), devices=one, steps=6, trim=True)
  assert compiled and any(any(c.pack_rows) for c in compiled)
  padded, s2 = _retrain(tiny, str(tmp_path / "padded"), devices=one, steps=6)
  np.testing.assert_allclose(s1["final_loss"], s2["final_loss"], rtol=1e-5)
  _assert_trees(cut, padded, rtol=2e-5, atol=2e-6)


def test_rest_resume_equals_uninterrupted(tiny, tmp_path):
  full, summary = _retrain(tiny, str(tmp_path / "a"), steps=5)
  part, first = _retrain(tiny, str(tmp_path / "b"), steps=5, stop_after=3)
  assert first["steps"] == 3 and not first["complete"]
  resumed, second = _retrain(tiny, str(tmp_path / "b"), steps=5)
  assert second["resumed_from"] == 3 and second["complete"] and summary["complete"]
  _assert_trees(resumed, full, rtol=0, atol=0)
  del part


def test_rest_non_finite_loss_stops(tiny, tmp_path):
  bad = optim.flat(tiny["pruned"])
  bad["classifier_bias"] = np.full_like(np.asarray(bad["classifier_bias"]), np.nan)
  tiny_bad = {**tiny, "pruned": optim.unflat(bad)}
  with pytest.raises(FloatingPointError, match="step 1 produced a non-finite loss"):
    _retrain(tiny_bad, str(tmp_path / "nan"), steps=3)
  assert checkpointing.train_manager(str(tmp_path / "nan" / "ckpt")).latest_step() is None


def test_delta_rebuilds_the_retrained_model(tiny, tmp_path):
  retrained, _ = _retrain(tiny, str(tmp_path / "r"), steps=2)
  base = str(tmp_path / "base")
  checkpointing.save_model(base, tiny["data"].model_config, tiny["params"])
  sha = checkpointing.params_sha256(tiny["params"])
  trainable = rest.trainable_params(retrained, tiny["pruned_config"], 1)
  delta.save_delta(str(tmp_path / "delta"), trainable=trainable,
                           pruned_config=tiny["pruned_config"],
                           head_mask=tiny["masks"][0], ffn_mask=tiny["masks"][1],
                           base_sha256=sha)
  config, params = delta.load_delta(str(tmp_path / "delta"), base)
  assert config == tiny["pruned_config"]
  _assert_trees(params, retrained, rtol=0, atol=0)
  other = str(tmp_path / "other")
  checkpointing.save_model(other, tiny["data"].model_config,
                           init_params(tiny["data"].model_config, jax.random.key(9)))
  with pytest.raises(ValueError, match="not the base model"):
    delta.load_delta(str(tmp_path / "delta"), other)
