"""`benchmarks.op_profile` on a small TAP: the profiler's per-operation events are
read back, attributed to model parts, and the products' FLOPs match the HLO."""

import dataclasses

import pytest

from benchmarks import common, op_profile
from tests.helpers import BASE


def test_dot_flops_and_parts_from_hlo_text():
  hlo = "\n".join([
      "%fused_computation.3 (param_0: f32[6,4], param_1: f32[4,5]) -> f32[6,5] {",
      "  %param_0 = f32[6,4]{1,0} parameter(0)",
      "  %param_1 = f32[4,5]{1,0} parameter(1)",
      "  ROOT %dot.1 = f32[6,5]{1,0} dot(%param_0, %param_1), lhs_contracting_dims={1},"
      " rhs_contracting_dims={0}",
      "}",
      "ENTRY %main (a: f32[2,3,4], b: f32[2,4,7]) -> f32[2,3,7] {",
      "  %a = f32[2,3,4]{2,1,0} parameter(0)",
      "  %b = f32[2,4,7]{2,1,0} parameter(1)",
      "  ROOT %dot_general.2 = f32[2,3,7]{2,1,0} dot(%a, %b), lhs_batch_dims={0}, "
      "lhs_contracting_dims={2}, rhs_batch_dims={0}, rhs_contracting_dims={1}",
      "}"])
  assert op_profile.dot_flops(hlo) == {"fused_computation.3": 2 * 6 * 5 * 4,
                                       "dot_general.2": 2 * 2 * 3 * 7 * 4}
  part = op_profile.op_part
  assert part("jit(loss)/transpose(jvp(TAP))/TAP._mmt/mmt_layer_1.attend/attention/"
              "attention.context/reduce_sum") == "mmt attention core bwd"
  assert part("jit(loss)/jvp(TAP)/TAP.mmt_inputs/TAP._inputs/text_bert/layer_0/"
              "layer_0.attend/ffn/ffn.hidden/wi/dot_general") == "text ffn fwd"
  assert part("jit(f)/TAP._mmt/mmt_layer_0.project_kv/attention.project_kv/value/"
              "bsd,dhk->bhsk/dot_general") == "mmt qkv/out projections fwd"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_profile_runs_and_attributes_time(monkeypatch, dtype):
  small = dataclasses.replace(BASE, text_bert_layers=1)
  monkeypatch.setattr(common, "make_config", lambda arch: small)
  out = op_profile.main(["--stage", "train_grad", "--batch", "2", "--top", "5",
                         "--compute-dtype", dtype])
  assert out["wall_s"] > 0 and out["ops_ms"] > 0
  parts = out["parts"]
  assert any(p.startswith("mmt ffn") for p in parts)
  assert any(p.endswith("bwd") for p in parts)
  assert sum(p["gflop"] for p in parts.values()) > 0
  assert len(out["top_ops"]) == 5
