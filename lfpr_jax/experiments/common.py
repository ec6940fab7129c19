"""The stages the LFPR run and the sweep share, as explicit calls on plain values.

    setup(...)          validate, record, data, base model, mesh, unpruned evaluation
    tstar_stage(...)    t* on the scoring sample set         (lfpr/tstar.json)
    labels_stage(...)   the unpruned model's greedy answers   (lfpr/pseudo_labels.npz)
    evaluate(...)       a model's val metrics (and predictions)

Both drivers keep these outputs under `<workdir>/lfpr/`, so a sweep in the workdir of an
LFPR run reuses its data, base model, t* and pseudo-labels (and the other way round).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterator, Sequence
from typing import Any, Optional

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lfpr_jax import atomic
from lfpr_jax.data.pipeline import make_loader, open_source
from lfpr_jax.data.prepare import PreparedData, prepare_data
from lfpr_jax.experiments import config_checks, stages
from lfpr_jax.experiments.base_model import train_and_evaluate
from lfpr_jax.models import trim as trimming
from lfpr_jax.models.batch import MODEL_INPUTS
from lfpr_jax.models.config import TapConfig
from lfpr_jax.models.decoding import greedy_decode
from lfpr_jax.models.tap import TAP
from lfpr_jax.pruning import latency, pseudo_labels, selection, tstar
from lfpr_jax.training import checkpointing, parallel
from lfpr_jax.training import evaluate as evaluation

PyTree = Any
STAGE_DIR = "lfpr"
# Fields a base model must share with the built dataset.
DATA_COMPAT_FIELDS = ("num_answers", "ocr_max", "obj_max", "question_len", "text_len",
                      "ocr_text_len", "decode_steps", "obj_feat_dim", "ocr_feat_dim")
# What the shared stages write and which config keys they read (docs/LFPR.md §1).
BASE_KEYS = ("seed", "data", "model", "optim", "train", "base_model")
# `compute_dtype` (matmul precision, `TapConfig.compute_dtype`) is read by every stage
# that runs the model after the base model; the base model itself always trains in
# float32, so it and the data are kept when only the precision changes.
SHARED_STAGES = (
    stages.Stage("base model", ("base_model", "base_model.json", "base_model_ckpt",
                                "lfpr/data.json"), BASE_KEYS),
    stages.Stage("unpruned evaluation", ("lfpr/base_eval.json",), ("compute_dtype",),
                 ("base model",)),
    stages.Stage("t*", ("lfpr/tstar.json",),
                 ("compute_dtype", "prune.t_star", "prune.tstar_batch_search",
                  "prune.num_samples", "prune.sample_seed", "prune.batch_size"),
                 ("base model",)),
    stages.Stage("pseudo-labels", ("lfpr/pseudo_labels.npz",), ("compute_dtype",),
                 ("base model",)),
)


@dataclasses.dataclass(frozen=True)
class Setup:
  """What every stage after the base model reads (values only; nothing lazy)."""
  config: ml_collections.ConfigDict
  workdir: str
  stage_dir: str
  stages: tuple[stages.Stage, ...]
  data: PreparedData
  base_config: TapConfig  # the loaded base model's, with the run's compute_dtype
  base_params: PyTree
  rep_params: PyTree
  model: TAP
  mesh: Any
  eval_local: int
  score_local: int
  num_train: int
  samples: np.ndarray
  base_eval: dict
  times: dict
  progress: bool

  def depends_on(self, stage: str) -> dict[str, Any]:
    """The config values a stage's output is a function of (for `stages.cached`)."""
    return stages.depends_on(self.config, self.stages, stage)

  def path(self, *parts: str) -> str:
    return os.path.join(self.stage_dir, *parts)


def with_compute_dtype(model_config: TapConfig, compute_dtype: str) -> TapConfig:
  """`model_config` running its matmuls in `compute_dtype` (a new config)."""
  return dataclasses.replace(model_config, compute_dtype=compute_dtype)


def for_saving(model_config: TapConfig) -> TapConfig:
  """The config written next to saved parameters: `compute_dtype` back to float32.

  Parameters are float32 whatever the precision they were trained in; the precision
  is a choice of whoever runs the model (`config.compute_dtype` of a later run), so
  saved models always describe the float32 model.
  """
  return with_compute_dtype(model_config, "float32")


def sample_set(num_train: int, num_samples: int, seed: int) -> np.ndarray:
  """The scoring questions: the first `num_samples` of a seeded permutation."""
  return np.random.default_rng(seed).permutation(num_train)[:min(num_samples, num_train)]


