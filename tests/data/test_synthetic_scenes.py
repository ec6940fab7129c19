"""Scene geometry (`synthetic.scenes`): the answer rules and the steps of `build_scene`."""

from __future__ import annotations

import numpy as np
import pytest

from lfpr_jax.data import synthetic
from lfpr_jax.data.synthetic import scenes

SPEC = synthetic.SyntheticSpec(seed=1, max_objects=10, max_ocr=8, num_object_classes=10)
WORDS = ("bakor", "tidu", "lemosa", "4417", "ravin", "zupe", "kalito", "gomet")
CASES = (
    (("ocr_on_object", "ocr_relation"), True),
    (("ocr_multi", "count"), True),
    (("colour", "exists"), True),
    (("ocr_position", "ocr_on_object"), True),
    (("no_ocr", "no_ocr"), False),
)


def _first_scene(rng, qtypes, has_ocr):
  for _ in range(100):
    built = scenes.build_scene(rng, SPEC, qtypes, has_ocr, WORDS)
    if built is not None:
      return built
  raise AssertionError(f"no scene for {qtypes} in 100 draws")


@pytest.mark.parametrize("qtypes,has_ocr", CASES)
def test_build_scene_invariants(qtypes, has_ocr):
  scene, plans = _first_scene(np.random.default_rng(0), qtypes, has_ocr)
  w, h = scene.width, scene.height
  assert SPEC.image_width_range[0] <= w <= SPEC.image_width_range[1]
  assert SPEC.image_height_range[0] <= h <= SPEC.image_height_range[1]
  assert SPEC.min_objects <= len(scene.objects) <= SPEC.max_objects
  assert len(scene.tokens) <= SPEC.max_ocr
  if not has_ocr:
    assert not scene.tokens
  for item in scene.objects + scene.tokens:  # integer pixel boxes inside the image
    box = item.box
    assert np.array_equal(box, np.round(box))
    assert 0 <= box[0] <= box[2] <= w - 1 and 0 <= box[1] <= box[3] <= h - 1
  assert len({t.word for t in scene.tokens}) == len(scene.tokens)
  assert {t.word for t in scene.tokens} <= set(WORDS)
  for tok in scene.tokens:  # host links survive the row shuffle
    if tok.host >= 0:
      assert scenes._contains(scene.objects[tok.host].box, tok.box)
  assert [p.qtype for p in plans] == list(qtypes)
  for plan in plans:
    if plan.kind == "ocr_position":
      continue
    # Every class a question is about has exactly its planned number of instances.
    assert sum(o.cls == plan.cls for o in scene.objects) == plan.count, plan
    if plan.host >= 0:
      assert scene.objects[plan.host].cls == plan.cls
    if plan.kind in ("ocr_on_object", "ocr_multi") and has_ocr:
      hosted = [t.word for t in scene.tokens if t.host == plan.host]
      assert sorted(hosted) == sorted(plan.words)
      assert len(plan.words) == (1 if plan.kind == "ocr_on_object" else len(hosted))


def test_build_scene_is_a_function_of_the_stream():
  a, plans_a = _first_scene(np.random.default_rng(5), CASES[0][0], True)
  b, plans_b = _first_scene(np.random.default_rng(5), CASES[0][0], True)
  assert (a.width, a.height) == (b.width, b.height)
  assert [(o.cls, o.colour, o.box.tolist()) for o in a.objects] == [
      (o.cls, o.colour, o.box.tolist()) for o in b.objects]
  assert [(t.word, t.host, t.box.tolist()) for t in a.tokens] == [
      (t.word, t.host, t.box.tolist()) for t in b.tokens]
  assert plans_a == plans_b


def test_geometry_rules():
  obj = np.array([100, 100, 200, 200])
  tokens = np.array([[210, 140, 260, 160],   # right, gap 10
                     [300, 150, 340, 170],   # right, farther
                     [120, 60, 180, 90],     # above
                     [120, 120, 180, 140]])  # inside
  assert synthetic.relation_answer(obj, "right", tokens) == 0
  assert synthetic.relation_answer(obj, "above", tokens) == 2
  assert synthetic.relation_answer(obj, "left", tokens) == -1
  assert synthetic.text_on_object(obj, tokens) == [3]
  # 600x600 image; centres x: .39 .53 .25 .25, y: .25 .27 .125 .22.
  assert synthetic.position_answer("right", tokens, 600, 600) == 1  # lead .14
  assert synthetic.position_answer("top", tokens, 600, 600) == 2  # lead .09
  assert synthetic.position_answer("left", tokens, 600, 600) == -1  # tie of 2 and 3
  assert synthetic.position_answer("top left", tokens, 600, 600) == 2
  assert synthetic.position_answer("bottom right", tokens, 600, 600) == 1  # lead .16
  assert synthetic.position_answer("bottom", tokens, 600, 600) == -1  # lead .017 < .05
  assert synthetic.position_answer(0, tokens[:1], 600, 600) == 0  # a lone token
  assert synthetic.position_answer("left", np.zeros((0, 4)), 600, 600) == -1
  with pytest.raises(ValueError, match="unknown direction"):
    synthetic.position_answer("middle", tokens, 600, 600)
