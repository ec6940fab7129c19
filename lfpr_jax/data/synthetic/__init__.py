"""A small synthetic Text-VQA benchmark written in the upstream TAP/M4C file formats.

Real TextVQA cannot be downloaded everywhere this project runs, so it ships its own
task. `generate(out_dir, spec)` writes a complete dataset directory that the real
readers consume exactly like a TextVQA release (docs/TAP.md §3.1).

Every question is answerable only with what TAP is built for (question types in
`QUESTION_TYPES`): copying OCR tokens chosen by their boxes (`ocr_position`: the
leftmost/topmost/... word or the one nearest a corner; `ocr_relation`: the word next to
an object), by the object they are written on (`ocr_on_object`), several tokens in
reading order (`ocr_multi`), fixed-vocabulary answers read from the object features
(`count`, `colour`, `exists`), and OCR questions on images without text (`no_ocr`,
answer `unanswerable`). Scenes are built constructively and every answer is then
re-derived from the final (integer-pixel) geometry by the rules documented on each
type; a scene whose rules do not give the planted answer is redrawn.

Features are planted structure plus Gaussian noise (`SyntheticSpec.feature_noise`):

* object row = class_signal * E_class[c] + colour_signal * E_colour[k] + noise;
* OCR row = token_signal * E_token[word] + ocr_context_signal * E_class[host] + noise,
  where `host` is the class of the object the token is written on (no term otherwise),
  as a real crop of text on a bus also looks like a bus.

E_* are fixed N(0, 1) tables drawn from the seed. The OCR lexicon consists of made-up
lower-case syllable words and numbers (normalisation is the identity on them) that are
never answer-vocabulary words, so OCR answers must be copied; val/test images draw a
`novel_word_fraction` of their tokens from a held-out lexicon never used in train.

Modules, one job each: `spec` (`SyntheticSpec` and the constants it draws from),
`vocab` (answer/BERT vocabulary files, OCR lexicon), `scenes` (geometry and the answer
rules), `questions` (question mix, texts, answers), `writer` (files in the upstream
layout, the manifest and the question-only baseline; `generate`).
"""

from lfpr_jax.data.synthetic.scenes import position_answer, relation_answer, text_on_object
from lfpr_jax.data.synthetic.spec import (
    COLOURS, DEFAULT_TYPE_FRACTIONS, MULTI_TEXT_CLASSES, NUMBER_WORDS, OBJECT_CLASSES,
    OCR_COPY_TYPES, POSITION_MARGIN, POSITIONS, QUESTION_TYPES, RELATIONS, SPLITS,
    UNANSWERABLE, SyntheticSpec)
from lfpr_jax.data.synthetic.vocab import (
    ANSWER_SPECIALS, answer_vocab_words, bert_vocab_tokens)
from lfpr_jax.data.synthetic.writer import (
    FORMAT_VERSION, GENERATOR_NAME, MANIFEST_NAME, MAX_DECODE_STEPS, generate,
    read_manifest)

__all__ = [
    "ANSWER_SPECIALS", "COLOURS", "DEFAULT_TYPE_FRACTIONS", "FORMAT_VERSION",
    "GENERATOR_NAME", "MANIFEST_NAME", "MAX_DECODE_STEPS", "MULTI_TEXT_CLASSES",
    "NUMBER_WORDS", "OBJECT_CLASSES", "OCR_COPY_TYPES", "POSITIONS", "POSITION_MARGIN",
    "QUESTION_TYPES", "RELATIONS", "SPLITS", "SyntheticSpec", "UNANSWERABLE",
    "answer_vocab_words", "bert_vocab_tokens", "generate", "position_answer",
    "read_manifest", "relation_answer", "text_on_object",
]
