r"""Kwon et al.'s retraining-free pruning on TAP's MMT (NeurIPS 2022; docs/LFPR.md §9).

Three stages on top of any gradient criterion (`lfpr_jax.pruning.criteria`):

1. **Mask search with a FLOPs constraint** (§9.2): the "sum" search of
   `selection.select_sum` with `costs=selection.flops_costs(config)`: Kwon's MACs per
   head 4·s·d·dh + 2·s²·dh and per neuron 2·s·d (TAP: s = 382 → 93,782,528 and
   586,752), search constant 0, budget c · full MACs. `search_masks` also searches the
   less aggressive teacher mask at √c (Kwon's two-step schedule).
2. **Mask rearrangement** (§9.3, Kwon: prune/rearrange.py): per layer, heads and
   neurons separately, with the block-diagonal empirical Fisher of the per-batch mask
   gradients G_b: the pruned set S starts as the P units of smallest Σ_b G_b² and each
   remaining unit u (ascending) is swapped in, then the unit r minimising
   ‖Σ_{j∈S∖{r}} g_j‖² is dropped (g_j ∈ R^{#batches}). Per-layer counts, hence the
   budget, are unchanged; the objective ‖Σ_{j∈S} g_j‖² never increases.
3. **Layer-wise mask tuning** (§9.4, Kwon: prune/rescale.py): for l = 0 … L−1 the kept
   mask entries of layer l are rescaled by the least-squares fit of the student's
   pre-LayerNorm block outputs to the teacher's (attention: per-head outputs plus a free
   offset column, skipped at layer 0; FFN: Gram (W2W2ᵀ) ∘ (aaᵀ)), solved by LSMR on
   (Q, r − Q·1) with damping 1 (a ridge pull toward scale 1). A solve is accepted only if
   LSMR reports convergence (istop < 3) and every scale lies in [−10, 10]; otherwise
   tuning stops for this and all later layers, as in Kwon's code, and the report says
   where. A single unknown is solved directly (Kwon's code then crashes on the solver
   status; guarded here). The tuned real-valued masks are folded into the output
   kernels by `fold_masks` (surgery with `learnable_masks=False`) or kept as the
   initial learnable masks.

TAP specifics of the tuning: the layer inputs are the teacher-forced MMT sequence
(text, objects, OCR, decoder rows fed with `train_prev_inds`). Valid rows are the
non-padded text, object and OCR rows and the first `decoder_steps` decoder rows of
real (weight > 0) samples; in the last layer only the rows read downstream (OCR and
decoder rows) count, the analogue of Kwon's CLS-only last layer.

**Label-free variant** (`retraining_free_label_free`, the sweep's `kwon_lf`): Kwon's
pipeline reads answers twice, through the labelled Fisher (search and rearrangement)
and through the ground-truth decoder inputs of the tuning batches. Here the units are
ranked by a label-free criterion (`lfpr`, or `l1`), the rearrangement uses LFPR's
per-batch gradients G_b of the max logit at t* (docs/LFPR.md §3.2) in place of the
Fisher's, and the tuning batches are stripped of every answer field (`ANSWER_FIELDS`)
and fed the unpruned model's own greedy decoder inputs (BOS, then its argmaxes;
`label_free_batches`). Labelled scores are refused, so nothing upstream of the pruned
model has seen an answer.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np

from lfpr_jax.models.batch import DECODER_INPUTS, LOSS_FIELDS, MODEL_INPUTS
from lfpr_jax.models.config import TapConfig
from lfpr_jax.models.decoding import greedy_decode
from lfpr_jax.models.tap import TAP, BertLayer
from lfpr_jax.pruning import criteria, selection, surgery

PyTree = Any
Array = jax.Array


# ----------------------------------------------------------------------- search


def teacher_constraint(constraint: float) -> float:
  """Kwon's two-step schedule [√c, c]: the teacher mask is searched at √c."""
  return math.sqrt(float(constraint))


# (head scores, FFN scores, kept fraction) -> the selection meeting that budget.
SelectFn = Callable[[np.ndarray, np.ndarray, float], selection.Selection]


@dataclasses.dataclass(frozen=True, eq=False)
class SearchResult:
  """Teacher (at √c) and student (at c) selections of one constraint."""
  teacher: selection.Selection
  student: selection.Selection


