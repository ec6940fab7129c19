"""The sweep's grid and config validation, the seeded driver's plumbing, the
aggregation over seeds (mean ± std, gaps to the best method), tables, CSV and plot.
The grid itself runs end to end in tests/experiments/test_main.py."""

import csv
import io
import json

import numpy as np
import pytest

from configs.sweep_synthetic import get_config
from lfpr_jax.experiments import common, config_checks, stages, sweep


def test_cell_depends_on_its_own_restoration_only():
  config = get_config("full")
  values = stages.depends_on(config, common.SHARED_STAGES + sweep.STAGES,
                             "sweep cells")
  cell = lambda r, c=0.4: sweep.Cell("lfpr", r, c)
  deps = {r: sweep.cell_depends_on(values, cell(r))
          for r in ("none", "rest", "finetune", "kwon", "kwon_lf")}
  assert deps["rest"]["rest.schedule@0.4"] == [100, 2]
  assert "rest.schedule" not in deps["rest"]
  assert deps["rest"]["cell"] == "lfpr-rest-params-0.4"
  for r, d in deps.items():
    assert not any(k.startswith(("sweep.criteria", "sweep.constraints")) for k in d), r
    assert d["eval.batch_size"] == config.eval.batch_size and "prune.group_size" in d, r
  assert not any(k.startswith(("rest.", "sweep.finetune", "sweep.kwon"))
                 for k in deps["none"])
  assert "sweep.kwon_tune_samples" in deps["kwon"] and "rest.lr" not in deps["kwon_lf"]
  assert "sweep.finetune.lr" in deps["finetune"] and "rest.lr" not in deps["finetune"]
  assert deps["finetune"]["rest.batch_size"] == config.rest.batch_size
  # Another schedule entry at 0.4 changes the ReSt cell at 0.4 only.
  other = dict(values, **{"rest.schedule": [[0.2, 100, 3], [0.4, 73, 2],
                                            [0.6, 10, 0], [0.8, 10, 0]]})
  for r in deps:
    assert (sweep.cell_depends_on(other, cell(r)) != deps[r]) == (r == "rest"), r
  assert (sweep.cell_depends_on(other, cell("rest", 0.2))
          == sweep.cell_depends_on(values, cell("rest", 0.2)))


def test_grid_and_bad_names():
  cells = sweep.cells_of(get_config())
  assert len(cells) == 5 * 2 * 4
  assert {c.criterion for c in cells} == {"lfpr", "lfpr_ps", "l1", "alg", "fisher"}
  assert {c.cost for c in cells} == {"params"}
  assert get_config().sweep.seeds == 3 and get_config("tiny").sweep.seeds == 1
  # :full: every restoration and every cost; kwon_lf only with label-free criteria,
  # full fine-tuning only under the parameter budget (`sweep.finetune_costs`).
  full = sweep.cells_of(get_config("full"))
  assert len(full) == 3 * 4 * (5 * 4 - 2) + 4 * 5
  assert {c.cost for c in full if c.restoration == "finetune"} == {"params"}
  everywhere = get_config("full")
  everywhere.sweep.finetune_costs = ("params", "flops", "latency")
  assert len(sweep.cells_of(everywhere)) == 3 * 4 * (5 * 5 - 2)
  lf = {c.criterion for c in full if c.restoration == "kwon_lf"}
  assert lf == {"lfpr", "lfpr_ps", "l1"}
  assert {(c.criterion, c.restoration) for c in full} >= {("lfpr_ps", "finetune"),
                                                          ("fisher", "kwon")}
  assert {c.cost for c in full} == {"params", "flops", "latency"}
  assert len({c.name for c in full}) == len(full)
  assert sweep.Cell("lfpr", "kwon_lf", 0.4, "flops").name == "lfpr-kwon_lf-flops-0.4"
  tiny = sweep.cells_of(get_config("tiny"))
  assert {c.restoration for c in tiny} == {"none", "rest", "finetune", "kwon",
                                           "kwon_lf"}
  assert {c.criterion for c in tiny} == {"lfpr", "fisher"} and len(tiny) == 9
  assert [c.cost for c in sweep.cells_of(get_config("flops"))] == ["flops"] * 40
  assert [c.cost for c in sweep.cells_of(get_config("latency"))] == ["latency"] * 40
  for key, value, match in (
      ("criteria", ("lfpr", "magnitude"), "sweep.criteria=.*expected a non-empty list "
       "of distinct names from lfpr, l1, alg, fisher, owo, lfpr_ps"),
      ("criteria", ("lfpr", "lfpr"), "sweep.criteria="),
      ("restorations", ("retrain",), "sweep.restorations=.*none, rest, finetune, "
       "kwon, kwon_lf"),
      ("costs", ("seconds",), "sweep.costs=\\('seconds',\\): expected a non-empty "
       "list of distinct cost kinds from params, flops, latency"),
      ("costs", (), "sweep.costs=\\(\\)"),
      ("finetune_costs", ("speed",), "sweep.finetune_costs=\\('speed',\\): expected "
       "a list of distinct cost kinds"),
      ("seeds", 0, "sweep.seeds=0: expected an integer >= 1"),
      ("constraints", (0.0,), "sweep.constraints=.*\\(0, 1\\]"),
      ("constraints", (0.45,), "rest.schedule: has no .* for sweep.constraints "
       "\\[0.45\\]")):
    config = get_config()
    config.sweep[key] = value
    with pytest.raises(stages.ConfigError, match=match):
      config_checks.validate(config)


