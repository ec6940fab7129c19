"""Separate vs fused Q/K/V projections on the CPU (issue 14: does fusing help XLA?).

Run from the repository root (about 2 minutes on 2 quiet cores):

  python -m benchmarks.fused_qkv --rows 6112 --repeats 5 \
      --out benchmarks/measured/fused_qkv.json

One MMT layer's Q/K/V projections at TAP's size: `--rows` query rows (batch 16 x 382
MMT rows = 6112) times three `[768, 768]` kernels with biases, as TAP runs them
(`separate`: three matmuls) and fused (`fused`: one `[768, 2304]` matmul on the
concatenated kernel, split afterwards; the concatenation is inside the timed program,
as a model keeping upstream's separate parameters would do it). Timed per precision
(float32; bfloat16 inputs with float32 accumulation, as `compute_dtype="bfloat16"`) and
per pass (`forward`; `grad`: forward + backward to the input and the kernels). The
two variants alternate call by call, so machine noise hits both alike; medians, and
the ratio separate / fused (> 1: fusing is faster). The outputs are checked equal.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common

HIDDEN = 768


def projections(fused: bool, dtype: Any):
  """`(x, kernels [3, D, D], biases [3, D]) -> (q, k, v)` in `dtype` matmuls."""
  def separate_fn(x, kernels, biases):
    x = x.astype(dtype)
    return tuple(jnp.dot(x, kernels[i].astype(dtype),
                         preferred_element_type=jnp.float32) + biases[i]
                 for i in range(3))

  def fused_fn(x, kernels, biases):
    w = jnp.concatenate([kernels[0], kernels[1], kernels[2]], axis=1).astype(dtype)
    y = jnp.dot(x.astype(dtype), w, preferred_element_type=jnp.float32)
    y = y + jnp.concatenate([biases[0], biases[1], biases[2]])
    return tuple(jnp.split(y, 3, axis=-1))
  return fused_fn if fused else separate_fn


def _grad(fn):
  def loss(x, kernels, biases):
    q, k, v = fn(x, kernels, biases)
    return jnp.sum(q * k) + jnp.sum(v)
  return jax.grad(loss, argnums=(0, 1))


def run(rows: int, repeats: int, seed: int = 0,
        dtypes: Sequence[str] = ("float32", "bfloat16")) -> dict[str, Any]:
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((rows, HIDDEN)), jnp.float32)
  kernels = jnp.asarray(rng.standard_normal((3, HIDDEN, HIDDEN)) * 0.02, jnp.float32)
  biases = jnp.asarray(rng.standard_normal((3, HIDDEN)) * 0.02, jnp.float32)
  out: dict[str, Any] = {}
  for dtype_name in dtypes:
    dtype = jnp.dtype(dtype_name)
    for pass_name in ("forward", "grad"):
      fns = {}
      for variant in ("separate", "fused"):
        fn = projections(variant == "fused", dtype)
        fns[variant] = jax.jit(fn if pass_name == "forward" else _grad(fn)).lower(
            x, kernels, biases).compile()
      a, b = (jax.tree.map(np.asarray, fns[v](x, kernels, biases))
              for v in ("separate", "fused"))
      tol = 1e-4 if dtype_name == "float32" else 2e-2
      equal = all(np.allclose(p, q, rtol=tol, atol=tol * np.abs(p).max())
                  for p, q in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
      times: dict[str, list[float]] = {"separate": [], "fused": []}
      for r in range(repeats + 1):          # round 0: warm-up, not kept
        for variant in ("separate", "fused"):
          t0 = time.perf_counter()
          jax.block_until_ready(fns[variant](x, kernels, biases))
          if r:
            times[variant].append(time.perf_counter() - t0)
      sep, fus = statistics.median(times["separate"]), statistics.median(times["fused"])
      flops = 2 * rows * HIDDEN * 3 * HIDDEN * (1 if pass_name == "forward" else 3)
      key = f"{dtype_name}/{pass_name}"
      out[key] = {"separate_s": sep, "fused_s": fus, "ratio": sep / fus,
                  "separate_gflops": flops / sep / 1e9, "fused_gflops": flops / fus / 1e9,
                  "outputs_equal": equal}
      common.log(f"[{key}] separate {sep * 1e3:.1f} ms ({flops / sep / 1e9:.0f} GFLOP/s),"
                 f" fused {fus * 1e3:.1f} ms ({flops / fus / 1e9:.0f} GFLOP/s): "
                 f"x{sep / fus:.2f}; outputs equal: {equal}")
  return out


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--rows", type=int, default=16 * 382,
                 help="query rows (batch x MMT rows; TAP at batch 16: 6112)")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=None, help="JSON output path")
  args = p.parse_args(argv)
  if args.rows < 1 or args.repeats < 1:
    p.error("--rows and --repeats must be >= 1")
  return args


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  args = parse_args(argv)
  result = {**common.run_header("lfpr_jax.bench.fused_qkv/1", "benchmarks.fused_qkv",
                                argv),
            "cpu": common.cpu_model(), "jax": jax.__version__, "rows": args.rows,
            "repeats": args.repeats, "stages": run(args.rows, args.repeats, args.seed)}
  if args.out:
    common.write_json(args.out, result)
  return result


if __name__ == "__main__":
  main()
