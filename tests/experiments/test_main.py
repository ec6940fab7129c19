"""End-to-end: `python -m lfpr_jax.main --config=configs/synthetic.py:tiny` runs every
stage (data, base model, t*, importance, selection, surgery, pseudo-labels, ReSt,
evaluation), prints the table, and a second run reuses every stage."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from lfpr_jax.pruning import delta
from lfpr_jax.training import checkpointing
from lfpr_jax.training import optim
from tests.conftest import REPO, SUBPROCESS_ENV


def _main(workdir, *extra, config="configs/synthetic.py:tiny", cache=None):
  """Runs main; `cache`: a compilation cache shared with other workdirs (every program,
  however quick to compile, is cached, so later runs skip compiling)."""
  cmd = [sys.executable, "-m", "lfpr_jax.main", f"--config={config}",
         f"--workdir={workdir}", *extra]
  env = {**SUBPROCESS_ENV, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  if cache is not None:
    env["JAX_COMPILATION_CACHE_DIR"] = str(cache)
  return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env,
                        timeout=900)


def test_main_tiny_runs_the_pipeline_and_reuses_it(tmp_path):
  out = _main(tmp_path)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "| sum_0.4 |" in out.stdout and "retention" in out.stdout
  summary = json.loads((tmp_path / "base_model.json").read_text())
  assert summary["steps"] == 6 and summary["val_examples"] == 64
  row = json.loads((tmp_path / "lfpr" / "results.jsonl").read_text().splitlines()[0])
  assert 0.3 < row["mmt_kept_fraction"] <= 0.41
  assert row["rest_examples"] == round(0.73 * 192)
  assert row["rest_steps"] == -(-row["rest_examples"] // 16)
  assert row["delta_checkpoint_mb"] < row["full_checkpoint_mb"]
  assert (tmp_path / "lfpr" / "sum_0.4" / "cfg.txt").read_text().count("\n") == 2
  # The delta plus the base model rebuild the saved retrained model exactly.
  config, params = checkpointing.load_model(str(tmp_path / "lfpr" / "sum_0.4" / "model"))
  dconfig, dparams = delta.load_delta(str(tmp_path / "lfpr" / "sum_0.4" / "delta"),
                                              str(tmp_path / "base_model"))
  assert dconfig == config and config.learnable_masks
  for k, v in optim.flat(params).items():
    np.testing.assert_array_equal(np.asarray(v), np.asarray(optim.flat(dparams)[k]),
                                  err_msg=k)
  assert "speed-up" in out.stdout and "val TextVQA acc unpruned" in out.stdout
  assert "downloaded and prepared" not in out.stdout + out.stderr
  assert "Unknown size" not in out.stdout + out.stderr
  assert "Using custom data configuration" not in out.stderr
  # TFDS's own bars (no total, internal steps) are off; ours counts the questions.
  assert "Generating splits" not in out.stderr and "Shuffling" not in out.stderr
  assert "synthetic_train: 100%" in out.stderr
  preds = json.loads((tmp_path / "lfpr" / "sum_0.4" / "eval_rest_predictions.json")
                     .read_text())
  assert len(preds) == 64 and set(preds[0]) == {"question_id", "answer"}
  # A second run reuses every stage and prints the same tables.
  again = _main(tmp_path)
  assert again.returncode == 0, again.stderr[-3000:]
  table = lambda text: text[text.index("| target"):]
  assert table(again.stdout) == table(out.stdout)
  assert "reusing" in again.stderr and "ReSt" not in again.stderr
  # A run in a fresh workdir prints the same results (deterministic, fixed steps).
  fresh = _main(tmp_path / "fresh", cache=tmp_path / "jax_cache")
  assert fresh.returncode == 0, fresh.stderr[-3000:]
  results = lambda text: text[text.index("| target"):text.index("| measured speed")]
  assert results(fresh.stdout) == results(out.stdout)
  assert not (tmp_path / "fresh" / "jax_cache").exists()  # the shared cache served it
  # A different ReSt rate is refused with one line naming the key and what it
  # invalidates; --invalidate recomputes only that and keeps the base model.
  bad = _main(tmp_path, "--config.rest.lr=0.1")
  assert bad.returncode == 1 and "Traceback" not in bad.stderr
  assert "rest.lr (0.001 -> 0.1)" in bad.stderr and "--invalidate" in bad.stderr
  assert bad.stderr.strip().splitlines()[-1].startswith("error: ")
  fixed = _main(tmp_path, "--config.rest.lr=0.1", "--invalidate")
  assert fixed.returncode == 0, fixed.stderr[-3000:]
  assert "train base_model" not in fixed.stderr and "ReSt" in fixed.stderr
  # The comparison sweep reuses the workdir's data, base model, t* and pseudo-labels.
  sweep = _main(tmp_path, config="configs/sweep_synthetic.py:tiny")
  assert sweep.returncode == 0, sweep.stderr[-3000:]
  for row in ("lfpr + rest", "fisher + kwon", "lfpr + none", "lfpr + finetune",
              "lfpr + kwon_lf"):
    assert f"| {row} | params | 0.4 |" in sweep.stdout, row
  assert "fisher + kwon_lf" not in sweep.stdout   # a labelled ranking is not label-free
  lines = (tmp_path / "sweep" / "results.csv").read_text().splitlines()
  assert len(lines) == 1 + 9 and lines[0].startswith(
      "method,criterion,restoration,cost,constraint")
  cell = json.loads((tmp_path / "sweep" / "cells" / "lfpr-kwon_lf-params-0.4"
                     / "result.json").read_text())
  assert cell["label_free"] and cell["rearranged"]
  png = (tmp_path / "sweep" / "accuracy_vs_params.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n"
  meta = json.loads((tmp_path / "sweep" / "metadata.json").read_text())
  assert meta["versions"]["jax"] and meta["config"]["sweep"]["criteria"]
  assert "reusing" in sweep.stderr and "pseudo-labels:" not in sweep.stderr  # reused
  # A narrower grid is no config conflict: it reuses its cells and reports only them.
  narrow = _main(tmp_path, "--config.sweep.restorations=('none','rest')",
                 "--config.sweep.criteria=('lfpr',)", config="configs/sweep_synthetic.py:tiny")
  assert narrow.returncode == 0, narrow.stderr[-3000:]
  assert "ReSt" not in narrow.stderr and "eval lfpr" not in narrow.stderr  # nothing rerun
  rows = [l for l in narrow.stdout.splitlines() if "| params | 0.4 |" in l]
  assert [r.split(" | ")[0] for r in rows] == ["| lfpr + none", "| lfpr + rest"], rows
  assert ((tmp_path / "sweep" / "results.csv").read_text().splitlines()[1:]
          == [l for l in lines[1:] if l.startswith(("lfpr + none,", "lfpr + rest,"))])
  # The main command again in the same workdir, then the sweep: each driver's keys
  # stay in the record, so neither sees the other's as a change.
  again = _main(tmp_path, "--config.rest.lr=0.1")
  assert again.returncode == 0 and "ReSt" not in again.stderr, again.stderr[-3000:]
  # Another ReSt schedule entry at 0.4: only the ReSt cells depend on it.
  changed = ("--config.rest.schedule=((0.4,100,1),)",
             "--config.sweep.restorations=('none','rest','kwon')")
  stale = _main(tmp_path, *changed, config="configs/sweep_synthetic.py:tiny")
  assert stale.returncode == 1 and "rest.schedule@0.4" in stale.stderr, stale.stderr
  assert "--invalidate" in stale.stderr.splitlines()[-1]
  redo = _main(tmp_path, *changed, "--invalidate", config="configs/sweep_synthetic.py:tiny")
  assert redo.returncode == 0, redo.stderr[-3000:]
  evaluated = sorted(set(re.findall(r"eval ([\w-]+-params-0\.4)", redo.stderr)))
  assert evaluated == ["fisher-rest-params-0.4", "lfpr-rest-params-0.4"], evaluated
  assert (tmp_path / "sweep" / "cells" / "lfpr-finetune-params-0.4").is_dir()  # kept


def test_bad_config_value_is_one_line_before_any_work(tmp_path):
  out = _main(tmp_path / "w", "--config.prune.batch_size=0")
  lines = [l for l in out.stderr.splitlines() if l.strip()]
  assert out.returncode == 1, out.stderr[-2000:]
  assert lines[-1] == ("error: invalid config: prune.batch_size=0: expected an integer "
                       ">= 1")
  assert "Traceback" not in out.stderr
  assert not (tmp_path / "w" / "lfpr").exists()   # nothing written, nothing trained


@pytest.mark.parametrize("argv,text", [
    (["--config=configs/synthetic.py:tiny", "--config.prune.batchsize=3"],
     "error: --config: "),
    (["--config=configs/nope.py"], "error: --config: no config file configs/nope.py"),
    (["--config=configs/synthetic.py:huge"],
     "error: --config: unknown config variant 'huge'; known: 'tiny'."),
])
def test_bad_flags_are_one_line(argv, text, capsys, monkeypatch):
  from lfpr_jax import main  # noqa: PLC0415  (defines the absl flags)
  monkeypatch.chdir(REPO)
  with pytest.raises(SystemExit) as e:
    main.parse_flags(["lfpr_jax.main", *argv, "--workdir=/tmp/unused"])
  err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
  assert e.value.code == 2 and len(err) == 1 and err[0].startswith(text), err
  assert "batchsize" in err[0] or "batchsize" not in " ".join(argv)


def test_workdir_that_is_a_file_is_refused_untouched(tmp_path):
  from configs.synthetic import get_config  # noqa: PLC0415
  from lfpr_jax.experiments import lfpr  # noqa: PLC0415
  workdir = tmp_path / "file"
  workdir.write_text("keep")
  with pytest.raises(NotADirectoryError, match="is a file; expected a directory"):
    lfpr.run(get_config("tiny"), str(workdir))
  assert workdir.read_text() == "keep"
