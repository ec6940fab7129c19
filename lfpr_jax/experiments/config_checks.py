"""Every check of an experiment config that needs no data, in one pass.

`validate(config)` runs before anything is written or trained and raises one
`stages.ConfigError` listing every problem, each with its dotted key and what is
allowed. Checks that need the data or the model (t* against the decoding length, batch
sizes against the device count, ReSt layers against the model depth) live in
`check_against_model`, called right after data preparation, before the base model is
trained or read.
"""

from __future__ import annotations

import dataclasses

import jax
import ml_collections

from lfpr_jax.experiments.stages import Checker
from lfpr_jax.models.config import COMPUTE_DTYPES, TapConfig

DATASETS = ("synthetic", "textvqa", "stvqa")
SPLITS = ("train", "val", "test")
RESTORATIONS = ("none", "rest", "finetune", "kwon", "kwon_lf")
# Sweep criteria beyond `criteria.CRITERIA`: LFPR's per-sample score (docs/LFPR.md §3.3).
SWEEP_EXTRA_CRITERIA = ("lfpr_ps",)
HEURISTICS = ("sum", "thre")
COSTS = ("params", "flops", "latency")


def _schedule_ok(schedule) -> bool:
  return all(len(row) == 3 and 0 < float(row[1]) <= 100 and int(row[2]) >= 0
             and int(row[2]) == row[2] for row in schedule)


def _check_prune_rest(c: Checker) -> None:
  c.one_of("prune.heuristic", HEURISTICS)
  c.check("prune.constraints", lambda v: len(v) > 0 and all(0 < x <= 1 for x in v),
          "a non-empty list of kept fractions in (0, 1]")
  c.check("prune.percentiles", lambda v: all(0 <= x <= 100 for x in v),
          "percentiles in [0, 100]")
  for key in ("prune.num_samples", "prune.batch_size", "prune.group_size"):
    c.int_at_least(key, 1)
  c.int_at_least("prune.sample_seed", 0)
  c.check("prune.t_star", lambda v: isinstance(v, int) and v >= -1,
          "-1 (search) or a decoding step >= 0")
  for key in ("prune.strict_budget", "prune.per_sample", "prune.dropout",
              "prune.tstar_batch_search"):
    c.boolean(key)
  bs, gs = c.get("prune.batch_size"), c.get("prune.group_size")
  if isinstance(bs, int) and isinstance(gs, int) and bs > 0 and gs > 0 and bs % gs:
    c.problems.append(f"prune.batch_size={bs}: expected a multiple of "
                      f"prune.group_size={gs} (the faithful per-batch score squares "
                      "the gradient of each group)")
  c.one_of("prune.cost", COSTS)
  c.int_at_least("prune.latency_batch", 1)
  c.int_at_least("prune.round_to", 0)
  if c.get("prune.heuristic") == "thre" and c.get("prune.round_to"):
    c.problems.append("prune.round_to: applies to the 'sum' heuristic (a budget); "
                      "expected 0 with prune.heuristic='thre'")
  c.check("rest.schedule", _schedule_ok,
          "rows (constraint, retrain % in (0, 100], trailing layers k >= 0)")
  c.check("rest.thre_schedule", _schedule_ok,
          "rows (percentile, retrain % in (0, 100], trailing layers k >= 0)")
  for key in ("rest.lr", "rest.mask_lr", "rest.clip_norm"):
    c.positive(key)
  for key in ("rest.batch_size", "rest.loss_shards", "rest.ckpt_every"):
    c.int_at_least(key, 1)
  for key in ("rest.seed", "rest.subset_seed"):
    c.int_at_least(key, 0)
  c.boolean("rest.fixed_dropout_key")
  rb, ls = c.get("rest.batch_size"), c.get("rest.loss_shards")
  if isinstance(rb, int) and isinstance(ls, int) and rb > 0 and ls > 0 and rb % ls:
    c.problems.append(f"rest.batch_size={rb}: expected a multiple of "
                      f"rest.loss_shards={ls}")
  _check_microbatches(c, "rest")


