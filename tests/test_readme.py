"""The README's Python examples run as written, on the golden TAP weights."""

import os
import pathlib
import re

from converters.torch_to_flax import infer_config, state_dict_to_params
from lfpr_jax.training import checkpointing
from tests.conftest import REPO, golden_state_dict


def test_readme_python_examples(tmp_path, monkeypatch):
  blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
  assert len(blocks) >= 2
  sd = golden_state_dict("tap")
  config = infer_config(sd)
  checkpointing.save_model(str(tmp_path / "converted" / "tap_textvqa"), config,
                           state_dict_to_params(sd, config))
  # The README runs from the repo root, next to ../shared; mirror that layout.
  (tmp_path / "repo").mkdir()
  os.symlink(REPO.parent / "shared", tmp_path / "shared")
  os.symlink(tmp_path / "converted", tmp_path / "repo" / "converted")
  monkeypatch.chdir(tmp_path / "repo")
  namespace: dict = {}
  for block in blocks:
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102
  assert namespace["scores"].shape == (2, 12, 5100)
  assert namespace["answers"].shape == (2, 12)
  assert namespace["head_grad"].shape == (4, 12)
  assert pathlib.Path("converted/tap_textvqa/arch.json").exists()
