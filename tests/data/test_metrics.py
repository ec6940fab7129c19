"""EvalAI normaliser, TextVQA/ST-VQA accuracy, ANLS and prediction files vs upstream goldens.

Goldens: tests/golden/data/evalai.json (110 strings), metrics.json (40 TextVQA items,
40 ST-VQA items, 5 errors) and the batch accuracy of decode_answer.json.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from lfpr_jax.data import metrics
from tests.golden import GOLDEN

GOLDEN_DATA = GOLDEN / "data"


def _load_json(name: str):
  return json.loads((GOLDEN_DATA / name).read_text(encoding="utf-8"))


EVALAI = _load_json("evalai.json")
METRICS = _load_json("metrics.json")
DECODE = _load_json("decode_answer.json")


def _params(doc, key):
  return [pytest.param(c, id=f"{key}{i}") for i, c in enumerate(doc[key])]


def test_golden_case_counts():
  assert len(EVALAI["cases"]) == 110
  assert len(METRICS["textvqa_items"]) == 40
  assert len(METRICS["stvqa_items"]) == 40
  assert len(METRICS["errors"]) == 5


# ------------------------------------------------------------------ normaliser


@pytest.mark.parametrize("case", _params(EVALAI, "cases"))
def test_golden_evalai(case):
  proc = metrics.EvalAIAnswerProcessor()
  assert metrics.normalize_answer(case["input"]) == case["output"]
  assert proc(case["input"]) == case["output"]
  stages = case["stages"]
  for name in ("word_tokenize", "process_punctuation", "process_digit_article"):
    assert getattr(proc, name)(stages[name]["input"]) == stages[name]["output"], name
  assert stages["word_tokenize"]["input"] == case["input"]
  assert stages["process_digit_article"]["output"] == case["output"]


def test_tables():
  assert len(metrics.CONTRACTIONS) == 120
  assert metrics.CONTRACTIONS["somebody'd"] == "somebodyd"
  assert len(metrics.PUNCTUATIONS) == 21
  assert metrics.PERIOD_STRIP_COUNT == 32
  assert dict(metrics.NUMBER_MAP)["ten"] == "10" and len(metrics.NUMBER_MAP) == 12


def test_comma_between_digits_rule_when_called_directly():
  # word_tokenize removes commas first, so only a direct call can trigger it: every
  # punctuation character is then deleted instead of becoming a space.
  proc = metrics.EvalAIAnswerProcessor()
  assert proc.process_punctuation("1,000 a-b") == "1000 ab"
  assert proc.process_punctuation("x,y a-b") == "x y a b"


def test_period_count_limit():
  assert metrics.normalize_answer("." * 40) == "." * 8
  assert metrics.normalize_answer("a" + "." * 33 + "b") == "a.b"


def test_normaliser_is_stateless():
  before = dict(metrics.NUMBER_MAP)
  metrics.normalize_answer("some brand new words")
  assert dict(metrics.NUMBER_MAP) == before


# ------------------------------------------------------------------ accuracies


@pytest.mark.parametrize("item", _params(METRICS, "textvqa_items"))
def test_golden_textvqa_item(item):
  assert metrics.normalize_answer(item["pred_answer"]) == item["pred_processed"]
  # Bit-exact, including 0.5999999999999999 (float64 sum in answer order).
  assert metrics.textvqa_answer_scores(item["gt_answers"]) == item[
      "unique_answer_scores"]
  assert metrics.textvqa_accuracy(item["pred_answer"], item["gt_answers"]) == item[
      "textvqa_accuracy"]
  assert metrics.stvqa_accuracy(item["pred_answer"], item["gt_answers"]) == item[
      "stvqa_accuracy"]


@pytest.mark.parametrize("item", _params(METRICS, "stvqa_items"))
def test_golden_stvqa_item(item):
  pred, gts = item["pred_answer"], item["gt_answers"]
  assert metrics.normalize_answer(pred) == item["pred_processed"]
  assert [metrics.normalize_answer(g) for g in gts] == item["gt_processed"]
  assert metrics.stvqa_accuracy(pred, gts) == item["stvqa_accuracy"]
  assert metrics.stvqa_anls(pred, gts) == pytest.approx(item["anls"], rel=0, abs=1e-15)
  assert [metrics.anls_single(pred, g) for g in gts] == pytest.approx(
      item["anls_per_gt"], rel=0, abs=1e-15)
  assert [metrics.edit_distance(pred.lower().strip(), g.lower().strip())
          for g in gts] == item["edit_distance_per_gt"]


def test_golden_means():
  doc = METRICS
  tv = doc["textvqa_items"]
  st = doc["stvqa_items"]
  for key in ("textvqa_accuracy", "stvqa_accuracy"):
    scores = [metrics.textvqa_accuracy(i["pred_answer"], i["gt_answers"])
              if key == "textvqa_accuracy" else
              metrics.stvqa_accuracy(i["pred_answer"], i["gt_answers"]) for i in tv]
    summary = metrics.summarize_scores(scores, batch_size=len(scores))
    assert summary.mean == pytest.approx(doc["textvqa_items_mean"][key], abs=1e-12)
  anls = metrics.summarize_scores(
      [metrics.stvqa_anls(i["pred_answer"], i["gt_answers"]) for i in st], 40)
  assert anls.mean == pytest.approx(doc["stvqa_items_mean"]["anls"], abs=1e-12)
  acc = metrics.summarize_scores(
      [metrics.stvqa_accuracy(i["pred_answer"], i["gt_answers"]) for i in st], 40)
  assert acc.mean == pytest.approx(doc["stvqa_items_mean"]["stvqa_accuracy"], abs=1e-12)


def test_golden_errors():
  errors = {e["call"]: e for e in METRICS["errors"]}
  assert len(errors) == 5
  for err in errors.values():
    call, inputs, etype = err["call"], err["input"], err["error"]["type"]
    if etype == "ZeroDivisionError" and inputs:
      # ANLS empty vs empty: upstream divides by zero; this port returns 1.0.
      (entry,) = inputs
      assert metrics.stvqa_anls(entry["pred_answer"], entry["gt_answers"]) == 1.0
    elif etype == "ZeroDivisionError":
      with pytest.raises(ValueError):
        metrics.summarize_scores([], batch_size=8)
    elif etype == "AssertionError":
      (entry,) = inputs
      with pytest.raises(ValueError, match="exactly 10"):
        metrics.textvqa_accuracy(entry["pred_answer"], entry["gt_answers"])
    else:
      assert etype == "ValueError", call
      (entry,) = inputs
      with pytest.raises(ValueError):
        metrics.stvqa_anls(entry["pred_answer"], entry["gt_answers"])


def test_golden_decode_batch_accuracy():
  doc = DECODE
  scores = [metrics.textvqa_accuracy(c["answer"], c["gt_answers"]) for c in doc["cases"]]
  assert scores == [c["textvqa_accuracy"] for c in doc["cases"]]
  assert [metrics.normalize_answer(c["answer"]) for c in doc["cases"]] == [
      c["answer_evalai"] for c in doc["cases"]]
  summary = metrics.summarize_scores(scores, batch_size=len(scores))
  assert summary.mean == doc["textvqa_accuracy_batch_float64"]
  # The metric returns torch.tensor(mean): float32.
  assert summary.batch_mean == doc["textvqa_accuracy_batch"]
  assert metrics.batch_mean(scores) == doc["textvqa_accuracy_batch"]


def test_anls_threshold_and_code_points():
  assert metrics.anls_single("ab", "ac") == 0.5
  assert metrics.anls_single("abc", "axy") == 0.0
  assert metrics.edit_distance("cafe\u0301", "café") == 2
  assert metrics.edit_distance("", "abc") == 3
  assert metrics.edit_distance("kitten", "sitting") == 3
  assert metrics.anls_single("", "") == metrics.ANLS_EMPTY_VS_EMPTY == 1.0
  with pytest.raises(TypeError):
    metrics.stvqa_anls("a", "a")


def test_summarize_partial_last_batch():
  s = metrics.summarize_scores([1.0, 0.0, 0.0], batch_size=2)
  assert s.mean == pytest.approx(1 / 3)
  assert s.batch_mean == pytest.approx((0.5 + 0.0) / 2)
  assert (s.num_samples, s.num_batches) == (3, 2)
  with pytest.raises(ValueError):
    metrics.summarize_scores([1.0], batch_size=0)


# ------------------------------------------------------------- prediction files


def test_write_predictions(tmp_path):
  path = tmp_path / "sub" / "preds.json"
  records = [
      {"question_id": np.int64(7), "image_id": "img7", "answer": "mcdonald's",
       "pred_source": ["VOCAB", "VOCAB"], "extra": 1},
      {"question_id": 8, "image_id": np.int32(3), "answer": "", "pred_source": []},
  ]
  metrics.write_predictions(path, records)
  data = json.loads(path.read_text(encoding="utf-8"))
  assert data == [
      {"question_id": 7, "image_id": "img7", "answer": "mcdonald's",
       "pred_source": ["VOCAB", "VOCAB"]},
      {"question_id": 8, "image_id": 3, "answer": "", "pred_source": []},
  ]
  assert list(data[0]) == list(metrics.PREDICTION_KEYS)
  assert os.listdir(path.parent) == ["preds.json"]


def test_write_predictions_failure_keeps_old_file(tmp_path):
  path = tmp_path / "preds.json"
  metrics.write_predictions(path, [])
  assert json.loads(path.read_text()) == []
  with pytest.raises(KeyError):
    metrics.write_predictions(path, [{"question_id": 1, "answer": "x"}])
  with pytest.raises(TypeError):
    metrics.write_predictions(path, [{"question_id": "1", "image_id": 1,
                                      "answer": "x", "pred_source": []}])
  assert json.loads(path.read_text()) == []
  assert os.listdir(tmp_path) == ["preds.json"]
