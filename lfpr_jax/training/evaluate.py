"""Greedy predictions scored with the dataset's metric.

TextVQA (and the synthetic benchmark, which has TextVQA's 10 answers per question)
report the EvalAI-normalised 10-choose-9 accuracy; ST-VQA reports its accuracy (exact
match after normalisation) and ANLS (docs/TAP.md §9). The metric is chosen from the
dataset name (`config.data.dataset`), never from the data.

Greedy prediction is order-free and runs in eval mode, so it may use exact
variable-length execution (`greedy_predictor(trim=True)`: each global batch is cut to
bucketed lengths on the host, `parallel.trimmed_global_batches`, and run by one jitted
program per trimmed shape) and read its examples sorted by length
(`parallel.length_order`, `parallel.with_positions`): `evaluate` and `answers` return
their results in the unsorted order whenever the batches carry `parallel.POSITION`.
"""


from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from lfpr_jax.data import metrics
from lfpr_jax.data.answers import decode_answers
from lfpr_jax.data.pipeline import decode_strings

from lfpr_jax.models import trim as trimming
from lfpr_jax.models.batch import MODEL_INPUTS
from lfpr_jax.models.config import TapConfig
from lfpr_jax.models.decoding import greedy_decode
from lfpr_jax.models.tap import TAP
from lfpr_jax.training import parallel
from lfpr_jax.training.step import make_predict

PyTree = Any
Metric = Callable[[str, Sequence[str]], float]

# Per dataset: its metrics in report order; the first is the primary one (`accuracy`).
DATASET_METRICS: dict[str, tuple[tuple[str, Metric], ...]] = {
    "textvqa": (("textvqa_accuracy", metrics.textvqa_accuracy),),
    "synthetic": (("textvqa_accuracy", metrics.textvqa_accuracy),),
    "stvqa": (("stvqa_accuracy", metrics.stvqa_accuracy),
              ("stvqa_anls", metrics.stvqa_anls)),
}


def metrics_of(dataset: str) -> tuple[tuple[str, Metric], ...]:
  """The `(name, fn(prediction, answers) -> score)` metrics of a dataset."""
  if dataset not in DATASET_METRICS:
    raise ValueError(f"no evaluation metric for dataset {dataset!r}; known: "
                     f"{sorted(DATASET_METRICS)}.")
  return DATASET_METRICS[dataset]


def score_answers(dataset: str, predictions: Sequence[str],
                  answers: Sequence[Sequence[str]]) -> dict[str, list[float]]:
  """Per-question scores `{metric name: [N]}` of predictions against their answers."""
  if len(predictions) != len(answers):
    raise ValueError(f"{len(predictions)} predictions for {len(answers)} questions.")
  return {name: [fn(p, a) for p, a in zip(predictions, answers)]
          for name, fn in metrics_of(dataset)}


def greedy_predictor(config: TapConfig, mesh: Mesh, bos_index: int, *, trim: bool,
                     buckets: Sequence[int] = trimming.DEFAULT_BUCKETS,
                     pack: Optional[bool] = None
                     ) -> Callable[..., jax.Array] | trimming.TrimmedFn:
  """The `predict` of `answer_batches` / `evaluate`: greedy argmax indices `[B, T]`.

  Args:
    config: the (full-size) model config.
    mesh: the `data` mesh (batch sharded on it, params and output replicated).
    bos_index: the decoder's BOS index.
    trim: exact variable-length execution: a `trim.TrimmedFn` over
      `(trimmed config, global batch, params)`, one jitted program per trimmed shape,
      which `answer_batches` feeds with `parallel.trimmed_global_batches`. The
      indices need no restoring: OCR slot j keeps index V_a + j. Off: the padded
      `step.make_predict`.
    buckets: as in `trim.trim_batch`.
    pack: packed rows, as `parallel.Trim.pack` (None: on where one device runs the
      batch).
  """
  if not trim:
    return make_predict(TAP(config), mesh, bos_index)

  def predict(c: TapConfig, batch: Mapping[str, jax.Array], params: PyTree):
    scores, _ = greedy_decode(TAP(c), {"params": params}, batch, bos_index=bos_index)
    return jnp.argmax(scores, axis=-1)
  return trimming.TrimmedFn(
      predict, config, buckets=buckets, pack=pack,
      in_shardings=(parallel.data_sharded(mesh), parallel.replicated(mesh)),
      out_shardings=parallel.replicated(mesh))