def search_masks(head_scores: Any, ffn_scores: Any, constraint: float, *,
                 config: TapConfig, kind: str = "flops", strict_budget: bool = False,
                 select: Optional[SelectFn] = None) -> SearchResult:
  """The "sum" search at c (student) and √c (teacher) under a FLOPs or params budget,
  or with `select(head_scores, ffn_scores, constraint)` (e.g. a measured latency
  table's search, `pruning.latency.select_latency`) in place of the `kind` search."""
  if select is None:
    kw = dict(costs=selection.constraint_costs(config, kind),
              strict_budget=strict_budget)
    select = lambda h, f, c: selection.select_sum(h, f, c, **kw)  # noqa: E731
  return SearchResult(
      teacher=select(head_scores, ffn_scores, teacher_constraint(constraint)),
      student=select(head_scores, ffn_scores, constraint))


# ---------------------------------------------------------------- rearrangement


def rearrange_objective(pruned: Sequence[int], grads: Any) -> float:
  """‖Σ_{j∈S} g_j‖² of the pruned units S; grads `[num_batches, n]` (float64)."""
  g = np.asarray(grads, np.float64)
  return float(np.sum(g[:, list(pruned)].sum(axis=1) ** 2))


def greedy_rearrange(mask: Any, grads: Any, *, from_mask: bool = False) -> np.ndarray:
  """Kwon's greedy rearrangement of one layer's mask (`greedy_rearrange`, §9.3).

  Args:
    mask: `[n]`, 0 = pruned (the number of pruned units P is kept).
    grads: `[num_batches, n]` per-batch mask gradients of the layer's units.
    from_mask: start from the mask's own pruned set (then visit its kept units in
      ascending Σ_b g² order) instead of Kwon's start, the P units of smallest
      Σ_b g². Either way the objective never exceeds the starting set's.

  Returns:
    The new binary mask `[n]` (float32). Unchanged (copied) when P = 0 or every unit
    is pruned. Ties: stable ascending sort, and the first minimiser in Kwon's list
    order (initial set in ascending order, then insertion order).
  """
  mask = np.asarray(mask)
  g = np.asarray(grads, np.float64)
  if mask.ndim != 1 or g.ndim != 2 or g.shape[1] != mask.shape[0]:
    raise ValueError(f"need a mask [n] and grads [num_batches, n]; got {mask.shape} "
                     f"and {g.shape}.")
  kept = mask != 0
  n_pruned = int(np.sum(~kept))
  if n_pruned == 0 or n_pruned == mask.size:
    return mask.astype(np.float32)
  gt = g.T                                 # [n, B]
  sq = np.einsum("nb,nb->n", gt, gt)       # Σ_b g²
  order = np.argsort(sq, kind="stable")
  if from_mask:
    members = [int(i) for i in order if not kept[i]]
    rest = [int(i) for i in order if kept[i]]
  else:
    members = [int(i) for i in order[:n_pruned]]
    rest = [int(i) for i in order[n_pruned:]]
  total = gt[members].sum(axis=0)
  for u in rest:
    members.append(u)
    total = total + gt[u]
    # ‖total − g_r‖² = ‖total‖² − 2 total·g_r + ‖g_r‖²: minimise the last two terms.
    cand = (sq - 2.0 * (gt @ total))[members]
    r = int(np.argmin(cand))
    total = total - gt[members[r]]
    del members[r]
  out = np.ones(mask.shape, np.float32)
  out[members] = 0.0
  return out


def rearrange_masks(mask: Any, grads: Any, *, from_mask: bool = False) -> np.ndarray:
  """`greedy_rearrange` of every layer: mask `[L, n]`, grads `[num_batches, L, n]`."""
  mask = np.asarray(mask)
  g = np.asarray(grads)
  if mask.ndim != 2 or g.ndim != 3 or g.shape[1:] != mask.shape:
    raise ValueError(f"need masks [L, n] and per-batch grads [num_batches, L, n]; got "
                     f"{mask.shape} and {g.shape}.")
  if g.shape[0] == 0:
    raise ValueError("rearrangement needs per-batch gradients (got 0 batches).")
  return np.stack([greedy_rearrange(mask[i], g[:, i], from_mask=from_mask)
                   for i in range(mask.shape[0])])


# ------------------------------------------------------------------ mask tuning


