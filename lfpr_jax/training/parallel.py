"""Data parallelism over a device mesh: batch on a `data` axis, parameters replicated.

`jax.jit` with explicit shardings over a one-axis `Mesh` (no `jax.pmap`): each step
sees the global batch as one array sharded along `data`; XLA inserts the gradient
all-reduce. On several hosts every process feeds its own shard of the batch
(`global_batch`), after `jax.distributed.initialize()` in `main.py`.
`global_batches` owns the padding and multi-host lockstep rule every data loop shares;
`trimmed_global_batches` adds exact variable-length execution (`lfpr_jax.models.trim`)
on the host arrays before they are sharded, and `length_order` / `with_positions` /
`data_order` let order-free stages read examples sorted by length and still return
their results in the order of the unsorted run.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Any, Mapping, Optional, Sequence

import grain
import jax
import numpy as np
import tqdm
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lfpr_jax.data import pipeline
from lfpr_jax.models import trim as trimming
from lfpr_jax.models.config import TapConfig

PyTree = Any
DATA_AXIS = "data"
# Per-row field added by `with_positions`: the row's index in the unsorted run's
# stream of global batches (see `length_order`).
POSITION = "stream_position"


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
  for local in _local_batches(loader, local_batch=local_batch, num_batches=num_batches,
                              fields=fields, desc=desc, progress=progress, fill=fill):
    yield global_batch(local, mesh)


def _local_batches(loader: Iterator[Mapping[str, Any]], *, local_batch: int,
                   num_batches: int, fields: Sequence[str], desc: str, progress: bool,
                   fill: Optional[Callable[[], Mapping[str, Any]]]
                   ) -> Iterator[dict[str, np.ndarray]]:
  """`global_batches`' host side: the padded local numpy batches, before sharding."""
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
      yield local
  finally:
    bar.close()


@dataclasses.dataclass(frozen=True)
class Trim:
  """How `trimmed_global_batches` cuts padding (`lfpr_jax.models.trim`).

  Attributes:
    config: the full-size model config the batches are built for.
    buckets: allowed segment sizes below the full ones (`trim.bucket_size`).
    global_lengths: maps this process's per-segment maxima `[5]` to the maxima over
      all processes (default `trim.default_global_lengths`: an all-gather on several
      processes, so every process trims to the same shapes).
    pack: packed execution (`trim.trim_batch(pack=True)`: the row-wise work runs on
      the non-padding rows only). Only where one device runs the whole batch (one
      process, a mesh of one device): the packed rows of a sharded batch would be
      gathered across devices. None (default): on there, off elsewhere; True
      elsewhere raises a ValueError. Each packed row count (at most 8 per trimmed
      shape, `trim.pack_bucket`) is one more program to compile.
  """
  config: TapConfig
  buckets: tuple[int, ...] = trimming.DEFAULT_BUCKETS
  global_lengths: Optional[Callable[[np.ndarray], np.ndarray]] = None
  pack: Optional[bool] = None


def trimmed_global_batches(loader: Iterator[Mapping[str, Any]], *, trim: Trim,
                           local_batch: int, num_batches: int, mesh: Mesh,
                           fields: Sequence[str], desc: str = "", progress: bool = True,
                           fill: Optional[Callable[[], Mapping[str, Any]]] = None
                           ) -> Iterator[tuple[dict[str, jax.Array], TapConfig,
                                               trimming.TrimInfo]]:
  """`global_batches`, each cut to bucketed lengths on the host before sharding.

  Same padding and lockstep rule, same `fields` / `weight` / `question_id` (padding
  rows repeat the last row, so they never lengthen a segment). Every process trims
  its padded local batch with the global per-segment maxima (`trim.global_lengths`,
  one small all-gather per batch on several processes), so all processes assemble
  global arrays of one shape. `text_position_ids` (`[n]` in `trim.trim_batch`'s
  output) is broadcast to `[local_batch, n]` so that it is sharded on `data` like
  every other field (TAP accepts both forms).

  Yields:
    `(global batch, trimmed config, TrimInfo)`: run the batch with
    `TAP(trimmed config)` and the unchanged params; `trim.restore_scores(scores,
    trim.config, info)` gives the padded score layout back.
  """
  one_device = jax.process_count() == 1 and mesh.size == 1
  if trim.pack and not one_device:
    raise ValueError(f"Trim(pack=True) needs one process and a mesh of one device, "
                     f"got {jax.process_count()} processes and {mesh.size} devices.")
  pack = one_device if trim.pack is None else trim.pack
  for local in _local_batches(loader, local_batch=local_batch, num_batches=num_batches,
                              fields=fields, desc=desc, progress=progress, fill=fill):
    cut, tc, info = trimming.trim_batch(local, trim.config, buckets=trim.buckets,
                                        global_lengths=trim.global_lengths,
                                        pack=pack)
    cut["text_position_ids"] = np.broadcast_to(
        cut["text_position_ids"][None], (local_batch, len(info.text_columns))).copy()
    yield global_batch(cut, mesh), tc, info


