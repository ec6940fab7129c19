"""ReSt: one epoch of retraining a pruned TAP on pseudo-labels (LFPR.md §6).

* Trainable set by name (§6.3): every learnable head/neuron mask, the classifier (the
  tied answer embedding and its bias), the OCR pointer network and every parameter of
  the last k MMT layers; everything else is frozen and never leaves its initial value.
* Adam with two learning rates through `optax.multi_transform` (masks 1e-3, the rest
  5e-5), constant (upstream's schedule never leaves factor 1), global-norm clipping at
  0.25 over the trainable gradients only (§6.5).
* Exactly one epoch of the seeded `percent`% subset, the last batch padded with rows
  whose loss mask is 0 (§6.2); teacher forcing on the pseudo-label's decoder inputs.
* Data parallel: `jax.jit` over the `data` mesh. The subset is shuffled once (seeded)
  and cut into global batches; each process reads only its own rows of every global
  batch (`pipeline.global_batch_positions`), so a run on several hosts sees the same
  global batches - and ends with the same parameters - as a single-host run.
* Resumable: an Orbax `CheckpointManager` in `<dir>/ckpt` holds the train state and
  the Grain iterator position every `ckpt_every` steps; a restarted run continues from
  the last one and ends with the same parameters as an uninterrupted run. A non-finite
  loss stops the run with its step number; the last good checkpoint is kept.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import grain
import jax
import numpy as np
import tqdm
from jax.sharding import Mesh

from lfpr_jax.training import checkpointing
from lfpr_jax.training import parallel
from lfpr_jax.training import step as train
from lfpr_jax.data.pipeline import global_batch_positions, make_loader
from lfpr_jax.models.batch import STEP_FIELDS
from lfpr_jax.models.config import TapConfig
from lfpr_jax.models.tap import TAP

PyTree = Any



def trainable_patterns(config: TapConfig, layers: int) -> list[str]:
  """Path regexes of ReSt's trainable set with the last `layers` MMT layers (§6.3)."""
  n = config.mmt_layers
  if not 0 <= layers <= n:
    raise ValueError(f"ReSt can retrain 0..{n} trailing MMT layers, got {layers}.")
  patterns = [train.GROUP_PATTERNS[0][1].pattern,  # the masks of every layer
              r"^classifier_", r"^ocr_ptr_net/"]
  patterns += [rf"^mmt_layer_{i}/" for i in range(n - layers, n)]
  return patterns


@dataclasses.dataclass(frozen=True)
class RestSettings:
  """Hyper-parameters of one ReSt run (config section `rest` plus the schedule)."""
  percent: float
  layers: int
  lr: float = 5e-5
  mask_lr: float = 1e-3
  clip_norm: float = 0.25
  batch_size: int = 16
  loss_shards: int = 1
  fixed_dropout_key: bool = False
  seed: int = 0
  ckpt_every: int = 100

  def num_steps(self, num_examples: int) -> int:
    """Exactly one epoch: ceil(N / global batch) steps, the last one partial."""
    return math.ceil(num_examples / self.batch_size)


def upstream_iterations(num_examples: int, *, gpus: int = 2, per_gpu: int = 8) -> int:
  """Upstream's `max_iterations`: ceil(ceil(N / gpus) / per_gpu) (LFPR.md §6.2)."""
  return math.ceil(math.ceil(num_examples / gpus) / per_gpu)


