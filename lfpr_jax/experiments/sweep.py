"""The comparison the paper makes, as one resumable sweep (docs/LFPR.md §7-9).

    python -m lfpr_jax.main --config=configs/sweep_synthetic.py --workdir=DIR

A grid of importance criteria x restorations x costs x constraints:

* criteria: `lfpr` (LFPR's faithful per-batch score Σ_b G_b²), `lfpr_ps` (LFPR's
  per-sample score Σ_i g_i², docs/LFPR.md §3.3, from the same scoring pass), `l1`,
  `alg`, `fisher` (`owo` is a named slot without a definition);
* restorations: `none`, `rest` (ReSt on pseudo-labels), `finetune` (full fine-tuning
  with labels), `kwon` (Kwon et al.'s retraining-free mask rearrangement with the
  criterion's per-batch gradients and mask tuning on ground-truth decoder inputs) and
  `kwon_lf` (its label-free variant, `kwon.retraining_free_label_free`: the
  rearrangement uses LFPR's per-batch gradients, the tuning batches carry no answer
  field and are fed the unpruned model's greedy decoder inputs). `kwon_lf` cells exist
  only for label-free criteria (`lfpr`, `lfpr_ps`, `l1`): with `alg` or `fisher` the
  ranking itself reads answers, so those cells are left out of the grid;
* costs (`sweep.costs`): the constraint is the kept fraction of the MMT parameters
  ("params") or of its MACs ("flops", Kwon's constraint: the rows then answer "the best
  model at a given speed");
* constraints: kept fractions.

Shared stages (data, base model, t*, scores per criterion, pseudo-labels) and every
cell are cached in the workdir, so an interrupted sweep resumes, and a grown or
narrowed grid (other constraints, restorations, costs or criteria) reuses every cell
already computed (a cell depends on the sweep's settings, not on the grid). Output in
`DIR/sweep/`: `results.md` and `results.csv` shaped like the paper's table (method,
#params, MACs, val accuracy, device hours, full and delta checkpoint size),
`accuracy_vs_params.png` (a panel per cost and restoration, a line per criterion) and
`metadata.json` (config, versions, devices); with several seeds also `summary.md`
(method x constraint, mean ± std, best and beyond-spread marks) and `per_seed.csv`.

**Seeds** (`sweep.seeds` = n > 1): seed i runs the whole sweep above in
`DIR/seed_<i>/` with `seed` and `data.synthetic.seed` shifted by i (its own dataset and
base model; `config_for_seed`), then `DIR/sweep/` gets the aggregate: per cell the mean
± sample standard deviation over the seeds, and per (cost, constraint) the gap of every
method to the best mean with the rule of `mark_gaps` (the gap exceeds the spread when
it is larger than the sum of the two standard deviations), plus `per_seed.csv`.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import platform
import shutil
import time
from collections.abc import Mapping, Sequence
from typing import Any, Optional

from absl import logging
import jax
import ml_collections
import numpy as np

from lfpr_jax import atomic
from lfpr_jax.experiments import common, config_checks, stages
from lfpr_jax.models.batch import MODEL_INPUTS, STEP_FIELDS
from lfpr_jax.models.params import count_params
from lfpr_jax.models.tap import TAP
from lfpr_jax.pruning import (criteria, kwon, pseudo_labels, rest, scoring, selection,
                              surgery)
from lfpr_jax.training import loop

# The grid's coordinates: a cell's name carries its own, so growing or shrinking the
# grid (another constraint, restoration, cost or criterion) reuses every computed cell.
GRID_KEYS = ("sweep.criteria", "sweep.restorations", "sweep.constraints", "sweep.costs",
             "sweep.finetune_costs", "sweep.seeds")
MUTABLE_KEYS = ("prune.constraints", "prune.percentiles", "progress") + GRID_KEYS
# Keys a cell reads only through its restoration: each cell records those of its own
# (`cell_depends_on`), so retuning ReSt's schedule at one constraint recomputes the
# ReSt cells at that constraint and nothing else.
RESTORATION_KEYS = ("rest", "sweep.finetune", "sweep.kwon_tune_samples")
STAGES = (
    stages.Stage("sweep scores", ("sweep/scores/*",),
                 ("prune", "sweep.alg_normalize_by_layer"), ("t*",)),
    stages.Stage("sweep cells", ("sweep/cells/*", "sweep/results.*", "sweep/summary.md",
                                 "sweep/accuracy_vs_params.png", "sweep/metadata.json"),
                 ("rest", "eval", "sweep"), ("sweep scores", "pseudo-labels",
                                             "unpruned evaluation"),
                 self_checked=RESTORATION_KEYS),
)


PER_SAMPLE = "lfpr_ps"   # LFPR's per-sample score: a view of the `lfpr` scores


def base_criterion(name: str) -> str:
  """The `criteria` registry name a sweep criterion is computed with."""
  return "lfpr" if name == PER_SAMPLE else name


def is_labelled(name: str) -> bool:
  """Whether a sweep criterion's scores read ground-truth answers."""
  return criteria.REGISTRY[base_criterion(name)].needs_labels


