"""Which parameters train, at which learning rate: rules as data, upstream's schedule.

Trainability and learning-rate groups are config data, as in big_vision's
`optax.make`: a list of `(regex, group)` rules matched (`re.search`) against the
'/'-joined parameter path, first match wins; a parameter that matches no rule, or a
rule whose group is None, is frozen ("no schedule means frozen"). Each group has its
own peak learning rate (`learning_rates`); every group follows the same
`upstream_schedule` shape (warm-up, step decays).

    UPSTREAM_GROUPS   TAP fine-tuning (docs/TAP.md §10): text-BERT and fc7 at 0.1x
    rest.trainable_rules(config, k)   ReSt (docs/LFPR.md §6.3): masks, classifier, pointer
                                      network, last k MMT layers
    [(".*", "base")]  full fine-tuning at one rate (the sweep's `finetune`)
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import flax
import jax.numpy as jnp
import optax

PyTree = Any
Rule = tuple[str, Optional[str]]

# The learnable head/neuron masks of LFPR (docs/LFPR.md §6.3), trained at their own rate.
MASK_PATTERN = r"^mmt_layer_\d+/(attention/head_mask|ffn/ffn_mask)$"

# Upstream parameter groups (docs/TAP.md §10, §5.2): text-BERT and the fc7 layers at 0.1x
# the base learning rate, the LFPR mask parameters at their own rate, all else "base".
UPSTREAM_GROUPS: tuple[Rule, ...] = (
    (MASK_PATTERN, "mask"),
    (r"^text_bert/", "text_bert"),
    (r"^(obj|ocr)_fc7/", "fc7"),
    (r".*", "base"),
)


def upstream_learning_rates(lr: float, mask_lr: float | None = None
                            ) -> dict[str, float]:
  """Peak rates of `UPSTREAM_GROUPS`: text-BERT and fc7 at 0.1 `lr`, masks `mask_lr`."""
  return {"base": lr, "text_bert": 0.1 * lr, "fc7": 0.1 * lr,
          "mask": lr if mask_lr is None else mask_lr}


def flat(tree: Mapping[str, Any]) -> dict[str, Any]:
  """`{"a/b/c": leaf}` from a nested dict (flax.traverse_util, '/'-joined)."""
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep="/")


def unflat(d: Mapping[str, Any]) -> dict[str, Any]:
  """The nested dict of a `flat` mapping."""
  return flax.traverse_util.unflatten_dict(dict(d), sep="/")


def _compile(rules: Sequence[Rule]) -> list[tuple[re.Pattern, Optional[str]]]:
  out = []
  for rule in rules:
    if (not isinstance(rule, (tuple, list)) or len(rule) != 2
        or not isinstance(rule[0], str)):
      raise ValueError(f"a parameter rule must be (regex, group or None), got {rule!r}.")
    out.append((re.compile(rule[0]), None if rule[1] is None else str(rule[1])))
  return out


def group_labels(params: PyTree, rules: Sequence[Rule]) -> dict[str, Optional[str]]:
  """`{path: group}` of every leaf: the first matching rule's group, None = frozen."""
  compiled = _compile(rules)
  labels = {}
  for path in flat(params):
    labels[path] = next((g for p, g in compiled if p.search(path)), None)
  return labels


def split_params(params: PyTree, rules: Sequence[Rule]) -> tuple[dict, dict]:
  """Splits params into (trainable, frozen) nested dicts by `rules`.

  Args:
    params: the model parameters.
    rules: `(regex, group)` rules; a leaf trains when its first matching rule names a
      group.

  Returns:
    Two nested dicts whose union is `params` (frozen may be empty).

  Raises:
    ValueError: no parameter trains.
  """
  labels = group_labels(params, rules)
  t, f = {}, {}
  for path, leaf in flat(params).items():
    (t if labels[path] is not None else f)[path] = leaf
  if not t:
    raise ValueError(f"no parameter matches the trainable rules {list(rules)}.")
  return unflat(t), unflat(f)


def merge_params(*trees: Mapping[str, Any]) -> dict:
  """The union of disjoint nested dicts (e.g. `split_params`'s two halves)."""
  out = {}
  for tree in trees:
    out.update(flat(tree))
  return unflat(out)


def upstream_schedule(base_lr: float, *, warmup_steps: int = 1000,
                      warmup_factor: float = 0.2, decay_steps: Sequence[int] = (),
                      decay_ratio: float = 0.1) -> optax.Schedule:
  """Pythia's schedule: linear warm-up from `warmup_factor`, then step decays.

  `warmup_steps <= 0` means no warm-up (upstream `use_warmup: false`).
  """
  steps = sorted(int(s) for s in decay_steps)
  if warmup_steps <= 0 and not steps:
    return optax.constant_schedule(base_lr)  # ReSt: `use_warmup: false`, no decay

  def schedule(count):
    count = jnp.asarray(count, jnp.float32)
    n_decays = sum((count >= s).astype(jnp.float32) for s in steps) if steps else 0.0
    decayed = decay_ratio ** n_decays
    if warmup_steps <= 0:
      return base_lr * decayed
    alpha = jnp.minimum(count / warmup_steps, 1.0)
    warm = warmup_factor * (1.0 - alpha) + alpha
    return base_lr * jnp.where(count <= warmup_steps, warm, decayed)
  return schedule


def make_optimizer(trainable_params: PyTree, rules: Sequence[Rule],
                   learning_rates: Mapping[str, float], *, warmup_steps: int = 1000,
                   warmup_factor: float = 0.2, decay_steps: Sequence[int] = (),
                   decay_ratio: float = 0.1, clip_norm: float | None = 0.25,
                   eps: float = 1e-8) -> optax.GradientTransformation:
  """Adam per group of `rules`, after global-norm clipping of the trained gradients.

  Args:
    trainable_params: the parameters that train (`split_params(...)[0]`; frozen ones
      are not passed, so clipping sees only trained gradients, as in LFPR's ReSt).
    rules: the `(regex, group)` rules that split them.
    learning_rates: peak learning rate of every group the trained leaves fall in.
    warmup_steps, warmup_factor, decay_steps, decay_ratio: `upstream_schedule`.
    clip_norm: global-norm clip (upstream 0.25), None for none.
    eps: Adam epsilon.

  Raises:
    ValueError: a trained leaf is frozen by `rules`, or its group has no rate.
  """
  labels = group_labels(trainable_params, rules)
  frozen = sorted(p for p, g in labels.items() if g is None)
  if frozen:
    raise ValueError(f"parameters {frozen[:4]} are frozen by the rules; pass "
                     "split_params(...)[0] as the trainable parameters.")
  missing = sorted({g for g in labels.values()} - set(learning_rates))
  if missing:
    raise ValueError(f"no learning rate for the parameter groups {missing}; got "
                     f"{sorted(learning_rates)}.")
  sched = dict(warmup_steps=warmup_steps, warmup_factor=warmup_factor,
               decay_steps=decay_steps, decay_ratio=decay_ratio)
  transforms = {g: optax.adam(upstream_schedule(learning_rates[g], **sched), eps=eps)
                for g in sorted(set(labels.values()))}
  chain = [optax.multi_transform(transforms, unflat(labels))]
  if clip_norm is not None:
    chain.insert(0, optax.clip_by_global_norm(clip_norm))
  return optax.chain(*chain)
