"""The LFPR pipeline as cached stages in a workdir (LFPR.md §1).

    base model -> t* -> importance -> per target: selection -> surgery -> eval
               -> pseudo-labels (once) -> per target: ReSt -> eval -> table

Every stage writes its output atomically under `<workdir>/lfpr/` and is skipped when
that output exists, so an interrupted run continues where it stopped (ReSt itself
resumes from its last checkpoint). The config of the run is stored in
`lfpr/config.json`; a workdir holding a run of a different config is refused.

Layout:

    lfpr/config.json             the run's config (checked on every start)
    lfpr/base_eval.json          unpruned val accuracy
    lfpr/tstar.json              per-sample max steps, t*
    lfpr/importance.npz          head/neuron scores (per batch and per sample)
    lfpr/pseudo_labels.npz       the unpruned model's greedy predictions on train
    lfpr/<heuristic>_<c>/        selection.json, masks.npz, cfg.txt, eval_pruned.json,
                                 rest/ckpt (resumable), model/ (full retrained model),
                                 delta/ (trainable tensors only), result.json
    lfpr/results.{md,jsonl}      the final table
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Optional

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lfpr_jax.data.prepare import PreparedData, prepare_data
from lfpr_jax.training import checkpointing
from lfpr_jax.experiments.base_model import train_and_evaluate as train_base_model
from lfpr_jax.pruning import criteria
from lfpr_jax.pruning import delta
from lfpr_jax.pruning import scoring
from lfpr_jax.pruning import tstar
from lfpr_jax.training import parallel
from lfpr_jax.pruning import pseudo_labels
from lfpr_jax.pruning import rest
from lfpr_jax.pruning import selection
from lfpr_jax.pruning import surgery
from lfpr_jax.training import evaluate as evaluation
from lfpr_jax.training import loop
from lfpr_jax.training.step import make_predict
from lfpr_jax.data.pipeline import make_loader, open_source
from lfpr_jax.models.batch import MODEL_INPUTS
from lfpr_jax.models.decoding import greedy_decode
from lfpr_jax.models.config import TapConfig
from lfpr_jax.models.params import count_params
from lfpr_jax.models.tap import TAP

PyTree = Any
# Config keys that may change between runs of one workdir (more targets); the sweep's
# grid (`sweep.*`) may change too: it shares the workdir's data, base model and stages.
MUTABLE_KEYS = ("prune.constraints", "prune.percentiles")
DATA_COMPAT_FIELDS = ("num_answers", "ocr_max", "obj_max", "question_len", "text_len",
                      "ocr_text_len", "decode_steps", "obj_feat_dim", "ocr_feat_dim")


# ------------------------------------------------------------------ config checks


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
  """The run's targets with their (retrain %, k) from the schedule; validated."""
  p, r = config.prune, config.rest
  if p.heuristic == "sum":
    values, schedule, what = tuple(p.constraints), r.schedule, "constraint"
    for c in values:
      if not 0 < c <= 1:
        raise ValueError(f"a constraint must be in (0, 1], got {c}.")
  elif p.heuristic == "thre":
    values, schedule, what = tuple(p.percentiles), r.thre_schedule, "percentile"
    for q in values:
      if not 0 <= q <= 100:
        raise ValueError(f"a percentile must be in [0, 100], got {q}.")
  else:
    raise ValueError(f"unknown heuristic {p.heuristic!r}; known: 'sum', 'thre'.")
  if not values:
    raise ValueError(f"config.prune lists no {what}s.")
  table = {float(v): (float(pct), int(k)) for v, pct, k in schedule}
  out = []
  for v in values:
    if float(v) not in table:
      raise ValueError(f"the ReSt schedule has no entry for {what} {v}; it has "
                       f"{sorted(table)} (config.rest.{'schedule' if p.heuristic == 'sum' else 'thre_schedule'}).")
    pct, k = table[float(v)]
    if not 0 < pct <= 100:
      raise ValueError(f"retraining percentage must be in (0, 100], got {pct}.")
    out.append(Target(p.heuristic, float(v), pct, k))
  return out