def test_seed_and_per_sample_checks():
  config = get_config()
  config.prune.dropout = True
  with pytest.raises(stages.ConfigError, match="'lfpr_ps' .* prune.dropout=False"):
    config_checks.validate(config)
  config = get_config()
  config.base_model = "/models/tap"
  with pytest.raises(stages.ConfigError,
                     match="base_model='/models/tap': expected '' with sweep.seeds=3"):
    config_checks.validate(config)
  config.sweep.seeds = 1                     # one seed may use a given base model
  config_checks.validate(config)
  config = get_config()
  config.data.dataset = "textvqa"
  with pytest.raises(stages.ConfigError, match="sweep.seeds=3: .* expected 1 with "
                     "data.dataset='textvqa'"):
    config_checks.validate(config)


def test_config_for_seed_copies():
  config = get_config()
  config.seed, config.data.synthetic.seed = 5, 7
  config.lock()
  before = config.to_json()
  two = sweep.config_for_seed(config, 2)
  assert (two.seed, two.data.synthetic.seed, two.sweep.seeds) == (7, 9, 1)
  assert config.to_json() == before                       # untouched
  assert sweep.config_for_seed(config, 0).seed == 5
  config_checks.validate(two)
  with pytest.raises(ValueError, match="seed index must be an integer >= 0"):
    sweep.config_for_seed(config, -1)
  assert sweep.seed_workdir("/w", 2) == "/w/seed_2"


def _row(method, constraint, acc, *, cost="params", unpruned=0.7):
  criterion, restoration = method.split(" + ")
  return {"method": method, "criterion": criterion, "restoration": restoration,
          "cost": cost, "constraint": constraint, "mmt_params": int(constraint * 1e6),
          "mmt_kept_fraction": constraint, "mmt_macs_fraction": constraint * 0.9,
          "model_params": 2_000_000, "val_accuracy": acc,
          "unpruned_val_accuracy": unpruned, "device_hours": 0.01,
          "full_checkpoint_mb": 8.0, "delta_checkpoint_mb": 1.0}


def _rows():
  rows = []
  for method, accs in (("lfpr + rest", (0.5, 0.6)), ("l1 + none", (0.1, 0.4))):
    for c, acc in zip((0.4, 0.8), accs):
      rows.append(_row(method, c, acc))
  return rows


def test_table_csv_and_plot(tmp_path):
  rows = _rows()
  text = sweep.format_markdown(rows, 0.7)
  assert "Unpruned val accuracy: 70.00" in text
  assert "| l1 + none | params | 0.4 | 0.400M (40.0%) | 36.0% | 10.00 |" in text
  csv_text = sweep.format_csv(rows)
  assert csv_text.splitlines()[1].startswith(
      "lfpr + rest,lfpr,rest,params,0.4,400000,0.4,0.36")
  sweep.plot(sweep.aggregate([rows]), 0.7, str(tmp_path / "p.png"))
  assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


