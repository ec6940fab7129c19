"""Fixtures of the data tests."""

import pathlib

import pytest

from tests.data.upstream_layout import write_data_dir


@pytest.fixture
def data_dir(tmp_path) -> pathlib.Path:
  """A fresh copy of the tiny upstream-layout data directory (`write_data_dir`)."""
  return write_data_dir(tmp_path / "data")
