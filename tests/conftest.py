"""Shared test setup: fake CPU devices, and the golden upstream models (tests/golden)."""

import os

# Multi-device logic is tested on fake CPU devices; must be set before JAX starts.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


class GoldenModels:
  """Per-arch golden weights, built once per test process on first use.

  The numpy weight rule takes seconds and the full-size arrays are large, so every
  test file asks this one session object instead of rebuilding them.
  """

  def __init__(self):
    self._built: dict[str, tuple] = {}

  def get(self, arch: str):
    """(upstream state dict, TapConfig, Flax params) of the golden model `arch`."""
    if arch not in self._built:
      # Imported here: JAX must start after the XLA flags above are set.
      from converters.torch_to_flax import infer_config, state_dict_to_params  # noqa: PLC0415
      from tests.golden import state_dict  # noqa: PLC0415
      sd = state_dict(arch)
      config = infer_config(sd)
      self._built[arch] = (sd, config, state_dict_to_params(sd, config))
    return self._built[arch]


@pytest.fixture(scope="session")
def golden_models() -> GoldenModels:
  return GoldenModels()
