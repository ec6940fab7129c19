"""Cached stages and the workdir's run record (lfpr_jax/experiments/stages.py)."""

import json
import os

import ml_collections
import numpy as np
import pytest

from lfpr_jax import atomic
from lfpr_jax.experiments import stages


def _npz_io():
  def save(path, value):
    atomic.savez(path, **value)

  def load(path):
    with np.load(path, allow_pickle=False) as z:
      return {k: z[k] for k in z.files}
  return save, load


def test_cached_computes_once_then_reuses(tmp_path):
  calls = []
  path = str(tmp_path / "stage.json")

  def compute():
    calls.append(1)
    return {"t_star": 2}
  v1, s1 = stages.cached(path, compute, depends_on={"prune.t_star": -1})
  v2, s2 = stages.cached(path, compute, depends_on={"prune.t_star": -1})
  assert v1 == v2 == {"t_star": 2} and len(calls) == 1 and s1 == s2
  meta = json.loads((tmp_path / "stage.meta.json").read_text())
  assert meta["depends_on"] == {"prune.t_star": -1} and len(meta["sha256"]) == 64


def test_cached_refuses_other_run_and_corrupt_files(tmp_path):
  save, load = _npz_io()
  path = str(tmp_path / "importance.npz")
  stages.cached(path, lambda: {"head": np.ones((2, 3))}, depends_on={"seed": 0},
                save=save, load=load)
  with pytest.raises(stages.StageError, match=r"importance\.npz was produced by a "
                     r"different run \(differs in seed\)"):
    stages.cached(path, lambda: {}, depends_on={"seed": 1}, save=save, load=load)
  # Truncated: the checksum catches it before numpy sees the file.
  data = open(path, "rb").read()
  open(path, "wb").write(data[: len(data) // 2])
  with pytest.raises(stages.StageError, match="is corrupt") as e:
    stages.cached(path, lambda: {}, depends_on={"seed": 0}, save=save, load=load)
  assert "allow_pickle" not in str(e.value) and path in str(e.value)
  # No sidecar: cannot tell what produced it.
  os.remove(tmp_path / "importance.meta.json")
  with pytest.raises(stages.StageError, match="no valid record"):
    stages.cached(path, lambda: {}, depends_on={"seed": 0}, save=save, load=load)


def _config(**prune):
  return ml_collections.ConfigDict({
      "seed": 0, "data": {"dataset": "synthetic"},
      "prune": {"num_samples": 8, "dropout": False, "constraints": [0.4], **prune},
      "rest": {"lr": 1e-3}})


STAGES = (
    stages.Stage("base model", ("base_model",), ("seed", "data")),
    stages.Stage("t*", ("lfpr/tstar.json",), ("prune.num_samples",), ("base model",)),
    stages.Stage("importance", ("lfpr/importance.npz",), ("prune.dropout",), ("t*",)),
    stages.Stage("targets", ("lfpr/sum_*",), ("prune", "rest"), ("importance",)),
)


def _populate(workdir):
  for rel in ("base_model/arch.json", "lfpr/tstar.json", "lfpr/importance.npz",
              "lfpr/sum_0.4/result.json"):
    p = workdir / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("{}")


def test_run_record_accepts_later_stage_changes_and_names_invalidated(tmp_path):
  stage_dir = str(tmp_path / "lfpr")
  stages.check_run_record(_config(), str(tmp_path), stage_dir, STAGES,
                          ignore=("prune.constraints",))
  _populate(tmp_path)
  # More targets: accepted, nothing removed.
  stages.check_run_record(_config(constraints=[0.4, 0.6]), str(tmp_path), stage_dir,
                          STAGES, ignore=("prune.constraints",))
  assert (tmp_path / "lfpr" / "importance.npz").exists()
  # A scoring key: importance and the targets are invalid, t* and the base model not.
  with pytest.raises(ValueError) as e:
    stages.check_run_record(_config(dropout=True), str(tmp_path), stage_dir, STAGES,
                            ignore=("prune.constraints",))
  msg = str(e.value)
  assert "prune.dropout (False -> True)" in msg and "importance, targets" in msg
  assert "lfpr/importance.npz" in msg and "--invalidate" in msg
  assert "tstar" not in msg and "base_model" not in msg
  stages.check_run_record(_config(dropout=True), str(tmp_path), stage_dir, STAGES,
                          ignore=("prune.constraints",), invalidate=True)
  assert not (tmp_path / "lfpr" / "importance.npz").exists()
  assert not (tmp_path / "lfpr" / "sum_0.4").exists()
  assert (tmp_path / "lfpr" / "tstar.json").exists()
  assert (tmp_path / "base_model" / "arch.json").exists()
  record = json.loads((tmp_path / "lfpr" / "config.json").read_text())
  assert record["config"]["prune.dropout"] is True


def test_checker_lists_every_problem():
  c = stages.Checker(ml_collections.ConfigDict({"a": {"n": 0, "flag": 1, "x": -2.0}}))
  c.int_at_least("a.n", 1)
  c.boolean("a.flag")
  c.positive("a.x")
  c.one_of("a.missing", ("u", "v"))
  with pytest.raises(stages.ConfigError) as e:
    c.raise_if_any()
  assert e.value.problems == ["a.n=0: expected an integer >= 1",
                              "a.flag=1: expected True or False",
                              "a.x=-2.0: expected a number > 0", "a.missing: missing"]


def test_outputs_written_before_a_key_existed_count_at_its_added_value(tmp_path):
  """A workdir written before `compute_dtype` existed is reused at float32 and
  refused (with the usual message) at another value."""
  path = str(tmp_path / "tstar.json")
  stages.cached(path, lambda: {"t_star": 1}, depends_on={"prune.t_star": -1})
  value, _ = stages.cached(path, lambda: {"t_star": 9},
                           depends_on={"prune.t_star": -1, "compute_dtype": "float32"})
  assert value == {"t_star": 1}
  with pytest.raises(stages.StageError, match=r"differs in compute_dtype"):
    stages.cached(path, lambda: {}, depends_on={"prune.t_star": -1,
                                                "compute_dtype": "bfloat16"})
  stage_list = STAGES + (stages.Stage("eval", ("lfpr/eval.json",), ("compute_dtype",),
                                      ("base model",)),)
  stage_dir = str(tmp_path / "lfpr")
  stages.check_run_record(_config(), str(tmp_path), stage_dir, stage_list)
  _populate(tmp_path)
  (tmp_path / "lfpr" / "eval.json").write_text("{}")
  new = _config()
  new.compute_dtype = "float32"
  stages.check_run_record(new, str(tmp_path), stage_dir, stage_list)   # reused
  new.compute_dtype = "bfloat16"
  with pytest.raises(ValueError, match=r"compute_dtype \('float32' -> 'bfloat16'\)"):
    stages.check_run_record(new, str(tmp_path), stage_dir, stage_list)
  assert (tmp_path / "lfpr" / "eval.json").exists()


@pytest.mark.parametrize("key", ["train.microbatches", "rest.microbatches"])
def test_microbatches_added_later_count_as_one(tmp_path, key):
  """Outputs from before `*.microbatches` existed are reused at 1 and refused at 2."""
  path = str(tmp_path / "out.json")
  stages.cached(path, lambda: {"v": 1}, depends_on={"seed": 0})
  assert stages.cached(path, lambda: {"v": 9},
                       depends_on={"seed": 0, key: 1})[0] == {"v": 1}
  with pytest.raises(stages.StageError, match=rf"differs in {key}"):
    stages.cached(path, lambda: {}, depends_on={"seed": 0, key: 2})


def test_each_stage_is_compared_with_the_values_it_was_made_with(tmp_path):
  """Two drivers share a workdir: the first's targets were made at rest.lr 0.1, the
  second ran at 1e-3 and has no targets stage; the first is then reusable at 0.1
  (its own record), and refused at 1e-3 naming 0.1 as the old value."""
  stage_dir = str(tmp_path / "lfpr")
  fast = _config()
  fast.rest.lr = 0.1
  stages.check_run_record(fast, str(tmp_path), stage_dir, STAGES)
  _populate(tmp_path)
  other = _config()
  other.sweep = ml_collections.ConfigDict({"criteria": ["l1"]})
  stages.check_run_record(other, str(tmp_path), stage_dir, STAGES[:3])
  stages.check_run_record(fast, str(tmp_path), stage_dir, STAGES)   # no change
  with pytest.raises(ValueError, match=r"rest\.lr \(0\.1 -> 0\.001\).*stage\(s\) "
                     r"targets \(lfpr/sum_0\.4"):
    stages.check_run_record(_config(), str(tmp_path), stage_dir, STAGES)
  # The other driver's keys stay in the record: its next run sees no change either.
  record = json.loads((tmp_path / "lfpr" / "config.json").read_text())
  assert record["config"]["sweep.criteria"] == ["l1"]
  assert record["stages"]["targets"]["rest.lr"] == 0.1


def test_self_checked_keys_leave_the_stage_to_its_outputs(tmp_path):
  stage_list = STAGES[:3] + (stages.Stage("targets", ("lfpr/sum_*",), ("prune", "rest"),
                                          ("importance",), self_checked=("rest",)),)
  stage_dir = str(tmp_path / "lfpr")
  stages.check_run_record(_config(), str(tmp_path), stage_dir, stage_list)
  _populate(tmp_path)
  changed = _config()
  changed.rest.lr = 0.5
  stages.check_run_record(changed, str(tmp_path), stage_dir, stage_list)
  assert (tmp_path / "lfpr" / "sum_0.4" / "result.json").exists()
  with pytest.raises(ValueError, match="targets"):   # other keys still count
    stages.check_run_record(_config(num_samples=9), str(tmp_path), stage_dir, stage_list)


def test_stale_reason(tmp_path):
  path = str(tmp_path / "out.json")
  assert stages.stale_reason(path, {"a": 1}) is None          # nothing there yet
  stages.cached(path, lambda: {"v": 1}, depends_on={"a": 1})
  assert stages.stale_reason(path, {"a": 1}) is None
  assert stages.stale_reason(path, {"a": 2}) == (
      "was produced by a different run (differs in a)")
  (tmp_path / "out.json").write_text('{"v": 2}')
  assert "is corrupt" in stages.stale_reason(path, {"a": 1})


def test_a_record_without_stage_values_still_names_what_other_drivers_made(tmp_path):
  """Targets made at rest.lr 0.1 under a record of the older format (one config); a
  driver without the targets stage then runs at 0.001: the targets still count as
  made at 0.1 for the driver that has them."""
  stage_dir = tmp_path / "lfpr"
  _populate(tmp_path)
  old = _config()
  old.rest.lr = 0.1
  stage_dir.mkdir(exist_ok=True)
  (stage_dir / "config.json").write_text(json.dumps(
      {"format": "lfpr_jax.run/2", "config": stages.flat_config(old)}))
  stages.check_run_record(_config(), str(tmp_path), str(stage_dir), STAGES[:3])
  with pytest.raises(ValueError, match=r"rest\.lr \(0\.1 -> 0\.001\)"):
    stages.check_run_record(_config(), str(tmp_path), str(stage_dir), STAGES)
  stages.check_run_record(old, str(tmp_path), str(stage_dir), STAGES)   # unchanged
