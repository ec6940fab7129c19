"""The LFPR driver's targets, run record and tables (the run itself: test_base_model)."""

import dataclasses
import json

import pytest

from configs import common as schedules
from configs.synthetic import get_config
from lfpr_jax import atomic
from lfpr_jax.experiments import common, lfpr, stages
from lfpr_jax.models.config import TapConfig


def test_targets_from_the_schedule():
  config = get_config()
  # The synthetic config retrains on all the data at 0.4; upstream's schedule: 73%.
  assert lfpr.targets_of(config) == [lfpr.Target("sum", 0.4, 100.0, 2)]
  assert (0.4, 73, 2) in schedules.SUM[("tap", "textvqa")]
  config.prune.update(heuristic="thre", percentiles=(50, 90))
  assert [(t.name, t.percent, t.layers) for t in lfpr.targets_of(config)] == [
      ("thre_50", 60.0, 1), ("thre_90", 100.0, 3)]


def _populate(workdir, *rels):
  for rel in rels:
    p = workdir / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("{}")


def test_run_record_keeps_what_a_corrected_config_does_not_touch(tmp_path):
  all_stages = common.SHARED_STAGES + lfpr.STAGES
  check = lambda c, **kw: stages.check_run_record(
      c, str(tmp_path), str(tmp_path / "lfpr"), all_stages, ignore=lfpr.MUTABLE_KEYS,
      **kw)
  check(get_config("tiny"))
  _populate(tmp_path, "base_model/arch.json", "lfpr/base_eval.json",
            "lfpr/tstar.json", "lfpr/importance.npz", "lfpr/pseudo_labels.npz",
            "lfpr/sum_0.4/result.json")
  more = get_config("tiny")
  more.prune.constraints = (0.4, 0.4)       # more targets: accepted
  check(more)
  other = get_config("tiny")
  other.rest.lr = 1e-4                      # only the targets read it
  with pytest.raises(ValueError) as e:
    check(other)
  msg = str(e.value)
  assert "rest.lr (0.001 -> 0.0001)" in msg and "stage(s) targets" in msg
  assert "base_model" not in msg and "importance" not in msg
  check(other, invalidate=True)
  assert not (tmp_path / "lfpr" / "sum_0.4").exists()
  for kept in ("base_model/arch.json", "lfpr/importance.npz", "lfpr/pseudo_labels.npz"):
    assert (tmp_path / kept).exists()
  seeded = get_config("tiny")
  seeded.rest.lr, seeded.train.num_steps = 1e-4, 7   # the base model changes
  with pytest.raises(ValueError, match="base model, unpruned evaluation, t\\*"):
    check(seeded)


def test_compute_dtype_invalidates_every_stage_after_the_base_model(tmp_path):
  all_stages = common.SHARED_STAGES + lfpr.STAGES
  assert [s.name for s in stages.invalidated(all_stages, ["compute_dtype"])] == [
      "unpruned evaluation", "t*", "pseudo-labels", "importance", "targets", "speed"]
  check = lambda c, **kw: stages.check_run_record(
      c, str(tmp_path), str(tmp_path / "lfpr"), all_stages, ignore=lfpr.MUTABLE_KEYS,
      **kw)
  check(get_config("tiny"))
  _populate(tmp_path, "base_model/arch.json", "lfpr/base_eval.json",
            "lfpr/tstar.json", "lfpr/pseudo_labels.npz")
  low = get_config("tiny")
  low.compute_dtype = "bfloat16"
  with pytest.raises(ValueError) as e:
    check(low)
  msg = str(e.value)
  assert "compute_dtype ('float32' -> 'bfloat16')" in msg and "--invalidate" in msg
  assert "base_model/" not in msg
  check(low, invalidate=True)
  assert (tmp_path / "base_model/arch.json").exists()
  assert not any((tmp_path / "lfpr" / f).exists()
                 for f in ("base_eval.json", "tstar.json", "pseudo_labels.npz"))


def test_run_config_sets_compute_dtype_and_saved_config_is_float32():
  base = TapConfig(arch="custom", mmt_heads=(2,), mmt_ffn=(64,))
  low = common.with_compute_dtype(base, "bfloat16")
  assert low.compute_dtype == "bfloat16" and base.compute_dtype == "float32"
  assert dataclasses.replace(low, compute_dtype="float32") == base
  assert common.for_saving(low.pruned([1], [32])) == base.pruned([1], [32])


def _row(retention=0.97, speed_scale=1.0):
  metrics = {"textvqa_accuracy": 0.5}
  speed = {"device": "cpu", "latency_ms": {"1": 2.0 * speed_scale, "16": 20.0},
           "throughput_qps": {"1": 500.0, "16": 800.0 / speed_scale},
           "xla_flops": {"1": 1e8, "16": 1e9 * speed_scale}}
  return {"target": "sum_0.4", "mmt_params": 400, "mmt_kept_fraction": 0.4,
          "cfg_head": [1, 2], "cfg_ffn": [64, 128], "model_params": 1000,
          "unpruned_val_metrics": metrics, "pruned_val_metrics": metrics,
          "retrained_val_metrics": metrics, "retention": retention,
          "retrain_percent": 73, "retrain_layers": 1, "rest_steps": 9,
          "full_checkpoint_mb": 1.0, "delta_checkpoint_mb": 0.5, "speed": speed,
          "seconds": {"data": 1.0, "rest": 2.0}}


def test_table_names_metrics_speed_and_widths(tmp_path):
  unpruned = {"metrics": {"textvqa_accuracy": 0.5},
              "speed": _row(speed_scale=2.0)["speed"], "cfg_head": [2, 2],
              "cfg_ffn": [128, 128]}
  text = lfpr.format_table([_row()], unpruned)
  assert "val TextVQA acc unpruned" in text and "| 64/128 |" in text
  assert "| sum_0.4 | 1/2 | 64/128 | 2.00 | 2.00x | 800.0 | 2.00x | 2.00x |" in text
  # A base model at 0 accuracy: retention is null in JSON and n/a in the table.
  row = _row(retention=None)
  assert "| n/a |" in lfpr.format_table([row], unpruned)
  atomic.write_json(tmp_path / "r.json", {"retention": float("nan")})
  assert json.loads((tmp_path / "r.json").read_text()) == {"retention": None}