def _flat_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
  def walk(d, prefix):
    for k, v in d.items():
      key = f"{prefix}{k}"
      if isinstance(v, (dict, ml_collections.ConfigDict)):
        yield from walk(v, key + ".")
      else:
        yield key, list(v) if isinstance(v, tuple) else v
  return json.loads(json.dumps(dict(walk(config, "")), default=str))


def check_workdir(config: ml_collections.ConfigDict, stage_dir: str) -> None:
  """Refuses a workdir whose stored run config differs (targets may be added)."""
  path = os.path.join(stage_dir, "config.json")
  current = _flat_config(config)
  if os.path.exists(path):
    with open(path) as f:
      stored = json.load(f)
    differ = sorted(k for k in set(stored) | set(current)
                    if k not in MUTABLE_KEYS and not k.startswith("sweep.")
                    and stored.get(k) != current.get(k))
    if differ:
      raise ValueError(
          f"{os.path.dirname(stage_dir)} holds a run of a different config (differs in "
          f"{', '.join(differ[:8])}{' ...' if len(differ) > 8 else ''}); use a new "
          "--workdir or remove the old one.")
  elif jax.process_index() == 0:
    os.makedirs(stage_dir, exist_ok=True)
    write_json(path, current)


# ------------------------------------------------------------------- small helpers


def write_json(path: str, obj: Any) -> None:
  """`obj` as JSON (NaN allowed, e.g. a retention over a zero base accuracy) to
  `path` through a temporary file."""
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)


def cached_json(path: str, compute: Callable[[], dict]) -> dict:
  """Loads `path`, or computes, times and writes it (process 0)."""
  if os.path.exists(path):
    logging.info("reusing %s", path)
    with open(path) as f:
      return json.load(f)
  t0 = time.time()
  result = compute()
  result = {**result, "seconds": round(time.time() - t0, 1)}
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_json(path, result)
  return result


num_global_batches = parallel.num_global_batches


def stream(loader: Iterator[Mapping], *, local_batch: int, num_batches: int,
           mesh: jax.sharding.Mesh, fields: tuple[str, ...] = MODEL_INPUTS,
           desc: str = "", progress: bool = True) -> Iterator[dict]:
  """`parallel.global_batches` of the model inputs by default."""
  return parallel.global_batches(loader, local_batch=local_batch,
                                 num_batches=num_batches, mesh=mesh, fields=fields,
                                 desc=desc, progress=progress)


def _replicated_jit(fn, mesh):
  return jax.jit(fn, in_shardings=(parallel.replicated(mesh), parallel.data_sharded(mesh)),
                 out_shardings=parallel.replicated(mesh))


def sample_set(num_train: int, num_samples: int, seed: int) -> np.ndarray:
  """The scoring questions: the first `num_samples` of a seeded permutation."""
  if num_samples < 1:
    raise ValueError(f"prune.num_samples must be >= 1, got {num_samples}.")
  return np.random.default_rng(seed).permutation(num_train)[:min(num_samples, num_train)]


# -------------------------------------------------------------------------- stages


def compute_pseudo_labels(model: TAP, params: PyTree, *, built_dir: str,
                          num_train: int, local_batch: int, mesh, bos_index: int,
                          progress: bool) -> pseudo_labels.PseudoLabels:
  def fn(params, batch):
    scores, _ = greedy_decode(model, {"params": params}, batch, bos_index=bos_index)
    return jnp.argmax(scores, -1).astype(jnp.int32), batch["weight"], batch["question_id"]
  step_fn = _replicated_jit(fn, mesh)
  loader = make_loader(built_dir, "train", local_batch, shuffle=False,
                       drop_remainder=False)
  qids, rows = [], []
  for batch in stream(loader, local_batch=local_batch, mesh=mesh,
                      num_batches=num_global_batches(num_train, local_batch),
                      desc="pseudo-labels", progress=progress):
    idx, w, q = (np.asarray(x) for x in step_fn(params, batch))
    rows.append(idx[w > 0])
    qids.extend(q[w > 0].tolist())
  return pseudo_labels.PseudoLabels(np.asarray(qids, np.int64), np.concatenate(rows))


