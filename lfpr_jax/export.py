"""Exports greedy decoding of a model directory as a serialized `jax.export` artifact.

    python -m lfpr_jax.export --model converted/tap_textvqa --out tap_greedy.jax

The file holds StableHLO of `greedy_decode` (the cached decoder `TapModel.greedy`
runs, docs/TAP.md §4.10) lowered for CPU and CUDA, with a symbolic batch dimension
`b`, so one artifact serves any batch size on either platform. It is loaded and run
with jax alone (no lfpr_jax, no flax, no orbax):

    import jax, numpy as np
    exported = jax.export.deserialize(bytearray(open("tap_greedy.jax", "rb").read()))
    out = exported.call(inputs)       # inputs: dict of the 9 model input arrays
    out["scores"], out["indices"]     # [B, T, V_a + 100] float32, [B, T] int32

Calling convention:
  * one positional argument, a dict with exactly the keys of
    `lfpr_jax.models.batch.MODEL_INPUTS` (canonical names: `obj_num` / `ocr_num`, not
    the nested upstream spellings), shapes `field_shapes(config, B)`, dtypes int32 for
    `cmb_text`, `obj_num`, `ocr_num` and float32 for the features. A wrong dtype or a
    shape other than the batch dimension is refused by `Exported.call`.
  * returns a dict: `scores` `[B, T, C]` float32 (T = `decode_steps`, C = V_a + 100;
    equal to upstream's final-pass scores) and `indices` `[B, T]` int32, their argmax
    (< V_a: answer-vocabulary word, else OCR token `index - V_a`). Both come back
    because the indices are what a server decodes to text and the scores are what
    parity checks and confidence thresholds need; dropping one would save little.

Parameters: baked in as constants by default, so the artifact is self-contained (one
file to ship, nothing to keep in sync) at the price of its size (4 bytes per parameter;
the 12-layer TAP is ~0.5 GB, under the 2 GB protobuf limit of StableHLO) and of one
artifact per checkpoint. `--params-as-input` instead exports `f(params, inputs)`: a
small artifact reusable for every checkpoint of the same architecture, but the caller
must supply the Flax parameter tree (same nesting and shapes) on each call.

Serialization needs the `flatbuffers` package (a jax extra).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp

from lfpr_jax import atomic
from lfpr_jax.models.batch import INT_FIELDS, MODEL_INPUTS, field_shapes
from lfpr_jax.models.config import TapConfig
from lfpr_jax.models.decoding import greedy_decode
from lfpr_jax.models.params import check_params
from lfpr_jax.models.tap import TAP
from lfpr_jax.training import checkpointing

PyTree = Any
PLATFORMS = ("cpu", "cuda")


def input_specs(config: TapConfig, batch_size: Any) -> dict[str, jax.ShapeDtypeStruct]:
  """`MODEL_INPUTS` as shape/dtype structs (batch size may be symbolic)."""
  shapes = field_shapes(config, batch_size)
  return {name: jax.ShapeDtypeStruct(
      shapes[name], jnp.int32 if name in INT_FIELDS else jnp.float32)
          for name in MODEL_INPUTS}


def export_greedy(config: TapConfig, params: PyTree, *, bos_index: int = 1,
                  params_as_input: bool = False,
                  platforms: Sequence[str] = PLATFORMS) -> jax.export.Exported:
  """Lowers greedy decoding with a symbolic batch dimension `b`.

  Args:
    config: the architecture (pruned per-layer shapes included).
    params: its Flax parameter tree (validated against `config`).
    bos_index: answer-vocabulary index of `<s>` (as `TapModel.bos_index`).
    params_as_input: export `f(params, inputs)` instead of baking `params` in.
    platforms: lowering platforms (a subset of cpu, cuda, rocm, tpu).

  Returns:
    The `jax.export.Exported`; `f(inputs) -> {'scores': [b, T, C] float32,
    'indices': [b, T] int32}` (see the module docstring for the calling convention).
  """
  check_params(params, config)
  model = TAP(config)

  def decode(p: PyTree, inputs: dict[str, jax.Array]) -> dict[str, jax.Array]:
    scores, _ = greedy_decode(model, {"params": p}, inputs, bos_index=bos_index)
    return {"scores": scores, "indices": jnp.argmax(scores, axis=-1).astype(jnp.int32)}

  (b,) = jax.export.symbolic_shape("b")
  specs = input_specs(config, b)
  if params_as_input:
    param_specs = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.float32), params)
    return jax.export.export(jax.jit(decode), platforms=tuple(platforms))(
        param_specs, specs)
  # Closed-over params become constants of the StableHLO module.
  baked = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  return jax.export.export(jax.jit(lambda inputs: decode(baked, inputs)),
                           platforms=tuple(platforms))(specs)


def check_paths(model_dir: str, out: str, *, overwrite: bool = False) -> None:
  """Fails before any work: `model_dir` must be a model directory, `out` free.

  Raises:
    ValueError: no `arch.json` in `model_dir`, or `out` exists without `overwrite`
      (or is a directory), or its parent is not writable.
  """
  if not os.path.isfile(os.path.join(model_dir, checkpointing.ARCH_FILE)):
    raise ValueError(f"{model_dir} is not an lfpr_jax model directory (no "
                     f"{checkpointing.ARCH_FILE}); expected a directory written by "
                     "`python -m converters.torch_to_flax` or `TapModel.save`.")
  atomic.check_new_file(out, overwrite=overwrite)


def export_model(model_dir: str, out: str, *, bos_index: int = 1,
                 params_as_input: bool = False, overwrite: bool = False,
                 platforms: Sequence[str] = PLATFORMS) -> jax.export.Exported:
  """Loads a model directory, exports greedy decoding and writes it to `out`.

  Returns:
    The `Exported` that was serialized.
  """
  check_paths(model_dir, out, overwrite=overwrite)
  if importlib.util.find_spec("flatbuffers") is None:
    raise ImportError("serializing a jax.export artifact needs the 'flatbuffers' "
                      "package: pip install flatbuffers")
  config, params = checkpointing.load_model(model_dir)
  exported = export_greedy(config, params, bos_index=bos_index,
                           params_as_input=params_as_input, platforms=platforms)
  atomic.write_bytes(out, bytes(exported.serialize()))
  return exported


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m lfpr_jax.export", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", required=True, help="model directory (with arch.json)")
  parser.add_argument("--out", required=True, help="output file (serialized Exported)")
  parser.add_argument("--bos-index", type=int, default=1,
                      help="answer-vocabulary index of <s> (1 in the M4C vocabularies)")
  parser.add_argument("--params-as-input", action="store_true",
                      help="export f(params, inputs) instead of baking the params in")
  parser.add_argument("--platforms", default=",".join(PLATFORMS),
                      help="comma-separated lowering platforms (default: cpu,cuda)")
  parser.add_argument("--overwrite", action="store_true", help="replace --out")
  args = parser.parse_args(argv)
  try:
    exported = export_model(args.model, args.out, bos_index=args.bos_index,
                            params_as_input=args.params_as_input,
                            overwrite=args.overwrite,
                            platforms=[p for p in args.platforms.split(",") if p])
  except (ValueError, OSError, ImportError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  outs = jax.tree.unflatten(exported.out_tree, exported.out_avals)
  print(f"wrote {args.out}: {os.path.getsize(args.out):,} bytes, platforms="
        f"{','.join(exported.platforms)}, "
        + ", ".join(f"{k} {v.str_short()}" for k, v in sorted(outs.items())))
  return 0


if __name__ == "__main__":
  sys.exit(main())