def check_compatible(model_config: TapConfig, data_config: TapConfig) -> None:
  bad = [f"{f}: model {getattr(model_config, f)} vs data {getattr(data_config, f)}"
         for f in DATA_COMPAT_FIELDS
         if getattr(model_config, f) != getattr(data_config, f)]
  if bad:
    raise ValueError("the base model does not fit the dataset: " + "; ".join(bad))


def base_model_dir(config: ml_collections.ConfigDict, workdir: str) -> tuple[str, float]:
  """The unpruned model directory and its training seconds (synthetic: trained here)."""
  path = config.base_model
  if path:
    checkpointing.load_config(path)  # clear error if it is not a model directory
    return path, 0.0
  path = os.path.join(workdir, "base_model")
  summary = os.path.join(workdir, "base_model.json")
  if not os.path.exists(os.path.join(path, checkpointing.ARCH_FILE)):
    if config.data.dataset != "synthetic":
      raise ValueError(
          "config.base_model is empty: convert the fine-tuned upstream checkpoint "
          "first (python -m converters.torch_to_flax --checkpoint "
          "textvqa_tap_base_best.ckpt --out DIR) and set config.base_model=DIR.")
    train_and_evaluate(config, workdir)
  seconds = stages.load_json(summary).get("train_seconds", 0.0) if os.path.exists(
      summary) else 0.0
  return path, float(seconds)


def evaluate(model: TAP, params: PyTree, setup_or_data: Any, *, mesh: Any = None,
             local_batch: Optional[int] = None, progress: bool = True, desc: str = "",
             predictions: bool = False, trim: Optional[bool] = None) -> dict:
  """Val metrics of a model (`training.evaluate`); `val_accuracy` is the primary one.

  `trim` (default: the Setup's `config.trim`, False when given data only) reads the
  split sorted by length and runs each global batch trimmed to bucketed lengths
  (exact in eval mode: the same predictions and metrics as the padded run).

  Returns:
    `{"val_accuracy", "val_examples", "val_metrics": {name: value}}` and, with
    `predictions`, `"predictions"`: `[{question_id, answer}]` in question-id order.
  """
  if isinstance(setup_or_data, Setup):
    s = setup_or_data
    data, mesh, local_batch, progress = s.data, s.mesh, s.eval_local, s.progress
    trim = bool(s.config.trim) if trim is None else trim
  else:
    data = setup_or_data
  trim = bool(trim)
  n = len(open_source(data.built_dir, "val"))
  indices = None
  if trim:
    order = parallel.length_order(
        parallel.shard_lengths(data.built_dir, "val", model.config), model.config,
        num_records=n, local_batch=local_batch, mesh=mesh)
    indices = order.indices
  batches = make_loader(data.built_dir, "val", local_batch, shuffle=False,
                        drop_remainder=False, indices=indices)
  if trim:
    batches = parallel.with_positions(batches, order.positions)
  result = evaluation.evaluate(
      evaluation.greedy_predictor(model.config, mesh, data.vocab.bos_idx, trim=trim),
      parallel.replicate(params, mesh), batches, data.vocab, mesh,
      dataset=data.layout.dataset, local_batch=local_batch,
      num_batches=parallel.num_global_batches(n, local_batch), desc=desc,
      progress=progress, predictions=predictions)
  out = {"val_accuracy": result["accuracy"], "val_examples": result["num_examples"],
         "val_metrics": result["metrics"]}
  if predictions:
    out["predictions"] = result["predictions"]
  return out


def evaluate_stage(s: Setup, model: TAP, params: PyTree, path: str, *, stage: str,
                   desc: str) -> tuple[dict, float]:
  """A cached evaluation; also writes `<stem>_predictions.json` (EvalAI format)."""
  def compute():
    result = evaluate(model, params, s, desc=desc, predictions=True)
    preds = result.pop("predictions")
    if jax.process_index() == 0:
      stem = path[:-len(".json")] if path.endswith(".json") else path
      atomic.write_json(stem + "_predictions.json", preds, indent=None)
    return result
  return stages.cached(path, compute, depends_on=s.depends_on(stage))


