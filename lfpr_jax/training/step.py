"""Training TAP: upstream optimiser groups, jitted data-parallel steps, evaluation.

Pure pieces used by fine-tuning (the synthetic base model, TAP.md §10) and by ReSt
retraining (LFPR.md §6): which parameters train (`split_params`), the optimiser with
per-group learning rates (`make_optimizer`), `train_step` (a pure function, jitted
over a `data` mesh by `make_train_step`), and greedy-decoding evaluation.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import flax
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from lfpr_jax.training import parallel
from lfpr_jax.models.decoding import greedy_decode
from lfpr_jax.models.losses import m4c_decoding_bce
from lfpr_jax.models.tap import TAP

PyTree = Any
Array = jax.Array

# Upstream parameter groups (TAP.md §10, §5.2): text-BERT and the fc7 layers at 0.1x
# the base learning rate, the LFPR mask parameters at their own rate.
GROUP_PATTERNS = (
    ("mask", re.compile(r"^mmt_layer_\d+/(attention/head_mask|ffn/ffn_mask)$")),
    ("text_bert", re.compile(r"^text_bert/")),
    ("fc7", re.compile(r"^(obj|ocr)_fc7/")),
)


def flat(tree: Mapping[str, Any]) -> dict[str, Any]:
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep="/")


def unflat(d: Mapping[str, Any]) -> dict[str, Any]:
  return flax.traverse_util.unflatten_dict(dict(d), sep="/")


def split_params(params: PyTree, trainable: Sequence[str] | None
                 ) -> tuple[dict, dict]:
  """Splits params into (trainable, frozen) nested dicts by path regexes.

  Args:
    params: the model parameters.
    trainable: regexes matched (`re.search`) against '/'-joined paths; None = all.

  Returns:
    Two nested dicts whose union is `params`.
  """
  if trainable is None:
    return flax.core.unfreeze(params), {}
  pats = [re.compile(p) for p in trainable]
  t, f = {}, {}
  for path, leaf in flat(params).items():
    (t if any(p.search(path) for p in pats) else f)[path] = leaf
  if not t:
    raise ValueError(f"no parameter matches the trainable patterns {list(trainable)}.")
  return unflat(t), unflat(f)


def merge_params(*trees: Mapping[str, Any]) -> dict:
  out = {}
  for tree in trees:
    out.update(flat(tree))
  return unflat(out)


def group_of(path: str) -> str:
  for name, pattern in GROUP_PATTERNS:
    if pattern.search(path):
      return name
  return "default"


def upstream_schedule(base_lr: float, *, warmup_steps: int = 1000,
                      warmup_factor: float = 0.2, decay_steps: Sequence[int] = (),
                      decay_ratio: float = 0.1) -> optax.Schedule:
  """Pythia's schedule: linear warm-up from `warmup_factor`, then step decays.

  `warmup_steps <= 0` means no warm-up (upstream `use_warmup: false`).
  """
  steps = sorted(int(s) for s in decay_steps)
  if warmup_steps <= 0 and not steps:
    return optax.constant_schedule(base_lr)  # ReSt: `use_warmup: false`, no decay

  def schedule(count):
    count = jnp.asarray(count, jnp.float32)
    n_decays = sum((count >= s).astype(jnp.float32) for s in steps) if steps else 0.0
    decayed = decay_ratio ** n_decays
    if warmup_steps <= 0:
      return base_lr * decayed
    alpha = jnp.minimum(count / warmup_steps, 1.0)
    warm = warmup_factor * (1.0 - alpha) + alpha
    return base_lr * jnp.where(count <= warmup_steps, warm, decayed)
  return schedule


def make_optimizer(trainable_params: PyTree, *, lr: float, warmup_steps: int = 1000,
                   warmup_factor: float = 0.2, decay_steps: Sequence[int] = (),
                   decay_ratio: float = 0.1, clip_norm: float | None = 0.25,
                   group_scales: Mapping[str, float] | None = None,
                   mask_lr: float | None = None, eps: float = 1e-8
                   ) -> optax.GradientTransformation:
  """Adam with upstream parameter groups, global-norm clipping of the trained grads.

  Args:
    trainable_params: the parameters that train (frozen ones are not passed here,
      so clipping sees only trained gradients, as in LFPR's ReSt).
    lr: base learning rate.
    warmup_steps, warmup_factor, decay_steps, decay_ratio: `upstream_schedule`.
    clip_norm: global-norm clip (upstream 0.25), None for none.
    group_scales: lr multipliers per group (default text_bert and fc7 at 0.1).
    mask_lr: learning rate of the LFPR mask parameters (default: lr).
    eps: Adam epsilon.
  """
  scales = {"text_bert": 0.1, "fc7": 0.1, **dict(group_scales or {})}
  sched = dict(warmup_steps=warmup_steps, warmup_factor=warmup_factor,
               decay_steps=decay_steps, decay_ratio=decay_ratio)
  transforms = {
      "default": optax.adam(upstream_schedule(lr, **sched), eps=eps),
      "mask": optax.adam(upstream_schedule(lr if mask_lr is None else mask_lr, **sched),
                         eps=eps),
  }
  for name, scale in scales.items():
    transforms[name] = optax.adam(upstream_schedule(lr * scale, **sched), eps=eps)
  labels = unflat({p: group_of(p) for p in flat(trainable_params)})
  chain = [optax.multi_transform(transforms, labels)]
  if clip_norm is not None:
    chain.insert(0, optax.clip_by_global_norm(clip_norm))
  return optax.chain(*chain)


@flax.struct.dataclass
class TrainState:
  """Trainable params + optimiser state; frozen params travel separately."""
  step: Array
  params: PyTree
  opt_state: PyTree


def init_state(trainable: PyTree, tx: optax.GradientTransformation) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=trainable,
                    opt_state=tx.init(trainable))


def sharded_loss(scores: Array, targets: Array, loss_mask: Array, shards: int = 1
                 ) -> Array:
  """The M4C BCE normalised per shard of the batch, averaged over the shards.

  `shards=1` normalises by the global number of supervised steps (clean); upstream's
  DDP ReSt normalises on each GPU's 8 samples and averages the gradients (LFPR.md
  §6.4), which `shards=2` on a batch of 16 reproduces.
  """
  if shards == 1:
    return m4c_decoding_bce(scores, targets, loss_mask)
  b = scores.shape[0]
  if b % shards:
    raise ValueError(f"batch {b} is not divisible into {shards} loss shards.")
  split = lambda a: a.reshape((shards, b // shards) + a.shape[1:])
  return jnp.mean(jax.vmap(m4c_decoding_bce)(split(scores), split(targets),
                                              split(loss_mask)))


def train_step(state: TrainState, frozen: PyTree, batch: Mapping[str, Array],
               rng: Array, *, model: TAP, tx: optax.GradientTransformation,
               loss_shards: int = 1, fixed_dropout_key: bool = False
               ) -> tuple[TrainState, dict[str, Array]]:
  """One optimiser step on the M4C decoding BCE with dropout on (pure).

  Only `state.params` (the trainable subtree) is differentiated, so the clipping norm
  of `tx` sees trainable gradients only. `fixed_dropout_key` reuses `rng` at every
  step (upstream re-seeds torch to 0 in every forward); otherwise the key is folded
  with the step number.
  """
  dropout_rng = rng if fixed_dropout_key else jax.random.fold_in(rng, state.step)

  def loss_fn(trainable):
    scores = model.apply({"params": merge_params(trainable, frozen)}, batch,
                         train=True, rngs={"dropout": dropout_rng})
    return sharded_loss(scores, batch["targets"], batch["train_loss_mask"],
                        loss_shards)

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def make_train_step(model: TAP, tx: optax.GradientTransformation, mesh: Mesh, *,
                    loss_shards: int = 1, fixed_dropout_key: bool = False
                    ) -> Callable[..., tuple[TrainState, dict]]:
  """`train_step` jitted over the mesh: batch sharded on `data`, the rest replicated."""
  rep = parallel.replicated(mesh)
  return jax.jit(
      lambda s, f, b, r: train_step(s, f, b, r, model=model, tx=tx,
                                    loss_shards=loss_shards,
                                    fixed_dropout_key=fixed_dropout_key),
      in_shardings=(rep, rep, parallel.data_sharded(mesh), rep),
      out_shardings=(rep, rep), donate_argnums=(0,))


def make_predict(model: TAP, mesh: Mesh, bos_index: int) -> Callable[..., Array]:
  """Jitted greedy decoding returning the per-step argmax indices `[B, T]`."""
  def predict(params, batch):
    scores, _ = greedy_decode(model, {"params": params}, batch, bos_index=bos_index)
    return jnp.argmax(scores, axis=-1)
  return jax.jit(predict, in_shardings=(parallel.replicated(mesh),
                                        parallel.data_sharded(mesh)),
                 out_shardings=parallel.replicated(mesh))


def question_only(batch: Mapping[str, Any], question_len: int) -> dict[str, Any]:
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


def pad_batch(batch: Mapping[str, Any], size: int) -> dict[str, np.ndarray]:
  """Numeric fields padded to `size` rows (repeating the last row, loss mask 0)."""
  out = {}
  for k, v in batch.items():
    if isinstance(v, np.ndarray) and v.dtype.kind in "biuf":
      pad = size - len(v)
      if pad < 0:
        raise ValueError(f"batch of {len(v)} rows exceeds the padded size {size}.")
      if pad:
        fill = np.zeros_like(v[-1:]) if k == "train_loss_mask" else v[-1:]
        v = np.concatenate([v, np.repeat(fill, pad, 0)])
      out[k] = v
  return out


def predict_batches(predict: Callable[..., Array], params: PyTree,
                    batches: Iterable[Mapping], mesh: Mesh, *, local_batch: int,
                    num_batches: int | None = None,
                    transform: Callable[[Mapping], Mapping] | None = None
                    ) -> Iterator[tuple[Mapping, np.ndarray]]:
  """Runs `predict` over this process's batches; yields (batch, its output rows).

  Every batch is padded to `local_batch` rows (one compiled shape). On several
  processes `num_batches` (the same on all) keeps the collective calls in step when a
  process's shard runs out one batch early: it feeds a padding batch and yields
  nothing for it.
  """
  it = iter(batches)
  p = jax.process_index()
  last = None
  i = 0
  while num_batches is None or i < num_batches:
    batch = next(it, None)
    if batch is None:
      if num_batches is None or last is None:
        break
      feed, rows = last, 0
    else:
      model_batch = transform(batch) if transform is not None else batch
      feed, rows = pad_batch(model_batch, local_batch), len(batch["question_id"])
      last = feed
    out = np.asarray(predict(params, parallel.global_batch(feed, mesh)))
    if rows:
      yield batch, out[p * local_batch:p * local_batch + rows]
    i += 1


def evaluate(predict: Callable[..., Array], params: PyTree, batches: Iterable[Mapping],
             vocab: Any, mesh: Mesh, *, local_batch: int,
             num_batches: int | None = None, question_len: int | None = None,
             ablate_image: bool = False, limit: int | None = None
             ) -> dict[str, Any]:
  """TextVQA accuracy (EvalAI-normalised, 10-choose-9) of greedy predictions.

  Args:
    predict: `make_predict(...)`.
    params: model parameters (replicated).
    batches: this process's batches with model fields plus `context_tokens` and
      `answers` strings.
    vocab: the `AnswerVocab` (maps indices to words).
    mesh: the device mesh.
    local_batch: rows per process per step (batches are padded to it).
    num_batches: see `predict_batches` (needed on several processes).
    question_len, ablate_image: evaluate the question-only ablation.
    limit: stop after this many examples (per process).

  Returns:
    {"accuracy": mean over all processes' examples, "num_examples": n (all
    processes), "predictions": this process's [{question_id, answer}]}.
  """
  from lfpr_jax.data.answers import decode_answers
  from lfpr_jax.data.pipeline import decode_strings
  from lfpr_jax.data.metrics import textvqa_accuracy
  transform = ((lambda b: question_only(b, question_len)) if ablate_image else None)
  scores, preds = [], []
  for batch, idx in predict_batches(predict, params, batches, mesh,
                                    local_batch=local_batch, num_batches=num_batches,
                                    transform=transform):
    tokens = [decode_strings(t) for t in batch["context_tokens"]]
    answers = [decode_strings(a) for a in batch["answers"]]
    for i, (ans, _) in enumerate(decode_answers(idx, vocab, tokens)):
      scores.append(textvqa_accuracy(ans, answers[i]))
      preds.append({"question_id": int(batch["question_id"][i]), "answer": ans})
    if limit is not None and len(scores) >= limit and num_batches is None:
      break
  total = np.array([float(np.sum(scores)), float(len(scores))])
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    total = np.asarray(multihost_utils.process_allgather(total)).reshape(-1, 2).sum(0)
  return {"accuracy": float(total[0] / total[1]) if total[1] else float("nan"),
          "num_examples": int(total[1]), "predictions": preds}
