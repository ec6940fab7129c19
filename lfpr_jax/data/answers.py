"""The M4C answer processor (training targets) and the answer decoder (indices -> string).

`process_answers` reproduces `M4CAnswerProcessor.__call__` of the LFPR copy of
`TAP/pythia/datasets/processors.py` (docs/TAP.md §3.5), as `M4CTextVQADataset.add_answer_info`
calls it with the 10 raw answers and the 100 padded OCR slots (`context_tokens`):

1. every answer is normalised with `simple_word`; exactly `num_answers` (10) are
   required (upstream asserts);
2. soft score per unique normalised answer = leave-one-out VQA accuracy;
3. each answer is split on whitespace; each word matches [its vocabulary index, if
   any] + [V_a + i for every OCR slot i equal to the word, ascending]; one unmatched
   word drops the whole answer; the index sequences are the Cartesian product, built
   word by word and cut to the first 20 after each word;
4. step-0 targets: max over all (answer, sequence) pairs of the answer's score at the
   sequence's first index;
5. the pool of all sequences of all 10 answers (duplicates included, answer order) is
   sampled with `np.random.seed(0); np.random.choice(len(pool))` - the LFPR copy
   reseeds numpy on EVERY call, so the pick is a fixed function of the pool size. This
   port draws from a private `np.random.RandomState(0)` (same value) and leaves the
   global numpy RNG alone;
6. steps 1.. are one-hot along the sampled sequence, then one EOS, over
   `min(1 + len(seq), 12)` steps (a sequence of 12+ words gets no EOS target).

`decode_answer` is docs/TAP.md §4.11 / `M4CTextVQADataset.format_for_evalai`: walk the step
argmaxes, copy OCR slots (normalised once more), stop at a VOCABULARY EOS only, join
with spaces and glue `" 's"` back to `"'s"`. LFPR retraining (docs/LFPR.md §6.1) turns such
strings back into targets with `process_answers([answer] * 10, context_tokens)`.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Mapping, Sequence

import numpy as np

from lfpr_jax.data.text import word_tokenize
from lfpr_jax.data.vocab import AnswerVocab

MAX_COPY_STEPS: int = 12
NUM_OCR_SLOTS: int = 100
NUM_ANSWERS: int = 10
MAX_MATCH_NUM: int = 20
OCR_SOURCE: str = "OCR"
VOCAB_SOURCE: str = "VOCAB"


@dataclasses.dataclass(frozen=True)
class AnswerTargets:
  """Output of `process_answers` for one sample.

  Attributes:
    answers: the `simple_word`-normalised answers (upstream `answers`).
    targets: `[max_copy_steps, V_a + num_ocr_slots]` float32 (upstream
      `answers_scores`, stored as `sample.targets`).
    train_prev_inds: `[max_copy_steps]` int64 teacher-forcing decoder inputs: BOS then
      the sampled sequence; all zero (no BOS) when nothing matched.
    train_loss_mask: `[max_copy_steps]` float32, 1 on the first `min(1 + len(seq), 12)`
      steps, all zero when nothing matched.
    sampled_idx_seq: the sampled index sequence (empty when nothing matched).
    answer_scores: soft score per unique normalised answer.
    candidates_per_answer: the matched index sequences of each answer (the pool is
      their concatenation).
    sampled_candidate_index: position of `sampled_idx_seq` in the pool (None if empty).
  """
  answers: tuple[str, ...]
  targets: np.ndarray
  train_prev_inds: np.ndarray
  train_loss_mask: np.ndarray
  sampled_idx_seq: tuple[int, ...]
  answer_scores: Mapping[str, float]
  candidates_per_answer: tuple[tuple[tuple[int, ...], ...], ...]
  sampled_candidate_index: int | None

  @property
  def num_candidates(self) -> int:
    """Size of the sampling pool."""
    return sum(len(c) for c in self.candidates_per_answer)


def compute_answer_scores(answers: Sequence[str]) -> dict[str, float]:
  """Leave-one-out VQA accuracy of every unique answer string (no normalisation here).

  s(a) = (1/N) sum_k min(1, #{j != k : answers[j] == a} / 3), summed left to right in
  answer order in float64 as upstream does, so the last bits match (0.6 can come out as
  0.5999999999999999 depending on where the matches sit).

  Args:
    answers: the N (normally 10) answers, already normalised.

  Returns:
    unique answer -> score, keys in sorted order.
  """
  answers = list(answers)
  if not answers:
    raise ValueError("compute_answer_scores needs at least one answer.")
  scores = {}
  for unique in sorted(set(answers)):
    total = 0.0
    count = sum(a == unique for a in answers)
    for a in answers:
      matches = count - (a == unique)
      total += min(1.0, float(matches) / 3)
    scores[unique] = total / len(answers)
  return scores


def match_answer_to_vocab_ocr_seq(answer: str, vocab: AnswerVocab,
                                  context_tokens: Sequence[str],
                                  max_match_num: int = MAX_MATCH_NUM
                                  ) -> list[tuple[int, ...]]:
  """All index sequences that spell `answer` from vocabulary words and OCR slots.

  Args:
    answer: one normalised answer; split on whitespace into words.
    vocab: the answer vocabulary; OCR slot i is index `vocab.num_vocab + i`.
    context_tokens: the OCR slots (normally 100, padded with `'<pad>'`).
    max_match_num: keep only the first this many sequences after each word.

  Returns:
    The sequences in (previous prefix, vocabulary-first then OCR-ascending) order;
    empty if the answer has no words or any word matches nothing.
  """
  ocr2inds = collections.defaultdict(list)
  for i, token in enumerate(context_tokens):
    ocr2inds[token].append(i)
  words = answer.split()
  if not words:
    return []
  seqs: list[tuple[int, ...]] = [()]
  for word in words:
    matched = []
    if word in vocab.word2idx:
      matched.append(vocab.word2idx[word])
    matched.extend(vocab.num_vocab + i for i in ocr2inds.get(word, ()))
    if not matched:
      return []
    seqs = [seq + (idx,) for seq in seqs for idx in matched][:max_match_num]
  return seqs


def seed0_choice(n: int) -> int:
  """`np.random.seed(0); np.random.choice(n)` without touching the global RNG."""
  if n < 1:
    raise ValueError(f"seed0_choice needs n >= 1, got {n}.")
  return int(np.random.RandomState(0).choice(n))


def process_answers(answers: Sequence[str], context_tokens: Sequence[str],
                    vocab: AnswerVocab, *, max_copy_steps: int = MAX_COPY_STEPS,
                    num_ocr_slots: int = NUM_OCR_SLOTS,
                    num_answers: int = NUM_ANSWERS,
                    max_match_num: int = MAX_MATCH_NUM) -> AnswerTargets:
  """Training targets of one sample, exactly as the LFPR `M4CAnswerProcessor`.

  Args:
    answers: the raw answers (human answers, or a prediction repeated 10 times).
    context_tokens: the OCR slots as `make_context_tokens` builds them (normalised,
      padded with `'<pad>'` to `num_ocr_slots`); longer lists are cut to
      `num_ocr_slots` as upstream does. Padding matters: an answer word `'<pad>'`
      matches every padding slot.
    vocab: the answer vocabulary (V_a entries).
    max_copy_steps: decoding steps (12).
    num_ocr_slots: OCR slots in the answer space (upstream `max_length`, 100).
    num_answers: required number of answers (10).
    max_match_num: sequences kept per answer after each word (20).

  Returns:
    The `AnswerTargets`.

  Raises:
    ValueError: `len(answers) != num_answers` (upstream: `AssertionError`).
  """
  if max_copy_steps < 1:
    raise ValueError(f"max_copy_steps must be >= 1, got {max_copy_steps}.")
  if isinstance(answers, str):
    raise TypeError("answers must be a sequence of strings, not a single string.")
  processed = tuple(word_tokenize(a) for a in answers)
  if len(processed) != num_answers:
    raise ValueError(
        f"the M4C answer processor needs exactly {num_answers} answers, got "
        f"{len(processed)} (ST-VQA-style imdbs tile their answers to {num_answers}).")
  context_tokens = list(context_tokens)[:num_ocr_slots]
  candidates = tuple(
      tuple(match_answer_to_vocab_ocr_seq(a, vocab, context_tokens, max_match_num))
      for a in processed)
  scores = compute_answer_scores(processed)

  targets = np.zeros((max_copy_steps, vocab.num_vocab + num_ocr_slots), np.float32)
  for answer, seqs in zip(processed, candidates):
    for seq in seqs:
      targets[0, seq[0]] = max(targets[0, seq[0]], np.float32(scores[answer]))

  prev_inds = np.zeros(max_copy_steps, np.int64)
  loss_mask = np.zeros(max_copy_steps, np.float32)
  pool = [seq for seqs in candidates for seq in seqs]
  if pool:
    pick = seed0_choice(len(pool))
    seq = pool[pick]
    num_steps = min(1 + len(seq), max_copy_steps)
    loss_mask[:num_steps] = 1.0
    prev_inds[0] = vocab.bos_idx
    for t in range(1, num_steps):
      prev_inds[t] = seq[t - 1]
      targets[t, seq[t] if t < len(seq) else vocab.eos_idx] = 1.0
  else:
    pick, seq = None, ()
  return AnswerTargets(
      answers=processed, targets=targets, train_prev_inds=prev_inds,
      train_loss_mask=loss_mask, sampled_idx_seq=tuple(int(i) for i in seq),
      answer_scores=scores, candidates_per_answer=candidates,
      sampled_candidate_index=pick)


def decode_answer(indices: Sequence[int] | np.ndarray, vocab: AnswerVocab,
                  context_tokens: Sequence[str]) -> tuple[str, list[str]]:
  """Turns the per-step argmax indices of one sample into its answer string.

  Upstream quirks kept: only a vocabulary index equal to EOS stops (a copy of OCR slot
  `eos_idx` is an ordinary copy); `<pad>`, `<s>`, `<unk>` are emitted as words; an OCR
  copy is `word_tokenize`d again, so the slot `"mcdonald 's"` yields `"mcdonald 's"`
  while the vocabulary words `mcdonald` + `'s` yield `"mcdonald's"`; an empty OCR token
  adds an empty word (a double space); copying a padding slot gives `'<pad>'`.

  Args:
    indices: `[steps]` argmax indices into the `V_a + num_slots` answer space.
    vocab: the answer vocabulary.
    context_tokens: the OCR slots of the sample (normally 100, `'<pad>'`-padded).

  Returns:
    (answer, sources): the answer string and one `'OCR'`/`'VOCAB'` per emitted word,
    as `format_for_evalai` writes `pred_source`.

  Raises:
    IndexError: an index is negative or past the last OCR slot (upstream raises
      IndexError for the latter; the model's score width makes it impossible).
  """
  words: list[str] = []
  sources: list[str] = []
  num_vocab = vocab.num_vocab
  for raw in np.asarray(indices).reshape(-1).tolist():
    idx = int(raw)
    if idx < 0:
      raise IndexError(f"negative answer index {idx}.")
    if idx >= num_vocab:
      slot = idx - num_vocab
      if slot >= len(context_tokens):
        raise IndexError(f"answer index {idx} copies OCR slot {slot}, but there are "
                         f"only {len(context_tokens)} slots.")
      words.append(word_tokenize(context_tokens[slot]))
      sources.append(OCR_SOURCE)
    else:
      if idx == vocab.eos_idx:
        break
      words.append(vocab.words[idx])
      sources.append(VOCAB_SOURCE)
  return " ".join(words).replace(" 's", "'s"), sources


def decode_answers(indices: Sequence[Sequence[int]] | np.ndarray, vocab: AnswerVocab,
                   context_tokens: Sequence[Sequence[str]]
                   ) -> list[tuple[str, list[str]]]:
  """`decode_answer` over a batch: `indices` `[B, steps]`, one slot list per sample."""
  indices = np.asarray(indices)
  if indices.ndim != 2:
    raise ValueError(f"indices must be [batch, steps], got shape {indices.shape}.")
  if len(context_tokens) != indices.shape[0]:
    raise ValueError(f"{indices.shape[0]} index rows but {len(context_tokens)} "
                     "context token lists.")
  return [decode_answer(row, vocab, ctx) for row, ctx in zip(indices, context_tokens)]
