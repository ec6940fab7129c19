"""The comparison the paper makes, as one resumable sweep (docs/LFPR.md §7-9).

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

import jax
import ml_collections
import numpy as np

from lfpr_jax import atomic
from lfpr_jax.experiments import common, stages
from lfpr_jax.models.batch import STEP_FIELDS
from lfpr_jax.models.params import count_params
from lfpr_jax.models.tap import TAP
from lfpr_jax.pruning import (criteria, kwon, pseudo_labels, rest, scoring, selection,
                              surgery)
from lfpr_jax.training import loop

MUTABLE_KEYS = ("prune.constraints", "prune.percentiles", "progress")
STAGES = (
    stages.Stage("sweep scores", ("sweep/scores/*",),
                 ("prune", "sweep.alg_normalize_by_layer"), ("t*",)),
    stages.Stage("sweep cells", ("sweep/cells/*", "sweep/results.*",
                                 "sweep/accuracy_vs_params.png", "sweep/metadata.json"),
                 ("rest", "eval", "sweep"), ("sweep scores", "pseudo-labels",
                                             "unpruned evaluation")),
)


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
  """The grid (the config is validated by `config_checks.validate` first)."""
  sw = config.sweep
  return [Cell(c, r, float(k)) for c in sw.criteria for r in sw.restorations
          for k in sw.constraints]


def label_batches(s: common.Setup, indices: np.ndarray) -> list[dict]:
  """Global batches of labelled training examples (labelled criteria, Kwon tuning)."""
  return list(common.batches(s, indices=indices, local_batch=s.score_local,
                             fields=STEP_FIELDS + ("has_answers",), progress=False))


def criterion_scores(name: str, s: common.Setup, t_star: int
                     ) -> tuple[scoring.Scores, float]:
  """Scores of one criterion on the sample set (cached); returns (scores, seconds)."""
  config, p = s.config, s.config.prune
  options: dict[str, Any] = {}
  if name == "lfpr":
    options.update(t_star=t_star, bos_index=s.data.vocab.bos_idx, dropout=p.dropout)
  if name == "alg":
    options.update(normalize_by_layer=config.sweep.alg_normalize_by_layer)
  crit = criteria.get_criterion(name, **options)

  def compute():
    data = label_batches(s, s.samples) if crit.needs_data else None
    return scoring.compute(crit, s.model, s.rep_params, data, mesh=s.mesh,
                           group_size=p.group_size, seed=config.seed)
  return stages.cached(os.path.join(s.workdir, "sweep", "scores", f"{name}.npz"),
                       compute, depends_on={**s.depends_on("sweep scores"),
                                            "criterion": name},
                       save=lambda path, v: v.save(path), load=scoring.Scores.load)


def _restore(cell: Cell, s: common.Setup, sel, scores, labels, directory: str
             ) -> tuple[Any, Any, dict, Optional[dict]]:
  """Runs the cell's restoration; returns (params, config, info, trainable tree)."""
  config = s.config
  params, pconfig = surgery.prune(s.base_params, s.base_config, sel.head_mask,
                                  sel.ffn_mask)
  if cell.restoration == "none":
    return params, pconfig, {}, None
  if cell.restoration == "kwon":
    sw = config.sweep
    tune_batches = label_batches(s, s.samples[:sw.kwon_tune_samples])
    result = kwon.retraining_free(
        s.model, s.base_params, scores, cell.constraint, kind=sw.cost,
        batches=tune_batches, rearrange=scores.head_grads is not None, tune=True)
    info = {"rearranged": result.rearranged,
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
      progress=s.progress)
  trainable = (rest.trainable_params(retrained, pconfig, layers)
               if cell.restoration == "rest" else retrained)
  return retrained, pconfig, {"steps": summary["steps"], "percent": percent,
                              "layers": layers}, trainable


def run_cell(cell: Cell, s: common.Setup, scores, score_seconds: float, labels
             ) -> dict:
  """Selection under the sweep's cost, restoration, evaluation of one cell (cached)."""
  config = s.config
  directory = os.path.join(s.workdir, "sweep", "cells", cell.name)

  def compute():
    os.makedirs(directory, exist_ok=True)
    t0 = time.time()
    kw = (dict(config=s.base_config) if config.sweep.cost == "params"
          else dict(costs=selection.constraint_costs(s.base_config, config.sweep.cost)))
    sel = selection.select_sum(scores.head, scores.ffn, cell.constraint,
                               strict_budget=config.sweep.strict_budget, **kw)
    params, pconfig, info, trainable = _restore(cell, s, sel, scores, labels,
                                                directory)
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
            "restoration": cell.restoration, "constraint": cell.constraint,
            "mmt_params": int(mmt), "mmt_kept_fraction": mmt / sel.full_params,
            "model_params": int(n_full), "val_accuracy": acc["val_accuracy"],
            "val_metrics": acc["val_metrics"],
            "unpruned_val_accuracy": s.base_eval["val_accuracy"],
            "device_hours": (score_seconds + restore_seconds) * jax.device_count()
                            / 3600,
            "score_seconds": score_seconds, "restore_seconds": round(restore_seconds, 1),
            "full_checkpoint_mb": full_mb, "delta_checkpoint_mb": delta_mb,
            "cfg_head": list(pconfig.mmt_heads), "cfg_ffn": list(pconfig.mmt_ffn),
            **info}
  row, _ = stages.cached(os.path.join(directory, "result.json"), compute,
                         depends_on={**s.depends_on("sweep cells"), "cell": cell.name})
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


def run(config: ml_collections.ConfigDict, workdir: str, *,
        invalidate: bool = False) -> list[dict]:
  """Runs (or resumes) the whole grid; writes the table, CSV, plot and metadata."""
  # ------------------------------------------------------------ setup (validated)
  s = common.setup(config, workdir, STAGES, ignore=MUTABLE_KEYS, invalidate=invalidate)
  cells = cells_of(config)
  sweep_dir = os.path.join(workdir, "sweep")
  needs_labels = "rest" in config.sweep.restorations

  # --------------------------------------------------- shared stages and scores
  t_star, _ = common.tstar_stage(s)
  labels = common.labels_stage(s)[0] if needs_labels else None
  scores = {name: criterion_scores(name, s, t_star) for name in config.sweep.criteria}

  # ------------------------------------------------------------------------ cells
  rows = [run_cell(cell, s, *scores[cell.criterion], labels) for cell in cells]

  # ---------------------------------------------------------------------- outputs
  if jax.process_index() == 0:
    unpruned = s.base_eval["val_accuracy"]
    atomic.write_text(os.path.join(sweep_dir, "results.md"),
                      format_markdown(rows, unpruned))
    atomic.write_text(os.path.join(sweep_dir, "results.csv"), format_csv(rows))
    atomic.write_json(os.path.join(sweep_dir, "metadata.json"), metadata(config))
    plot(rows, unpruned, os.path.join(sweep_dir, "accuracy_vs_params.png"))
  return rows
