"""Pruning surgery: slice the MMT parameters down to the kept heads and neurons.

`prune(params, config, head_mask, ffn_mask)` is LFPR's `create_pruned_model`
(docs/LFPR.md §5) on the Flax parameter tree: per MMT layer the kept heads and neurons, in
ascending original order, are cut out of the head-major attention kernels and the FFN
kernels; everything outside the MMT layers is passed through. The result runs as the
model of the returned (pruned) config and equals the unpruned model run with the
binary masks (docs/LFPR.md §11 invariant 1).

Parameter paths (lfpr_jax/models/tap.py), per MMT layer `mmt_layer_{i}`:
  attention/{query,key,value}/kernel [d, h, dh], /bias [h, dh]
  attention/out/kernel [h, dh, d], attention/out/bias [d], attention/head_mask [h]
  ffn/wi/kernel [d, F], ffn/wi/bias [F], ffn/wo/kernel [F, d], ffn/wo/bias [d],
  ffn/ffn_mask [F]
A layer without heads keeps only `attention/out/bias`, one without neurons only
`ffn/wo/bias` (their outputs are just these biases).

Masks are host values (numpy or concrete arrays): they decide shapes.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence, Union

import flax
import numpy as np

from lfpr_jax.models.config import TapConfig

PyTree = Any
# `[L, max_l h_l]` (units past a layer's width must be 0) or one vector `[h_l]` per layer.
MaskArg = Union[np.ndarray, Sequence[np.ndarray]]

QKV = ("query", "key", "value")


def _layer_masks(mask: MaskArg, widths: Sequence[int], what: str) -> list[np.ndarray]:
  """Kept indices (ascending) per layer from a binary mask argument.

  Args:
    mask: `[L, max(widths)]` array or a sequence of L vectors `[widths[l]]`, with
      values 0 or 1 (bool, int or float).
    widths: the per-layer unit counts of the model being pruned.
    what: "head_mask" or "ffn_mask", for error messages.

  Returns:
    L int arrays of kept unit indices.
  """
  num_layers = len(widths)
  unit = "heads" if what == "head_mask" else "FFN neurons"
  per_layer = isinstance(mask, (list, tuple))
  arrays = [np.asarray(m) for m in mask] if per_layer else [np.asarray(mask)]
  for m in arrays:
    if m.dtype != bool and not np.issubdtype(m.dtype, np.number):
      raise ValueError(f"{what} must be numeric or boolean, got dtype {m.dtype}.")
    if not np.all((m == 0) | (m == 1)):
      bad = np.unique(m[~((m == 0) | (m == 1))])[:5]
      raise ValueError(f"{what} must be binary (0 or 1), got values {bad.tolist()}; "
                       "real-valued masks cannot be applied by slicing.")
  if per_layer:
    if len(arrays) != num_layers:
      raise ValueError(f"{what} has {len(arrays)} per-layer vectors, the model has "
                       f"{num_layers} MMT layers.")
    for i, (m, n) in enumerate(zip(arrays, widths)):
      if m.shape != (n,):
        raise ValueError(f"{what}[{i}] has shape {m.shape}, but MMT layer {i} has {n} "
                         f"{unit} (expected ({n},)).")
    return [np.flatnonzero(m) for m in arrays]
  m = arrays[0]
  want = (num_layers, max(widths))
  if m.shape != want:
    raise ValueError(
        f"{what} must have shape {want} ([MMT layers, max {unit} per layer]) or be "
        f"a list of per-layer vectors; got {m.shape}.")
  for i, n in enumerate(widths):
    if np.any(m[i, n:] != 0):
      raise ValueError(
          f"{what}[{i}] keeps {unit} past index {n - 1}, but MMT layer {i} has only "
          f"{n} {unit}: masks of units that do not exist must be 0.")
  return [np.flatnonzero(m[i, :n]) for i, n in enumerate(widths)]


def _get(tree: Mapping[str, Any], path: str) -> Any:
  node = tree
  for key in path.split("/"):
    if not isinstance(node, Mapping) or key not in node:
      raise ValueError(f"params have no {path!r}; do they match the config?")
    node = node[key]
  return node


def _check_layer(layer: Mapping[str, Any], i: int, heads: int, neurons: int,
                 config: TapConfig) -> None:
  """Raises ValueError unless MMT layer i has the leaves and shapes of its config."""
  d, dh = config.hidden_size, config.head_dim
  want: dict[str, tuple[int, ...]] = {"attention/out/bias": (d,), "ffn/wo/bias": (d,)}
  if heads:
    for n in QKV:
      want[f"attention/{n}/kernel"] = (d, heads, dh)
      want[f"attention/{n}/bias"] = (heads, dh)
    want["attention/out/kernel"] = (heads, dh, d)
  if neurons:
    want.update({"ffn/wi/kernel": (d, neurons), "ffn/wi/bias": (neurons,),
                 "ffn/wo/kernel": (neurons, d)})
  have = flax.traverse_util.flatten_dict(dict(layer), sep="/")
  optional = {"attention/head_mask": (heads,), "ffn/ffn_mask": (neurons,)}
  unexpected = sorted(k for k in have if k.startswith(("attention/", "ffn/"))
                      and k not in want and k not in optional)
  if unexpected:
    raise ValueError(f"params of mmt_layer_{i} have {unexpected}, which a layer with "
                     f"{heads} heads and {neurons} neurons does not have.")
  for path, shape in {**want, **{k: v for k, v in optional.items() if k in have}}.items():
    if path not in have:
      raise ValueError(f"params of mmt_layer_{i} have no {path!r}, which the config "
                       f"({heads} heads, {neurons} neurons) needs.")
    if tuple(np.shape(have[path])) != shape:
      raise ValueError(f"mmt_layer_{i}/{path} has shape {tuple(np.shape(have[path]))}, "
                       f"the config ({heads} heads, {neurons} neurons) expects {shape}.")


def _prune_layer(layer: Mapping[str, Any], heads: np.ndarray, neurons: np.ndarray,
                 learnable_masks: bool) -> dict[str, Any]:
  """One MMT layer's params with only the kept heads and neurons."""
  attn_in, ffn_in = layer["attention"], layer["ffn"]
  head_scale = attn_in.get("head_mask")
  ffn_scale = ffn_in.get("ffn_mask")
  attn: dict[str, Any] = {}
  if len(heads):
    for n in QKV:
      attn[n] = {"kernel": attn_in[n]["kernel"][:, heads],
                 "bias": attn_in[n]["bias"][heads]}
    out_kernel = attn_in["out"]["kernel"][heads]
    if head_scale is not None:
      head_scale = head_scale[heads]
      if not learnable_masks:
        # The mask scales head j's context: fold it into head j's output rows.
        out_kernel = out_kernel * head_scale[:, None, None]
    attn["out"] = {"kernel": out_kernel, "bias": attn_in["out"]["bias"]}
    if learnable_masks:
      attn["head_mask"] = (head_scale if head_scale is not None else
                           np.ones((len(heads),), out_kernel.dtype))
  else:
    attn["out"] = {"bias": attn_in["out"]["bias"]}
  ffn: dict[str, Any] = {}
  if len(neurons):
    ffn["wi"] = {"kernel": ffn_in["wi"]["kernel"][:, neurons],
                 "bias": ffn_in["wi"]["bias"][neurons]}
    wo_kernel = ffn_in["wo"]["kernel"][neurons]
    if ffn_scale is not None:
      ffn_scale = ffn_scale[neurons]
      if not learnable_masks:
        # The mask scales neuron j's GELU output: fold it into row j of W2.
        wo_kernel = wo_kernel * ffn_scale[:, None]
    ffn["wo"] = {"kernel": wo_kernel, "bias": ffn_in["wo"]["bias"]}
    if learnable_masks:
      ffn["ffn_mask"] = (ffn_scale if ffn_scale is not None else
                         np.ones((len(neurons),), wo_kernel.dtype))
  else:
    ffn["wo"] = {"bias": ffn_in["wo"]["bias"]}
  out = dict(layer)  # attn_ln, ffn_ln pass through
  out["attention"] = attn
  out["ffn"] = ffn
  return out