LSMR_MAXITER = 100_000  # Kwon's scipy variant; scipy's default min(m, n) stops early


def lsmr_solve(gram: Any, rhs: Any, *, damp: float = 1.0,
               maxiter: Optional[int] = LSMR_MAXITER) -> tuple[np.ndarray, int]:
  """Kwon's `lsmr_cupy_solver`: scale = 1 + δ, δ from LSMR on (Q, r − Q·1).

  Damping pulls δ toward 0, i.e. the scales toward 1. A single unknown is solved
  directly, δ = (r − Q)/Q, without damping (as upstream), reported with status 0, or
  status 3 (not acceptable) when Q = 0.

  Returns:
    (scales `[n]` float64, LSMR's istop: < 3 means converged).
  """
  from scipy.sparse.linalg import lsmr  # noqa: PLC0415 (host-only dependency)
  q = np.asarray(gram, np.float64)
  r = np.asarray(rhs, np.float64)
  b = r - q.sum(axis=1)
  if b.shape[0] == 1:
    if q[0, 0] == 0 or not np.isfinite(q[0, 0]):
      return np.full(1, np.nan), 3
    return 1.0 + b / q[0, 0], 0
  sol = lsmr(q, b, damp=damp, maxiter=maxiter)
  return 1.0 + sol[0], int(sol[1])


def layer_parts(model: TAP, p: Mapping[str, Any], x: Array, mask: Array,
                head_mask: Array, ffn_mask: Array) -> dict[str, Array]:
  """One unpruned MMT layer in eval mode (the model's `BertLayer.parts`) with its parts.

  Args:
    model: the unpruned TAP (every MMT layer has the same widths).
    p: the layer's params (`mmt_layer_i`, or a traced stack entry of them).
    x: inputs `[B, S, d]`; mask: additive `[B, 1, S, S]`.
    head_mask `[H]`, ffn_mask `[F]`: real-valued masks.

  Returns:
    `BertLayer.parts` (`context`, `attn_sum`, `y`, `act`, `ffn_sum`, `out`) plus
    `per_head` `[B, H, S, d]`: each head's masked context times its W_O rows (no bias;
    summed over heads and with b_O + x added it is `attn_sum`).
  """
  c = model.config
  layer = BertLayer(c.mmt_heads[0], c.mmt_ffn[0], c, c.learnable_masks)
  out = layer.apply({"params": p}, x, mask, head_mask=head_mask, ffn_mask=ffn_mask,
                    method=BertLayer.parts)
  out["per_head"] = jnp.einsum("bhqk,hkd->bhqd", out["context"],
                               p["attention"]["out"]["kernel"])
  return out


def valid_rows(config: TapConfig, enc_valid: Array, weight: Array, *,
               decoder_steps: Optional[int], read_rows_only: bool) -> Array:
  """`[B, S]` 0/1 rows that count in the least squares (see the module docstring)."""
  b = enc_valid.shape[0]
  steps = config.decode_steps if decoder_steps is None else decoder_steps
  dec = jnp.broadcast_to(jnp.arange(config.decode_steps)[None] < steps,
                         (b, config.decode_steps))
  rows = jnp.concatenate([enc_valid, dec], axis=1).astype(jnp.float32)
  if read_rows_only:
    start = config.encoder_len - config.ocr_max
    rows = rows * (jnp.arange(rows.shape[1]) >= start)[None]
  return rows * (weight[:, None] > 0)


