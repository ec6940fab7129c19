"""Upstream PyTorch golden fixtures vendored for the tests (see README.md here).

`outputs(arch)` rebuilds the keys stored once under another name (`<arch>/aliases.json`),
so callers see every recorded upstream output under its upstream name.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from tests.golden.weights import GOLDEN_MODELS, manifest, state_dict

GOLDEN = pathlib.Path(__file__).resolve().parent

__all__ = ["GOLDEN", "GOLDEN_MODELS", "arch_param", "batch", "manifest", "npz", "outputs",
           "pruning_meta", "state_dict"]


def npz(arch: str, name: str) -> dict[str, np.ndarray]:
  """Every array of `<arch>/<name>.npz`, loaded (the file is closed on return)."""
  if arch not in GOLDEN_MODELS:
    raise ValueError(f"golden arch must be one of {sorted(GOLDEN_MODELS)}, got {arch!r}")
  with np.load(GOLDEN / arch / f"{name}.npz") as z:
    return {k: z[k] for k in z.files}


def batch(arch: str) -> dict[str, np.ndarray]:
  """The input batch (B = 2) of the golden model, upstream `SampleList` field names."""
  return npz(arch, "batch")


def outputs(arch: str) -> dict[str, np.ndarray]:
  """Upstream outputs of the golden model on `batch(arch)`, aliases rebuilt.

  An alias is `[source]` (the same array) or `[source, start, stop]` (a slice of the
  source's last axis, `stop` null for the end); vendor.py checked each bit for bit.
  """
  out = npz(arch, "outputs")
  aliases = json.loads((GOLDEN / arch / "aliases.json").read_text())
  for key, (source, *bounds) in aliases.items():
    out[key] = out[source][..., slice(*bounds)] if bounds else out[source]
  return out


def pruning_meta(arch: str) -> dict:
  """`<arch>/pruning.json`: upstream's selections, configs and pruned shapes."""
  return json.loads((GOLDEN / arch / "pruning.json").read_text())


def arch_param(arch: str):
  """`arch` as a pytest parameter in the xdist group of its golden model.

  Under `pytest -n N --dist loadgroup` every test of one golden model then runs in
  one worker, which builds its weights and compiles it once.
  """
  return pytest.param(arch, marks=pytest.mark.xdist_group(f"golden_{arch}"))
