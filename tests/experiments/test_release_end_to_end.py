"""The README's real-data commands end to end, on the mock TAP release, both datasets.

One module-scoped run follows the README ("Real data", "Converting an upstream
checkpoint"): `python -m lfpr_jax.data.tfds_builder` for TextVQA and ST-VQA on one
release root, `python -m converters.torch_to_flax` on an upstream-format checkpoint of a
small random TAP, then `python -m lfpr_jax.main --config=configs/tap_<dataset>.py:<c>`
once per dataset, each a subprocess. The tests check what a user gets: exit status 0,
the printed table naming the dataset's metrics (TextVQA accuracy; ST-VQA accuracy and
ANLS), strict-JSON results, and the EvalAI predictions of every val question next to
each evaluation, whose scores are the reported metrics.

Kept small for the suite's budget: a 1-MMT-layer model (constraints whose ReSt row
retrains k = 1 layer: TextVQA 0.5, ST-VQA 0.7), batch sizes of 4, one speed repeat, and
`trim=False` so that the two runs compile the same unpruned programs and the second
reuses them through one shared compilation cache.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from converters import flax_to_torch
from lfpr_jax.data import pipeline, tfds_builder
from lfpr_jax.data import metrics as metric_fns
from lfpr_jax.models.config import TapConfig
from tests.conftest import REPO, SUBPROCESS_ENV
from tests.converters import torch_writer
from tests.data import release_mock as mock
from tests.helpers import random_params

# Shares the module's build and runs: keep every test of this file on one xdist worker.
pytestmark = pytest.mark.xdist_group("release_end_to_end")

CONSTRAINTS = {"textvqa": 0.5, "stvqa": 0.7}  # ReSt rows (60 %, k = 1) of tap_<dataset>
METRICS = {"textvqa": {"textvqa_accuracy": metric_fns.textvqa_accuracy},
           "stvqa": {"stvqa_accuracy": metric_fns.stvqa_accuracy,
                     "stvqa_anls": metric_fns.stvqa_anls}}
TABLE_LABELS = {"textvqa": ("val TextVQA acc unpruned",),
                "stvqa": ("val ST-VQA acc unpruned", "val ANLS unpruned")}
# Evaluations of a target that write `<stem>.json` + `<stem>_predictions.json`.
EVALS = ("eval_pruned", "eval_rest")

def _cli(*args: str, env: dict | None = None, timeout: int = 600
         ) -> subprocess.CompletedProcess:
  out = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True,
                       text=True, env={**SUBPROCESS_ENV, **(env or {})}, timeout=timeout)
  assert out.returncode == 0, (args[0], out.stdout[-2000:], out.stderr[-3000:])
  return out


def _tiny_upstream_checkpoint(path: pathlib.Path) -> None:
  """A random 1-MMT-layer TAP fitting the mock release, saved as pythia saves one."""
  config = TapConfig(arch="custom", text_bert_layers=1, mmt_heads=(2,), mmt_ffn=(32,),
                     hidden_size=128, text_heads=2, text_ffn=32,
                     vocab_size=len(mock.bert_vocab_lines()),
                     num_answers=len(mock.ANSWER_WORDS), obj_feat_dim=mock.FEAT_DIM,
                     ocr_feat_dim=mock.FEAT_DIM, fc7_dim=16, ptr_query_key_size=128)
  params = jax.tree.map(np.asarray, random_params(config, seed=0))
  torch_writer.write_checkpoint(path, flax_to_torch.to_state_dict(params, config))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
  """Builds, converts and runs LFPR on both datasets; returns per-dataset results."""
  base = tmp_path_factory.mktemp("release_e2e")
  root = mock.write_release(base / "tap_data")
  for dataset in CONSTRAINTS:
    _cli("lfpr_jax.data.tfds_builder", "--data_dir", str(root), "--dataset", dataset,
         "--splits", "train,val", "--fasttext_model", "none",
         "--feat_dim", str(mock.FEAT_DIM))
  ckpt = base / "tap_base_best.ckpt"
  _tiny_upstream_checkpoint(ckpt)
  model = base / "models" / "tap"
  _cli("converters.torch_to_flax", "--checkpoint", str(ckpt), "--out", str(model))

  # One compilation cache for both runs (main honours JAX_COMPILATION_CACHE_DIR): the
  # ST-VQA run reuses the unpruned programs the TextVQA run compiled.
  cache = {"JAX_COMPILATION_CACHE_DIR": str(base / "jax_cache")}
  out = {}
  for dataset, c in CONSTRAINTS.items():
    workdir = base / f"runs_{dataset}"
    proc = _cli(
        "lfpr_jax.main", f"--config=configs/tap_{dataset}.py:{c}", f"--workdir={workdir}",
        f"--config.base_model={model}", f"--config.data.root={root}",
        "--config.data.fasttext_model=none",
        f"--config.model.obj_feat_dim={mock.FEAT_DIM}",
        f"--config.model.ocr_feat_dim={mock.FEAT_DIM}",
        "--config.speed.repeats=1", "--config.speed.batch_sizes=(1,4)",
        "--config.eval.batch_size=4", "--config.prune.batch_size=4",
        "--config.prune.group_size=4", "--config.rest.batch_size=4",
        "--config.trim=False", "--config.progress=False", env=cache)
    assert not (workdir / "jax_cache").exists()   # the shared cache was used
    out[dataset] = dict(stdout=proc.stdout, lfpr=workdir / "lfpr",
                        target=workdir / "lfpr" / f"sum_{c:g}")
  out["root"] = root
  return out


def _strict_json(path: pathlib.Path):
  def no_constant(name):
    raise ValueError(f"{path}: non-standard JSON constant {name}")
  return json.loads(path.read_text(), parse_constant=no_constant)


def _val_answers(root: pathlib.Path, dataset: str) -> dict[int, list[str]]:
  """question_id -> ground-truth answers of the built val split."""
  source = pipeline.open_source(
      tfds_builder.dataset_dir(tfds_builder.default_built_dir(root, dataset), dataset,
                               "val"), "val")
  out = {}
  for i in range(len(source)):
    ex = pipeline.PrepareExample().map(source[i])
    out[int(ex["question_id"])] = [a.decode() for a in ex["answers"]]
  return out


@pytest.mark.parametrize("dataset", list(CONSTRAINTS))
def test_table_and_results_carry_the_dataset_metrics(runs, dataset):
  run = runs[dataset]
  names = set(METRICS[dataset])
  table = (run["lfpr"] / "results.md").read_text()
  assert table in run["stdout"]  # the printed table is the saved one
  for label in TABLE_LABELS[dataset]:
    assert label in table
  assert ("ANLS" in table) == (dataset == "stvqa")
  assert f"| sum_{CONSTRAINTS[dataset]:g} |" in table

  row = _strict_json(run["target"] / "result.json")
  assert row["metric"] == next(iter(METRICS[dataset]))
  for key in ("unpruned_val_metrics", "pruned_val_metrics", "retrained_val_metrics"):
    assert set(row[key]) == names, key
    assert all(0.0 <= v <= 1.0 for v in row[key].values()), row[key]
  assert row["retrained_val_accuracy"] == row["retrained_val_metrics"][row["metric"]]
  assert row["retrain_percent"] == 60 and row["retrain_layers"] == 1
  assert row["rest_steps"] == 1  # 60 % of 3 questions in batches of 4
  lines = (run["lfpr"] / "results.jsonl").read_text().splitlines()
  assert len(lines) == 1
  jsonl = json.loads(lines[0], parse_constant=lambda name: pytest.fail(name))
  assert jsonl["retrained_val_metrics"] == row["retrained_val_metrics"]


@pytest.mark.parametrize("dataset", list(CONSTRAINTS))
def test_predictions_of_every_val_question_score_as_reported(runs, dataset):
  run = runs[dataset]
  answers = _val_answers(runs["root"], dataset)
  evals = [(run["lfpr"], "base_eval")] + [(run["target"], e) for e in EVALS]
  for folder, stem in evals:
    reported = _strict_json(folder / f"{stem}.json")
    preds = _strict_json(folder / f"{stem}_predictions.json")
    assert [set(p) for p in preds] == [{"question_id", "answer"}] * len(answers)
    assert sorted(p["question_id"] for p in preds) == sorted(answers)
    assert all(isinstance(p["answer"], str) for p in preds)
    assert reported["val_examples"] == len(answers)
    assert set(reported["val_metrics"]) == set(METRICS[dataset])
    for name, fn in METRICS[dataset].items():
      expected = np.mean([fn(p["answer"], answers[p["question_id"]]) for p in preds])
      assert reported["val_metrics"][name] == pytest.approx(expected), (stem, name)
