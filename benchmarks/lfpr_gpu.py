"""GPU benchmark of LFPR on full-size TAP: 3,000-sample importance scoring and ReSt epochs.

Meant for one accelerator (the device machine's `python3` has jax[cuda], flax and
optax; grain is not needed). Run from the repository root:

  python3 -m benchmarks.lfpr_gpu --budget-s 420 --out $OUT/lfpr_gpu.json

Random weights and random batches shaped as real TextVQA data
(`benchmarks.common.random_batch`, a pool of 128 samples cycled through), float32 with
JAX's default matmul precision on the GPU. Phases, in priority order (each writes the
JSON again, and a phase is skipped when the `--budget-s` left is too small):

  score_b{B}_t{t}       `scoring.make_grads_fn` over 3,000 samples (ceil(3000/B)
                        calls, the last one padded with weight-0 rows), each call as
                        `scoring.compute` makes it: host batch -> device, per-
                        sample grads, grads -> host, float64 accumulation in groups of 8
                        (the faithful per-batch score is the same for any device batch
                        that is a multiple of 8);
  rest_c04_k{k}         ReSt on the c = 0.4 TAP (heads (5, 3, 1, 2), FFN (1511, 1494,
                        1483, 1480), learnable masks), batch 16, `--rest-steps` steps
                        (217 = one epoch of the 10 % subset, 3,460 samples), looped as
                        `loop.run_steps` loops (host batch -> device every step, the
                        previous step's loss read back while the next one runs); the
                        73 % epoch (25,260 samples, 1,579 steps; upstream 1,586) is
                        extrapolated from the measured steps/s;
  tstar_b{B}            eval-mode greedy decoding of 3,000 samples (the t* pass);
  score_faithful_b{B}   faithful dropout-on group gradients (groups of 8);
  torch_lfpr_score_t0   upstream's scoring path in the faithful PyTorch model on the
                        same GPU (benchmarks.torch_reference.LfprScorer, batch 8, full
                        float32), timed on a few batches and scaled to 375.
"""

from __future__ import annotations

import os

# Leave room on the GPU for the torch worker of the last phase.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.6")

import argparse  # noqa: E402  pylint: disable=wrong-import-position
import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from typing import Any, Optional, Sequence  # noqa: E402

import flax  # noqa: E402
import jax  # noqa: E402
import jaxlib  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from benchmarks import common, lfpr_cpu  # noqa: E402
from benchmarks.tap_cpu import xla_estimates  # noqa: E402
from lfpr_jax.pruning import criteria  # noqa: E402
from lfpr_jax.pruning import scoring  # noqa: E402
from lfpr_jax.pruning import tstar  # noqa: E402
from lfpr_jax.models.decoding import greedy_decode  # noqa: E402
from lfpr_jax.training import parallel  # noqa: E402
from lfpr_jax.pruning import rest  # noqa: E402
from lfpr_jax.training import optim  # noqa: E402
from lfpr_jax.training.step import init_state, make_train_step  # noqa: E402
from lfpr_jax.models.batch import MODEL_INPUTS, STEP_FIELDS  # noqa: E402
from lfpr_jax.models.config import TapConfig  # noqa: E402
from lfpr_jax.models.params import count_params, init_params  # noqa: E402
from lfpr_jax.models.tap import TAP  # noqa: E402

SCHEMA = "lfpr_jax.benchmarks.lfpr_gpu/1"
NUM_SCORING = 3000
POOL = 128
SUBSET_10PCT = 3460   # 0.1 x 34,602 TextVQA training questions
SUBSET_73PCT = 25260  # 0.73 x 34,602
UPSTREAM_STEPS_73PCT = 1586  # docs/LFPR.md §6.2 (DDP padding; 11/15 of the set)
PAPER = {"c04_73pct_k2_gpu_hours": 0.58, "c08_10pct_k0_gpu_hours": 0.30,
         "hardware": "2 x TitanXP (GPU-hours: both GPUs counted)",
         "source": "LFPR README table (docs/LFPR.md §7.3)"}


