"""The resumable data-parallel training loop, and one epoch over a subset with it.

`run_steps` is the one loop that both the base-model training
(`experiments/base_model.py`) and ReSt / full fine-tuning (`train_subset`, docs/LFPR.md §6)
run. It owns:

* resuming: the latest Orbax checkpoint in `<directory>` restores the train state,
  the Grain iterator position and the wall time of the earlier attempts; the JSONL
  metrics log is cut back to the restored step, so no step is logged twice;
* fetching each step's metrics one step late (the host never waits on the step it
  just dispatched), with a non-finite loss stopping the run by its step number;
* periodic logging, evaluation and checkpointing through one `is_time` rule; a
  checkpoint is always written where the run stops (end, `stop_after`, time budget).

`train_subset` is one epoch over a seeded subset of a built split with a rule-chosen
trainable set (ReSt's, or every parameter): each process reads only its own rows of
every global batch (`pipeline.global_batch_positions`), so a run on several hosts sees
the same global batches - and ends with the same parameters - as a single-host run.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Optional, Protocol

import grain
import jax
import numpy as np
import tqdm
from jax.sharding import Mesh

from lfpr_jax.data.pipeline import global_batch_positions, make_loader
from lfpr_jax.models.batch import STEP_FIELDS
from lfpr_jax.models.config import TapConfig
from lfpr_jax.models.tap import TAP
from lfpr_jax.training import checkpointing, optim, parallel
from lfpr_jax.training.step import (TrainState, init_state, make_train_step,
                                   make_trimmed_train_step)

PyTree = Any
Batch = dict[str, jax.Array]


def is_time(step: int, every: int | None, total: int | None = None) -> bool:
  """Whether a periodic action runs after `step` (1-based).

  Args:
    step: the number of steps done.
    every: the period; 0 or None never fires on the period.
    total: the last step, at which the action always runs; None for no such rule.
  """
  return bool(every and step % every == 0) or (total is not None and step == total)


def _rewrite_log(path: str, keep_through: int) -> None:
  """Keeps the records of `path` with step <= `keep_through` (temp file, rename)."""
  kept = []
  if os.path.exists(path):
    with open(path) as f:
      kept = [line for line in f if line.strip()
              and json.loads(line).get("step", 0) <= keep_through]
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    f.writelines(kept)
  os.replace(tmp, path)


def run_steps(step_fn: Callable[..., tuple[TrainState, dict]], state: TrainState,
              frozen: PyTree, batches_from: Callable[[int], Iterator[Batch]],
              rng: jax.Array, *, num_steps: int, mesh: Mesh,
              directory: Optional[str] = None, loader: Any = None,
              ckpt_every: int = 0, log_every: int = 1, log_path: Optional[str] = None,
              log: Optional[Callable[[dict], None]] = None, eval_every: int = 0,
              on_eval: Optional[Callable[[TrainState, int], dict]] = None,
              stop_after: Optional[int] = None, max_seconds: Optional[float] = None,
              progress: bool = True, desc: str = "train"
              ) -> tuple[TrainState, dict[str, Any]]:
  """Runs (or resumes) `num_steps` steps of `step_fn`.

  Args:
    step_fn: `step.make_train_step(...)`: (state, frozen, batch, rng) ->
      (state, {"loss": [], ...}), donating the state.
    state: the initial host train state (also the template a checkpoint restores into).
    frozen: the parameters that do not train.
    batches_from: `first_step -> iterator` of the global batches of steps
      `first_step + 1 .. num_steps` (called once, after any restore).
    rng: the dropout key (the step folds in its number).
    num_steps: the last step.
    mesh: the `data` mesh (state and frozen params are replicated on it).
    directory: the checkpoint directory; None for no checkpoints and no resume.
    loader: the Grain iterator behind the batches, saved with the state.
    ckpt_every: checkpoint period (a checkpoint is also written where the run stops).
    log_every: period of the metric records (and of the last step).
    log_path: JSONL file (process 0) of `{"step", <metrics>, "elapsed_s"}` records and
      the `on_eval` results; cut back to the restored step on resume.
    log: also called with each record (process 0).
    eval_every: period of `on_eval` before the last step.
    on_eval: (state, step) -> dict, logged with the step.
    stop_after: stop (with a checkpoint) after this many steps in this call; tests
      use it to simulate an interruption.
    max_seconds: stop (with a checkpoint) once the wall time of all attempts exceeds it.
    progress, desc: a progress bar on process 0; `desc` also names the run in errors.

  Returns:
    (state, summary): the replicated final state and `{"steps", "num_steps",
    "resumed_from", "seconds" (wall time of all attempts), "attempt_seconds",
    "final_loss", "mean_loss" (this attempt's steps), "complete", "stopped_by"}`.

  Raises:
    FloatingPointError: a step produced a non-finite loss (named by step number);
      the last good checkpoint is kept.
  """
  if directory is not None and loader is None:
    raise ValueError("a checkpointed run needs the `loader` whose position it saves.")
  is_main = jax.process_index() == 0
  manager = checkpointing.train_manager(directory) if directory is not None else None
  start_step, prior_seconds = 0, 0.0
  if manager is not None and manager.latest_step():
    start_step = int(manager.latest_step())
    state, meta = checkpointing.restore_train_checkpoint(
        manager, start_step, jax.tree.map(np.asarray, state), loader)
    prior_seconds = float(meta.get("elapsed_s", 0.0))
  if log_path is not None and is_main:
    _rewrite_log(log_path, start_step)
  state = parallel.replicate(state, mesh)
  frozen = parallel.replicate(frozen, mesh)
  batches = batches_from(start_step)
  t0 = time.time()
  elapsed = lambda: prior_seconds + time.time() - t0
  bar = tqdm.tqdm(total=num_steps, initial=start_step, desc=desc,
                  disable=not (progress and is_main))
  losses: list[float] = []
  last_good = start_step

  def write(record: dict) -> None:
    if not is_main:
      return
    if log_path is not None:
      with open(log_path, "a") as f:
        f.write(json.dumps(record) + "\n")
    if log is not None:
      log(record)

  def finish(metrics: Mapping[str, jax.Array], step: int) -> None:
    values = {k: float(v) for k, v in metrics.items()}
    if not math.isfinite(values["loss"]):
      raise FloatingPointError(
          f"{desc} step {step} produced a non-finite loss ({values['loss']}); "
          f"stopping. The last good checkpoint is step {last_good} in {directory}.")
    losses.append(values["loss"])
    if is_time(step, log_every, num_steps):
      bar.set_postfix(loss=f"{values['loss']:.3f}")
      write({"step": step, **values, "elapsed_s": round(elapsed(), 1)})

  pending = None
  step = start_step
  stopped_by = "end"
  try:
    while step < num_steps:
      state, metrics = step_fn(state, frozen, next(batches), rng)
      step += 1
      bar.update(1)
      if pending is not None:  # the previous step's metrics: no wait on this step
        finish(*pending)
      pending = (metrics, step)
      if on_eval is not None and step < num_steps and is_time(step, eval_every):
        finish(*pending)
        pending = None
        write({"step": step, **on_eval(state, step)})
      if stop_after is not None and step - start_step >= stop_after:
        stopped_by = "stop_after"
      elif max_seconds is not None and elapsed() > max_seconds:
        stopped_by = "time_budget"
        bar.write(f"{desc}: time budget of {max_seconds:.0f} s reached at step {step}")
      stop = step == num_steps or stopped_by != "end"
      if manager is not None and (stop or is_time(step, ckpt_every)):
        if pending is not None:  # never checkpoint past an unchecked step
          finish(*pending)
          pending = None
        checkpointing.save_train_checkpoint(manager, step, state, loader,
                                            meta={"elapsed_s": elapsed()})
        last_good = step
      if stop:
        break
    if pending is not None:
      finish(*pending)
  finally:
    bar.close()
  summary = {"steps": int(step), "num_steps": num_steps,
             "resumed_from": int(start_step), "seconds": round(elapsed(), 1),
             "attempt_seconds": round(time.time() - t0, 1),
             "final_loss": losses[-1] if losses else None,
             "mean_loss": float(np.mean(losses)) if losses else None,
             "complete": int(step) >= num_steps, "stopped_by": stopped_by}
  return state, summary


class SubsetSettings(Protocol):
  """What `train_subset` reads of its settings (`pruning.rest.RestSettings`)."""
  lr: float
  mask_lr: float
  clip_norm: float
  batch_size: int
  loss_shards: int
  fixed_dropout_key: bool
  microbatches: int
  seed: int
  ckpt_every: int


def train_subset(*, model_config: TapConfig, params: PyTree,
                 rules: Sequence[optim.Rule], settings: SubsetSettings,
                 built_dir: str, split: str, indices: np.ndarray,
                 transforms: Sequence[grain.transforms.Map], directory: str, mesh: Mesh,
                 rng: jax.Array, progress: bool = True,
                 log: Optional[Callable[[dict], None]] = None,
                 log_path: Optional[str] = None, stop_after: Optional[int] = None,
                 desc: str = "ReSt", trim: bool = False) -> tuple[PyTree, dict[str, Any]]:
  """One epoch over `indices` of `split`, training the leaves `rules` name.

  Adam per group (`"base"` at `settings.lr`, `"mask"` at `settings.mask_lr`),
  constant rate, global-norm clipping over the trained gradients only (docs/LFPR.md §6.5);
  the last global batch is padded with rows whose loss mask is 0 (§6.2). Resumes from
  `<directory>/ckpt`.

  Args:
    model_config: the architecture (pruned, with learnable masks for ReSt).
    params: the parameters (host or replicated arrays).
    rules: `(regex, group)` rules of the trained leaves (`rest.trainable_rules`).
    settings: batch size, rates, clipping, seeds, checkpoint period.
    built_dir, split: the built split.
    indices: the records of the subset.
    transforms: per-example maps (e.g. the pseudo-label targets).
    directory: where checkpoints go (`<directory>/ckpt`).
    mesh: the `data` mesh.
    rng: the dropout key.
    progress: show a progress bar.
    log, log_path: per-step metric records (see `run_steps`).
    stop_after: see `run_steps`.
    desc: the run's name in the progress bar and errors.
    trim: exact variable-length execution (`step.make_trimmed_train_step`): every
      global batch is cut to bucketed segment lengths, one compiled step per shape.

  Returns:
    (params, summary): all parameters on the host, and `run_steps`'s summary plus
    `num_examples`, `num_trainable` and the `trainable_rules`.
  """
  if settings.batch_size % jax.process_count():
    raise ValueError(f"batch {settings.batch_size} is not divisible by the "
                     f"{jax.process_count()} processes.")
  parallel.check_batch_size(settings.batch_size, mesh)
  local_batch = settings.batch_size // jax.process_count()
  # Exactly one epoch: ceil(N / global batch) steps, the last one partial.
  num_steps = math.ceil(len(indices) / settings.batch_size)
  trainable, frozen = optim.split_params(params, rules)
  tx = optim.make_optimizer(trainable, rules,
                            {"base": settings.lr, "mask": settings.mask_lr},
                            warmup_steps=0, clip_norm=settings.clip_norm)
  state = init_state(jax.device_get(trainable), tx)
  rows = parallel.process_rows(settings.batch_size, mesh)
  if rows.stop - rows.start != local_batch:
    raise ValueError(f"process {jax.process_index()} holds {rows.stop - rows.start} "
                     f"rows of the global batch, expected {local_batch}.")
  positions = global_batch_positions(len(indices), settings.batch_size, rows,
                                     seed=settings.seed)
  if not len(positions):
    raise ValueError(f"the subset of {len(indices)} records leaves process "
                     f"{jax.process_index()} no rows of the global batch of "
                     f"{settings.batch_size}.")
  local_indices = np.asarray(indices)[positions]

  def local_loader(records):  # this process's part of every global batch, in order
    return make_loader(built_dir, split, local_batch, shuffle=False, num_epochs=1,
                       drop_remainder=False, shard_index=0, shard_count=1,
                       indices=records, transforms=transforms)

  loader = local_loader(local_indices)

  def batches_from(start: int) -> Iterator[Any]:
    # A process with no rows in the last, partial global batch pads with its first
    # batch (loss mask 0) - also when resumed right before that batch.
    kw = dict(local_batch=local_batch, num_batches=num_steps - start, mesh=mesh,
              fields=STEP_FIELDS, progress=False,
              fill=lambda: next(local_loader(local_indices[:local_batch])))
    return parallel.input_batches(loader, trim_config=model_config if trim else None,
                                  **kw)

  make_step = make_trimmed_train_step if trim else make_train_step
  step_fn = make_step(TAP(model_config), tx, mesh, loss_shards=settings.loss_shards,
                      fixed_dropout_key=settings.fixed_dropout_key,
                      microbatches=settings.microbatches)
  state, summary = run_steps(
      step_fn, state, frozen, batches_from, rng, num_steps=num_steps, mesh=mesh,
      directory=os.path.join(directory, "ckpt"), loader=loader,
      ckpt_every=settings.ckpt_every, log_every=1, log_path=log_path, log=log,
      stop_after=stop_after, progress=progress, desc=desc)
  params_out = optim.merge_params(jax.device_get(state.params), jax.device_get(frozen))
  summary.update(num_examples=len(indices),
                 num_trainable=int(sum(np.size(x) for x in jax.tree.leaves(trainable))),
                 trainable_rules=[list(r) for r in rules])
  return params_out, summary