def retrain(*, model_config: TapConfig, params: PyTree, built_dir: str, split: str,
            indices: np.ndarray, transforms: Sequence[grain.transforms.Map],
            settings: RestSettings, directory: str, mesh: Mesh, rng: jax.Array,
            progress: bool = True, log: Callable[[dict], None] | None = None,
            stop_after: int | None = None, trainable: Sequence[str] | None = None
            ) -> tuple[PyTree, dict[str, Any]]:
  """One epoch of ReSt on `indices` of `split`; resumes from `<directory>/ckpt`.

  Args:
    model_config: the pruned architecture (with learnable masks).
    params: the pruned parameters (host or replicated arrays).
    built_dir, split: the built training split.
    indices: the records of the retraining subset.
    transforms: per-example maps (the pseudo-label targets).
    settings: `RestSettings`.
    directory: where checkpoints go.
    mesh: the `data` mesh.
    rng: the dropout key.
    progress: show a progress bar.
    log: called with one metrics dict per step (process 0 writes it).
    stop_after: stop (with a checkpoint) after this many steps in this call - tests
      use it to simulate an interruption.
    trainable: path regexes of the trained parameters instead of ReSt's set (e.g.
      `[".*"]` for full fine-tuning).

  Returns:
    (params, summary): the retrained parameters on the host and a summary dict.

  Raises:
    FloatingPointError: a step produced a non-finite loss (named by step number).
  """
  if settings.batch_size % jax.process_count():
    raise ValueError(f"ReSt batch {settings.batch_size} is not divisible by the "
                     f"{jax.process_count()} processes.")
  parallel.check_batch_size(settings.batch_size, mesh)
  local_batch = settings.batch_size // jax.process_count()
  num_steps = settings.num_steps(len(indices))
  model = TAP(model_config)
  patterns = (list(trainable) if trainable is not None
              else trainable_patterns(model_config, settings.layers))
  trainable, frozen = train.split_params(
      params, patterns)
  tx = train.make_optimizer(trainable, lr=settings.lr, mask_lr=settings.mask_lr,
                            warmup_steps=0, clip_norm=settings.clip_norm,
                            group_scales={"text_bert": 1.0, "fc7": 1.0})
  state = train.init_state(jax.device_get(trainable), tx)
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
  manager = checkpointing.train_manager(os.path.join(directory, "ckpt"))
  start_step = manager.latest_step() or 0
  if start_step:
    state = checkpointing.restore_train_checkpoint(
        manager, start_step, jax.tree.map(np.asarray, state), loader)
  state = parallel.replicate(state, mesh)
  frozen = parallel.replicate(frozen, mesh)
  step_fn = train.make_train_step(model, tx, mesh, loss_shards=settings.loss_shards,
                                  fixed_dropout_key=settings.fixed_dropout_key)
  is_main = jax.process_index() == 0
  bar = tqdm.tqdm(total=num_steps, initial=start_step, desc="ReSt",
                  disable=not (progress and is_main))
  t0 = time.time()
  losses = []
  last_good = start_step

  def finish(metrics, step):
    loss = float(metrics["loss"])
    if not math.isfinite(loss):
      bar.close()
      raise FloatingPointError(
          f"ReSt step {step} produced a non-finite loss ({loss}); stopping. The last "
          f"good checkpoint is step {last_good} in {directory}/ckpt.")
    record = {"step": step, "loss": loss, "grad_norm": float(metrics["grad_norm"])}
    losses.append(loss)
    bar.set_postfix(loss=f"{loss:.3f}")
    if log is not None and is_main:
      log(record)

  pending = None
  last_batch = None
  step = start_step
  while step < num_steps:
    batch = next(loader, None)
    if batch is None:  # no rows of this process in the last, partial global batch
      if last_batch is None:  # resumed right before that batch
        last_batch = next(local_loader(local_indices[:local_batch]))
      batch = {**last_batch,
               "train_loss_mask": np.zeros_like(last_batch["train_loss_mask"])}
    last_batch = batch
    feed = train.pad_batch({k: batch[k] for k in STEP_FIELDS}, local_batch)
    state, metrics = step_fn(state, frozen, parallel.global_batch(feed, mesh), rng)
    step += 1
    bar.update(1)
    if pending is not None:
      finish(*pending)
    pending = (metrics, step)
    at_end = step == num_steps or (stop_after is not None and
                                   step - start_step >= stop_after)
    if at_end or (settings.ckpt_every and step % settings.ckpt_every == 0):
      finish(*pending)  # never checkpoint past an unchecked step
      pending = None
      checkpointing.save_train_checkpoint(manager, step, state, loader)
      last_good = step
    if at_end:
      break
  if pending is not None:
    finish(*pending)
  bar.close()
  params_out = train.merge_params(jax.device_get(state.params), jax.device_get(frozen))
  summary = {"steps": int(step), "num_steps": num_steps, "num_examples": len(indices),
             "resumed_from": int(start_step), "seconds": round(time.time() - t0, 1),
             "final_loss": losses[-1] if losses else None,
             "mean_loss": float(np.mean(losses)) if losses else None,
             "num_trainable": int(sum(np.size(x) for x in jax.tree.leaves(trainable))),
             "trainable_patterns": list(patterns),
             "complete": int(step) >= num_steps}
  return params_out, summary


def trainable_params(params: PyTree, config: TapConfig, layers: int) -> dict:
  """The ReSt-trained subtree of `params` (what a delta checkpoint stores)."""
  return train.split_params(params, trainable_patterns(config, layers))[0]


def write_json(path: str, obj: Any) -> None:
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)