# For `--tiny` smoke tests of the script itself (CPU, seconds); the full vocabulary,
# since common.random_batch draws wordpiece ids up to 30522.
TINY = TapConfig(arch="tiny", text_bert_layers=1, mmt_heads=(2,) * 4, mmt_ffn=(16,) * 4,
                 hidden_size=64, head_dim=32, text_heads=2, text_ffn=32, vocab_size=30522,
                 question_len=4, text_len=12, ocr_text_len=4, num_answers=20, obj_max=5,
                 ocr_max=6, decode_steps=4, obj_feat_dim=16, ocr_feat_dim=16,
                 fc7_dim=16, ptr_query_key_size=64, max_position_embeddings=16)
TINY_PRUNED = {"heads": (1, 2, 0, 1), "ffn": (8, 16, 4, 8)}


class Deadline:
  def __init__(self, budget_s: float):
    self.end = time.perf_counter() + budget_s

  def left(self) -> float:
    return self.end - time.perf_counter()


def pool_slices(pool: dict[str, np.ndarray], size: int) -> list[dict[str, np.ndarray]]:
  """Distinct host batches of `size` rows cut from the pool (tiled if needed)."""
  if size >= POOL:
    return [lfpr_cpu.rows(pool, size)]
  return [{k: v[i:i + size] for k, v in pool.items()}
          for i in range(0, POOL - size + 1, size)]


def scoring_pass(name: str, model: TAP, mesh: Any, params: Any,
                 pool: dict[str, np.ndarray], size: int, t_star: int,
                 faithful: bool = False) -> dict[str, Any]:
  """One full 3,000-sample importance pass at device batch `size`."""
  crit = criteria.Lfpr(t_star=t_star, bos_index=lfpr_cpu.BOS_INDEX, dropout=faithful)
  jitted = scoring.make_grads_fn(crit, model, mesh, group_size=8)
  batches = pool_slices({k: pool[k] for k in MODEL_INPUTS}, size)
  rng = jax.random.key(0)
  calls = math.ceil(NUM_SCORING / size)

  def feed(i: int) -> tuple[dict, np.ndarray]:
    n = min(size, NUM_SCORING - i * size)
    w = np.zeros(size, np.float32)
    w[:n] = 1.0
    return parallel.global_batch({**batches[i % len(batches)], "weight": w}, mesh), w

  x0, _ = feed(0)
  t0 = time.perf_counter()
  compiled = jitted.lower(params, x0, rng).compile()
  compile_s = time.perf_counter() - t0
  est = xla_estimates(compiled)
  jax.block_until_ready(compiled(params, x0, rng))  # warm-up
  hs, fs = criteria.mask_shapes(model.config)
  acc = scoring.Accumulator(hs, fs, group_size=8, keep_batches=False)
  device_s = []
  t0 = time.perf_counter()
  for i in range(calls):
    x, w_host = feed(i)
    c0 = time.perf_counter()
    gh, gf = compiled(params, x, rng)
    gh, gf = np.asarray(gh), np.asarray(gf)
    device_s.append(time.perf_counter() - c0)
    keep = w_host > 0
    qids = np.arange(i * size, i * size + int(keep.sum()))
    if faithful:
      groups = w_host.reshape(-1, 8).sum(1) > 0
      acc.add_groups(gh[groups], gf[groups], qids)
    else:
      acc.add_samples(gh[keep], gf[keep], qids)
  total = time.perf_counter() - t0
  imp = acc.result(crit)
  return {"status": "ok", "device_batch": size, "t_star": t_star, "faithful": faithful,
          "calls": calls, "samples": NUM_SCORING, "compile_s": compile_s,
          "total_s": total, "samples_per_s": NUM_SCORING / total,
          "call_median_s": float(np.median(device_s)),
          "note": "total_s: host batch -> device, grads -> host and accumulation "
                  "included; call_median_s: one call incl. grads -> host",
          "finite": bool(np.all(np.isfinite(imp.head)) and np.all(np.isfinite(imp.ffn))),
          **est}


