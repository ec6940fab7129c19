"""atomic: temp-then-rename writes, normal permissions, and no deleting foreign paths."""

import json
import math
import os
import stat

import numpy as np
import pytest

from lfpr_jax import atomic


@pytest.fixture
def umask():
  """Sets a umask for one test and restores the previous one."""
  previous = os.umask(0o022)
  yield lambda mask: os.umask(mask)
  os.umask(previous)


def _mode(path) -> int:
  return stat.S_IMODE(os.stat(path).st_mode)


def _leftovers(folder) -> list[str]:
  return [p for p in os.listdir(folder) if ".tmp-" in p or ".old-" in p]


def _foreign(tmp_path):
  foreign = tmp_path / "mine"
  foreign.mkdir()
  (foreign / "notes.txt").write_text("precious")
  (foreign / "sub").mkdir()
  (foreign / "sub" / "data.bin").write_bytes(b"\x00\x01")
  return foreign


def _snapshot(folder) -> dict[str, bytes]:
  out = {}
  for root, _, files in os.walk(folder):
    for name in files:
      full = os.path.join(root, name)
      with open(full, "rb") as f:
        out[os.path.relpath(full, folder)] = f.read()
  return out


@pytest.mark.parametrize("mask,dir_mode,file_mode",
                         [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640),
                          (0o002, 0o775, 0o664)])
def test_permissions_follow_umask(tmp_path, umask, mask, dir_mode, file_mode):
  umask(mask)
  with atomic.directory(tmp_path / "d") as tmp:
    with open(os.path.join(tmp, "x"), "w") as f:
      f.write("x")
  assert _mode(tmp_path / "d") == dir_mode
  assert _mode(tmp_path / "d" / atomic.MARKER) == file_mode
  atomic.write_text(tmp_path / "t.txt", "hi")
  atomic.write_json(tmp_path / "j.json", {"a": 1})
  atomic.savez(tmp_path / "a.npz", x=np.arange(3))
  for name in ("t.txt", "j.json", "a.npz"):
    assert _mode(tmp_path / name) == file_mode, name


def test_write_text_replaces_and_leaves_no_temp(tmp_path):
  path = tmp_path / "sub" / "f.txt"
  atomic.write_text(path, "one")
  atomic.write_text(path, "twö")
  assert path.read_text(encoding="utf-8") == "twö"
  assert _leftovers(path.parent) == []


def test_failed_write_keeps_old_content(tmp_path):
  path = tmp_path / "f.json"
  atomic.write_json(path, {"v": 1})
  with pytest.raises(TypeError):
    atomic.write_json(path, {"v": object()})
  assert json.loads(path.read_text()) == {"v": 1}
  assert _leftovers(tmp_path) == []


def test_write_json_is_strict(tmp_path):
  path = tmp_path / "m.json"
  atomic.write_json(path, {"loss": float("nan"), "nested": [1.5, float("inf"),
                    {"x": -math.inf}], "t": (1, 2), "np": np.float32(np.nan),
                    "arr": np.array([0.5, np.nan]), "ok": 2.0})
  text = path.read_text()
  assert "NaN" not in text and "Infinity" not in text
  # Strict parsers must accept it: reject the non-standard constants.
  def reject(name):
    raise AssertionError(f"non-standard JSON constant {name}")
  obj = json.loads(text, parse_constant=reject)
  assert obj == {"loss": None, "nested": [1.5, None, {"x": None}], "t": [1, 2],
                 "np": None, "arr": [0.5, None], "ok": 2.0}


def test_savez_keeps_the_name(tmp_path):
  path = tmp_path / "scores"  # no .npz: np.savez alone would append one
  atomic.savez(path, a=np.ones(2))
  assert sorted(os.listdir(tmp_path)) == ["scores"]
  with np.load(path) as f:
    np.testing.assert_array_equal(f["a"], np.ones(2))