def answer_batches(predict: Callable[..., jax.Array] | trimming.TrimmedFn,
                   params: PyTree,
                   batches: Iterator[Mapping[str, Any]], vocab: Any, mesh: Mesh, *,
                   local_batch: int, num_batches: int,
                   transform: Callable[[Mapping], Mapping] | None = None,
                   desc: str = "", progress: bool = False
                   ) -> Iterator[tuple[Mapping[str, Any], list[str]]]:
  """This process's batches with their greedy answers (the one prediction loop).

  Args:
    predict: `greedy_predictor(...)`: a jitted (params, global batch) -> argmax
      indices `[B, T]`, or a `trim.TrimmedFn` (each global batch is then trimmed on
      the host before sharding and run by the program of its trimmed shape).
    params, batches, vocab, mesh, local_batch, num_batches, transform, desc,
      progress: as in `evaluate`.

  Yields:
    `(batch, answers)`: the batch as the loader gave it (strings included) and one
    decoded answer per row; all-padding steps of an ended shard yield nothing.
  """
  raw: list[Mapping[str, Any]] = []

  def tap(it):  # keeps the string fields of the batch `global_batches` just read
    for batch in it:
      raw.append(batch)
      yield transform(batch) if transform is not None else batch

  rows = parallel.process_rows(local_batch * jax.process_count(), mesh)
  kw = dict(local_batch=local_batch, num_batches=num_batches, mesh=mesh,
            fields=MODEL_INPUTS, desc=desc, progress=progress)
  if isinstance(predict, trimming.TrimmedFn):
    trim = parallel.Trim(predict.config, predict.buckets, predict.global_lengths,
                         predict.pack)
    runs = ((lambda g=g, tc=tc: predict.specialised(tc)(g, params))
            for g, tc, _ in parallel.trimmed_global_batches(tap(iter(batches)),
                                                            trim=trim, **kw))
  else:
    runs = ((lambda g=g: predict(params, g))
            for g in parallel.global_batches(tap(iter(batches)), **kw))
  for run in runs:
    idx = np.asarray(run())
    if not raw:  # an all-padding batch of a process whose shard has ended
      continue
    batch = raw.pop()
    n = len(batch["question_id"])
    tokens = [decode_strings(t) for t in batch["context_tokens"]]
    yield batch, [a for a, _ in decode_answers(idx[rows.start:rows.start + n], vocab,
                                               tokens)]


def _positions(batch: Mapping[str, Any]) -> list[int]:
  """The batch's `parallel.POSITION` values ([] without them)."""
  if parallel.POSITION not in batch:
    return []
  return [int(p) for p in batch[parallel.POSITION]]


def answers(predict: Callable[..., jax.Array] | trimming.TrimmedFn, params: PyTree,
            batches: Iterator[Mapping[str, Any]], vocab: Any, mesh: Mesh, *,
            local_batch: int, num_batches: int, desc: str = "", progress: bool = False
            ) -> list[dict[str, Any]]:
  """This process's `[{question_id, answer}]` (greedy), in the unsorted order when the
  batches carry `parallel.POSITION`; arguments as in `evaluate`."""
  rows, positions = [], []
  for batch, words in answer_batches(predict, params, batches, vocab, mesh,
                                     local_batch=local_batch, num_batches=num_batches,
                                     desc=desc, progress=progress):
    rows += [{"question_id": int(q), "answer": w}
             for q, w in zip(batch["question_id"], words)]
    positions += _positions(batch)
  if len(positions) == len(rows):
    rows = [rows[i] for i in parallel.data_order(positions)]
  return rows


def evaluate(predict: Callable[..., jax.Array], params: PyTree,
             batches: Iterator[Mapping[str, Any]], vocab: Any, mesh: Mesh, *,
             dataset: str, local_batch: int, num_batches: int,
             transform: Callable[[Mapping], Mapping] | None = None,
             predictions: bool = False, desc: str = "", progress: bool = False
             ) -> dict[str, Any]:
  """The dataset's metrics of greedy predictions, over every process's examples.

  Args:
    predict: `greedy_predictor(...)` (or `step.make_predict(...)`): (params, global
      batch) -> argmax indices `[B, T]`, replicated; or a `trim.TrimmedFn`.
    params: model parameters (replicated).
    batches: this process's batches: the model inputs plus `question_id`,
      `context_tokens` `[b, ocr_max]` and `answers` `[b, A]` (UTF-8 bytes).
    vocab: the `AnswerVocab` (maps indices to words).
    mesh: the device mesh.
    dataset: `config.data.dataset`; picks the metrics (`DATASET_METRICS`).
    local_batch: rows per process per step (batches are padded to it).
    num_batches: global batches, the same on every process
      (`parallel.num_global_batches`); fewer than the data holds evaluates a prefix.
    transform: applied to each batch before prediction (e.g. an input ablation).
    predictions: also return this process's `[{question_id, answer}]` (in the
      unsorted order when the batches carry `parallel.POSITION`).
    desc, progress: a progress bar on process 0.

  Returns:
    `{"metrics": {name: mean}, "accuracy": the primary metric's mean,
    "num_examples": n}` over all processes, plus `"predictions"` if asked.
  """
  names = [name for name, _ in metrics_of(dataset)]
  scores: dict[str, list[float]] = {name: [] for name in names}
  preds, positions = [], []
  for batch, words in answer_batches(predict, params, batches, vocab, mesh,
                                     local_batch=local_batch, num_batches=num_batches,
                                     transform=transform, desc=desc,
                                     progress=progress):
    answers = [decode_strings(a) for a in batch["answers"]]
    for name, values in score_answers(dataset, words, answers).items():
      scores[name] += values
    if predictions:
      preds += [{"question_id": int(q), "answer": w}
                for q, w in zip(batch["question_id"], words)]
    positions += _positions(batch)
  if len(positions) == len(scores[names[0]]):  # length-sorted batches: unsort
    order = parallel.data_order(positions)
    scores = {name: [v[i] for i in order] for name, v in scores.items()}
    preds = [preds[i] for i in order] if predictions else preds
  # Summed once at the end (numpy's pairwise sum), as the single-metric code did.
  sums = np.array([float(np.sum(scores[name])) for name in names]
                  + [float(len(scores[names[0]]))])
  if jax.process_count() > 1:
    sums = np.asarray(multihost_utils.process_allgather(sums)).reshape(
        -1, len(names) + 1).sum(0)
  count = int(sums[-1])
  means = {name: float(s / count) if count else float("nan")
           for name, s in zip(names, sums[:-1])}
  out = {"metrics": means, "accuracy": means[names[0]], "num_examples": count}
  if predictions:
    out["predictions"] = preds
  return out
