"""The benchmarks' shared result header and JSON writer (benchmarks/common.py)."""

import datetime
import json
import os
import sys

import pytest

from benchmarks import common


def test_run_header_names_schema_time_and_the_rerun_command(monkeypatch):
  monkeypatch.setattr(sys, "argv", ["/somewhere/benchmarks/precision.py", "--batch", "4"])
  before = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
  own = common.run_header("a/1", "benchmarks.precision")
  given = common.run_header("a/1", "benchmarks.precision", ["--repeats", "2"])
  python = os.path.basename(sys.executable)
  assert own["schema"] == "a/1" and list(own) == ["schema", "created", "command"]
  assert own["command"] == [python, "-m", "benchmarks.precision", "--batch", "4"]
  assert given["command"] == [python, "-m", "benchmarks.precision", "--repeats", "2"]
  created = datetime.datetime.fromisoformat(own["created"])
  assert created.utcoffset() == datetime.timedelta(0) and created >= before


def test_write_json_replaces_whole_files_only(tmp_path):
  path = tmp_path / "sub" / "r.json"
  common.write_json(str(path), {"a": 1})
  assert json.loads(path.read_text()) == {"a": 1}
  with pytest.raises(TypeError):
    common.write_json(str(path), {"a": object()})   # not serialisable: nothing replaced
  assert json.loads(path.read_text()) == {"a": 1}
  assert sorted(p.name for p in path.parent.iterdir()) == ["r.json"]