@dataclasses.dataclass(frozen=True)
class Cell:
  criterion: str
  restoration: str
  constraint: float
  cost: str = "params"

  @property
  def name(self) -> str:
    return f"{self.criterion}-{self.restoration}-{self.cost}-{self.constraint:g}"

  @property
  def method(self) -> str:
    return f"{self.criterion} + {self.restoration}"


def cells_of(config: ml_collections.ConfigDict) -> list[Cell]:
  """The grid (the config is validated by `config_checks.validate` first).

  `kwon_lf` is paired only with label-free criteria (see the module docstring), and
  full fine-tuning (an epoch over all the data per cell, the costliest baseline) runs
  only under the budgets `sweep.finetune_costs`.
  """
  sw = config.sweep
  return [Cell(c, r, float(k), cost) for cost in sw.costs for c in sw.criteria
          for r in sw.restorations for k in sw.constraints
          if not (r == "kwon_lf" and is_labelled(c))
          and not (r == "finetune" and cost not in sw.finetune_costs)]


def label_batches(s: common.Setup, indices: np.ndarray, *, trim: bool = False
                  ) -> list:
  """Global batches of labelled training examples (labelled criteria, Kwon tuning);
  `trim`: `(batch, trimmed config, TrimInfo)` triples (`common.batches`)."""
  return list(common.batches(s, indices=indices, local_batch=s.score_local,
                             fields=STEP_FIELDS + ("has_answers",), progress=False,
                             trim=trim))


def input_batches(s: common.Setup, indices: np.ndarray) -> list[dict]:
  """Global batches of the model inputs only: no answer field is even loaded."""
  return list(common.batches(s, indices=indices, local_batch=s.score_local,
                             fields=MODEL_INPUTS, progress=False))


def criterion_scores(name: str, s: common.Setup, t_star: int
                     ) -> tuple[scoring.Scores, float]:
  """Scores of one criterion on the sample set (cached); returns (scores, seconds).

  `lfpr_ps` is the per-sample view of the cached `lfpr` scores (same scoring pass and
  seconds, the same per-batch gradients G_b for Kwon's rearrangement).
  """
  if name == PER_SAMPLE:
    scores, seconds = criterion_scores("lfpr", s, t_star)
    head, ffn = scores.scores(per_sample=True)
    return dataclasses.replace(scores, head=head, ffn=ffn,
                               meta={**scores.meta, "per_sample": True}), seconds
  config, p = s.config, s.config.prune
  options: dict[str, Any] = {}
  if name == "lfpr":
    options.update(t_star=t_star, bos_index=s.data.vocab.bos_idx, dropout=p.dropout)
  if name == "alg":
    options.update(normalize_by_layer=config.sweep.alg_normalize_by_layer)
  crit = criteria.get_criterion(name, **options)

  def compute():
    data = label_batches(s, s.samples, trim=config.trim) if crit.needs_data else None
    return scoring.compute(crit, s.model, s.rep_params, data, mesh=s.mesh,
                           group_size=p.group_size, seed=config.seed,
                           trimmed=config.trim)
  return stages.cached(os.path.join(s.workdir, "sweep", "scores", f"{name}.npz"),
                       compute, depends_on={**s.depends_on("sweep scores"),
                                            "criterion": name},
                       save=lambda path, v: v.save(path), load=scoring.Scores.load)


