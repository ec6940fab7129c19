"""PHOC (pyramidal histogram of characters) OCR-token features, bit-exact to upstream.

Upstream (`LFPR: TAP/pythia/utils/phoc/build_phoc.py` + the C extension
`TAP/pythia/utils/phoc/src/cphoc.c`, docs/TAP.md §3.4) builds a 604-d binary vector per
OCR token:

* preprocessing: `token.lower().strip()`, then keep only the 36 characters `a-z0-9`
  (non-ASCII letters are dropped, not transliterated; `str.lower()` can create ASCII
  letters first: the Kelvin sign becomes `k`, `İ` becomes `i` plus a combining dot);
* unigrams, levels 2..5 (dims 0..503): character i of n occupies `[i/n, (i+1)/n)`;
  region r of level L is `[r/L, (r+1)/L)`; the entry `36 * (o_L + r) + c` is set when
  overlap / character width >= 0.5, with level offsets o = 0, 2, 5, 9;
* bigrams, level 2 only (dims 504..603): the 50 bigrams below, bigram i occupies
  `[i/n, (i+2)/n)`, entry `504 + 50 * r + k`.

The C code does this arithmetic in single precision, and exact-0.5 ratios do not
always come out as 0.5 there ('abc' sets index 37 but not index 1). Every division,
subtraction and comparison below is therefore an IEEE float32 numpy operation, which
reproduces the compiled extension on every golden word (float64 would differ on 24 of
67). An empty or fully-filtered token gives the zero vector.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

PHOC_DIM: int = 604
UNIGRAMS: str = "abcdefghijklmnopqrstuvwxyz0123456789"
BIGRAMS: tuple[str, ...] = (
    "th", "he", "in", "er", "an", "re", "es", "on", "st", "nt",
    "en", "at", "ed", "nd", "to", "or", "ea", "ti", "ar", "te",
    "ng", "al", "it", "as", "is", "ha", "et", "se", "ou", "of",
    "le", "sa", "ve", "ro", "ra", "ri", "hi", "ne", "me", "de",
    "co", "ta", "ec", "si", "ll", "so", "na", "li", "la", "el",
)
UNIGRAM_LEVELS: tuple[int, ...] = (2, 3, 4, 5)
BIGRAM_LEVEL: int = 2
BIGRAM_OFFSET: int = len(UNIGRAMS) * sum(UNIGRAM_LEVELS)  # 504

_UNIGRAM_INDEX: dict[str, int] = {c: i for i, c in enumerate(UNIGRAMS)}
_BIGRAM_INDEX: dict[str, int] = {b: i for i, b in enumerate(BIGRAMS)}

_F32 = np.float32
_HALF = np.float32(0.5)


def _regions(level: int) -> tuple[np.ndarray, np.ndarray]:
  """Float32 region bounds `[r/L, (r+1)/L)` of one pyramid level, as the C code forms them."""
  r = np.arange(level, dtype=_F32)
  lvl = _F32(level)
  return r / lvl, (r + _F32(1)) / lvl


# (start, end, first flat region index) per unigram level; constant tables.
_UNIGRAM_REGIONS: tuple[tuple[np.ndarray, np.ndarray, int], ...] = tuple(
    (*_regions(level), sum(l for l in UNIGRAM_LEVELS if l < level))
    for level in UNIGRAM_LEVELS)
_BIGRAM_REGIONS: tuple[np.ndarray, np.ndarray] = _regions(BIGRAM_LEVEL)


def phoc_input(word: str) -> str:
  """The exact string upstream hands to the C function: lower, strip, keep `a-z0-9`."""
  return "".join(c for c in word.lower().strip() if c in _UNIGRAM_INDEX)


def _occupied(occ0: np.ndarray, occ1: np.ndarray, reg0: np.ndarray,
              reg1: np.ndarray) -> np.ndarray:
  """`[len(occ0), len(reg0)]` bool: overlap / span >= 0.5, all in float32."""
  start = np.maximum(occ0[:, None], reg0[None, :])
  end = np.minimum(occ1[:, None], reg1[None, :])
  ratio = (end - start) / (occ1 - occ0)[:, None]
  return ratio >= _HALF


def phoc(word: str) -> np.ndarray:
  """PHOC vector of one token, as `pythia.utils.phoc.build_phoc(word)` returns it.

  Args:
    word: a raw or `simple_word`-normalised OCR token (both give the same vector).

  Returns:
    `[604]` float32 array of 0s and 1s.
  """
  w = phoc_input(word)
  out = np.zeros(PHOC_DIM, dtype=_F32)
  n = len(w)
  if n == 0:
    return out
  nf = _F32(n)
  pos = np.arange(n, dtype=_F32)
  char_occ0 = pos / nf
  char_occ1 = (pos + _F32(1)) / nf
  chars = np.array([_UNIGRAM_INDEX[c] for c in w], dtype=np.int64)
  num_uni = len(UNIGRAMS)
  for reg0, reg1, offset in _UNIGRAM_REGIONS:
    hit_char, hit_region = np.nonzero(_occupied(char_occ0, char_occ1, reg0, reg1))
    out[(offset + hit_region) * num_uni + chars[hit_char]] = 1
  if n > 1:
    bigram_ids = np.array([_BIGRAM_INDEX.get(w[i:i + 2], -1) for i in range(n - 1)],
                          dtype=np.int64)
    known = np.nonzero(bigram_ids >= 0)[0]
    if known.size:
      start = known.astype(_F32)
      occ0 = start / nf
      occ1 = (start + _F32(2)) / nf
      hit, region = np.nonzero(_occupied(occ0, occ1, *_BIGRAM_REGIONS))
      out[BIGRAM_OFFSET + region * len(BIGRAMS) + bigram_ids[known[hit]]] = 1
  return out


def phoc_matrix(tokens: Sequence[str], max_len: int = 100) -> np.ndarray:
  """PHOC rows of the OCR tokens of one sample, as upstream `PhocProcessor` builds them.

  Args:
    tokens: OCR tokens (normally after `simple_word`); tokens past `max_len` are
      dropped.
    max_len: number of rows (OCR slots; 100 in every TAP config).

  Returns:
    `[max_len, 604]` float32; rows past `len(tokens)` are zero.
  """
  if max_len < 0:
    raise ValueError(f"max_len must be >= 0, got {max_len}.")
  out = np.zeros((max_len, PHOC_DIM), dtype=_F32)
  for i, token in enumerate(list(tokens)[:max_len]):
    out[i] = phoc(token)
  return out
