"""The comparison the paper makes, as one resumable sweep (LFPR.md §7-9).

    python -m lfpr_jax.experiments.sweep --config=configs/sweep_synthetic.py --workdir=DIR

A grid of importance criteria (`lfpr`, `l1`, `alg`, `fisher`; `owo` is a named slot
without a definition) x restorations (`none`, `rest` = ReSt on pseudo-labels,
`finetune` = full fine-tuning with labels, `kwon` = Kwon et al.'s retraining-free mask
rearrangement and tuning) x constraints (kept fraction of the MMT parameters, or of
its FLOPs with `sweep.cost = "flops"`). Shared stages (data, base model, t*, scores per
criterion, pseudo-labels) and every cell are cached in the workdir, so an interrupted
sweep resumes. Output in `DIR/sweep/`: `results.md` and `results.csv` shaped like the
paper's table (method, #params, val accuracy, device hours, full and delta checkpoint
size), `accuracy_vs_params.png` (one line per method) and `metadata.json` (config,
versions, devices).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import platform
import time
from typing import Any, Optional

from absl import logging
import jax
import ml_collections
import numpy as np

from lfpr_jax.pruning import criteria
from lfpr_jax.pruning import kwon
from lfpr_jax.experiments import lfpr
from lfpr_jax.pruning import pseudo_labels
from lfpr_jax.pruning import rest
from lfpr_jax.pruning import scoring
from lfpr_jax.pruning import selection
from lfpr_jax.pruning import surgery
from lfpr_jax.training import loop
from lfpr_jax.data.pipeline import make_loader
from lfpr_jax.models.batch import STEP_FIELDS
from lfpr_jax.models.params import count_params
from lfpr_jax.models.tap import TAP

RESTORATIONS = ("none", "rest", "finetune", "kwon")


@dataclasses.dataclass(frozen=True)
class Cell:
  criterion: str
  restoration: str
  constraint: float

  @property
  def name(self) -> str:
    return f"{self.criterion}-{self.restoration}-{self.constraint:g}"

  @property
  def method(self) -> str:
    return f"{self.criterion} + {self.restoration}"


def cells_of(config: ml_collections.ConfigDict) -> list[Cell]:
  """The grid, validated before any work (unknown names list the valid ones)."""
  s = config.sweep
  for name in s.criteria:
    criteria.get_criterion(name).require_defined()
  for name in s.restorations:
    if name not in RESTORATIONS:
      raise ValueError(f"unknown restoration {name!r}; valid: {list(RESTORATIONS)}.")
  if s.cost not in selection.COST_KINDS:
    raise ValueError(f"unknown constraint kind {s.cost!r}; valid: "
                     f"{list(selection.COST_KINDS)}.")
  for c in s.constraints:
    if not 0 < c <= 1:
      raise ValueError(f"a constraint must be in (0, 1], got {c}.")
  if "rest" in s.restorations:
    table = {float(c) for c, _, _ in config.rest.schedule}
    missing = [c for c in s.constraints if float(c) not in table]
    if missing:
      raise ValueError(f"config.rest.schedule has no (%, k) for constraints {missing}.")
  return [Cell(c, r, float(k)) for c in s.criteria for r in s.restorations
          for k in s.constraints]


def _label_batches(ctx: lfpr.Context, indices: np.ndarray) -> list[dict]:
  loader = make_loader(ctx.data.built_dir, "train", ctx.score_local, shuffle=False,
                       drop_remainder=False, indices=indices)
  fields = STEP_FIELDS + ("has_answers",)
  return list(lfpr.stream(loader, local_batch=ctx.score_local, mesh=ctx.mesh,
                          fields=fields, progress=False,
                          num_batches=lfpr.num_global_batches(len(indices),
                                                              ctx.score_local)))


def criterion_scores(name: str, ctx: lfpr.Context, config, sweep_dir: str
                     ) -> tuple[scoring.Scores, float]:
  """Scores of one criterion on the sample set (cached); returns (scores, seconds)."""
  path = os.path.join(sweep_dir, "scores", f"{name}.npz")
  if os.path.exists(path):
    logging.info("reusing %s", path)
    with open(path + ".json") as f:
      return scoring.Scores.load(path), json.load(f)["seconds"]
  t0 = time.time()
  p = config.prune
  options: dict[str, Any] = {}
  if name == "lfpr":
    options.update(t_star=ctx.t_star(), bos_index=ctx.data.vocab.bos_idx,
                   dropout=p.dropout)
  if name == "alg":
    options.update(normalize_by_layer=config.sweep.alg_normalize_by_layer)
  crit = criteria.get_criterion(name, **options)
  batches = _label_batches(ctx, ctx.samples) if crit.needs_data else None
  scores = scoring.compute(crit, ctx.model, ctx.rep_params, batches, mesh=ctx.mesh,
                           group_size=p.group_size, seed=config.seed)
  seconds = round(time.time() - t0, 1)
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    scores.save(path)
    lfpr.write_json(path + ".json", {"seconds": seconds})
  return scores, seconds


def _restore(cell: Cell, ctx: lfpr.Context, config, sel, scores, directory: str
             ) -> tuple[Any, Any, dict, Optional[dict]]:
  """Runs the cell's restoration; returns (params, config, info, trainable tree)."""
  params, pconfig = surgery.prune(ctx.base_params, ctx.base_config, sel.head_mask,
                                  sel.ffn_mask)
  if cell.restoration == "none":
    return params, pconfig, {}, None
  if cell.restoration == "kwon":
    s = config.sweep
    tune_batches = _label_batches(ctx, ctx.samples[:s.kwon_tune_samples])
    result = kwon.retraining_free(
        ctx.model, ctx.base_params, scores, cell.constraint, kind=s.cost,
        batches=tune_batches, rearrange=scores.head_grads is not None, tune=True)
    info = {"rearranged": result.rearranged,
            "tuning_stopped": None if result.tuning is None else
            str(result.tuning.stopped)}
    return result.params, result.config, info, None
  r = config.rest
  if cell.restoration == "rest":
    percent, layers = {float(c): (pct, k) for c, pct, k in r.schedule}[cell.constraint]
    transforms = [pseudo_labels.PseudoLabelTargets(
        ctx.labels(), ctx.data.vocab, decode_steps=pconfig.decode_steps,
        ocr_slots=pconfig.ocr_max)]
    settings = rest.RestSettings.from_config(r, percent=percent, layers=layers)
    rules = rest.trainable_rules(pconfig, layers)
  else:  # finetune: the config's rules (every parameter), ground-truth labels (§8.1)
    f = config.sweep.finetune
    percent, layers, transforms = f.percent, pconfig.mmt_layers, []
    settings = rest.RestSettings.from_config(r, percent=percent, layers=layers,
                                             lr=f.lr, mask_lr=f.lr)
    rules = [tuple(rule) for rule in f.trainable]
  subset = pseudo_labels.subset_indices(ctx.num_train, percent, r.subset_seed)
  retrained, summary = loop.train_subset(
      model_config=pconfig, params=params, rules=rules, settings=settings,
      built_dir=ctx.data.built_dir, split="train", indices=subset,
      transforms=transforms, directory=os.path.join(directory, "ckpt_run"),
      mesh=ctx.mesh, rng=jax.random.fold_in(jax.random.key(config.seed), 1),
      progress=ctx.progress)
  trainable = (rest.trainable_params(retrained, pconfig, layers)
               if cell.restoration == "rest" else retrained)
  return retrained, pconfig, {"steps": summary["steps"], "percent": percent,
                              "layers": layers}, trainable