def _restore(cell: Cell, s: common.Setup, sel, scores, lfpr_scores, labels,
             directory: str) -> tuple[Any, Any, dict, Optional[dict]]:
  """Runs the cell's restoration; returns (params, config, info, trainable tree)."""
  config = s.config
  params, pconfig = surgery.prune(s.base_params, s.base_config, sel.head_mask,
                                  sel.ffn_mask)
  if cell.restoration == "none":
    return params, pconfig, {}, None
  if cell.restoration in ("kwon", "kwon_lf"):
    sw = config.sweep
    tune_idx = s.samples[:sw.kwon_tune_samples]
    # Same search as the other rows (strict budget: every row meets it).
    kw: dict[str, Any] = dict(kind=cell.cost, strict_budget=sw.strict_budget, tune=True)
    if cell.cost == "latency":   # Kwon's search over the measured latency table
      kw = dict(tune=True, select=lambda h, f, c: common.select_budget(
          s, h, f, c, cost="latency", strict_budget=sw.strict_budget))
    if cell.restoration == "kwon":
      result = kwon.retraining_free(
          s.model, s.base_params, scores, cell.constraint,
          batches=label_batches(s, tune_idx), rearrange=scores.head_grads is not None,
          **kw)
    else:
      result = kwon.retraining_free_label_free(
          s.model, s.base_params, scores, cell.constraint,
          bos_index=s.data.vocab.bos_idx, batches=input_batches(s, tune_idx),
          rearrange_grads=lfpr_scores, **kw)
    info = {"rearranged": result.rearranged, "label_free": result.label_free,
            "tuning_stopped": None if result.tuning is None else
            str(result.tuning.stopped)}
    return result.params, result.config, info, None
  r = config.rest
  if cell.restoration == "rest":
    percent, layers = {float(c): (pct, k) for c, pct, k in r.schedule}[cell.constraint]
    transforms = [pseudo_labels.PseudoLabelTargets(
        labels, s.data.vocab, decode_steps=pconfig.decode_steps,
        ocr_slots=pconfig.ocr_max)]
    settings = rest.RestSettings.from_config(r, percent=percent, layers=layers)
    rules = rest.trainable_rules(pconfig, layers)
  else:  # finetune: the config's rules (every parameter), ground-truth labels (§8.1)
    f = config.sweep.finetune
    percent, layers, transforms = f.percent, pconfig.mmt_layers, []
    settings = rest.RestSettings.from_config(r, percent=percent, layers=layers,
                                             lr=f.lr, mask_lr=f.lr)
    rules = [tuple(rule) for rule in f.trainable]
  subset = pseudo_labels.subset_indices(s.num_train, percent, r.subset_seed)
  retrained, summary = loop.train_subset(
      model_config=pconfig, params=params, rules=rules, settings=settings,
      built_dir=s.data.built_dir, split="train", indices=subset,
      transforms=transforms, directory=os.path.join(directory, "ckpt_run"),
      mesh=s.mesh, rng=jax.random.fold_in(jax.random.key(config.seed), 1),
      progress=s.progress, trim=config.trim)
  trainable = (rest.trainable_params(retrained, pconfig, layers)
               if cell.restoration == "rest" else retrained)
  return retrained, pconfig, {"steps": summary["steps"], "percent": percent,
                              "layers": layers}, trainable


def mmt_macs(config) -> int:
  """Kwon's MACs of the MMT layers of `config` (`selection.flops_costs`)."""
  costs = selection.flops_costs(config)
  return sum(costs.layer_cost(h, f) for h, f in zip(config.mmt_heads, config.mmt_ffn))


def cell_depends_on(stage_values: Mapping[str, Any], cell: Cell) -> dict[str, Any]:
  """What one cell's result is a function of.

  Args:
    stage_values: the "sweep cells" stage's config values (`Setup.depends_on`).
    cell: the cell (its name is added: it carries the grid's coordinates).

  Returns:
    The stage's values without the keys a run may change freely (`MUTABLE_KEYS`:
    the grid's lists, the main command's targets) and without the
    restoration keys (`RESTORATION_KEYS`) other than the cell's own: a ReSt cell reads
    `rest.*` with only its constraint's schedule entry (`rest.schedule@<c>`), full
    fine-tuning `sweep.finetune.*` and the `rest.*` settings it shares (batch size,
    clipping, seeds; not the schedules or rates), Kwon's restorations
    `sweep.kwon_tune_samples`, `none` none of them.
  """
  base = {k: v for k, v in stage_values.items()
          if not stages.under(k, MUTABLE_KEYS + RESTORATION_KEYS)}
  own: dict[str, Any] = {}
  rest_keys = {k: v for k, v in stage_values.items() if stages.under(k, ("rest",))
               and k not in ("rest.schedule", "rest.thre_schedule")}
  if cell.restoration == "rest":
    entry = {float(c): [pct, k] for c, pct, k in stage_values["rest.schedule"]}
    own = {**rest_keys, f"rest.schedule@{cell.constraint:g}": entry.get(cell.constraint)}
  elif cell.restoration == "finetune":
    own = {**{k: v for k, v in rest_keys.items() if k not in ("rest.lr", "rest.mask_lr")},
           **stages.select_keys(stage_values, ("sweep.finetune",))}
  elif cell.restoration in ("kwon", "kwon_lf"):
    own = stages.select_keys(stage_values, ("sweep.kwon_tune_samples",))
  return {**base, **own, "cell": cell.name}


