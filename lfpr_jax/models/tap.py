"""TAP (`m4c_split`) in flax.linen, numerically the PyTorch model of microsoft/TAP.

Every upstream detail of docs/TAP.md §4 is reproduced: exact (erf) GELU, LayerNorm eps
1e-12 except the four object/OCR input LayerNorms (1e-5), additive -10000 masking,
the hard-coded token types, the zeroed OCR order vectors, the classifier weight doubling
as the fixed-answer embedding table of the decoder inputs.

Two ways to run the multimodal transformer:
  * `TAP.__call__`: teacher forcing over the whole `[B, 382]` sequence with the
    prefix-LM mask (the training branch; also the LFPR teacher-forced objective);
  * `TAP.encode` + `TAP.decode_step`: the 370 encoder rows once, then one decoder row
    per step attending to cached keys/values. Exact, because encoder rows give weight
    exp(-10000) = 0 to every decoder key (docs/TAP.md §4.6). `lfpr_jax.models.decoding` builds
    greedy decoding from these two methods.

Head and FFN-neuron masks are explicit arguments (`head_mask`, `ffn_mask`; ones = no-op)
so that `jax.grad` with respect to them gives LFPR's importance gradients. With
`config.learnable_masks` every MMT layer also owns learnable masks (the ReSt model).

`config.compute_dtype = "bfloat16"` runs every matmul (dense layers, Q/K/V and output
projections, the QK^T and PV products, pointer net, classifier) on bfloat16 inputs with
float32 accumulation and output, all through `einsum`; everything else (parameters,
residual stream, softmax and its -10000 mask, LayerNorm, losses) stays float32.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from lfpr_jax.models.config import COMPUTE_DTYPES, TapConfig

Array = jax.Array
PyTree = Any
# A per-layer mask: None (ones), an array [L, n] or a sequence of L arrays [n_l].
LayerMasks = Union[None, Array, Sequence[Optional[Array]]]

MASK_VALUE = -10000.0  # upstream additive mask, not -inf (docs/TAP.md §12.9)
BERT_LN_EPS = 1e-12
INPUT_LN_EPS = 1e-5  # obj/OCR feature and box LayerNorms use the PyTorch default
# What a rematerialised layer (`TapConfig.remat`) keeps for the backward pass: nothing
# but its inputs; everything else is recomputed layer by layer (benchmarks/README.md,
# "Memory", has the measurements behind this choice).
REMAT_POLICY = jax.checkpoint_policies.nothing_saveable


def layer_norm(name: str, eps: float = BERT_LN_EPS) -> nn.LayerNorm:
  # use_fast_variance=False: mean of squared deviations, as torch computes it.
  return nn.LayerNorm(epsilon=eps, use_fast_variance=False, name=name)


def l2_normalize(x: Array) -> Array:
  """`torch.nn.functional.normalize(x, dim=-1)`: x / max(||x||, 1e-12)."""
  norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
  return x / jnp.maximum(norm, 1e-12)


def gelu(x: Array) -> Array:
  return jax.nn.gelu(x, approximate=False)


def additive_mask(valid: Array) -> Array:
  """1 -> 0, 0 -> -10000 (float32)."""
  return (1.0 - valid.astype(jnp.float32)) * MASK_VALUE


def valid_rows(valid: Array, n: int) -> Array:
  """Flat indices `[n]` of the valid rows of a `[B, S]` layout, padded with B*S.

  The packed ("unpadded") execution of `TapConfig.pack_rows`: row-wise work (Q/K/V
  and output projections, FFN, LayerNorms) runs on the n gathered rows only. Index
  B*S is out of range: `gather_rows` reads zeros there and `scatter_rows` drops it, so
  the padding entries carry no value and no gradient. n must be at least the number
  of valid rows (`trim.trim_batch` counts them); extra valid rows would be dropped.
  An n above B*S (a count for a whole batch, applied to part of it) is cut to B*S.
  """
  b, s = valid.shape
  (index,) = jnp.nonzero(valid.reshape(-1), size=min(n, b * s), fill_value=b * s)
  return index.astype(jnp.int32)


def gather_rows(x: Array, rows: Array) -> Array:
  """`[B, S, ...]` -> `[n, ...]`: the rows `rows` (`valid_rows`) of x (zeros at B*S)."""
  flat = x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])
  return jnp.take(flat, rows, axis=0, mode="fill", fill_value=0)


def scatter_rows(y: Array, rows: Array, batch: int, length: int) -> Array:
  """`[n, ...]` -> `[B, S, ...]`: y at the rows `rows`, zeros elsewhere.

  Every other row is a padding row of the padded model, which no valid row reads (its
  key weight is exactly 0), so its value does not matter; zeros keep it finite.
  """
  flat = jnp.zeros((batch * length,) + y.shape[1:], y.dtype)
  # An add into zeros: the valid indices are distinct, and the padding entries (all
  # B*S, out of range) are dropped; its transpose is a plain gather.
  flat = flat.at[rows].add(y, mode="drop")
  return flat.reshape((batch, length) + y.shape[1:])


def split_layer_masks(mask: LayerMasks, sizes: Sequence[int], what: str
                      ) -> list[Optional[Array]]:
  """Normalises a head/neuron mask argument to one `[n_l]` array (or None) per layer.

  Args:
    mask: None, an array `[L, n]` (all layers of equal width) or L arrays `[n_l]`.
    sizes: the per-layer widths n_l of the model.
    what: "head_mask" or "ffn_mask", for error messages.

  Returns:
    A list of L entries, each None or an array of shape `[n_l]`.
  """
  if mask is None:
    return [None] * len(sizes)
  if isinstance(mask, (list, tuple)):
    masks = list(mask)
  else:
    mask = jnp.asarray(mask)
    if mask.ndim != 2 or mask.shape[0] != len(sizes):
      raise ValueError(
          f"{what} must be [{len(sizes)}, n] (one row per MMT layer) or a list of "
          f"per-layer vectors; got shape {tuple(mask.shape)}.")
    masks = [mask[i] for i in range(len(sizes))]
  if len(masks) != len(sizes):
    raise ValueError(f"{what} has {len(masks)} layers, the model has {len(sizes)}.")
  for i, (m, n) in enumerate(zip(masks, sizes)):
    if m is not None and tuple(jnp.shape(m)) != (n,):
      raise ValueError(
          f"{what}[{i}] has shape {tuple(jnp.shape(m))}, but MMT layer {i} has {n} "
          f"{'heads' if what == 'head_mask' else 'FFN neurons'} (expected ({n},)).")
  return masks


def layer_fn(fn: Any, remat: bool) -> Any:
  """`fn(layer, *args)` itself, or under a lifted `jax.checkpoint` when `remat`.

  The checkpoint wraps a function of the layer (not the `BertLayer` class) so that
  Python values such as `train` stay closed over (static) and the parameter tree keeps
  its names: the lifted function reads the layer's own scope.
  """
  return nn.remat(fn, prevent_cse=True, policy=REMAT_POLICY) if remat else fn


def einsum_transposes(subscripts: str) -> tuple[str, str]:
  """The einsums of the two cotangents of `einsum(subscripts, a, b)`.

  For "ab,bc->ac" these are ("ac,bc->ab", "ab,ac->bc"): da = einsum(out, b -> a)
  and db = einsum(a, out -> b). Valid for two operands with no letter repeated within
  one term and every letter in at least two of the three terms (no axis summed inside a
  single operand), which every product of the model satisfies; anything else raises.
  """
  ins, sep, out = subscripts.replace(" ", "").partition("->")
  a, comma, b = ins.partition(",")
  terms = (a, b, out)
  if (not sep or not comma or "," in b or "." in subscripts
      or any(len(set(t)) != len(t) for t in terms)
      or any(sum(ch in t for t in terms) < 2 for ch in set(a + b + out))):
    raise ValueError(
        f"einsum_transposes expects 'ab,bc->ac'-style subscripts for two operands, "
        f"each letter in at least two terms and none repeated within one; got "
        f"{subscripts!r}.")
  return f"{out},{b}->{a}", f"{a},{out}->{b}"


def dot_general_subscripts(lhs_ndim: int, rhs_ndim: int,
                           dimension_numbers: Any) -> str:
  """The einsum subscripts of `lax.dot_general` with these dimension numbers.

  dot_general's output axes are the batch axes, then lhs's free axes, then rhs's.
  """
  (lc, rc), (lb, rb) = dimension_numbers
  letters = iter("abcdefghijklmnopqrstuvwxyz")
  lhs, rhs = [""] * lhs_ndim, [""] * rhs_ndim
  for i, j in list(zip(lb, rb)) + list(zip(lc, rc)):
    lhs[i] = rhs[j] = next(letters)
  lhs = [ch or next(letters) for ch in lhs]
  rhs = [ch or next(letters) for ch in rhs]
  out = ([lhs[i] for i in lb]
         + [ch for i, ch in enumerate(lhs) if i not in lb and i not in lc]
         + [ch for j, ch in enumerate(rhs) if j not in rb and j not in rc])
  return f"{''.join(lhs)},{''.join(rhs)}->{''.join(out)}"


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def bfloat16_einsum(subscripts: str, a: Array, b: Array) -> Array:
  """`einsum(subscripts, a, b)` on bfloat16 operands, accumulated and returned in float32.

  Mixed precision as in torch's autocast: only the operands lose precision (8-bit
  mantissa); the products of two bfloat16 values are exact in float32 and are summed
  in float32. The backward pass (a custom VJP) casts the incoming float32 cotangent to
  bfloat16 and runs both transposed products the same way (bfloat16 x bfloat16 ->
  float32, `einsum_transposes`), so the backward is a bfloat16 computation too: a
  float32 x bfloat16 product, which plain autodiff would give, or a product with a
  bfloat16 result, runs as a float32 product on XLA:CPU. Gradients are float32.
  """
  return _bfloat16_einsum_fwd(subscripts, a, b)[0]


def _bfloat16_einsum_fwd(subscripts: str, a: Array, b: Array):
  for x in (a, b):
    if x.dtype != jnp.float32:
      raise ValueError(f"bfloat16_einsum expects float32 operands, got {x.dtype}.")
  a16, b16 = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
  out = jnp.einsum(subscripts, a16, b16, preferred_element_type=jnp.float32)
  return out, (a16, b16)


def _bfloat16_einsum_bwd(subscripts: str, saved: tuple[Array, Array], g: Array):
  a16, b16 = saved
  da, db = einsum_transposes(subscripts)
  g16 = g.astype(jnp.bfloat16)
  return (jnp.einsum(da, g16, b16, preferred_element_type=jnp.float32),
          jnp.einsum(db, a16, g16, preferred_element_type=jnp.float32))


bfloat16_einsum.defvjp(_bfloat16_einsum_fwd, _bfloat16_einsum_bwd)


def einsum(subscripts: str, a: Array, b: Array, compute_dtype: str,
           float32_op: Optional[Callable[[Array, Array], Array]] = None) -> Array:
  """The product `jnp.einsum(subscripts, a, b)` in the precision `compute_dtype`.

  The one place where the model's matmul precision is decided (`TapConfig.compute_dtype`).

  Args:
    subscripts: two-operand einsum subscripts (see `einsum_transposes`).
    a, b: the float32 operands.
    compute_dtype: "float32": the product runs untouched in float32 (the upstream
      numerics; `float32_op(a, b)` where given, to keep a module's historical op bit for
      bit). "bfloat16": `bfloat16_einsum`.
    float32_op: optional equivalent op for float32.

  Returns:
    The float32 product.
  """
  _check_compute_dtype(compute_dtype)
  if compute_dtype == "float32":
    return jnp.einsum(subscripts, a, b) if float32_op is None else float32_op(a, b)
  return bfloat16_einsum(subscripts, a, b)


def _check_compute_dtype(compute_dtype: str) -> None:
  if compute_dtype not in COMPUTE_DTYPES:
    raise ValueError(f"compute_dtype must be one of {list(COMPUTE_DTYPES)}, got "
                     f"{compute_dtype!r}.")


def bfloat16_dot_general(lhs: Array, rhs: Array, dimension_numbers: Any,
                         precision: Any = None, preferred_element_type: Any = None
                         ) -> Array:
  """A `lax.dot_general` stand-in (for `nn.Dense`) that runs `bfloat16_einsum`."""
  del precision, preferred_element_type  # always bfloat16 in, float32 out
  return bfloat16_einsum(
      dot_general_subscripts(lhs.ndim, rhs.ndim, dimension_numbers), lhs, rhs)


def dense(features: int, name: str, compute_dtype: str = "float32") -> nn.Dense:
  # float32 keeps flax's own lax.dot_general (dot_general=None): the exact old module.
  _check_compute_dtype(compute_dtype)
  dot_general = None if compute_dtype == "float32" else bfloat16_dot_general
  return nn.Dense(features, kernel_init=nn.initializers.normal(0.02),
                  dot_general=dot_general, name=name)


class Bias(nn.Module):
  """Only the bias of a linear map whose input width is 0 (a fully pruned block)."""
  features: int

  @nn.compact
  def __call__(self) -> Array:
    return self.param("bias", nn.initializers.zeros, (self.features,))


class HeadProjection(nn.Module):
  """Q/K/V projection to head-major activations: kernel `[d, h, 64]`, bias `[h, 64]`."""
  num_heads: int
  head_dim: int
  compute_dtype: str = "float32"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x `[B, S, d]` -> `[B, h, S, 64]`; packed rows x `[n, d]` -> `[n, h, 64]`."""
    kernel = self.param("kernel", nn.initializers.normal(0.02),
                        (x.shape[-1], self.num_heads, self.head_dim))
    bias = self.param("bias", nn.initializers.zeros, (self.num_heads, self.head_dim))
    if x.ndim == 2:  # as one [d, h*64] matmul (plain 2-D products, also backward)
      y = einsum("nd,dm->nm", x, kernel.reshape(kernel.shape[0], -1), self.compute_dtype)
      return y.reshape(y.shape[0], *bias.shape) + bias
    return (einsum("bsd,dhk->bhsk", x, kernel, self.compute_dtype)
            + bias[None, :, None, :])