# Three seeds of four methods at one constraint (plus one FLOPs cell):
#   a: 0.60 0.62 0.64 -> mean 0.62, std 0.02 (best)
#   b: 0.57 0.58 0.59 -> mean 0.58, std 0.01: gap 0.04 > 0.03 -> beyond spread
#   c: 0.55 0.61 0.64 -> mean 0.60, std ~0.0458: gap 0.02 < 0.0658 -> within
#   d: only in seed 0 (0.30): one seed, no spread -> None
SEEDS = (
    {"a + rest": 0.60, "b + rest": 0.57, "c + rest": 0.55, "d + none": 0.30},
    {"a + rest": 0.62, "b + rest": 0.58, "c + rest": 0.61},
    {"a + rest": 0.64, "b + rest": 0.59, "c + rest": 0.64},
)


def _seed_rows():
  out = []
  for i, accs in enumerate(SEEDS):
    rows = [_row(m, 0.4, acc, unpruned=0.70 + 0.01 * i) for m, acc in accs.items()]
    rows.append(_row("a + rest", 0.4, 0.5 + 0.1 * i, cost="flops",
                     unpruned=0.70 + 0.01 * i))
    out.append(rows)
  return out


def test_aggregate_mean_std_and_gaps():
  agg = sweep.aggregate(_seed_rows())
  by = {(r["cost"], r["method"]): r for r in agg}
  assert [(r["cost"], r["method"]) for r in agg] == [
      ("params", "a + rest"), ("params", "b + rest"), ("params", "c + rest"),
      ("params", "d + none"), ("flops", "a + rest")]
  a, b, c, d = (by["params", m] for m in ("a + rest", "b + rest", "c + rest",
                                          "d + none"))
  assert a["seeds"] == 3 and d["seeds"] == 1
  assert a["val_accuracy_mean"] == pytest.approx(0.62)
  assert a["val_accuracy_std"] == pytest.approx(0.02)            # sample std (ddof 1)
  assert c["val_accuracy_std"] == pytest.approx(np.std([0.55, 0.61, 0.64], ddof=1))
  assert d["val_accuracy_std"] == 0.0
  assert a["unpruned_val_accuracy_mean"] == pytest.approx(0.71)
  assert a["unpruned_val_accuracy_std"] == pytest.approx(0.01)
  assert a["mmt_params_mean"] == 400_000 and a["mmt_params_std"] == 0
  assert (a["is_best"], a["gap_to_best"], a["beyond_spread"]) == (True, 0.0, False)
  assert b["gap_to_best"] == pytest.approx(0.04) and b["beyond_spread"] is True
  assert c["gap_to_best"] == pytest.approx(0.02) and c["beyond_spread"] is False
  assert d["beyond_spread"] is None and not d["is_best"]
  # The FLOPs cell is its own group: best there, whatever the params cells say.
  assert by["flops", "a + rest"]["is_best"]
  assert by["flops", "a + rest"]["val_accuracy_mean"] == pytest.approx(0.6)
  # The rule is strict: a gap equal to the summed spread is within it.
  tie = sweep.mark_gaps([
      {"method": "x", "cost": "params", "constraint": 0.4, "seeds": 2,
       "val_accuracy_mean": 0.5, "val_accuracy_std": 0.05},
      {"method": "y", "cost": "params", "constraint": 0.4, "seeds": 2,
       "val_accuracy_mean": 0.375, "val_accuracy_std": 0.075}])
  assert [r["beyond_spread"] for r in tie] == [False, False]
  # Equal means: the first method by name is the best.
  same = sweep.mark_gaps([
      {"method": m, "cost": "params", "constraint": 0.4, "seeds": 2,
       "val_accuracy_mean": 0.5, "val_accuracy_std": 0.0} for m in ("z", "y")])
  assert [r["is_best"] for r in same] == [False, True]
  with pytest.raises(ValueError, match="seed 1 has the cell"):
    sweep.aggregate([_seed_rows()[0], _seed_rows()[1] * 2])
  with pytest.raises(ValueError, match="seed 0: a sweep row lacks \\['cost'\\]"):
    sweep.aggregate([[{k: v for k, v in _row("a + b", 0.4, 0.5).items()
                       if k != "cost"}]])
  assert sweep.mean_std([0.3]) == (0.3, 0.0)


