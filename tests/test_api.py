"""The README's Python API example, on a small converted model."""

import jax
import numpy as np
import pytest

from lfpr_jax.api import TapModel
from lfpr_jax.models.batch import model_inputs
from lfpr_jax.models.config import TapConfig
from lfpr_jax.models.params import init_params

SMALL = TapConfig(arch="custom", text_bert_layers=1, mmt_heads=(2, 1), mmt_ffn=(64, 32),
                  hidden_size=128, text_heads=2, text_ffn=64, vocab_size=300,
                  num_answers=40, obj_feat_dim=32, ocr_feat_dim=32, fc7_dim=32,
                  ptr_query_key_size=64)


def random_batch(config: TapConfig, batch_size: int, seed: int = 0) -> dict:
  """A batch with upstream field names (nested image_info_0 / context_info_0)."""
  rng = np.random.default_rng(seed)
  c = config
  ocr_num = rng.integers(0, c.ocr_max + 1, batch_size)
  prev = rng.integers(0, c.num_answers + 5, (batch_size, c.decode_steps))
  prev[:, 0] = 1
  targets = np.zeros((batch_size, c.decode_steps, c.num_classes), np.float32)
  targets[np.arange(batch_size), 0, rng.integers(0, c.num_answers, batch_size)] = 1
  return {
      "cmb_text": rng.integers(1, c.vocab_size, (batch_size, c.text_len)),
      "image_feature_0": rng.random((batch_size, c.obj_max, c.obj_feat_dim), np.float32),
      "obj_bbox_coordinates": rng.random((batch_size, c.obj_max, 4), np.float32),
      "image_info_0": {"max_features": rng.integers(1, c.obj_max + 1, batch_size)},
      "image_feature_1": rng.random((batch_size, c.ocr_max, c.ocr_feat_dim), np.float32),
      "context_feature_0": rng.random((batch_size, c.ocr_max, c.fasttext_dim), np.float32),
      "context_feature_1": rng.random((batch_size, c.ocr_max, c.phoc_dim), np.float32),
      "context_info_0": {"max_features": ocr_num},
      "ocr_bbox_coordinates": rng.random((batch_size, c.ocr_max, 4), np.float32),
      "order_vectors": np.zeros((batch_size, c.ocr_max, c.order_dim), np.float32),
      "train_prev_inds": prev,
      "train_loss_mask": np.ones((batch_size, c.decode_steps), np.float32),
      "targets": targets,
  }


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
