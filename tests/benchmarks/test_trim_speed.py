"""`benchmarks.trim_speed` end to end on a small TAP: every stage runs padded and
trimmed (bfloat16 matmuls: the float32 path differs only in the config field), and
reports consistent figures."""

import dataclasses

from benchmarks import common, trim_speed
from tests.helpers import BASE


def test_every_stage_padded_and_trimmed(monkeypatch):
  # Full segment sizes (so TextVQA-like lengths apply), a small network.
  small = dataclasses.replace(
      common.make_config("tap"), text_bert_layers=1, mmt_heads=(2, 2), mmt_ffn=(32, 32),
      hidden_size=BASE.hidden_size, text_heads=BASE.text_heads, text_ffn=BASE.text_ffn,
      head_dim=BASE.head_dim, fc7_dim=BASE.fc7_dim,
      ptr_query_key_size=BASE.ptr_query_key_size, obj_feat_dim=BASE.obj_feat_dim,
      ocr_feat_dim=BASE.ocr_feat_dim)
  monkeypatch.setattr(common, "make_config", lambda arch: small)
  out = trim_speed.main(["--batch", "4", "--batches", "2", "--repeats", "1",
                         "--stages", "forward,train_grad,mask_grad,greedy",
                         "--simulate", "5", "--compute-dtype", "bfloat16"])
  assert out["compute_dtype"] == "bfloat16"
  for stage in ("forward", "train_grad", "mask_grad", "greedy"):
    r = out["stages"][stage]
    assert r["padded_total_s"] > 0 and r["trimmed_total_s"] > 0, stage
    assert 0 < r["flop_fraction"] < 1, stage     # TextVQA-like batches are trimmed
    assert 2 <= r["programs"] <= 3, stage        # the padded one + one per shape
