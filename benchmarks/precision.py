r"""float32 vs bfloat16 matmuls (`TapConfig.compute_dtype`) of full-size TAP, side by side.

    python -m benchmarks.precision --batch 16 --repeats 3

Stages, each compiled ahead of time and timed for both precisions in one run (medians
of `--repeats` calls after one warm-up call):
  forward     teacher-forced forward, eval mode, batch `--batch`
  train_grad  value_and_grad of the M4C loss w.r.t. all params, dropout off, `--batch`
  mask_grad   LFPR scoring step: gradient of the loss w.r.t. the head and FFN masks
              (`[L, 12]`, `[L, 3072]`), batch `--mask-batch`

bfloat16 runs every matmul on bfloat16 inputs with float32 accumulation; the
backward products take the float32 cotangent and the saved bfloat16 operand
(lfpr_jax/models/tap.py `matmul`). Writes JSON (schema `lfpr_jax.benchmarks.precision/1`:
settings, machine, per stage and precision the `common.stage_record` fields, and
`bf16_over_f32` = bfloat16 median / float32 median per stage) and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from typing import Any, Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from benchmarks import common
from lfpr_jax.models.batch import model_inputs
from lfpr_jax.models.losses import m4c_decoding_bce
from lfpr_jax.models.params import count_params, init_params
from lfpr_jax.models.tap import TAP

SCHEMA = "lfpr_jax.benchmarks.precision/1"
STAGES = ("forward", "train_grad", "mask_grad")
DTYPES = ("float32", "bfloat16")
DESCRIPTIONS = {
    "forward": "teacher-forced forward, eval mode (jit(apply))",
    "train_grad": "value_and_grad of the M4C loss w.r.t. all params, dropout off",
    "mask_grad": "grad of the M4C loss w.r.t. head and FFN masks (LFPR scoring step)",
}


def parse_args(argv: Optional[Sequence[str]] = None
               ) -> tuple[argparse.Namespace, list[str]]:
  p = common.base_parser(__doc__.split("\n\n")[0], "benchmarks/measured/precision.json",
                         STAGES)
  p.add_argument("--mask-batch", type=int, default=8,
                 help="batch of the mask_grad stage (LFPR's scoring batch)")
  p.set_defaults(repeats=3)
  args = p.parse_args(argv)
  stages = common.validate_args(p, args, STAGES)
  if args.mask_batch < 1:
    p.error(f"--mask-batch must be >= 1, got {args.mask_batch}.")
  return args, stages


def _time(label: str, fn, fn_args, repeats: int) -> tuple[float, float, list[float]]:
  """AOT-compiles `jax.jit(fn)`, then times it; (compile s, warm-up s, timed s)."""
  common.log(f"[{label}] compiling ...")
  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(*fn_args).compile()
  compile_s = time.perf_counter() - t0
  first, times = common.time_calls(
      label, lambda: jax.block_until_ready(compiled(*fn_args)), repeats)
  return compile_s, first, times


def _batch(config, batch_size: int, rng: np.random.Generator):
  full = model_inputs(common.random_batch(rng, config, batch_size), config,
                      with_targets=True)
  return full.pop("targets"), full.pop("train_loss_mask"), full


def run_stage(stage: str, model: TAP, params, data, repeats: int, label: str
              ) -> tuple[float, float, list[float]]:
  targets, loss_mask, inputs = data
  c = model.config
  if stage == "forward":
    return _time(label, lambda p, x: model.apply({"params": p}, x), (params, inputs),
                 repeats)
  if stage == "train_grad":
    def loss(p, x, y, m):
      return m4c_decoding_bce(model.apply({"params": p}, x), y, m)
    return _time(label, jax.value_and_grad(loss), (params, inputs, targets, loss_mask),
                 repeats)
  heads = jnp.ones((c.mmt_layers, c.mmt_heads[0]), jnp.float32)
  ffn = jnp.ones((c.mmt_layers, c.mmt_ffn[0]), jnp.float32)

  def mask_loss(hm, fm, p, x, y, m):
    s = model.apply({"params": p}, x, head_mask=hm, ffn_mask=fm)
    return m4c_decoding_bce(s, y, m)
  return _time(label, jax.grad(mask_loss, argnums=(0, 1)),
               (heads, ffn, params, inputs, targets, loss_mask), repeats)


def format_table(result: dict[str, Any]) -> str:
  rows = [f"{'stage':<11} {'batch':>5} {'float32 s':>10} {'bfloat16 s':>11} "
          f"{'bf16/f32':>9}"]
  for stage, per in result["stages"].items():
    f32, b16 = per.get("float32", {}), per.get("bfloat16", {})
    a, b = f32.get("median_s"), b16.get("median_s")
    ratio = per.get("bf16_over_f32")
    rows.append(f"{stage:<11} {per['batch']:>5} "
                f"{'-' if a is None else f'{a:.3f}':>10} "
                f"{'-' if b is None else f'{b:.3f}':>11} "
                f"{'-' if ratio is None else f'{ratio:.2f}':>9}")
  return "\n".join(rows)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  args, stages = parse_args(argv)
  base = common.make_config(args.arch)
  machine = common.machine_info(
      {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
       "numpy": np.__version__},
      {"jax_backend": jax.default_backend(), "jax_devices": len(jax.devices())})
  common.log(f"initialising {args.arch} params ...")
  params = init_params(base, jax.random.key(args.seed))  # float32 in both precisions
  batch_rng, mask_rng = np.random.default_rng(args.seed).spawn(2)
  data = {"batch": _batch(base, args.batch, batch_rng),
          "mask_batch": _batch(base, args.mask_batch, mask_rng)}
  result = {
      **common.run_header(SCHEMA, "benchmarks.precision", argv),
      "settings": {"arch": args.arch, "batch": args.batch,
                   "mask_batch": args.mask_batch, "repeats": args.repeats,
                   "seed": args.seed, "stages": list(stages)},
      "model": {"arch": base.arch, "num_params": count_params(params)},
      "machine": machine,
      "stages": {},
  }
  for stage in stages:
    batch = args.mask_batch if stage == "mask_grad" else args.batch
    per: dict[str, Any] = {"batch": batch}
    for dtype in DTYPES:
      model = TAP(dataclasses.replace(base, compute_dtype=dtype))
      label = f"{stage}/{dtype}"
      try:
        c_s, first, times = run_stage(
            stage, model, params, data["mask_batch" if stage == "mask_grad" else "batch"],
            args.repeats, label)
        per[dtype] = common.stage_record(
            stage if stage == "forward" else "", DESCRIPTIONS[stage], base, batch,
            first, times, compile_s=c_s)
      except Exception as e:  # pylint: disable=broad-except  # keep the other runs
        common.log(f"[{label}] FAILED: {type(e).__name__}: {e}")
        per[dtype] = {"status": "error", "error": f"{type(e).__name__}: {e}"}
      jax.clear_caches()
    if "median_s" in per.get("float32", {}) and "median_s" in per.get("bfloat16", {}):
      per["bf16_over_f32"] = per["bfloat16"]["median_s"] / per["float32"]["median_s"]
    result["stages"][stage] = per
  result["load_avg_at_end"] = list(os.getloadavg())
  common.write_json(args.out, result)
  if not args.quiet:
    print(format_table(result))
    print(f"wrote {args.out}")
  return result


if __name__ == "__main__":
  main()
