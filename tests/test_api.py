"""The README's Python API example, on a small converted model."""

import jax
import numpy as np
import pytest

from lfpr_jax.api import TapModel
from lfpr_jax.models.batch import model_inputs
from lfpr_jax.models.config import TapConfig
from lfpr_jax.models.params import init_params
from tests.helpers import SMALL, random_batch

def test_load_and_run(tmp_path):
  params = init_params(SMALL, jax.random.key(1))
  TapModel(SMALL, params).save(str(tmp_path / "m"))
  model = TapModel.load(str(tmp_path / "m"))
  batch = random_batch(SMALL, 3)
  scores = model.scores(batch)
  assert scores.shape == (3, 12, SMALL.num_classes)
  assert np.isfinite(model.loss(batch))
  greedy_scores, prev = model.greedy(batch)
  assert prev[:, 0].tolist() == [1, 1, 1]
  np.testing.assert_array_equal(prev[:, 1:], greedy_scores.argmax(-1)[:, :-1])
  # Masked OCR slots never win.
  ocr_num = batch["context_info_0"]["max_features"]
  for b in range(3):
    assert np.all(greedy_scores[b, :, SMALL.num_answers + ocr_num[b]:] < -5000)
  # Greedy decoding equals teacher forcing on its own decoder inputs.
  tf = model.scores({**batch, "train_prev_inds": prev})
  np.testing.assert_allclose(tf, greedy_scores, atol=1e-4)


def test_bad_batches_named():
  batch = random_batch(SMALL, 2)
  del batch["context_info_0"]
  with pytest.raises(ValueError, match="missing field ocr_num"):
    model_inputs(batch, SMALL)
  batch = random_batch(SMALL, 2)
  batch["image_feature_0"] = batch["image_feature_0"][:, :50]
  with pytest.raises(ValueError, match="'image_feature_0' has shape \\(2, 50, 32\\)"):
    model_inputs(batch, SMALL)
  with pytest.raises(ValueError, match="head_mask must be"):
    from lfpr_jax.models.tap import split_layer_masks
    split_layer_masks(np.ones((3, 2)), SMALL.mmt_heads, "head_mask")
  with pytest.raises(ValueError, match="head_mask\\[1\\] has shape \\(2,\\)"):
    from lfpr_jax.models.tap import split_layer_masks
    split_layer_masks([np.ones(2), np.ones(2)], SMALL.mmt_heads, "head_mask")