def test_aggregate_table_and_csv():
  agg = sweep.aggregate(_seed_rows())
  text = sweep.format_aggregate_markdown(agg, 3)
  assert text.startswith("Seeds: 3 (seed_0 ... seed_2); unpruned val accuracy: "
                         "71.00 ± 1.00")
  assert "| a + rest | params | 0.4 | 0.400M ± 0.000M (40.0%) | 36.0% | 62.00 ± 2.00 " \
         "| best |" in text
  assert "| b + rest | params | 0.4 |" in text and "| -4.00 (beyond spread) |" in text
  assert "| 60.00 ± 4.58 | -2.00 (within spread) |" in text
  assert "| 30.00 ± 0.00 | -32.00 (one seed: no spread) |" in text
  lines = text.splitlines()
  assert lines.index([l for l in lines if l.startswith("| a + rest | flops")][0]) > \
      lines.index([l for l in lines if l.startswith("| d + none")][0])
  summary = sweep.format_summary_markdown(agg).splitlines()
  assert summary[:4] == ["Budget: params (kept fraction of the MMT's params)", "",
                         "| method | 40% |", "|---|---|"]
  # Methods grouped by restoration; best bold, beyond-spread marked, one seed noted.
  assert summary[4:8] == ["| d + none | 30.00 ± 0.00 (1 seed) |",
                          "| a + rest | **62.00 ± 2.00** |",
                          "| b + rest | 58.00 ± 1.00 † |",
                          "| c + rest | 60.00 ± 4.58 |"]
  assert summary[9:13] == ["Budget: flops (kept fraction of the MMT's flops)", "",
                           "| method | 40% |", "|---|---|"]
  table = list(csv.DictReader(io.StringIO(sweep.format_csv(agg, sweep.AGG_CSV_KEYS))))
  assert table[1]["method"] == "b + rest" and table[1]["beyond_spread"] == "True"
  assert table[3]["beyond_spread"] == "" and table[0]["seeds"] == "3"
  assert float(table[0]["val_accuracy_std"]) == pytest.approx(0.02)


def test_run_seeds_runs_each_seed_in_its_subdir(tmp_path, monkeypatch):
  """The seeded driver: one `run` per seed in seed_<i>/ with its shifted config, then
  the aggregate in sweep/ (the per-seed sweep itself is stubbed)."""
  calls = []
  seed_rows = _seed_rows()
  real_run = sweep.run

  def fake_run(config, workdir, *, invalidate=False):
    if config.sweep.seeds > 1:
      return real_run(config, workdir, invalidate=invalidate)
    calls.append((config.seed, config.data.synthetic.seed, config.sweep.seeds,
                  workdir, invalidate))
    return seed_rows[len(calls) - 1]
  monkeypatch.setattr(sweep, "run", fake_run)
  config = get_config()
  rows = sweep.run(config, str(tmp_path))
  assert calls == [(i, i, 1, str(tmp_path / f"seed_{i}"), False) for i in range(3)]
  assert rows == sweep.aggregate(seed_rows)
  out = tmp_path / "sweep"
  assert (out / "results.md").read_text() == sweep.format_aggregate_markdown(rows, 3)
  assert (out / "summary.md").read_text() == sweep.format_summary_markdown(rows)
  per_seed = list(csv.DictReader(io.StringIO((out / "per_seed.csv").read_text())))
  assert len(per_seed) == sum(len(r) for r in seed_rows)
  assert [p["seed"] for p in per_seed][:5] == ["0"] * 5 and per_seed[-1]["seed"] == "2"
  meta = json.loads((out / "metadata.json").read_text())
  assert [s["seed"] for s in meta["seeds"]] == [0, 1, 2]
  assert meta["config"]["sweep"]["seeds"] == 3
  assert (out / "accuracy_vs_params.png").read_bytes()[:4] == b"\x89PNG"
  bad = get_config()
  bad.sweep.costs = ("seconds",)
  with pytest.raises(stages.ConfigError, match="sweep.costs"):
    sweep.run(bad, str(tmp_path / "bad"))
  assert not (tmp_path / "bad").exists()
