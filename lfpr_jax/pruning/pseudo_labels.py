"""ReSt's training labels: the unpruned model's own predictions (docs/LFPR.md §6.1).

The unpruned model is greedy-decoded (eval mode) over the whole training split once;
its per-step argmax indices are stored by question id (`PseudoLabels`, an `.npz`).
When the ReSt loader reads an example, `PseudoLabelTargets` turns the stored indices
into the answer string exactly as the evaluator does (`decode_answer`), repeats it 10
times as the upstream `train_pred_*pct.npy` imdbs do, and rebuilds `targets`,
`train_prev_inds` and `train_loss_mask` with the M4C answer processor - the same code
that built the human-answer targets. A prediction that cannot be re-matched (e.g. an
empty answer) gets an all-zero loss mask, as upstream.

Subsets (§6.1 step 5): `subset_indices(n, pct, seed)` takes the first round(pct% n)
records of one seeded permutation, so smaller subsets are nested in larger ones.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import grain
import numpy as np

from lfpr_jax import atomic
from lfpr_jax.data.answers import decode_answer, process_answers
from lfpr_jax.data.pipeline import decode_strings
from lfpr_jax.data.vocab import AnswerVocab

NUM_ANSWERS = 10


@dataclasses.dataclass(frozen=True)
class PseudoLabels:
  """Greedy predictions of the unpruned model: `indices[i]` answers `question_ids[i]`."""
  question_ids: np.ndarray  # [N] int64
  indices: np.ndarray       # [N, T] int32

  def __post_init__(self):
    q, idx = np.asarray(self.question_ids), np.asarray(self.indices)
    if q.ndim != 1 or idx.ndim != 2 or len(q) != len(idx):
      raise ValueError(f"pseudo-labels need question_ids [N] and indices [N, T], got "
                       f"{q.shape} and {idx.shape}.")
    if len(np.unique(q)) != len(q):
      raise ValueError("pseudo-labels hold a question id twice.")

  def lookup(self) -> dict[int, np.ndarray]:
    return {int(q): row for q, row in zip(self.question_ids, self.indices)}

  def save(self, path: str) -> None:
    atomic.savez(path, question_ids=np.asarray(self.question_ids, np.int64),
                 indices=np.asarray(self.indices, np.int32))

  @classmethod
  def load(cls, path: str) -> PseudoLabels:
    with np.load(path) as d:
      return cls(question_ids=d["question_ids"], indices=d["indices"])


def subset_indices(num_examples: int, percent: float, seed: int) -> np.ndarray:
  """Sorted record indices of a seeded `percent`% subset (nested across percents)."""
  if not 0 < percent <= 100:
    raise ValueError(f"a retraining subset percentage must be in (0, 100], got {percent}.")
  count = max(1, int(round(num_examples * percent / 100.0)))
  order = np.random.default_rng(seed).permutation(num_examples)
  return np.sort(order[:count])


class PseudoLabelTargets(grain.transforms.Map):
  """Replaces an example's answers and targets by the pseudo-label of its question."""

  def __init__(self, labels: PseudoLabels, vocab: AnswerVocab, *, decode_steps: int,
               ocr_slots: int):
    self._labels = labels.lookup()
    self._vocab = vocab
    self._steps = decode_steps
    self._slots = ocr_slots

  def map(self, element: Mapping[str, Any]) -> dict[str, Any]:
    qid = int(element["question_id"])
    if qid not in self._labels:
      raise KeyError(f"no pseudo-label for question {qid}: the predictions were made "
                     "on a different training split.")
    context = decode_strings(element["context_tokens"])
    answer, _ = decode_answer(self._labels[qid], self._vocab, context)
    processed = process_answers([answer] * NUM_ANSWERS, context, self._vocab,
                                max_copy_steps=self._steps, num_ocr_slots=self._slots)
    out = dict(element)
    out["targets"] = processed.targets
    out["train_prev_inds"] = processed.train_prev_inds.astype(
        np.asarray(element["train_prev_inds"]).dtype)
    out["train_loss_mask"] = processed.train_loss_mask
    answers = np.empty(NUM_ANSWERS, dtype=object)
    answers[:] = [answer.encode("utf-8")] * NUM_ANSWERS
    out["answers"] = answers
    return out
