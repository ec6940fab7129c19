"""Turns a batch given with the upstream pythia field names into TAP model inputs.

Users hand us a dict of numpy arrays named as the upstream `SampleList` names them
(`docs/TAP.md`, the batch fields). Two fields are nested upstream; they are
accepted in any of three spellings: `obj_num` / `image_info_0.max_features` /
`batch["image_info_0"]["max_features"]` (and the same for `ocr_num` /
`context_info_0`). Unused fields (`order_vectors`, `image_width`, ...) are ignored.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from lfpr_jax.models.config import TapConfig

# canonical name -> accepted spellings, in order of preference
ALIASES = {
    "obj_num": ("obj_num", "image_info_0.max_features", ("image_info_0", "max_features")),
    "ocr_num": ("ocr_num", "context_info_0.max_features",
                ("context_info_0", "max_features")),
}


# The one definition of what the model reads and what the loss reads.
MODEL_INPUTS: tuple[str, ...] = (
    "cmb_text", "image_feature_0", "obj_bbox_coordinates", "obj_num", "image_feature_1",
    "context_feature_0", "context_feature_1", "ocr_bbox_coordinates", "ocr_num")
DECODER_INPUTS: tuple[str, ...] = ("train_prev_inds",)
LOSS_FIELDS: tuple[str, ...] = ("targets", "train_loss_mask")
# A teacher-forced training step reads all three.
STEP_FIELDS: tuple[str, ...] = MODEL_INPUTS + DECODER_INPUTS + LOSS_FIELDS
INT_FIELDS = ("cmb_text", "obj_num", "ocr_num", "train_prev_inds")
# What a trimmed batch adds (`lfpr_jax.models.trim`): the padded text column of each
# kept wordpiece, read by the model when present.
TRIM_FIELDS: tuple[str, ...] = ("text_position_ids",)


def select(batch: Mapping[str, Any], fields: Sequence[str]) -> dict[str, Any]:
  """`fields` of `batch`, plus the `TRIM_FIELDS` a trimmed batch carries."""
  return {k: batch[k] for k in tuple(fields) + TRIM_FIELDS
          if k in batch or k not in TRIM_FIELDS}


def field_shapes(c: TapConfig, batch_size: int, steps: int | None = None
                 ) -> dict[str, tuple[int, ...]]:
  """Shapes of `MODEL_INPUTS + DECODER_INPUTS` for a model of config `c`.

  `steps` (the decoder input width) defaults to `c.decode_steps`.
  """
  steps = c.decode_steps if steps is None else steps
  return {
      "cmb_text": (batch_size, c.text_len),
      "image_feature_0": (batch_size, c.obj_max, c.obj_feat_dim),
      "obj_bbox_coordinates": (batch_size, c.obj_max, 4),
      "obj_num": (batch_size,),
      "image_feature_1": (batch_size, c.ocr_max, c.ocr_feat_dim),
      "context_feature_0": (batch_size, c.ocr_max, c.fasttext_dim),
      "context_feature_1": (batch_size, c.ocr_max, c.phoc_dim),
      "ocr_bbox_coordinates": (batch_size, c.ocr_max, 4),
      "ocr_num": (batch_size,),
      "train_prev_inds": (batch_size, steps),
  }


def _lookup(batch: Mapping[str, Any], name: str):
  for spelling in ALIASES.get(name, (name,)):
    if isinstance(spelling, tuple):
      outer = batch.get(spelling[0])
      if isinstance(outer, Mapping) and spelling[1] in outer:
        return outer[spelling[1]]
    elif spelling in batch:
      return batch[spelling]
  return None


def model_inputs(batch: Mapping[str, Any], config: TapConfig, *,
                 with_targets: bool = False) -> dict[str, jnp.ndarray]:
  """Validates a batch and returns the canonical fields the model reads.

  Args:
    batch: upstream-named arrays (numpy or jax), batch first.
    config: the model's architecture (fixes every expected shape).
    with_targets: also return `targets` `[B, T, C]` and `train_loss_mask` `[B, T]`.

  Returns:
    dict of jnp arrays: int32 for ids/counts, float32 for features.

  Raises:
    ValueError: naming the missing field or the field whose shape is wrong.
  """
  if "cmb_text" not in batch:
    raise ValueError("batch has no 'cmb_text' field; expected upstream SampleList "
                     f"field names, got {sorted(batch)}.")
  b = int(np.shape(batch["cmb_text"])[0])
  prev = _lookup(batch, "train_prev_inds")
  steps = config.decode_steps if prev is None else int(np.shape(prev)[-1])
  if steps > config.decode_steps:
    raise ValueError(f"train_prev_inds has {steps} steps; the model decodes at most "
                     f"{config.decode_steps}.")
  expected = field_shapes(config, b, steps)
  if with_targets:
    expected["targets"] = (b, steps, config.num_classes)
    expected["train_loss_mask"] = (b, steps)
  out = {}
  for name, shape in expected.items():
    value = _lookup(batch, name)
    if value is None:
      if name == "train_prev_inds":  # only its width matters at inference
        value = np.zeros(shape, np.int32)
      else:
        spell = " / ".join(s if isinstance(s, str) else "[%r][%r]" % s
                           for s in ALIASES.get(name, (name,)))
        raise ValueError(f"batch is missing field {spell} (shape {shape}).")
    if tuple(np.shape(value)) != shape:
      raise ValueError(f"batch field {name!r} has shape {tuple(np.shape(value))}, "
                       f"expected {shape} for this model.")
    dtype = jnp.int32 if name in INT_FIELDS else jnp.float32
    out[name] = jnp.asarray(value, dtype)
  return out
