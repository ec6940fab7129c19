"""Evaluation metrics of TAP/LFPR: EvalAI answer normalisation, TextVQA / ST-VQA accuracy, ANLS.

Reproduces `LFPR: TAP/pythia/utils/m4c_evaluators.py` (`EvalAIAnswerProcessor`,
`TextVQAAccuracyEvaluator`, `STVQAAccuracyEvaluator`, `STVQAANLSEvaluator`) and the
batch aggregation of `TAP/pythia/modules/metrics.py` + the pythia meter (docs/TAP.md §9,
docs/LFPR.md §7.1), and writes EvalAI prediction files (`format_for_evalai`).

Upstream quirks kept on purpose (see `tests/golden/data/evalai.json`):

* `PERIOD_STRIP.sub('', s, re.UNICODE)` passes 32 as the COUNT: at most 32 periods
  are removed per string;
* the period regex `(?!<=\\d)(\\.)(?!\\d)` has a broken lookbehind: every `.` not
  followed by a (Unicode) digit is removed;
* commas are deleted by `word_tokenize` first, so the comma-between-digits rule can
  only fire when `process_punctuation` is called directly ('1,000' -> '1000');
* `'s` is split off first ("he's" -> "he 's") while 'hes' maps to "he's";
* the capitalised contraction keys ('Im', 'Ive', "Id've") never match, and
  "somebody'd" maps to 'somebodyd';
* articles are dropped after punctuation became spaces ('a/b' -> 'b').

Not kept: upstream `NUMBER_MAP.setdefault` grows the class-level dict on every call
(no effect on outputs); here the tables are immutable.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
import types
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from lfpr_jax.data.text import word_tokenize as _simple_word

# The 120-entry table of the VQA evaluation code, verbatim (including its odd entries).
CONTRACTIONS: Mapping[str, str] = types.MappingProxyType({
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's",
    "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't",
    "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's",
    "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've",
    "there'dve": "there'd've", "therere": "there're", "theres": "there's",
    "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've",
    "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've",
    "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
})
NUMBER_MAP: Mapping[str, str] = types.MappingProxyType({
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
})
ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})
PUNCTUATIONS: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
    "@", "`", ",", "?", "!")
# Upstream's regexes, verbatim: the period one is a lookahead for the literal '<='.
PERIOD_STRIP: re.Pattern = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP: re.Pattern = re.compile(r"(?<=\d)(\,)+(?=\d)")
# `PERIOD_STRIP.sub('', text, re.UNICODE)` makes re.UNICODE (32) the count.
PERIOD_STRIP_COUNT: int = int(re.UNICODE)

ANLS_THRESHOLD: float = 0.5
ANLS_EMPTY_VS_EMPTY: float = 1.0
PREDICTION_KEYS: tuple[str, ...] = ("question_id", "image_id", "answer", "pred_source")


class EvalAIAnswerProcessor:
  """Stateless equivalent of upstream `EvalAIAnswerProcessor` (call it on a string)."""

  def word_tokenize(self, word: str) -> str:
    """Lower-case, delete `,` and `?`, `'s` -> ` 's`, strip (the simple_word rule)."""
    return _simple_word(word)

  def process_punctuation(self, in_text: str) -> str:
    """Punctuation rule, in upstream order, then the (count-limited) period strip.

    For each punctuation character p: if the INPUT contains "p " or " p", or has a
    comma between digits, every p is deleted; otherwise every p becomes a space.
    """
    out_text = in_text
    comma_between_digits = COMMA_STRIP.search(in_text) is not None
    for p in PUNCTUATIONS:
      if p + " " in in_text or " " + p in in_text or comma_between_digits:
        out_text = out_text.replace(p, "")
      else:
        out_text = out_text.replace(p, " ")
    return PERIOD_STRIP.sub("", out_text, count=PERIOD_STRIP_COUNT)

  def process_digit_article(self, in_text: str) -> str:
    """Number words -> digits, drop articles, contractions table, single spaces."""
    out = []
    for word in in_text.lower().split():
      word = NUMBER_MAP.get(word, word)
      if word not in ARTICLES:
        out.append(word)
    return " ".join(CONTRACTIONS.get(w, w) for w in out)

  def __call__(self, item: str) -> str:
    item = self.word_tokenize(item)
    item = item.replace("\n", " ").replace("\t", " ").strip()
    item = self.process_punctuation(item)
    return self.process_digit_article(item)


_EVALAI = EvalAIAnswerProcessor()  # stateless


def normalize_answer(answer: str) -> str:
  """EvalAI normalisation of one answer (`EvalAIAnswerProcessor()(answer)`)."""
  return _EVALAI(answer)


def textvqa_answer_scores(gt_answers: Sequence[str]) -> dict[str, float]:
  """Soft score of every unique EvalAI-normalised answer among exactly 10.

  acc(a) = (1/10) sum_k min(1, #{j != k : gt_j == a} / 3), summed in answer order in
  float64 like upstream (last bits depend on where the matches sit).

  Raises:
    ValueError: not exactly 10 answers (upstream: `AssertionError`).
  """
  if isinstance(gt_answers, str):
    raise TypeError("gt_answers must be a sequence of strings, not a single string.")
  answers = [normalize_answer(a) for a in gt_answers]
  if len(answers) != 10:
    raise ValueError(f"TextVQA accuracy needs exactly 10 answers, got {len(answers)}.")
  scores = {}
  for unique in set(answers):
    count = sum(a == unique for a in answers)
    total = 0.0
    for a in answers:
      total += min(1.0, float(count - (a == unique)) / 3)
    scores[unique] = total / len(answers)
  return scores


def textvqa_accuracy(pred: str, gt_answers: Sequence[str]) -> float:
  """TextVQA (10-choose-9 VQA) accuracy of one prediction against its 10 answers."""
  return textvqa_answer_scores(gt_answers).get(normalize_answer(pred), 0.0)


def stvqa_accuracy(pred: str, gt_answers: Sequence[str]) -> float:
  """1.0 if the normalised prediction equals any normalised answer, else 0.0."""
  if isinstance(gt_answers, str):
    raise TypeError("gt_answers must be a sequence of strings, not a single string.")
  pred = normalize_answer(pred)
  return 1.0 if pred in [normalize_answer(a) for a in gt_answers] else 0.0


def edit_distance(a: str, b: str) -> int:
  """Levenshtein distance over Unicode code points (as `editdistance.eval` on str)."""
  if len(a) < len(b):
    a, b = b, a
  prev = list(range(len(b) + 1))
  for i, ca in enumerate(a, 1):
    cur = [i]
    for j, cb in enumerate(b, 1):
      cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
    prev = cur
  return prev[-1]


def anls_single(pred: str, gt: str, threshold: float = ANLS_THRESHOLD) -> float:
  """Normalised Levenshtein similarity of one pair, zeroed below `threshold`.

  Both strings are only `lower().strip()`ed (no EvalAI normalisation). Upstream
  divides by `max(len(p), len(g))` and raises ZeroDivisionError when both are empty
  after stripping; here that case returns `ANLS_EMPTY_VS_EMPTY` (1.0: the strings are
  equal, and 1 - 0/n -> 1 for every other equal pair).
  """
  p = pred.lower().strip()
  g = gt.lower().strip()
  longest = max(len(p), len(g))
  if longest == 0:
    return ANLS_EMPTY_VS_EMPTY
  sim = 1 - edit_distance(p, g) / longest
  return sim if sim >= threshold else 0.0


def stvqa_anls(pred: str, gt_answers: Sequence[str],
               threshold: float = ANLS_THRESHOLD) -> float:
  """ST-VQA ANLS of one prediction: max over answers of `anls_single`.

  Raises:
    ValueError: no answers (upstream: `max()` of an empty sequence).
  """
  if isinstance(gt_answers, str):
    raise TypeError("gt_answers must be a sequence of strings, not a single string.")
  if len(gt_answers) == 0:
    raise ValueError("ANLS needs at least one ground-truth answer.")
  return max(anls_single(pred, g, threshold) for g in gt_answers)


@dataclasses.dataclass(frozen=True)
class ScoreSummary:
  """Aggregate of per-sample scores.

  Attributes:
    mean: exact mean over samples (what this port reports).
    batch_mean: upstream's number: unweighted mean over batches of each batch's mean,
      each batch mean rounded to float32 as `torch.tensor(accuracy)` does (the last
      batch may be smaller).
    num_samples: number of samples.
    num_batches: number of batches.
  """
  mean: float
  batch_mean: float
  num_samples: int
  num_batches: int


def _sequential_mean(values: Sequence[float]) -> float:
  total = 0.0
  for v in values:  # left-to-right like Python 3.11's sum() upstream ran on
    total += float(v)
  return total / len(values)


def batch_mean(scores: Sequence[float]) -> float:
  """One batch's metric value as upstream returns it: float64 mean rounded to float32."""
  if len(scores) == 0:
    raise ValueError("a batch needs at least one score (upstream: ZeroDivisionError).")
  return float(np.float32(_sequential_mean(scores)))


def summarize_scores(scores: Sequence[float], batch_size: int) -> ScoreSummary:
  """Exact mean and upstream's mean of per-batch means of per-sample scores.

  Args:
    scores: per-sample scores in evaluation order.
    batch_size: evaluation batch size; consecutive chunks form the batches. (Upstream
      DDP also averages per-process values and pads the split by repeating samples;
      reproduce that by passing the padded, per-process-ordered scores.)

  Returns:
    The `ScoreSummary`.
  """
  scores = [float(s) for s in scores]
  if not scores:
    raise ValueError("no scores to summarise (upstream: ZeroDivisionError).")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
  batches = [scores[i:i + batch_size] for i in range(0, len(scores), batch_size)]
  return ScoreSummary(
      mean=_sequential_mean(scores),
      batch_mean=_sequential_mean([batch_mean(b) for b in batches]),
      num_samples=len(scores), num_batches=len(batches))


def _json_scalar(value: Any) -> Any:
  if isinstance(value, np.generic):
    return value.item()
  return value


def write_predictions(path: str | os.PathLike,
                      records: Iterable[Mapping[str, Any]]) -> None:
  """Writes an EvalAI submission file atomically (temp file + `os.replace`).

  The file is a JSON list of `{question_id, image_id, answer, pred_source}` objects,
  as upstream `format_for_evalai` produces them.

  Args:
    path: destination; its folder is created if needed.
    records: one mapping per question with at least the four keys; `question_id` must
      be an integer, `answer` a string, `pred_source` a list of `'OCR'`/`'VOCAB'`.

  Raises:
    KeyError: a record misses one of the four keys.
    TypeError: a field has the wrong type.
  """
  entries = []
  for n, rec in enumerate(records):
    missing = [k for k in PREDICTION_KEYS if k not in rec]
    if missing:
      raise KeyError(f"prediction record {n} lacks {missing}.")
    qid = _json_scalar(rec["question_id"])
    if isinstance(qid, bool) or not isinstance(qid, int):
      raise TypeError(f"record {n}: question_id must be an int, got {qid!r}.")
    if not isinstance(rec["answer"], str):
      raise TypeError(f"record {n}: answer must be a str, got {rec['answer']!r}.")
    entries.append({
        "question_id": qid,
        "image_id": _json_scalar(rec["image_id"]),
        "answer": rec["answer"],
        "pred_source": [str(s) for s in rec["pred_source"]],
    })
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".tmp_predictions_", suffix=".json", dir=folder)
  try:
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; a submission file is meant to be shared
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      json.dump(entries, f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
