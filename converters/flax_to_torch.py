"""Writes an lfpr_jax model directory back as an upstream PyTorch checkpoint (no torch).

    python -m converters.flax_to_torch --model converted/tap_pruned --out out/pruned_model.ckpt

The output is what upstream's pythia loads strictly: a torch zip-format file holding
`{'model': state_dict}` (as LFPR's `create_pruned_model` saves it, docs/LFPR.md §5.3),
with upstream's key names, layouts and key order (`converters.torch_to_flax`'s mapping,
inverted by its `params_to_state_dict`), plus `cfg.txt` next to it (per-layer MMT heads
and FFN widths, docs/LFPR.md §5.4) for `model_attributes.m4c_lfpr_config.mmt.cfg_head /
cfg_ffn`. For an unpruned model the cfg.txt lists the full widths.

* Learnable masks (a ReSt model, `learnable_masks`): written as upstream's retraining
  model names them, `mmt.encoder.layer.{l}.attention.self.head_mask.mask` `[1, h_l, 1,
  1]` and `...intermediate.ffn_mask.mask` `[n_l]` (load with `mmt.mask True`). With
  `--fold-masks` they are multiplied into the rows of the attention output and FFN
  output projections instead (same function up to rounding; load with `mmt.mask False`).
* Pretraining heads (`cls.*`, `pollute_cls.*`, `overlap_cls.*`): upstream builds and
  loads them strictly although fine-tuning and inference never use them (docs/TAP.md
  §2), and the lfpr_jax converter drops them. `--pretrain-heads-from ORIGINAL.ckpt`
  copies them from an upstream checkpoint; without it they are written as inert
  placeholders (zeros, LayerNorm scales one), which changes no prediction.
  `cls.decoder.weight` is always the word embedding matrix it is tied to.

The tensors are float32, saved from "cpu"; `torch.load(FILE, weights_only=True)` reads
the file.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from converters import torch_writer
from converters.torch_to_flax import (FLAT_RULES, LAYER_RULES, PRETRAIN_PREFIXES,
                                      TIED_DUPLICATE, params_to_state_dict)
from lfpr_jax.models.config import TapConfig
from lfpr_jax.pruning import surgery
from lfpr_jax.pruning.selection import cfg_txt
from lfpr_jax.training import checkpointing

PyTree = Any
CFG_FILE = "cfg.txt"
HEAD_WIDTH = 512  # pollute_cls / overlap_cls hidden width (docs/TAP.md §7)


def fold_masks(params: PyTree, config: TapConfig) -> tuple[dict, TapConfig]:
  """Multiplies the learnable masks into the weights; returns a mask-free model.

  `surgery.prune` keeping every unit with `learnable_masks=False` folds head mask j
  into head j's rows of `attention/out/kernel` and neuron mask j into row j of
  `ffn/wo/kernel`.
  """
  if not config.learnable_masks:
    return params, config
  keep_heads = [np.ones((h,), np.float32) for h in config.mmt_heads]
  keep_ffn = [np.ones((f,), np.float32) for f in config.mmt_ffn]
  return surgery.prune(params, config, keep_heads, keep_ffn, learnable_masks=False)


def placeholder_pretrain_heads(config: TapConfig) -> dict[str, np.ndarray]:
  """Inert `cls.*`, `pollute_cls.*`, `overlap_cls.*` tensors of upstream's shapes."""
  d, v = config.hidden_size, config.vocab_size
  z, one = np.zeros, np.ones
  out = {"cls.bias": z((v,)), "cls.transform.dense.weight": z((d, d)),
         "cls.transform.dense.bias": z((d,)), "cls.transform.LayerNorm.weight": one((d,)),
         "cls.transform.LayerNorm.bias": z((d,))}
  for name, fan_in in (("pollute_cls", d), ("overlap_cls", 2 * d)):
    out |= {f"{name}.dense.weight": z((HEAD_WIDTH, fan_in)),
            f"{name}.dense.bias": z((HEAD_WIDTH,)),
            f"{name}.LayerNorm.weight": one((HEAD_WIDTH,)),
            f"{name}.LayerNorm.bias": z((HEAD_WIDTH,)),
            f"{name}.decoder.weight": z((1, HEAD_WIDTH)), f"{name}.decoder.bias": z((1,))}
  return {k: x.astype(np.float32) for k, x in out.items()}


def pretrain_heads_from(checkpoint: str) -> dict[str, np.ndarray]:
  """The pretraining-head tensors of an upstream checkpoint (read without torch)."""
  from converters import torch_pickle  # noqa: PLC0415
  from converters.torch_to_flax import ConversionError, extract_state_dict  # noqa: PLC0415
  sd = extract_state_dict(torch_pickle.load(checkpoint))
  heads = {k: np.asarray(v, np.float32) for k, v in sd.items()
           if k.startswith(PRETRAIN_PREFIXES) and k != TIED_DUPLICATE}
  if not heads:
    raise ConversionError(f"{checkpoint} has no pretraining heads (cls.*, pollute_cls.*, "
                          "overlap_cls.*).")
  return heads


