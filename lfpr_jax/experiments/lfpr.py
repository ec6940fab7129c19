"""The LFPR run as cached stages in a workdir (docs/LFPR.md §1).

    validate -> data -> base model -> eval unpruned -> t* -> importance -> pseudo-labels
      -> per target: selection + surgery -> eval pruned -> ReSt -> eval retrained
                     -> speed -> checkpoints -> result
      -> tables

Every stage writes its output atomically under `<workdir>/lfpr/` with a record of the
config values it depends on (`stages.cached`); a rerun reuses what is still valid, so
an interrupted run continues where it stopped (ReSt resumes from its checkpoint).

Layout:

    lfpr/config.json             the run record (config; checked on every start)
    lfpr/base_eval.json          unpruned val metrics (+ _predictions.json, EvalAI format)
    lfpr/speed_unpruned.json     measured greedy latency / throughput of the base model
    lfpr/tstar.json              per-sample max steps, t*
    lfpr/importance.npz          head/neuron scores (per batch and per sample)
    lfpr/pseudo_labels.npz       the unpruned model's greedy predictions on train
    lfpr/latency/                the device's MMT latency table (prune.cost="latency")
    lfpr/<heuristic>_<c>/        cfg.txt, masks.npz, eval_pruned.json, rest/ (resumable),
                                 eval_rest.json, speed.json, model/ (full retrained
                                 model), delta/ (trainable tensors only), result.json,
                                 *_predictions.json
    lfpr/results.{md,jsonl}      the final tables
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Optional

import jax
import ml_collections
import numpy as np

from lfpr_jax import atomic
from lfpr_jax.experiments import common, stages
from lfpr_jax.models.params import count_params
from lfpr_jax.models.tap import TAP
from lfpr_jax.pruning import (delta, latency, pseudo_labels, rest, scoring, selection,
                              surgery)
from lfpr_jax.training import checkpointing, loop

# Config keys that may change between runs of one workdir: more targets, the console.
MUTABLE_KEYS = ("prune.constraints", "prune.percentiles", "progress", "sweep")
STAGES = (
    stages.Stage("importance", ("lfpr/importance.npz",),
                 ("prune.dropout", "prune.group_size", "prune.batch_size",
                  "prune.num_samples", "prune.sample_seed"), ("t*",)),
    stages.Stage("targets", ("lfpr/sum_*", "lfpr/thre_*", "lfpr/results.*"),
                 ("prune", "rest", "eval", "speed"),
                 ("importance", "pseudo-labels", "unpruned evaluation")),
    stages.Stage("speed", ("lfpr/speed_unpruned.json",), ("speed", "compute_dtype"),
                 ("base model",)),
)


@dataclasses.dataclass(frozen=True)
class Target:
  """One pruning target: a "sum" constraint or a "thre" percentile, with its ReSt."""
  heuristic: str
  value: float
  percent: float
  layers: int

  @property
  def name(self) -> str:
    return f"{self.heuristic}_{self.value:g}"


def targets_of(config: ml_collections.ConfigDict) -> list[Target]:
  """The run's targets with their (retrain %, k) from the schedule (validated config)."""
  p, r = config.prune, config.rest
  if p.heuristic == "sum":
    values, schedule = p.constraints, r.schedule
  else:
    values, schedule = p.percentiles, r.thre_schedule
  table = {float(v): (float(pct), int(k)) for v, pct, k in schedule}
  return [Target(p.heuristic, float(v), *table[float(v)]) for v in values]


def speed_of(config: ml_collections.ConfigDict, model_config, params) -> dict:
  s = config.speed
  return latency.greedy_speed(model_config, params, batch_sizes=tuple(s.batch_sizes),
                              repeats=s.repeats)


def select(config: ml_collections.ConfigDict, s: common.Setup, target: Target,
           head: np.ndarray, ffn: np.ndarray) -> selection.Selection:
  """The target's selection under `prune.cost` (params, flops or latency)."""
  p = config.prune
  if target.heuristic == "thre":
    return selection.select_thre(head, ffn, target.value, config=s.base_config)
  return common.select_budget(s, head, ffn, target.value, cost=p.cost,
                             strict_budget=p.strict_budget, round_to=p.round_to)