def run_cell(cell: Cell, s: common.Setup, scores: Mapping[str, tuple], labels, *,
             invalidate: bool = False) -> dict:
  """Selection under the cell's cost, restoration, evaluation of one cell (cached).

  Args:
    cell: the grid cell.
    s: the setup.
    scores: criterion name -> (Scores, seconds) of every criterion the grid uses
      (and `lfpr` when a `kwon_lf` cell rearranges with its gradients).
    labels: the pseudo-labels (ReSt), or None.
    invalidate: recompute the cell when its stored result disagrees with
      `cell_depends_on` (its whole directory, ReSt checkpoints included, is removed).
  """
  config = s.config
  directory = os.path.join(s.workdir, "sweep", "cells", cell.name)
  result_path = os.path.join(directory, "result.json")
  depends_on = cell_depends_on(s.depends_on("sweep cells"), cell)
  stale = stages.stale_reason(result_path, depends_on)
  if stale and not invalidate:   # the whole cell goes: its ReSt checkpoints too
    raise stages.StageError(f"{result_path} {stale}: delete {directory} to recompute "
                            "the cell, or rerun with --invalidate.")
  if stale and jax.process_index() == 0:
    logging.warning("config changed: removing %s (its result %s)", directory, stale)
    shutil.rmtree(directory)
  crit_scores, score_seconds = scores[cell.criterion]
  lfpr_scores = None
  if cell.restoration == "kwon_lf":
    lfpr_scores, lfpr_seconds = scores["lfpr"]
    if base_criterion(cell.criterion) != "lfpr":   # a second scoring pass was needed
      score_seconds += lfpr_seconds

  def compute():
    os.makedirs(directory, exist_ok=True)
    t0 = time.time()
    sel = common.select_budget(s, crit_scores.head, crit_scores.ffn, cell.constraint,
                               cost=cell.cost, strict_budget=config.sweep.strict_budget,
                               round_to=config.prune.round_to)
    params, pconfig, info, trainable = _restore(cell, s, sel, crit_scores, lfpr_scores,
                                                labels, directory)
    restore_seconds = time.time() - t0
    acc = common.evaluate(TAP(pconfig), params, s, desc=f"eval {cell.name}")
    n_full = count_params(params)
    full_mb = 4 * n_full / 1e6
    if trainable is not None and cell.restoration == "rest":
      delta_mb = 4 * sum(np.size(x) for x in jax.tree.leaves(trainable)) / 1e6
    elif cell.restoration == "none":
      delta_mb = (sel.head_mask.size + sel.ffn_mask.size) / 8 / 1e6  # selection bits
    else:
      delta_mb = full_mb  # every weight changed (fine-tuning) or folded masks (Kwon)
    mmt = selection.mmt_params(pconfig)
    return {"cell": cell.name, "method": cell.method, "criterion": cell.criterion,
            "restoration": cell.restoration, "cost": cell.cost,
            "constraint": cell.constraint,
            "mmt_params": int(mmt), "mmt_kept_fraction": mmt / sel.full_params,
            "mmt_macs_fraction": mmt_macs(pconfig) / mmt_macs(s.base_config),
            "model_params": int(n_full), "val_accuracy": acc["val_accuracy"],
            "val_metrics": acc["val_metrics"],
            "unpruned_val_accuracy": s.base_eval["val_accuracy"],
            "device_hours": (score_seconds + restore_seconds) * jax.device_count()
                            / 3600,
            "score_seconds": score_seconds, "restore_seconds": round(restore_seconds, 1),
            "full_checkpoint_mb": full_mb, "delta_checkpoint_mb": delta_mb,
            "cfg_head": list(pconfig.mmt_heads), "cfg_ffn": list(pconfig.mmt_ffn),
            **info}
  row, _ = stages.cached(result_path, compute, depends_on=depends_on)
  return row


# Numeric row fields averaged over seeds.
AGG_FIELDS = ("mmt_params", "mmt_kept_fraction", "mmt_macs_fraction", "model_params",
              "val_accuracy", "unpruned_val_accuracy", "device_hours",
              "full_checkpoint_mb", "delta_checkpoint_mb")
CELL_KEYS = ("cost", "constraint", "criterion", "restoration")


def _row_order(r: Mapping[str, Any]) -> tuple:
  return (config_checks.COSTS.index(r["cost"]) if r["cost"] in config_checks.COSTS
          else len(config_checks.COSTS), r["cost"], r["constraint"], r["method"])