def upstream_key_order(config: TapConfig) -> list[str]:
  """State-dict keys in upstream's module registration order (docs/TAP.md §7)."""
  def layers(stack: str, n: int) -> list[str]:
    return [f"{stack}.encoder.layer.{i}.{s}" for i in range(n) for s in LAYER_RULES]

  flat = list(FLAT_RULES)
  text_emb = [k for k in flat if k.startswith("text_bert.")]
  mmt_emb = [k for k in flat if k.startswith("mmt.")]
  features = []
  for s in ("obj", "ocr"):
    for t in (f"{s}_faster_rcnn_fc7.module.lc", f"linear_{s}_feat_to_mmt_in",
              f"linear_{s}_bbox_to_mmt_in", f"{s}_feat_layer_norm",
              f"{s}_bbox_layer_norm"):
      features += [f"{t}.weight", f"{t}.bias"]
  heads = [k for k in flat if k.startswith(("ocr_ptr_net.", "classifier."))]
  pretrain = list(placeholder_pretrain_heads(config))
  pretrain.insert(pretrain.index("cls.transform.LayerNorm.bias") + 1, TIED_DUPLICATE)
  return (text_emb + layers("text_bert", config.text_bert_layers) + features + mmt_emb
          + layers("mmt", config.mmt_layers) + heads + pretrain)


def to_state_dict(params: PyTree, config: TapConfig, *,
                  pretrain_heads: Optional[Mapping[str, np.ndarray]] = None
                  ) -> collections.OrderedDict:
  """The upstream state dict of a model, in upstream's key order.

  Args:
    params, config: the model (with learnable masks if `config.learnable_masks`).
    pretrain_heads: `cls.*` / `pollute_cls.*` / `overlap_cls.*` tensors; default
      `placeholder_pretrain_heads(config)`.

  Returns:
    OrderedDict key -> float32 numpy array.
  """
  sd = {k: np.ascontiguousarray(v, np.float32)
        for k, v in params_to_state_dict(params, config).items()}
  heads = placeholder_pretrain_heads(config) if pretrain_heads is None else dict(
      pretrain_heads)
  heads[TIED_DUPLICATE] = sd["text_bert.embeddings.word_embeddings.weight"]
  sd |= heads
  order = {k: i for i, k in enumerate(upstream_key_order(config))}
  return collections.OrderedDict(sorted(sd.items(), key=lambda kv: order.get(
      kv[0], len(order))))


def _check_paths(model_dir: str, out: str, cfg_out: str, overwrite: bool) -> None:
  if not os.path.isfile(os.path.join(model_dir, checkpointing.ARCH_FILE)):
    raise ValueError(f"{model_dir} is not an lfpr_jax model directory (no "
                     f"{checkpointing.ARCH_FILE}); expected a directory written by "
                     "`python -m converters.torch_to_flax` or `TapModel.save`.")
  for path, flag in ((out, "--out"), (cfg_out, "--cfg-out")):
    if os.path.isdir(path):
      raise ValueError(f"{flag} {path} is a directory; expected a file name.")
    if os.path.exists(path) and not overwrite:
      raise ValueError(f"{flag} {path} already exists; pass --overwrite to replace it"
                       + (" or --cfg-out to write cfg.txt elsewhere."
                          if flag == "--cfg-out" else "."))


def export_checkpoint(model_dir: str, out: str, *, cfg_out: Optional[str] = None,
                      fold: bool = False, pretrain_heads_ckpt: Optional[str] = None,
                      overwrite: bool = False) -> TapConfig:
  """Writes `{'model': state_dict}` to `out` and the cfg.txt to `cfg_out`.

  Args:
    model_dir: an lfpr_jax model directory (`arch.json` + params).
    out: the `.ckpt` file to write.
    cfg_out: where to write cfg.txt (default: `cfg.txt` next to `out`).
    fold: fold learnable masks into the weights.
    pretrain_heads_ckpt: upstream checkpoint to copy the pretraining heads from.
    overwrite: replace existing output files.

  Returns:
    The config the checkpoint was written for (mask-free after folding).

  Raises:
    ValueError: `model_dir` is not a model, an output exists without `overwrite`.
  """
  cfg_out = cfg_out or os.path.join(os.path.dirname(os.path.abspath(out)), CFG_FILE)
  _check_paths(model_dir, out, cfg_out, overwrite)
  config, params = checkpointing.load_model(model_dir)
  if fold:
    params, config = fold_masks(params, config)
  heads = pretrain_heads_from(pretrain_heads_ckpt) if pretrain_heads_ckpt else None
  sd = to_state_dict(params, config, pretrain_heads=heads)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  torch_writer.save(out, {"model": sd})
  torch_writer.write_text(cfg_out, cfg_txt(config))
  return config


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m converters.flax_to_torch", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", required=True, help="lfpr_jax model directory")
  parser.add_argument("--out", required=True, help="output .ckpt file")
  parser.add_argument("--cfg-out", help="where to write cfg.txt (default: next to --out)")
  parser.add_argument("--fold-masks", action="store_true",
                      help="multiply learnable masks into the weights (mmt.mask False)")
  parser.add_argument("--pretrain-heads-from", metavar="CKPT",
                      help="upstream checkpoint to copy cls/pollute_cls/overlap_cls from "
                           "(default: inert placeholders)")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace existing --out / cfg.txt")
  args = parser.parse_args(argv)
  from converters.torch_pickle import TorchFileError  # noqa: PLC0415
  try:
    config = export_checkpoint(args.model, args.out, cfg_out=args.cfg_out,
                               fold=args.fold_masks,
                               pretrain_heads_ckpt=args.pretrain_heads_from,
                               overwrite=args.overwrite)
  except (TorchFileError, ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {args.out}: mmt_heads={list(config.mmt_heads)} mmt_ffn="
        f"{list(config.mmt_ffn)} masks={'learnable' if config.learnable_masks else 'none'}"
        f" (upstream mmt.mask {config.learnable_masks})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