def run_cell(cell: Cell, ctx: lfpr.Context, config, scores, score_seconds: float,
             sweep_dir: str) -> dict:
  directory = os.path.join(sweep_dir, "cells", cell.name)
  path = os.path.join(directory, "result.json")
  if os.path.exists(path):
    logging.info("reusing %s", path)
    with open(path) as f:
      return json.load(f)
  os.makedirs(directory, exist_ok=True)
  t0 = time.time()
  costs = selection.constraint_costs(ctx.base_config, config.sweep.cost)
  sel = selection.select_sum(scores.head, scores.ffn, cell.constraint, costs=costs,
                             config=None if costs is not None else ctx.base_config,
                             strict_budget=config.sweep.strict_budget)
  params, pconfig, info, trainable = _restore(cell, ctx, config, sel, scores, directory)
  restore_seconds = time.time() - t0
  acc = lfpr.evaluate(TAP(pconfig), params, ctx.data, ctx.mesh,
                      local_batch=ctx.eval_local, progress=ctx.progress,
                      desc=f"eval {cell.name}")
  n_full = count_params(params)
  full_mb = 4 * n_full / 1e6
  if trainable is not None and cell.restoration == "rest":
    delta_mb = 4 * sum(np.size(x) for x in jax.tree.leaves(trainable)) / 1e6
  elif cell.restoration == "none":
    delta_mb = (sel.head_mask.size + sel.ffn_mask.size) / 8 / 1e6  # the selection bits
  else:
    delta_mb = full_mb  # every weight changed (fine-tuning) or folded masks (Kwon)
  mmt = selection.mmt_params(pconfig)
  row = {"cell": cell.name, "method": cell.method, "criterion": cell.criterion,
         "restoration": cell.restoration, "constraint": cell.constraint,
         "mmt_params": int(mmt), "mmt_kept_fraction": mmt / sel.full_params,
         "model_params": int(n_full), "val_accuracy": acc["val_accuracy"],
         "unpruned_val_accuracy": ctx.base_eval["val_accuracy"],
         "device_hours": (score_seconds + restore_seconds) * jax.device_count() / 3600,
         "score_seconds": score_seconds, "restore_seconds": round(restore_seconds, 1),
         "full_checkpoint_mb": full_mb, "delta_checkpoint_mb": delta_mb,
         "cfg_head": list(pconfig.mmt_heads), "cfg_ffn": list(pconfig.mmt_ffn), **info}
  if jax.process_index() == 0:
    lfpr.write_json(path, row)
  return row