def evaluate(model: TAP, params: PyTree, data: PreparedData, mesh, *,
             local_batch: int, progress: bool, desc: str) -> dict:
  """The dataset's val metrics (`training.evaluate`); `val_accuracy` is the primary."""
  n = len(open_source(data.built_dir, "val"))
  batches = make_loader(data.built_dir, "val", local_batch, shuffle=False,
                        drop_remainder=False)
  result = evaluation.evaluate(
      make_predict(model, mesh, data.vocab.bos_idx), parallel.replicate(params, mesh),
      batches, data.vocab, mesh, dataset=data.layout.dataset, local_batch=local_batch,
      num_batches=num_global_batches(n, local_batch), desc=desc, progress=progress)
  return {"val_accuracy": result["accuracy"], "val_examples": result["num_examples"],
          "val_metrics": result["metrics"]}


# ---------------------------------------------------------------------- base model


def base_model(config: ml_collections.ConfigDict, workdir: str,
               data: PreparedData) -> str:
  """The unpruned model directory; on the synthetic benchmark trained if missing."""
  path = config.get("base_model", "")
  if path:
    checkpointing.load_config(path)  # clear error if it is not a model directory
    return path
  path = os.path.join(workdir, "base_model")
  if os.path.exists(os.path.join(path, checkpointing.ARCH_FILE)):
    return path
  if config.data.dataset != "synthetic":
    raise ValueError(
        "config.base_model is empty: convert the fine-tuned upstream checkpoint first "
        "(python -m converters.torch_to_flax --checkpoint textvqa_tap_base_best.ckpt "
        "--out DIR) and set config.base_model=DIR.")
  train_base_model(config, workdir)
  return path


def check_compatible(model_config: TapConfig, data_config: TapConfig) -> None:
  bad = [f"{f}: model {getattr(model_config, f)} vs data {getattr(data_config, f)}"
         for f in DATA_COMPAT_FIELDS
         if getattr(model_config, f) != getattr(data_config, f)]
  if bad:
    raise ValueError("the base model does not fit the dataset: " + "; ".join(bad))


# ------------------------------------------------------------------------- driver


@dataclasses.dataclass
class Context:
  """What every stage after the base model shares (built once by `prepare`)."""
  config: ml_collections.ConfigDict
  workdir: str
  stage_dir: str
  data: PreparedData
  base_config: TapConfig
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
  _t_star: Optional[int] = None
  _labels: Optional[pseudo_labels.PseudoLabels] = None

  def t_star(self) -> int:
    """The t* stage (cached in `lfpr/tstar.json`)."""
    if self._t_star is None:
      p = self.config.prune

      def stage():
        if p.get("t_star", -1) >= 0:
          return {"t_star": int(p.t_star), "given": True}
        return tstar.compute_tstar(
            self.model, self.rep_params, self.score_batches(desc="t*"),
            mesh=self.mesh, bos_index=self.data.vocab.bos_idx,
            batch_search=p.tstar_batch_search)
      found = cached_json(os.path.join(self.stage_dir, "tstar.json"), stage)
      self.times["tstar"] = found["seconds"]
      self._t_star = int(found["t_star"])
    return self._t_star

  def score_batches(self, desc: str) -> Iterator[dict]:
    """Global batches of the scoring sample set (model inputs, weight, question_id)."""
    loader = make_loader(self.data.built_dir, "train", self.score_local, shuffle=False,
                         drop_remainder=False, indices=self.samples)
    return stream(loader, local_batch=self.score_local, mesh=self.mesh, desc=desc,
                  num_batches=num_global_batches(len(self.samples), self.score_local),
                  progress=self.progress)

  def labels(self) -> pseudo_labels.PseudoLabels:
    """The pseudo-label stage (cached in `lfpr/pseudo_labels.npz`)."""
    if self._labels is None:
      path = os.path.join(self.stage_dir, "pseudo_labels.npz")
      if os.path.exists(path):
        logging.info("reusing %s", path)
        self._labels = pseudo_labels.PseudoLabels.load(path)
        with open(path + ".json") as f:
          self.times["pseudo_labels"] = json.load(f)["seconds"]
      else:
        t0 = time.time()
        self._labels = compute_pseudo_labels(
            self.model, self.rep_params, built_dir=self.data.built_dir,
            num_train=self.num_train, local_batch=self.eval_local, mesh=self.mesh,
            bos_index=self.data.vocab.bos_idx, progress=self.progress)
        self.times["pseudo_labels"] = round(time.time() - t0, 1)
        if jax.process_index() == 0:
          self._labels.save(path)
          write_json(path + ".json", {
              "seconds": self.times["pseudo_labels"],
              "num_examples": len(self._labels.question_ids)})
    return self._labels


