"""End-to-end smoke test: the `:tiny` synthetic config through lfpr_jax.main."""

import json
import subprocess
import sys

from lfpr_jax import checkpointing
from tests.conftest import REPO


def test_main_tiny_trains_saves_and_reuses(tmp_path):
  cmd = [sys.executable, "-m", "lfpr_jax.main", "--config=configs/synthetic.py:tiny",
         f"--workdir={tmp_path}"]
  env = {"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env,
                       timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "base_model: val accuracy" in out.stdout
  summary = json.loads((tmp_path / "base_model.json").read_text())
  assert summary["steps"] == 6 and summary["val_examples"] == 64
  losses = [json.loads(l)["loss"] for l in
            (tmp_path / "base_model_metrics.jsonl").read_text().splitlines()]
  assert len(losses) >= 4
  config, params = checkpointing.load_model(str(tmp_path / "base_model"))
  assert config.mmt_heads == (2,) and config.num_answers > 4
  # A second run reuses the base model instead of training again.
  again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env,
                         timeout=600)
  assert again.returncode == 0 and "reusing" in again.stderr
