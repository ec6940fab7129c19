"""Where the time of one TAP program goes on XLA:CPU: a per-operation profile.

Run from the repository root (a minute or two per program on 2 cores):

  python -m benchmarks.op_profile --stage train_grad --compute-dtype bfloat16 \
      --out benchmarks/results/op_profile.json

Compiles one stage of full-size TAP (random weights, every slot in use, `--batch`
examples), runs it once untimed and once under `jax.profiler.trace`, and reads the
trace's per-operation events (XLA:CPU's thunks): each compiled operation's time, its
matrix-product FLOPs where it has a `dot` (from the optimised HLO), and the model part
its HLO metadata names. Reported: the time per part (text-BERT / MMT x attention core
(QK^T, softmax, PV) / Q-K-V-out projections / FFN / other, forward or backward), the
achieved GFLOP/s of each part's products, the slowest operations, and the wall time.
Operations may run concurrently (XLA:CPU runs independent thunks side by side), so the
per-operation times add up to more than the wall time, and an operation sharing the
cores with another looks slower than it is alone: read the table for where the time
goes, and compare parts within one run.

Stages: `forward` (teacher-forced scores), `train_grad` (value_and_grad of the M4C
loss w.r.t. all params, eval mode: a training step's work), `mask_grad` (the scoring
step's gradients w.r.t. the head and FFN masks; run with `--batch 8`).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import gzip
import json
import os
import re
import tempfile
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from lfpr_jax.models.batch import model_inputs
from lfpr_jax.models.losses import m4c_decoding_bce
from lfpr_jax.models.params import init_params
from lfpr_jax.models.tap import TAP

STAGES = ("forward", "train_grad", "mask_grad")


def stage_fn(stage: str, config: Any):
  model = TAP(config)
  if stage == "forward":
    return lambda p, x: model.apply({"params": p}, x)

  def loss(p, x, head_mask=None, ffn_mask=None):
    return m4c_decoding_bce(model.apply({"params": p}, x, head_mask=head_mask,
                                        ffn_mask=ffn_mask),
                            x["targets"], x["train_loss_mask"])
  if stage == "train_grad":
    return jax.value_and_grad(loss)
  ones = (jnp.ones((config.mmt_layers, config.mmt_heads[0]), jnp.float32),
          jnp.ones((config.mmt_layers, config.mmt_ffn[0]), jnp.float32))
  return lambda p, x: jax.grad(lambda h, f: loss(p, x, h, f), argnums=(0, 1))(*ones)


def _shape(text: str) -> list[int]:
  """`f32[6112,768]{1,0}` -> [6112, 768]."""
  inner = text.split("[", 1)[1].split("]", 1)[0]
  return [int(v) for v in inner.split(",") if v]


def dot_flops(hlo: str) -> dict[str, int]:
  """FLOPs (2 x output size x contracted size) of every product of an HLO module.

  Keyed by the fused computation holding the dot, or by the dot's own name where it
  runs unfused (HLO names are unique within a module).
  """
  decl = dict(re.findall(r"%(\S+) = (\w+\[[\d,]*\])", hlo))
  flops: dict[str, int] = {}
  computation = None
  for line in hlo.splitlines():
    head = re.match(r"^(?:ENTRY )?%?(\S+) \(.*\{\s*$", line)
    if head:
      computation = head.group(1)
      continue
    d = re.match(r"\s*(?:ROOT )?%(\S+) = (\w+\[[\d,]*\])\S* dot\(([^)]*)\),.*?"
                 r"lhs_contracting_dims=\{([^}]*)\}", line)
    if not d:
      continue
    lhs = decl.get(d.group(3).split(",")[0].strip().lstrip("%"))
    if lhs is None:
      continue
    k = int(np.prod([_shape(lhs)[int(c)] for c in d.group(4).split(",") if c]))
    key = (computation if computation and computation.startswith("fused_computation")
           else d.group(1))
    flops[key] = flops.get(key, 0) + 2 * int(np.prod(_shape(d.group(2)))) * k
  return flops


def op_part(op_name: str) -> str:
  """The model part an HLO op_name belongs to, e.g. 'mmt ffn bwd'."""
  where = ("text" if "text_bert" in op_name else "mmt" if "_mmt" in op_name
           else "inputs/heads")
  if re.search(r"attention\.context/(reduce|exp|sub|div|max)|bhqd,bhkd|bhqk,bhkd",
               op_name):
    what = "attention core"
  elif "/ffn" in op_name:
    what = "ffn"
  elif re.search(r"/(query|key|value|out)/", op_name):
    what = "qkv/out projections"
  else:
    what = "other"
  direction = "bwd" if "transpose(" in op_name else "fwd"
  return f"{where} {what} {direction}"


def profile(fn, args: Sequence[Any], trace_dir: str) -> list[dict[str, Any]]:
  """Per-operation events of one call of `fn` (already compiled and warm)."""
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    jax.block_until_ready(fn(*args))
  files = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
  if not files:
    raise RuntimeError(f"jax.profiler wrote no perfetto trace under {trace_dir}.")
  with gzip.open(files[0]) as f:
    events = json.load(f)["traceEvents"]
  return [e for e in events if e.get("ph") == "X"]


def summarise(events: Sequence[dict[str, Any]], hlo: str, top: int
              ) -> dict[str, Any]:
  flops = dot_flops(hlo)
  ops = {}
  for line in hlo.splitlines():
    m = re.match(r"\s*(?:ROOT )?%(\S+) = .*?op_name=\"([^\"]+)\"", line)
    if m:
      calls = re.search(r"calls=%([^,\s]+)", line)
      ops[m.group(1)] = (calls.group(1) if calls else None, m.group(2))
  time_us = collections.Counter()
  for e in events:
    if e["name"] in ops:
      time_us[e["name"]] += e["dur"]
  parts: dict[str, dict[str, float]] = {}
  rows = []
  for name, us in time_us.items():
    comp, op_name = ops[name]
    f = flops.get(comp or name, 0)
    part = op_part(op_name)
    p = parts.setdefault(part, {"ms": 0.0, "gflop": 0.0})
    p["ms"] += us / 1e3
    p["gflop"] += f / 1e9
    rows.append({"op": name, "ms": us / 1e3, "gflop": f / 1e9, "part": part,
                 "op_name": op_name})
  for p in parts.values():
    p["gflop_per_s"] = p["gflop"] / p["ms"] * 1e3 if p["ms"] and p["gflop"] else None
  rows.sort(key=lambda r: -r["ms"])
  return {"ops_ms": sum(time_us.values()) / 1e3,
          "parts": dict(sorted(parts.items(), key=lambda kv: -kv[1]["ms"])),
          "top_ops": rows[:top]}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--arch", default="tap", choices=("tap", "tap12"))
  p.add_argument("--stage", default="train_grad", choices=STAGES)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--compute-dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--top", type=int, default=15, help="slowest operations listed")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=None, help="JSON output path")
  args = p.parse_args(argv)
  if args.batch < 1 or args.top < 0:
    p.error("--batch must be >= 1 and --top >= 0")
  return args


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  args = parse_args(argv)
  config = dataclasses.replace(common.make_config(args.arch),
                               compute_dtype=args.compute_dtype)
  rng = np.random.default_rng(args.seed)
  batch = model_inputs(common.random_batch(rng, config, args.batch), config,
                       with_targets=True)
  batch = jax.device_put({k: np.asarray(v) for k, v in batch.items()})
  params = init_params(config, jax.random.key(args.seed))
  fn = jax.jit(stage_fn(args.stage, config))
  t0 = time.perf_counter()
  compiled = fn.lower(params, batch).compile()
  compile_s = time.perf_counter() - t0
  jax.block_until_ready(compiled(params, batch))   # warm-up
  t0 = time.perf_counter()
  jax.block_until_ready(compiled(params, batch))
  wall_s = time.perf_counter() - t0
  with tempfile.TemporaryDirectory() as trace_dir:
    events = profile(compiled, (params, batch), trace_dir)
  summary = summarise(events, compiled.as_text(), args.top)
  result = {"arch": args.arch, "stage": args.stage, "batch": args.batch,
            "compute_dtype": args.compute_dtype, "compile_s": compile_s,
            "wall_s": wall_s, "cpu": common.cpu_model(), "jax": jax.__version__,
            **summary}
  common.log(f"{args.stage}, {args.compute_dtype}, batch {args.batch}: wall "
             f"{wall_s:.2f} s; per-operation times sum to {summary['ops_ms'] / 1e3:.2f} s "
             "(operations overlap)")
  print(f"{'part':38s} {'ms':>8s} {'GFLOP':>8s} {'GFLOP/s':>8s}")
  for part, p in summary["parts"].items():
    rate = "" if p["gflop_per_s"] is None else f"{p['gflop_per_s']:.0f}"
    print(f"{part:38s} {p['ms']:8.1f} {p['gflop']:8.1f} {rate:>8s}")
  for r in summary["top_ops"]:
    print(f"{r['ms']:8.1f} ms {r['gflop']:7.2f} GFLOP  {r['part']:32s} {r['op_name'][-70:]}")
  if args.out:
    common.write_json(args.out, result)
  return result


if __name__ == "__main__":
  main()