def tstar_pass(model: TAP, mesh: Any, params: Any, pool: dict[str, np.ndarray],
               size: int) -> dict[str, Any]:
  """Eval-mode greedy decoding of 3,000 samples (the t* determination)."""
  def max_steps(params, batch):   # the jitted step of `tstar.compute_tstar`
    scores, _ = greedy_decode(model, {"params": params}, batch,
                              bos_index=lfpr_cpu.BOS_INDEX)
    return tstar.first_max_steps(scores)
  fn = jax.jit(max_steps, in_shardings=(parallel.replicated(mesh),
                                        parallel.data_sharded(mesh)),
               out_shardings=parallel.replicated(mesh))
  batches = pool_slices({k: pool[k] for k in MODEL_INPUTS}, size)
  calls = math.ceil(NUM_SCORING / size)
  x0 = parallel.global_batch(batches[0], mesh)
  t0 = time.perf_counter()
  compiled = fn.lower(params, x0).compile()
  compile_s = time.perf_counter() - t0
  np.asarray(compiled(params, x0))
  t0 = time.perf_counter()
  steps = []
  for i in range(calls):
    steps.append(np.asarray(compiled(params, parallel.global_batch(
        batches[i % len(batches)], mesh))))
  total = time.perf_counter() - t0
  return {"status": "ok", "device_batch": size, "calls": calls, "compile_s": compile_s,
          "total_s": total, "samples_per_s": NUM_SCORING / total}


def rest_epoch(name: str, config: TapConfig, params: Any, mesh: Any,
               pool: dict[str, np.ndarray], layers: int, steps: int, seed: int
               ) -> dict[str, Any]:
  """`steps` ReSt steps at batch 16, looped like `loop.run_steps`."""
  model = TAP(config)
  s = lfpr_cpu.rest_settings()
  patterns = rest.trainable_rules(config, layers)
  trainable, frozen = optim.split_params(params, patterns)
  tx = optim.make_optimizer(trainable, patterns, {"base": s["lr"], "mask": s["mask_lr"]},
                            warmup_steps=0, clip_norm=s["clip_norm"])
  state = parallel.replicate(init_state(jax.device_get(trainable), tx), mesh)
  frozen = parallel.replicate(frozen, mesh)
  step_fn = make_train_step(model, tx, mesh, loss_shards=s["loss_shards"],
                            fixed_dropout_key=s["fixed_dropout_key"])
  batches = pool_slices({k: pool[k] for k in STEP_FIELDS}, 16)
  rng = jax.random.key(seed)
  b0 = parallel.global_batch(batches[0], mesh)
  t0 = time.perf_counter()
  compiled = step_fn.lower(state, frozen, b0, rng).compile()
  compile_s = time.perf_counter() - t0
  est = xla_estimates(compiled)
  state, metrics = compiled(state, frozen, b0, rng)  # warm-up step (not counted)
  float(metrics["loss"])
  losses = []
  pending = None
  t0 = time.perf_counter()
  for i in range(steps):
    state, metrics = compiled(state, frozen,
                              parallel.global_batch(batches[i % len(batches)], mesh), rng)
    if pending is not None:
      losses.append(float(pending["loss"]))
    pending = metrics
  losses.append(float(pending["loss"]))
  jax.block_until_ready(state)
  total = time.perf_counter() - t0
  sps = steps / total
  return {"status": "ok", "layers": layers, "steps": steps, "batch": 16,
          "compile_s": compile_s, "total_s": total, "steps_per_s": sps,
          "step_s": total / steps,
          "num_trainable": int(sum(np.size(x) for x in jax.tree.leaves(trainable))),
          "finite": bool(np.all(np.isfinite(losses))),
          "extrapolated_10pct_epoch_s": math.ceil(SUBSET_10PCT / 16) / sps,
          "extrapolated_73pct_epoch_s": math.ceil(SUBSET_73PCT / 16) / sps,
          "extrapolated_73pct_upstream_steps_s": UPSTREAM_STEPS_73PCT / sps, **est}


