"""Grain input pipeline: batches of built TAP examples, seeded, sharded, checkpointable.

`make_loader` reads a split written by `tfds_builder.build_dataset` (through
`tfds.builder_from_directory(...).as_data_source`, no TensorFlow) - or any random-access
source of `SampleBuilder` examples, such as a list - and returns a Grain
`DatasetIterator` over batches:

* **Sharding.** The split is cut into `shard_count` contiguous, disjoint shards as
  `grain.sharding.ShardOptions` describes them (default: one per JAX process); with
  `drop_remainder` every shard gets the same number of records, otherwise the first
  `n % shard_count` shards get one more and the shards cover the split.
* **Shuffling.** A global shuffle of the shard, seeded by `seed`, different (and
  deterministic) in every epoch; the same seed gives the same order.
* **Batching.** dicts of numpy arrays, batch first, named as the model reads them
  (`lfpr_jax.models.batch.model_inputs(batch, config, with_targets=True)` accepts them), plus
  the metric fields (`question_id`, `image_id`, `context_tokens`, `answers`,
  `has_answers`, `image_width`, `image_height`); strings are object arrays of UTF-8
  `bytes`. `drop_remainder` drops the last partial batch (training).
* **Prefetch.** `read_threads` threads assemble the next `prefetch` batches in the
  background; `worker_count > 0` moves that work into processes instead (Grain's
  workers read absl flags, so the program must have parsed them, e.g. `absl.app.run`).
* **Checkpointing.** `it.get_state()` / `it.set_state(state)` save and restore the
  position exactly (the state is a small dict; `grain.checkpoint.CheckpointSave` /
  `CheckpointRestore` store it with Orbax).
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

from absl import flags
import grain
import jax
import numpy as np
import tensorflow_datasets as tfds

from lfpr_jax.data import samples, tfds_builder


def open_source(source: str | os.PathLike | Sequence[Mapping[str, Any]], split: str,
                *, dataset: str | None = None) -> Sequence[Mapping[str, Any]]:
  """A random-access source of examples.

  Args:
    source: a built dataset directory, a `build_dataset` out_dir, or a random-access
      source (anything with `__len__` and `__getitem__`, e.g. a list of examples).
    split: split name (used for directories).
    dataset: dataset name when an out_dir holds several datasets with `split`.

  Returns:
    The source.
  """
  if isinstance(source, (str, os.PathLike)):
    path = tfds_builder.find_split(source, split, dataset=dataset)
    return tfds.builder_from_directory(path).as_data_source(split)
  if not (hasattr(source, "__len__") and hasattr(source, "__getitem__")):
    raise TypeError(f"source must be a path or a random-access sequence, got "
                    f"{type(source).__name__}.")
  return source


def shard_bounds(num_records: int, options: grain.sharding.ShardOptions
                 ) -> tuple[int, int]:
  """[start, end) of a shard: contiguous, as Grain's even split makes them.

  With `drop_remainder` all shards have `num_records // shard_count` records; otherwise
  the first `num_records % shard_count` shards get one extra record.
  """
  k, i = options.shard_count, options.shard_index
  if options.drop_remainder:
    size = num_records // k
    return i * size, (i + 1) * size
  size, rest = divmod(num_records, k)
  start = i * size + min(i, rest)
  return start, start + size + (1 if i < rest else 0)


def global_batch_positions(num_records: int, global_batch_size: int, rows: slice, *,
                           seed: int = 0, shuffle: bool = True) -> np.ndarray:
  """The records one process reads so that all processes together see single-host batches.

  The `num_records` positions are shuffled once with `seed` (the permutation
  `make_loader(..., shuffle=True)` applies to an unsharded source) and cut into
  consecutive global batches of `global_batch_size`; the result lists, batch after
  batch, the positions at `rows` (this process's rows, `parallel.process_rows`) of
  each. Batching it by `rows.stop - rows.start` without shuffling gives this process's
  part of every global batch; the last global batch may leave it a shorter batch or
  none. The processes' parts are disjoint and cover all records, and the assembled
  global batches do not depend on the number of processes.
  """
  lo, hi, step = rows.indices(global_batch_size)
  if step != 1 or hi <= lo:
    raise ValueError(f"rows must be a non-empty contiguous slice of the global batch "
                     f"of {global_batch_size}, got {rows}.")
  if shuffle:
    ds = grain.MapDataset.range(num_records).shuffle(seed=seed)
    order = np.fromiter((ds[i] for i in range(num_records)), np.int64, num_records)
  else:
    order = np.arange(num_records, dtype=np.int64)
  num_batches = -(-num_records // global_batch_size)
  positions = (np.arange(num_batches)[:, None] * global_batch_size +
               np.arange(lo, hi)[None, :]).reshape(-1)
  return order[positions[positions < num_records]]


class Subset:
  """The records `indices` of a random-access source, as a random-access source."""

  def __init__(self, source: Sequence[Mapping[str, Any]], indices: Sequence[int]):
    self._source = source
    self._indices = np.asarray(indices, np.int64).reshape(-1)
    n = len(source)
    if self._indices.size and (self._indices.min() < 0 or self._indices.max() >= n):
      raise ValueError(f"subset indices must lie in [0, {n}), got "
                       f"[{self._indices.min()}, {self._indices.max()}].")

  def __len__(self) -> int:
    return int(self._indices.size)

  def __getitem__(self, i: int) -> Mapping[str, Any]:
    return self._source[int(self._indices[i])]


class PrepareExample(grain.transforms.Map):
  """Per-record cleanup: numpy leaves, strings as object arrays of UTF-8 `bytes`."""

  def map(self, element: Mapping[str, Any]) -> dict[str, np.ndarray]:
    out = {}
    for key, value in element.items():
      if key in samples.STRING_FIELDS:
        value = np.asarray(value, dtype=object)
        flat = np.empty(value.size, dtype=object)
        flat[:] = [v.encode("utf-8") if isinstance(v, str) else bytes(v)
                   for v in value.reshape(-1)]
        value = flat.reshape(value.shape)
      else:
        value = np.asarray(value)
      out[key] = value
    return out


def make_loader(source: str | os.PathLike | Sequence[Mapping[str, Any]], split: str,
                batch_size: int, *, seed: int = 0, shuffle: bool = True,
                num_epochs: int | None = 1, drop_remainder: bool = True,
                shard_index: int | None = None, shard_count: int | None = None,
                worker_count: int = 0, prefetch: int = 2, read_threads: int = 2,
                dataset: str | None = None, indices: Sequence[int] | None = None,
                transforms: Sequence[grain.transforms.Map] = ()
                ) -> grain.DatasetIterator:
  """An iterator of batches of one split, for this process's shard.

  Args:
    source: see `open_source`.
    split: split name.
    batch_size: examples per batch (per process).
    seed: shuffle seed (the same seed gives the same order).
    shuffle: shuffle globally within the shard, differently in each epoch.
    num_epochs: passes over the shard; None repeats forever. Batches are cut from the
      concatenated epochs (as `repeat` then `batch`), so with several epochs a batch
      can span an epoch boundary.
    drop_remainder: drop the last partial batch and give every shard the same size
      (training); pass False for evaluation so every example is seen once.
    shard_index, shard_count: this process's shard; default `jax.process_index()` /
      `jax.process_count()`.
    worker_count: worker processes (0: threads in this process).
    prefetch: batches prepared ahead of the consumer.
    read_threads: threads reading and batching in the background.
    dataset: see `open_source`.
    indices: read only these records of the split (in this order, before sharding
      and shuffling), e.g. a seeded subset of the training questions.
    transforms: per-example maps applied after `PrepareExample` (e.g. pseudo-label
      targets).

  Returns:
    A `grain.DatasetIterator` of dicts of numpy arrays with `get_state()` /
    `set_state(state)`.

  Raises:
    ValueError: bad sizes, or a shard too small for one batch.
    RuntimeError: `worker_count > 0` while absl flags are not parsed.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
  if prefetch < 0 or read_threads < 0 or worker_count < 0:
    raise ValueError("prefetch, read_threads and worker_count must be >= 0.")
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f"num_epochs must be >= 1 or None, got {num_epochs}.")
  shard_index = jax.process_index() if shard_index is None else shard_index
  shard_count = jax.process_count() if shard_count is None else shard_count
  options = grain.sharding.ShardOptions(shard_index=shard_index,
                                        shard_count=shard_count,
                                        drop_remainder=drop_remainder)
  data = open_source(source, split, dataset=dataset)
  if indices is not None:
    data = Subset(data, indices)
  start, end = shard_bounds(len(data), options)
  if end - start < (batch_size if drop_remainder else 1):
    raise ValueError(f"shard {shard_index}/{shard_count} of split {split!r} has "
                     f"{end - start} of {len(data)} examples, fewer than one batch of "
                     f"{batch_size}.")
  ds = grain.MapDataset.source(data)[start:end]
  if shuffle:
    ds = ds.shuffle(seed=seed)
  if num_epochs != 1:
    ds = ds.repeat(num_epochs)
  ds = ds.map(PrepareExample())
  for transform in transforms:
    ds = ds.map(transform)
  ds = ds.batch(batch_size, drop_remainder=drop_remainder)
  iter_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                                 prefetch_buffer_size=prefetch))
  if worker_count > 0:
    if not flags.FLAGS.is_parsed():
      raise RuntimeError(
          "worker_count > 0 starts Grain worker processes, which read absl flags: run "
          "under absl.app.run (as lfpr_jax.main does) or call "
          "absl.flags.FLAGS.mark_as_parsed() first; worker_count=0 uses threads only.")
    iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=worker_count, per_worker_buffer_size=max(prefetch, 1)))
  return iter(iter_ds)


def decode_strings(array: np.ndarray) -> list:
  """Nested lists of `str` from an object array of UTF-8 `bytes` (`context_tokens`)."""
  array = np.asarray(array, dtype=object)
  if array.ndim == 0:
    value = array.item()
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
  return [decode_strings(a) for a in array]
