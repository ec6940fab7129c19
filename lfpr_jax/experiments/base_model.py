"""Fine-tuning TAP with labels: the base model of the synthetic benchmark.

`train_and_evaluate` trains a TAP from scratch with the upstream
recipe (Adam, warm-up, global-norm clipping, docs/TAP.md §10) on a `data` mesh, evaluates
greedy-decoding accuracy on val, and writes the model directory, JSONL metrics and a
summary to the workdir. `question_only=True` trains the image-blind ablation.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from typing import Any, Optional

import jax
import ml_collections
import numpy as np
import tqdm

from lfpr_jax.data import prepare
from lfpr_jax.data.pipeline import make_loader, open_source
from lfpr_jax.models.batch import STEP_FIELDS
from lfpr_jax.models.params import count_params, init_params
from lfpr_jax.models.tap import TAP
from lfpr_jax.training import checkpointing, loop, optim, parallel
from lfpr_jax.training.evaluate import evaluate
from lfpr_jax.training.step import (init_state, make_predict, make_train_step,
                                   make_trimmed_train_step)


def question_only_batch(batch: Mapping[str, Any], question_len: int) -> dict[str, Any]:
  """The ablation that ignores the image: no objects, no OCR, question text only.

  Object/OCR counts become 0 (every object and OCR row is a masked key, no OCR token
  can be copied), their features, boxes and the OCR/object-name wordpieces are zeroed.
  """
  out = dict(batch)
  text = np.array(batch["cmb_text"])
  text[:, question_len:] = 0
  out["cmb_text"] = text
  for k in ("obj_num", "ocr_num"):
    out[k] = np.zeros_like(np.asarray(batch[k]))
  for k in ("image_feature_0", "obj_bbox_coordinates", "image_feature_1",
            "context_feature_0", "context_feature_1", "ocr_bbox_coordinates"):
    out[k] = np.zeros_like(np.asarray(batch[k]))
  return out


def _step_batch(batch: dict, question_len: int, ablate: bool, num_answers: int) -> dict:
  if ablate:
    batch = question_only_batch(batch, question_len)
    # No OCR token is left to copy: drop the copy targets. Their logits are masked to
    # -1e4, so a positive target there adds ~1e4 to the loss and a constant push on
    # the pointer scores, which then outgrow the mask and win every argmax.
    targets = np.array(batch["targets"])
    targets[..., num_answers:] = 0.0
    batch["targets"] = targets
  return batch


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       question_only: bool = False,
                       out_name: Optional[str] = None) -> dict[str, Any]:
  """Trains a TAP from scratch on `config.data` and evaluates it on val.

  Resumable: the run checkpoints into `<workdir>/<out_name>_ckpt` where it stops (and
  every `config.train.ckpt_every` steps if set); a rerun continues from there, with
  the time budget `config.train.max_minutes` counting every attempt.

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
  rules = optim.UPSTREAM_GROUPS
  trainable, frozen = optim.split_params(params, rules)
  tx = optim.make_optimizer(trainable, rules, optim.upstream_learning_rates(o.lr),
                            warmup_steps=o.warmup_steps,
                            warmup_factor=o.warmup_factor,
                            decay_steps=tuple(o.decay_steps),
                            decay_ratio=o.decay_ratio, clip_norm=o.clip_norm)
  # Exact variable-length execution (`config.trim`): one compiled step per shape.
  trim = bool(config.get("trim", False))
  step_fn = (make_trimmed_train_step if trim else make_train_step)(
      model, tx, mesh, microbatches=t.get("microbatches", 1))
  predict = make_predict(model, mesh, data.vocab.bos_idx)
  loader = make_loader(data.built_dir, "train", local_batch, seed=config.seed,
                       num_epochs=None)
  num_val = len(open_source(data.built_dir, "val"))
  transform = ((lambda b: question_only_batch(b, c.question_len)) if question_only
               else None)

  def val_result(state, limit=None):
    num = parallel.num_global_batches(num_val, local_batch)
    if limit is not None:  # the first `limit` examples of every process, in batches
      num = min(num, -(-limit // local_batch))
    batches = make_loader(data.built_dir, "val", local_batch, shuffle=False,
                          drop_remainder=False)
    return evaluate(predict, optim.merge_params(state.params, frozen), batches,
                    data.vocab, mesh, dataset=data.layout.dataset,
                    local_batch=local_batch, num_batches=num, transform=transform)

  def on_eval(state, step):
    acc = val_result(state, limit=t.get("eval_limit"))["accuracy"]
    if is_main:
      tqdm.tqdm.write(f"step {step}: val accuracy {acc:.4f}")
    return {"val_accuracy": acc}

  def batches_from(start: int) -> Iterator[Any]:
    local = (_step_batch(b, c.question_len, question_only, c.num_answers)
             for b in loader)
    kw = dict(local_batch=local_batch, num_batches=t.num_steps - start, mesh=mesh,
              fields=STEP_FIELDS, progress=False)
    return parallel.input_batches(local, trim_config=c if trim else None, **kw)

  os.makedirs(workdir, exist_ok=True)
  log_path = os.path.join(workdir, f"{out_name}_metrics.jsonl")
  state, run = loop.run_steps(
      step_fn, init_state(trainable, tx), frozen, batches_from, dropout_rng,
      num_steps=t.num_steps, mesh=mesh,
      directory=os.path.join(workdir, f"{out_name}_ckpt"), loader=loader,
      ckpt_every=t.get("ckpt_every", 0), log_every=t.log_every, log_path=log_path,
      eval_every=t.eval_every, on_eval=on_eval,
      max_seconds=t.max_minutes * 60 if t.get("max_minutes") else None,
      desc=f"train {out_name}")
  result = val_result(state)
  params = optim.merge_params(jax.device_get(state.params), frozen)
  summary = {"model": out_name, "question_only": question_only, "steps": run["steps"],
             "train_seconds": run["seconds"],
             "val_accuracy": result["accuracy"], "val_examples": result["num_examples"],
             "val_metrics": result["metrics"],
             "num_params": count_params(params), "config": c.to_dict()}
  if is_main:
    with open(log_path) as f:
      history = [r for r in map(json.loads, f) if "loss" in r]
    checkpointing.save_model(os.path.join(workdir, out_name), c, params, overwrite=True)
    tmp = os.path.join(workdir, f".{out_name}.json.tmp")
    with open(tmp, "w") as f:
      json.dump({**summary, "history": history}, f, indent=1)
    os.replace(tmp, os.path.join(workdir, f"{out_name}.json"))
  return summary


def question_only(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """The image-blind ablation's summary (trained once per workdir, then reused)."""
  name = "question_only_model"
  summary_path = os.path.join(workdir, f"{name}.json")
  if os.path.exists(os.path.join(workdir, name, checkpointing.ARCH_FILE)) and (
      os.path.exists(summary_path)):
    with open(summary_path) as f:
      return json.load(f)
  return train_and_evaluate(config, workdir, question_only=True)


def format_summary(summary: Mapping[str, Any]) -> str:
  """One line: the model's val metrics, steps, time and size."""
  metrics = ", ".join(f"{k} {v:.4f}" for k, v in summary["val_metrics"].items())
  return (f"{summary['model']}: val {metrics} on {summary['val_examples']} questions "
          f"after {summary['steps']} steps ({summary['train_seconds']:.0f} s), "
          f"{summary['num_params']:,} parameters")
