"""The sweep's grid validation, table, CSV and plot (the grid itself runs end to end
in tests/test_finetune.py)."""

import pytest

from configs.sweep_synthetic import get_config
from lfpr_jax.experiments import config_checks, stages, sweep


def test_grid_and_bad_names():
  cells = sweep.cells_of(get_config())
  assert len(cells) == 4 * 2 * 4
  assert {c.criterion for c in cells} == {"lfpr", "l1", "alg", "fisher"}
  for key, value, match in (
      ("criteria", ("lfpr", "magnitude"), "sweep.criteria=.*expected a non-empty list "
       "from lfpr, l1, alg, fisher, owo"),
      ("restorations", ("retrain",), "sweep.restorations=.*none, rest, finetune, kwon"),
      ("cost", "latency", "sweep.cost='latency': expected one of 'params', 'flops'"),
      ("constraints", (0.0,), "sweep.constraints=.*\\(0, 1\\]"),
      ("constraints", (0.45,), "rest.schedule: has no .* for sweep.constraints "
       "\\[0.45\\]")):
    config = get_config()
    config.sweep[key] = value
    with pytest.raises(stages.ConfigError, match=match):
      config_checks.validate(config)


def _rows():
  rows = []
  for method, accs in (("lfpr + rest", (0.5, 0.6)), ("l1 + none", (0.1, 0.4))):
    criterion, restoration = method.split(" + ")
    for c, acc in zip((0.4, 0.8), accs):
      rows.append({"method": method, "criterion": criterion,
                   "restoration": restoration, "constraint": c,
                   "mmt_params": int(c * 1e6), "mmt_kept_fraction": c,
                   "model_params": 2_000_000, "val_accuracy": acc,
                   "unpruned_val_accuracy": 0.7, "device_hours": 0.01,
                   "full_checkpoint_mb": 8.0, "delta_checkpoint_mb": 1.0})
  return rows


def test_table_csv_and_plot(tmp_path):
  rows = _rows()
  text = sweep.format_markdown(rows, 0.7)
  assert "Unpruned val accuracy: 70.00" in text
  assert "| l1 + none | 0.4 | 0.400M (40.0%) | 10.00 |" in text
  csv_text = sweep.format_csv(rows)
  assert csv_text.splitlines()[1].startswith("lfpr + rest,lfpr,rest,0.4,400000,")
  sweep.plot(rows, 0.7, str(tmp_path / "p.png"))
  assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
