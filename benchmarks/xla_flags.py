r"""XLA:CPU flag sets side by side: full-size TAP compile and run times under each.

    python -m benchmarks.xla_flags --batch 16 --repeats 2 \
        --out benchmarks/results/xla_flags.json

Runs `benchmarks.precision` (float32 and bfloat16; forward and the training gradient by
default) once per flag set, each in its own process with `XLA_FLAGS` set (XLA reads
its flags once, at start-up), one after the other on this machine. A flag this jaxlib
does not know aborts XLA at start-up; that set is recorded as unsupported and the
others still run. Prints median seconds per stage and precision, and each set's ratio
to the first (the default flags) measured in the same run.

The default sets are what XLA:CPU offers for dense matmuls and compile time in jaxlib
0.10-0.12 (benchmarks/README.md has the figures and what was kept); `--flags` adds
others, e.g. `--flags "fast_min_max=--xla_cpu_enable_fast_min_max=true"`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from typing import Any, Optional, Sequence

from benchmarks import common

SCHEMA = "lfpr_jax.benchmarks.xla_flags/1"
# name -> XLA_FLAGS. Numerics-changing flags (fast math) are left out on purpose.
FLAG_SETS = {
    "default": "",
    "classic_emitters": "--xla_cpu_use_fusion_emitters=false",
    "xnnpack": "--xla_cpu_use_xnnpack=true",
    "onednn": "--xla_cpu_use_onednn=true",
    "no_eigen_threads": "--xla_cpu_multi_thread_eigen=false",
    "vector_width_512": "--xla_cpu_prefer_vector_width=512",
}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--arch", default="tap", choices=("tap", "tap12"))
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--stages", default="forward,train_grad",
                 help="comma-separated stages of benchmarks.precision")
  p.add_argument("--sets", default=",".join(FLAG_SETS),
                 help=f"comma-separated flag sets to run, from {sorted(FLAG_SETS)}")
  p.add_argument("--flags", action="append", default=[], metavar="NAME=XLA_FLAGS",
                 help="an extra flag set (repeatable)")
  p.add_argument("--timeout", type=float, default=1800,
                 help="seconds allowed per flag set")
  p.add_argument("--out", default="benchmarks/results/xla_flags.json")
  args = p.parse_args(argv)
  sets = {}
  for name in [s for s in args.sets.split(",") if s]:
    if name not in FLAG_SETS:
      p.error(f"--sets: unknown flag set {name!r}; known: {sorted(FLAG_SETS)}.")
    sets[name] = FLAG_SETS[name]
  for item in args.flags:
    name, sep, flags = item.partition("=")
    if not sep or not name or not flags.startswith("--"):
      p.error(f"--flags expects NAME=--xla_flag=value ..., got {item!r}.")
    sets[name] = flags
  if not sets:
    p.error("no flag set to run.")
  if args.batch < 1 or args.repeats < 1:
    p.error("--batch and --repeats must be >= 1.")
  args.sets = sets
  return args


def run_set(name: str, flags: str, args: argparse.Namespace, tmp: str) -> dict[str, Any]:
  """One `benchmarks.precision` process under `XLA_FLAGS=flags`."""
  out = os.path.join(tmp, f"{name}.json")
  cmd = [sys.executable, "-m", "benchmarks.precision", "--arch", args.arch,
         "--batch", str(args.batch), "--mask-batch", str(min(8, args.batch)),
         "--repeats", str(args.repeats), "--stages", args.stages, "--quiet",
         "--out", out]
  env = {**os.environ, "XLA_FLAGS": flags}
  common.log(f"[{name}] XLA_FLAGS={flags!r}")
  try:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                          timeout=args.timeout)
  except subprocess.TimeoutExpired:
    return {"flags": flags, "status": "timeout"}
  if proc.returncode != 0:
    tail = proc.stderr.strip().splitlines()[-1:] or [""]
    status = "unsupported" if "Unknown flag" in proc.stderr else "error"
    return {"flags": flags, "status": status, "error": tail[0][-300:]}
  with open(out) as f:
    result = json.load(f)
  stages = {}
  for stage, per in result["stages"].items():
    stages[stage] = {dtype: {k: per[dtype].get(k) for k in ("median_s", "compile_s")}
                     for dtype in ("float32", "bfloat16") if "median_s" in per.get(dtype, {})}
  return {"flags": flags, "status": "ok", "stages": stages,
          "load_avg_at_end": result.get("load_avg_at_end")}


def add_ratios(results: dict[str, dict[str, Any]]) -> None:
  """Each set's median and compile time over the first set's (same stage, dtype)."""
  base_name = next(iter(results))
  base = results[base_name].get("stages", {})
  for name, res in results.items():
    for stage, per in res.get("stages", {}).items():
      for dtype, rec in per.items():
        ref = base.get(stage, {}).get(dtype)
        if ref and ref.get("median_s") and rec.get("median_s"):
          rec[f"time_over_{base_name}"] = rec["median_s"] / ref["median_s"]
          rec[f"compile_over_{base_name}"] = rec["compile_s"] / ref["compile_s"]


def format_table(results: dict[str, dict[str, Any]]) -> str:
  base_name = next(iter(results))
  lines = [f"| flag set | stage | dtype | median s | vs {base_name} | compile s "
           f"| vs {base_name} |", "|---|---|---|---|---|---|---|"]
  for name, res in results.items():
    if res["status"] != "ok":
      lines.append(f"| {name} | {res['status']} | | | | | |")
      continue
    for stage, per in res["stages"].items():
      for dtype, rec in per.items():
        r = rec.get(f"time_over_{base_name}")
        c = rec.get(f"compile_over_{base_name}")
        lines.append(f"| {name} | {stage} | {dtype} | {rec['median_s']:.3f} | "
                     f"{'' if r is None else f'{r:.2f}x'} | {rec['compile_s']:.1f} | "
                     f"{'' if c is None else f'{c:.2f}x'} |")
  return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  args = parse_args(argv)
  import jax  # noqa: PLC0415  (versions only; the timed runs are subprocesses)
  import jaxlib  # noqa: PLC0415
  machine = common.machine_info({"jax": jax.__version__, "jaxlib": jaxlib.__version__})
  results = {}
  with tempfile.TemporaryDirectory() as tmp:
    for name, flags in args.sets.items():
      results[name] = run_set(name, flags, args, tmp)
  add_ratios(results)
  out = {**common.run_header(SCHEMA, "benchmarks.xla_flags", argv),
         "settings": {"arch": args.arch, "batch": args.batch, "repeats": args.repeats,
                      "stages": args.stages.split(",")},
         "machine": machine, "load_avg_at_end": list(os.getloadavg()),
         "sets": results}
  common.write_json(args.out, out)
  print(format_table(results))
  print(f"wrote {args.out}")
  return out


if __name__ == "__main__":
  main()