def torch_phase(seed: int, calls: int) -> dict[str, Any]:
  worker = lfpr_cpu.TorchWorker(sys.executable, "tap", seed, 4, 8, device="cuda")
  out: dict[str, Any] = {"status": "ok", "worker": worker.info}
  try:
    for stage in ("lfpr_score_t0", "lfpr_score_t0_masks_only"):
      worker.request({"op": "run", "stage": stage, "batch": 8})  # warm-up
      times = [worker.request({"op": "run", "stage": stage, "batch": 8})["seconds"]
               for _ in range(calls)]
      med = float(np.median(times))
      out[stage] = {"batch": 8, "times_s": times, "median_s": med,
                    "samples_per_s": 8 / med,
                    "extrapolated_3000_s": 375 * med,
                    "cuda_peak_mb": worker.last.get("cuda_peak_mb")}
  finally:
    worker.close()
  return out


def gpu_info() -> dict[str, Any]:
  info: dict[str, Any] = {}
  try:
    q = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,"
                        "clocks.max.sm", "--format=csv,noheader"], capture_output=True,
                       text=True, timeout=20, check=False)
    info["nvidia_smi"] = q.stdout.strip()
  except (OSError, subprocess.TimeoutExpired) as e:
    info["nvidia_smi"] = f"unavailable: {e}"
  return info


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  global NUM_SCORING, POOL  # pylint: disable=global-statement  # smoke-test sizes
  p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  p.add_argument("--out", default="benchmarks/results/lfpr_gpu.json")
  p.add_argument("--budget-s", type=float, default=420.0,
                 help="stop starting new phases when less than a phase's estimate is "
                      "left")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--score-batches", default="128,8,64")
  p.add_argument("--rest-steps", type=int, default=217)
  p.add_argument("--rest-layers", default="0,2")
  p.add_argument("--torch-calls", type=int, default=10)
  p.add_argument("--phases", default="score,rest,tstar,score_t1,faithful,torch")
  p.add_argument("--num-samples", type=int, default=NUM_SCORING,
                 help="scoring samples (3000 as upstream; smaller for a smoke test)")
  p.add_argument("--pool", type=int, default=POOL, help="distinct random samples")
  p.add_argument("--tiny", action="store_true",
                 help="a tiny TAP instead of the full one (smoke test of the script)")
  args = p.parse_args(argv)
  NUM_SCORING, POOL = args.num_samples, args.pool
  phases = [x for x in args.phases.split(",") if x]
  dl = Deadline(args.budget_s)
  t_start = time.perf_counter()
  result: dict[str, Any] = {
      **common.run_header(SCHEMA, "benchmarks.lfpr_gpu", argv),
      "machine": common.machine_info(
          {"jax": jax.__version__, "jaxlib": jaxlib.__version__,
           "flax": flax.__version__, "optax": optax.__version__,
           "numpy": np.__version__},
          {"jax_backend": jax.default_backend(),
           "jax_devices": [str(d) for d in jax.devices()],
           "device_kind": jax.devices()[0].device_kind,
           "jax_default_matmul_precision": str(jax.config.jax_default_matmul_precision),
           **gpu_info()}),
      "paper": PAPER, "phases": {}}

  def save():
    result["total_wall_s"] = time.perf_counter() - t_start
    common.write_json(args.out, result)

  def phase(name: str, need_s: float, fn):
    if dl.left() < need_s:
      result["phases"][name] = {"status": "skipped", "reason": f"budget: "
                                f"{dl.left():.0f}s left, needs ~{need_s:.0f}s"}
      common.log(f"[{name}] skipped ({dl.left():.0f}s left)")
      save()
      return
    common.log(f"[{name}] start ({dl.left():.0f}s left)")
    t0 = time.perf_counter()
    try:
      rec = fn()
    except Exception as e:  # pylint: disable=broad-except  # keep the other phases
      rec = {"status": "error", "error": f"{type(e).__name__}: {e}",
             "traceback": traceback.format_exc()[-3000:]}
    rec["phase_wall_s"] = time.perf_counter() - t0
    result["phases"][name] = rec
    common.log(f"[{name}] {rec.get('status')} in {rec['phase_wall_s']:.1f}s: "
               + ", ".join(f"{k}={v:.4g}" for k, v in rec.items()
                           if isinstance(v, float) and k != "phase_wall_s"))
    save()

  config = TapConfig.tap() if not args.tiny else TINY
  model = TAP(config)
  mesh = parallel.make_mesh(jax.devices()[:1])
  pool = lfpr_cpu.numpy_batch(config, args.seed, POOL)
  params = parallel.replicate(init_params(config, jax.random.key(args.seed)), mesh)
  sizes = lfpr_cpu.ints(args.score_batches)
  if "score" in phases:
    for b in sizes[:1]:
      phase(f"score_b{b}_t0", 60, lambda b=b: scoring_pass(
          f"score_b{b}_t0", model, mesh, params, pool, b, 0))
  if "rest" in phases:
    shape = lfpr_cpu.PRUNED_C04 if not args.tiny else TINY_PRUNED
    pcfg = config.pruned(shape["heads"], shape["ffn"], learnable_masks=True)
    pparams = init_params(pcfg, jax.random.key(args.seed + 1))
    result["pruned_c04"] = {"heads": list(pcfg.mmt_heads), "ffn": list(pcfg.mmt_ffn),
                            "num_params": count_params(pparams)}
    for k in lfpr_cpu.ints(args.rest_layers):
      phase(f"rest_c04_k{k}", 70, lambda k=k: rest_epoch(
          f"rest_c04_k{k}", pcfg, pparams, mesh, pool, k, args.rest_steps, args.seed))
    del pparams
  if "score" in phases:
    for b in sizes[1:]:
      phase(f"score_b{b}_t0", 60, lambda b=b: scoring_pass(
          f"score_b{b}_t0", model, mesh, params, pool, b, 0))
  if "tstar" in phases:
    phase(f"tstar_b{sizes[0]}", 45, lambda: tstar_pass(model, mesh, params, pool,
                                                       sizes[0]))
  if "score_t1" in phases:
    phase(f"score_b{sizes[0]}_t1", 60, lambda: scoring_pass(
        f"score_b{sizes[0]}_t1", model, mesh, params, pool, sizes[0], 1))
  if "faithful" in phases:
    phase("score_faithful_b64_t0", 60, lambda: scoring_pass(
        "score_faithful_b64_t0", model, mesh, params, pool, 64, 0, faithful=True))
  if "torch" in phases:
    phase("torch_upstream_scoring", 60, lambda: torch_phase(args.seed,
                                                            args.torch_calls))
  # Whole-pipeline estimate for the paper's c = 0.4 / 73 % / k = 2 run.
  ph = result["phases"]
  sc = next((ph[k] for k in ph if k.startswith("score_b") and k.endswith("_t0")
             and ph[k].get("status") == "ok" and ph[k]["device_batch"] >= 64), None)
  ts = next((ph[k] for k in ph if k.startswith("tstar") and ph[k].get("status") == "ok"),
            None)
  rk2 = ph.get("rest_c04_k2", {})
  if sc and rk2.get("status") == "ok":
    est = {"scoring_3000_s": sc["total_s"],
           "tstar_3000_s": ts["total_s"] if ts else None,
           "rest_73pct_k2_s": rk2["extrapolated_73pct_epoch_s"]}
    total = sum(v for v in est.values() if v)
    est["total_s"] = total
    est["total_gpu_hours"] = total / 3600
    est["paper_gpu_hours"] = PAPER["c04_73pct_k2_gpu_hours"]
    est["note"] = ("compute only (no data loading, compile times, evaluation or "
                   "checkpointing); one GPU vs the paper's two TitanXP")
    result["pipeline_estimate_c04_73pct_k2"] = est
  save()
  print(f"wrote {args.out}")
  return result


if __name__ == "__main__":
  main()
