"""Question generation: the mix of types per image, the texts and their 10 answers.

`group_questions` turns a split's question count into per-image lists of types (exact
`type_fractions` by largest-remainder rounding; `no_ocr` questions get text-free
images). `build_image` draws a scene for one such list (`scenes.build_scene`) and
`make_questions` asks the questions, deriving every answer from the scene's final
geometry by the rules in `scenes`; a scene on which a rule is ambiguous or does not give
the planted answer is rejected (None), and the caller draws again.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import numpy as np

from lfpr_jax.data.answers import NUM_ANSWERS
from lfpr_jax.data.synthetic.scenes import (
    Plan, Scene, build_scene, position_answer, relation_answer, text_on_object)
from lfpr_jax.data.synthetic.spec import (
    COLOURS, NUMBER_WORDS, OBJECT_CLASSES, OCR_COPY_TYPES, POSITIONS, QUESTION_TYPES,
    RELATIONS, UNANSWERABLE, SyntheticSpec)

TEMPLATES: Mapping[str, tuple[str, ...]] = {
    "ocr_relation": ("what word is {rel} the {name}?", "what is written {rel} the {name}?"),
    "ocr_on_object": ("what is written on the {name}?", "what does the {name} say?"),
    "ocr_multi": ("what is written on the {name}?", "what does the {name} say?"),
    "count": ("how many {plural} are there?", "how many {plural} can you see?"),
    "colour": ("what colour is the {name}?", "what color is the {name}?"),
    "exists": ("is there {article} {name}?", "is there {article} {name} in the image?"),
}
"""Question templates per type (`ocr_position` takes its own from `POSITIONS`)."""


@dataclasses.dataclass
class Question:
  """One question about a scene, its answer and the 10 annotator answers."""
  qtype: str
  question: str
  answer: str
  variants: tuple[str, ...]


def template_words() -> list[str]:
  """Every word the question templates can produce, excluding class names."""
  words = []
  templates = [t for group in TEMPLATES.values() for t in group]
  templates += [t for _, _, group in POSITIONS for t in group]
  for template in templates:
    for token in template.replace("?", " ").split():
      if not token.startswith("{"):
        words.append(token)
  for _, phrase in RELATIONS:
    words.extend(phrase.split())
  words.extend(["a", "an"])
  return list(dict.fromkeys(words))


def group_questions(rng: np.random.Generator, spec: SyntheticSpec, n: int
                    ) -> list[tuple[bool, list[str]]]:
  """Question types per image as (has_ocr, types): `no_ocr` questions get text-free images."""
  types_list = [t for t, c in _type_counts(spec, n).items() for _ in range(c)]
  types_list = [types_list[i] for i in rng.permutation(len(types_list))]
  no_text = [t for t in types_list if t == "no_ocr"]
  with_text = [t for t in types_list if t != "no_ocr"]
  k = spec.questions_per_image
  images = [(False, no_text[i:i + k]) for i in range(0, len(no_text), k)]
  images += [(True, with_text[i:i + k]) for i in range(0, len(with_text), k)]
  return [images[i] for i in rng.permutation(len(images))]


def _type_counts(spec: SyntheticSpec, n: int) -> dict[str, int]:
  """Exact per-type counts for `n` questions (largest remainder rounding)."""
  raw = {t: f * n for t, f in spec.type_fractions}
  counts = {t: int(math.floor(v)) for t, v in raw.items()}
  order = sorted(QUESTION_TYPES, key=lambda t: (-(raw[t] - counts[t]),
                                                QUESTION_TYPES.index(t)))
  for t in order[:n - sum(counts.values())]:
    counts[t] += 1
  return counts


def build_image(rng: np.random.Generator, spec: SyntheticSpec, qtypes: Sequence[str],
                has_ocr: bool, words: Sequence[str]
                ) -> tuple[Scene, list[Question]] | None:
  """One image and its questions (`scenes.build_scene`, then `make_questions`).

  Returns:
    (scene, questions), one question per entry of `qtypes`; None if this draw failed.
  """
  built = build_scene(rng, spec, qtypes, has_ocr, words)
  if built is None:
    return None
  scene, plans = built
  questions = make_questions(rng, spec, scene, plans, has_ocr)
  if questions is None:
    return None
  return scene, questions


def _variants_answers(rng: np.random.Generator, correct: str, variants: Sequence[str],
                      prob: float) -> list[str]:
  """The 10 annotator answers: `correct`, with probability `prob` 1-2 of them a variant."""
  answers = [correct] * NUM_ANSWERS
  variants = [v for v in dict.fromkeys(variants) if v and v != correct]
  if variants and rng.random() < prob:
    n_var = int(rng.integers(1, 3))
    for i in rng.choice(NUM_ANSWERS, size=n_var, replace=False):
      answers[int(i)] = variants[int(rng.integers(len(variants)))]
  return answers


def make_questions(rng: np.random.Generator, spec: SyntheticSpec, scene: Scene,
                   plans: Sequence[Plan], has_ocr: bool) -> list[Question] | None:
  """Derives every answer from the final geometry; None if a rule is ambiguous."""
  names = spec.class_names
  token_boxes = np.array([t.box for t in scene.tokens]).reshape(-1, 4)
  token_words = [t.word for t in scene.tokens]
  used_directions: set[int] = set()
  seen_questions: set[str] = set()
  out = []
  for plan in plans:
    kind = plan.kind
    name = names[plan.cls] if plan.cls >= 0 else ""
    fmt = {"name": name, "plural": OBJECT_CLASSES[plan.cls][1] if plan.cls >= 0 else "",
           "article": "an" if name[:1] in "aeiou" else "a"}
    answer, variants = "", []
    templates = TEMPLATES.get(kind, ())
    if kind == "ocr_position":
      options = [d for d, (name, _, _) in enumerate(POSITIONS)
                 if name in spec.position_directions and d not in used_directions]
      if has_ocr:
        options = [d for d in options
                   if position_answer(d, token_boxes, scene.width, scene.height,
                                      spec.position_margin) >= 0]
      if not options:
        return None
      plan.direction = options[int(rng.integers(len(options)))]
      used_directions.add(plan.direction)
      templates = POSITIONS[plan.direction][2]
      if has_ocr:
        answer = token_words[position_answer(plan.direction, token_boxes, scene.width,
                                             scene.height, spec.position_margin)]
    elif kind in ("ocr_on_object", "ocr_multi"):
      if has_ocr:
        inside = text_on_object(scene.objects[plan.host].box, token_boxes)
        if tuple(token_words[i] for i in inside) != plan.words:
          return None
        answer = " ".join(plan.words)
        variants = [" ".join(plan.words[:j]) for j in range(1, len(plan.words))]
    elif kind == "ocr_relation":
      fmt["rel"] = dict(RELATIONS)[plan.side]
      if has_ocr:
        index = relation_answer(scene.objects[plan.host].box, plan.side, token_boxes)
        if index < 0 or token_words[index] != plan.words[0]:
          return None
        answer = plan.words[0]
    elif kind == "count":
      count = sum(o.cls == plan.cls for o in scene.objects)
      answer = NUMBER_WORDS[count]
      variants = [NUMBER_WORDS[c] for c in (count - 1, count + 1) if c >= 1]
    elif kind == "colour":
      matches = [o for o in scene.objects if o.cls == plan.cls]
      if len(matches) != 1:
        return None
      answer = COLOURS[matches[0].colour]
      variants = [c for c in COLOURS if c != answer]
    elif kind == "exists":
      present = any(o.cls == plan.cls for o in scene.objects)
      answer = "yes" if present else "no"
      variants = ["no" if present else "yes"]
    if plan.qtype == "no_ocr":
      answer, variants = UNANSWERABLE, ["nothing"]
    elif kind in OCR_COPY_TYPES and kind != "ocr_multi":
      variants = [w for w in token_words if w != answer]
    question = templates[int(rng.integers(len(templates)))].format(**fmt)
    if question in seen_questions:
      return None
    seen_questions.add(question)
    answers = _variants_answers(rng, answer, variants, spec.answer_variant_prob)
    out.append(Question(plan.qtype, question, answer, tuple(answers)))
  return out


