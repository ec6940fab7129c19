"""`python -m lfpr_jax.export`: a serialized jax.export artifact of greedy decoding."""

import jax
import numpy as np
import pytest

from lfpr_jax import export
from lfpr_jax.api import TapModel
from lfpr_jax.models.batch import MODEL_INPUTS, model_inputs
from tests.helpers import SMALL, random_batch, random_params

pytest.importorskip("flatbuffers", reason="jax.export serialization needs flatbuffers")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("export") / "small"
  TapModel(SMALL, random_params(SMALL, seed=3)).save(str(path))
  return path


def _numpy_inputs(batch):
  """Plain numpy arrays, canonical names and dtypes, as a server would send them."""
  return {k: np.asarray(v) for k, v in model_inputs(batch, SMALL).items()
          if k in MODEL_INPUTS}


def _check_against_greedy(out, model, batch):
  scores, _ = model.greedy(batch)
  assert out["scores"].shape == scores.shape == (
      batch["cmb_text"].shape[0], SMALL.decode_steps, SMALL.num_classes)
  # Same computation, compiled for a different (refined) shape: float noise only;
  # masked OCR logits sit near -1e4, hence the relative tolerance.
  np.testing.assert_allclose(np.asarray(out["scores"]), scores, rtol=1e-5, atol=1e-5)
  assert out["indices"].dtype == np.int32
  np.testing.assert_array_equal(np.asarray(out["indices"]), scores.argmax(-1))


def test_cli_artifact_runs_at_two_batch_sizes(tmp_path, model_dir, capsys):
  out_file = tmp_path / "greedy.jax"
  assert export.main(["--model", str(model_dir), "--out", str(out_file)]) == 0
  assert "platforms=cpu,cuda" in capsys.readouterr().out
  assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]

  exported = jax.export.deserialize(bytearray(out_file.read_bytes()))
  assert exported.platforms == ("cpu", "cuda")
  specs = jax.tree.unflatten(exported.in_tree, exported.in_avals)[0][0]
  assert sorted(specs) == sorted(MODEL_INPUTS)
  assert all(jax.export.is_symbolic_dim(s.shape[0]) for s in specs.values())

  model = TapModel.load(str(model_dir))
  for batch_size, seed in ((1, 0), (3, 1)):
    batch = random_batch(SMALL, batch_size, seed=seed)
    _check_against_greedy(exported.call(_numpy_inputs(batch)), model, batch)


def test_params_as_input(model_dir):
  model = TapModel.load(str(model_dir))
  exported = export.export_greedy(SMALL, model.params, params_as_input=True,
                                  platforms=("cpu",))
  restored = jax.export.deserialize(exported.serialize())
  batch = random_batch(SMALL, 2, seed=5)
  params = jax.tree.map(np.asarray, model.params)
  _check_against_greedy(restored.call(params, _numpy_inputs(batch)), model, batch)
  # Baked params make the artifact self-contained and larger by the weights.
  baked = export.export_greedy(SMALL, model.params, platforms=("cpu",))
  weights = sum(np.size(x) for x in jax.tree.leaves(params)) * 4
  assert len(baked.serialize()) > len(exported.serialize()) + weights // 2


def test_not_a_model_directory(tmp_path, capsys):
  (tmp_path / "empty").mkdir()
  out_file = tmp_path / "greedy.jax"
  with pytest.raises(ValueError, match="not an lfpr_jax model directory.*arch.json"):
    export.export_model(str(tmp_path / "empty"), str(out_file))
  assert export.main(["--model", str(tmp_path / "empty"), "--out", str(out_file)]) == 2
  err = capsys.readouterr().err
  assert err.count("error:") == 1 and "arch.json" in err
  assert not out_file.exists()


def test_existing_out_needs_overwrite(tmp_path, model_dir, capsys):
  out_file = tmp_path / "greedy.jax"
  out_file.write_bytes(b"keep me")
  assert export.main(["--model", str(model_dir), "--out", str(out_file)]) == 2
  err = capsys.readouterr().err
  assert err.count("error:") == 1 and "already exists" in err
  assert out_file.read_bytes() == b"keep me"
  assert export.main(["--model", str(model_dir), "--out", str(out_file),
                      "--platforms", "cpu", "--overwrite"]) == 0
  assert jax.export.deserialize(bytearray(out_file.read_bytes())).platforms == ("cpu",)