def format_markdown(rows: list[dict], unpruned: float) -> str:
  """The table of one sweep (one seed): a row per cell, by cost and constraint."""
  lines = [f"Unpruned val accuracy: {100 * unpruned:.2f}", "",
           "| Method | cost | constraint | #Params (MMT) | MACs (MMT) | Val acc | "
           "Device hours | File size (MB) | Delta (MB) |",
           "|---|---|---|---|---|---|---|---|---|"]
  for r in sorted(rows, key=_row_order):
    lines.append(f"| {r['method']} | {r['cost']} | {r['constraint']:g} "
                 f"| {r['mmt_params'] / 1e6:.3f}M ({100 * r['mmt_kept_fraction']:.1f}%) "
                 f"| {100 * r['mmt_macs_fraction']:.1f}% | {100 * r['val_accuracy']:.2f} "
                 f"| {r['device_hours']:.4f} | {r['full_checkpoint_mb']:.2f} "
                 f"| {r['delta_checkpoint_mb']:.3f} |")
  return "\n".join(lines) + "\n"


CSV_KEYS = ("method", "criterion", "restoration", "cost", "constraint", "mmt_params",
            "mmt_kept_fraction", "mmt_macs_fraction", "model_params", "val_accuracy",
            "unpruned_val_accuracy", "device_hours", "full_checkpoint_mb",
            "delta_checkpoint_mb")


def format_csv(rows: list[dict], keys: Sequence[str] = CSV_KEYS) -> str:
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=list(keys), extrasaction="ignore",
                          lineterminator="\n")
  writer.writeheader()
  writer.writerows(rows)
  return buf.getvalue()


