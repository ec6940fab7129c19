"""The M4C `simple_word` normaliser for OCR tokens and answers, and OCR context slots.

Upstream (`LFPR: TAP/pythia/utils/text_utils.py` `word_tokenize`, registered as the
`simple_word` processor) normalises every OCR token and every answer string with:
lower-case, delete `,` and `?`, replace `'s` with ` 's`, strip (docs/TAP.md §3.2 step 3).
The result of normalising one token may contain a space (`"McDonald's"` becomes
`"mcdonald 's"`); it stays ONE token, which no whitespace-split answer word can
match (docs/TAP.md §12 item 6).

`make_context_tokens` builds the padded list of OCR slots (`context_tokens`) that the
answer processor matches against and the decoder copies from.
"""

from __future__ import annotations

from typing import Sequence

PAD_TOKEN: str = "<pad>"
"""String that fills the unused OCR slots of `context_tokens`."""

DEFAULT_REMOVE: tuple[str, ...] = (",", "?")
"""Characters `word_tokenize` deletes by default (upstream `remove=[',', '?']`)."""


def word_tokenize(word: str, remove: Sequence[str] = DEFAULT_REMOVE) -> str:
  """Applies the upstream `simple_word` rule to one string.

  Args:
    word: a raw OCR token or answer.
    remove: substrings deleted after lower-casing, in order.

  Returns:
    `word.lower()` with every item of `remove` deleted, `'s` replaced by ` 's`, and
    surrounding whitespace stripped. Non-ASCII text is kept (only lower-cased).
  """
  word = word.lower()
  for item in remove:
    word = word.replace(item, "")
  word = word.replace("'s", " 's")
  return word.strip()


def make_context_tokens(raw_tokens: Sequence[str], max_length: int = 100,
                        pad_token: str = PAD_TOKEN) -> list[str]:
  """Builds the `context_tokens` OCR slots of one sample.

  Mirrors `M4CTextVQADataset.add_sample_details`: keep the first `max_length` raw OCR
  tokens, normalise each with `word_tokenize`, then right-pad with `pad_token`
  (the context processor's padding) to exactly `max_length` entries.

  Args:
    raw_tokens: the OCR tokens of the image, as read from the OCR info file.
    max_length: number of OCR slots (100 in every TAP config).
    pad_token: padding string (upstream `'<pad>'`).

  Returns:
    A list of exactly `max_length` strings.
  """
  if max_length < 0:
    raise ValueError(f"max_length must be >= 0, got {max_length}.")
  tokens = [word_tokenize(t) for t in list(raw_tokens)[:max_length]]
  return tokens + [pad_token] * (max_length - len(tokens))
