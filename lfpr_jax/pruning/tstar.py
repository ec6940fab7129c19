r"""The scored decoding step t\* (docs/LFPR.md §2.3).

Greedy-decode the unpruned model (eval mode) over the sample set; for each sample take
the decoding step holding its largest score (first occurrence in (t, c) order;
`batch_search` reproduces upstream's search over the whole batch tensor); t\* is the
int of numpy's linear-interpolated median of these steps.

`compute_tstar` also takes trimmed global batches (`parallel.trimmed_global_batches`:
exact in eval mode, one jitted program per trimmed shape, scores restored to the
padded layout before the search) and length-sorted ones (rows carrying
`parallel.POSITION` come back in the unsorted order). Sorting changes which samples
share a batch, so it is only for the per-sample search: upstream's whole-batch search
(`batch_search`) depends on the batch composition.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from lfpr_jax.models import trim as trimming
from lfpr_jax.models.config import TapConfig
from lfpr_jax.models.decoding import greedy_decode
from lfpr_jax.models.tap import TAP
from lfpr_jax.training import parallel

PyTree = Any
Array = jax.Array


def first_max_steps(scores: Array, *, batch_search: bool = False) -> Array:
  """Per sample, the decoding step of its largest score (docs/LFPR.md §2.3 steps 1-2).

  Args:
    scores: `[B, T, C]` final-pass greedy scores.
    batch_search: upstream's quirk: look the sample's maximum up in the whole batch
      tensor and take the step of the first hit in (b, t, c) order.

  Returns:
    `[B]` int32 step indices.
  """
  b, t, c = scores.shape
  flat = scores.reshape(b, t * c)
  if not batch_search:
    return (jnp.argmax(flat, axis=1) // c).astype(jnp.int32)  # argmax: first hit
  peak = jnp.max(flat, axis=1)
  hit = jnp.argmax(scores.reshape(1, -1) == peak[:, None], axis=1)
  return ((hit % (t * c)) // c).astype(jnp.int32)


def t_star_of(steps: np.ndarray, decode_steps: int) -> int:
  r"""t\* = int(numpy's linear-interpolated median of the per-sample steps `[N]`)."""
  steps = np.asarray(steps)
  if steps.size == 0:
    raise ValueError("t* needs at least one sample.")
  value = int(np.percentile(steps, 50))
  check_t_star(value, decode_steps)
  return value


def check_t_star(t_star: int, decode_steps: int) -> None:
  """Raises ValueError unless t\\* is a decoding step in [0, decode_steps)."""
  if not 0 <= int(t_star) < decode_steps:
    raise ValueError(f"t* must be a decoding step in [0, {decode_steps}), got {t_star}.")


def compute_tstar(model: TAP, params: PyTree, batches: Iterable[Any], *,
                  mesh: Optional[Mesh], bos_index: int, batch_search: bool = False,
                  trimmed: bool = False) -> dict:
  r"""t\* of the unpruned model over global batches (docs/LFPR.md §2.3).

  Args:
    model, params: the unpruned model and its (replicated) parameters.
    batches: global batches of the model inputs plus `weight` `[B]` (0 on padding
      rows) and `question_id` `[B]`, e.g. from `training.parallel.global_batches`;
      optionally `parallel.POSITION` `[B]` (length-sorted batches: the per-sample
      lists come back in the order of the positions). With `trimmed`:
      `(global batch, trimmed config, TrimInfo)` triples from
      `parallel.trimmed_global_batches`.
    mesh: the mesh the batches are sharded on (`data` axis); None: unsharded.
    bos_index: the decoder's BOS index.
    batch_search: upstream's whole-batch search of each sample's maximum (depends on
      which samples share a batch: do not sort such batches).
    trimmed: the batches are trimmed triples (see `batches`).

  Returns:
    `{"t_star": int, "max_time_steps": [N] per-sample steps, "question_ids": [N],
    "histogram": [decode_steps] counts}` (JSON-able lists), real rows only.
  """
  full = model.config
  extra = ("weight", "question_id", parallel.POSITION)

  def fn(config: TapConfig, batch, params):
    inputs = {k: v for k, v in batch.items() if k not in extra}
    scores, _ = greedy_decode(TAP(config), {"params": params}, inputs,
                              bos_index=bos_index)
    # The padded layout (extra OCR columns at MASK_VALUE): the search runs over the
    # same [T, C] grid as the padded model's.
    scores = trimming.restore_scores(scores, full, config)
    pos = batch.get(parallel.POSITION, batch["question_id"])
    return (first_max_steps(scores, batch_search=batch_search),
            batch["weight"], batch["question_id"], pos)
  shardings = {} if mesh is None else dict(
      in_shardings=(parallel.data_sharded(mesh), parallel.replicated(mesh)),
      out_shardings=parallel.replicated(mesh))
  # One jitted program per (trimmed) config; the padded batches use `full`.
  run = trimming.TrimmedFn(fn, full, **shardings)
  steps, qids, positions, sorted_rows = [], [], [], False
  for item in batches:
    batch, config = (item[0], item[1]) if trimmed else (item, full)
    sorted_rows = sorted_rows or parallel.POSITION in batch
    s, w, q, p = (np.asarray(x) for x in run.specialised(config)(dict(batch), params))
    steps.extend(s[w > 0].tolist())
    qids.extend(q[w > 0].tolist())
    positions.extend(p[w > 0].tolist())
  if sorted_rows:
    order = parallel.data_order(positions)
    steps, qids = [steps[i] for i in order], [qids[i] for i in order]
  t_star = t_star_of(np.asarray(steps), full.decode_steps)
  return {"t_star": t_star, "max_time_steps": steps, "question_ids": qids,
          "histogram": np.bincount(steps, minlength=full.decode_steps).tolist()}
