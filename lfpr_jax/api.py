"""A small Python API over a converted TAP model directory.

    import numpy as np
    from lfpr_jax.api import TapModel

    model = TapModel.load("converted/tap_textvqa")        # arch.json + Orbax params
    batch = dict(np.load("batch.npz"))                     # upstream SampleList names
    scores = model.scores(batch)                           # teacher forced [B, 12, C]
    loss = model.loss(batch)                               # needs targets, train_loss_mask
    greedy_scores, decoder_inputs = model.greedy(batch)    # cached greedy decoding
    answer_indices = greedy_scores.argmax(-1)              # [B, 12], < V_a: vocab, else OCR

Every method validates the batch against the architecture first
(`lfpr_jax.models.batch.model_inputs`) and runs a jitted function in eval mode.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax
import numpy as np

from lfpr_jax.training import checkpointing
from lfpr_jax.models.batch import model_inputs
from lfpr_jax.models.decoding import greedy_decode
from lfpr_jax.models.losses import m4c_decoding_bce
from lfpr_jax.models.config import TapConfig
from lfpr_jax.models.params import check_params
from lfpr_jax.models.tap import TAP

PyTree = Any


@functools.partial(jax.jit, static_argnums=0)
def _teacher_forced(model: TAP, params: PyTree, inputs: dict) -> jax.Array:
  return model.apply({"params": params}, inputs)


@functools.partial(jax.jit, static_argnums=0)
def _loss(model: TAP, params: PyTree, inputs: dict) -> jax.Array:
  scores = model.apply({"params": params}, inputs)
  return m4c_decoding_bce(scores, inputs["targets"], inputs["train_loss_mask"])


@functools.partial(jax.jit, static_argnums=(0, 3))
def _greedy(model: TAP, params: PyTree, inputs: dict, bos_index: int):
  return greedy_decode(model, {"params": params}, inputs, bos_index=bos_index)


@dataclasses.dataclass(frozen=True)
class TapModel:
  """A TAP architecture with its parameters.

  Attributes:
    config: the architecture (per-layer MMT heads / FFN widths for pruned models).
    params: the Flax parameter tree.
    bos_index: answer-vocabulary index of `<s>` (1 in the M4C vocabularies).
  """
  config: TapConfig
  params: PyTree
  bos_index: int = 1

  def __post_init__(self):
    check_params(self.params, self.config)

  @classmethod
  def load(cls, path: str, **kwargs: Any) -> "TapModel":
    """Loads a directory written by the converter or `checkpointing.save_model`."""
    config, params = checkpointing.load_model(path)
    return cls(config, params, **kwargs)

  def save(self, path: str, *, overwrite: bool = False) -> None:
    checkpointing.save_model(path, self.config, self.params, overwrite=overwrite)

  @property
  def module(self) -> TAP:
    return TAP(self.config)

  def scores(self, batch: Mapping[str, Any]) -> np.ndarray:
    """Teacher-forced scores `[B, T, V_a + 100]` on `batch['train_prev_inds']`."""
    inputs = model_inputs(batch, self.config)
    return np.asarray(_teacher_forced(self.module, self.params, inputs))

  def loss(self, batch: Mapping[str, Any]) -> float:
    """The M4C decoding BCE of the teacher-forced scores (needs targets and mask)."""
    inputs = model_inputs(batch, self.config, with_targets=True)
    return float(_loss(self.module, self.params, inputs))

  def greedy(self, batch: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Greedy decoding: scores `[B, T, C]` and the decoder inputs that produced them."""
    inputs = model_inputs(batch, self.config)
    scores, prev = _greedy(self.module, self.params, inputs, self.bos_index)
    return np.asarray(scores), np.asarray(prev)