def _check_microbatches(c: Checker, section: str) -> None:
  """`<section>.microbatches` (optional, default 1): an integer >= 1 dividing
  `<section>.batch_size`."""
  key = f"{section}.microbatches"
  if c.get(key) is None:
    return
  c.int_at_least(key, 1)
  m, b = c.get(key), c.get(f"{section}.batch_size")
  if (isinstance(m, int) and not isinstance(m, bool) and isinstance(b, int)
      and m >= 1 and b >= 1 and b % m):
    c.problems.append(f"{key}={m}: expected a divisor of {section}.batch_size={b} "
                      "(the batch is split into equal micro-batches)")
  # Every target needs its (retrain %, k) in the schedule of its heuristic.
  heuristic = c.get("prune.heuristic")
  if heuristic in HEURISTICS and not c.problems:
    values_key, sched_key = (("prune.constraints", "rest.schedule")
                             if heuristic == "sum" else
                             ("prune.percentiles", "rest.thre_schedule"))
    known = {float(row[0]) for row in c.get(sched_key)}
    missing = [v for v in c.get(values_key) if float(v) not in known]
    if missing:
      c.problems.append(f"{sched_key}: has no (retrain %, k) row for {values_key} "
                        f"{missing}; it has {sorted(known)}")


def _check_model(c: Checker) -> None:
  if not c.require("model"):
    return
  fields = {f.name for f in dataclasses.fields(TapConfig)}
  for key in c.get("model").keys():
    if key == "compute_dtype":
      # One switch: the base model trains in float32, the later stages read the
      # top-level key (a model.compute_dtype would also change the base model).
      c.problems.append("model.compute_dtype: set the top-level compute_dtype "
                        "instead (the precision of every stage after the base model)")
    elif key not in fields:
      c.problems.append(f"model.{key}: not a TapConfig field (known: "
                        f"{', '.join(sorted(fields))})")
  if c.get("model.remat") is not None:
    c.boolean("model.remat")
  heads, ffn = c.get("model.mmt_heads"), c.get("model.mmt_ffn")
  if heads is not None and ffn is not None and len(heads) != len(ffn):
    c.problems.append(f"model.mmt_heads / model.mmt_ffn: expected one entry per MMT "
                      f"layer in both, got {len(heads)} and {len(ffn)}")


