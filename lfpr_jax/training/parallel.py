"""Data parallelism over a device mesh: batch on a `data` axis, parameters replicated.

`jax.jit` with explicit shardings over a one-axis `Mesh` (no `jax.pmap`): each step
sees the global batch as one array sharded along `data`; XLA inserts the gradient
all-reduce. On several hosts every process feeds its own shard of the batch
(`global_batch`), after `jax.distributed.initialize()` in `main.py`.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

PyTree = Any
DATA_AXIS = "data"


def make_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A 1-D mesh over all (global) devices, axis name `data`."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(global_batch_size: int, mesh: Mesh) -> None:
  n = mesh.devices.size
  if global_batch_size % n:
    raise ValueError(f"global batch size {global_batch_size} is not divisible by the "
                     f"{n} devices of the mesh.")


def process_rows(global_batch_size: int, mesh: Mesh) -> slice:
  """The rows of a `data`-sharded global batch that this process's devices hold.

  `global_batch` places a process's local batch on exactly these rows, so a loader
  that gives each process these rows of every global batch reproduces the global
  batches of a single-process run (`pipeline.global_batch_positions`).

  Raises:
    ValueError: the process's rows are not one contiguous block (a mesh whose
      devices interleave processes along `data`).
  """
  check_batch_size(global_batch_size, mesh)
  rows = set()
  for index in data_sharded(mesh).addressable_devices_indices_map(
      (global_batch_size,)).values():
    rows.update(range(*index[0].indices(global_batch_size)))
  lo, hi = min(rows), max(rows) + 1
  if len(rows) != hi - lo:
    raise ValueError(f"process {jax.process_index()} holds rows {sorted(rows)} of the "
                     "global batch, not one contiguous block: order the mesh devices "
                     "by process.")
  return slice(lo, hi)


def global_batch(local: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles per-process numpy batches into global arrays sharded on `data`.

  Every process passes its own `[B_local, ...]` arrays; the result has the global
  batch `B_local * process_count` along axis 0. Non-array fields are dropped.
  """
  sharding = data_sharded(mesh)
  out = {}
  for k, v in local.items():
    if isinstance(v, (np.ndarray, jax.Array)) and np.asarray(v).dtype.kind in "biuf":
      out[k] = jax.make_array_from_process_local_data(sharding, np.asarray(v))
  return out


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
  """Places a host pytree on every device of the mesh."""
  return jax.device_put(tree, replicated(mesh))
