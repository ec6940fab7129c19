"""Exact variable-length execution of TAP: trim a batch's padding before the model.

TAP always runs `mmt_len` = 382 MMT rows (docs/TAP.md §0): the 170 `cmb_text`
wordpieces in three zero-padded segments (question 20, OCR words 100, object names
50), 100 object slots, 100 OCR slots and 12 decoder rows. Real batches are mostly
padding. A padded key gets the additive mask -10000 (docs/TAP.md §4.6), whose softmax
weight `exp(-10000 + x)` underflows to exactly 0 in float32, and everything else in
the model is per row. So the padding columns that no valid row reads can be dropped:
the kept rows compute the same values (up to float summation order), and so do the
scores, the M4C loss and the gradients (a probability of exactly 0 passes exactly 0
gradient back).

`trim_batch` (host side, numpy) cuts every segment to the batch's longest valid
length rounded UP to a bucket size (so that only a few shapes are ever compiled):

  segment     full size (TAP)   valid length of one example
  question    question_len 20   1 + last non-zero column of cmb_text[:, :20]
  OCR words   ocr_text_len 100  1 + last non-zero column of cmb_text[:, 20:120]
  obj names   obj_text_len 50   1 + last non-zero column of cmb_text[:, 120:170]
  objects     obj_max 100       min(obj_num, obj_max)
  OCR slots   ocr_max 100       min(ocr_num, ocr_max), and every OCR slot that
                                train_prev_inds feeds back (teacher forcing)

Default buckets: (8, 16, 32, 64) and the full size of each segment (a length rounds
up to the smallest bucket >= it; lengths above the largest bucket below the full size
run at full size). For TAP that is 3 x 5 x 4 x 5 x 5 = 1500 possible shapes
(`num_shapes`); a real TextVQA batch of 16 almost always has all 100 objects and a
question of 16 or 20 wordpieces, so in practice a few dozen shapes occur.

What stays as the padded model gives it:
  * text positions: the trimmed batch carries `text_position_ids` `[n]`, the original
    `cmb_text` column of each kept wordpiece; TextBert uses it for the position
    embeddings and the token types (type = position >= question_len: question columns
    are 0..q-1 < q <= 20 and every other column is >= 20, so the rule holds with the
    trimmed and the full question_len alike);
  * decoder positions (the decoder rows are never trimmed);
  * OCR slot indices: slot j keeps index V_a + j in the scores and in
    `train_prev_inds`, since only slots at the end are dropped.

The trimmed config is `dataclasses.replace(config, question_len=q, ocr_text_len=o,
text_len=q + o + t, obj_max=n_o, ocr_max=n_c)` (question_len is trimmed too, because
`TapConfig` requires text_len - question_len - ocr_text_len >= 1). No parameter
shape depends on these fields, so the trimmed TAP loads the same params.

`restore_scores` pads the OCR-copy columns back to `[B, T, V_a + ocr_max]` with
`MASK_VALUE` (-10000; the padded model gives -10000 + x there): argmaxes are unchanged
(a fixed-answer logit is always far above -10000) and so is the M4C loss (a column with
target 0 at -10000 contributes log1p(exp(-10000)) = 0 in float32). `targets` are cut
the same way by `trim_batch`, which raises if a dropped column holds a non-zero target.

Exactness holds in eval mode. With dropout on (`train=True`) the trimmed model draws
its dropout masks for arrays of other shapes, so it is a different (equally
distributed) random draw than the padded model's for the same key.

Several processes (multi-host jit with shardings) must trim to equal shapes:
`trim_batch(global_lengths=...)` maps the local per-segment maxima to the global ones;
the default (`default_global_lengths`) is the identity on one process and an
all-gather max over processes otherwise.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Hashable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lfpr_jax.models.config import TapConfig
from lfpr_jax.models.tap import MASK_VALUE

Array = Any  # numpy or jax array

SEGMENTS: tuple[str, ...] = ("question", "ocr_text", "obj_text", "obj", "ocr")
DEFAULT_BUCKETS: tuple[int, ...] = (8, 16, 32, 64)

# Fields with an object-slot / OCR-slot axis 1 (cut along it); everything not listed
# here or handled below passes through unchanged.
OBJ_FIELDS: tuple[str, ...] = ("image_feature_0", "obj_bbox_coordinates")
OCR_FIELDS: tuple[str, ...] = ("image_feature_1", "context_feature_0",
                               "context_feature_1", "ocr_bbox_coordinates",
                               "order_vectors")


def segment_sizes(config: TapConfig) -> tuple[int, int, int, int, int]:
  """Full sizes of the trimmable segments, in `SEGMENTS` order."""
  c = config
  return (c.question_len, c.ocr_text_len, c.obj_text_len, c.obj_max, c.ocr_max)


def _check_buckets(buckets: Sequence[int]) -> tuple[int, ...]:
  b = tuple(sorted(int(x) for x in buckets))
  if not b or b[0] < 1:
    raise ValueError(f"buckets must be a non-empty sequence of sizes >= 1, got "
                     f"{tuple(buckets)}.")
  return b


def bucket_size(length: int, full: int, buckets: Sequence[int] = DEFAULT_BUCKETS
                ) -> int:
  """The smallest bucket >= max(length, 1) that is below `full`, else `full`.

  Never 0: `TapConfig` needs a non-empty object-name segment, and the decoder's OCR
  lookup needs at least one OCR slot.
  """
  for b in _check_buckets(buckets):
    if max(length, 1) <= b < full:
      return b
  return full


def segment_buckets(config: TapConfig, buckets: Sequence[int] = DEFAULT_BUCKETS
                    ) -> tuple[tuple[int, ...], ...]:
  """The sizes each segment can be trimmed to (one tuple per entry of `SEGMENTS`)."""
  b = _check_buckets(buckets)
  return tuple(tuple(sorted({x for x in b if x < full} | {full}))
               for full in segment_sizes(config))


def num_shapes(config: TapConfig, buckets: Sequence[int] = DEFAULT_BUCKETS) -> int:
  """How many distinct trimmed shapes (hence compiles) `config` can produce."""
  return int(np.prod([len(s) for s in segment_buckets(config, buckets)]))


def _last_nonzero(text: np.ndarray) -> np.ndarray:
  """1 + index of the last non-zero column per row of `[B, n]` (0 if none)."""
  nz = text != 0
  idx = np.where(nz, np.arange(1, text.shape[1] + 1)[None], 0)
  return idx.max(axis=1) if text.shape[1] else np.zeros(len(text), np.int64)


def _field(batch: Mapping[str, Any], name: str) -> np.ndarray:
  if name not in batch:
    raise ValueError(f"batch is missing field {name!r}; trim_batch expects the "
                     f"canonical model inputs (lfpr_jax.models.batch.model_inputs), "
                     f"got {sorted(batch)}.")
  return np.asarray(batch[name])


def example_lengths(batch: Mapping[str, Any], config: TapConfig) -> np.ndarray:
  """Valid length of every segment of every example.

  Args:
    batch: canonical model inputs (numpy or jax): `cmb_text [B, text_len]`, `obj_num
      [B]`, `ocr_num [B]`, optionally `train_prev_inds [B, T]`.
    config: the full-size model config.

  Returns:
    int64 `[B, 5]`, columns in `SEGMENTS` order. The OCR column also covers every OCR
    slot that `train_prev_inds` feeds back (its embedding is read even when the slot
    is beyond `ocr_num`).
  """
  c = config
  text = _field(batch, "cmb_text")
  if text.ndim != 2 or text.shape[1] != c.text_len:
    raise ValueError(f"cmb_text has shape {text.shape}, expected [B, {c.text_len}] "
                     "(an already trimmed batch cannot be trimmed again).")
  q, o = c.question_len, c.question_len + c.ocr_text_len
  obj = np.minimum(_field(batch, "obj_num").astype(np.int64), c.obj_max)
  ocr = np.minimum(_field(batch, "ocr_num").astype(np.int64), c.ocr_max)
  if "train_prev_inds" in batch:
    prev = np.asarray(batch["train_prev_inds"]).astype(np.int64)
    fed = np.where(prev >= c.num_answers, prev - c.num_answers + 1, 0)
    ocr = np.maximum(ocr, np.minimum(fed.max(axis=1, initial=0), c.ocr_max))
  return np.stack([_last_nonzero(text[:, :q]), _last_nonzero(text[:, q:o]),
                   _last_nonzero(text[:, o:]), np.maximum(obj, 0),
                   np.maximum(ocr, 0)], axis=1)


def default_global_lengths(local: np.ndarray) -> np.ndarray:
  """Per-segment maxima over all processes (identity on a single process).

  Args:
    local: int `[5]`, this process's batch maxima in `SEGMENTS` order.

  Returns:
    int `[5]`, equal on every process, so every process trims to the same shapes.
  """
  if jax.process_count() == 1:
    return local
  from jax.experimental import multihost_utils  # noqa: PLC0415  (multi-host only)
  return np.asarray(multihost_utils.process_allgather(local)).max(axis=0)


@dataclasses.dataclass(frozen=True)
class TrimInfo:
  """What `trim_batch` kept; `restore_scores` and callers read it.

  Attributes:
    sizes: kept size of every segment, `SEGMENTS` order (bucketed).
    lengths: the (global) longest valid length of every segment, before bucketing.
    text_columns: int32 `[n]`, original `cmb_text` column of each kept wordpiece.
  """
  sizes: tuple[int, int, int, int, int]
  lengths: tuple[int, int, int, int, int]
  text_columns: np.ndarray = dataclasses.field(repr=False, compare=False)

  @property
  def ocr_max(self) -> int:
    return self.sizes[4]


def trimmed_config(config: TapConfig, sizes: Sequence[int]) -> TapConfig:
  """`config` with every segment cut to `sizes` (`SEGMENTS` order); same params."""
  q, o, t, n_o, n_c = (int(s) for s in sizes)
  full = segment_sizes(config)
  for name, s, f in zip(SEGMENTS, (q, o, t, n_o, n_c), full):
    if not 1 <= s <= f:
      raise ValueError(f"trimmed {name} size must be in [1, {f}], got {s}.")
  return dataclasses.replace(config, question_len=q, ocr_text_len=o, text_len=q + o + t,
                             obj_max=n_o, ocr_max=n_c)


PACK_STEPS = 8  # packed row counts round up to multiples of 1/PACK_STEPS of the padded


def pack_bucket(rows: int, full: int, steps: int = PACK_STEPS) -> int:
  """Rows to pack `rows` valid rows of `full` into: rounded up to a multiple of
  ceil(full / steps), so at most `steps` counts (compiles) per shape; 0 (packing
  off) where that reaches `full`."""
  granule = max(1, -(-full // steps))
  n = -(-max(rows, 1) // granule) * granule
  return 0 if n >= full else n


def packed_rows(batch: Mapping[str, Any], config: TapConfig) -> tuple[int, int]:
  """`TapConfig.pack_rows` for a batch already trimmed to `config`: the bucketed
  counts of its non-padding text rows and encoder rows (text + objects + OCR)."""
  c = config
  text = np.asarray(batch["cmb_text"])
  b = len(text)
  n_text = int((text != 0).sum())
  n_enc = (n_text + int(np.minimum(np.asarray(batch["obj_num"]), c.obj_max).sum())
           + int(np.minimum(np.asarray(batch["ocr_num"]), c.ocr_max).sum()))
  return (pack_bucket(n_text, b * c.text_len) if c.text_bert_layers else 0,
          pack_bucket(n_enc, b * c.encoder_len))


def unpacked(config: TapConfig) -> TapConfig:
  """`config` without packed rows. For code that runs the model on part of a batch
  (per sample, per group, per micro-batch): `pack_rows` counts the whole batch's
  rows, so gathering that many from a part would compute more rows than padded."""
  return dataclasses.replace(config, pack_rows=(0, 0)) if any(config.pack_rows) else config


def trim_batch(batch: Mapping[str, Any], config: TapConfig, *,
               buckets: Sequence[int] = DEFAULT_BUCKETS,
               global_lengths: Optional[Callable[[np.ndarray], np.ndarray]] = None,
               pack: bool = False
               ) -> tuple[dict[str, np.ndarray], TapConfig, TrimInfo]:
  """Cuts the padding of a batch to bucketed sizes (host side, numpy).

  Args:
    batch: canonical model inputs (`lfpr_jax.models.batch.model_inputs`, numpy or
      jax), optionally with `targets [B, T, V_a + ocr_max]`, `train_loss_mask` and
      `order_vectors`; other fields pass through unchanged.
    config: the full-size model config.
    buckets: allowed sizes below the full size of a segment (see `bucket_size`).
    global_lengths: maps this process's per-segment maxima `[5]` to the global ones;
      default `default_global_lengths`.
    pack: also set the trimmed config's `pack_rows` (`packed_rows`): the row-wise
      work then runs on the batch's non-padding rows only (`tap.valid_rows`). The
      counts are this batch's: use it where one process runs the whole batch.

  Returns:
    (trimmed batch, trimmed config, info). The trimmed batch holds numpy arrays with
    `cmb_text [B, q + o + t]`, `text_position_ids [q + o + t]` (int32), object fields
    `[B, n_o, ...]`, OCR fields `[B, n_c, ...]`, `targets [B, T, V_a + n_c]`. Run it
    with `TAP(trimmed_config)` and the unchanged params.

  Raises:
    ValueError: a field is missing or mis-shaped, the batch is already trimmed, or a
      dropped `targets` column holds a non-zero target.
  """
  c = config
  if "text_position_ids" in batch:
    raise ValueError("batch already has text_position_ids: it is already trimmed.")
  local = example_lengths(batch, c).max(axis=0)
  glob = np.asarray((global_lengths or default_global_lengths)(local), np.int64)
  if glob.shape != (len(SEGMENTS),) or np.any(glob < local):
    raise ValueError(f"global_lengths must return {len(SEGMENTS)} maxima >= the local "
                     f"ones {local.tolist()}, got {glob.tolist()}.")
  full = segment_sizes(c)
  sizes = tuple(bucket_size(int(n), f, buckets) for n, f in zip(glob, full))
  q, o, t, n_o, n_c = sizes
  tc = trimmed_config(c, sizes)
  columns = np.concatenate([np.arange(q), c.question_len + np.arange(o),
                            c.question_len + c.ocr_text_len + np.arange(t)]
                           ).astype(np.int32)

  out = {k: v for k, v in batch.items()}
  out["cmb_text"] = _field(batch, "cmb_text")[:, columns]
  out["text_position_ids"] = columns
  for names, n, f, what in ((OBJ_FIELDS, n_o, c.obj_max, "obj_max"),
                            (OCR_FIELDS, n_c, c.ocr_max, "ocr_max")):
    for name in names:
      if name not in batch:
        if name == "order_vectors":
          continue
        _field(batch, name)  # raises
      x = np.asarray(batch[name])
      if x.ndim < 2 or x.shape[1] != f:
        raise ValueError(f"batch field {name!r} has shape {x.shape}, expected axis 1 "
                         f"of size {what} = {f}.")
      out[name] = x[:, :n]
  if "targets" in batch:
    y = np.asarray(batch["targets"])
    if y.shape[-1] != c.num_classes:
      raise ValueError(f"targets has shape {y.shape}, expected [B, T, "
                       f"{c.num_classes}] (V_a + ocr_max).")
    keep = c.num_answers + n_c
    dropped = y[..., keep:]
    if np.any(dropped != 0):
      b, _, j = np.nonzero(dropped)
      raise ValueError(
          f"targets put weight on OCR slot {int(j[0]) + n_c} of example {int(b[0])}, "
          f"beyond its ocr_num ({int(np.asarray(batch['ocr_num'])[b[0]])}); a target "
          "may only name a valid OCR token.")
    out["targets"] = y[..., :keep]
  info = TrimInfo(sizes=sizes, lengths=tuple(int(n) for n in glob),
                  text_columns=columns)
  if pack:
    tc = dataclasses.replace(tc, pack_rows=packed_rows(out, tc))
  return out, tc, info


def restore_scores(scores: Array, config: TapConfig, info: TrimInfo | TapConfig
                   ) -> Array:
  """Pads trimmed scores `[..., V_a + n_c]` back to `[..., V_a + ocr_max]`.

  The restored OCR-copy columns hold `MASK_VALUE` (-10000); the padded model gives
  -10000 + x there, which no argmax picks and the M4C loss ignores (docstring above).
  numpy in, numpy out; jax in (also under jit), jax out.

  Args:
    scores: `[..., V_a + n_c]` scores of the trimmed model.
    config: the full-size config.
    info: the batch's `TrimInfo`, or the trimmed config (inside a function
      specialised to it, e.g. by `TrimmedFn`); only its `ocr_max` (n_c) is read.
  """
  c = config
  if scores.shape[-1] != c.num_answers + info.ocr_max:
    raise ValueError(f"scores have {scores.shape[-1]} columns, expected "
                     f"V_a + trimmed ocr_max = {c.num_answers + info.ocr_max}.")
  pad = [(0, 0)] * (scores.ndim - 1) + [(0, c.ocr_max - info.ocr_max)]
  xp = np if isinstance(scores, np.ndarray) else jnp
  return xp.pad(scores, pad, constant_values=MASK_VALUE)


class PerShape:
  """One function per trimmed config, built on first use: `PerShape(build)(config)`.

  The one cache of shape-specialised functions (a compiled program per trimmed shape):
  `TrimmedFn`, the trimmed training step and trimmed importance scoring all keep theirs
  here, in the object that owns it, never at module level. At most
  `num_shapes(config, buckets)` entries.

  Example:
    steps = PerShape(lambda c: make_train_step(model.clone(config=c), tx, mesh))
    state, metrics = steps(trimmed_config)(state, frozen, batch, rng)
  """

  def __init__(self, build: Callable[[TapConfig], Callable[..., Any]]):
    self._build = build
    self._fns: dict[Hashable, Callable[..., Any]] = {}

  def __call__(self, config: TapConfig) -> Callable[..., Any]:
    f = self._fns.get(config)
    if f is None:
      f = self._fns[config] = self._build(config)
    return f

  def __len__(self) -> int:
    return len(self._fns)

  def __contains__(self, config: object) -> bool:
    return config in self._fns


class TrimmedFn:
  """Runs `fn` on trimmed batches, with one jitted function per trimmed shape.

  `fn(config, inputs, *args, **kwargs)` must build its model from `config` (the
  trimmed config; e.g. `TAP(config).apply(...)`). The cache lives in this object (at
  most `num_shapes(config, buckets)` entries), never at module level.

  Example:
    run = TrimmedFn(lambda c, x, p: TAP(c).apply({"params": p}, x), config)
    scores, info = run(inputs, params)
    scores = restore_scores(scores, config, info)  # or run.restore(scores, info)
  """

  def __init__(self, fn: Callable[..., Any], config: TapConfig, *,
               buckets: Sequence[int] = DEFAULT_BUCKETS,
               global_lengths: Optional[Callable[[np.ndarray], np.ndarray]] = None,
               pack: Optional[bool] = False, jit: bool = True, **jit_kwargs: Any):
    """Args: fn as above; config: full-size config; buckets, global_lengths: as in
    `trim_batch`; pack: `trim_batch(pack=...)` of `__call__` (None counts as False
    there; `parallel.Trim` reads it as "where one device runs the batch"); jit: jit
    each specialisation (off: plain calls, for debugging); jit_kwargs: passed to
    `jax.jit` (e.g. `static_argnames`, shardings)."""
    self.fn = fn
    self.config = config
    self.buckets = _check_buckets(buckets)
    self.global_lengths = global_lengths
    self.pack = pack
    self._jit = jit
    self._jit_kwargs = jit_kwargs
    self._compiled = PerShape(self._build)

  def _build(self, trimmed: TapConfig) -> Callable[..., Any]:
    fn = self.fn

    def call(inputs, *args, **kwargs):
      return fn(trimmed, inputs, *args, **kwargs)
    return jax.jit(call, **self._jit_kwargs) if self._jit else call

  def specialised(self, trimmed: TapConfig) -> Callable[..., Any]:
    """The (cached) function for one trimmed config: `(inputs, *args) -> out`."""
    return self._compiled(trimmed)

  @property
  def num_specialisations(self) -> int:
    return len(self._compiled)

  def __call__(self, batch: Mapping[str, Any], *args: Any, **kwargs: Any
               ) -> tuple[Any, TrimInfo]:
    """Trims `batch` and runs the specialised `fn`; returns (fn's output, info)."""
    trimmed, tc, info = trim_batch(batch, self.config, buckets=self.buckets,
                                   global_lengths=self.global_lengths,
                                   pack=bool(self.pack))
    return self.specialised(tc)(trimmed, *args, **kwargs), info

  def restore(self, scores: Array, info: TrimInfo) -> Array:
    return restore_scores(scores, self.config, info)


def sort_by_length(indices: Sequence[int], lengths: Array
                   ) -> tuple[np.ndarray, np.ndarray]:
  """Orders examples so that batches hold examples of similar length.

  For stages whose result does not depend on how examples are grouped (evaluation,
  importance scores summed over examples): batch `sorted_indices` in order, then put
  the per-example results back with `results[inverse]`.

  Args:
    indices: `[N]` example indices (e.g. dataset positions).
    lengths: `[N]` or `[N, k]` per-example lengths (e.g. `example_lengths`); with k
      columns the order is lexicographic, column 0 most significant. Stable.

  Returns:
    (sorted_indices `[N]`, inverse `[N]`): `sorted_indices = indices[order]` and
    `inverse` with `x_sorted[inverse] == x` for any per-example array x.
  """
  idx = np.asarray(indices)
  ln = np.asarray(lengths)
  if ln.ndim == 1:
    ln = ln[:, None]
  if idx.ndim != 1 or ln.ndim != 2 or len(ln) != len(idx):
    raise ValueError(f"need indices [N] and lengths [N] or [N, k], got shapes "
                     f"{idx.shape} and {np.shape(lengths)}.")
  order = np.lexsort(ln.T[::-1]) if len(idx) else np.zeros(0, np.int64)
  inverse = np.empty_like(order)
  inverse[order] = np.arange(len(order))
  return idx[order], inverse
