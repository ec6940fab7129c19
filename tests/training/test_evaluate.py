"""Greedy predictions scored with the dataset's metric (TextVQA, ST-VQA acc + ANLS)."""

import jax
import numpy as np
import pytest

from lfpr_jax.data.vocab import AnswerVocab
from lfpr_jax.training import evaluate as evaluation
from lfpr_jax.training import parallel
from tests.helpers import TINY, model_batch

VOCAB = AnswerVocab.from_words(["<pad>", "<s>", "</s>", "<unk>", "mcdonalds", "yes",
                                "no"])
# question id -> (predicted vocabulary word, ground-truth answers)
CASES = {10: ("mcdonalds", ["mcdonald's"] * 10),   # a near miss
         11: ("yes", ["yes"] * 10),
         12: ("no", ["yes"] * 10)}


def _batches(qids):
  """Model inputs of TINY plus question ids, OCR tokens and answers, 2 per batch."""
  for start in range(0, len(qids), 2):
    ids = qids[start:start + 2]
    batch = model_batch(TINY, len(ids))
    batch["question_id"] = np.asarray(ids)
    batch["context_tokens"] = np.array([[b"<pad>"] * TINY.ocr_max] * len(ids),
                                       dtype=object)
    batch["answers"] = np.array([[a.encode() for a in CASES[q][1]] for q in ids],
                                dtype=object)
    yield batch


def _predict(params, batch):
  """The words of CASES, then EOS; padding rows (question id -1) predict EOS."""
  del params
  eos = VOCAB.word2idx["</s>"]
  rows = [[VOCAB.word2idx[CASES[int(q)][0]] if int(q) in CASES else eos, eos, eos, eos]
          for q in np.asarray(batch["question_id"])]
  return np.asarray(rows)


def _evaluate(dataset, num_batches=2, **kw):
  mesh = parallel.make_mesh(jax.devices()[:2])
  return evaluation.evaluate(_predict, None, _batches([10, 11, 12]), VOCAB, mesh,
                             dataset=dataset, local_batch=2, num_batches=num_batches,
                             **kw)


def test_near_miss_scores_anls_but_not_accuracy():
  scores = evaluation.score_answers("stvqa", ["mcdonalds"], [["mcdonald's"]])
  assert scores["stvqa_accuracy"] == [0.0]
  assert scores["stvqa_anls"][0] == pytest.approx(0.9)
  assert evaluation.score_answers("textvqa", ["mcdonalds"],
                                  [["mcdonald's"] * 10]) == {"textvqa_accuracy": [0.0]}


def test_stvqa_reports_accuracy_and_anls():
  out = _evaluate("stvqa", predictions=True)
  assert set(out["metrics"]) == {"stvqa_accuracy", "stvqa_anls"}
  assert out["num_examples"] == 3
  assert out["metrics"]["stvqa_accuracy"] == pytest.approx(1 / 3)
  assert out["metrics"]["stvqa_anls"] == pytest.approx((0.9 + 1.0 + 0.0) / 3)
  assert out["accuracy"] == out["metrics"]["stvqa_accuracy"]
  assert out["predictions"] == [{"question_id": q, "answer": CASES[q][0]}
                                for q in (10, 11, 12)]


@pytest.mark.parametrize("dataset", ["textvqa", "synthetic"])
def test_textvqa_accuracy_for_textvqa_and_synthetic(dataset):
  out = _evaluate(dataset)
  assert out["metrics"] == {"textvqa_accuracy": pytest.approx(1 / 3)}
  assert out["accuracy"] == pytest.approx(1 / 3) and "predictions" not in out


def test_prefix_and_unknown_dataset():
  out = _evaluate("stvqa", num_batches=1)   # the first global batch only
  assert out["num_examples"] == 2
  assert out["metrics"]["stvqa_anls"] == pytest.approx((0.9 + 1.0) / 2)
  with pytest.raises(ValueError, match="no evaluation metric for dataset 'vqa2'"):
    _evaluate("vqa2")
  with pytest.raises(ValueError, match="2 predictions for 1 questions"):
    evaluation.score_answers("stvqa", ["a", "b"], [["a"]])