def prepare(config: ml_collections.ConfigDict, workdir: str) -> Context:
  """Data, base model (trained on the synthetic benchmark when missing), checks,
  mesh and the unpruned model's val accuracy."""
  p = config.prune
  stage_dir = os.path.join(workdir, "lfpr")
  check_workdir(config, stage_dir)
  progress = bool(config.get("progress", True))
  times: dict[str, float] = {}
  t0 = time.time()
  data = prepare_data(config, workdir)
  times["data"] = time.time() - t0
  t0 = time.time()
  base_dir = base_model(config, workdir, data)
  times["base_model"] = time.time() - t0
  summary_path = os.path.join(workdir, "base_model.json")
  if not config.get("base_model", "") and os.path.exists(summary_path):
    with open(summary_path) as f:   # the training time, also when reused
      times["base_model"] = json.load(f).get("train_seconds", times["base_model"])
  base_config, base_params = checkpointing.load_model(base_dir)
  check_compatible(base_config, data.model_config)
  if p.get("t_star", -1) >= 0:
    tstar.check_t_star(p.t_star, base_config.decode_steps)
  criteria.mask_shapes(base_config)
  mesh = parallel.make_mesh()
  for what, size in (("prune.batch_size", p.batch_size), ("eval.batch_size",
                                                          config.eval.batch_size),
                     ("rest.batch_size", config.rest.batch_size)):
    parallel.check_batch_size(size, mesh)
    if size % jax.process_count():
      raise ValueError(f"{what} {size} is not divisible by {jax.process_count()} "
                       "processes.")
  model = TAP(base_config)
  eval_local = config.eval.batch_size // jax.process_count()
  num_train = len(open_source(data.built_dir, "train"))
  base_eval = cached_json(os.path.join(stage_dir, "base_eval.json"), lambda: evaluate(
      model, base_params, data, mesh, local_batch=eval_local, progress=progress,
      desc="eval unpruned"))
  times["base_eval"] = base_eval["seconds"]
  return Context(config=config, workdir=workdir, stage_dir=stage_dir, data=data,
                 base_config=base_config, base_params=base_params,
                 rep_params=parallel.replicate(base_params, mesh), model=model,
                 mesh=mesh, eval_local=eval_local,
                 score_local=p.batch_size // jax.process_count(), num_train=num_train,
                 samples=sample_set(num_train, p.num_samples, p.sample_seed),
                 base_eval=base_eval, times=times, progress=progress)


