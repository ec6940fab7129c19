r"""The scored decoding step t\* (docs/LFPR.md §2.3).

Greedy-decode the unpruned model (eval mode) over the sample set; for each sample take
the decoding step holding its largest score (first occurrence in (t, c) order;
`batch_search` reproduces upstream's search over the whole batch tensor); t\* is the
int of numpy's linear-interpolated median of these steps.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

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


def compute_tstar(model: TAP, params: PyTree, batches: Iterable[Mapping[str, Any]], *,
                  mesh: Optional[Mesh], bos_index: int, batch_search: bool = False
                  ) -> dict:
  r"""t\* of the unpruned model over global batches (docs/LFPR.md §2.3).

  Args:
    model, params: the unpruned model and its (replicated) parameters.
    batches: global batches of the model inputs plus `weight` `[B]` (0 on padding
      rows) and `question_id` `[B]`, e.g. from `training.parallel.global_batches`.
    mesh: the mesh the batches are sharded on (`data` axis); None: unsharded.
    bos_index: the decoder's BOS index.
    batch_search: upstream's whole-batch search of each sample's maximum.

  Returns:
    `{"t_star": int, "max_time_steps": [N] per-sample steps, "question_ids": [N],
    "histogram": [decode_steps] counts}` (JSON-able lists), real rows only.
  """
  def fn(params, batch):
    inputs = {k: v for k, v in batch.items() if k not in ("weight", "question_id")}
    scores, _ = greedy_decode(model, {"params": params}, inputs, bos_index=bos_index)
    return (first_max_steps(scores, batch_search=batch_search),
            batch["weight"], batch["question_id"])
  if mesh is None:
    step_fn = jax.jit(fn)
  else:
    step_fn = jax.jit(fn, in_shardings=(parallel.replicated(mesh),
                                        parallel.data_sharded(mesh)),
                      out_shardings=parallel.replicated(mesh))
  steps, qids = [], []
  for batch in batches:
    s, w, q = (np.asarray(x) for x in step_fn(params, dict(batch)))
    steps.extend(s[w > 0].tolist())
    qids.extend(q[w > 0].tolist())
  t_star = t_star_of(np.asarray(steps), model.config.decode_steps)
  return {"t_star": t_star, "max_time_steps": steps, "question_ids": qids,
          "histogram": np.bincount(steps, minlength=model.config.decode_steps).tolist()}
