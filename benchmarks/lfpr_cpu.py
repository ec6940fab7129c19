"""CPU benchmark of LFPR: importance-scoring throughput and ReSt step time (JAX vs torch).

Run from the repository root with the package's venv (about 10-15 minutes on 2 cores;
`--torch-python` names an interpreter that has torch, see benchmarks/README.md):

  python -m benchmarks.lfpr_cpu --repeats 5 --out benchmarks/results/lfpr_cpu.json

Smoke test (a few minutes, mostly compilation):

  python -m benchmarks.lfpr_cpu --repeats 1 --score-batches 2 --score-steps 0 \\
      --rest-batch 2 --rest-layers 2 --torch-stages lfpr_score_t0 --torch-batch 2 \\
      --out /tmp/lfpr_cpu_smoke.json

What is timed (full-size TAP, float32, random weights, the realistic random batch of
`benchmarks.common.random_batch`; batch 16 is generated once and batch 8 is its first
8 rows, on both sides):

  score_t{t}_b{B}       `scoring.make_grads_fn` (per-sample `vmap(grad)` of the max
                        logit at step t through the cached greedy decoder), dropout off,
                        masks at ones, plus the host transfer of the gradients and the
                        float64 accumulation (`scoring.Accumulator.add_samples`), i.e.
                        one iteration of `scoring.compute`'s loop;
  score_batched_t0_b8   diagnostic: one `grad` of the batch objective (upstream's
                        per-batch gradient G_b, no per-sample split);
  rest_k{k}_b{B}        one ReSt optimiser step (`step.make_train_step` with
                        `rest.trainable_rules(cfg, k)` and `optim.make_optimizer` set
                        up exactly as `loop.train_subset` does; dropout on, fresh key per
                        step) of the full TAP pruned to c = 0.4 (heads (5, 3, 1, 2),
                        FFN (1511, 1494, 1483, 1480), learnable masks: 11.4 M MMT
                        parameters, the paper's c = 0.4 model);
  torch lfpr_score_t{t} upstream's scoring of one batch in the faithful PyTorch model
                        (`benchmarks.torch_reference.LfprScorer`, checked against the
                        upstream golden gradients by `--check-golden`): train mode with
                        dropout 0, t + 1 full greedy passes over the 12 decoder
                        positions, then `backward()` of the sum of max logits at step t
                        with every parameter requiring grad, as upstream's
                        base_trainer_lfpr_calc_score; `_masks_only` differentiates the
                        masks only; `_anomaly` adds upstream's set_detect_anomaly(True).

JAX and torch run in two processes (torch lives in another venv) driven from here, and
every stage is timed round-robin: after each stage's compile and warm-up call, every
round calls every stage once, so load from other jobs on the machine hits all stages
alike and the JAX/torch ratios are fair. The JSON records the load average before,
during and after. Output: a table on stdout, progress on stderr, JSON at `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from typing import Any, Callable, Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import optax

from benchmarks import common
from benchmarks.tap_cpu import xla_estimates
from lfpr_jax.pruning import criteria
from lfpr_jax.pruning import scoring
from lfpr_jax.training import parallel
from lfpr_jax.pruning import rest
from lfpr_jax.training import optim
from lfpr_jax.training.step import init_state, make_train_step
from lfpr_jax.models.batch import INT_FIELDS, MODEL_INPUTS, STEP_FIELDS
from lfpr_jax.models.config import TapConfig
from lfpr_jax.models.params import count_params, init_params
from lfpr_jax.models.tap import TAP

PyTree = Any

SCHEMA = "lfpr_jax.benchmarks.lfpr_cpu/1"
BOS_INDEX = 1
# The paper's c = 0.4 TAP (11.4 M MMT parameters): per-layer heads and FFN widths.
PRUNED_C04 = {"heads": (5, 3, 1, 2), "ffn": (1511, 1494, 1483, 1480)}
# `golden/README.md` (docs/README.md §4): one upstream LFPR scoring batch of 8 at t = 0.
UPSTREAM_SCORING = {
    "source": "upstream LFPR (m4c_lfpr_calc_score), torch 2.13 CPU, 2 threads, full "
              "TAP, one scoring batch of 8 at t = 0 (1 pass + backward to the masks) "
              "(shared/golden/README.md)",
    "batch": 8, "t": 0,
    "seconds": {"intel_xeon": 3.42, "amd_epyc": 4.82},
}
TARGET_SPEEDUP = 3.0


# Inputs -----------------------------------------------------------------------------

def numpy_batch(config: TapConfig, seed: int, size: int) -> dict[str, np.ndarray]:
  """`common.random_batch` from the first spawned generator of `seed` (as torch's)."""
  batch_rng = np.random.default_rng(seed).spawn(2)[0]
  raw = common.random_batch(batch_rng, config, size)
  return {k: np.ascontiguousarray(v, np.int32 if k in INT_FIELDS else np.float32)
          for k, v in raw.items()}


def rows(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
  """The first `size` rows, tiling the batch when it is smaller."""
  n = len(next(iter(batch.values())))
  if size <= n:
    return {k: v[:size] for k, v in batch.items()}
  reps = -(-size // n)
  return {k: np.concatenate([v] * reps)[:size] for k, v in batch.items()}


def rest_settings() -> dict[str, Any]:
  """`rest.RestSettings` defaults (lr, mask_lr, clip_norm, loss_shards, dropout key)."""
  s = rest.RestSettings(percent=73.0, layers=0)
  return {"lr": s.lr, "mask_lr": s.mask_lr, "clip_norm": s.clip_norm,
          "loss_shards": s.loss_shards, "fixed_dropout_key": s.fixed_dropout_key}


# JAX stages -------------------------------------------------------------------------

class Stage:
  """One timed thing: `call()` runs it once (blocking) and returns its seconds."""

  def __init__(self, name: str, framework: str, samples: int, description: str,
               call: Callable[[], float], info: Optional[dict[str, Any]] = None):
    self.name, self.framework, self.samples = name, framework, samples
    self.description, self.call = description, call
    self.info = dict(info or {})
    self.times: list[float] = []
    self.first_s: Optional[float] = None
    self.error: Optional[str] = None


def _compile(label: str, jitted: Any, args: Sequence[Any]) -> tuple[Any, float, dict]:
  common.log(f"[{label}] compiling ...")
  t0 = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  compile_s = time.perf_counter() - t0
  common.log(f"[{label}] compiled in {common.fmt_s(compile_s)}")
  return compiled, compile_s, xla_estimates(compiled)


def scoring_stage(name: str, model: TAP, mesh: Any, params: PyTree,
                  batch: dict[str, np.ndarray], *, t_star: int, kind: str = "per_sample"
                  ) -> Stage:
  """`make_grads_fn` (or a batched `grad`) + host transfer + float64 accumulation."""
  size = len(batch["cmb_text"])
  feed = {k: batch[k] for k in MODEL_INPUTS}
  weights = np.ones(size, np.float32)
  hs, fs = criteria.mask_shapes(model.config)
  rng = jax.random.key(0)
  if kind == "per_sample":
    jitted = scoring.make_grads_fn(criteria.Lfpr(t_star=t_star, bos_index=BOS_INDEX),
                                   model, mesh, group_size=8)
    desc = (f"scoring.make_grads_fn(lfpr) at t*={t_star}: per-sample vmap(grad) through "
            "the cached greedy decoder, dropout off, + host copy + float64 accumulation")
  elif kind == "batched":
    def fn(p, b, r):
      del r
      ones_h, ones_f = jnp.ones(hs, jnp.float32), jnp.ones(fs, jnp.float32)
      x = {k: b[k] for k in MODEL_INPUTS}
      return jax.grad(
          lambda h, f: criteria.max_logit_objective(
              model, p, x, h, f, b["weight"], t_star=t_star, bos_index=BOS_INDEX),
          argnums=(0, 1))(ones_h, ones_f)
    rep, data = parallel.replicated(mesh), parallel.data_sharded(mesh)
    jitted = jax.jit(fn, in_shardings=(rep, data, rep), out_shardings=rep)
    desc = (f"diagnostic: one grad of the batch objective at t*={t_star} (upstream's "
            "per-batch gradient, no per-sample split), + host copy")
  elif kind == "faithful":
    jitted = scoring.make_grads_fn(
        criteria.Lfpr(t_star=t_star, bos_index=BOS_INDEX, dropout=True), model, mesh,
        group_size=8)
    desc = (f"scoring.make_grads_fn(lfpr, dropout=True) at t*={t_star}: faithful "
            "dropout-on group gradients (groups of 8), + host copy")
  else:
    raise ValueError(kind)
  inputs = parallel.global_batch({**feed, "weight": weights}, mesh)
  args = (params, inputs, rng)
  compiled, compile_s, est = _compile(name, jitted, args)
  acc = scoring.Accumulator(hs, fs, group_size=8, keep_batches=False)
  qids = np.arange(size)

  def call() -> float:
    t0 = time.perf_counter()
    out = compiled(*args)
    if kind == "batched":
      gh, gf = out
      gh, gf = np.asarray(gh)[None], np.asarray(gf)[None]
      acc.add_groups(gh, gf, qids)
    else:
      gh, gf = out
      gh, gf = np.asarray(gh), np.asarray(gf)
      if kind == "faithful":
        acc.add_groups(gh, gf, qids)
      else:
        acc.add_samples(gh, gf, qids)
    return time.perf_counter() - t0

  return Stage(name, "jax", size, desc, call,
               {"compile_s": compile_s, "t_star": t_star, "kind": kind, **est})


def rest_stage(name: str, config: TapConfig, params: PyTree, mesh: Any,
               batch: dict[str, np.ndarray], layers: int, seed: int,
               key_impl: Optional[str] = None) -> Stage:
  """One ReSt optimiser step, set up as `loop.train_subset` sets it up."""
  size = len(batch["cmb_text"])
  model = TAP(config)
  s = rest_settings()
  patterns = rest.trainable_rules(config, layers)
  trainable, frozen = optim.split_params(params, patterns)
  tx = optim.make_optimizer(trainable, patterns, {"base": s["lr"], "mask": s["mask_lr"]},
                            warmup_steps=0, clip_norm=s["clip_norm"])
  state = init_state(jax.device_get(trainable), tx)
  state = parallel.replicate(state, mesh)
  frozen = parallel.replicate(frozen, mesh)
  step_fn = make_train_step(model, tx, mesh, loss_shards=s["loss_shards"],
                            fixed_dropout_key=s["fixed_dropout_key"])
  feed = parallel.global_batch({k: batch[k] for k in STEP_FIELDS}, mesh)
  # The dropout key as loop.train_subset gets it (threefry); key_impl="rbg" tries XLA's
  # RngBitGenerator for the dropout masks instead (a caller-side change only).
  rng = jax.random.key(seed, impl=key_impl)
  compiled, compile_s, est = _compile(name, step_fn, (state, frozen, feed, rng))
  holder = {"state": state}
  num_trainable = int(sum(np.size(x) for x in jax.tree.leaves(trainable)))

  def call() -> float:
    t0 = time.perf_counter()
    new_state, metrics = compiled(holder["state"], frozen, feed, rng)
    jax.block_until_ready((new_state, metrics))
    holder["state"] = new_state
    holder["loss"] = float(metrics["loss"])
    return time.perf_counter() - t0

  desc = (f"one ReSt step (step.make_train_step, rest.trainable_rules(cfg, "
          f"{layers}), Adam 5e-5 / masks 1e-3, clip 0.25, dropout on), pruned "
          f"heads {list(config.mmt_heads)} FFN {list(config.mmt_ffn)}")
  if key_impl:
    desc += f"; dropout key impl {key_impl!r}"
  return Stage(name, "jax", size, desc, call,
               {"compile_s": compile_s, "layers": layers, "num_trainable": num_trainable,
                "dropout_key_impl": key_impl or str(jax.config.jax_default_prng_impl),
                "trainable_rules": [list(r) for r in patterns], **est})


# The torch side ---------------------------------------------------------------------

class TorchWorker:
  """`benchmarks.torch_reference --lfpr-worker` in another interpreter."""

  def __init__(self, python: str, arch: str, seed: int, threads: int, max_batch: int,
               device: str = "cpu"):
    cmd = [python, "-m", "benchmarks.torch_reference", "--lfpr-worker"]
    common.log(f"[torch] starting {' '.join(cmd)}")
    self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 text=True, bufsize=1)
    self.info = self.request({"op": "init", "arch": arch, "seed": seed,
                              "threads": threads, "max_batch": max_batch,
                              "device": device})

  def request(self, req: dict[str, Any]) -> dict[str, Any]:
    self.proc.stdin.write(json.dumps(req) + "\n")
    self.proc.stdin.flush()
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f"torch worker exited ({self.proc.poll()})")
    reply = json.loads(line)
    if not reply.get("ok"):
      raise RuntimeError(f"torch worker: {reply.get('error')}")
    self.last = reply
    return reply

  def stage(self, name: str, batch: int, description: str) -> Stage:
    def call() -> float:
      return self.request({"op": "run", "stage": name, "batch": batch})["seconds"]
    return Stage(f"torch_{name}_b{batch}", "torch", batch, description, call)

  def close(self) -> None:
    try:
      self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
      self.proc.stdin.flush()
      self.proc.wait(timeout=30)
    except (OSError, subprocess.TimeoutExpired):
      self.proc.kill()


def default_torch_python() -> Optional[str]:
  for path in (os.environ.get("LFPR_TORCH_PYTHON"), "/tmp/bvenv/bin/python"):
    if path and os.path.exists(path):
      return path
  return None


# Driver -----------------------------------------------------------------------------

def warm_up(stage: Stage) -> None:
  try:
    stage.first_s = stage.call()
    common.log(f"[{stage.name}] warm-up {common.fmt_s(stage.first_s)}")
  except Exception as e:  # pylint: disable=broad-except  # keep the other stages
    stage.error = f"{type(e).__name__}: {e}"
    common.log(f"[{stage.name}] FAILED: {stage.error}")


def run_rounds(stages: list[Stage], repeats: int, loads: list) -> None:
  """Round-robin: every round calls every (healthy) stage once."""
  for r in range(repeats):
    for st in stages:
      if st.error:
        continue
      try:
        st.times.append(st.call())
        common.log(f"[round {r + 1}/{repeats}] {st.name}: "
                   f"{common.fmt_s(st.times[-1])}")
      except Exception as e:  # pylint: disable=broad-except
        st.error = f"{type(e).__name__}: {e}"
        common.log(f"[{st.name}] FAILED: {st.error}")
    loads.append({"after_round": r + 1, "load_avg": list(os.getloadavg())})


def stage_record(st: Stage) -> dict[str, Any]:
  if st.error or not st.times:
    return {"status": "error", "framework": st.framework, "description": st.description,
            "error": st.error or "no timed call", **st.info}
  med = statistics.median(st.times)
  return {"status": "ok", "framework": st.framework, "description": st.description,
          "batch": st.samples, "first_call_s": st.first_s, "repeats": len(st.times),
          "times_s": st.times, "min_s": min(st.times), "median_s": med,
          "max_s": max(st.times), "samples_per_s": st.samples / med,
          "samples_per_s_best": st.samples / min(st.times), **st.info}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--repeats", type=int, default=5, help="timed rounds after warm-up")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--score-batches", default="8,16", help="JAX scoring batch sizes")
  p.add_argument("--score-steps", default="0,1", help="t* values to score at")
  p.add_argument("--no-batched", action="store_true",
                 help="skip the batched-grad diagnostic")
  p.add_argument("--faithful", action="store_true",
                 help="also time faithful dropout-on scoring (groups of 8) at t*=0")
  p.add_argument("--rest-batch", type=int, default=16)
  p.add_argument("--rest-layers", default="2,0", help="ReSt k values ('' for none)")
  p.add_argument("--rest-rbg", action="store_true",
                 help="also time the first --rest-layers step with an 'rbg' dropout key")
  p.add_argument("--torch-python", default=default_torch_python(),
                 help="interpreter with torch for the upstream side ('' to skip)")
  p.add_argument("--torch-threads", type=int, default=2)
  p.add_argument("--torch-batch", type=int, default=8)
  p.add_argument("--torch-stages", default="lfpr_score_t0,lfpr_score_t1",
                 help="torch_reference LFPR stages (modes: '', _masks_only, _anomaly)")
  p.add_argument("--out", default="benchmarks/results/lfpr_cpu.json")
  p.add_argument("--recompute", metavar="JSON", default=None,
                 help="only recompute the ratios and table of an existing result "
                      "(written to --out)")
  args = p.parse_args(argv)
  if args.repeats < 1:
    p.error("--repeats must be >= 1")
  return args


