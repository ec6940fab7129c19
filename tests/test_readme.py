"""The README's Python examples run as written, on the golden TAP weights."""

import os
import pathlib
import re

import pytest

from lfpr_jax.training import checkpointing
from tests.conftest import REPO


@pytest.mark.xdist_group("golden_tap")  # shares the golden TAP with the parity tests
def test_readme_python_examples(tmp_path, monkeypatch, golden_models):
  blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
  assert len(blocks) >= 2
  _, config, params = golden_models.get("tap")
  checkpointing.save_model(str(tmp_path / "converted" / "tap_textvqa"), config, params)
  # The README runs from the repo root (it reads tests/golden/tap/batch.npz and
  # converted/tap_textvqa): mirror that layout.
  (tmp_path / "repo").mkdir()
  os.symlink(REPO / "tests", tmp_path / "repo" / "tests")
  os.symlink(tmp_path / "converted", tmp_path / "repo" / "converted")
  monkeypatch.chdir(tmp_path / "repo")
  namespace: dict = {}
  for block in blocks:
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102
  assert namespace["scores"].shape == (2, 12, 5100)
  assert namespace["answers"].shape == (2, 12)
  assert namespace["head_grad"].shape == (4, 12)
  assert pathlib.Path("converted/tap_textvqa/arch.json").exists()