def tuning_stats(model: TAP, params: PyTree, batch: Mapping[str, Array],
                 teacher_head: Array, teacher_ffn: Array, student_head: Array,
                 student_ffn: Array, layer: Array, *, decoder_steps: Optional[int] = None,
                 last_layer_read_rows: bool = True) -> dict[str, Array]:
  """Least-squares statistics of one layer for one batch (pure; `layer` may be traced).

  Runs the teacher and the student (real-valued masks `[L, H]`, `[L, F]`) through the
  MMT and returns for layer `layer`:
    `att_gram` `[H+1, H+1]`, `att_rhs` `[H+1]`, `att_bb`: AᵀA, AᵀB, BᵀB of the
      attention fit (columns: per-head outputs of the student's masked heads and a
      ones column; B = teacher attention sum − b_O − student input);
    `ffn_gram` `[F, F]` = (W2W2ᵀ) ∘ Σ_tokens a aᵀ, `ffn_rhs` `[F]`, `ffn_bb`: the FFN
      fit (B = teacher FFN sum − b2 − student attention output after LayerNorm);
    `rows`: the number of valid rows.
  Sums run over valid rows (and d), in float32 on device.
  """
  c = model.config
  num_layers = c.mmt_layers
  x0, mask, enc = model.apply({"params": params}, dict(batch), method=TAP.mmt_inputs)
  enc_valid = enc["enc_valid"]
  weight = batch.get("weight", jnp.ones(x0.shape[0], jnp.float32))
  v_all = valid_rows(c, enc_valid, weight, decoder_steps=decoder_steps,
                     read_rows_only=False)
  v_last = valid_rows(c, enc_valid, weight, decoder_steps=decoder_steps,
                      read_rows_only=last_layer_read_rows)

  layers = [params[f"mmt_layer_{i}"] for i in range(num_layers)]

  def layer_input(head, ffn):
    """The input of layer `layer` under the given masks."""
    xs = [x0]
    for i in range(num_layers - 1):
      xs.append(layer_parts(model, layers[i], xs[-1], mask, head[i], ffn[i])["out"])
    return jnp.stack(xs)[layer]

  p = jax.tree.map(lambda *leaves: jnp.stack(leaves)[layer], *layers)
  x_t = layer_input(teacher_head, teacher_ffn)
  x_s = layer_input(student_head, student_ffn)
  t = layer_parts(model, p, x_t, mask, teacher_head[layer], teacher_ffn[layer])
  s = layer_parts(model, p, x_s, mask, student_head[layer], student_ffn[layer])
  v = jnp.where(layer == num_layers - 1, v_last, v_all)        # [B, S]
  # Attention block.
  per_head = s["per_head"] * v[:, None, :, None]               # [B, H, S, d]
  target = (t["attn_sum"] - p["attention"]["out"]["bias"] - x_s) * v[..., None]
  cols = jnp.concatenate([per_head, jnp.broadcast_to(v[:, None, :, None],
                                                     per_head[:, :1].shape)], axis=1)
  hi = jax.lax.Precision.HIGHEST   # full float32 Gram sums (no TF32 on GPUs)
  att_gram = jnp.einsum("bhsd,bgsd->hg", cols, cols, precision=hi)
  att_rhs = jnp.einsum("bhsd,bsd->h", cols, target, precision=hi)
  # FFN block.
  w2 = p["ffn"]["wo"]["kernel"]                                 # [F, d]
  act = s["act"] * v[..., None]                                 # [B, S, F]
  ffn_target = (t["ffn_sum"] - p["ffn"]["wo"]["bias"] - s["y"]) * v[..., None]
  ffn_gram = (jnp.matmul(w2, w2.T, precision=hi)
              * jnp.einsum("bsn,bsm->nm", act, act, precision=hi))
  ffn_rhs = jnp.einsum("bsn,bsn->n", act,
                       jnp.matmul(ffn_target, w2.T, precision=hi))
  return dict(att_gram=att_gram, att_rhs=att_rhs, att_bb=jnp.sum(target ** 2),
              ffn_gram=ffn_gram, ffn_rhs=ffn_rhs, ffn_bb=jnp.sum(ffn_target ** 2),
              rows=jnp.sum(v))


def make_stats_fn(model: TAP, *, decoder_steps: Optional[int] = None,
                  last_layer_read_rows: bool = True):
  """`tuning_stats` of `model`, jitted: `(params, batch, th, tf, sh, sf, layer)`."""
  return jax.jit(functools.partial(tuning_stats, model, decoder_steps=decoder_steps,
                                   last_layer_read_rows=last_layer_read_rows))


@dataclasses.dataclass
class TuningResult:
  """Real-valued masks from `tune_masks` and what happened per block.

  Attributes:
    head_mask, ffn_mask: `[L, H]`, `[L, F]` float32; 0 = pruned, else the scale.
    log: one entry per attempted solve: layer, block ("attention"/"ffn"), unknowns,
      status (LSMR istop; 0 for a direct single-unknown solve), accepted, reason
      (why it was refused), scale range, error_before / error_after (the
      least-squares residual ‖A·s − B‖² at scales 1 without offset and at the
      solution), rows.
    stopped: None, or {"layer", "block", "reason"} of the solve that stopped tuning
      (that block and every later layer keep their incoming masks).
  """
  head_mask: np.ndarray
  ffn_mask: np.ndarray
  log: list
  stopped: Optional[dict]