def run(config: ml_collections.ConfigDict, workdir: str, *,
        invalidate: bool = False) -> dict[str, Any]:
  """Runs (or resumes) every stage.

  Returns:
    `{"rows": one result row per target, "unpruned": the base model's row}`.
  """
  # ------------------------------------------------------------ setup (validated)
  s = common.setup(config, workdir, STAGES, ignore=MUTABLE_KEYS, invalidate=invalidate)
  p, r = config.prune, config.rest
  targets = targets_of(config)
  is_main = jax.process_index() == 0
  base_sha = checkpointing.params_sha256(s.base_params)
  unpruned_speed, _ = stages.cached(
      s.path("speed_unpruned.json"),
      lambda: speed_of(config, s.base_config, s.base_params),
      depends_on=s.depends_on("speed"))

  # -------------------------------------------------------------- t*, importance
  times = dict(s.times)
  t_star, times["tstar"] = common.tstar_stage(s)
  imp, times["importance"] = stages.cached(
      s.path("importance.npz"),
      lambda: scoring.compute(
          "lfpr", s.model, s.rep_params,
          common.batches(s, indices=s.samples, local_batch=s.score_local,
                         desc="importance", trim=config.trim),
          mesh=s.mesh, group_size=p.group_size, seed=config.seed,
          keep_batch_grads=False, trimmed=config.trim, t_star=t_star,
          bos_index=s.data.vocab.bos_idx, dropout=p.dropout),
      depends_on=s.depends_on("importance"),
      save=lambda path, v: v.save(path), load=scoring.Scores.load)
  head_imp, ffn_imp = imp.scores(per_sample=p.per_sample)

  # ---------------------------------------------------------------- pseudo-labels
  labels, times["pseudo_labels"] = common.labels_stage(s)

  # ---------------------------------------------------------------------- targets
  rows = []
  for target in targets:
    d = s.path(target.name)
    deps = {**s.depends_on("targets"), "target": target.name}

    def compute_target(target=target, d=d, deps=deps) -> dict:
      os.makedirs(d, exist_ok=True)
      t0 = time.time()
      sel = select(config, s, target, head_imp, ffn_imp)
      pruned_params, pruned_config = surgery.prune(s.base_params, s.base_config,
                                                   sel.head_mask, sel.ffn_mask)
      select_seconds = time.time() - t0
      if is_main:
        atomic.write_text(os.path.join(d, "cfg.txt"), selection.cfg_txt(sel))
        atomic.savez(os.path.join(d, "masks.npz"), head_mask=sel.head_mask,
                     ffn_mask=sel.ffn_mask)
      pruned_model = TAP(pruned_config)
      before, before_s = common.evaluate_stage(
          s, pruned_model, pruned_params, os.path.join(d, "eval_pruned.json"),
          stage="targets", desc=f"eval {target.name} pruned")

      # ReSt on the unpruned model's pseudo-labels (resumable).
      settings = rest.RestSettings.from_config(r, percent=target.percent,
                                              layers=target.layers)
      subset = pseudo_labels.subset_indices(s.num_train, target.percent, r.subset_seed)
      transform = pseudo_labels.PseudoLabelTargets(
          labels, s.data.vocab, decode_steps=pruned_config.decode_steps,
          ocr_slots=pruned_config.ocr_max)
      retrained, rest_summary = loop.train_subset(
          model_config=pruned_config, params=pruned_params,
          rules=rest.trainable_rules(pruned_config, target.layers), settings=settings,
          built_dir=s.data.built_dir, split="train", indices=subset,
          transforms=[transform], directory=os.path.join(d, "rest"), mesh=s.mesh,
          rng=jax.random.fold_in(jax.random.key(config.seed), 1), progress=s.progress,
          log_path=os.path.join(d, "rest_metrics.jsonl"), trim=config.trim)
      after, after_s = common.evaluate_stage(s, pruned_model, retrained,
                                       os.path.join(d, "eval_rest.json"),
                                       stage="targets",
                                       desc=f"eval {target.name} retrained")
      speed, _ = stages.cached(os.path.join(d, "speed.json"),
                               lambda: speed_of(config, pruned_config, retrained),
                               depends_on=deps)

      model_dir, delta_dir = os.path.join(d, "model"), os.path.join(d, "delta")
      trainable = rest.trainable_params(retrained, pruned_config, target.layers)
      if is_main:
        saved_config = common.for_saving(pruned_config)
        checkpointing.save_model(model_dir, saved_config, retrained, overwrite=True,
                                 extra={"target": target.name, "base_sha256": base_sha})
        delta.save_delta(delta_dir, trainable=trainable, pruned_config=saved_config,
                         head_mask=sel.head_mask, ffn_mask=sel.ffn_mask,
                         base_sha256=base_sha, overwrite=True,
                         extra={"target": target.name, "layers": target.layers})
      n_trainable = int(sum(np.size(x) for x in jax.tree.leaves(trainable)))
      n_total = count_params(retrained)
      base_acc = s.base_eval["val_accuracy"]
      return {
          "target": target.name, "heuristic": target.heuristic, "value": target.value,
          "cost": p.cost, "round_to": p.round_to,
          "retrain_percent": target.percent, "retrain_layers": target.layers,
          "cfg_head": list(sel.cfg_head), "cfg_ffn": list(sel.cfg_ffn),
          "mmt_params": int(sel.mmt_params), "mmt_params_full": int(sel.full_params),
          "mmt_kept_fraction": sel.mmt_params / sel.full_params,
          "model_params": n_total, "model_params_full": count_params(s.base_params),
          "metric": next(iter(s.base_eval["val_metrics"])),
          "unpruned_val_metrics": s.base_eval["val_metrics"],
          "pruned_val_metrics": before["val_metrics"],
          "retrained_val_metrics": after["val_metrics"],
          "unpruned_val_accuracy": base_acc,
          "pruned_val_accuracy": before["val_accuracy"],
          "retrained_val_accuracy": after["val_accuracy"],
          # null when the unpruned model scores 0 (no ratio to report).
          "retention": after["val_accuracy"] / base_acc if base_acc else None,
          "rest_steps": rest_summary["steps"],
          "rest_examples": rest_summary["num_examples"],
          "trainable_params": n_trainable,
          "full_checkpoint_mb": 4 * n_total / 1e6,
          "delta_checkpoint_mb": 4 * n_trainable / 1e6,
          "full_checkpoint_disk_mb": checkpointing.directory_bytes(model_dir) / 1e6
                                     if is_main else None,
          "delta_checkpoint_disk_mb": checkpointing.directory_bytes(delta_dir) / 1e6
                                      if is_main else None,
          "speed": speed,
          "seconds": {"selection_surgery": round(select_seconds, 2),
                      "eval_pruned": before_s, "rest": rest_summary["seconds"],
                      "eval_retrained": after_s},
      }
    row, _ = stages.cached(os.path.join(d, "result.json"), compute_target,
                           depends_on=deps)
    row = {**row, "seconds": {**{k: round(v, 1) for k, v in times.items()},
                              **row["seconds"]}}
    rows.append(row)

  # ----------------------------------------------------------------------- tables
  unpruned = {"metrics": s.base_eval["val_metrics"], "speed": unpruned_speed,
              "cfg_head": list(s.base_config.mmt_heads),
              "cfg_ffn": list(s.base_config.mmt_ffn)}
  if is_main:
    atomic.write_text(s.path("results.md"), format_table(rows, unpruned))
    atomic.write_text(s.path("results.jsonl"), "".join(
        json.dumps(atomic.json_safe(row), allow_nan=False) + "\n" for row in rows))
  return {"rows": rows, "unpruned": unpruned}


