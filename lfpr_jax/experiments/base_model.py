"""Fine-tuning TAP with labels: the base model of the synthetic benchmark.

`train_and_evaluate` trains a TAP from scratch with the upstream
recipe (Adam, warm-up, global-norm clipping, TAP.md §10) on a `data` mesh, evaluates
greedy-decoding accuracy on val, and writes the model directory, JSONL metrics and a
summary to the workdir. `question_only=True` trains the image-blind ablation.
"""

from __future__ import annotations


import json
import os
import time
from typing import Any, Optional

import jax
import ml_collections
import numpy as np
import tqdm

from lfpr_jax.training import checkpointing
from lfpr_jax.training import parallel
from lfpr_jax.training import step as train

from lfpr_jax.data import prepare
from lfpr_jax.data.pipeline import make_loader
from lfpr_jax.data.vocab import AnswerVocab
from lfpr_jax.models.batch import STEP_FIELDS
from lfpr_jax.models.config import TapConfig
from lfpr_jax.models.params import count_params, init_params
from lfpr_jax.models.tap import TAP



def _step_batch(batch: dict, question_len: int, ablate: bool, num_answers: int) -> dict:
  if ablate:
    batch = train.question_only(batch, question_len)
    # No OCR token is left to copy: drop the copy targets. Their logits are masked to
    # -1e4, so a positive target there adds ~1e4 to the loss and a constant push on
    # the pointer scores, which then outgrow the mask and win every argmax.
    targets = np.array(batch["targets"])
    targets[..., num_answers:] = 0.0
    batch["targets"] = targets
  return {k: batch[k] for k in STEP_FIELDS}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       question_only: bool = False,
                       out_name: Optional[str] = None) -> dict[str, Any]:
  """Trains a TAP from scratch on `config.data` and evaluates it on val.

  Args:
    config: sections `data`, `model`, `optim`, `train` (see configs/synthetic.py).
    workdir: output directory (dataset build, model, metrics).
    question_only: train and evaluate the image-blind ablation.
    out_name: model directory name under workdir (default `base_model`, or
      `question_only_model`).

  Returns:
    A summary dict (also written to `<workdir>/<out_name>.json`).
  """
  data = prepare.prepare_data(config, workdir)
  c, t, o = data.model_config, config.train, config.optim
  out_name = out_name or ("question_only_model" if question_only else "base_model")
  is_main = jax.process_index() == 0
  mesh = parallel.make_mesh()
  parallel.check_batch_size(t.batch_size, mesh)
  local_batch = t.batch_size // jax.process_count()

  rng = jax.random.key(config.seed)
  init_rng, dropout_rng = jax.random.split(rng)
  model = TAP(c)
  params = init_params(c, init_rng)
  trainable, frozen = train.split_params(params, None)
  tx = train.make_optimizer(trainable, lr=o.lr, warmup_steps=o.warmup_steps,
                            warmup_factor=o.warmup_factor,
                            decay_steps=tuple(o.decay_steps),
                            decay_ratio=o.decay_ratio, clip_norm=o.clip_norm)
  state = parallel.replicate(train.init_state(trainable, tx), mesh)
  frozen = parallel.replicate(frozen, mesh)
  step_fn = train.make_train_step(model, tx, mesh)
  predict = train.make_predict(model, mesh, data.vocab.bos_idx)
  loader = make_loader(data.built_dir, "train", local_batch, seed=config.seed,
                       num_epochs=None)

  def val_accuracy(limit=None):
    batches = make_loader(data.built_dir, "val", local_batch, shuffle=False,
                          drop_remainder=False)
    return train.evaluate(predict, train.merge_params(state.params, frozen), batches,
                          data.vocab, mesh, local_batch=local_batch,
                          question_len=c.question_len, ablate_image=question_only,
                          limit=limit)

  os.makedirs(workdir, exist_ok=True)
  log_path = os.path.join(workdir, f"{out_name}_metrics.jsonl")
  start = time.time()
  budget = t.max_minutes * 60 if t.get("max_minutes") else None
  history = []
  pending = None
  bar = tqdm.tqdm(total=t.num_steps, desc=f"train {out_name}", disable=not is_main)
  step = 0
  for step in range(1, t.num_steps + 1):
    batch = _step_batch(next(loader), c.question_len, question_only, c.num_answers)
    state, metrics = step_fn(state, frozen, parallel.global_batch(batch, mesh),
                             dropout_rng)
    bar.update(1)
    if pending is not None:  # fetch the previous step's metrics: no per-step sync
      record = {"step": step - 1, **{k: float(v) for k, v in pending.items()},
                "elapsed_s": round(time.time() - start, 1)}
      if (step - 1) % t.log_every == 0:
        history.append(record)
        bar.set_postfix(loss=f"{record['loss']:.3f}")
        if is_main:
          with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
    pending = metrics
    if t.eval_every and step % t.eval_every == 0 and step < t.num_steps:
      acc = val_accuracy(limit=t.get("eval_limit"))["accuracy"]
      bar.write(f"step {step}: val accuracy {acc:.4f} ({time.time() - start:.0f} s)")
      if is_main:
        with open(log_path, "a") as f:
          f.write(json.dumps({"step": step, "val_accuracy": acc}) + "\n")
    if budget is not None and time.time() - start > budget:
      bar.write(f"time budget of {t.max_minutes} min reached at step {step}")
      break
  bar.close()
  train_seconds = time.time() - start
  result = val_accuracy()
  params = train.merge_params(jax.device_get(state.params), jax.device_get(frozen))
  summary = {"model": out_name, "question_only": question_only, "steps": step,
             "train_seconds": round(train_seconds, 1),
             "val_accuracy": result["accuracy"], "val_examples": result["num_examples"],
             "num_params": count_params(params), "config": c.to_dict()}
  if is_main:
    checkpointing.save_model(os.path.join(workdir, out_name), c, params, overwrite=True)
    tmp = os.path.join(workdir, f".{out_name}.json.tmp")
    with open(tmp, "w") as f:
      json.dump({**summary, "history": history}, f, indent=1)
    os.replace(tmp, os.path.join(workdir, f"{out_name}.json"))
  return summary
