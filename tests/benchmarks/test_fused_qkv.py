"""`benchmarks.fused_qkv`: both variants compute the same projections and the report
has every precision and pass."""

from benchmarks import fused_qkv


def test_fused_equals_separate_and_reports_every_stage(tmp_path):
  out = fused_qkv.main(["--rows", "32", "--repeats", "1", "--out",
                        str(tmp_path / "r.json")])
  assert set(out["stages"]) == {"float32/forward", "float32/grad", "bfloat16/forward",
                                "bfloat16/grad"}
  for key, r in out["stages"].items():
    assert r["outputs_equal"], key
    assert r["separate_s"] > 0 and r["fused_s"] > 0 and r["ratio"] > 0, key
  assert out["schema"] == "lfpr_jax.bench.fused_qkv/1"
  assert (tmp_path / "r.json").exists()
