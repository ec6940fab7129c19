"""`SyntheticSpec`: validation, the default question mix, the strict dict round trip."""

from __future__ import annotations

import json

import pytest

from lfpr_jax.data import synthetic


def test_spec_validation_and_round_trip():
  spec = synthetic.SyntheticSpec(type_fractions={"ocr_position": 0.5, "count": 0.5})
  assert spec.fractions["ocr_position"] == 0.5 and spec.fractions["no_ocr"] == 0.0
  assert synthetic.SyntheticSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
  hash(spec)
  with pytest.raises(ValueError, match="sum to 1"):
    synthetic.SyntheticSpec(type_fractions={"ocr_position": 0.5})
  with pytest.raises(ValueError, match="unknown question type"):
    synthetic.SyntheticSpec(type_fractions={"riddle": 1.0})
  with pytest.raises(ValueError, match="max_ocr"):
    synthetic.SyntheticSpec(max_ocr=4, min_ocr=2)
  with pytest.raises(ValueError, match="unknown SyntheticSpec field"):
    synthetic.SyntheticSpec.from_dict({"sead": 1})


def test_default_mix_covers_the_issue():
  spec = synthetic.SyntheticSpec()
  fractions = spec.fractions
  # OCR copies chosen by position / by object, multi-token copies, fixed-vocabulary
  # answers (yes/no, colours) and images without OCR are all in the default mix.
  for qtype in (*synthetic.OCR_COPY_TYPES, "exists", "colour", "no_ocr"):
    assert fractions[qtype] > 0, qtype
  assert sum(fractions[t] for t in synthetic.OCR_COPY_TYPES) >= 0.5
  assert spec.text_on_distractor_prob > 0 and spec.feature_noise > 0


def test_to_dict_is_json_ready():
  spec = synthetic.SyntheticSpec(seed=4, position_directions=("left", "top"))
  d = spec.to_dict()
  assert d["position_directions"] == ["left", "top"]
  assert d["image_width_range"] == [512, 1024] and d["image_height_range"] == [384, 768]
  assert d["type_fractions"] == dict(synthetic.DEFAULT_TYPE_FRACTIONS)
  assert json.loads(json.dumps(d)) == d  # lists and a dict: nothing changes in JSON
  assert synthetic.SyntheticSpec.from_dict(d) == spec
