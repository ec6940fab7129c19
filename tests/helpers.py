"""Small configs and batch builders shared by the tests (imported, never a test module)."""

from __future__ import annotations

import jax
import numpy as np

from lfpr_jax.models.batch import MODEL_INPUTS, model_inputs
from lfpr_jax.models.config import TapConfig
from lfpr_jax.models.params import abstract_params

# A small TAP with one text-BERT layer and two MMT layers of different widths.
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

# Three MMT layers, one without heads and one without FFN neurons.
BASE = TapConfig(arch="custom", text_bert_layers=1, mmt_heads=(2, 0, 2),
                 mmt_ffn=(64, 32, 0), hidden_size=128, text_heads=2, text_ffn=64,
                 vocab_size=300, num_answers=40, obj_feat_dim=32, ocr_feat_dim=32,
                 fc7_dim=32, ptr_query_key_size=64, question_len=8, text_len=30,
                 ocr_text_len=12, obj_max=10, ocr_max=12, max_position_embeddings=64)

# Smaller still, with short sequences, for the LFPR stages and the criteria.
TINY = TapConfig(arch="small", text_bert_layers=1, mmt_heads=(2, 2), mmt_ffn=(16, 16),
                  hidden_size=64, head_dim=32, text_heads=2, text_ffn=32, vocab_size=50,
                  question_len=4, text_len=12, ocr_text_len=4, num_answers=20,
                  obj_max=5, ocr_max=6, decode_steps=4, obj_feat_dim=16,
                  ocr_feat_dim=16, fc7_dim=16, ptr_query_key_size=64,
                  max_position_embeddings=16, hidden_dropout=0.0, attention_dropout=0.0,
                  obj_dropout=0.0, ocr_dropout=0.0)


def model_batch(config: TapConfig, batch: int, seed: int = 0) -> dict:
  """Model inputs (`MODEL_INPUTS`) of a random batch with every OCR slot valid."""
  b = random_batch(config, batch, seed)
  b["context_info_0"]["max_features"] = np.full(batch, config.ocr_max)  # all valid
  return {k: v for k, v in model_inputs(b, config, with_targets=False).items()
          if k in MODEL_INPUTS}


def random_params(config, seed: int, scale: float = 0.1) -> dict:
  """Random params without compiling the model's init: weights N(0, scale²), LayerNorm
  scales near 1 (larger than the 0.02 init, so that the masks matter)."""
  rng = np.random.default_rng(seed)

  def leaf(path, x):
    name = jax.tree_util.keystr(path)
    if name.endswith("['scale']"):
      return (1 + 0.1 * rng.standard_normal(x.shape)).astype(np.float32)
    return (scale * rng.standard_normal(x.shape)).astype(np.float32)
  return jax.tree_util.tree_map_with_path(leaf, abstract_params(config))


def labelled_batch(batch_size: int, seed: int) -> dict:
  """TINY model inputs with ground-truth teacher forcing, sparse targets, has_answers."""
  raw = random_batch(TINY, batch_size, seed)
  rng = np.random.default_rng(seed)
  raw["targets"] = (rng.random(raw["targets"].shape) < 0.05).astype(np.float32)
  raw["train_loss_mask"] = (np.arange(TINY.decode_steps)[None]
                            < rng.integers(1, TINY.decode_steps + 1, (batch_size, 1))
                            ).astype(np.float32)
  out = {k: np.asarray(v) for k, v in model_inputs(raw, TINY, with_targets=True).items()}
  out["has_answers"] = np.ones(batch_size, bool)
  return out


def setup_over(config, workdir: str, data, params, mesh, *, local: int,
               samples: np.ndarray):
  """An `experiments.common.Setup` over prepared data and given params (no stages run).

  Built by hand so stage tests skip validation, the run record and the base model.
  """
  from lfpr_jax.data.pipeline import open_source  # noqa: PLC0415
  from lfpr_jax.experiments import common  # noqa: PLC0415
  from lfpr_jax.models.tap import TAP  # noqa: PLC0415
  from lfpr_jax.training import parallel  # noqa: PLC0415
  mc = data.model_config
  return common.Setup(
      config=config, workdir=workdir, stage_dir=workdir, stages=(), data=data,
      base_config=mc, base_params=params, rep_params=parallel.replicate(params, mesh),
      model=TAP(mc), mesh=mesh, eval_local=local, score_local=local,
      num_train=len(open_source(data.built_dir, "train")), samples=samples,
      base_eval={}, times={}, progress=False)
