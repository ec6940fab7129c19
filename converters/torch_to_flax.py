"""Converts an upstream PyTorch TAP / LFPR checkpoint into an lfpr_jax model directory.

    python -m converters.torch_to_flax --checkpoint save/finetuned/textvqa_tap_base_best.ckpt \
        --out converted/tap_textvqa

Reads the checkpoint without torch (`converters.torch_pickle`: zip and legacy formats,
allow-listed unpickler), accepts pythia's `{'model': state_dict, ...}` dicts, bare
state dicts, `module.` prefixes and the output of LFPR's `create_pruned_model`
(unprefixed mask keys, untied embedding copies, any key order). The architecture
(text-BERT depth, MMT depth, per-layer heads and FFN widths, learnable masks, vocab
sizes) is inferred from the tensor shapes; `--arch`, `--cfg-head`, `--cfg-ffn`,
`--cfg-file` override it. The result is checked leaf by leaf against
`jax.eval_shape` of the model and written as an Orbax checkpoint plus `arch.json`
(`lfpr_jax.training.checkpointing.load_model` rebuilds the model from that alone).

`--overwrite` replaces only a model directory lfpr_jax wrote; any other existing path
is refused and left untouched. A bad input (missing or corrupt checkpoint, malformed
`--cfg-head` or `cfg.txt`, a shape mismatch) ends with one `error: ...` line on stderr
and exit status 1 (2 for malformed arguments); `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import sys
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from lfpr_jax import cli
from lfpr_jax.models.config import KNOWN_ARCHS, TapConfig

PRETRAIN_PREFIXES = ("cls.", "pollute_cls.", "overlap_cls.")
TIED_DUPLICATE = "cls.decoder.weight"  # = text_bert.embeddings.word_embeddings.weight

# torch key suffix inside a BERT layer -> (flax sub-path, kind)
LAYER_RULES = {
    "attention.self.query.weight": ("attention/query/kernel", "qkv_kernel"),
    "attention.self.query.bias": ("attention/query/bias", "qkv_bias"),
    "attention.self.key.weight": ("attention/key/kernel", "qkv_kernel"),
    "attention.self.key.bias": ("attention/key/bias", "qkv_bias"),
    "attention.self.value.weight": ("attention/value/kernel", "qkv_kernel"),
    "attention.self.value.bias": ("attention/value/bias", "qkv_bias"),
    "attention.self.head_mask.mask": ("attention/head_mask", "head_mask"),
    "attention.output.dense.weight": ("attention/out/kernel", "out_kernel"),
    "attention.output.dense.bias": ("attention/out/bias", "copy"),
    "attention.output.LayerNorm.weight": ("attn_ln/scale", "copy"),
    "attention.output.LayerNorm.bias": ("attn_ln/bias", "copy"),
    "intermediate.dense.weight": ("ffn/wi/kernel", "linear"),
    "intermediate.dense.bias": ("ffn/wi/bias", "copy"),
    "intermediate.ffn_mask.mask": ("ffn/ffn_mask", "copy"),
    "output.dense.weight": ("ffn/wo/kernel", "linear"),
    "output.dense.bias": ("ffn/wo/bias", "copy"),
    "output.LayerNorm.weight": ("ffn_ln/scale", "copy"),
    "output.LayerNorm.bias": ("ffn_ln/bias", "copy"),
}

# torch key -> (flax path, kind) outside the BERT layers
FLAT_RULES = {
    "text_bert.embeddings.word_embeddings.weight": ("text_bert/word/embedding", "copy"),
    "text_bert.embeddings.position_embeddings.weight":
        ("text_bert/position/embedding", "copy"),
    "text_bert.embeddings.token_type_embeddings.weight":
        ("text_bert/token_type/embedding", "copy"),
    "text_bert.embeddings.LayerNorm.weight": ("text_bert/emb_ln/scale", "copy"),
    "text_bert.embeddings.LayerNorm.bias": ("text_bert/emb_ln/bias", "copy"),
    "mmt.prev_pred_embeddings.position_embeddings.weight":
        ("prev_pred_embeddings/position/embedding", "copy"),
    "mmt.prev_pred_embeddings.token_type_embeddings.weight":
        ("prev_pred_embeddings/token_type/embedding", "copy"),
    "ocr_ptr_net.query.weight": ("ocr_ptr_net/query/kernel", "linear"),
    "ocr_ptr_net.query.bias": ("ocr_ptr_net/query/bias", "copy"),
    "ocr_ptr_net.key.weight": ("ocr_ptr_net/key/kernel", "linear"),
    "ocr_ptr_net.key.bias": ("ocr_ptr_net/key/bias", "copy"),
    "classifier.module.weight": ("classifier_embedding", "copy"),
    "classifier.module.bias": ("classifier_bias", "copy"),
}
for _ln in ("ans", "ocr", "emb"):
  FLAT_RULES[f"mmt.prev_pred_embeddings.{_ln}_layer_norm.weight"] = (
      f"prev_pred_embeddings/{_ln}_ln/scale", "copy")
  FLAT_RULES[f"mmt.prev_pred_embeddings.{_ln}_layer_norm.bias"] = (
      f"prev_pred_embeddings/{_ln}_ln/bias", "copy")
for _s in ("obj", "ocr"):
  for _t, _f in ((f"{_s}_faster_rcnn_fc7.module.lc", f"{_s}_fc7"),
                 (f"linear_{_s}_feat_to_mmt_in", f"{_s}_feat_proj"),
                 (f"linear_{_s}_bbox_to_mmt_in", f"{_s}_bbox_proj")):
    FLAT_RULES[f"{_t}.weight"] = (f"{_f}/kernel", "linear")
    FLAT_RULES[f"{_t}.bias"] = (f"{_f}/bias", "copy")
  for _p in ("feat", "bbox"):
    FLAT_RULES[f"{_s}_{_p}_layer_norm.weight"] = (f"{_s}_{_p}_ln/scale", "copy")
    FLAT_RULES[f"{_s}_{_p}_layer_norm.bias"] = (f"{_s}_{_p}_ln/bias", "copy")

LAYER_KEY = re.compile(r"^(text_bert|mmt)\.encoder\.layer\.(\d+)\.(.+)$")


class ConversionError(ValueError):
  """A checkpoint that cannot be mapped onto the TAP parameter tree."""


def _transform(kind: str, w: np.ndarray, head_dim: int) -> np.ndarray:
  """PyTorch layout -> Flax layout for one tensor (docs/TAP.md §7.1)."""
  if kind == "copy":
    return w
  if kind == "linear":  # [out, in] -> [in, out]
    return w.T
  if kind == "qkv_kernel":  # [64h, d] -> [d, h, 64]
    return w.T.reshape(w.shape[1], w.shape[0] // head_dim, head_dim)
  if kind == "qkv_bias":  # [64h] -> [h, 64]
    return w.reshape(w.shape[0] // head_dim, head_dim)
  if kind == "out_kernel":  # [d, 64h] -> [h, 64, d]
    return w.T.reshape(w.shape[1] // head_dim, head_dim, w.shape[0])
  if kind == "head_mask":  # [1, h, 1, 1] -> [h]
    return w.reshape(-1)
  raise AssertionError(kind)


def _inverse(kind: str, w: np.ndarray) -> np.ndarray:
  """Flax layout -> PyTorch layout (inverse of `_transform`)."""
  if kind == "copy":
    return w
  if kind == "linear":
    return w.T
  if kind == "qkv_kernel":  # [d, h, 64] -> [64h, d]
    return w.reshape(w.shape[0], -1).T
  if kind == "qkv_bias":
    return w.reshape(-1)
  if kind == "out_kernel":  # [h, 64, d] -> [d, 64h]
    return w.reshape(-1, w.shape[-1]).T
  if kind == "head_mask":
    return w.reshape(1, -1, 1, 1)
  raise AssertionError(kind)


def _rule(key: str) -> Optional[tuple[str, str]]:
  """The Flax path and transform kind of a (normalised) torch key, or None."""
  if key in FLAT_RULES:
    return FLAT_RULES[key]
  m = LAYER_KEY.match(key)
  if m and m.group(3) in LAYER_RULES:
    stack, idx, suffix = m.groups()
    prefix = "text_bert/layer_" if stack == "text_bert" else "mmt_layer_"
    path, kind = LAYER_RULES[suffix]
    return f"{prefix}{idx}/{path}", kind
  return None


def extract_state_dict(obj: Any) -> dict[str, np.ndarray]:
  """The model state dict of a loaded checkpoint, with `module.` prefixes stripped.

  Accepts pythia checkpoints (`{'model': state_dict, 'optimizer': ..., 'config': ...}`),
  LFPR's pruned checkpoints (`{'model': state_dict}`) and bare state dicts.
  """
  sd = obj.get("model", obj) if isinstance(obj, Mapping) else None
  if not isinstance(sd, Mapping):
    raise ConversionError(
        f"checkpoint holds a {type(obj).__name__}, expected a state dict or a pythia "
        "checkpoint dict with a 'model' entry.")
  out: dict[str, np.ndarray] = {}
  for key, value in sd.items():
    if not isinstance(value, np.ndarray):
      raise ConversionError(f"state-dict entry {key!r} is a {type(value).__name__}, "
                            "not a tensor.")
    # DataParallel/DDP checkpoints prefix every key; LFPR's create_pruned_model then
    # adds its mask keys without the prefix. Strip one leading "module.".
    name = key[len("module."):] if key.startswith("module.") else key
    if name in out:
      raise ConversionError(f"state dict has both {key!r} and its unprefixed twin.")
    out[name] = value
  return out


def _layer_indices(sd: Mapping[str, np.ndarray], stack: str) -> list[int]:
  idx = set()
  for key in sd:
    m = LAYER_KEY.match(key)
    if m and m.group(1) == stack:
      idx.add(int(m.group(2)))
  found = sorted(idx)
  if found != list(range(len(found))):
    raise ConversionError(f"{stack} layer indices are not contiguous from 0: {found}.")
  return found


def infer_config(sd: Mapping[str, np.ndarray], *, arch: Optional[str] = None,
                 cfg_head: Optional[Sequence[int]] = None,
                 cfg_ffn: Optional[Sequence[int]] = None,
                 head_dim: int = 64) -> TapConfig:
  """Reads the architecture off the tensor shapes; explicit arguments override it."""
  def shape(key: str) -> tuple[int, ...]:
    if key not in sd:
      raise ConversionError(f"checkpoint has no {key!r}; is it a TAP checkpoint?")
    return tuple(sd[key].shape)

  text_layers = len(_layer_indices(sd, "text_bert"))
  mmt_layers = len(_layer_indices(sd, "mmt"))
  if mmt_layers == 0:
    raise ConversionError("checkpoint has no mmt.encoder.layer.* keys.")
  heads, ffn = [], []
  for i in range(mmt_layers):
    q = shape(f"mmt.encoder.layer.{i}.attention.self.query.weight")
    if q[0] % head_dim:
      raise ConversionError(f"mmt.encoder.layer.{i}.attention.self.query.weight has "
                            f"{q[0]} rows, not a multiple of head size {head_dim}.")
    heads.append(q[0] // head_dim)
    ffn.append(shape(f"mmt.encoder.layer.{i}.intermediate.dense.weight")[0])
  if cfg_head is not None:
    heads = [int(h) for h in cfg_head]
  if cfg_ffn is not None:
    ffn = [int(f) for f in cfg_ffn]
  vocab, hidden = shape("text_bert.embeddings.word_embeddings.weight")
  fc7_dim, obj_feat_dim = shape("obj_faster_rcnn_fc7.module.lc.weight")
  ocr_feat_dim = shape("ocr_faster_rcnn_fc7.module.lc.weight")[1]
  ocr_in = shape("linear_ocr_feat_to_mmt_in.weight")[1]
  defaults = TapConfig()
  order_dim = ocr_in - defaults.fasttext_dim - defaults.phoc_dim - fc7_dim
  if order_dim < 0:
    raise ConversionError(f"linear_ocr_feat_to_mmt_in takes {ocr_in} inputs, fewer "
                          f"than FastText + PHOC + fc7 = {ocr_in - order_dim}.")
  if arch is None:
    arch = next((name for name, spec in KNOWN_ARCHS.items()
                 if spec == dict(text_bert_layers=text_layers, mmt_layers=mmt_layers)),
                "custom")
  elif arch in KNOWN_ARCHS and KNOWN_ARCHS[arch] != dict(
      text_bert_layers=text_layers, mmt_layers=mmt_layers):
    raise ConversionError(
        f"--arch {arch} expects {KNOWN_ARCHS[arch]}, the checkpoint has "
        f"text_bert_layers={text_layers}, mmt_layers={mmt_layers}.")
  learnable = any(k.endswith(("head_mask.mask", "ffn_mask.mask")) for k in sd)
  text_ffn = (shape("text_bert.encoder.layer.0.intermediate.dense.weight")[0]
              if text_layers else defaults.text_ffn)
  return TapConfig(
      arch=arch, text_bert_layers=text_layers, mmt_heads=tuple(heads),
      mmt_ffn=tuple(ffn), learnable_masks=learnable, hidden_size=hidden,
      head_dim=head_dim, text_heads=hidden // head_dim, text_ffn=text_ffn,
      vocab_size=vocab,
      max_position_embeddings=shape("text_bert.embeddings.position_embeddings.weight")[0],
      type_vocab_size=shape("text_bert.embeddings.token_type_embeddings.weight")[0],
      num_answers=shape("classifier.module.weight")[0],
      obj_feat_dim=obj_feat_dim, ocr_feat_dim=ocr_feat_dim, fc7_dim=fc7_dim,
      order_dim=order_dim,
      prev_pred_positions=shape("mmt.prev_pred_embeddings.position_embeddings.weight")[0],
      prev_pred_types=shape("mmt.prev_pred_embeddings.token_type_embeddings.weight")[0],
      ptr_query_key_size=shape("ocr_ptr_net.query.weight")[0])


def state_dict_to_params(sd: Mapping[str, np.ndarray], config: TapConfig, *,
                         check: bool = True) -> dict[str, Any]:
  """Maps a (normalised) upstream state dict onto the lfpr_jax parameter tree.

  Every key is consumed exactly once except the pretraining heads (`cls.*`,
  `pollute_cls.*`, `overlap_cls.*`, unused in fine-tuning and inference), which are
  dropped. Zero-size tensors of fully pruned blocks (a layer with 0 heads or 0
  neurons) have no Flax leaf. Unknown keys are an error.

  Returns:
    The nested params dict (numpy float32 leaves), validated against
    `jax.eval_shape` of the model when `check` is set.
  """
  flat: dict[str, np.ndarray] = {}
  unknown = []
  for key, value in sd.items():
    if key.startswith(PRETRAIN_PREFIXES):
      continue
    rule = _rule(key)
    if rule is None:
      unknown.append(key)
      continue
    path, kind = rule
    if value.size == 0:
      continue
    flat[path] = np.asarray(_transform(kind, np.asarray(value), config.head_dim),
                            np.float32)
  if unknown:
    raise ConversionError(f"state dict has keys that are not part of TAP: {unknown}")
  params: dict[str, Any] = {}
  for path, value in flat.items():
    node = params
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  if check:
    from lfpr_jax.models.params import check_params  # jax import only when needed
    check_params(params, config)
  return params


def params_to_state_dict(params: Mapping[str, Any], config: TapConfig
                         ) -> dict[str, np.ndarray]:
  """Inverse mapping (without pretraining heads): Flax params -> upstream state dict.

  Fully pruned blocks get zero-size tensors and masks the `[1, h, 1, 1]` upstream
  shape, as `create_pruned_model` writes them.
  """
  flat = {"/".join(k): np.asarray(v) for k, v in _flatten(params).items()}
  inverse = {path: (key, kind) for key, (path, kind) in FLAT_RULES.items()}
  stacks = [("text_bert", i, "text_bert/layer_") for i in range(config.text_bert_layers)]
  stacks += [("mmt", i, "mmt_layer_") for i in range(config.mmt_layers)]
  for stack, i, prefix in stacks:
    for suffix, (path, kind) in LAYER_RULES.items():
      inverse[f"{prefix}{i}/{path}"] = (f"{stack}.encoder.layer.{i}.{suffix}", kind)
  out = {}
  for path, value in flat.items():
    key, kind = inverse[path]
    out[key] = _inverse(kind, value)
  d = config.hidden_size
  for i, (h, f) in enumerate(zip(config.mmt_heads, config.mmt_ffn)):
    base = f"mmt.encoder.layer.{i}."
    if h == 0:
      for n in ("query", "key", "value"):
        out[base + f"attention.self.{n}.weight"] = np.zeros((0, d), np.float32)
        out[base + f"attention.self.{n}.bias"] = np.zeros((0,), np.float32)
      out[base + "attention.output.dense.weight"] = np.zeros((d, 0), np.float32)
      if config.learnable_masks:
        out[base + "attention.self.head_mask.mask"] = np.zeros((1, 0, 1, 1), np.float32)
    if f == 0:
      out[base + "intermediate.dense.weight"] = np.zeros((0, d), np.float32)
      out[base + "intermediate.dense.bias"] = np.zeros((0,), np.float32)
      out[base + "output.dense.weight"] = np.zeros((d, 0), np.float32)
      if config.learnable_masks:
        out[base + "intermediate.ffn_mask.mask"] = np.zeros((0,), np.float32)
  return out


def _flatten(tree: Mapping[str, Any], prefix: tuple = ()) -> dict[tuple, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def convert(checkpoint: str, *, arch: Optional[str] = None,
            cfg_head: Optional[Sequence[int]] = None,
            cfg_ffn: Optional[Sequence[int]] = None) -> tuple[TapConfig, dict]:
  """Reads a torch checkpoint file and returns `(config, params)`."""
  from converters import torch_pickle
  sd = extract_state_dict(torch_pickle.load(checkpoint))
  config = infer_config(sd, arch=arch, cfg_head=cfg_head, cfg_ffn=cfg_ffn)
  return config, state_dict_to_params(sd, config)


def _int_list(text: str) -> list[int]:
  """`--cfg-head` / `--cfg-ffn` value: a Python list of non-negative ints."""
  try:
    value = ast.literal_eval(text.strip())
  except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
    value = None
  if (not isinstance(value, (list, tuple))
      or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                 for v in value)):
    raise argparse.ArgumentTypeError(
        f"expected a list of non-negative ints like [12,11,10,9], got {text!r}")
  return list(value)


def read_cfg_file(path: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """Per-layer (heads, FFN widths) from LFPR's `cfg.txt` (`selection.parse_cfg_txt`).

  Raises:
    FileNotFoundError: `path` is not a file.
    ValueError: the file is not two lines `[h_0, ...]` and `[f_0, ...]` (names it).
  """
  from lfpr_jax.pruning.selection import parse_cfg_txt
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--cfg-file {path} not found; expected LFPR's cfg.txt "
                            "(two lines: [heads per layer] and [FFN widths per layer]).")
  try:
    with open(path, encoding="utf-8") as f:
      return parse_cfg_txt(f.read())
  except ValueError as e:  # UnicodeDecodeError included
    raise ValueError(f"--cfg-file {path}: {e}") from e


def _parser() -> cli.ArgumentParser:
  parser = cli.ArgumentParser(
      prog="python -m converters.torch_to_flax", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--checkpoint", required=True, help="upstream .ckpt / .pth file")
  parser.add_argument("--out", required=True, help="output model directory")
  parser.add_argument("--arch", choices=sorted(KNOWN_ARCHS) + ["custom"],
                      help="architecture name (default: inferred from the keys)")
  parser.add_argument("--cfg-head", type=_int_list,
                      help="per-layer MMT head counts, e.g. [3,2,4,5] (default: inferred)")
  parser.add_argument("--cfg-ffn", type=_int_list,
                      help="per-layer MMT FFN widths (default: inferred)")
  parser.add_argument("--cfg-file", help="LFPR cfg.txt with both lists (instead of "
                      "--cfg-head / --cfg-ffn)")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace an existing output directory written by lfpr_jax "
                      "(any other existing path is refused, never deleted)")
  return parser


@cli.command
def main(argv: Optional[Sequence[str]] = None) -> int:
  """Converts; user errors end with one `error:` line (exit 1, or 2 for bad usage)."""
  parser = _parser()
  args = parser.parse_args(argv)
  if args.cfg_file and (args.cfg_head is not None or args.cfg_ffn is not None):
    parser.error("--cfg-file gives both lists; pass it or --cfg-head/--cfg-ffn, "
                 "not both")
  from lfpr_jax.training import checkpointing
  # Cheap checks first: the output path and the inputs, before the slow read.
  checkpointing.check_output_dir(args.out, overwrite=args.overwrite)
  cfg_head, cfg_ffn = args.cfg_head, args.cfg_ffn
  if args.cfg_file:
    cfg_head, cfg_ffn = read_cfg_file(args.cfg_file)
  if not os.path.isfile(args.checkpoint):
    kind = "is a directory" if os.path.isdir(args.checkpoint) else "not found"
    raise FileNotFoundError(f"--checkpoint {args.checkpoint}: {kind}; expected an "
                            "upstream .ckpt / .pth file written by torch.save.")
  config, params = convert(args.checkpoint, arch=args.arch, cfg_head=cfg_head,
                           cfg_ffn=cfg_ffn)
  checkpointing.save_model(args.out, config, params, overwrite=args.overwrite,
                           extra={"source_checkpoint": str(args.checkpoint)})
  from lfpr_jax.models.params import count_params
  print(f"wrote {args.out}: arch={config.arch} text_bert_layers="
        f"{config.text_bert_layers} mmt_heads={list(config.mmt_heads)} mmt_ffn="
        f"{list(config.mmt_ffn)} learnable_masks={config.learnable_masks} "
        f"num_answers={config.num_answers} params={count_params(params):,}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
