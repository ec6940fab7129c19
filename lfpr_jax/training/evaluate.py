"""Greedy predictions scored with the dataset's metric.

TextVQA (and the synthetic benchmark, which has TextVQA's 10 answers per question)
report the EvalAI-normalised 10-choose-9 accuracy; ST-VQA reports its accuracy (exact
match after normalisation) and ANLS (docs/TAP.md §9). The metric is chosen from the
dataset name (`config.data.dataset`), never from the data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from lfpr_jax.data import metrics
from lfpr_jax.data.answers import decode_answers
from lfpr_jax.data.pipeline import decode_strings
from lfpr_jax.models.batch import MODEL_INPUTS
from lfpr_jax.training import parallel

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


def answer_batches(predict: Callable[..., jax.Array], params: PyTree,
                   batches: Iterator[Mapping[str, Any]], vocab: Any, mesh: Mesh, *,
                   local_batch: int, num_batches: int,
                   transform: Callable[[Mapping], Mapping] | None = None,
                   desc: str = "", progress: bool = False
                   ) -> Iterator[tuple[Mapping[str, Any], list[str]]]:
  """This process's batches with their greedy answers (the one prediction loop).

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
  for gbatch in parallel.global_batches(tap(iter(batches)), local_batch=local_batch,
                                        num_batches=num_batches, mesh=mesh,
                                        fields=MODEL_INPUTS, desc=desc,
                                        progress=progress):
    idx = np.asarray(predict(params, gbatch))
    if not raw:  # an all-padding batch of a process whose shard has ended
      continue
    batch = raw.pop()
    n = len(batch["question_id"])
    tokens = [decode_strings(t) for t in batch["context_tokens"]]
    yield batch, [a for a, _ in decode_answers(idx[rows.start:rows.start + n], vocab,
                                               tokens)]


def evaluate(predict: Callable[..., jax.Array], params: PyTree,
             batches: Iterator[Mapping[str, Any]], vocab: Any, mesh: Mesh, *,
             dataset: str, local_batch: int, num_batches: int,
             transform: Callable[[Mapping], Mapping] | None = None,
             predictions: bool = False, desc: str = "", progress: bool = False
             ) -> dict[str, Any]:
  """The dataset's metrics of greedy predictions, over every process's examples.

  Args:
    predict: `step.make_predict(...)`: (params, global batch) -> argmax indices
      `[B, T]`, replicated.
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
    predictions: also return this process's `[{question_id, answer}]`.
    desc, progress: a progress bar on process 0.

  Returns:
    `{"metrics": {name: mean}, "accuracy": the primary metric's mean,
    "num_examples": n}` over all processes, plus `"predictions"` if asked.
  """
  names = [name for name, _ in metrics_of(dataset)]
  scores: dict[str, list[float]] = {name: [] for name in names}
  preds = []
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