def _mixed_batches(lengths_per_batch, seed=0):
  """TINY batches whose examples have the given (question, OCR words, object names,
  objects, OCR slots) valid lengths, with question ids, OCR tokens and answers."""
  qid = 0
  for k, lengths in enumerate(lengths_per_batch):
    lengths = np.asarray(lengths)
    batch = {f: np.array(v)
             for f, v in model_batch(TINY, len(lengths), seed=seed + k).items()}
    starts = (0, TINY.question_len, TINY.question_len + TINY.ocr_text_len)
    fulls = (TINY.question_len, TINY.ocr_text_len, TINY.obj_text_len)
    for i, row in enumerate(lengths):
      for start, full, n in zip(starts, fulls, row[:3]):
        batch["cmb_text"][i, start + n:start + full] = 0
    batch["obj_num"], batch["ocr_num"] = lengths[:, 3], lengths[:, 4]
    batch["question_id"] = np.arange(qid, qid + len(lengths))
    qid += len(lengths)
    batch["context_tokens"] = np.array(
        [[f"w{j}".encode() for j in range(TINY.ocr_max)]] * len(lengths), dtype=object)
    batch["answers"] = np.array([[b"w1"] * 10] * len(lengths), dtype=object)
    yield batch


MIXED_CASES = [[(4, 4, 4, 5, 6), (1, 1, 1, 0, 0), (2, 3, 1, 2, 3), (4, 0, 2, 5, 1)],
               [(2, 1, 1, 1, 2), (1, 2, 2, 0, 1), (2, 2, 1, 2, 2), (1, 1, 1, 1, 1)],
               [(3, 2, 4, 5, 0), (2, 2, 2, 3, 0)]]


def _padded_and_variable_length(mesh, run, cases, num_batches):
  """`evaluate` of TINY on the mixed-length cases, padded and with `run`."""
  from tests.helpers import random_params  # noqa: PLC0415
  params = parallel.replicate(random_params(TINY, seed=3, scale=0.4), mesh)
  vocab = AnswerVocab.from_words(["<pad>", "<s>", "</s>", "<unk>"]
                                 + [f"a{i}" for i in range(TINY.num_answers - 4)])
  padded = evaluation.greedy_predictor(TINY, mesh, 1, trim=False)
  return [evaluation.evaluate(predict, params, _mixed_batches(cases), vocab, mesh,
                              dataset="textvqa", local_batch=4,
                              num_batches=num_batches, predictions=True)
          for predict in (padded, run)], params, vocab


def test_trimmed_greedy_evaluation_equals_padded_on_mixed_lengths():
  """Extremes in one batch, short batches, an all-padding step, 2 devices."""
  from lfpr_jax.models import trim  # noqa: PLC0415
  mesh = parallel.make_mesh(jax.devices()[:2])
  run = evaluation.greedy_predictor(TINY, mesh, 1, trim=True, buckets=(1, 2))
  (padded, trimmed), _, _ = _padded_and_variable_length(mesh, run, MIXED_CASES, 4)
  assert trimmed == padded
  assert padded["num_examples"] == 10
  answers = [p["answer"] for p in padded["predictions"]]
  assert len(set(answers)) > 2, answers
  # Batches 1 and 3 are cut in every segment; batch 0 is full; the last step repeats
  # batch 3's shape; on two devices nothing is packed.
  assert run.num_specialisations == 3
  assert trim.trimmed_config(TINY, (4, 4, 4, 5, 6)) in run._compiled


def test_packed_greedy_evaluation_equals_padded_on_one_device():
  """Packed rows (`trim_batch(pack=True)`) on one device; refused on two."""
  cases = MIXED_CASES[:2]
  mesh = parallel.make_mesh(jax.devices()[:1])
  run = evaluation.greedy_predictor(TINY, mesh, 1, trim=True, buckets=(1, 2),
                                    pack=True)
  (padded, packed), params, vocab = _padded_and_variable_length(mesh, run, cases, 2)
  assert packed == padded
  assert all(any(c.pack_rows) for c in run._compiled._fns)
  mesh2 = parallel.make_mesh(jax.devices()[:2])
  with pytest.raises(ValueError, match="one process and a mesh of one device"):
    evaluation.evaluate(run, parallel.replicate(params, mesh2), _mixed_batches(cases),
                        vocab, mesh2, dataset="textvqa", local_batch=4, num_batches=2)
