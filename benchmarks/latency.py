r"""Does pruning make TAP faster, and can a latency budget be met? (issue: measured speed)

    python -m benchmarks.latency --out benchmarks/results/latency.json
    python -m benchmarks.latency --models DIR_UNPRUNED DIR_PRUNED ...   # your models

Three measurements, all on this process's first device, jitted and warm, medians:

1. Speed-up vs FLOPs ratio: greedy decoding of the full-size TAP and of the paper's
   c = 0.4 TAP (heads 5/3/1/2, FFN 1511/1494/1483/1480), latency at batch 1 and
   throughput at `--batch`; the FLOPs ratio is XLA's cost analysis of the same two
   programs. With `--models`, the given model directories instead (the first is the
   reference), e.g. a converted upstream `create_pruned_model` checkpoint.
2. Latency budgets: the MMT layer table at `--batch` (`pruning.latency.measure_table`),
   `select_latency` at several budgets on seeded random importances, then the
   selected MMT stack timed against c x the unpruned stack.
3. Rounded FFN widths: `select_sum` (params, c = 0.4) with round_to 0, 8, 64, 128, the
   MMT stack of each timed.

Writes one JSON file (atomically) and prints a Markdown summary.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import jax
import numpy as np

from benchmarks import common
from lfpr_jax.models.config import TapConfig
from lfpr_jax.models.params import init_params
from lfpr_jax.pruning import latency, selection
from lfpr_jax.training import checkpointing

PAPER_C04 = {"heads": (5, 3, 1, 2), "ffn": (1511, 1494, 1483, 1480)}


def _speed_rows(models: list[tuple[str, TapConfig, Any]], batch: int, repeats: int
                ) -> list[dict]:
  rows = []
  for name, config, params in models:
    common.log(f"greedy speed: {name}")
    s = latency.greedy_speed(config, params, batch_sizes=(1, batch), repeats=repeats)
    rows.append({"model": name, "cfg_head": list(config.mmt_heads),
                 "cfg_ffn": list(config.mmt_ffn), **s})
  ref = rows[0]
  for r in rows:
    r["speedup_b1"] = ref["latency_ms"][1] / r["latency_ms"][1]
    r["speedup_batch"] = r["throughput_qps"][batch] / ref["throughput_qps"][batch]
    f_ref, f = ref["xla_flops"][batch], r["xla_flops"][batch]
    r["flops_ratio"] = f_ref / f if f_ref and f else None
    r["speedup_over_flops_ratio"] = (r["speedup_batch"] / r["flops_ratio"]
                                     if r["flops_ratio"] else None)
  return rows


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default="benchmarks/results/latency.json")
  parser.add_argument("--models", nargs="*", default=None,
                      help="model directories (first = reference) instead of TAP")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--budgets", type=float, nargs="*", default=(0.3, 0.5, 0.7))
  parser.add_argument("--skip_tables", action="store_true",
                      help="only the speed of the models (part 1)")
  args = parser.parse_args(argv)
  t0 = time.time()
  result: dict[str, Any] = {"machine": common.machine_info({"jax": jax.__version__}),
                            "batch": args.batch, "repeats": args.repeats}
  if args.models:
    models = []
    for d in args.models:
      config, params = checkpointing.load_model(d)
      models.append((d, config, params))
    full = models[0][1]
  else:
    full = TapConfig()
    params = init_params(full, jax.random.key(0))
    pruned = full.pruned(PAPER_C04["heads"], PAPER_C04["ffn"], learnable_masks=False)
    p_params = init_params(pruned, jax.random.key(1))
    models = [("tap", full, params), ("tap c=0.4 (paper)", pruned, p_params)]
  result["speed"] = _speed_rows(models, args.batch, args.repeats)

  if not args.skip_tables:
    rng = np.random.default_rng(0)
    shape = (full.mmt_layers, max(full.mmt_heads))
    head = rng.random(shape)
    ffn = rng.random((full.mmt_layers, max(full.mmt_ffn)))
    common.log("latency table")
    table = latency.measure_table(full, batch_size=args.batch, repeats=args.repeats,
                                  progress=common.log)
    result["table"] = table.to_dict()
    common.log("unpruned MMT stack")
    full_s = latency.mmt_seconds(full, batch_size=args.batch, repeats=args.repeats)
    budget_rows = []
    for c in args.budgets:
      sel = latency.select_latency(head, ffn, c, costs=table)
      cfg = full.pruned(sel.cfg_head, sel.cfg_ffn, learnable_masks=False)
      common.log(f"budget {c}: heads {sel.cfg_head} ffn {sel.cfg_ffn}")
      got = latency.mmt_seconds(cfg, batch_size=args.batch, repeats=args.repeats)
      budget_rows.append({"budget": c, "cfg_head": list(sel.cfg_head),
                          "cfg_ffn": list(sel.cfg_ffn), "measured_ms": 1e3 * got,
                          "target_ms": 1e3 * c * full_s,
                          "modelled_ms": 1e3 * sel.cost,
                          "error": got / (c * full_s) - 1})
    result["unpruned_mmt_ms"] = 1e3 * full_s
    result["budgets"] = budget_rows
    round_rows = []
    costs = selection.param_costs(full)
    for m in (0, 8, 64, 128):
      sel = selection.select_sum(head, ffn, 0.4, costs=costs, strict_budget=True,
                                 round_to=m)
      cfg = full.pruned(sel.cfg_head, sel.cfg_ffn, learnable_masks=False)
      got = latency.mmt_seconds(cfg, batch_size=args.batch, repeats=args.repeats)
      round_rows.append({"round_to": m, "cfg_head": list(sel.cfg_head),
                         "cfg_ffn": list(sel.cfg_ffn), "mmt_ms": 1e3 * got,
                         "mmt_params": sel.mmt_params})
    result["rounding"] = round_rows
  result["seconds"] = time.time() - t0
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  common.write_json(args.out, result)

  b = args.batch
  lines = [f"device: {result['speed'][0]['device']} ({common.cpu_model()}), load "
           f"{os.getloadavg()[0]:.1f}", "",
           f"| model | heads | FFN | latency b=1 (ms) | speed-up | throughput b={b} (q/s)"
           " | speed-up | XLA FLOPs ratio | speed-up / FLOPs ratio |",
           "|---|---|---|---|---|---|---|---|---|"]
  for r in result["speed"]:
    fr, sf = r["flops_ratio"], r["speedup_over_flops_ratio"]
    lines.append(f"| {r['model']} | {r['cfg_head']} | {r['cfg_ffn']} | "
                 f"{r['latency_ms'][1]:.1f} | {r['speedup_b1']:.2f}x | "
                 f"{r['throughput_qps'][b]:.1f} | {r['speedup_batch']:.2f}x | " +
                 ("- | " if fr is None else f"{fr:.2f}x | ") +
                 ("- |" if sf is None else f"{sf:.0%} |"))
  if "budgets" in result:
    lines += ["", f"unpruned MMT stack at batch {b}: {result['unpruned_mmt_ms']:.1f} ms",
              "", "| latency budget | heads | FFN | target ms | measured ms | error |",
              "|---|---|---|---|---|---|"]
    for r in result["budgets"]:
      lines.append(f"| {r['budget']} | {r['cfg_head']} | {r['cfg_ffn']} | "
                   f"{r['target_ms']:.1f} | {r['measured_ms']:.1f} | {r['error']:+.1%} |")
    lines += ["", "| round_to (params c=0.4) | FFN | MMT params | MMT ms |",
              "|---|---|---|---|"]
    for r in result["rounding"]:
      lines.append(f"| {r['round_to']} | {r['cfg_ffn']} | {r['mmt_params']:,} | "
                   f"{r['mmt_ms']:.1f} |")
  print("\n".join(lines))
  print(f"({args.out}, {result['seconds']:.0f} s)")


if __name__ == "__main__":
  main()