def prune(params: PyTree, config: TapConfig, head_mask: MaskArg, ffn_mask: MaskArg, *,
          learnable_masks: bool = True) -> tuple[dict[str, Any], TapConfig]:
  """Slices the MMT down to the heads and neurons whose mask is 1 (docs/LFPR.md §5).

  Per MMT layer l the kept heads K_l and neurons M_l stay in ascending original order:
  Q/K/V kernels `[d, h, dh]` and biases `[h, dh]` and the output kernel `[h, dh, d]`
  are indexed with K_l on the head axis, `wi` columns / bias and `wo` rows with M_l.
  Layers left without heads or neurons keep only the output bias of that block. The
  input is not modified; leaves that are not sliced (everything outside the MMT
  layers, LayerNorms, output biases) are the same objects in the result.

  Learnable masks: with `learnable_masks` the result has a head mask `[h_l]` and a
  neuron mask `[n_l]` per layer: the input's masks sliced when it has them (so pruning
  a pruned model composes), else ones (docs/LFPR.md §5.3). Without, existing masks are
  folded into the output rows of `attention/out/kernel` and `ffn/wo/kernel` (exact up
  to rounding), so the function never changes what the model computes.

  Args:
    params: the model's parameter tree (`{'params': ...}` contents), numpy or jax
      leaves.
    config: the architecture of `params`.
    head_mask: binary, `[L, max_l h_l]` (entries past a layer's head count must be 0)
      or L vectors `[h_l]`.
    ffn_mask: binary, `[L, max_l f_l]` or L vectors `[f_l]`.
    learnable_masks: give the pruned model learnable masks (the ReSt model).

  Returns:
    `(new_params, new_config)`: the sliced tree and
    `config.pruned(cfg_head, cfg_ffn, learnable_masks=learnable_masks)`.

  Raises:
    ValueError: masks of the wrong shape, not 0/1, keeping units that do not exist,
      or params whose MMT layers do not match `config`.
  """
  heads = _layer_masks(head_mask, config.mmt_heads, "head_mask")
  neurons = _layer_masks(ffn_mask, config.mmt_ffn, "ffn_mask")
  tree = flax.core.unfreeze(params)  # fresh dicts, same leaves
  if not isinstance(tree, Mapping):
    raise ValueError(f"params must be a nested dict, got {type(params).__name__}.")
  new = dict(tree)
  for i, (h, f) in enumerate(zip(config.mmt_heads, config.mmt_ffn)):
    layer = _get(tree, f"mmt_layer_{i}")
    _check_layer(layer, i, h, f, config)
    new[f"mmt_layer_{i}"] = _prune_layer(layer, heads[i], neurons[i], learnable_masks)
  extra = sorted(k for k in tree if k.startswith("mmt_layer_")
                 and k not in {f"mmt_layer_{i}" for i in range(config.mmt_layers)})
  if extra:
    raise ValueError(f"params have MMT layers {extra} beyond the config's "
                     f"{config.mmt_layers}.")
  new_config = config.pruned([len(k) for k in heads], [len(k) for k in neurons],
                             learnable_masks=learnable_masks)
  return new, new_config
