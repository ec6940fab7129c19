"""M4C answer processor, vocabulary and answer decoding against the upstream goldens.

Goldens: tests/golden/data/answer_processor.json (26 cases) and decode_answer.json
(22 cases + 1 error), computed by the upstream pythia code.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from lfpr_jax.data import answers as answers_lib
from lfpr_jax.data.answers import decode_answer, decode_answers, process_answers
from lfpr_jax.data.text import make_context_tokens, word_tokenize
from lfpr_jax.data.vocab import AnswerVocab
from tests.golden import GOLDEN

GOLDEN_DATA = GOLDEN / "data"


def _load_json(name: str):
  return json.loads((GOLDEN_DATA / name).read_text(encoding="utf-8"))


PROC = _load_json("answer_processor.json")
DECODE = _load_json("decode_answer.json")


def _case_params(doc):
  return [pytest.param(c, id=c["name"]) for c in doc["cases"]]


def _sparse(targets: np.ndarray) -> list[list]:
  return [[int(s), int(i), float(targets[s, i])] for s, i in zip(*np.nonzero(targets))]


# A vocabulary shaped like the golden one, for hand-made cases.
WORDS = ["<pad>", "<s>", "</s>", "<unk>", "yes", "no", "red", "stop", "'s", "the"]


def test_golden_case_counts():
  assert len(PROC["cases"]) == 26
  assert len(DECODE["cases"]) == 22


# --------------------------------------------------------------------------- vocab


def test_golden_vocab_special_indices():
  doc = PROC
  vocab = AnswerVocab.from_words(doc["vocab"])
  assert vocab.num_vocab == doc["num_vocab"] == 30
  special = doc["special_indices"]
  assert (vocab.pad_idx, vocab.bos_idx, vocab.eos_idx, vocab.unk_idx) == (
      special["PAD_IDX"], special["BOS_IDX"], special["EOS_IDX"], special["UNK_IDX"])
  assert vocab.num_vocab + doc["processor_params"]["max_length"] == doc[
      "vocab_size_with_ocr"]


def test_golden_vocab_without_unk_is_rejected(tmp_path):
  # Upstream prepends <unk>, so <pad> lands at 1 and the PAD == 0 assert fails.
  words = [w for w in PROC["vocab"] if w != "<unk>"]
  path = tmp_path / "vocab_without_unk.txt"
  path.write_text("\n".join(words) + "\n", encoding="utf-8")
  with pytest.raises(ValueError, match="index 0") as err:
    AnswerVocab.from_file(path)
  assert str(path) in str(err.value)


def test_vocab_file_round_trip(tmp_path):
  path = tmp_path / "vocab.txt"
  path.write_text("<pad>\n<s>\n</s>\n<unk>\n yes \nno\n", encoding="utf-8")
  vocab = AnswerVocab.from_file(path)
  assert vocab.words == ("<pad>", "<s>", "</s>", "<unk>", "yes", "no")
  assert vocab.index("yes") == 4 and vocab.index("zzz") == vocab.unk_idx == 3
  assert "no" in vocab and len(vocab) == 6 and vocab.word(5) == "no"
  with pytest.raises(IndexError):
    vocab.word(6)


def test_vocab_lookup_is_by_string_not_position():
  vocab = AnswerVocab.from_words(["<pad>", "yes", "</s>", "<s>", "<unk>"])
  assert (vocab.pad_idx, vocab.bos_idx, vocab.eos_idx, vocab.unk_idx) == (0, 3, 2, 4)


def test_bad_vocab_file_one_clear_error(tmp_path):
  path = tmp_path / "bad_vocab.txt"
  path.write_text("<unk>\nyes\nno\n", encoding="utf-8")
  with pytest.raises(ValueError) as err:
    AnswerVocab.from_file(path)
  message = str(err.value)
  assert str(path) in message
  for token in ("<pad>", "<s>", "</s>"):
    assert token in message


def test_vocab_missing_file(tmp_path):
  path = tmp_path / "nope.txt"
  with pytest.raises(FileNotFoundError, match="nope.txt"):
    AnswerVocab.from_file(path)


def test_vocab_prepends_unk_when_pad_check_passes_otherwise():
  with pytest.raises(ValueError, match="prepended"):
    AnswerVocab.from_words(["<pad>", "<s>", "</s>", "yes"])


# ---------------------------------------------------------------- answer processor


def test_golden_seed0_choice_table():
  values = PROC["numpy_seed0_choice"]["values"]
  assert len(values) == 200
  assert [answers_lib.seed0_choice(n) for n in range(1, 201)] == values


@pytest.mark.parametrize("case", _case_params(PROC))
def test_golden_answer_processor(case):
  doc = PROC
  vocab = AnswerVocab.from_words(doc["vocab"])
  params = doc["processor_params"]
  ctx = make_context_tokens(case["ocr_tokens_raw"], max_length=params["max_length"])
  assert len(ctx) == case["context_tokens_len"]
  assert ctx[:case["num_context_tokens"]] == case["ocr_tokens"]
  assert all(t == "<pad>" for t in ctx[case["num_context_tokens"]:])
  kwargs = dict(max_copy_steps=params["max_copy_steps"],
                num_ocr_slots=params["max_length"], num_answers=params["num_answers"])
  if "error" in case:
    assert case["error"]["type"] == "AssertionError"
    with pytest.raises(ValueError, match="exactly 10 answers"):
      process_answers(case["answers"], ctx, vocab, **kwargs)
    return
  out = process_answers(case["answers"], ctx, vocab, **kwargs)
  assert list(out.answers) == case["answers_processed"]
  assert dict(out.answer_scores) == case["answer_scores"]
  assert [[list(s) for s in seqs] for seqs in out.candidates_per_answer] == case[
      "candidates_per_answer"]
  assert out.num_candidates == case["num_candidates"]
  assert out.sampled_candidate_index == case["sampled_candidate_index"]
  assert list(out.sampled_idx_seq) == case["sampled_idx_seq"]
  assert out.train_prev_inds.dtype == np.int64
  assert out.train_prev_inds.tolist() == case["train_prev_inds"]
  assert out.train_loss_mask.dtype == np.float32
  assert out.train_loss_mask.tolist() == case["train_loss_mask"]
  assert out.targets.dtype == np.float32
  assert list(out.targets.shape) == case["targets_shape"]
  assert _sparse(out.targets) == case["targets"]


def _vocab() -> AnswerVocab:
  return AnswerVocab.from_words(WORDS)


@pytest.mark.parametrize("count", [0, 9, 11])
def test_wrong_answer_count(count):
  with pytest.raises(ValueError, match=f"got {count}"):
    process_answers(["yes"] * count, make_context_tokens([]), _vocab())


def test_single_string_answers_rejected():
  with pytest.raises(TypeError):
    process_answers("yes", make_context_tokens([]), _vocab())


def test_empty_ocr():
  ctx = make_context_tokens([])
  assert ctx == ["<pad>"] * 100
  vocab = _vocab()
  out = process_answers(["yes"] * 10, ctx, vocab)
  assert out.targets.shape == (12, vocab.num_vocab + 100)
  assert out.sampled_idx_seq == (4,)
  assert out.train_prev_inds.tolist()[:2] == [vocab.bos_idx, 4]
  assert out.targets[1, vocab.eos_idx] == 1
  # An OCR-only answer with no OCR at all: nothing to learn.
  out = process_answers(["starbucks"] * 10, ctx, vocab)
  assert out.sampled_idx_seq == () and out.sampled_candidate_index is None
  assert not out.targets.any() and not out.train_loss_mask.any()
  assert not out.train_prev_inds.any()


def test_answer_longer_than_12_tokens():
  vocab = _vocab()
  ocr = [f"w{i}" for i in range(14)]
  answer = " ".join(["yes"] + ocr)  # 15 words: 1 vocab word + 14 OCR copies
  out = process_answers([answer] * 10, make_context_tokens(ocr), vocab)
  seq = out.sampled_idx_seq
  assert len(seq) == 15 and seq[1:] == tuple(vocab.num_vocab + i for i in range(14))
  assert out.train_loss_mask.tolist() == [1.0] * 12
  assert out.train_prev_inds.tolist() == [vocab.bos_idx] + list(seq[:11])
  for t in range(1, 12):
    assert np.nonzero(out.targets[t])[0].tolist() == [seq[t]]
  assert not out.targets[:, vocab.eos_idx].any()  # no EOS is ever trained


def test_custom_sizes():
  vocab = _vocab()
  out = process_answers(["yes no"] * 4, make_context_tokens(["no"], max_length=5),
                        vocab, max_copy_steps=2, num_ocr_slots=5, num_answers=4)
  assert out.targets.shape == (2, vocab.num_vocab + 5)
  # 'no' matches vocab 5 and OCR slot 0 -> 2 sequences per answer, pool of 8 -> pick 4.
  assert out.num_candidates == 8 and out.sampled_candidate_index == 4
  assert out.sampled_idx_seq == (4, 5)
  assert out.train_loss_mask.tolist() == [1.0, 1.0]
  assert out.train_prev_inds.tolist() == [vocab.bos_idx, 4]


def test_global_numpy_rng_untouched():
  # Upstream reseeds the global numpy RNG on every call; this port must not.
  saved = np.random.get_state()
  try:
    np.random.seed(123)
    process_answers(["yes"] * 10, make_context_tokens([]), _vocab())
    assert np.random.random_sample() == np.random.RandomState(123).random_sample()
  finally:
    np.random.set_state(saved)


def test_context_tokens_cut_to_num_slots():
  vocab = _vocab()
  ctx = make_context_tokens([]) + ["zebra"]  # 101 entries; slot 100 does not exist
  out = process_answers(["zebra"] * 10, ctx, vocab)
  assert out.num_candidates == 0


def test_word_tokenize_rule():
  assert word_tokenize("  McDonald's, OK? ") == "mcdonald 's ok"
  assert word_tokenize("STOP!") == "stop!"
  assert word_tokenize("Café") == "café"


# ---------------------------------------------------------------------- decoding


@pytest.mark.parametrize("case", _case_params(DECODE))
def test_golden_decode_answer(case):
  doc = DECODE
  vocab = AnswerVocab.from_words(doc["vocab"])
  assert vocab.eos_idx == doc["eos_idx"]
  ctx = make_context_tokens(case["ocr_tokens_raw"])
  assert ctx[:case["num_context_tokens"]] == case["ocr_tokens"]
  answer, sources = decode_answer(case["pred_inds"], vocab, ctx)
  assert answer == case["answer"] == case["metric_path_pred_answer"]
  assert sources == case["pred_source"]


def test_golden_decode_errors():
  doc = DECODE
  vocab = AnswerVocab.from_words(doc["vocab"])
  assert len(doc["errors"]) == 1
  for err in doc["errors"]:
    assert err["error"]["type"] == "IndexError"
    with pytest.raises(IndexError):
      decode_answer(err["pred_inds"], vocab, make_context_tokens([]))


def test_golden_decode_batch():
  doc = DECODE
  vocab = AnswerVocab.from_words(doc["vocab"])
  inds = np.array([c["pred_inds"] for c in doc["cases"]])
  ctxs = [make_context_tokens(c["ocr_tokens_raw"]) for c in doc["cases"]]
  out = decode_answers(inds, vocab, ctxs)
  assert [a for a, _ in out] == [c["answer"] for c in doc["cases"]]
  with pytest.raises(ValueError):
    decode_answers(inds[0], vocab, ctxs)
  with pytest.raises(ValueError):
    decode_answers(inds, vocab, ctxs[:-1])


def test_decode_negative_index():
  with pytest.raises(IndexError):
    decode_answer([-1], _vocab(), make_context_tokens([]))


def test_pseudo_label_round_trip():
  """docs/LFPR.md §6.1: a prediction becomes an answer string, then targets again."""
  vocab = _vocab()
  ctx = make_context_tokens(["Starbucks", "Coffee"])
  nv = vocab.num_vocab
  answer, sources = decode_answer([6, nv + 0, nv + 1, 2, 2, 2], vocab, ctx)
  assert (answer, sources) == ("red starbucks coffee", ["VOCAB", "OCR", "OCR"])
  out = process_answers([answer] * 10, ctx, vocab)
  assert out.sampled_idx_seq == (6, nv + 0, nv + 1)
  assert out.train_loss_mask.tolist() == [1.0] * 4 + [0.0] * 8
  assert out.targets[0, 6] == 1.0 and out.targets[3, vocab.eos_idx] == 1.0
  # An empty prediction (EOS first) cannot be re-matched: all-zero loss mask.
  empty, _ = decode_answer([2] * 12, vocab, ctx)
  assert empty == ""
  assert not process_answers([empty] * 10, ctx, vocab).train_loss_mask.any()