def run(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  """Runs (or resumes) every stage; returns one result row per target."""
  targets = targets_of(config)   # bad targets fail before any work
  p = config.prune
  ctx = prepare(config, workdir)
  for target in targets:
    if target.layers > ctx.base_config.mmt_layers:
      raise ValueError(f"the ReSt schedule retrains {target.layers} layers at "
                       f"{target.name}, but the model has {ctx.base_config.mmt_layers}.")
  t_star = ctx.t_star()
  imp_path = os.path.join(ctx.stage_dir, "importance.npz")
  if os.path.exists(imp_path):
    logging.info("reusing %s", imp_path)
    imp = scoring.Scores.load(imp_path)
    with open(imp_path + ".json") as f:
      imp_seconds = json.load(f)["seconds"]
  else:
    t0 = time.time()
    imp = scoring.compute("lfpr", ctx.model, ctx.rep_params,
                          ctx.score_batches(desc="importance"), mesh=ctx.mesh,
                          group_size=p.group_size, seed=config.seed,
                          keep_batch_grads=False, t_star=t_star,
                          bos_index=ctx.data.vocab.bos_idx, dropout=p.dropout)
    imp_seconds = round(time.time() - t0, 1)
    if jax.process_index() == 0:
      imp.save(imp_path)
      write_json(imp_path + ".json", {"seconds": imp_seconds,
                                      "num_samples": imp.num_samples,
                                      "t_star": t_star})
  head_imp, ffn_imp = imp.scores(per_sample=p.per_sample)
  ctx.times["importance"] = imp_seconds
  labels = ctx.labels()
  base_sha = checkpointing.params_sha256(ctx.base_params)
  rows = []
  for target in targets:
    rows.append(run_target(target, config=config, stage_dir=ctx.stage_dir,
                           data=ctx.data, base_config=ctx.base_config,
                           base_params=ctx.base_params, head_imp=head_imp,
                           ffn_imp=ffn_imp, labels=labels, num_train=ctx.num_train,
                           mesh=ctx.mesh, eval_local=ctx.eval_local,
                           base_eval=ctx.base_eval, base_sha=base_sha,
                           shared_times=ctx.times, progress=ctx.progress))
  if jax.process_index() == 0:
    write_table(rows, ctx.stage_dir)
  return rows


def run_target(target: Target, *, config, stage_dir, data, base_config, base_params,
               head_imp, ffn_imp, labels, num_train, mesh, eval_local, base_eval,
               base_sha, shared_times, progress) -> dict:
  """Selection, surgery, eval, ReSt, eval and checkpoints of one target (cached)."""
  p, r = config.prune, config.rest
  d = os.path.join(stage_dir, target.name)
  result_path = os.path.join(d, "result.json")
  if os.path.exists(result_path):
    logging.info("reusing %s", result_path)
    with open(result_path) as f:
      return json.load(f)
  is_main = jax.process_index() == 0
  os.makedirs(d, exist_ok=True)

  t0 = time.time()
  if target.heuristic == "sum":
    sel = selection.select_sum(head_imp, ffn_imp, target.value, config=base_config,
                               strict_budget=p.strict_budget)
  else:
    sel = selection.select_thre(head_imp, ffn_imp, target.value, config=base_config)
  pruned_params, pruned_config = surgery.prune(base_params, base_config, sel.head_mask,
                                               sel.ffn_mask)
  select_seconds = time.time() - t0
  if is_main:
    with open(os.path.join(d, "cfg.txt"), "w") as f:
      f.write(selection.cfg_txt(sel))
    np.savez(os.path.join(d, "masks.npz"), head_mask=sel.head_mask,
             ffn_mask=sel.ffn_mask)
  pruned_model = TAP(pruned_config)
  before = cached_json(os.path.join(d, "eval_pruned.json"), lambda: evaluate(
      pruned_model, pruned_params, data, mesh, local_batch=eval_local,
      progress=progress, desc=f"eval {target.name} pruned"))

  settings = rest.RestSettings.from_config(r, percent=target.percent,
                                          layers=target.layers)
  subset = pseudo_labels.subset_indices(num_train, target.percent, r.subset_seed)
  transform = pseudo_labels.PseudoLabelTargets(
      labels, data.vocab, decode_steps=pruned_config.decode_steps,
      ocr_slots=pruned_config.ocr_max)
  retrained, rest_summary = loop.train_subset(
      model_config=pruned_config, params=pruned_params,
      rules=rest.trainable_rules(pruned_config, target.layers), settings=settings,
      built_dir=data.built_dir, split="train", indices=subset, transforms=[transform],
      directory=os.path.join(d, "rest"), mesh=mesh,
      rng=jax.random.fold_in(jax.random.key(config.seed), 1), progress=progress,
      log_path=os.path.join(d, "rest_metrics.jsonl"))
  after = cached_json(os.path.join(d, "eval_rest.json"), lambda: evaluate(
      pruned_model, retrained, data, mesh, local_batch=eval_local, progress=progress,
      desc=f"eval {target.name} retrained"))

  model_dir, delta_dir = os.path.join(d, "model"), os.path.join(d, "delta")
  trainable = rest.trainable_params(retrained, pruned_config, target.layers)
  if is_main:
    checkpointing.save_model(model_dir, pruned_config, retrained, overwrite=True,
                             extra={"target": target.name, "base_sha256": base_sha})
    delta.save_delta(delta_dir, trainable=trainable, pruned_config=pruned_config,
                             head_mask=sel.head_mask, ffn_mask=sel.ffn_mask,
                             base_sha256=base_sha, overwrite=True,
                             extra={"target": target.name, "layers": target.layers})
  n_trainable = int(sum(np.size(x) for x in jax.tree.leaves(trainable)))
  n_total = count_params(retrained)
  row = {
      "target": target.name, "heuristic": target.heuristic, "value": target.value,
      "retrain_percent": target.percent, "retrain_layers": target.layers,
      "cfg_head": list(sel.cfg_head), "cfg_ffn": list(sel.cfg_ffn),
      "mmt_params": int(sel.mmt_params), "mmt_params_full": int(sel.full_params),
      "mmt_kept_fraction": sel.mmt_params / sel.full_params,
      "model_params": n_total, "model_params_full": count_params(base_params),
      "unpruned_val_accuracy": base_eval["val_accuracy"],
      "pruned_val_accuracy": before["val_accuracy"],
      "retrained_val_accuracy": after["val_accuracy"],
      "retention": after["val_accuracy"] / base_eval["val_accuracy"]
                   if base_eval["val_accuracy"] else float("nan"),
      "rest_steps": rest_summary["steps"], "rest_examples": rest_summary["num_examples"],
      "trainable_params": n_trainable,
      "full_checkpoint_mb": 4 * n_total / 1e6,
      "delta_checkpoint_mb": 4 * n_trainable / 1e6,
      "full_checkpoint_disk_mb": checkpointing.directory_bytes(model_dir) / 1e6
                                 if is_main else None,
      "delta_checkpoint_disk_mb": checkpointing.directory_bytes(delta_dir) / 1e6
                                  if is_main else None,
      "seconds": {**{k: round(v, 1) for k, v in shared_times.items()},
                  "selection_surgery": round(select_seconds, 2),
                  "eval_pruned": before["seconds"], "rest": rest_summary["seconds"],
                  "eval_retrained": after["seconds"]},
  }
  if is_main:
    write_json(result_path, row)
  return row


STAGE_COLUMNS = (("data", "data"), ("base_model", "base model"),
                 ("base_eval", "eval unpruned"), ("tstar", "t*"),
                 ("importance", "importance"), ("pseudo_labels", "pseudo-labels"),
                 ("selection_surgery", "selection+surgery"), ("eval_pruned", "eval pruned"),
                 ("rest", "ReSt"), ("eval_retrained", "eval retrained"))


def format_table(rows: list[dict]) -> str:
  """The final Markdown tables: results, then wall time per stage (seconds)."""
  lines = [
      "| target | MMT params kept | model params | val acc unpruned | pruned | "
      "retrained | retention | ReSt (%, k, steps) | full ckpt MB | delta MB |",
      "|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(
        f"| {r['target']} | {r['mmt_params']:,} ({100 * r['mmt_kept_fraction']:.1f}%) "
        f"| {r['model_params']:,} | {100 * r['unpruned_val_accuracy']:.2f} "
        f"| {100 * r['pruned_val_accuracy']:.2f} | {100 * r['retrained_val_accuracy']:.2f} "
        f"| {100 * r['retention']:.1f}% | {r['retrain_percent']:g}%, k={r['retrain_layers']}, "
        f"{r['rest_steps']} | {r['full_checkpoint_mb']:.2f} | {r['delta_checkpoint_mb']:.3f} |")
  lines += ["", "| wall time (s) | " + " | ".join(c for _, c in STAGE_COLUMNS) + " |",
            "|---" * (len(STAGE_COLUMNS) + 1) + "|"]
  for r in rows:
    s = r["seconds"]
    lines.append(f"| {r['target']} | " + " | ".join(
        f"{s[k]:.1f}" if k in s else "-" for k, _ in STAGE_COLUMNS) + " |")
  return "\n".join(lines) + "\n"


def write_table(rows: list[dict], stage_dir: str) -> None:
  text = format_table(rows)
  tmp = os.path.join(stage_dir, ".results.md.tmp")
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, os.path.join(stage_dir, "results.md"))
  tmp = os.path.join(stage_dir, ".results.jsonl.tmp")
  with open(tmp, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  os.replace(tmp, os.path.join(stage_dir, "results.jsonl"))
