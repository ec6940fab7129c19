"""`python -m lfpr_jax.data.tfds_builder`: one `error:` line per bad input, in-process."""

from __future__ import annotations

import os

import pytest

from lfpr_jax.data import tfds_builder
from tests.data.upstream_layout import layout_of, write_data_dir


def _fails(capsys, status, *argv) -> str:
  """Runs the CLI in-process; asserts `status` and ONE `error:` line; returns it."""
  capsys.readouterr()
  with pytest.raises(SystemExit) as e:
    tfds_builder.main(list(argv))
  assert e.value.code == status
  captured = capsys.readouterr()
  lines = [line for line in captured.err.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
  return lines[0]


def _write_layout(root, path, **overrides):
  path.write_text(layout_of(root, **overrides).to_json())
  return path


def test_missing_data_dir(tmp_path, capsys):
  out = tmp_path / "built"
  err = _fails(capsys, 1, "--data_dir", str(tmp_path / "nope"), "--out_dir", str(out))
  assert f"directory {tmp_path / 'nope'}: not found" in err
  assert not out.exists()


def test_data_dir_is_a_file(tmp_path, capsys):
  f = tmp_path / "data.zip"
  f.write_bytes(b"PK")
  err = _fails(capsys, 1, "--data_dir", str(f), "--out_dir", str(tmp_path / "o"))
  assert "is a file, not a directory" in err


def test_missing_input_file_named(tmp_path, capsys):
  root = write_data_dir(tmp_path / "data")
  (root / "ocr_feat_resx/textvqa_conf/train_images/img2_info.npy").unlink()
  layout = _write_layout(root, tmp_path / "layout.json")
  err = _fails(capsys, 1, "--data_dir", str(root), "--layout", str(layout),
               "--out_dir", str(tmp_path / "o"), "--splits", "train")
  assert "img2_info.npy" in err


@pytest.mark.parametrize("args,status,expect", [
    (["--splits", ","], 2, "--splits ',' names no split"),
    (["--dataset", "coco"], 2, "argument --dataset: invalid choice"),
    (["--feat_dim", "wide"], 2, "argument --feat_dim: invalid int value"),
    (["--splits", "dev"], 1, "no split 'dev'"),
])
def test_bad_arguments(tmp_path, capsys, args, status, expect):
  root = write_data_dir(tmp_path / "data")
  layout = _write_layout(root, tmp_path / "layout.json")
  err = _fails(capsys, status, "--data_dir", str(root), "--layout", str(layout),
               "--out_dir", str(tmp_path / "o"), *args)
  assert expect in err


@pytest.mark.parametrize("content,expect", [
    ("{not json", "is not a DataLayout JSON"), ('{"colour": 1}', "colour"),
    ("[1]", "is not a DataLayout JSON"), (None, "not found")])
def test_bad_layout_file(tmp_path, capsys, content, expect):
  layout = tmp_path / "layout.json"
  if content is not None:
    layout.write_text(content)
  err = _fails(capsys, 1, "--data_dir", str(tmp_path), "--layout", str(layout),
               "--out_dir", str(tmp_path / "o"))
  assert str(layout) in err and expect in err


def test_builds_and_reuses(tmp_path, capsys):
  root = write_data_dir(tmp_path / "data")
  layout = _write_layout(root, tmp_path / "layout.json")
  argv = ["--data_dir", str(root), "--layout", str(layout), "--out_dir",
          str(tmp_path / "o"), "--splits", "val"]
  assert tfds_builder.main(argv) == 0
  target = tfds_builder.dataset_dir(tmp_path / "o", "textvqa", "val")
  assert os.path.isfile(os.path.join(target, "dataset_info.json"))
  capsys.readouterr()
  assert tfds_builder.main(argv) == 0
  assert capsys.readouterr().out.strip().endswith(f"at {target} (reused)")