def ints(text: str) -> list[int]:
  return [int(x) for x in text.split(",") if x.strip()]


def ratio_block(stages: dict[str, dict], machine_key: Optional[str]) -> dict[str, Any]:
  """Throughput ratios (JAX samples/s over the other's samples/s)."""
  ok = {k: v for k, v in stages.items() if v.get("status") == "ok"}
  out: dict[str, Any] = {
      "definition": "JAX samples/s / other samples/s (> 1: JAX faster); "
                    "vs_torch_reference_same_run: at the medians; _best: at the fastest "
                    "calls (least disturbed by other jobs); _paired: median over "
                    "rounds of the ratio within one round-robin round",
      "target": TARGET_SPEEDUP}
  vs_torch, vs_up, best, paired = {}, {}, {}, {}
  for name, rec in ok.items():
    if rec["framework"] != "jax" or not name.startswith("score_"):
      continue
    t = rec["t_star"]
    for tname, trec in ok.items():
      if trec["framework"] == "torch" and tname.startswith(f"torch_lfpr_score_t{t}_b"):
        key = f"{name} / {tname}"
        vs_torch[key] = rec["samples_per_s"] / trec["samples_per_s"]
        best[key] = rec["samples_per_s_best"] / trec["samples_per_s_best"]
        # Round r of both stages ran within one round-robin pass: paired ratios.
        per_round = [(tt / trec["batch"]) / (jt / rec["batch"])
                     for jt, tt in zip(rec["times_s"], trec["times_s"])]
        paired[key] = statistics.median(per_round)
    if t == UPSTREAM_SCORING["t"]:
      for m, sec in UPSTREAM_SCORING["seconds"].items():
        up = UPSTREAM_SCORING["batch"] / sec
        vs_up.setdefault(m, {})[name] = {"median": rec["samples_per_s"] / up,
                                         "best": rec["samples_per_s_best"] / up}
  out["vs_torch_reference_same_run"] = vs_torch
  out["vs_torch_reference_same_run_best"] = best
  out["vs_torch_reference_same_run_paired"] = paired
  out["vs_upstream_published"] = vs_up  # a quiet-machine median: compare with "best"
  out["closest_upstream_machine"] = machine_key
  head = "score_t0_b8 / torch_lfpr_score_t0_b8"
  if head in vs_torch:
    out["headline"] = {"pair": head, "median": vs_torch[head], "best": best[head],
                       "paired": paired[head],
                       "meets_target": min(vs_torch[head], best[head],
                                           paired[head]) >= TARGET_SPEEDUP}
  return out


