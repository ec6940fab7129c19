"""CPU benchmark of the JAX/Flax TAP: forward, training step, greedy decoding, matmul.

Run from the repository root (the full run; roughly 10 minutes on 2 quiet cores):

  python -m benchmarks.tap_cpu --arch tap --batch 16 --repeats 5 \
      --out benchmarks/results/tap_cpu.json

Smoke test (a few minutes, mostly compilation):

  python -m benchmarks.tap_cpu --batch 2 --repeats 1 --out /tmp/tap_cpu_smoke.json

Full-size model, float32, random weights (`init_params`) and a random but realistic
batch (`benchmarks.common.random_batch`, the same batch `benchmarks.torch_reference`
builds from the same seed). Every stage is jitted, compiled ahead of time (reported
as `compile_s`), called once more as an excluded warm-up (`first_call_s`), then
timed `--repeats` times with `jax.block_until_ready`. Stages:

  forward             teacher-forced scores [B, 12, 5100], eval mode;
  train_step          value_and_grad of the M4C loss w.r.t. all params, dropout off
                      (the headline: deterministic, comparable across frameworks);
  train_step_dropout  the same with dropout on (what upstream training runs);
  train_step_adam     a whole optimiser step as training runs it: `step.train_step`
                      (dropout on) with Adam on every parameter, state donated
                      (`--no-donate`: not), each call fed the previous call's state;
  greedy_cached       `lfpr_jax.models.decoding.greedy_decode` (encoder once, KV cache);
  greedy_reference    `greedy_decode_reference` (upstream's 12 full passes), one jit;
  matmul_jax          4096 x 4096 float32 matmul (the machine's peak GFLOP/s);
  matmul_numpy        the same in numpy (its BLAS).

`--isolate` runs every stage in a fresh subprocess, so each stage's `peak_rss_mb`
is its own (the in-process peak RSS only grows). `--remat` runs the model with
`TapConfig.remat` (every text-BERT and MMT layer rematerialised in the backward pass).
`--microbatches M` runs `train_step_adam` with `step.train_step(microbatches=M)`
(gradients of M micro-batches accumulated in a `lax.scan`). `--torch-json PATH` adds speed-ups
against a `benchmarks.torch_reference` result measured on the same machine.
Output: a table on stdout, progress on stderr, JSON at `--out` (schema in
benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from benchmarks import common
from lfpr_jax.models.batch import model_inputs
from lfpr_jax.models.decoding import greedy_decode, greedy_decode_reference
from lfpr_jax.models.losses import m4c_decoding_bce
from lfpr_jax.models.config import TapConfig
from lfpr_jax.models.params import abstract_params, count_params, init_params
from lfpr_jax.models.tap import TAP
from lfpr_jax.training import optim
from lfpr_jax.training.step import init_state, train_step

Array = jax.Array
PyTree = Any

STAGES = ("forward", "train_step", "train_step_dropout", "train_step_adam", "greedy_cached",
          "greedy_reference", "matmul_jax", "matmul_numpy")

DESCRIPTIONS = {
    "forward": "teacher-forced forward, eval mode (jit(apply))",
    "train_step": "forward + M4C loss + backward to all params, dropout off "
                  "(jit(value_and_grad)); headline training figure",
    "train_step_dropout": "forward + M4C loss + backward, train mode with dropout "
                          "(what upstream's training step runs)",
    "train_step_adam": "one optimiser step: lfpr_jax.training.step.train_step (dropout "
                       "on, M4C loss, Adam 1e-4 on every parameter, clip 0.25), jitted "
                       "with the state donated unless --no-donate",
    "greedy_cached": "greedy decoding, 12 steps, encoder once + KV cache "
                     "(lfpr_jax.models.decoding.greedy_decode)",
    "greedy_reference": "greedy decoding as upstream: 12 full teacher-forced passes "
                        "(greedy_decode_reference, jitted as a whole)",
    "matmul_jax": f"{common.MATMUL_N}x{common.MATMUL_N} float32 matmul, jax.jit(jnp.dot)",
    "matmul_numpy": f"{common.MATMUL_N}x{common.MATMUL_N} float32 matmul, numpy @",
}


def parse_args(argv: Optional[Sequence[str]] = None
               ) -> tuple[argparse.Namespace, list[str]]:
  """Parses and validates the flags; returns them and the stages to run."""
  p = common.base_parser(__doc__.split("\n", 1)[0], "benchmarks/results/tap_cpu.json",
                         STAGES)
  p.add_argument("--isolate", action="store_true",
                 help="run every stage in a fresh subprocess (per-stage peak RSS)")
  p.add_argument("--torch-json", default="benchmarks/results/torch_reference.json",
                 help="a benchmarks.torch_reference result to compare with, if the "
                      "file exists")
  p.add_argument("--remat", action="store_true",
                 help="TapConfig.remat=True: rematerialise every text-BERT and MMT layer")
  p.add_argument("--no-donate", action="store_true",
                 help="train_step_adam without donating the train state to the step")
  p.add_argument("--microbatches", type=int, default=1,
                 help="train_step_adam: accumulate the gradients of this many "
                      "micro-batches (a divisor of --batch)")
  args = p.parse_args(argv)
  if args.microbatches < 1 or args.batch % args.microbatches:
    p.error(f"--microbatches {args.microbatches}: expected a divisor of --batch "
            f"{args.batch}")
  return args, common.validate_args(p, args, STAGES)


# Timing helpers ---------------------------------------------------------------------

def compile_and_time(label: str, fn: Callable[..., Any], fn_args: Sequence[Any],
                     repeats: int) -> tuple[float, float, list[float], dict[str, Any]]:
  """AOT-compiles `jax.jit(fn)` for `fn_args`, then times it.

  Returns:
    (compile seconds, warm-up seconds, timed seconds, XLA's cost and memory
    estimates of the compiled program).
  """
  common.log(f"[{label}] compiling ...")
  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(*fn_args).compile()
  compile_s = time.perf_counter() - t0
  common.log(f"[{label}] compiled in {common.fmt_s(compile_s)}")

  def call():
    jax.block_until_ready(compiled(*fn_args))

  first, times = common.time_calls(label, call, repeats)
  return compile_s, first, times, xla_estimates(compiled)


def xla_estimates(compiled: Any) -> dict[str, Any]:
  """XLA's own FLOP count and buffer sizes of a compiled program (best effort).

  `xla_gflop` is what the compiled program executes (after XLA's simplifications
  and whatever work the model skips), so `xla_gflop / seconds` is the achieved
  hardware rate. XLA counts a `while` body (a `lax.scan`) once, so it undercounts
  the cached decoder.
  """
  out: dict[str, Any] = {}
  try:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
      cost = cost[0] if cost else {}
    if cost and "flops" in cost:
      out["xla_gflop"] = float(cost["flops"]) / 1e9
  except Exception:  # pylint: disable=broad-except  # optional diagnostics only
    pass
  try:
    mem = compiled.memory_analysis()
    if mem is not None:
      out["xla_memory_mb"] = {
          k: getattr(mem, f"{k}_size_in_bytes") / 2 ** 20
          for k in ("argument", "output", "temp", "generated_code")
          if hasattr(mem, f"{k}_size_in_bytes")}
  except Exception:  # pylint: disable=broad-except
    pass
  return out


# Stages -----------------------------------------------------------------------------

def run_stage(stage: str, model: TAP, config: TapConfig, params: PyTree,
              inputs: dict[str, Array], targets: Array, loss_mask: Array,
              dropout_key: Array, matmul_key: Array, matmul_rng: np.random.Generator,
              args: argparse.Namespace) -> dict[str, Any]:
  """Compiles, warms up and times one stage; returns its JSON record."""
  label, n = stage, args.repeats

  def record(first, times, compile_s=None, notes="", extra=None):
    rec = common.stage_record(stage, DESCRIPTIONS[stage], config, args.batch, first,
                              times, compile_s=compile_s, notes=notes, extra=extra)
    # XLA's count covers a scan body once: no executed rate for the cached decoder.
    if rec.get("xla_gflop") is not None and stage != "greedy_cached":
      rec["xla_gflops_per_s"] = rec["xla_gflop"] / rec["median_s"]
    return rec

  if stage == "forward":
    def fwd(p, x):
      return model.apply({"params": p}, x)
    c_s, first, times, est = compile_and_time(label, fwd, (params, inputs), n)
    return record(first, times, c_s, extra=est)

  if stage in ("train_step", "train_step_dropout"):
    train = stage == "train_step_dropout"

    def loss_fn(p, x, y, m, key):
      rngs = {"dropout": key} if train else {}
      scores = model.apply({"params": p}, x, train=train, rngs=rngs)
      return m4c_decoding_bce(scores, y, m)

    step = jax.value_and_grad(loss_fn)
    c_s, first, times, est = compile_and_time(
        label, step, (params, inputs, targets, loss_mask, dropout_key), n)
    notes = ("dropout on, one fixed dropout key for every call" if train else
             "dropout off (eval-mode numerics); GFLOP counted as 3 x forward")
    return record(first, times, c_s, notes, est)

  if stage == "train_step_adam":
    return adam_stage(model, params, inputs, targets, loss_mask, dropout_key, args,
                      record)

  if stage == "greedy_cached":
    def dec(p, x):
      return greedy_decode(model, {"params": p}, x)
    c_s, first, times, est = compile_and_time(label, dec, (params, inputs), n)
    return record(first, times, c_s,
                  "GFLOP: text-BERT, encoders and 370 MMT rows once + 12 one-row "
                  "steps; xla_gflop counts the scan body once", est)

  if stage == "greedy_reference":
    def ref(p, x):
      return greedy_decode_reference(model, {"params": p}, x)
    c_s, first, times, est = compile_and_time(label, ref, (params, inputs), n)
    return record(first, times, c_s,
                  "GFLOP counted as upstream's loop (obj/OCR encoders once, 12 x "
                  "text-BERT + MMT + heads); XLA deduplicates the 12 identical "
                  "text-BERT passes, so it executes fewer (xla_gflop)", est)

  if stage == "matmul_jax":
    ka, kb = jax.random.split(matmul_key)
    shape = (common.MATMUL_N, common.MATMUL_N)
    a = jax.random.normal(ka, shape, jnp.float32)
    b = jax.random.normal(kb, shape, jnp.float32)
    c_s, first, times, est = compile_and_time(label, jnp.dot, (a, b), n)
    return record(first, times, c_s, "default precision (full float32 on CPU)", est)

  if stage == "matmul_numpy":
    shape = (common.MATMUL_N, common.MATMUL_N)
    a = matmul_rng.standard_normal(shape, np.float32)
    b = matmul_rng.standard_normal(shape, np.float32)
    first, times = common.time_calls(label, lambda: a @ b, n)
    return record(first, times, None, f"numpy {np.__version__} BLAS")

  raise ValueError(f"unknown stage {stage!r}")


def adam_stage(model: TAP, params: PyTree, inputs: dict[str, Array], targets: Array,
               loss_mask: Array, dropout_key: Array, args: argparse.Namespace,
               record: Callable[..., dict[str, Any]]) -> dict[str, Any]:
  """`train_step_adam`: the training step with Adam state, donated or not.

  Every call gets the state the previous call returned (as `loop.run_steps` does), so
  with donation the old parameters and Adam moments are reused as output buffers.
  """
  label = "train_step_adam"
  rules = ((".*", "base"),)
  tx = optim.make_optimizer(params, rules, {"base": 1e-4}, warmup_steps=0,
                            clip_norm=0.25)
  # A copy: donation deletes the state's buffers, and the later stages read `params`.
  state = init_state(jax.tree.map(jnp.copy, params), tx)
  batch = {**inputs, "targets": targets, "train_loss_mask": loss_mask}
  step = jax.jit(functools.partial(train_step, model=model, tx=tx,
                                   microbatches=args.microbatches),
                 donate_argnums=() if args.no_donate else (0,))
  common.log(f"[{label}] compiling ...")
  t0 = time.perf_counter()
  compiled = step.lower(state, {}, batch, dropout_key).compile()
  compile_s = time.perf_counter() - t0
  est = xla_estimates(compiled)
  holder = {"state": state}
  del state  # with donation the first call consumes the initial buffers

  def call():
    new_state, metrics = compiled(holder["state"], {}, batch, dropout_key)
    jax.block_until_ready((new_state, metrics))
    holder["state"] = new_state

  first, times = common.time_calls(label, call, args.repeats)
  notes = ("state not donated" if args.no_donate else
           "state donated (donate_argnums=(0,), as make_train_step)")
  if args.microbatches > 1:
    notes += f"; {args.microbatches} micro-batches of {args.batch // args.microbatches}"
  return record(first, times, compile_s, notes,
                {**est, "donated": not args.no_donate,
                 "microbatches": args.microbatches})


def run_in_subprocess(stage: str, args: argparse.Namespace) -> dict[str, Any]:
  """Runs one stage in a fresh interpreter; returns its record (or an error record)."""
  with tempfile.TemporaryDirectory(prefix="tap_cpu_") as tmp:
    out = os.path.join(tmp, "stage.json")
    cmd = [sys.executable, "-m", "benchmarks.tap_cpu", "--arch", args.arch,
           "--batch", str(args.batch), "--repeats", str(args.repeats),
           "--seed", str(args.seed), "--stages", stage, "--out", out, "--quiet",
           "--torch-json", ""] + (["--remat"] if args.remat else []) + (
               ["--no-donate"] if args.no_donate else []) + [
                   "--microbatches", str(args.microbatches)]
    common.log(f"[{stage}] fresh subprocess: {' '.join(cmd[1:])}")
    proc = subprocess.run(cmd, check=False)
    if proc.returncode != 0 or not os.path.exists(out):
      return {"status": "error", "description": DESCRIPTIONS[stage],
              "error": f"subprocess exited with {proc.returncode}"}
    with open(out) as f:
      rec = json.load(f)["stages"][stage]
  rec["isolated"] = True
  return rec


def load_torch_result(path: str) -> Optional[dict[str, Any]]:
  if not path or not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    common.log(f"ignoring --torch-json {path}: {e}")
    return None


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  args, stages = parse_args(argv)
  config = dataclasses.replace(common.make_config(args.arch), remat=args.remat)
  machine = common.machine_info(
      {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
       "numpy": np.__version__},
      {"jax_backend": jax.default_backend(), "jax_devices": len(jax.devices())})

  # Keys and generators are created once here and split explicitly.
  key = jax.random.key(args.seed)
  init_key, dropout_key, matmul_key = jax.random.split(key, 3)
  # Both benchmarks split the numpy generator the same way: identical batches.
  batch_rng, matmul_rng = np.random.default_rng(args.seed).spawn(2)

  needs_model = any(not s.startswith("matmul_") for s in stages)
  params, num_params = None, None
  if needs_model and not args.isolate:
    common.log(f"initialising {args.arch} params ...")
    params = init_params(config, init_key)
    num_params = count_params(params)
  elif needs_model:
    num_params = int(sum(np.prod(x.shape) for x in
                         jax.tree.leaves(abstract_params(config))))
  batch = common.random_batch(batch_rng, config, args.batch)
  full = model_inputs(batch, config, with_targets=True)
  targets, loss_mask = full.pop("targets"), full.pop("train_loss_mask")
  inputs = full
  model = TAP(config)

  result = common.result_skeleton("jax", args, stages, config, num_params, machine,
                                  module="benchmarks.tap_cpu", argv=argv)
  result["settings"].update(remat=args.remat, donate=not args.no_donate,
                            microbatches=args.microbatches)
  result["stages"] = {}
  t_start = time.perf_counter()
  for i, stage in enumerate(stages):
    common.log(f"=== stage {i + 1}/{len(stages)}: {stage} "
               f"(elapsed {common.fmt_s(time.perf_counter() - t_start)})")
    if args.isolate:
      rec = run_in_subprocess(stage, args)
    else:
      try:
        rec = run_stage(stage, model, config, params, inputs, targets, loss_mask,
                        dropout_key, matmul_key, matmul_rng, args)
      except Exception as e:  # pylint: disable=broad-except  # keep other stages
        common.log(f"[{stage}] FAILED: {type(e).__name__}: {e}")
        rec = {"status": "error", "description": DESCRIPTIONS[stage],
               "error": f"{type(e).__name__}: {e}"}
      rec["isolated"] = False
      jax.clear_caches()
    result["stages"][stage] = rec
  result["total_wall_s"] = time.perf_counter() - t_start
  ok = [r["peak_rss_mb"] for r in result["stages"].values() if "peak_rss_mb" in r]
  result["peak_rss_mb"] = max(ok + [common.peak_rss_mb()])
  result["ratios"] = common.ratios(result["stages"], args.arch, args.batch,
                                   machine["cpu_model"],
                                   load_torch_result(args.torch_json))
  common.write_json(args.out, result)
  if not args.quiet:
    print(common.format_table(result))
    print(f"wrote {args.out}")
  return result


if __name__ == "__main__":
  main()