def batches(s: Setup, *, indices: Optional[np.ndarray], local_batch: int,
            fields: Sequence[str] = MODEL_INPUTS, desc: str = "",
            progress: Optional[bool] = None, trim: bool = False, sort: bool = False
            ) -> Iterator[Any]:
  """Global batches of train examples (all, or `indices`), padded in lockstep.

  Args:
    s: the setup (data, mesh, base config).
    indices: train records to read (None: all), in this order unless `sort`.
    local_batch: rows per process per step.
    fields: the numeric fields to keep.
    desc, progress: a progress bar (default `s.progress`).
    trim: yield `(global batch, trimmed config, TrimInfo)` triples
      (`parallel.trimmed_global_batches`; exact in eval mode, `lfpr_jax.models.trim`).
    sort: read this process's shard sorted by length (`parallel.length_order`, one
      extra pass over the shard for the lengths); the rows carry `parallel.POSITION`,
      their index in the unsorted run, so results can be put back in that order. Only
      for stages whose per-example results do not depend on the batch composition.
  """
  n = s.num_train if indices is None else len(indices)
  if sort:
    lengths = parallel.shard_lengths(s.data.built_dir, "train", s.base_config,
                                     indices=indices)
    order = parallel.length_order(lengths, s.base_config, num_records=n,
                                  local_batch=local_batch, mesh=s.mesh, indices=indices)
    loader = parallel.with_positions(
        make_loader(s.data.built_dir, "train", local_batch, shuffle=False,
                    drop_remainder=False, indices=order.indices), order.positions)
    fields = tuple(fields) + (parallel.POSITION,)
  else:
    loader = make_loader(s.data.built_dir, "train", local_batch, shuffle=False,
                         drop_remainder=False, indices=indices)
  kw = dict(local_batch=local_batch, num_batches=parallel.num_global_batches(
      n, local_batch), mesh=s.mesh, fields=tuple(fields), desc=desc,
      progress=s.progress if progress is None else progress)
  return parallel.input_batches(loader, trim_config=s.base_config if trim else None,
                                **kw)


def setup(config: ml_collections.ConfigDict, workdir: str,
          driver_stages: Sequence[stages.Stage], *, ignore: Sequence[str] = (),
          invalidate: bool = False) -> Setup:
  """Validates the config, checks the workdir's record, prepares data and base model.

  Every data-free check runs before anything is written; the checks that need the
  data run right after data preparation, before the base model is trained or read.
  """
  config_checks.validate(config)
  stage_dir = os.path.join(workdir, STAGE_DIR)
  all_stages = tuple(SHARED_STAGES) + tuple(driver_stages)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise NotADirectoryError(f"--workdir {workdir} is a file; expected a directory "
                             "(it is created if missing).")
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise PermissionError(f"cannot create --workdir {workdir}: {e.strerror}.") from None
  if not os.access(workdir, os.W_OK):
    raise PermissionError(f"--workdir {workdir} is not a writable directory.")
  stages.check_run_record(config, workdir, stage_dir, all_stages, ignore=ignore,
                          invalidate=invalidate)
  progress = bool(config.progress)
  times: dict[str, float] = {}

  # --- Data
  t0 = time.time()
  data = prepare_data(config, workdir)
  took = round(time.time() - t0, 2)
  # The time of the run that built the data (a reused build takes ~0 s).
  first, _ = stages.cached(os.path.join(stage_dir, "data.json"),
                           lambda: {"seconds": took},
                           depends_on=stages.depends_on(config, all_stages,
                                                        "base model"))
  times["data"] = first["seconds"]
  config_checks.check_against_model(config, data.model_config)

  # --- Base model
  base_dir, times["base_model"] = base_model_dir(config, workdir)
  base_config, base_params = checkpointing.load_model(base_dir)
  # `model.remat` says how to run the model, not what the checkpoint holds: it
  # overrides the loaded config's and reaches every pruned model derived from it.
  base_config = dataclasses.replace(base_config, remat=data.model_config.remat)
  check_compatible(base_config, data.model_config)
  config_checks.check_against_model(config, base_config)
  # The run's matmul precision for every model built from here on (evaluation, t*,
  # pseudo-labels, scoring, pruned models and ReSt all derive from base_config).
  base_config = with_compute_dtype(base_config, config.compute_dtype)
  mesh = parallel.make_mesh()
  model = TAP(base_config)
  num_train = len(open_source(data.built_dir, "train"))
  p = config.prune
  s = Setup(config=config, workdir=workdir, stage_dir=stage_dir, stages=all_stages,
            data=data, base_config=base_config, base_params=base_params,
            rep_params=parallel.replicate(base_params, mesh), model=model, mesh=mesh,
            eval_local=config.eval.batch_size // jax.process_count(),
            score_local=p.batch_size // jax.process_count(), num_train=num_train,
            samples=sample_set(num_train, p.num_samples, p.sample_seed), base_eval={},
            times=times, progress=progress)

  # --- Unpruned evaluation
  base_eval, times["base_eval"] = evaluate_stage(
      s, model, base_params, s.path("base_eval.json"), stage="unpruned evaluation",
      desc="eval unpruned")
  return dataclasses.replace(s, base_eval=base_eval)


