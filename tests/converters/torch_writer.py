"""Writes numpy state dicts as the upstream checkpoints were saved (test helper).

A thin wrapper over the library writer `converters.torch_writer` that adds what only
the tests need: pythia's checkpoint dict around the state dict (with its `ConfigNode`,
which the reader must see as an inert placeholder) and tensors saved from `cuda:0`, as
the released TAP checkpoints were. The opcode helpers are re-exported for the tests that
hand-build malformed pickles.
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Mapping

import numpy as np

from converters import torch_writer
from converters.torch_writer import LEGACY_MAGIC  # noqa: F401 (re-exported)
from converters.torch_writer import op_global as _glob  # noqa: F401
from converters.torch_writer import op_int as _int  # noqa: F401
from converters.torch_writer import op_str as _str  # noqa: F401
from converters.torch_writer import op_tuple as _tuple  # noqa: F401


def write_checkpoint(path: Path, state_dict: Mapping[str, np.ndarray], *,
                     legacy: bool = False, pythia: bool = True) -> Path:
  """Writes `state_dict` (float32) as torch.save would.

  Args:
    path: output file.
    state_dict: name -> array, written in this order.
    legacy: the pre-1.6 format instead of zip.
    pythia: wrap as a pythia checkpoint `{'model': sd, 'best_iteration': 24000,
      'config': pythia ConfigNode, ...}` instead of a bare state dict.
  """
  sd = collections.OrderedDict(
      (name, np.ascontiguousarray(value, np.float32)) for name, value in state_dict.items())
  obj = sd
  if pythia:
    obj = {"model": sd, "best_iteration": 24000,
           "config": torch_writer.Instance("pythia.utils.configuration", "ConfigNode"),
           "git/branch": "master"}
  torch_writer.save(path, obj, legacy=legacy, location="cuda:0")
  return path
