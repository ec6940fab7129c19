"""`python -m lfpr_jax.predict`: submission files for any model directory."""

import json

import jax
import pytest

from configs.synthetic import get_config
from lfpr_jax import predict
from lfpr_jax.data.prepare import prepare_data
from lfpr_jax.models.params import init_params
from lfpr_jax.training import checkpointing
from tests.conftest import REPO


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  work = tmp_path_factory.mktemp("predict")
  data = prepare_data(get_config("tiny"), str(work))
  path = work / "model"
  checkpointing.save_model(str(path), data.model_config,
                           init_params(data.model_config, jax.random.key(0)))
  return work, path


@pytest.mark.parametrize("split", ["val", "test"])
def test_writes_submission_file(model_dir, split, capsys):
  work, path = model_dir
  out = work / f"{split}.json"
  assert predict.main(["--config", f"{REPO}/configs/synthetic.py:tiny", "--model",
                       str(path), "--split", split, "--out", str(out), "--workdir",
                       str(work)]) == 0
  rows = json.loads(out.read_text())
  assert len(rows) == 64 and all(set(r) == {"question_id", "answer"} for r in rows)
  assert all(isinstance(r["question_id"], int) and isinstance(r["answer"], str)
             for r in rows)
  assert len({r["question_id"] for r in rows}) == 64
  printed = capsys.readouterr().out
  assert f"64 answers on {split}" in printed
  assert ("textvqa_accuracy" in printed) == (split == "val")


def test_bad_inputs_are_one_line(model_dir, capsys, tmp_path):
  work, path = model_dir
  existing = tmp_path / "existing.json"
  existing.write_text("keep")
  for argv, status, text in (
      (["--model", str(tmp_path), "--out", str(tmp_path / "o.json")], 1,
       "is not a model directory"),
      (["--model", str(path), "--out", str(existing)], 1, "already exists"),
      (["--model", str(path), "--out", str(tmp_path / "o.json"), "--set", "x"], 2,
       "expected key=value")):
    with pytest.raises(SystemExit) as e:
      predict.main(["--config", f"{REPO}/configs/synthetic.py:tiny", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == status and len(err) == 1 and text in err[0], err
  assert not (tmp_path / "o.json").exists() and existing.read_text() == "keep"
