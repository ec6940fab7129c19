"""Scene geometry: objects and OCR tokens placed so that each question has one answer.

A scene is built constructively from the plans of its questions (`build_scene`): the
objects the OCR questions are about first, with their text; then the remaining
instances of every class a question counts or names; free OCR tokens, some on a
distractor object of their own; further distractor objects; and finally integer pixel
boxes and shuffled rows. The answer rules (`position_answer`, `relation_answer`,
`text_on_object`) are functions of the final boxes only, so `questions.make_questions`
re-derives every answer from what the files hold and rejects a scene whose rules do not
give the planted answer.

Every function takes the `numpy.random.Generator` it draws from; the order of draws is
part of the dataset (the same spec gives byte-identical files).
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Mapping, Sequence

import numpy as np

from lfpr_jax.data.synthetic.spec import (
    COLOURS, MULTI_TEXT_CLASSES, OCR_COPY_TYPES, POSITION_MARGIN, POSITIONS,
    SyntheticSpec)

_MAX_PLACE_TRIES = 60


@dataclasses.dataclass
class SceneObject:
  """One object row: class, colour and box."""
  cls: int  # 0-based index into spec.class_names
  colour: int
  box: np.ndarray  # float [4] x1, y1, x2, y2 (pixels)


@dataclasses.dataclass
class SceneToken:
  """One OCR token: its word, box and the object it is written on."""
  word: str
  box: np.ndarray
  host: int  # index into the scene's objects, -1 when not written on an object


@dataclasses.dataclass
class Plan:
  """What one question needs from the scene; filled in while the scene is placed."""
  qtype: str  # entry of QUESTION_TYPES
  kind: str  # template family (for no_ocr: the OCR template it borrows)
  cls: int = -1
  count: int = 0
  side: str = ""
  direction: int = -1  # index into POSITIONS
  host: int = -1  # object index the question is about
  words: tuple[str, ...] = ()


class Scene:
  """One image under construction: its size, objects, OCR tokens and reserved rects."""

  def __init__(self, width: int, height: int):
    self.width, self.height = width, height
    self.objects: list[SceneObject] = []
    self.tokens: list[SceneToken] = []
    self.occupied: list[np.ndarray] = []


# --------------------------------------------------------------------- box helpers


def _intersects(a: np.ndarray, b: np.ndarray, pad: float = 2.0) -> bool:
  return bool(a[0] < b[2] + pad and b[0] < a[2] + pad and a[1] < b[3] + pad
              and b[1] < a[3] + pad)


def _free(box: np.ndarray, occupied: Sequence[np.ndarray]) -> bool:
  return not any(_intersects(box, other) for other in occupied)


def _contains(outer: np.ndarray, inner: np.ndarray) -> bool:
  return bool(outer[0] <= inner[0] and outer[1] <= inner[1] and inner[2] <= outer[2]
              and inner[3] <= outer[3])


def _text_width(rng: np.random.Generator, word_len: int, height: float) -> float:
  return max(word_len, 1) * height * float(rng.uniform(0.5, 0.7))


def _place_text_host(rng: np.random.Generator, width: int, height: int,
                     lengths: Sequence[int], occupied: Sequence[np.ndarray]
                     ) -> tuple[np.ndarray, list[np.ndarray]] | None:
  """An object box holding one line of words (left to right), clear of `occupied`."""
  for _ in range(_MAX_PLACE_TRIES):
    th = float(rng.uniform(0.035, 0.07)) * height
    widths = [_text_width(rng, n, th) for n in lengths]
    gap = th * float(rng.uniform(0.4, 0.8))
    line = sum(widths) + gap * (len(widths) - 1)
    mx = rng.uniform(0.05, 0.5, size=2) * line + 4.0
    my = rng.uniform(0.3, 2.0, size=2) * th + 4.0
    hw, hh = line + mx.sum(), th + my.sum()
    if hw > width - 2 or hh > height - 2:
      continue
    x1, y1 = float(rng.uniform(0, width - hw)), float(rng.uniform(0, height - hh))
    host = np.array([x1, y1, x1 + hw, y1 + hh])
    if not _free(host, occupied):
      continue
    boxes, x = [], x1 + mx[0]
    for w in widths:
      boxes.append(np.array([x, y1 + my[0], x + w, y1 + my[0] + th]))
      x += w + gap
    return host, boxes
  return None


def _random_box(rng: np.random.Generator, width: int, height: int, lo: float = 0.06,
                hi: float = 0.35) -> np.ndarray:
  w, h = float(rng.uniform(lo, hi)) * width, float(rng.uniform(lo, hi)) * height
  x1, y1 = float(rng.uniform(0, width - w)), float(rng.uniform(0, height - h))
  return np.array([x1, y1, x1 + w, y1 + h])


def _place_relation(rng: np.random.Generator, width: int, height: int, word_len: int,
                    occupied: Sequence[np.ndarray]
                    ) -> tuple[np.ndarray, str, np.ndarray | None, list[np.ndarray]] | None:
  """An object box, a side, a token box right next to it and the rects to reserve.

  With `word_len == 0` (no text in the image) only the object and side are drawn.
  """
  for _ in range(_MAX_PLACE_TRIES):
    obj = _random_box(rng, width, height, 0.08, 0.3)
    if not _free(obj, occupied):
      continue
    th = float(rng.uniform(0.03, 0.07)) * height
    tw = _text_width(rng, word_len, th)
    gap = float(rng.uniform(0.005, 0.02)) * width
    ox1, oy1, ox2, oy2 = obj
    options = []
    if ox2 + gap + tw <= width - 1:
      options.append("right")
    if ox1 - gap - tw >= 0:
      options.append("left")
    if oy1 - gap - th >= 0:
      options.append("above")
    if oy2 + gap + th <= height - 1:
      options.append("below")
    if not options:
      continue
    side = options[int(rng.integers(len(options)))]
    if word_len == 0:
      return obj, side, None, [obj]
    if side in ("left", "right"):
      cy = float(rng.uniform(oy1 + 0.3 * (oy2 - oy1), oy2 - 0.3 * (oy2 - oy1)))
      ty1 = min(max(cy - th / 2, 0.0), height - 1 - th)
      tx1 = ox2 + gap if side == "right" else ox1 - gap - tw
      token = np.array([tx1, ty1, tx1 + tw, ty1 + th])
      corridor = np.array([min(ox2, tx1), oy1, max(ox1, tx1 + tw), oy2])
    else:
      cx = float(rng.uniform(ox1 + 0.3 * (ox2 - ox1), ox2 - 0.3 * (ox2 - ox1)))
      tx1 = min(max(cx - tw / 2, 0.0), width - 1 - tw)
      ty1 = oy2 + gap if side == "below" else oy1 - gap - th
      token = np.array([tx1, ty1, tx1 + tw, ty1 + th])
      corridor = np.array([ox1, min(oy2, ty1), ox2, max(oy1, ty1 + th)])
    # Token centre must lie within the object's perpendicular extent (the rule below).
    if side in ("left", "right"):
      if not oy1 <= (token[1] + token[3]) / 2 <= oy2:
        continue
    elif not ox1 <= (token[0] + token[2]) / 2 <= ox2:
      continue
    if not (_free(token, occupied) and _free(corridor, occupied)):
      continue
    return obj, side, token, [obj, token, corridor]
  return None


# -------------------------------------------------------------------- answer rules


def relation_answer(obj_box: np.ndarray, side: str, token_boxes: np.ndarray) -> int:
  """The `ocr_relation` rule: index of the token answering "what word is <side> the X".

  Candidates lie entirely on that side of the object box (e.g. `x1 >= obj.x2` for
  right) with their centre inside the object's perpendicular extent; the answer is
  the candidate with the smallest gap. Returns -1 if there is none or the two nearest
  gaps tie.
  """
  ox1, oy1, ox2, oy2 = obj_box
  gaps = []
  for i, (x1, y1, x2, y2) in enumerate(np.asarray(token_boxes).reshape(-1, 4)):
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    if side == "right" and x1 >= ox2 and oy1 <= cy <= oy2:
      gaps.append((x1 - ox2, i))
    elif side == "left" and x2 <= ox1 and oy1 <= cy <= oy2:
      gaps.append((ox1 - x2, i))
    elif side == "above" and y2 <= oy1 and ox1 <= cx <= ox2:
      gaps.append((oy1 - y2, i))
    elif side == "below" and y1 >= oy2 and ox1 <= cx <= ox2:
      gaps.append((y1 - oy2, i))
  if not gaps:
    return -1
  gaps.sort()
  if len(gaps) > 1 and gaps[1][0] == gaps[0][0]:
    return -1
  return gaps[0][1]


def position_answer(direction: int | str, token_boxes: np.ndarray, width: int,
                    height: int, margin: float = POSITION_MARGIN) -> int:
  """The `ocr_position` rule: index of THE token "at the <direction>", or -1.

  With normalised box centres (c_x, c_y) and the direction's weights (w_x, w_y) from
  `POSITIONS` (e.g. leftmost = (-1, 0), top left = (-1, -1)), the answer maximises
  w_x * c_x + w_y * c_y and must beat every other token by at least `margin` - a
  linear function of the boxes, so the pointer network can express it directly.

  Args:
    direction: index into `POSITIONS` or its name (e.g. `"top left"`).
    token_boxes: `[n, 4]` pixel boxes x1, y1, x2, y2.
    width, height: image size in pixels.
    margin: required lead over the runner-up.

  Returns:
    The token index, or -1 when there is no token or the lead is below `margin`.
  """
  if isinstance(direction, str):
    names = [name for name, _, _ in POSITIONS]
    if direction not in names:
      raise ValueError(f"unknown direction {direction!r}; expected one of {names}.")
    direction = names.index(direction)
  wx, wy = POSITIONS[int(direction)][1]
  boxes = np.asarray(token_boxes, np.float64).reshape(-1, 4)
  if not len(boxes):
    return -1
  score = (wx * (boxes[:, 0] + boxes[:, 2]) / (2 * width)
           + wy * (boxes[:, 1] + boxes[:, 3]) / (2 * height))
  order = np.argsort(-score, kind="stable")
  if len(order) > 1 and score[order[0]] - score[order[1]] < margin:
    return -1
  return int(order[0])


def text_on_object(host_box: np.ndarray, token_boxes: np.ndarray) -> list[int]:
  """The `ocr_on_object`/`ocr_multi` rule: tokens inside the box, in reading order.

  Reading order is by `x1` (the planted words sit on one line).
  """
  boxes = np.asarray(token_boxes).reshape(-1, 4)
  inside = [i for i in range(len(boxes)) if _contains(host_box, boxes[i])]
  return sorted(inside, key=lambda i: (boxes[i][0], i))



# ---------------------------------------------------------------- building a scene


def _round_box(box: np.ndarray, width: int, height: int) -> np.ndarray:
  out = np.round(np.asarray(box, np.float64))
  out[[0, 2]] = np.clip(out[[0, 2]], 0, width - 1)
  out[[1, 3]] = np.clip(out[[1, 3]], 0, height - 1)
  return out


def _pick_class(rng: np.random.Generator, candidates: Sequence[int],
                constrained: Mapping[int, int]) -> int:
  free = [c for c in candidates if c not in constrained]
  if not free:
    return -1
  return int(free[int(rng.integers(len(free)))])




def build_scene(rng: np.random.Generator, spec: SyntheticSpec, qtypes: Sequence[str],
                has_ocr: bool, words: Sequence[str]
                ) -> tuple[Scene, list[Plan]] | None:
  """Draws one image for the given question types.

  Args:
    rng: the split's random stream.
    spec: the dataset spec.
    qtypes: the types of the questions asked about this image (`QUESTION_TYPES`).
    has_ocr: whether the image has text (False exactly for `no_ocr` images).
    words: `spec.max_ocr` distinct OCR words to write, used in order.

  Returns:
    (scene, plans), one plan per question with the object, side and words its answer
    was planted with; None if this draw failed (a class ran out, text did not fit,
    too many objects or tokens), so that the caller draws again.
  """
  width = int(rng.integers(spec.image_width_range[0], spec.image_width_range[1] + 1))
  height = int(rng.integers(spec.image_height_range[0], spec.image_height_range[1] + 1))
  scene = Scene(width, height)
  planned = _plan_questions(rng, spec, qtypes)
  if planned is None:
    return None
  plans, constrained = planned
  word_iter = iter(words)
  if not _place_question_objects(rng, scene, plans, has_ocr, word_iter):
    return None
  _add_class_instances(rng, scene, constrained)
  if len(scene.objects) > spec.max_objects:
    return None
  unconstrained = [c for c in range(len(spec.class_names)) if c not in constrained]
  if has_ocr and not _add_free_tokens(rng, spec, scene, unconstrained, word_iter):
    return None
  _add_distractors(rng, spec, scene, unconstrained)
  _finalise(rng, spec, scene, plans)
  return scene, plans


def _plan_questions(rng: np.random.Generator, spec: SyntheticSpec, qtypes: Sequence[str]
                    ) -> tuple[list[Plan], dict[int, int]] | None:
  """Step 1: the class (and instance count) each question is about.

  Returns:
    (plans, constrained): `constrained` maps every class a question is about to its
    exact number of instances in the image (no two questions share a class); None when
    no free class of the needed kind is left.
  """
  names = spec.class_names
  all_classes = list(range(len(names)))
  multi_classes = [c for c in all_classes if names[c] in MULTI_TEXT_CLASSES]
  single_classes = [c for c in all_classes if names[c] not in MULTI_TEXT_CLASSES]
  constrained: dict[int, int] = {}  # class -> exact number of instances
  plans: list[Plan] = []
  for qtype in qtypes:
    kind = qtype
    if qtype == "no_ocr":
      kind = OCR_COPY_TYPES[int(rng.integers(len(OCR_COPY_TYPES)))]
    plan = Plan(qtype=qtype, kind=kind)
    if kind == "ocr_on_object":
      plan.cls, plan.count = _pick_class(rng, single_classes, constrained), 1
    elif kind == "ocr_multi":
      plan.cls, plan.count = _pick_class(rng, multi_classes, constrained), 1
    elif kind in ("ocr_relation", "colour"):
      plan.cls, plan.count = _pick_class(rng, all_classes, constrained), 1
    elif kind == "count":
      plan.cls = _pick_class(rng, all_classes, constrained)
      plan.count = int(rng.integers(1, spec.max_count + 1))
    elif kind == "exists":
      plan.cls = _pick_class(rng, all_classes, constrained)
      plan.count = int(rng.integers(1, 3)) if rng.random() < 0.5 else 0
    if kind != "ocr_position":
      if plan.cls < 0:
        return None
      constrained[plan.cls] = plan.count
    plans.append(plan)
  return plans, constrained


def _place_question_objects(rng: np.random.Generator, scene: Scene,
                            plans: Sequence[Plan], has_ocr: bool,
                            word_iter: Iterator[str]) -> bool:
  """Step 2: the objects the OCR questions are about, clear of each other's text.

  Fills `plan.host` (and `plan.words`, `plan.side`) of the `ocr_on_object`,
  `ocr_multi` and `ocr_relation` plans. Returns False when one does not fit.
  """
  width, height = scene.width, scene.height
  for plan in plans:
    if plan.kind in ("ocr_on_object", "ocr_multi"):
      n_words = 1 if plan.kind == "ocr_on_object" else int(rng.integers(2, 4))
      planted = [next(word_iter) for _ in range(n_words)] if has_ocr else []
      lengths = [len(w) for w in planted] or list(rng.integers(3, 9, size=n_words))
      placed = _place_text_host(rng, width, height, lengths, scene.occupied)
      if placed is None:
        return False
      host_box, boxes = placed
      plan.host = len(scene.objects)
      scene.objects.append(SceneObject(plan.cls, int(rng.integers(len(COLOURS))), host_box))
      scene.occupied.append(host_box)
      for word, box in zip(planted, boxes):
        scene.tokens.append(SceneToken(word, box, plan.host))
      plan.words = tuple(planted)
    elif plan.kind == "ocr_relation":
      word = next(word_iter) if has_ocr else ""
      placed = _place_relation(rng, width, height, len(word), scene.occupied)
      if placed is None:
        return False
      obj_box, plan.side, token_box, reserve = placed
      plan.host = len(scene.objects)
      scene.objects.append(SceneObject(plan.cls, int(rng.integers(len(COLOURS))), obj_box))
      scene.occupied.extend(reserve)
      if token_box is not None:
        scene.tokens.append(SceneToken(word, token_box, -1))
        plan.words = (word,)
  return True


def _add_class_instances(rng: np.random.Generator, scene: Scene,
                         constrained: Mapping[int, int]) -> None:
  """Step 3: the remaining instances of constrained classes (may overlap anything)."""
  for cls, count in constrained.items():
    have = sum(o.cls == cls for o in scene.objects)
    for _ in range(count - have):
      scene.objects.append(SceneObject(cls, int(rng.integers(len(COLOURS))),
                                       _random_box(rng, scene.width, scene.height)))


def _add_free_tokens(rng: np.random.Generator, spec: SyntheticSpec, scene: Scene,
                     unconstrained: Sequence[int], word_iter: Iterator[str]) -> bool:
  """Step 4: free OCR tokens up to a drawn total, some on a distractor of their own.

  A token that finds no free spot is dropped (a crowded image has fewer tokens).
  Returns False when the planted tokens already exceed `spec.max_ocr`.
  """
  n_planted = len(scene.tokens)
  if n_planted > spec.max_ocr:
    return False
  n_total = int(rng.integers(max(spec.min_ocr, n_planted, 1), spec.max_ocr + 1))
  for _ in range(n_total - n_planted):
    word = next(word_iter)
    placed = _place_free_token(rng, scene, len(word))
    if placed is None:
      continue
    box, text_height = placed
    host = -1
    if (unconstrained and len(scene.objects) < spec.max_objects
        and rng.random() < spec.text_on_distractor_prob):
      host = _add_text_distractor(rng, scene, box, text_height, unconstrained)
    scene.tokens.append(SceneToken(word, box, host))
    scene.occupied.append(box)
  return True


def _place_free_token(rng: np.random.Generator, scene: Scene, word_len: int
                      ) -> tuple[np.ndarray, float] | None:
  """A token box clear of the reserved rects, and its text height; None if none fits."""
  width, height = scene.width, scene.height
  for _ in range(_MAX_PLACE_TRIES):
    th = float(rng.uniform(0.03, 0.08)) * height
    tw = _text_width(rng, word_len, th)
    x1, y1 = float(rng.uniform(0, width - 1 - tw)), float(rng.uniform(0, height - 1 - th))
    box = np.array([x1, y1, x1 + tw, y1 + th])
    if _free(box, scene.occupied):
      return box, th
  return None


def _add_text_distractor(rng: np.random.Generator, scene: Scene, box: np.ndarray,
                         text_height: float, unconstrained: Sequence[int]) -> int:
  """Adds an object of an unconstrained class around a token box; returns its index."""
  width, height = scene.width, scene.height
  margin = rng.uniform(0.1, 1.5, size=4) * text_height + 3.0
  host_box = np.array([box[0] - margin[0], box[1] - margin[1], box[2] + margin[2],
                       box[3] + margin[3]])
  host_box = np.clip(host_box, 0, [width - 1, height - 1, width - 1, height - 1])
  host = len(scene.objects)
  cls = unconstrained[int(rng.integers(len(unconstrained)))]
  scene.objects.append(SceneObject(cls, int(rng.integers(len(COLOURS))), host_box))
  return host


def _add_distractors(rng: np.random.Generator, spec: SyntheticSpec, scene: Scene,
                     unconstrained: Sequence[int]) -> None:
  """Step 5: distractor objects (classes no question is about) up to a drawn total."""
  n_objects = int(rng.integers(max(spec.min_objects, len(scene.objects)),
                               spec.max_objects + 1))
  while unconstrained and len(scene.objects) < n_objects:
    cls = unconstrained[int(rng.integers(len(unconstrained)))]
    scene.objects.append(SceneObject(cls, int(rng.integers(len(COLOURS))),
                                     _random_box(rng, scene.width, scene.height)))


def _finalise(rng: np.random.Generator, spec: SyntheticSpec, scene: Scene,
              plans: Sequence[Plan]) -> None:
  """Step 6: integer pixel boxes, then shuffled rows (keeping the host links).

  Shuffling matters: in build order the question objects and their text come first,
  which the model could otherwise learn instead of reading the boxes.
  """
  for item in scene.objects + scene.tokens:
    item.box = _round_box(item.box, scene.width, scene.height)
  obj_perm = rng.permutation(len(scene.objects))
  new_index = np.empty(len(obj_perm), np.int64)
  new_index[obj_perm] = np.arange(len(obj_perm))
  scene.objects = [scene.objects[i] for i in obj_perm]
  for tok in scene.tokens:
    tok.host = int(new_index[tok.host]) if tok.host >= 0 else -1
  for plan in plans:
    plan.host = int(new_index[plan.host]) if plan.host >= 0 else -1
  if spec.shuffle_ocr and scene.tokens:
    scene.tokens = [scene.tokens[i] for i in rng.permutation(len(scene.tokens))]