class OutProjection(nn.Module):
  """Attention output projection: kernel `[h, 64, d]`, bias `[d]`."""
  features: int
  compute_dtype: str = "float32"

  @nn.compact
  def __call__(self, ctx: Array) -> Array:
    """ctx `[B, h, Q, 64]` -> `[B, Q, d]`; packed rows ctx `[n, h, 64]` -> `[n, d]`."""
    heads = ctx.shape[1] if ctx.ndim == 4 else ctx.shape[-2]
    kernel = self.param("kernel", nn.initializers.normal(0.02),
                        (heads, ctx.shape[-1], self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    if ctx.ndim == 3:  # as one [h*64, d] matmul (plain 2-D products, also backward)
      return einsum("nm,md->nd", ctx.reshape(ctx.shape[0], -1),
                    kernel.reshape(-1, self.features), self.compute_dtype) + bias
    return einsum("bhqk,hkd->bqd", ctx, kernel, self.compute_dtype) + bias


class SelfAttention(nn.Module):
  """BERT self-attention plus output projection, head-major kernels.

  Params: `query|key|value/kernel [d, h, 64]`, `/bias [h, 64]`, `out/kernel [h, 64, d]`,
  `out/bias [d]`, optional `head_mask [h]`. With h = 0 only `out/bias` exists.
  """
  num_heads: int
  head_dim: int
  hidden_size: int
  attention_dropout: float
  learnable_mask: bool = False
  compute_dtype: str = "float32"

  def setup(self):
    h, hd, cd = self.num_heads, self.head_dim, self.compute_dtype
    if h > 0:
      self.query = HeadProjection(h, hd, cd, name="query")
      self.key = HeadProjection(h, hd, cd, name="key")
      self.value = HeadProjection(h, hd, cd, name="value")
      self.out = OutProjection(self.hidden_size, cd, name="out")
      if self.learnable_mask:
        self.head_mask = self.param("head_mask", nn.initializers.ones, (h,))
    else:
      self.out_bias = Bias(self.hidden_size, name="out")
    self.dropout = nn.Dropout(self.attention_dropout)

  def project_kv(self, x: Array, rows: Optional[Array] = None
                 ) -> tuple[Array, Array]:
    """Keys and values `[B, h, S, 64]` of the rows x `[B, S, d]`.

    With `rows` (`valid_rows` of x) only those rows are projected; the others are 0.
    """
    if rows is None:
      return self.key(x), self.value(x)
    xr = gather_rows(x, rows)
    return tuple(self._unpack(proj(xr), rows, x.shape[:2])
                 for proj in (self.key, self.value))

  @staticmethod
  def _unpack(y: Array, rows: Array, shape: Sequence[int]) -> Array:
    """Packed `[n, h, 64]` -> head-major `[B, h, S, 64]`."""
    return jnp.swapaxes(scatter_rows(y, rows, *shape), 1, 2)

  def __call__(self, x: Array, segments: Sequence[tuple[Array, Array, Array]], *,
               head_mask: Optional[Array] = None, train: bool = False,
               rows: Optional[Array] = None) -> Array:
    """Attention of the rows x over one or more key/value segments.

    Args:
      x: query rows `[B, Q, d]`.
      segments: `(keys [B, h, K_i, 64], values [B, h, K_i, 64], mask)` triples; mask
        is additive and broadcasts to `[B, 1, Q, K_i]`. The softmax runs over all
        segments together (segments avoid concatenating cached keys).
      head_mask: optional `[h]` multiplier of the attention probabilities.
      train: enables attention-probability dropout.
      rows: packed execution (`valid_rows` of x): the query projection and the output
        projection run on these rows only, and the output is packed.

    Returns:
      The attention output projection `[B, Q, d]` (before residual and LayerNorm), or
      `[n, d]` with `rows`.
    """
    if self.num_heads == 0:
      shape = x.shape if rows is None else (rows.shape[0], x.shape[-1])
      return jnp.broadcast_to(self.out_bias(), shape)
    ctx = self.context(x, segments, head_mask=head_mask, train=train, rows=rows)
    if rows is not None:
      ctx = gather_rows(jnp.swapaxes(ctx, 1, 2), rows)   # [n, h, 64]
    return self.out(ctx)

  def context(self, x: Array, segments: Sequence[tuple[Array, Array, Array]], *,
              head_mask: Optional[Array] = None, train: bool = False,
              rows: Optional[Array] = None) -> Array:
    """The per-head attention context `[B, h, Q, 64]` (masked), before `out`.

    Arguments as `__call__`; the model needs at least one head.
    """
    q = (self.query(x) if rows is None else
         self._unpack(self.query(gather_rows(x, rows)), rows, x.shape[:2]))
    # Head-major activations [B, h, S, 64]: every product below is a plain batched
    # matmul over (B, h), with no transposes in the forward or backward pass.
    # The products are float32 in either precision, so the scaling, the -10000 mask
    # and the softmax below always run in float32.
    logits = [einsum("bhqd,bhkd->bhqk", q, k, self.compute_dtype)
              / math.sqrt(self.head_dim) + m
              for k, _, m in segments]
    sizes = [l.shape[-1] for l in logits]
    probs = jax.nn.softmax(jnp.concatenate(logits, axis=-1), axis=-1)
    probs = self.dropout(probs, deterministic=not train)
    scale = None
    if self.learnable_mask:
      scale = self.head_mask
    if head_mask is not None:
      scale = head_mask if scale is None else scale * head_mask
    if scale is not None:
      probs = probs * scale[None, :, None, None]
    ctx = 0.0
    start = 0
    for (_, v, _), n in zip(segments, sizes):
      ctx = ctx + einsum("bhqk,bhkd->bhqd", probs[..., start:start + n], v,
                         self.compute_dtype)
      start += n
    return ctx


class FeedForward(nn.Module):
  """BERT intermediate + output dense: `wo(gelu(wi(x)) * mask)`; `wi [d, f]`, `wo [f, d]`."""
  ffn_dim: int
  hidden_size: int
  learnable_mask: bool = False
  compute_dtype: str = "float32"

  def setup(self):
    if self.ffn_dim > 0:
      self.wi = dense(self.ffn_dim, "wi", self.compute_dtype)
      self.wo = dense(self.hidden_size, "wo", self.compute_dtype)
      if self.learnable_mask:
        self.ffn_mask = self.param("ffn_mask", nn.initializers.ones, (self.ffn_dim,))
    else:
      self.wo_bias = Bias(self.hidden_size, name="wo")

  def __call__(self, x: Array, *, ffn_mask: Optional[Array] = None) -> Array:
    if self.ffn_dim == 0:
      return jnp.broadcast_to(self.wo_bias(), x.shape)
    return self.wo(self.hidden(x, ffn_mask=ffn_mask))

  def hidden(self, x: Array, *, ffn_mask: Optional[Array] = None) -> Array:
    """The masked GELU activations `[B, S, f]` (the input of `wo`; needs f > 0)."""
    u = gelu(self.wi(x))
    if self.learnable_mask:
      u = u * self.ffn_mask
    if ffn_mask is not None:
      u = u * ffn_mask
    return u


class BertLayer(nn.Module):
  """Post-LN BERT layer (docs/TAP.md §4.7), shared by text-BERT and the MMT."""
  num_heads: int
  ffn_dim: int
  config: TapConfig
  learnable_masks: bool = False

  def setup(self):
    c = self.config
    self.attention = SelfAttention(self.num_heads, c.head_dim, c.hidden_size,
                                   c.attention_dropout, self.learnable_masks,
                                   c.compute_dtype, name="attention")
    self.attn_ln = layer_norm("attn_ln")
    self.ffn = FeedForward(self.ffn_dim, c.hidden_size, self.learnable_masks,
                           c.compute_dtype, name="ffn")
    self.ffn_ln = layer_norm("ffn_ln")
    self.dropout = nn.Dropout(c.hidden_dropout)

  def project_kv(self, x: Array, rows: Optional[Array] = None
                 ) -> Optional[tuple[Array, Array]]:
    if self.num_heads == 0:
      return None
    return self.attention.project_kv(x, rows)

  def attend(self, x: Array, segments: Sequence[tuple[Array, Array, Array]], *,
             head_mask: Optional[Array] = None, ffn_mask: Optional[Array] = None,
             train: bool = False, rows: Optional[Array] = None) -> Array:
    """The layer for query rows x given the key/value segments they attend to.

    With `rows` (`valid_rows` of x) every row-wise step runs on those rows only and
    the other output rows are 0 (packed execution, `TapConfig.pack_rows`).
    """
    det = not train
    a = self.attention(x, segments, head_mask=head_mask, train=train, rows=rows)
    shape = x.shape[:2]
    if rows is not None:
      x = gather_rows(x, rows)
    x = self.attn_ln(self.dropout(a, deterministic=det) + x)
    f = self.ffn(x, ffn_mask=ffn_mask)
    out = self.ffn_ln(self.dropout(f, deterministic=det) + x)
    return out if rows is None else scatter_rows(out, rows, *shape)

  def __call__(self, x: Array, mask: Array, *, head_mask: Optional[Array] = None,
               ffn_mask: Optional[Array] = None, train: bool = False,
               rows: Optional[Array] = None) -> Array:
    """Full self-attention layer over x `[B, S, d]` with additive mask `[B,1,S|1,S]`."""
    kv = self.project_kv(x, rows)
    segments = [] if kv is None else [(kv[0], kv[1], mask)]
    return self.attend(x, segments, head_mask=head_mask, ffn_mask=ffn_mask,
                       train=train, rows=rows)

  def parts(self, x: Array, mask: Array, *, head_mask: Optional[Array] = None,
            ffn_mask: Optional[Array] = None) -> dict[str, Array]:
    """The eval-mode layer over x `[B, S, d]`, with its intermediate parts.

    For Kwon's mask tuning (`lfpr_jax.pruning.kwon`); needs heads and FFN neurons.

    Returns:
      `context` `[B, h, S, 64]` (masked per-head attention context, the input of the
      output projection), `attn_sum` (output projection + x, before the attention
      LayerNorm), `y` (after it), `act` `[B, S, f]` (masked GELU activations),
      `ffn_sum` (FFN output + y, before the FFN LayerNorm) and `out` (the layer
      output), each `[B, S, d]` unless given.
    """
    kv = self.project_kv(x)
    ctx = self.attention.context(x, [(kv[0], kv[1], mask)], head_mask=head_mask)
    attn_sum = self.attention.out(ctx) + x
    y = self.attn_ln(attn_sum)
    act = self.ffn.hidden(y, ffn_mask=ffn_mask)
    ffn_sum = self.ffn.wo(act) + y
    return dict(context=ctx, attn_sum=attn_sum, y=y, act=act, ffn_sum=ffn_sum,
                out=self.ffn_ln(ffn_sum))


class TextBert(nn.Module):
  """BERT embeddings + `text_bert_layers` encoder layers over `cmb_text` (docs/TAP.md §4.2)."""
  config: TapConfig

  def setup(self):
    c = self.config
    init = nn.initializers.normal(0.02)
    self.word = nn.Embed(c.vocab_size, c.hidden_size, embedding_init=init, name="word")
    self.position = nn.Embed(c.max_position_embeddings, c.hidden_size,
                             embedding_init=init, name="position")
    self.token_type = nn.Embed(c.type_vocab_size, c.hidden_size, embedding_init=init,
                               name="token_type")
    self.emb_ln = layer_norm("emb_ln")
    self.dropout = nn.Dropout(c.hidden_dropout)
    self.layers = [BertLayer(c.text_heads, c.text_ffn, c, name=f"layer_{i}")
                   for i in range(c.text_bert_layers)]

  def __call__(self, text: Array, *, position_ids: Optional[Array] = None,
               train: bool = False) -> Array:
    """Text-BERT over `text` `[B, n]`.

    Args:
      text: wordpiece ids `[B, n]` (0 = padding, masked as a key).
      position_ids: optional `[n]` or `[B, n]` column positions in the full-length
        `cmb_text`; default `arange(n)`. A length-trimmed batch
        (`lfpr_jax.models.trim`) passes the original columns, so every kept
        wordpiece gets the position embedding and token type of the padded model.
      train: dropout on.
    """
    c = self.config
    n = text.shape[1]
    positions = jnp.arange(n) if position_ids is None else jnp.asarray(position_ids)
    if positions.ndim == 1:
      positions = positions[None]  # [1, n], shared by the batch
    # Hard-coded token types: question positions are 0, everything after is 1.
    types = (positions >= c.question_len).astype(jnp.int32)
    e = self.word(text) + self.position(positions) + self.token_type(types)
    x = self.dropout(self.emb_ln(e), deterministic=not train)
    mask = additive_mask(text != 0)[:, None, None, :]
    rows = (valid_rows(text != 0, c.pack_rows[0])
            if c.pack_rows[0] and not self.is_mutable_collection("intermediates")
            else None)
    call = layer_fn(lambda layer, x, mask, rows: layer(x, mask, train=train, rows=rows),
                    c.remat)
    for i, layer in enumerate(self.layers):
      x = call(layer, x, mask, rows)
      self.sow("intermediates", f"layer_out_{i}", x)
    return x


class PrevPredEmbeddings(nn.Module):
  """Decoder inputs from previous predictions (docs/TAP.md §4.5)."""
  config: TapConfig

  def setup(self):
    c = self.config
    init = nn.initializers.normal(0.02)
    self.position = nn.Embed(c.prev_pred_positions, c.hidden_size, embedding_init=init,
                             name="position")
    self.token_type = nn.Embed(c.prev_pred_types, c.hidden_size, embedding_init=init,
                               name="token_type")
    self.ans_ln = layer_norm("ans_ln")
    self.ocr_ln = layer_norm("ocr_ln")
    self.emb_ln = layer_norm("emb_ln")
    self.dropout = nn.Dropout(c.hidden_dropout)

  def tables(self, answer_table: Array, ocr_in: Array) -> tuple[Array, Array]:
    """LayerNormed answer table `[V_a, d]` and OCR table `[B, N_c, d]`."""
    return self.ans_ln(answer_table), self.ocr_ln(ocr_in)

  def __call__(self, ans_emb: Array, ocr_emb: Array, prev: Array, positions: Array,
               *, train: bool = False) -> Array:
    """Embeds prev `[B, T]` (indices into answers ⧺ OCR) at decoder `positions` `[T]`."""
    v_a = ans_emb.shape[0]
    is_ocr = prev >= v_a
    from_ans = jnp.take(ans_emb, jnp.clip(prev, 0, v_a - 1), axis=0)
    ocr_idx = jnp.clip(prev - v_a, 0, ocr_emb.shape[1] - 1)
    from_ocr = jnp.take_along_axis(ocr_emb, ocr_idx[..., None], axis=1)
    raw = jnp.where(is_ocr[..., None], from_ocr, from_ans)
    e = self.position(positions)[None] + self.token_type(is_ocr.astype(jnp.int32))
    e = self.dropout(self.emb_ln(e), deterministic=not train)
    return raw + e


class OcrPtrNet(nn.Module):
  """Copy scores of the decoder rows over the OCR slots (docs/TAP.md §4.8)."""
  config: TapConfig

  def setup(self):
    c = self.config
    self.query = dense(c.ptr_query_key_size, "query", c.compute_dtype)
    self.key = dense(c.ptr_query_key_size, "key", c.compute_dtype)

  def keys(self, ocr_out: Array) -> Array:
    """Pointer keys `[B, N_c, D]` of the OCR rows (cached across decoding steps)."""
    return self.key(ocr_out)

  def __call__(self, dec_out: Array, ocr_keys: Array, ocr_valid: Array) -> Array:
    """Copy scores `[B, T, N_c]` of the decoder rows against `keys(ocr_out)`."""
    q = self.query(dec_out)
    s = einsum("btd,bnd->btn", q, ocr_keys, self.config.compute_dtype) / math.sqrt(
        self.config.ptr_query_key_size)
    return s + additive_mask(ocr_valid)[:, None, :]


class TAP(nn.Module):
  """The TAP Text-VQA model (`m4c_split`; `m4c_lfpr_config` when pruned).

  Inputs are the canonical model fields of `lfpr_jax.models.batch.model_inputs`:
    cmb_text [B, 170] int, image_feature_0 [B, 100, 2048], obj_bbox_coordinates
    [B, 100, 4], obj_num [B], image_feature_1 [B, 100, 2048], context_feature_0
    [B, 100, 300], context_feature_1 [B, 100, 604], ocr_bbox_coordinates [B, 100, 4],
    ocr_num [B], train_prev_inds [B, 12] int; optionally text_position_ids [n] or
    [B, n] int (the `cmb_text` column of each text row, set by
    `lfpr_jax.models.trim.trim_batch`; default arange).
  """
  config: TapConfig

  def setup(self):
    c = self.config
    self.text_bert = TextBert(c, name="text_bert")
    self.obj_fc7 = dense(c.fc7_dim, "obj_fc7", c.compute_dtype)
    self.obj_feat_proj = dense(c.hidden_size, "obj_feat_proj", c.compute_dtype)
    self.obj_bbox_proj = dense(c.hidden_size, "obj_bbox_proj", c.compute_dtype)
    self.obj_feat_ln = layer_norm("obj_feat_ln", INPUT_LN_EPS)
    self.obj_bbox_ln = layer_norm("obj_bbox_ln", INPUT_LN_EPS)
    self.obj_drop = nn.Dropout(c.obj_dropout)
    self.ocr_fc7 = dense(c.fc7_dim, "ocr_fc7", c.compute_dtype)
    self.ocr_feat_proj = dense(c.hidden_size, "ocr_feat_proj", c.compute_dtype)
    self.ocr_bbox_proj = dense(c.hidden_size, "ocr_bbox_proj", c.compute_dtype)
    self.ocr_feat_ln = layer_norm("ocr_feat_ln", INPUT_LN_EPS)
    self.ocr_bbox_ln = layer_norm("ocr_bbox_ln", INPUT_LN_EPS)
    self.ocr_drop = nn.Dropout(c.ocr_dropout)
    self.prev_pred_embeddings = PrevPredEmbeddings(c, name="prev_pred_embeddings")
    self.mmt_layers = [
        BertLayer(h, f, c, c.learnable_masks, name=f"mmt_layer_{i}")
        for i, (h, f) in enumerate(zip(c.mmt_heads, c.mmt_ffn))]
    self.ocr_ptr_net = OcrPtrNet(c, name="ocr_ptr_net")
    # classifier.module.weight [V_a, d]: the fixed-answer logits AND the decoder's
    # answer-embedding table (one tied parameter, stored untransposed).
    init = nn.initializers.normal(0.02)
    self.classifier_embedding = self.param("classifier_embedding", init,
                                           (c.num_answers, c.hidden_size))
    self.classifier_bias = self.param("classifier_bias", nn.initializers.zeros,
                                      (c.num_answers,))

  # Encoders ---------------------------------------------------------------------
  def _encode_obj(self, batch: dict[str, Array], train: bool) -> Array:
    c = self.config
    f = batch["image_feature_0"][:, :c.obj_max]
    g = l2_normalize(jax.nn.relu(self.obj_fc7(f)))
    x = (self.obj_feat_ln(self.obj_feat_proj(g))
         + self.obj_bbox_ln(self.obj_bbox_proj(batch["obj_bbox_coordinates"])))
    return self.obj_drop(x, deterministic=not train)

  def _encode_ocr(self, batch: dict[str, Array], train: bool) -> Array:
    c = self.config
    ft = l2_normalize(batch["context_feature_0"])
    ph = l2_normalize(batch["context_feature_1"])
    g = l2_normalize(jax.nn.relu(self.ocr_fc7(batch["image_feature_1"][:, :c.ocr_max])))
    feat = jnp.concatenate([ft, ph, g], axis=-1)
    # Upstream feeds zeros in place of the legacy order vectors (docs/TAP.md §4.4).
    order = jnp.zeros(feat.shape[:-1] + (c.order_dim,), feat.dtype)
    proj = self.ocr_feat_proj(jnp.concatenate([feat, order], axis=-1))
    x = self.ocr_feat_ln(proj) + self.ocr_bbox_ln(
        self.ocr_bbox_proj(batch["ocr_bbox_coordinates"]))
    return self.ocr_drop(x, deterministic=not train)

  def _inputs(self, batch: dict[str, Array], train: bool) -> dict[str, Array]:
    """Text-BERT, object and OCR encoders: everything that precedes the MMT."""
    c = self.config
    txt = self.text_bert(batch["cmb_text"], train=train,
                         position_ids=batch.get("text_position_ids"))
    obj = self._encode_obj(batch, train)
    ocr = self._encode_ocr(batch, train)
    self.sow("intermediates", "txt_emb", txt)
    self.sow("intermediates", "obj_mmt_in", obj)
    self.sow("intermediates", "ocr_mmt_in", ocr)
    obj_valid = jnp.arange(c.obj_max)[None] < batch["obj_num"][:, None]
    ocr_valid = jnp.arange(c.ocr_max)[None] < batch["ocr_num"][:, None]
    enc_valid = jnp.concatenate(
        [batch["cmb_text"] != 0, obj_valid, ocr_valid], axis=1)
    return dict(txt=txt, obj=obj, ocr=ocr, ocr_valid=ocr_valid, enc_valid=enc_valid)

  def _scores(self, dec_out: Array, ocr_keys: Array, ocr_valid: Array) -> Array:
    """Fixed-vocabulary logits ⧺ OCR copy scores `[B, T, V_a + N_c]`."""
    fixed = (einsum("btd,vd->btv", dec_out, self.classifier_embedding,
                    self.config.compute_dtype, float32_op=lambda x, w: x @ w.T)
             + self.classifier_bias)
    ocr = self.ocr_ptr_net(dec_out, ocr_keys, ocr_valid)
    self.sow("intermediates", "fixed_scores", fixed)
    self.sow("intermediates", "ocr_scores", ocr)
    return jnp.concatenate([fixed, ocr], axis=-1)

  def _masks(self, head_mask: LayerMasks, ffn_mask: LayerMasks):
    c = self.config
    return (split_layer_masks(head_mask, c.mmt_heads, "head_mask"),
            split_layer_masks(ffn_mask, c.mmt_ffn, "ffn_mask"))

  # Teacher forcing ---------------------------------------------------------------
  def __call__(self, batch: dict[str, Array], *, train: bool = False,
               head_mask: LayerMasks = None, ffn_mask: LayerMasks = None) -> Array:
    """Teacher-forced scores `[B, T, C]` with decoder inputs `batch['train_prev_inds']`.

    Args:
      batch: canonical model inputs (see class docstring).
      train: dropout on (needs a 'dropout' rng).
      head_mask: per-layer head masks (`[L, H]` or L vectors `[h_l]`); None = ones.
      ffn_mask: per-layer neuron masks (`[L, F]` or L vectors `[f_l]`); None = ones.
    """
    c = self.config
    head_masks, ffn_masks = self._masks(head_mask, ffn_mask)
    x, mask, enc = self.mmt_inputs(batch, train=train)
    steps = x.shape[1] - enc["enc_valid"].shape[1]
    valid = jnp.concatenate(
        [enc["enc_valid"], jnp.ones((x.shape[0], steps), bool)], axis=1)
    out, _ = self._mmt(x, mask, head_masks, ffn_masks, train, valid)
    return self._scores(out[:, c.ocr_max:], self.ocr_ptr_net.keys(out[:, :c.ocr_max]),
                        enc["ocr_valid"])

  def mmt_inputs(self, batch: dict[str, Array], *, train: bool = False
                 ) -> tuple[Array, Array, dict[str, Array]]:
    """The teacher-forced MMT input sequence (decoder rows from `train_prev_inds`).

    Returns:
      `x` `[B, S, d]` (text, object, OCR and decoder rows), its additive prefix-LM
      mask `[B, 1, S, S]` and the encoder outputs of `_inputs` (`enc_valid` `[B, 370]`
      marks the non-padded encoder rows, `ocr_valid` `[B, 100]` the OCR slots).
    """
    enc = self._inputs(batch, train)
    prev = batch["train_prev_inds"]
    steps = prev.shape[1]
    ans_emb, ocr_emb = self.prev_pred_embeddings.tables(self.classifier_embedding,
                                                        enc["ocr"])
    dec = self.prev_pred_embeddings(ans_emb, ocr_emb, prev, jnp.arange(steps),
                                    train=train)
    self.sow("intermediates", "dec_emb", dec)
    x = jnp.concatenate([enc["txt"], enc["obj"], enc["ocr"], dec], axis=1)
    return x, prefix_lm_mask(enc["enc_valid"], steps), enc

  def _mmt(self, x: Array, mask: Array, head_masks: list, ffn_masks: list,
           train: bool, valid: Optional[Array] = None) -> tuple[Array, list]:
    """Runs the MMT layers; returns the last layer's rows from the OCR block on.

    Only the OCR rows (pointer-net keys) and decoder rows of the last layer are ever
    read, so its queries are restricted to them (its keys/values still cover every
    row): an exact saving of about 10% of TAP's forward. When intermediates are being
    collected (parity tests) every row is computed.

    With `config.pack_rows` (and `valid` `[B, S]`, the rows that are not padding),
    every layer's row-wise work runs on the valid rows only (`valid_rows`): the last
    layer's keys/values too, its (restricted) queries in the padded layout.

    Returns:
      `[B, S - 270, d]` (OCR rows, then decoder rows if any) and the per-layer
      keys/values of x (None for layers without heads).
    """
    c = self.config
    start = c.encoder_len - c.ocr_max
    full = self.is_mutable_collection("intermediates")
    rows = None
    if c.pack_rows[1] and valid is not None and not full:
      rows = valid_rows(valid, c.pack_rows[1]
                        + x.shape[0] * (x.shape[1] - c.encoder_len))
    attend = layer_fn(
        lambda layer, q, segments, head_mask, ffn_mask, rows: layer.attend(
            q, segments, head_mask=head_mask, ffn_mask=ffn_mask, train=train,
            rows=rows),
        c.remat)
    kvs = []
    for i, layer in enumerate(self.mmt_layers):
      kv = layer.project_kv(x, rows)
      kvs.append(kv)
      q, m, q_rows = x, mask, rows
      if i == len(self.mmt_layers) - 1 and not full:
        q, q_rows = x[:, start:], None
        m = mask if mask.shape[2] == 1 else mask[:, :, start:]
      segments = [] if kv is None else [(kv[0], kv[1], m)]
      x = attend(layer, q, segments, head_masks[i], ffn_masks[i], q_rows)
      self.sow("intermediates", f"mmt_out_{i}", x)
    return (x[:, start:] if full else x), kvs

  # Cached incremental decoding ---------------------------------------------------
  def encode(self, batch: dict[str, Array], *, train: bool = False,
             head_mask: LayerMasks = None, ffn_mask: LayerMasks = None) -> PyTree:
    """Runs everything that does not depend on the decoder inputs, once.

    Returns:
      A cache pytree: `kv` (per MMT layer the keys/values `[B, h_l, 370, 64]` of the
      encoder rows, or None for a layer without heads), `enc_mask` `[B, 1, 1, 370]`
      (additive), `ocr_keys` `[B, 100, D]` (pointer-net keys of the last layer's
      OCR rows), `ocr_valid` `[B, 100]`, `ans_emb`
      `[V_a, d]` and `ocr_emb` `[B, 100, d]` (the decoder-input tables).
    """
    head_masks, ffn_masks = self._masks(head_mask, ffn_mask)
    enc = self._inputs(batch, train)
    x = jnp.concatenate([enc["txt"], enc["obj"], enc["ocr"]], axis=1)
    mask = additive_mask(enc["enc_valid"])[:, None, None, :]
    ocr_out, kv = self._mmt(x, mask, head_masks, ffn_masks, train, enc["enc_valid"])
    ans_emb, ocr_emb = self.prev_pred_embeddings.tables(self.classifier_embedding,
                                                        enc["ocr"])
    return dict(kv=kv, enc_mask=mask, ocr_keys=self.ocr_ptr_net.keys(ocr_out),
                ocr_valid=enc["ocr_valid"], ans_emb=ans_emb, ocr_emb=ocr_emb)

  def decode_step(self, cache: PyTree, dec_kv: PyTree, prev_t: Array, t: Array, *,
                  train: bool = False, head_mask: LayerMasks = None,
                  ffn_mask: LayerMasks = None) -> tuple[Array, PyTree]:
    """One decoder row: embeds prev_t `[B]` at step t, returns scores `[B, C]`.

    `dec_kv` holds the keys/values of decoder rows < t (from earlier steps); row t's
    are written into it and the updated buffers are returned. Row t attends to every
    valid encoder row and to decoder rows <= t, exactly as in the full pass.
    """
    c = self.config
    head_masks, ffn_masks = self._masks(head_mask, ffn_mask)
    x = self.prev_pred_embeddings(cache["ans_emb"], cache["ocr_emb"], prev_t[:, None],
                                  jnp.reshape(t, (1,)), train=train)
    dec_mask = jnp.where(jnp.arange(c.decode_steps) <= t, 0.0, MASK_VALUE)
    new_kv = []
    for i, layer in enumerate(self.mmt_layers):
      if c.mmt_heads[i] == 0:
        new_kv.append(None)
        segments = []
      else:
        k_t, v_t = layer.project_kv(x)
        k = jax.lax.dynamic_update_slice_in_dim(dec_kv[i][0], k_t, t, axis=2)
        v = jax.lax.dynamic_update_slice_in_dim(dec_kv[i][1], v_t, t, axis=2)
        new_kv.append((k, v))
        ek, ev = cache["kv"][i]
        segments = [(ek, ev, cache["enc_mask"]), (k, v, dec_mask)]
      x = layer.attend(x, segments, head_mask=head_masks[i], ffn_mask=ffn_masks[i],
                       train=train)
    scores = self._scores(x, cache["ocr_keys"], cache["ocr_valid"])
    return scores[:, 0], new_kv


def init_decoder_cache(config: TapConfig, batch_size: int
                       ) -> list[Optional[tuple[Array, Array]]]:
  """Zero key/value buffers `[B, h_l, T, 64]` for the decoder rows of every MMT layer."""
  return [None if h == 0 else
          (jnp.zeros((batch_size, h, config.decode_steps, config.head_dim),
                     jnp.float32),) * 2
          for h in config.mmt_heads]


def prefix_lm_mask(enc_valid: Array, steps: int) -> Array:
  """Additive MMT mask `[B, 1, S, S]` (docs/TAP.md §4.6).

  Encoder keys are visible to every query where valid; decoder keys are invisible to
  encoder queries and causal (incl. the diagonal) among decoder queries.
  """
  b, n_enc = enc_valid.shape
  n = n_enc + steps
  enc_part = jnp.broadcast_to(enc_valid[:, None, :].astype(jnp.float32), (b, n, n_enc))
  i = jnp.arange(n)[:, None]
  j = jnp.arange(steps)[None, :] + n_enc
  dec_part = ((i >= n_enc) & (j <= i)).astype(jnp.float32)
  dec_part = jnp.broadcast_to(dec_part[None], (b, n, steps))
  valid = jnp.concatenate([enc_part, dec_part], axis=-1)
  return additive_mask(valid)[:, None]