def test_directory_marks_and_replaces_own(tmp_path):
  target = tmp_path / "out"
  with atomic.directory(target) as tmp:
    (open(os.path.join(tmp, "v1"), "w")).close()
  assert atomic.is_marked(target)
  with atomic.directory(target, overwrite=True) as tmp:
    (open(os.path.join(tmp, "v2"), "w")).close()
  assert sorted(os.listdir(target)) == [atomic.MARKER, "v2"]
  assert _leftovers(tmp_path) == []


def test_directory_refuses_existing_without_overwrite(tmp_path):
  target = tmp_path / "out"
  with atomic.directory(target):
    pass
  with pytest.raises(FileExistsError, match=f"{target} already exists"):
    with atomic.directory(target):
      raise AssertionError("body must not run")
  assert atomic.is_marked(target)


@pytest.mark.parametrize("overwrite", [False, True])
def test_directory_never_deletes_foreign_files(tmp_path, overwrite):
  foreign = _foreign(tmp_path)
  before = _snapshot(foreign)
  with pytest.raises(atomic.ForeignDirectoryError,
                     match=f"refusing to replace {foreign}: .*did not write"):
    with atomic.directory(foreign, overwrite=overwrite):
      raise AssertionError("body must not run")
  assert _snapshot(foreign) == before
  assert _leftovers(tmp_path) == []


def test_foreign_dir_appearing_during_the_write_is_kept(tmp_path):
  """Checked again before the rename: a folder created meanwhile is not replaced."""
  target = tmp_path / "out"
  with pytest.raises(atomic.ForeignDirectoryError):
    with atomic.directory(target, overwrite=True):
      _foreign(tmp_path).rename(target)
  assert (target / "notes.txt").read_text() == "precious"
  assert _leftovers(tmp_path) == []


def test_refuses_files_and_links(tmp_path):
  f = tmp_path / "file"
  f.write_text("keep")
  with pytest.raises(atomic.ForeignDirectoryError, match="it is a file"):
    atomic.check_replaceable(f)
  own = tmp_path / "own"
  with atomic.directory(own):
    pass
  link = tmp_path / "link"
  link.symlink_to(own)
  with pytest.raises(atomic.ForeignDirectoryError, match="symbolic link"):
    with atomic.directory(link, overwrite=True):
      pass
  assert f.read_text() == "keep" and link.is_symlink() and atomic.is_marked(own)


def test_recognise_and_empty_dirs(tmp_path):
  legacy = tmp_path / "legacy"
  legacy.mkdir()
  (legacy / "arch.json").write_text("{}")
  with pytest.raises(atomic.ForeignDirectoryError):
    atomic.check_replaceable(legacy)
  atomic.check_replaceable(legacy, recognise=lambda p: os.path.isfile(
      os.path.join(p, "arch.json")))
  empty = tmp_path / "empty"
  empty.mkdir()
  atomic.check_replaceable(empty)  # nothing to lose
  with atomic.directory(empty, overwrite=True) as tmp:
    (open(os.path.join(tmp, "new"), "w")).close()
  assert (empty / "new").exists()


def test_failure_inside_leaves_old_directory(tmp_path):
  target = tmp_path / "out"
  with atomic.directory(target) as tmp:
    (open(os.path.join(tmp, "v1"), "w")).close()
  with pytest.raises(RuntimeError, match="boom"):
    with atomic.directory(target, overwrite=True) as tmp:
      (open(os.path.join(tmp, "v2"), "w")).close()
      raise RuntimeError("boom")
  assert sorted(os.listdir(target)) == [atomic.MARKER, "v1"]
  assert _leftovers(tmp_path) == []


def test_make_dir_claims_only_new_dirs(tmp_path):
  new = atomic.make_dir(tmp_path / "a" / "b")
  assert atomic.is_marked(new)
  foreign = _foreign(tmp_path)
  atomic.make_dir(foreign)
  assert not atomic.is_marked(foreign)