def input_batches(loader: Iterator[Mapping[str, Any]], *,
                  trim_config: Optional[TapConfig] = None, **kwargs: Any
                  ) -> Iterator[Any]:
  """`global_batches(loader, **kwargs)`, or with `trim_config` (the full-size model
  config) `trimmed_global_batches` and its `(batch, trimmed config, TrimInfo)` triples
  (`trim_config=None`: padded)."""
  if trim_config is None:
    return global_batches(loader, **kwargs)
  return trimmed_global_batches(loader, trim=Trim(trim_config), **kwargs)


def shard_lengths(source: Any, split: str, config: TapConfig, *,
                  indices: Optional[Sequence[int]] = None, batch_size: int = 256
                  ) -> np.ndarray:
  """Valid segment lengths `[n_local, 5]` (`trim.example_lengths`) of this process's
  shard of a split (or of `indices`), in the order `make_loader(shuffle=False,
  drop_remainder=False)` reads it.

  One pass over the shard through the ordinary loader (it reads every field of a
  record; the model pass that follows reads them again and costs far more).
  """
  loader = pipeline.make_loader(source, split, batch_size, shuffle=False,
                                drop_remainder=False, indices=indices)
  parts = [trimming.example_lengths(b, config) for b in loader]
  return (np.concatenate(parts) if parts
          else np.zeros((0, len(trimming.SEGMENTS)), np.int64))


@dataclasses.dataclass(frozen=True)
class LengthOrder:
  """This process's examples sorted by length (`length_order`).

  Attributes:
    indices: `[N]` record indices for `make_loader(indices=...)`: the unsorted
      indices with this process's shard sorted by length (other processes' shards are
      theirs to sort; sharding only reads this process's part).
    positions: `[n_local]` int32: for the k-th example this process reads, its index
      in the unsorted run's stream of global batches (batch after batch, the rows of
      `local_batch * process_count`, `process_rows` giving each process's block).
      Sorting any per-example results by it restores the unsorted run's order.
  """
  indices: np.ndarray
  positions: np.ndarray


def length_order(lengths: np.ndarray, config: TapConfig, *, num_records: int,
                 local_batch: int, mesh: Mesh, indices: Optional[Sequence[int]] = None,
                 buckets: Sequence[int] = trimming.DEFAULT_BUCKETS) -> LengthOrder:
  """Sorts this process's shard so that batches hold examples of similar length.

  For stages whose per-example results do not depend on which examples share a
  batch (greedy evaluation, pseudo-labels, t* without upstream's whole-batch search).
  The sort key is each example's bucketed segment sizes, OCR slots first, then OCR
  words, objects, object names and question (`trim.sort_by_length`, stable): examples
  of one trimmed shape become neighbours, the costliest segments most of all.
  Sorting stays inside each process's shard (`pipeline.shard_bounds`), so every
  process reads the same examples as unsorted.

  Args:
    lengths: `[n_local, 5]` this process's `shard_lengths`, in unsorted order.
    config: the full-size model config.
    num_records: N, the records the loader shards (the split, or `len(indices)`).
    local_batch: rows per process per step.
    mesh: the `data` mesh.
    indices: the unsorted record indices (default `arange(num_records)`).
    buckets: as in `trim.trim_batch`.

  Raises:
    ValueError: `lengths` does not cover this process's shard.
  """
  base = (np.arange(num_records, dtype=np.int64) if indices is None
          else np.asarray(indices, np.int64).reshape(-1))
  if len(base) != num_records:
    raise ValueError(f"{len(base)} indices for num_records={num_records}.")
  start, end = pipeline.shard_bounds(num_records, grain.sharding.ShardOptions(
      shard_index=jax.process_index(), shard_count=jax.process_count(),
      drop_remainder=False))
  lengths = np.asarray(lengths)
  if lengths.shape != (end - start, len(trimming.SEGMENTS)):
    raise ValueError(f"lengths must be [{end - start}, {len(trimming.SEGMENTS)}] (this "
                     f"process's shard [{start}, {end}) of {num_records}), got "
                     f"{lengths.shape}.")
  full = trimming.segment_sizes(config)
  sizes = np.array([[trimming.bucket_size(int(n), f, buckets) for n, f in zip(row, full)]
                    for row in lengths], np.int64).reshape(-1, len(full))
  order, _ = trimming.sort_by_length(np.arange(end - start), sizes[:, [4, 1, 3, 2, 0]])
  out = base.copy()
  out[start:end] = base[start:end][order]
  rows = process_rows(local_batch * jax.process_count(), mesh)
  global_rows = local_batch * jax.process_count()
  stream = (order // local_batch) * global_rows + rows.start + order % local_batch
  return LengthOrder(indices=out, positions=stream.astype(np.int32))


def with_positions(loader: Iterator[Mapping[str, Any]], positions: np.ndarray
                   ) -> Iterator[dict[str, Any]]:
  """The loader's batches with `POSITION` `[b]` (consecutive slices of `positions`);
  add `POSITION` to `fields` so that it travels with the global batch."""
  k = 0
  for batch in loader:
    n = len(batch["question_id"])
    if k + n > len(positions):
      raise ValueError(f"the loader gave more than the {len(positions)} examples of "
                       "its positions.")
    yield dict(batch, **{POSITION: np.asarray(positions[k:k + n], np.int32)})
    k += n


def data_order(positions: Sequence[int]) -> np.ndarray:
  """The permutation putting results gathered in sorted order back in the unsorted
  run's order: `results[data_order(positions)]`."""
  return np.argsort(np.asarray(positions), kind="stable")
