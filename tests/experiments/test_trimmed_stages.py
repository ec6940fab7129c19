"""The order-free eval-mode stages with `config.trim` (trimmed + length-sorted batches)
give exactly the padded run's results, in its order, on the :tiny synthetic data."""

from __future__ import annotations

import dataclasses

import jax
import ml_collections
import numpy as np
import pytest

from configs.synthetic import get_config
from lfpr_jax.data import prepare
from lfpr_jax.data.pipeline import make_loader
from lfpr_jax.experiments import common, config_checks, stages
from lfpr_jax.models import trim as trimming
from lfpr_jax.models.batch import MODEL_INPUTS
from lfpr_jax.models.tap import TAP
from lfpr_jax.pruning import tstar
from lfpr_jax.training import evaluate as evaluation
from lfpr_jax.training import parallel
from tests.helpers import random_params, setup_over

LOCAL = 8  # small batches: more batches, so more distinct trimmed shapes


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A Setup over the :tiny synthetic dataset with a random base model (2 devices)."""
  config = get_config("tiny")
  workdir = str(tmp_path_factory.mktemp("tiny"))
  data = prepare.prepare_data(config, workdir)
  mc = data.model_config
  # Larger than init_params' weights: varied greedy answers, OCR copies among them.
  params = jax.tree.map(np.asarray, random_params(mc, seed=0, scale=0.4))
  mesh = parallel.make_mesh(jax.devices()[:2])
  return setup_over(config, workdir, data, params, mesh, local=LOCAL,
                    samples=common.sample_set(192, 40, 0))


def _with_trim(s, value):
  config = s.config.copy_and_resolve_references()
  config.trim = value
  return dataclasses.replace(s, config=config)


def test_configs_choose_trim_and_validate_it():
  # Trimmed in CI's `:tiny`; padded for the small synthetic model (compile-bound).
  assert get_config("tiny").trim is True and get_config().trim is False
  for bad, shown in ((1, "1"), (None, "None")):  # what the type-safe dict lets through
    config = get_config("tiny").to_dict()
    config["trim"] = bad
    with pytest.raises(stages.ConfigError, match=f"trim={shown}: expected True or False"):
      config_checks.validate(ml_collections.ConfigDict(config))
  del config["trim"]
  with pytest.raises(stages.ConfigError, match="trim: missing"):
    config_checks.validate(ml_collections.ConfigDict(config))


def test_lengths_vary_and_sorting_regroups(tiny):
  """The data has mixed lengths (else the equalities below would be vacuous)."""
  mc = tiny.base_config
  lengths = parallel.shard_lengths(tiny.data.built_dir, "val", mc)
  assert lengths.shape == (64, 5)
  sizes = {tuple(trimming.bucket_size(int(n), f) for n, f in
                 zip(row, trimming.segment_sizes(mc))) for row in lengths}
  assert len(sizes) > 2, sizes
  order = parallel.length_order(lengths, mc, num_records=64, local_batch=LOCAL,
                                mesh=tiny.mesh)
  assert sorted(order.indices.tolist()) == list(range(64))
  assert order.indices.tolist() != list(range(64))
  # Single process: the stream position of an example is its index.
  np.testing.assert_array_equal(order.positions, order.indices)


def test_evaluation_trimmed_and_sorted_equals_padded(tiny):
  model = TAP(tiny.base_config)
  padded = common.evaluate(model, tiny.base_params, tiny, predictions=True, trim=False)
  cut = common.evaluate(model, tiny.base_params, tiny, predictions=True, trim=True)
  assert cut == padded  # metrics (bit-equal sums), predictions, and their order
  assert padded["val_examples"] == 64
  assert len({p["answer"] for p in padded["predictions"]}) > 1
  want = [int(b) for batch in make_loader(tiny.data.built_dir, "val", 16, shuffle=False,
                                          drop_remainder=False)
          for b in batch["question_id"]]
  assert [p["question_id"] for p in cut["predictions"]] == want


def test_greedy_predictor_compiles_once_per_shape(tiny):
  """The argmax indices of every batch equal the padded ones; one program per shape."""
  mc, mesh = tiny.base_config, tiny.mesh
  bos = tiny.data.vocab.bos_idx
  rep = tiny.rep_params
  run = evaluation.greedy_predictor(mc, mesh, bos, trim=True)
  padded = evaluation.greedy_predictor(mc, mesh, bos, trim=False)
  assert isinstance(run, trimming.TrimmedFn)
  lengths = parallel.shard_lengths(tiny.data.built_dir, "val", mc)
  order = parallel.length_order(lengths, mc, num_records=64, local_batch=LOCAL,
                                mesh=mesh)

  def loader():
    return parallel.with_positions(
        make_loader(tiny.data.built_dir, "val", LOCAL, shuffle=False,
                    drop_remainder=False, indices=order.indices), order.positions)
  kw = dict(local_batch=LOCAL, num_batches=8, mesh=mesh, fields=MODEL_INPUTS,
            progress=False)
  shapes = []
  for (g, tc, info), p in zip(
      parallel.trimmed_global_batches(loader(), trim=parallel.Trim(mc), **kw),
      parallel.global_batches(loader(), **kw)):
    shapes.append(info.sizes)
    assert g["text_position_ids"].shape == (LOCAL, len(info.text_columns))
    assert g["cmb_text"].shape == (LOCAL, tc.text_len)
    np.testing.assert_array_equal(np.asarray(run.specialised(tc)(g, rep)),
                                  np.asarray(padded(rep, p)))
  assert len(set(shapes)) > 1
  assert any(s != trimming.segment_sizes(mc) for s in shapes)
  assert run.num_specialisations == len(set(shapes))


def test_pseudo_labels_trimmed_and_sorted_equal_padded(tiny):
  padded = common.predict_train(_with_trim(tiny, False))
  cut = common.predict_train(_with_trim(tiny, True))
  np.testing.assert_array_equal(cut.question_ids, padded.question_ids)
  np.testing.assert_array_equal(cut.indices, padded.indices)
  assert len(np.unique(padded.indices[:, 0])) > 1
  assert np.any(padded.indices >= tiny.base_config.num_answers)  # OCR copies too
  assert len(padded.question_ids) == 192


@pytest.mark.parametrize("batch_search", [False, True])
def test_tstar_trimmed_and_sorted_equals_padded(tiny, batch_search):
  def run(trim):
    s = _with_trim(tiny, trim)
    return tstar.compute_tstar(
        s.model, s.rep_params,
        common.batches(s, indices=s.samples, local_batch=LOCAL, trim=trim,
                       sort=trim and not batch_search),
        mesh=s.mesh, bos_index=s.data.vocab.bos_idx, batch_search=batch_search,
        trimmed=trim)
  padded, cut = run(False), run(True)
  assert cut == padded
  assert padded["question_ids"] == [int(q) for q in np.asarray(
      [b for batch in make_loader(tiny.data.built_dir, "train", LOCAL, shuffle=False,
                                  drop_remainder=False, indices=tiny.samples)
       for b in batch["question_id"]])]


@pytest.mark.parametrize("criterion", ["lfpr", "fisher", "alg"])
def test_scoring_trimmed_equals_padded(tiny, criterion):
  """Mask gradients of every gradient criterion through trimmed batches (one program
  per shape, upstream's batch composition) equal the padded ones up to float noise."""
  from lfpr_jax.models.batch import STEP_FIELDS
  from lfpr_jax.pruning import scoring
  s = tiny
  fields = MODEL_INPUTS if criterion == "lfpr" else STEP_FIELDS + ("has_answers",)
  options = (dict(t_star=2, bos_index=s.data.vocab.bos_idx, dropout=False)
             if criterion == "lfpr" else {})

  def run(trim):
    batches = common.batches(s, indices=s.samples, local_batch=LOCAL, fields=fields,
                             trim=trim, progress=False)
    return scoring.compute(criterion, s.model, s.rep_params, batches, mesh=s.mesh,
                           group_size=4, trimmed=trim, **options)
  padded, cut = run(False), run(True)
  np.testing.assert_array_equal(cut.question_ids, padded.question_ids)
  assert padded.num_samples == 40 and padded.head_grads.shape[0] == 10
  for name in ("head", "ffn", "head_grads", "ffn_grads", "head_per_sample",
               "ffn_per_sample"):
    want, got = getattr(padded, name), getattr(cut, name)
    if want is None:
      assert got is None and criterion != "lfpr", name
      continue
    assert np.abs(want).max() > 0, name
    # Float noise: the loss sums fewer (exactly zero) columns in another order; the
    # parity tests' gradient tolerance (GRAD_RTOL 1e-4).
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max(),
                               err_msg=name)
