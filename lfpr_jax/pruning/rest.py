"""ReSt definitions: what retrains, with which settings (docs/LFPR.md §6).

* Trainable set by name (§6.3): every learnable head/neuron mask, the classifier (the
  tied answer embedding and its bias), the OCR pointer network and every parameter of
  the last k MMT layers; everything else is frozen and never leaves its initial value.
  `trainable_rules` gives it as `(regex, group)` rules for `training.optim`.
* Adam with two learning rates (masks 1e-3, the rest 5e-5), constant (upstream's
  schedule never leaves factor 1), global-norm clipping at 0.25 over the trainable
  gradients only (§6.5): `RestSettings`, read from `config.rest` by `from_config`.
* Exactly one epoch of the seeded `percent`% subset (`pseudo_labels.subset_indices`),
  the last batch padded with rows whose loss mask is 0 (§6.2).

The loop itself is `training.loop.train_subset`; this module imports no I/O library.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from lfpr_jax.models.config import TapConfig
from lfpr_jax.training import optim

PyTree = Any


def trainable_rules(config: TapConfig, layers: int) -> list[optim.Rule]:
  """ReSt's `(regex, group)` rules with the last `layers` MMT layers (§6.3).

  The masks of every layer train at the mask rate (group "mask", matched first, so
  the masks of the last `layers` layers too); the rest of the set at the base rate.
  """
  n = config.mmt_layers
  if not 0 <= layers <= n:
    raise ValueError(f"ReSt can retrain 0..{n} trailing MMT layers, got {layers}.")
  rules: list[optim.Rule] = [(optim.MASK_PATTERN, "mask"), (r"^classifier_", "base"),
                             (r"^ocr_ptr_net/", "base")]
  rules += [(rf"^mmt_layer_{i}/", "base") for i in range(n - layers, n)]
  return rules


@dataclasses.dataclass(frozen=True)
class RestSettings:
  """Hyper-parameters of one ReSt run (config section `rest` plus the schedule)."""
  percent: float
  layers: int
  lr: float = 5e-5
  mask_lr: float = 1e-3
  clip_norm: float = 0.25
  batch_size: int = 16
  loss_shards: int = 1
  fixed_dropout_key: bool = False
  microbatches: int = 1  # gradient accumulation (`step.train_step`)
  seed: int = 0
  ckpt_every: int = 100

  @classmethod
  def from_config(cls, section: Any, *, percent: float, layers: int,
                  **overrides: Any) -> "RestSettings":
    """The settings of `config.rest` for one target (`overrides` replace fields).

    Args:
      section: `config.rest` (lr, mask_lr, clip_norm, batch_size, loss_shards,
        fixed_dropout_key, microbatches, seed, ckpt_every).
      percent, layers: the target's retraining % and trailing MMT layers.
      **overrides: fields to replace (e.g. the sweep's fine-tuning rates).
    """
    names = [f.name for f in dataclasses.fields(cls)
             if f.name not in ("percent", "layers")]
    values = {k: section[k] for k in names if k in section}
    return cls(percent=percent, layers=layers, **{**values, **overrides})

  def num_steps(self, num_examples: int) -> int:
    """Exactly one epoch: ceil(N / global batch) steps, the last one partial."""
    return math.ceil(num_examples / self.batch_size)


def trainable_params(params: PyTree, config: TapConfig, layers: int) -> dict:
  """The ReSt-trained subtree of `params` (what a delta checkpoint stores)."""
  return optim.split_params(params, trainable_rules(config, layers))[0]
