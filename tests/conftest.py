"""Shared test setup: fake CPU devices, paths to the golden fixtures in ../shared."""

import os

# Multi-device logic is tested on fake CPU devices; must be set before JAX starts.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
GOLDEN = SHARED / "golden"
MANIFESTS = SHARED / "manifests"


def require_shared() -> None:
  if not GOLDEN.is_dir():
    raise RuntimeError(
        f"golden fixtures not found at {GOLDEN}: clone the repo next to the project's "
        "shared/ folder (CI does).")


@pytest.fixture(scope="session")
def golden_dir() -> pathlib.Path:
  require_shared()
  return GOLDEN


def golden_state_dict(arch: str):
  """Upstream-keyed float32 weights of the golden model (numpy rule of weights.py)."""
  require_shared()
  sys.path.insert(0, str(GOLDEN))
  try:
    import weights  # noqa: PLC0415  (the fixture's own generator)
  finally:
    sys.path.remove(str(GOLDEN))
  manifest = {"tap": "tap_textvqa", "tap12": "tap12_textvqa"}[arch]
  seed = {"tap": 7, "tap12": 8}[arch]
  return weights.state_dict(str(MANIFESTS / f"{manifest}.json"), seed)