def format_markdown(rows: list[dict], unpruned: float) -> str:
  lines = [f"Unpruned val accuracy: {100 * unpruned:.2f}", "",
           "| Method | constraint | #Params (MMT) | Val acc | Device hours | "
           "File size (MB) | Delta (MB) |", "|---|---|---|---|---|---|---|"]
  for r in sorted(rows, key=lambda r: (r["constraint"], r["method"])):
    lines.append(f"| {r['method']} | {r['constraint']:g} | {r['mmt_params'] / 1e6:.3f}M "
                 f"({100 * r['mmt_kept_fraction']:.1f}%) | {100 * r['val_accuracy']:.2f} "
                 f"| {r['device_hours']:.4f} | {r['full_checkpoint_mb']:.2f} "
                 f"| {r['delta_checkpoint_mb']:.3f} |")
  return "\n".join(lines) + "\n"


def format_csv(rows: list[dict]) -> str:
  keys = ["method", "criterion", "restoration", "constraint", "mmt_params",
          "mmt_kept_fraction", "model_params", "val_accuracy", "unpruned_val_accuracy",
          "device_hours", "full_checkpoint_mb", "delta_checkpoint_mb"]
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
  writer.writeheader()
  writer.writerows(rows)
  return buf.getvalue()


def plot(rows: list[dict], unpruned: float, path: str) -> None:
  """Accuracy vs kept MMT parameters, one line per method (PNG, written atomically)."""
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for method in sorted({r["method"] for r in rows}):
    pts = sorted((r["mmt_params"], r["val_accuracy"]) for r in rows
                 if r["method"] == method)
    style = "-" if "none" not in method else "--"
    ax.plot([p / 1e6 for p, _ in pts], [100 * a for _, a in pts], style, marker="o",
            label=method)
  ax.axhline(100 * unpruned, color="k", lw=0.8, ls=":", label="unpruned")
  ax.set_xlabel("kept MMT parameters (M)")
  ax.set_ylabel("val accuracy (%)")
  ax.legend(fontsize=7, ncol=2)
  ax.grid(alpha=0.3)
  fig.tight_layout()
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


def run_sweep(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  """Runs (or resumes) the whole grid; writes the table, CSV, plot and metadata."""
  cells = cells_of(config)
  ctx = lfpr.prepare(config, workdir)
  sweep_dir = os.path.join(workdir, "sweep")
  scores = {name: criterion_scores(name, ctx, config, sweep_dir)
            for name in config.sweep.criteria}
  rows = []
  for cell in cells:
    s, seconds = scores[cell.criterion]
    rows.append(run_cell(cell, ctx, config, s, seconds, sweep_dir))
  if jax.process_index() == 0:
    unpruned = ctx.base_eval["val_accuracy"]
    for name, text in (("results.md", format_markdown(rows, unpruned)),
                       ("results.csv", format_csv(rows)),
                       ("metadata.json", json.dumps(metadata(config), indent=1))):
      tmp = os.path.join(sweep_dir, f".{name}.tmp")
      with open(tmp, "w") as f:
        f.write(text)
      os.replace(tmp, os.path.join(sweep_dir, name))
    plot(rows, unpruned, os.path.join(sweep_dir, "accuracy_vs_params.png"))
  return rows