def _check_sweep(c: Checker) -> None:
  from lfpr_jax.pruning import criteria  # noqa: PLC0415  (sweep only)
  known = tuple(criteria.CRITERIA) + SWEEP_EXTRA_CRITERIA
  c.check("sweep.criteria", lambda v: len(v) > 0 and all(x in known for x in v)
          and len(set(v)) == len(v), "a non-empty list of distinct names from "
          + ", ".join(known))
  c.check("sweep.restorations",
          lambda v: len(v) > 0 and all(x in RESTORATIONS for x in v)
          and len(set(v)) == len(v),
          "a non-empty list of distinct names from " + ", ".join(RESTORATIONS))
  c.check("sweep.constraints", lambda v: len(v) > 0 and all(0 < x <= 1 for x in v),
          "a non-empty list of kept fractions in (0, 1]")
  kinds = COSTS
  c.check("sweep.costs", lambda v: not isinstance(v, str) and len(v) > 0
          and all(x in kinds for x in v) and len(set(v)) == len(v),
          "a non-empty list of distinct cost kinds from " + ", ".join(kinds))
  c.check("sweep.finetune_costs", lambda v: not isinstance(v, str)
          and all(x in kinds for x in v) and len(set(v)) == len(v),
          "a list of distinct cost kinds from " + ", ".join(kinds))
  c.int_at_least("sweep.seeds", 1)
  c.int_at_least("sweep.kwon_tune_samples", 1)
  c.boolean("sweep.strict_budget")
  if "lfpr_ps" in (c.get("sweep.criteria") or ()) and c.get("prune.dropout"):
    c.problems.append("sweep.criteria: 'lfpr_ps' (LFPR's per-sample score) exists only "
                      "without dropout; expected prune.dropout=False")
  seeds = c.get("sweep.seeds")
  if isinstance(seeds, int) and seeds > 1:
    # Each seed must get its own dataset and base model in its sub-workdir.
    if c.get("data.dataset") != "synthetic":
      c.problems.append(f"sweep.seeds={seeds}: several seeds regenerate the synthetic "
                        "dataset and retrain the base model; expected 1 with "
                        f"data.dataset={c.get('data.dataset')!r}")
    for key in ("data.root", "data.built_dir", "base_model"):
      if c.get(key):
        c.problems.append(f"{key}={c.get(key)!r}: expected '' with sweep.seeds="
                          f"{seeds} (every seed builds its own in its sub-workdir)")
  if "rest" in (c.get("sweep.restorations") or ()) and not c.problems:
    known_c = {float(row[0]) for row in c.get("rest.schedule")}
    missing = [x for x in c.get("sweep.constraints") if float(x) not in known_c]
    if missing:
      c.problems.append(f"rest.schedule: has no (retrain %, k) row for "
                        f"sweep.constraints {missing}")


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks every config value that can be checked without data.

  Raises:
    stages.ConfigError: listing every problem (dotted key, value, what is allowed).
  """
  c = Checker(config)
  c.int_at_least("seed", 0)
  c.one_of("data.dataset", DATASETS)
  c.check("data.splits", lambda v: "train" in v and "val" in v
          and all(s in SPLITS for s in v), "a list of splits from train, val, test "
          "including train and val")
  c.check("data.root", lambda v: isinstance(v, str), "a path (empty: the default)")
  c.check("data.built_dir", lambda v: isinstance(v, str),
          "a path (empty: the default)")
  c.check("base_model", lambda v: isinstance(v, str), "a model directory or ''")
  _check_model(c)
  if c.get("data.dataset") == "synthetic" or c.get("train") is not None:
    for key in ("train.batch_size", "train.num_steps", "train.log_every"):
      c.int_at_least(key, 1)
    _check_microbatches(c, "train")
    c.int_at_least("train.eval_every", 0)
    c.positive("optim.lr")
    c.positive("optim.clip_norm")
    c.int_at_least("optim.warmup_steps", 0)
  c.int_at_least("eval.batch_size", 1)
  c.check("speed.batch_sizes", lambda v: len(v) == 2 and all(
      isinstance(b, int) and b >= 1 for b in v),
          "two batch sizes >= 1 (latency, throughput)")
  c.int_at_least("speed.repeats", 1)
  c.boolean("trim")
  c.one_of("compute_dtype", COMPUTE_DTYPES)
  _check_prune_rest(c)
  if c.get("sweep") is not None:
    _check_sweep(c)
  c.raise_if_any()


def check_against_model(config: ml_collections.ConfigDict, model: TapConfig) -> None:
  """Checks that need the model's shapes and the devices (after data preparation).

  Raises:
    stages.ConfigError: listing every problem.
  """
  c = Checker(config)
  t_star = config.prune.t_star
  if t_star >= model.decode_steps:
    c.problems.append(f"prune.t_star={t_star}: expected -1 or a step below the "
                      f"model's {model.decode_steps} decoding steps")
  for key in ("prune.batch_size", "eval.batch_size", "rest.batch_size"):
    size = c.get(key)
    if size % jax.device_count():
      c.problems.append(f"{key}={size}: expected a multiple of the "
                        f"{jax.device_count()} devices")
    elif size % jax.process_count():
      c.problems.append(f"{key}={size}: expected a multiple of the "
                        f"{jax.process_count()} processes")
  if config.prune.heuristic == "sum":
    schedule, used = config.rest.schedule, set(map(float, config.prune.constraints))
  else:
    schedule, used = config.rest.thre_schedule, set(map(float, config.prune.percentiles))
  if "sweep" in config:
    used |= set(map(float, config.sweep.constraints))
  round_to = config.prune.round_to
  widths = sorted(set(model.mmt_ffn))
  if round_to and any(w % round_to for w in widths):
    c.problems.append(f"prune.round_to={round_to}: expected a divisor of the model's "
                      f"FFN width {widths} (e.g. 8, 64, 128 for 3072)")
  too_deep = sorted({int(k) for v, _, k in schedule
                     if float(v) in used and int(k) > model.mmt_layers})
  if too_deep:
    c.problems.append(f"rest.schedule: retrains {too_deep} trailing layers, but the "
                      f"model has {model.mmt_layers} MMT layers")
  c.raise_if_any()