# ------------------------------------------------------------------ seeds: aggregate


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (ddof 1; 0 for a single value)."""
  a = np.asarray(values, np.float64)
  if a.size == 0:
    raise ValueError("mean_std of no values.")
  return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def aggregate(per_seed: Sequence[Sequence[Mapping[str, Any]]]) -> list[dict]:
  """Mean ± sample std over seeds of every cell, then `mark_gaps`.

  Args:
    per_seed: the rows of each seed's sweep (`run` of one seed); a cell is matched
      across seeds by (cost, constraint, criterion, restoration).

  Returns:
    One row per cell: `method`, `criterion`, `restoration`, `cost`, `constraint`,
    `seeds` (how many seeds have the cell), `<field>_mean` and `<field>_std` of every
    `AGG_FIELDS` entry, and the `mark_gaps` columns; sorted by cost, constraint,
    method.

  Raises:
    ValueError: a row lacks a field, or a seed has the same cell twice.
  """
  groups: dict[tuple, list[Mapping[str, Any]]] = {}
  for i, rows in enumerate(per_seed):
    seen = set()
    for r in rows:
      missing = [k for k in CELL_KEYS + AGG_FIELDS if k not in r]
      if missing:
        raise ValueError(f"seed {i}: a sweep row lacks {missing}.")
      key = (r["cost"], float(r["constraint"]), r["criterion"], r["restoration"])
      if key in seen:
        raise ValueError(f"seed {i} has the cell {key} twice.")
      seen.add(key)
      groups.setdefault(key, []).append(r)
  out = []
  for (cost, constraint, crit, rest_name), rs in groups.items():
    row = {"method": f"{crit} + {rest_name}", "criterion": crit,
           "restoration": rest_name, "cost": cost, "constraint": constraint,
           "seeds": len(rs)}
    for f in AGG_FIELDS:
      row[f + "_mean"], row[f + "_std"] = mean_std([r[f] for r in rs])
    out.append(row)
  return sorted(mark_gaps(out), key=_row_order)


def mark_gaps(rows: Sequence[Mapping[str, Any]]) -> list[dict]:
  """The gap of every method to the best one of the same cost and constraint.

  The rule: in each (cost, constraint) the best row has the highest mean val accuracy
  (ties: the first method by name). Another row's `gap_to_best` = best mean − its mean
  (>= 0), and the difference exceeds the spread (`beyond_spread` True) when the gap is
  larger than the sum of the two sample standard deviations, i.e. the intervals
  mean ± std do not overlap; otherwise it is within the seed-to-seed noise. With fewer
  than 2 seeds on either side there is no spread to compare with: `beyond_spread` is
  None.

  Returns:
    Copies of `rows` (aggregated: `val_accuracy_mean`, `val_accuracy_std`, `seeds`)
    with `is_best`, `gap_to_best` and `beyond_spread`.
  """
  out = [dict(r) for r in rows]
  by_constraint: dict[tuple, list[dict]] = {}
  for r in out:
    by_constraint.setdefault((r["cost"], float(r["constraint"])), []).append(r)
  for group in by_constraint.values():
    best = max(sorted(group, key=lambda r: r["method"]),
               key=lambda r: r["val_accuracy_mean"])
    for r in group:
      r["is_best"] = r is best
      r["gap_to_best"] = best["val_accuracy_mean"] - r["val_accuracy_mean"]
      if r is best:
        r["beyond_spread"] = False
      elif min(r["seeds"], best["seeds"]) < 2:
        r["beyond_spread"] = None
      else:
        r["beyond_spread"] = bool(
            r["gap_to_best"] > r["val_accuracy_std"] + best["val_accuracy_std"])
  return out


def _gap_text(r: Mapping[str, Any]) -> str:
  if r["is_best"]:
    return "best"
  gap = f"-{100 * r['gap_to_best']:.2f}" if r["gap_to_best"] > 0 else "0.00"
  if r["beyond_spread"] is None:
    return gap + " (one seed: no spread)"
  return gap + (" (beyond spread)" if r["beyond_spread"] else " (within spread)")


def format_aggregate_markdown(rows: Sequence[Mapping[str, Any]],
                              num_seeds: int) -> str:
  """The seeded table: mean ± std per cell and the gap to the best method."""
  # Every cell of a seed shares its unpruned accuracy: any row holds its mean ± std.
  unpruned = (f"{100 * rows[0]['unpruned_val_accuracy_mean']:.2f} ± "
              f"{100 * rows[0]['unpruned_val_accuracy_std']:.2f}") if rows else "n/a"
  lines = [f"Seeds: {num_seeds} (seed_0 ... seed_{num_seeds - 1}); unpruned val "
           f"accuracy: {unpruned}", "",
           "Cells: mean ± sample standard deviation over the seeds. \"vs best\": the "
           "gap of the mean val accuracy to the best method of the same cost and "
           "constraint, \"beyond spread\" when it exceeds the sum of the two standard "
           "deviations (else within the seed-to-seed noise).", "",
           "| Method | cost | constraint | #Params (MMT) | MACs (MMT) | Val acc | "
           "vs best | Device hours | File size (MB) | Delta (MB) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for r in sorted(rows, key=_row_order):
    lines.append(
        f"| {r['method']} | {r['cost']} | {r['constraint']:g} "
        f"| {r['mmt_params_mean'] / 1e6:.3f}M ± {r['mmt_params_std'] / 1e6:.3f}M "
        f"({100 * r['mmt_kept_fraction_mean']:.1f}%) "
        f"| {100 * r['mmt_macs_fraction_mean']:.1f}% "
        f"| {100 * r['val_accuracy_mean']:.2f} ± {100 * r['val_accuracy_std']:.2f} "
        f"| {_gap_text(r)} | {r['device_hours_mean']:.4f} "
        f"| {r['full_checkpoint_mb_mean']:.2f} | {r['delta_checkpoint_mb_mean']:.3f} |")
  return "\n".join(lines) + "\n"


def _restoration_order(name: str) -> tuple:
  """Restorations in `config_checks.RESTORATIONS` order (none, rest, ...), others last."""
  known = config_checks.RESTORATIONS
  return (known.index(name) if name in known else len(known), name)


def format_summary_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
  """The compact view of the aggregate: per cost, one row per method and one column per
  constraint, each cell the mean ± std val accuracy (%); **bold** the best method of
  the column, † a gap to it beyond the spread (`mark_gaps`), "(1 seed)" no spread."""
  lines: list[str] = []
  for cost in dict.fromkeys(r["cost"] for r in rows):
    group = [r for r in rows if r["cost"] == cost]
    constraints = sorted({float(r["constraint"]) for r in group})
    cells = {(r["method"], float(r["constraint"])): r for r in group}
    restoration = {r["method"]: r["restoration"] for r in group}
    methods = sorted(restoration,   # grouped by restoration, in its order
                     key=lambda m: (_restoration_order(restoration[m]), m))
    lines += [f"Budget: {cost} (kept fraction of the MMT's {cost})", "",
              "| method | " + " | ".join(f"{100 * c:g}%" for c in constraints) + " |",
              "|---|" + "---|" * len(constraints)]
    for m in methods:
      out = []
      for c in constraints:
        r = cells.get((m, c))
        if r is None:
          out.append("–")
          continue
        text = f"{100 * r['val_accuracy_mean']:.2f} ± {100 * r['val_accuracy_std']:.2f}"
        if r["is_best"]:
          text = f"**{text}**"
        elif r["beyond_spread"]:
          text += " †"
        elif r["beyond_spread"] is None:
          text += " (1 seed)"
        out.append(text)
      lines.append(f"| {m} | " + " | ".join(out) + " |")
    lines.append("")
  return "\n".join(lines)


AGG_CSV_KEYS = (("method", "criterion", "restoration", "cost", "constraint", "seeds")
                + tuple(f"{f}_{m}" for f in AGG_FIELDS for m in ("mean", "std"))
                + ("is_best", "gap_to_best", "beyond_spread"))


def plot(rows: Sequence[Mapping[str, Any]], unpruned: float, path: str) -> None:
  """Mean val accuracy ± std vs the kept MMT size (PNG, atomic): a row of panels per
  cost, a panel per restoration, a line per criterion (one colour per criterion
  throughout, so panels compare at a glance; shared y axis).

  Args:
    rows: aggregated rows (`aggregate`; one seed gives zero error bars).
    unpruned: the unpruned model's (mean) val accuracy, a dotted line.
    path: where the PNG goes.
  """
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  costs = sorted({r["cost"] for r in rows},
                 key=lambda c: _row_order({"cost": c, "constraint": 0, "method": ""}))
  restorations = sorted({r["restoration"] for r in rows}, key=_restoration_order)
  criteria_names = list(dict.fromkeys(sorted(r["criterion"] for r in rows)))
  colours = {c: plt.get_cmap("tab10")(i % 10) for i, c in enumerate(criteria_names)}
  nrows, ncols = max(len(costs), 1), max(len(restorations), 1)
  fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 3.4 * nrows),
                           squeeze=False, sharey=True)
  for i, cost in enumerate(costs):
    for j, restoration in enumerate(restorations):
      ax = axes[i][j]
      if not any(r["cost"] == cost and r["restoration"] == restoration for r in rows):
        ax.axis("off")   # e.g. full fine-tuning outside `sweep.finetune_costs`
        ax.text(0.5, 0.5, f"+ {restoration} ({cost}): not run", ha="center",
                va="center", fontsize=9, color="0.4", transform=ax.transAxes)
        continue
      for criterion in criteria_names:
        pts = sorted((r["mmt_params_mean"] / 1e6 if cost == "params"
                      else 100 * r["mmt_macs_fraction_mean"],
                      100 * r["val_accuracy_mean"], 100 * r["val_accuracy_std"])
                     for r in rows if r["cost"] == cost and r["criterion"] == criterion
                     and r["restoration"] == restoration)
        if pts:
          ax.errorbar([p[0] for p in pts], [p[1] for p in pts],
                      yerr=[p[2] for p in pts], marker="o", ms=3, capsize=2,
                      color=colours[criterion], label=criterion)
      ax.axhline(100 * unpruned, color="k", lw=0.8, ls=":", label="unpruned")
      ax.set_title(f"+ {restoration} ({cost})", fontsize=9)
      ax.set_xlabel("kept MMT parameters (M)" if cost == "params"
                    else "kept MMT MACs (%)", fontsize=8)
      if j == 0:
        ax.set_ylabel("val accuracy (%)")
      ax.grid(alpha=0.3)
  handles = [plt.Line2D([], [], color=colours[c], marker="o", label=c)
             for c in criteria_names]
  handles.append(plt.Line2D([], [], color="k", lw=0.8, ls=":", label="unpruned"))
  fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8,
             frameon=False)
  fig.tight_layout(rect=(0, 0.07, 1, 1))
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=120)
  plt.close(fig)
  os.replace(tmp, path)


def metadata(config: ml_collections.ConfigDict) -> dict:
  import importlib.metadata as md  # noqa: PLC0415
  versions = {}
  for pkg in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy"):
    try:
      versions[pkg] = md.version(pkg)
    except md.PackageNotFoundError:
      versions[pkg] = None
  return {"config": json.loads(config.to_json_best_effort()), "versions": versions,
          "python": platform.python_version(), "platform": platform.platform(),
          "processor": platform.processor(),
          "devices": [str(d) for d in jax.devices()],
          "device_kind": jax.devices()[0].device_kind,
          "process_count": jax.process_count()}


def config_for_seed(config: ml_collections.ConfigDict, index: int
                    ) -> ml_collections.ConfigDict:
  """The one-seed sweep of seed index `index`: a copy with `seed` and
  `data.synthetic.seed` shifted by `index` (its own dataset and base model) and
  `sweep.seeds` = 1; `config` is left untouched."""
  if not isinstance(index, int) or index < 0:
    raise ValueError(f"seed index must be an integer >= 0, got {index!r}.")
  c = config.copy_and_resolve_references()
  c.seed = config.seed + index
  c.data.synthetic.seed = config.data.synthetic.seed + index
  c.sweep.seeds = 1
  return c


def seed_workdir(workdir: str, index: int) -> str:
  return os.path.join(workdir, f"seed_{index}")


def run(config: ml_collections.ConfigDict, workdir: str, *,
        invalidate: bool = False) -> list[dict]:
  """Runs (or resumes) the sweep; writes the table, CSV, plot and metadata.

  With `sweep.seeds` = n > 1 each seed's sweep runs in `<workdir>/seed_<i>/` (this
  function on `config_for_seed(config, i)`) and `<workdir>/sweep/` gets the
  aggregate (see the module docstring).

  Returns:
    The table's rows: one per cell (one seed) or the aggregated rows (several).
  """
  if config.sweep.seeds > 1:
    return run_seeds(config, workdir, invalidate=invalidate)
  # ------------------------------------------------------------ setup (validated)
  s = common.setup(config, workdir, STAGES, ignore=MUTABLE_KEYS, invalidate=invalidate)
  cells = cells_of(config)
  sweep_dir = os.path.join(workdir, "sweep")
  needs_labels = "rest" in config.sweep.restorations

  # --------------------------------------------------- shared stages and scores
  t_star, _ = common.tstar_stage(s)
  labels = common.labels_stage(s)[0] if needs_labels else None
  names = list(config.sweep.criteria)
  if any(c.restoration == "kwon_lf" for c in cells):
    names.append("lfpr")             # its per-batch gradients drive the rearrangement
  scores = {name: criterion_scores(name, s, t_star) for name in dict.fromkeys(names)}

  if "latency" in config.sweep.costs:
    common.latency_table(s)   # timed here, not inside the first latency cell's time
  # ------------------------------------------------------------------------ cells
  rows = [run_cell(cell, s, scores, labels, invalidate=invalidate) for cell in cells]

  # ---------------------------------------------------------------------- outputs
  if jax.process_index() == 0:
    unpruned = s.base_eval["val_accuracy"]
    atomic.write_text(os.path.join(sweep_dir, "results.md"),
                      format_markdown(rows, unpruned))
    atomic.write_text(os.path.join(sweep_dir, "results.csv"), format_csv(rows))
    atomic.write_json(os.path.join(sweep_dir, "metadata.json"), metadata(config))
    plot(aggregate([rows]), unpruned, os.path.join(sweep_dir, "accuracy_vs_params.png"))
  return rows


def run_seeds(config: ml_collections.ConfigDict, workdir: str, *,
              invalidate: bool = False) -> list[dict]:
  """Every seed's sweep in its sub-workdir, then the aggregate in `<workdir>/sweep/`."""
  config_checks.validate(config)       # before any seed writes anything
  n = config.sweep.seeds
  per_seed = [run(config_for_seed(config, i), seed_workdir(workdir, i),
                  invalidate=invalidate) for i in range(n)]
  rows = aggregate(per_seed)
  if jax.process_index() == 0:
    sweep_dir = os.path.join(workdir, "sweep")
    os.makedirs(sweep_dir, exist_ok=True)
    atomic.write_text(os.path.join(sweep_dir, "results.md"),
                      format_aggregate_markdown(rows, n))
    atomic.write_text(os.path.join(sweep_dir, "summary.md"), format_summary_markdown(rows))
    atomic.write_text(os.path.join(sweep_dir, "results.csv"),
                      format_csv(rows, AGG_CSV_KEYS))
    atomic.write_text(os.path.join(sweep_dir, "per_seed.csv"), format_csv(
        [{**r, "seed": i} for i, seed_rows in enumerate(per_seed) for r in seed_rows],
        ("seed",) + CSV_KEYS))
    meta = metadata(config)
    meta["seeds"] = [{"index": i, "seed": config.seed + i,
                      "data_seed": config.data.synthetic.seed + i,
                      "workdir": seed_workdir(workdir, i)} for i in range(n)]
    atomic.write_json(os.path.join(sweep_dir, "metadata.json"), meta)
    unpruned = float(np.mean([seed_rows[0]["unpruned_val_accuracy"]
                              for seed_rows in per_seed if seed_rows]))
    plot(rows, unpruned, os.path.join(sweep_dir, "accuracy_vs_params.png"))
  return rows