def format_table(result: dict[str, Any]) -> str:
  m = result["machine"]
  lines = [f"LFPR CPU benchmark | {m['cpu_model']} ({m['usable_cores']} cores) | load "
           f"{m['load_avg_at_start'][0]:.2f} at start, "
           f"{result['load_avg_at_end'][0]:.2f} at end",
           f"{'stage':<34}{'compile':>8}{'warm-up':>8}{'min':>8}{'median':>8}"
           f"{'max':>8}{'samples/s':>10}"]
  for name, r in result["stages"].items():
    if r["status"] != "ok":
      lines.append(f"{name:<34}error: {r.get('error')}")
      continue
    comp = r.get("compile_s")
    lines.append(f"{name:<34}{'-' if comp is None else f'{comp:.1f}':>8}"
                 f"{r['first_call_s']:8.2f}{r['min_s']:8.3f}{r['median_s']:8.3f}"
                 f"{r['max_s']:8.3f}{r['samples_per_s']:10.2f}")
  rat = result["ratios"]
  for k, v in rat["vs_torch_reference_same_run"].items():
    lines.append(f"speed-up {k}: {v:.2f}x at the medians, "
                 f"{rat['vs_torch_reference_same_run_best'][k]:.2f}x best-to-best, "
                 f"{rat['vs_torch_reference_same_run_paired'][k]:.2f}x paired by round")
  for mach, d in rat["vs_upstream_published"].items():
    lines.append(f"speed-up vs published upstream ({mach}; median / best): " +
                 ", ".join(f"{k} {v['median']:.2f}x / {v['best']:.2f}x"
                           for k, v in d.items()))
  torch_rss = result["peak_rss_mb"].get("torch")
  lines.append(f"peak RSS: JAX {result['peak_rss_mb']['jax'] / 1024:.2f} GiB (every stage "
               "in one process), torch "
               + ("-" if torch_rss is None else f"{torch_rss / 1024:.2f} GiB"))
  return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  args = parse_args(argv)
  if args.recompute:
    with open(args.recompute) as f:
      result = json.load(f)
    result["ratios"] = ratio_block(result["stages"], result["ratios"].get(
        "closest_upstream_machine"))
    common.write_json(args.out, result)
    print(format_table(result))
    return result
  t_start = time.perf_counter()
  machine = common.machine_info(
      {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
       "optax": optax.__version__, "numpy": np.__version__},
      {"jax_backend": jax.default_backend(), "jax_devices": len(jax.devices())})
  loads = [{"when": "start", "load_avg": list(os.getloadavg())}]
  config = TapConfig.tap()
  model = TAP(config)
  mesh = parallel.make_mesh(jax.devices()[:1])
  score_batches, score_steps = ints(args.score_batches), ints(args.score_steps)
  rest_layers = ints(args.rest_layers)
  max_batch = max(score_batches + [args.rest_batch, args.torch_batch, 1])
  full = numpy_batch(config, args.seed, max_batch)
  rss: dict[str, float] = {"after_batch": common.peak_rss_mb()}

  stages: list[Stage] = []
  worker = None
  torch_names = [s for s in args.torch_stages.split(",") if s.strip()]
  if args.torch_python and torch_names:
    try:
      worker = TorchWorker(args.torch_python, "tap", args.seed, args.torch_threads,
                           max_batch)
      for name in torch_names:
        stages.append(worker.stage(name, args.torch_batch, "torch_reference "
                                   f"LfprScorer stage {name} (upstream scoring path)"))
    except Exception as e:  # pylint: disable=broad-except
      common.log(f"[torch] unavailable: {type(e).__name__}: {e}")
      worker = None

  common.log("initialising full TAP params ...")
  params = init_params(config, jax.random.key(args.seed))
  params = parallel.replicate(params, mesh)
  for b in score_batches:
    for t in score_steps:
      stages.append(scoring_stage(f"score_t{t}_b{b}", model, mesh, params,
                                  rows(full, b), t_star=t))
  if not args.no_batched and 8 in score_batches and 0 in score_steps:
    stages.append(scoring_stage("score_batched_t0_b8", model, mesh, params,
                                rows(full, 8), t_star=0, kind="batched"))
  if args.faithful:
    stages.append(scoring_stage("score_faithful_t0_b8", model, mesh, params,
                                rows(full, 8), t_star=0, kind="faithful"))
  # Warm up the scoring stages before building the ReSt ones (RSS bookkeeping).
  for st in stages:
    warm_up(st)
  rss["after_scoring_warmup"] = common.peak_rss_mb()
  del params

  if rest_layers:
    pcfg = config.pruned(PRUNED_C04["heads"], PRUNED_C04["ffn"], learnable_masks=True)
    pparams = init_params(pcfg, jax.random.key(args.seed + 1))
    num_pruned = count_params(pparams)
    rb = rows(full, args.rest_batch)
    for k in rest_layers:
      st = rest_stage(f"rest_k{k}_b{args.rest_batch}", pcfg, pparams, mesh, rb, k,
                      args.seed)
      st.info["num_params"] = num_pruned
      stages.append(st)
      warm_up(st)
      rss[f"after_rest_k{k}_warmup"] = common.peak_rss_mb()
    if args.rest_rbg:
      k = rest_layers[0]
      st = rest_stage(f"rest_k{k}_b{args.rest_batch}_rbg", pcfg, pparams, mesh, rb, k,
                      args.seed, key_impl="rbg")
      st.info["num_params"] = num_pruned
      stages.append(st)
      warm_up(st)

  loads.append({"when": "after_warmup", "load_avg": list(os.getloadavg())})
  common.log(f"=== timing {len(stages)} stages round-robin, {args.repeats} rounds")
  run_rounds(stages, args.repeats, loads)
  torch_info = worker.info if worker else None
  torch_rss = worker.last.get("peak_rss_mb") if worker else None
  if worker:
    worker.close()

  records = {st.name: stage_record(st) for st in stages}
  cpu = machine["cpu_model"]
  result = {
      **common.run_header(SCHEMA, "benchmarks.lfpr_cpu", argv),
      "settings": {"repeats": args.repeats, "seed": args.seed,
                   "score_batches": score_batches, "score_steps": score_steps,
                   "rest_batch": args.rest_batch, "rest_layers": rest_layers,
                   "torch_batch": args.torch_batch, "torch_stages": torch_names,
                   "torch_threads": args.torch_threads, "dtype": "float32",
                   "timing": "round-robin: after every stage's warm-up, each round "
                             "calls every stage once (JAX and torch interleaved)"},
      "model": {"arch": "tap", "config": config.to_dict(),
                "pruned_c04": {**{k: list(v) for k, v in PRUNED_C04.items()}}},
      "machine": machine,
      "torch_worker": torch_info,
      "load_avg_during": loads,
      "load_avg_at_end": list(os.getloadavg()),
      "load_note": "1-minute load includes this benchmark's own busy thread(s) (about "
                   "2 on 2 cores while a stage runs); more than that is other jobs",
      "upstream": UPSTREAM_SCORING,
      "stages": records,
      "peak_rss_mb": {"jax": common.peak_rss_mb(), "jax_milestones": rss,
                      "torch": torch_rss},
      "total_wall_s": time.perf_counter() - t_start,
  }
  result["ratios"] = ratio_block(records, common.closest_upstream_machine(cpu))
  common.write_json(args.out, result)
  print(format_table(result))
  print(f"wrote {args.out}")
  return result


if __name__ == "__main__":
  main()