STAGE_COLUMNS = (("data", "data"), ("base_model", "base model"),
                 ("base_eval", "eval unpruned"), ("tstar", "t*"),
                 ("importance", "importance"), ("pseudo_labels", "pseudo-labels"),
                 ("selection_surgery", "selection+surgery"), ("eval_pruned", "eval pruned"),
                 ("rest", "ReSt"), ("eval_retrained", "eval retrained"))
METRIC_LABELS = {"textvqa_accuracy": "TextVQA acc", "stvqa_accuracy": "ST-VQA acc",
                 "stvqa_anls": "ANLS"}


def _pct(x: Optional[float], digits: int = 2) -> str:
  return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else (
      f"{100 * x:.{digits}f}")


def format_table(rows: list[dict], unpruned: dict) -> str:
  """The final Markdown tables: results, measured speed, wall time per stage."""
  names = list(unpruned["metrics"])
  head = ["target", "MMT params kept", "FFN widths", "model params"]
  for n in names:
    label = METRIC_LABELS.get(n, n)
    head += [f"val {label} unpruned", "pruned", "retrained"]
  head += ["retention", "ReSt (%, k, steps)", "full ckpt MB", "delta MB"]
  lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
  for r in rows:
    cells = [r["target"], f"{r['mmt_params']:,} ({100 * r['mmt_kept_fraction']:.1f}%)",
             "/".join(map(str, r["cfg_ffn"])), f"{r['model_params']:,}"]
    for n in names:
      cells += [_pct(r["unpruned_val_metrics"][n]), _pct(r["pruned_val_metrics"][n]),
                _pct(r["retrained_val_metrics"][n])]
    cells += [_pct(r["retention"], 1) + ("%" if r["retention"] is not None else ""),
              f"{r['retrain_percent']:g}%, k={r['retrain_layers']}, {r['rest_steps']}",
              f"{r['full_checkpoint_mb']:.2f}", f"{r['delta_checkpoint_mb']:.3f}"]
    lines.append("| " + " | ".join(cells) + " |")
  if any(r["retention"] is None for r in rows):
    lines.append("\nretention n/a: the unpruned model scores 0 on val.")

  # Measured speed: greedy decoding, jitted and warm, medians (latency.greedy_speed).
  sp = unpruned["speed"]
  sizes = [int(b) for b in sp["latency_ms"]]
  b1, bn = sizes[0], sizes[-1]
  lines += ["", f"| measured speed ({sp['device']}) | heads | FFN widths | greedy ms "
            f"(batch {b1}) | speed-up | questions/s (batch {bn}) | speed-up | "
            "FLOPs ratio |", "|---|---|---|---|---|---|---|---|"]

  def speed_row(name, heads, ffn, x):
    lat, thr = _get(x["latency_ms"], b1), _get(x["throughput_qps"], bn)
    f0, f = _get(sp["xla_flops"], bn), _get(x["xla_flops"], bn)
    lat0, thr0 = _get(sp["latency_ms"], b1), _get(sp["throughput_qps"], bn)
    ratio = f"{f0 / f:.2f}x" if f0 and f else "-"
    return (f"| {name} | {'/'.join(map(str, heads))} | {'/'.join(map(str, ffn))} | "
            f"{lat:.2f} | {lat0 / lat:.2f}x | {thr:.1f} | {thr / thr0:.2f}x | {ratio} |")
  lines.append(speed_row("unpruned", unpruned["cfg_head"], unpruned["cfg_ffn"], sp))
  for r in rows:
    lines.append(speed_row(r["target"], r["cfg_head"], r["cfg_ffn"], r["speed"]))

  lines += ["", "| wall time (s) | " + " | ".join(c for _, c in STAGE_COLUMNS) + " |",
            "|---" * (len(STAGE_COLUMNS) + 1) + "|"]
  for r in rows:
    s = r["seconds"]
    lines.append(f"| {r['target']} | " + " | ".join(
        f"{s[k]:.1f}" if s.get(k) is not None else "-" for k, _ in STAGE_COLUMNS)
        + " |")
  return "\n".join(lines) + "\n"


def _get(d: dict, key: int) -> Any:
  """A value keyed by an int, also after a JSON round trip (keys become strings)."""
  return d[key] if key in d else d[str(key)]