def _residual(q: np.ndarray, r: np.ndarray, bb: float, s: np.ndarray) -> float:
  return float(s @ q @ s - 2 * s @ r + bb)


def tune_masks(model: TAP, params: PyTree, batches: Sequence[Mapping[str, Any]], *,
               teacher_head_mask: Any, teacher_ffn_mask: Any, head_mask: Any,
               ffn_mask: Any, damp: float = 1.0, scale_bound: float = 10.0,
               maxiter: Optional[int] = LSMR_MAXITER,
               decoder_steps: Optional[int] = None,
               last_layer_read_rows: bool = True) -> TuningResult:
  """Kwon's layer-wise least-squares mask tuning on TAP (docs/LFPR.md §9.4).

  Args:
    model, params: the unpruned model.
    batches: a re-iterable sequence of batches (model inputs with the decoder inputs
      `train_prev_inds`, optional `weight`); every layer passes over all of them twice.
    teacher_head_mask, teacher_ffn_mask: the reconstruction target's masks (Kwon: the
      search at √c), `[L, H]`, `[L, F]`.
    head_mask, ffn_mask: the student's masks (after rearrangement); kept entries are
      rescaled, pruned entries stay 0.
    damp: LSMR damping (Kwon: 1).
    scale_bound: accept only scales in [−bound, bound] (Kwon: 10).
    maxiter: LSMR iteration limit (Kwon: 100,000; None: scipy's min(m, n), which
      stops ill-conditioned FFN systems early with istop 7).
    decoder_steps: decoder rows that count (None: all `decode_steps`).
    last_layer_read_rows: in the last layer count only OCR and decoder rows.

  Returns:
    The TuningResult (masks, per-block log, where tuning stopped).
  """
  c = model.config
  num_layers = c.mmt_layers
  t_head = jnp.asarray(teacher_head_mask, jnp.float32)
  t_ffn = jnp.asarray(teacher_ffn_mask, jnp.float32)
  s_head = np.array(head_mask, np.float32)
  s_ffn = np.array(ffn_mask, np.float32)
  for name, a, want in (("teacher_head_mask", t_head, s_head.shape),
                        ("teacher_ffn_mask", t_ffn, s_ffn.shape)):
    if a.shape != want:
      raise ValueError(f"{name} has shape {a.shape}, the student's is {want}.")
  if s_head.shape != (num_layers, c.mmt_heads[0]) or s_ffn.shape != (num_layers,
                                                                     c.mmt_ffn[0]):
    raise ValueError(f"masks of shapes {s_head.shape}, {s_ffn.shape} do not fit the "
                     f"{c.arch} model ({num_layers} layers, {c.mmt_heads[0]} heads, "
                     f"{c.mmt_ffn[0]} neurons).")
  if not batches:
    raise ValueError("mask tuning needs at least one batch.")
  # Built per call (one compilation serves every layer: `layer` is traced).
  stats_fn = make_stats_fn(model, decoder_steps=decoder_steps,
                           last_layer_read_rows=last_layer_read_rows)
  log: list = []

  def gather(layer: int, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    total: dict[str, np.ndarray] = {}
    for batch in batches:
      out = stats_fn(params, dict(batch), t_head, t_ffn, jnp.asarray(s_head),
                     jnp.asarray(s_ffn), jnp.asarray(layer, jnp.int32))
      for k in keys + ("rows",):
        total[k] = total.get(k, 0) + np.asarray(out[k], np.float64)
    return total

  def solve(layer: int, block: str, q: np.ndarray, r: np.ndarray, bb: float,
            rows: float, offset: bool) -> Optional[np.ndarray]:
    scales, status = lsmr_solve(q, r, damp=damp, maxiter=maxiter)
    unit_scales = scales[:-1] if offset else scales
    ones = np.ones_like(scales)
    if offset:
      ones[-1] = 0.0
    entry = dict(layer=layer, block=block, unknowns=int(unit_scales.size),
                 status=int(status), rows=float(rows),
                 error_before=_residual(q, r, bb, ones),
                 error_after=(_residual(q, r, bb, scales)
                              if np.all(np.isfinite(scales)) else float("nan")),
                 scale_min=float(np.min(unit_scales)),
                 scale_max=float(np.max(unit_scales)))
    reason = None
    if status >= 3:
      reason = f"LSMR did not converge (istop {status})"
    elif not np.all(np.isfinite(unit_scales)):
      reason = "non-finite scales"
    elif np.max(np.abs(unit_scales)) > scale_bound:
      reason = f"a scale is outside [-{scale_bound:g}, {scale_bound:g}]"
    entry.update(accepted=reason is None, reason=reason)
    log.append(entry)
    return None if reason else unit_scales

  stopped = None
  for layer in range(num_layers):
    heads = np.flatnonzero(s_head[layer])
    if layer > 0 and heads.size:
      st = gather(layer, ("att_gram", "att_rhs", "att_bb"))
      idx = np.r_[heads, s_head.shape[1]]           # kept heads + the offset column
      scales = solve(layer, "attention", st["att_gram"][np.ix_(idx, idx)],
                     st["att_rhs"][idx], float(st["att_bb"]), float(st["rows"]), True)
      if scales is None:
        stopped = dict(layer=layer, block="attention", reason=log[-1]["reason"])
        break
      s_head[layer, heads] *= scales.astype(np.float32)
    neurons = np.flatnonzero(s_ffn[layer])
    if neurons.size:
      st = gather(layer, ("ffn_gram", "ffn_rhs", "ffn_bb"))
      scales = solve(layer, "ffn", st["ffn_gram"][np.ix_(neurons, neurons)],
                     st["ffn_rhs"][neurons], float(st["ffn_bb"]), float(st["rows"]),
                     False)
      if scales is None:
        stopped = dict(layer=layer, block="ffn", reason=log[-1]["reason"])
        break
      s_ffn[layer, neurons] *= scales.astype(np.float32)
  return TuningResult(head_mask=s_head, ffn_mask=s_ffn, log=log, stopped=stopped)


# Every batch field that carries (or flags) a ground-truth answer: the label-free
# restoration drops them before anything reads the batch.
ANSWER_FIELDS: tuple[str, ...] = DECODER_INPUTS + LOSS_FIELDS + ("answers",
                                                                 "has_answers")


def make_greedy_inputs_fn(model: TAP, *, bos_index: int):
  """Jitted `(params, inputs) -> [B, decode_steps]` greedy decoder inputs (eval mode)."""
  def fn(params, inputs):
    _, prev = greedy_decode(model, {"params": params}, inputs, bos_index=bos_index)
    return prev
  return jax.jit(fn)


def label_free_batches(model: TAP, params: PyTree,
                       batches: Sequence[Mapping[str, Any]], *, bos_index: int
                       ) -> list[dict]:
  """Tuning batches without any answer: the unpruned model's own decoder inputs.

  Args:
    model, params: the unpruned model (the teacher of the tuning).
    batches: mappings holding at least `MODEL_INPUTS` (batch first); any answer
      field (`ANSWER_FIELDS`: `train_prev_inds`, `targets`, `train_loss_mask`,
      `answers`, `has_answers`) is dropped unread.
    bos_index: answer-vocabulary index of `<s>`.

  Returns:
    New dicts: the non-answer fields (e.g. `weight`, `question_id`) and
    `train_prev_inds` `[B, decode_steps]` int32 = BOS, then the unpruned model's
    greedy argmaxes (`greedy_decode`'s second output).

  Raises:
    ValueError: a batch lacks a model input.
  """
  fn = make_greedy_inputs_fn(model, bos_index=bos_index)
  out = []
  for i, batch in enumerate(batches):
    clean = {k: v for k, v in batch.items() if k not in ANSWER_FIELDS}
    missing = [k for k in MODEL_INPUTS if k not in clean]
    if missing:
      raise ValueError(f"label-free tuning batch {i} lacks the model inputs {missing}.")
    prev = fn(params, {k: clean[k] for k in MODEL_INPUTS})
    out.append({**clean, "train_prev_inds": prev})
  return out


def check_label_free(scores: Any, what: str = "scores") -> None:
  """Refuses scores of a criterion that reads answers (or of an unknown one).

  Raises:
    ValueError: `scores.criterion` is labelled (`alg`, `fisher`) or not a known
      criterion, naming the label-free ones.
  """
  name = getattr(scores, "criterion", None)
  cls = criteria.REGISTRY.get(name) if isinstance(name, str) else None
  if cls is None or cls.needs_labels or not cls.defined:
    free = [n for n, c in criteria.REGISTRY.items() if c.defined and not c.needs_labels]
    why = ("reads ground-truth answers" if cls is not None and cls.needs_labels
           else "is not a known label-free criterion")
    raise ValueError(f"label-free restoration got {what} of criterion {name!r}, which "
                     f"{why}; expected scores of {', '.join(free)}.")


# ------------------------------------------------------------------------ folding


def fold_masks(params: PyTree, config: TapConfig, head_mask: Any, ffn_mask: Any, *,
               learnable_masks: bool = False, keep_head: Any = None,
               keep_ffn: Any = None) -> tuple[dict, TapConfig]:
  """Prunes with real-valued masks: kept units carry their scale into the weights.

  The masks are placed in the tree as `attention/head_mask` / `ffn/ffn_mask` and
  `surgery.prune` slices the kept units; without `learnable_masks` it folds the scales
  into the rows of `attention/out/kernel` and `ffn/wo/kernel` (the pruned model then
  computes what the unpruned one computes with these masks), with them the scales
  become the initial learnable masks (for ReSt after tuning).

  Args:
    params, config: the unpruned model (without learnable masks).
    head_mask, ffn_mask: `[L, H]`, `[L, F]` real-valued masks.
    learnable_masks: keep the scales as learnable masks instead of folding them.
    keep_head, keep_ffn: which units to keep (default: the non-zero mask entries).

  Returns:
    `(pruned_params, pruned_config)`.
  """
  if config.learnable_masks:
    raise ValueError("fold_masks takes an unpruned model without learnable masks.")
  head_mask = np.asarray(head_mask, np.float32)
  ffn_mask = np.asarray(ffn_mask, np.float32)
  keep_head = (head_mask != 0) if keep_head is None else np.asarray(keep_head) != 0
  keep_ffn = (ffn_mask != 0) if keep_ffn is None else np.asarray(keep_ffn) != 0
  tree = flax.core.unfreeze(params)
  new = dict(tree)
  for i in range(config.mmt_layers):
    layer = dict(tree[f"mmt_layer_{i}"])
    if config.mmt_heads[i]:
      layer["attention"] = {**layer["attention"], "head_mask": head_mask[i]}
    if config.mmt_ffn[i]:
      layer["ffn"] = {**layer["ffn"], "ffn_mask": ffn_mask[i]}
    new[f"mmt_layer_{i}"] = layer
  return surgery.prune(new, config, keep_head.astype(np.float32),
                       keep_ffn.astype(np.float32), learnable_masks=learnable_masks)


# ----------------------------------------------------------------------- pipeline


@dataclasses.dataclass
class KwonResult:
  """The retraining-free pipeline's output for one constraint.

  Attributes:
    search: teacher (√c) and student (c) selections.
    head_mask, ffn_mask: the final student masks (binary, or real-valued when tuned).
    rearranged: whether the student masks were rearranged.
    tuning: the TuningResult, or None without tuning.
    params, config: the pruned model with the masks folded in (or as learnable
      masks).
    label_free: no stage read an answer (`retraining_free_label_free`).
  """
  search: SearchResult
  head_mask: np.ndarray
  ffn_mask: np.ndarray
  rearranged: bool
  tuning: Optional[TuningResult]
  params: dict
  config: TapConfig
  label_free: bool = False


def retraining_free(model: TAP, params: PyTree, scores: Any, constraint: float, *,
                    kind: str = "flops", batches: Optional[Sequence[Mapping]] = None,
                    rearrange: bool = True, tune: bool = True,
                    strict_budget: bool = False, from_mask: bool = False,
                    learnable_masks: bool = False, rearrange_grads: Any = None,
                    select: Optional[SelectFn] = None,
                    **tune_kwargs: Any) -> KwonResult:
  """Search (c and √c) → rearrangement → mask tuning → folded pruned model.

  Args:
    model, params: the unpruned model.
    scores: a `scoring.Scores` (its `head`/`ffn` scores rank the units, its
      per-batch gradients drive the rearrangement unless `rearrange_grads`).
    constraint: c, the kept fraction of the FLOPs (`kind="flops"`) or parameters.
    kind: "flops" (Kwon) or "params" (LFPR).
    batches: the tuning data (see `tune_masks`); needed when `tune`.
    rearrange, tune: run those stages.
    strict_budget, from_mask: passed to the search / rearrangement.
    learnable_masks: keep the tuned scales as learnable masks instead of folding.
    rearrange_grads: a `scoring.Scores` whose per-batch gradients drive the
      rearrangement (default: `scores`).
    select: the search under another budget (`search_masks`), e.g. measured latency;
      the rearrangement keeps every layer's unit counts, so the budget holds.
    tune_kwargs: further `tune_masks` options (damp, scale_bound, decoder_steps...).
  """
  search = search_masks(scores.head, scores.ffn, constraint, config=model.config,
                        kind=kind, strict_budget=strict_budget, select=select)
  head = search.student.head_mask.astype(np.float32)
  ffn = search.student.ffn_mask.astype(np.float32)
  if rearrange:
    g = scores if rearrange_grads is None else rearrange_grads
    if g.head_grads is None or g.ffn_grads is None:
      raise ValueError(f"rearrangement needs per-batch gradients; the "
                       f"{g.criterion!r} scores have none (use a gradient "
                       "criterion with keep_batch_grads, or rearrange=False).")
    head = rearrange_masks(head, g.head_grads, from_mask=from_mask)
    ffn = rearrange_masks(ffn, g.ffn_grads, from_mask=from_mask)
  keep_head, keep_ffn = head != 0, ffn != 0
  tuning = None
  if tune:
    if not batches:
      raise ValueError("mask tuning needs batches (tune=False to skip it).")
    tuning = tune_masks(model, params, batches,
                        teacher_head_mask=search.teacher.head_mask,
                        teacher_ffn_mask=search.teacher.ffn_mask, head_mask=head,
                        ffn_mask=ffn, **tune_kwargs)
    head, ffn = tuning.head_mask, tuning.ffn_mask
  pruned, pruned_config = fold_masks(params, model.config, head, ffn,
                                     learnable_masks=learnable_masks,
                                     keep_head=keep_head, keep_ffn=keep_ffn)
  return KwonResult(search=search, head_mask=head, ffn_mask=ffn, rearranged=rearrange,
                    tuning=tuning, params=pruned, config=pruned_config)


def retraining_free_label_free(model: TAP, params: PyTree, scores: Any,
                               constraint: float, *, bos_index: int,
                               batches: Optional[Sequence[Mapping]] = None,
                               rearrange_grads: Any = None, kind: str = "flops",
                               rearrange: bool = True, tune: bool = True,
                               **kwargs: Any) -> KwonResult:
  """`retraining_free` that never reads an answer (see the module docstring).

  Args:
    model, params: the unpruned model.
    scores: scores of a label-free criterion (`lfpr`, `l1`); they rank the units.
    constraint, kind: as `retraining_free`.
    bos_index: the decoder's BOS index (for the greedy decoder inputs).
    batches: tuning batches with the model inputs; their answer fields are dropped
      unread and `train_prev_inds` becomes the unpruned model's greedy decoder inputs
      (`label_free_batches`). Needed when `tune`.
    rearrange_grads: the LFPR `scoring.Scores` (computed with `keep_batch_grads`)
      whose per-batch gradients G_b drive the rearrangement; default `scores` (which
      then must carry them, i.e. be LFPR's).
    rearrange, tune: run those stages.
    kwargs: further `retraining_free` / `tune_masks` options.

  Returns:
    The KwonResult, with `label_free` True.

  Raises:
    ValueError: `scores` or `rearrange_grads` come from a labelled (or unknown)
      criterion, or a stage lacks its inputs.
  """
  check_label_free(scores)
  if rearrange_grads is not None:
    check_label_free(rearrange_grads, "rearrangement gradients")
  tune_batches = None
  if tune:
    if not batches:
      raise ValueError("mask tuning needs batches (tune=False to skip it).")
    tune_batches = label_free_batches(model, params, batches, bos_index=bos_index)
  result = retraining_free(model, params, scores, constraint, kind=kind,
                           batches=tune_batches, rearrange=rearrange, tune=tune,
                           rearrange_grads=rearrange_grads, **kwargs)
  return dataclasses.replace(result, label_free=True)