def tstar_stage(s: Setup) -> tuple[int, float]:
  """t* (`prune.t_star` >= 0 skips the search); returns (t*, seconds)."""
  p = s.config.prune

  def compute():
    if p.t_star >= 0:
      return {"t_star": int(p.t_star), "given": True}
    # Trimming is exact in eval mode; sorting regroups the samples, which upstream's
    # whole-batch search would notice.
    trim = bool(s.config.trim)
    return tstar.compute_tstar(
        s.model, s.rep_params, batches(s, indices=s.samples, local_batch=s.score_local,
                                       desc="t*", trim=trim,
                                       sort=trim and not p.tstar_batch_search),
        mesh=s.mesh, bos_index=s.data.vocab.bos_idx, batch_search=p.tstar_batch_search,
        trimmed=trim)
  found, seconds = stages.cached(s.path("tstar.json"), compute,
                                 depends_on=s.depends_on("t*"))
  return int(found["t_star"]), seconds


def predict_train(s: Setup) -> pseudo_labels.PseudoLabels:
  """The unpruned model's greedy answer indices on the whole train split.

  With `config.trim`, the train split is read sorted by length and each global batch
  trimmed (exact: eval mode, one program per trimmed shape); the labels come back in
  the unsorted run's order.
  """
  trim = bool(s.config.trim)
  bos, extra = s.data.vocab.bos_idx, ("weight", "question_id", parallel.POSITION)

  def fn(config, batch, params):
    inputs = {k: v for k, v in batch.items() if k not in extra}
    scores, _ = greedy_decode(TAP(config), {"params": params}, inputs, bos_index=bos)
    pos = batch.get(parallel.POSITION, batch["question_id"])
    return (jnp.argmax(scores, -1).astype(jnp.int32), batch["weight"],
            batch["question_id"], pos)
  run = trimming.TrimmedFn(fn, s.base_config,
                           in_shardings=(parallel.data_sharded(s.mesh),
                                         parallel.replicated(s.mesh)),
                           out_shardings=parallel.replicated(s.mesh))
  qids, rows, positions = [], [], []
  for item in batches(s, indices=None, local_batch=s.eval_local, desc="pseudo-labels",
                      trim=trim, sort=trim):
    batch, config = item[:2] if trim else (item, s.base_config)
    idx, w, q, p = (np.asarray(x) for x in run.specialised(config)(batch, s.rep_params))
    rows.append(idx[w > 0])
    qids.extend(q[w > 0].tolist())
    positions.extend(p[w > 0].tolist())
  qids, rows = np.asarray(qids, np.int64), np.concatenate(rows)
  if trim:
    order = parallel.data_order(positions)
    qids, rows = qids[order], rows[order]
  return pseudo_labels.PseudoLabels(qids, rows)


def labels_stage(s: Setup) -> tuple[pseudo_labels.PseudoLabels, float]:
  """The pseudo-labels (cached); returns (labels, seconds)."""
  return stages.cached(
      s.path("pseudo_labels.npz"), lambda: predict_train(s),
      depends_on=s.depends_on("pseudo-labels"),
      save=lambda path, labels: labels.save(path),
      load=pseudo_labels.PseudoLabels.load)


def log_reuse(what: str, path: str) -> None:
  logging.info("%s: reusing %s", what, path)


def latency_table(s: Setup) -> latency.LatencyCosts:
  """This device's MMT latency table at batch `prune.latency_batch`: timed on first use
  and kept in `<stage dir>/latency/` (later calls read it)."""
  return latency.measure_table(s.base_config, batch_size=s.config.prune.latency_batch,
                               cache_dir=s.path("latency"))


def select_budget(s: Setup, head: np.ndarray, ffn: np.ndarray, constraint: float, *,
                  cost: str, strict_budget: bool, round_to: int = 0
                  ) -> selection.Selection:
  """The `sum` selection keeping `constraint` of the MMT's cost `cost`.

  `cost`: "params" (upstream LFPR), "flops" (Kwon's MACs) or "latency" (this device's
  measured MMT latency table at batch `prune.latency_batch`, timed once per workdir
  and kept in `<stage dir>/latency/`; `strict_budget` does not apply: the latency
  search always meets its budget). FFN widths are rounded to `round_to` (0: any).
  """
  if cost == "latency":
    return latency.select_latency(head, ffn, constraint, costs=latency_table(s),
                                  round_to=round_to)
  kw = (dict(config=s.base_config) if cost == "params"
        else dict(costs=selection.constraint_costs(s.base_config, cost)))
  return selection.select_sum(head, ffn, constraint, strict_budget=strict_budget,
                              round_to=round_to, **kw)
