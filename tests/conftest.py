"""Shared test setup: fake CPU devices, and the golden upstream models (tests/golden)."""

import os
from importlib import metadata


def _fast_compile_xla_flags() -> str:
  """XLA:CPU flags that shorten compiles; its code runs a little slower.

  jaxlib 0.10's new fusion emitters generate faster code but compile ~25% longer than
  the classic ones (full TAP train step 6.6 -> 5.0 s); tests run small programs
  once, so compile time is what they pay (the suite runs ~15% faster). jaxlib 0.11+
  has only the new emitters and aborts on the unknown flag, so it gets none.
  """
  try:
    major, minor = (int(v) for v in metadata.version("jaxlib").split(".")[:2])
  except (metadata.PackageNotFoundError, ValueError):
    return ""
  return "--xla_cpu_use_fusion_emitters=false" if (major, minor) < (0, 11) else ""


FAST_COMPILE_XLA_FLAGS = _fast_compile_xla_flags()
# Multi-device logic is tested on fake CPU devices; must be set before JAX starts.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
if FAST_COMPILE_XLA_FLAGS and FAST_COMPILE_XLA_FLAGS not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " " + FAST_COMPILE_XLA_FLAGS
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests run small programs once: compile time dominates them, and XLA's optimisation
# passes cost more compile time than they save (the suite runs ~20% faster). They change
# speed, not what is computed; the parity tests pass with the same tolerances either
# way. Subprocesses started by the tests get the same setting (SUBPROCESS_ENV).
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
# The environment of the command-line runs the tests start (one CPU device each).
SUBPROCESS_ENV = {"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin",
                  "JAX_DISABLE_MOST_OPTIMIZATIONS":
                      os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"],
                  "XLA_FLAGS": FAST_COMPILE_XLA_FLAGS}


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
