"""Data parallelism over a device mesh: batch on a `data` axis, parameters replicated.

`jax.jit` with explicit shardings over a one-axis `Mesh` (no `jax.pmap`): each step
sees the global batch as one array sharded along `data`; XLA inserts the gradient
all-reduce. On several hosts every process feeds its own shard of the batch
(`global_batch`), after `jax.distributed.initialize()` in `main.py`.
`global_batches` owns the padding and multi-host lockstep rule every data loop shares.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np
import tqdm
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


def num_global_batches(num_examples: int, local_batch: int) -> int:
  """Steps for every process to see its whole shard (the same on all processes).

  Args:
    num_examples: examples over all processes (each process reads about
      `num_examples / process_count` of them).
    local_batch: rows per process per step.
  """
  if local_batch < 1:
    raise ValueError(f"local_batch must be >= 1, got {local_batch}.")
  per_process = math.ceil(num_examples / jax.process_count())
  return math.ceil(per_process / local_batch)


def pad_batch(batch: Mapping[str, Any], size: int) -> dict[str, np.ndarray]:
  """Numeric fields padded to `size` rows (repeating the last row, loss mask 0).

  Args:
    batch: `[B, ...]` arrays (non-numeric fields are dropped), `B <= size`.
    size: rows after padding.
  """
  out = {}
  for k, v in batch.items():
    if isinstance(v, np.ndarray) and v.dtype.kind in "biuf":
      pad = size - len(v)
      if pad < 0:
        raise ValueError(f"batch of {len(v)} rows exceeds the padded size {size}.")
      if pad:
        fill = np.zeros_like(v[-1:]) if k == "train_loss_mask" else v[-1:]
        v = np.concatenate([v, np.repeat(fill, pad, 0)])
      out[k] = v
  return out


def global_batches(loader: Iterator[Mapping[str, Any]], *, local_batch: int,
                   num_batches: int, mesh: Mesh, fields: Sequence[str],
                   desc: str = "", progress: bool = True,
                   fill: Optional[Callable[[], Mapping[str, Any]]] = None
                   ) -> Iterator[dict[str, jax.Array]]:
  """Exactly `num_batches` global batches of `fields` plus `weight` and `question_id`.

  The padding and lockstep rule of every data-parallel loop: each local batch is
  padded to `local_batch` rows (one compiled shape); a process whose shard runs out
  early feeds all-padding batches, so every process makes the same `num_batches`
  collective calls (on several hosts a missing call would hang the others).

  Args:
    loader: this process's batches (dicts of `[b, ...]` numpy arrays, `b <= local_batch`,
      with `question_id` and every name in `fields`).
    local_batch: rows per process per step.
    num_batches: batches to yield, the same on every process (`num_global_batches`).
    mesh: the `data` mesh.
    fields: the numeric fields to keep.
    desc, progress: a progress bar on process 0 (total `num_batches`).
    fill: a batch to pad with when the loader is exhausted before giving any batch
      (e.g. a resumed run whose remaining steps hold no rows of this process).

  Yields:
    Dicts of global arrays `[local_batch * process_count, ...]` sharded on `data`:
    `fields`, `weight` `[B]` float32 (1 on real rows, 0 on padding), `question_id`
    `[B]` int32 (-1 on padding). On padding rows `train_loss_mask`, if present, is 0,
    so a training step ignores them.

  Raises:
    ValueError: the loader is empty and `fill` is None.
  """
  last = None
  bar = tqdm.tqdm(total=num_batches, desc=desc,
                  disable=not (progress and jax.process_index() == 0))
  try:
    for _ in range(num_batches):
      batch = next(loader, None)
      if batch is None:
        if last is None:
          if fill is None:
            raise ValueError("the loader gave no batch to pad with; pass `fill`.")
          last = fill()
        batch, rows = last, 0
      else:
        rows = len(batch["question_id"])
      last = batch
      local = pad_batch({k: batch[k] for k in fields}, local_batch)
      weight = np.zeros(local_batch, np.float32)
      weight[:rows] = 1.0
      qid = np.full(local_batch, -1, np.int32)
      qid[:rows] = np.asarray(batch["question_id"][:rows], np.int32)
      if "train_loss_mask" in local:
        mask = np.array(local["train_loss_mask"])
        mask[rows:] = 0
        local["train_loss_mask"] = mask
      local.update(weight=weight, question_id=qid)
      bar.update(1)
      yield global_batch(local, mesh)
  finally:
    bar.close()
