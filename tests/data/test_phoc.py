"""PHOC features against the upstream C extension (tests/golden/data/phoc.{json,npz})."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lfpr_jax.data import phoc as phoc_lib
from lfpr_jax.data.text import make_context_tokens, word_tokenize
from tests.golden import GOLDEN

GOLDEN_DATA = GOLDEN / "data"


def _load_json(name: str):
  return json.loads((GOLDEN_DATA / name).read_text(encoding="utf-8"))


PHOC = _load_json("phoc.json")


def _word_params():
  return [pytest.param(w, id=f"word{w['i']}") for w in PHOC["words"]]


@pytest.fixture(scope="module")
def golden_npz():
  with np.load(GOLDEN_DATA / "phoc.npz") as z:
    return {k: z[k] for k in z.files}


def test_golden_word_count():
  assert len(PHOC["words"]) == 67


@pytest.mark.parametrize("case", _word_params())
def test_golden_word(case, golden_npz):
  word = case["word"]
  assert str(golden_npz["words"][case["i"]]) == word
  assert phoc_lib.phoc_input(word) == case["cphoc_input"]
  assert word_tokenize(word) == case["ocr_token"]
  vec = phoc_lib.phoc(word)
  assert vec.shape == (604,) and vec.dtype == np.float32
  assert np.nonzero(vec)[0].tolist() == case["nonzero"]
  np.testing.assert_array_equal(vec, golden_npz["phoc"][case["i"]])
  # The dataset path (normalised token) gives the same vector.
  np.testing.assert_array_equal(phoc_lib.phoc(case["ocr_token"]), vec)


def test_golden_pipeline_matrix(golden_npz):
  words = [w["word"] for w in PHOC["words"]]
  assert golden_npz["phoc"].shape == (67, 604)
  # As the dataset does it: first 100 tokens, simple_word, PhocProcessor rows.
  tokens = [word_tokenize(w) for w in words]
  mat = phoc_lib.phoc_matrix(tokens, max_len=100)
  assert mat.shape == (100, 604) and mat.dtype == np.float32
  np.testing.assert_array_equal(mat[:67], golden_npz["phoc_pipeline"])
  np.testing.assert_array_equal(mat[67:], 0)


def test_layout_tables():
  layout = PHOC["layout"]
  assert layout["size"] == phoc_lib.PHOC_DIM == 604
  assert layout["unigrams"] == phoc_lib.UNIGRAMS
  assert list(layout["bigrams"]) == list(phoc_lib.BIGRAMS)
  assert list(layout["unigram_levels"]) == list(phoc_lib.UNIGRAM_LEVELS)
  assert phoc_lib.BIGRAM_OFFSET == 504


def test_float32_boundary_quirk():
  # 'b' in 'abc' covers [1/3, 2/3): exactly half of each level-2 region, but in
  # float32 only region 1 (index 36 + 1 = 37) reaches 0.5.
  idx = set(np.nonzero(phoc_lib.phoc("abc"))[0].tolist())
  assert 37 in idx and 1 not in idx


def test_float64_would_differ_where_the_diagnostics_say():
  diag = PHOC["diagnostics"]
  assert diag["float32_formula_equals_upstream"] is True
  differs = {d["word"] for d in diag["float64_differs"]}
  assert "abc" in differs and len(diag["float64_differs"]) == 24


@pytest.mark.parametrize("word,expected", [
    ("", ""), ("日本", ""), ("\u212a", "k"), ("İstanbul", "istanbul"),
    ("café", "caf"), ("Coca-Cola", "cocacola"), ("  A b ", "ab"),
])
def test_preprocessing(word, expected):
  assert phoc_lib.phoc_input(word) == expected


def test_empty_and_filtered_tokens_are_zero():
  for word in ["", " ", "...", "日本", "ΣΟΦΙΑ"]:
    vec = phoc_lib.phoc(word)
    assert vec.dtype == np.float32 and not vec.any()


def test_kelvin_sign_equals_k():
  np.testing.assert_array_equal(phoc_lib.phoc("\u212a"), phoc_lib.phoc("k"))


def test_phoc_matrix_truncates_and_pads():
  tokens = [f"w{i}" for i in range(105)]
  mat = phoc_lib.phoc_matrix(tokens, max_len=100)
  assert mat.shape == (100, 604)
  np.testing.assert_array_equal(mat[99], phoc_lib.phoc("w99"))
  assert phoc_lib.phoc_matrix([], max_len=3).shape == (3, 604)
  assert not phoc_lib.phoc_matrix([], max_len=3).any()
  assert phoc_lib.phoc_matrix(["a"], max_len=0).shape == (0, 604)
  # Padding slots of context_tokens are not used for PHOC: only real tokens are.
  ctx = make_context_tokens(["Stop"], max_length=4)
  assert ctx == ["stop", "<pad>", "<pad>", "<pad>"]
  with pytest.raises(ValueError):
    phoc_lib.phoc_matrix(["a"], max_len=-1)
