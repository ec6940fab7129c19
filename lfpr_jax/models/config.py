"""Frozen architecture description of TAP (`m4c_split`) and its pruned variants.

A pruned model is "just another config": the per-layer head counts and FFN widths of
the multimodal transformer (MMT) are tuples, so TAP, TAP12 and any LFPR-pruned model
are all described by one `TapConfig`, which round-trips through JSON (the
`arch.json` file stored next to every checkpoint).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping, Sequence, TypeVar

def dataclass_to_dict(obj: Any) -> dict[str, Any]:
  """`dataclasses.asdict(obj)` with every tuple field value turned into a list.

  The JSON form of a frozen config dataclass (`TapConfig`, `SyntheticSpec`): tuples,
  kept in the dataclass so it stays hashable, become lists (nested ones too), as
  `json.loads(json.dumps(...))` would give them back.
  """
  def lists(value: Any) -> Any:
    return [lists(v) for v in value] if isinstance(value, tuple) else value

  return {k: lists(v) for k, v in dataclasses.asdict(obj).items()}


T = TypeVar("T")


def dataclass_from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
  """`cls(**data)` for a config dataclass, rejecting keys that are not fields.

  Raises:
    ValueError: `data` has keys that are not fields of `cls` (a typo in a config
      or a file written by another version), naming them and the known fields.
  """
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(data) - known)
  if unknown:
    raise ValueError(f"unknown {cls.__name__} fields {unknown}; known: {sorted(known)}.")
  return cls(**dict(data))


# Matmul input precisions of `TapConfig.compute_dtype` (accumulation is always float32).
COMPUTE_DTYPES = ("float32", "bfloat16")

# Published TAP checkpoints (docs/TAP.md §1.1).
KNOWN_ARCHS = {
    "tap": dict(text_bert_layers=3, mmt_layers=4),
    "tap12": dict(text_bert_layers=0, mmt_layers=12),
}


@dataclasses.dataclass(frozen=True)
class TapConfig:
  """Hyper-parameters of TAP; defaults are the upstream TextVQA values (docs/TAP.md §1).

  Attributes:
    arch: informational name ("tap", "tap12", "custom").
    text_bert_layers: text-BERT encoder layers (3 for TAP, 0 for TAP12).
    mmt_heads: attention heads per MMT layer (0..12 each once pruned).
    mmt_ffn: FFN width per MMT layer (0..3072 each once pruned).
    learnable_masks: the retraining model of LFPR (`mmt.mask=True`): every MMT layer
      owns a learnable head mask `[h_l]` and neuron mask `[f_l]`, initialised to ones.
    hidden_size: model width d everywhere (text-BERT, MMT, pointer net).
    head_dim: size of one attention head (64, also in pruned layers).
    text_heads, text_ffn: text-BERT layer shapes (never pruned).
    vocab_size, max_position_embeddings, type_vocab_size: text-BERT embeddings.
    question_len: positions < question_len get token type 0, all others type 1.
    text_len: length of `cmb_text` (question 20 + OCR words 100 + object names 50).
    ocr_text_len: wordpieces of the OCR-word segment of `cmb_text` (100); the object
      names get the rest, `text_len - question_len - ocr_text_len` (50).
    num_answers: fixed answer vocabulary size V_a (= rows of the classifier).
    obj_max, ocr_max: object / OCR slots.
    decode_steps: decoding steps T (`max_copy_steps`).
    obj_feat_dim, ocr_feat_dim: detector feature width fed to the fc7 layers.
    fc7_dim: output width of the fc7 layers.
    fasttext_dim, phoc_dim, order_dim: OCR input feature widths (the order vectors
      are always zero upstream; only their width matters).
    prev_pred_positions, prev_pred_types: rows of the decoder-input position and type
      tables (only the first `decode_steps` / 2 rows are used).
    ptr_query_key_size: OCR pointer-net projection width.
    hidden_dropout, attention_dropout: BERT dropouts (text-BERT, MMT, decoder inputs).
    obj_dropout, ocr_dropout: dropout after the object / OCR input encoders.
    compute_dtype: "float32" (default, the upstream numerics) or "bfloat16": every
      matmul of the model takes bfloat16 inputs and accumulates/returns float32;
      parameters, the residual stream, softmax, LayerNorm statistics and losses stay
      float32 (`lfpr_jax.models.tap.einsum`). A run-time choice, not part of the
      architecture: a config of either value describes the same parameters.
    remat: rematerialise every text-BERT and MMT layer (`flax.linen.remat`, policy
      `tap.REMAT_POLICY`): the backward pass may keep only each layer's inputs and
      recompute the rest, at about one extra forward of the layers. Same parameters,
      same outputs and gradients; no effect without differentiation. How much memory
      it saves is up to XLA's scheduler: little on the CPU (docs/TAP.md §4.9).
    pack_rows: packed ("unpadded") execution, set by `lfpr_jax.models.trim.trim_batch`
      for one batch: (text rows, encoder rows), the number of rows of the whole batch
      that the row-wise work of text-BERT and of the MMT (Q/K/V and output
      projections, FFN, LayerNorms) runs on, at least the batch's non-padding rows
      (decoder rows are always added to the MMT's). 0 = off (every row computed).
      Same parameters and, on the valid rows, the same outputs (`tap.valid_rows`).
  """

  arch: str = "tap"
  text_bert_layers: int = 3
  mmt_heads: tuple[int, ...] = (12, 12, 12, 12)
  mmt_ffn: tuple[int, ...] = (3072, 3072, 3072, 3072)
  learnable_masks: bool = False
  hidden_size: int = 768
  head_dim: int = 64
  text_heads: int = 12
  text_ffn: int = 3072
  vocab_size: int = 30522
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  question_len: int = 20
  text_len: int = 170
  ocr_text_len: int = 100
  num_answers: int = 5000
  obj_max: int = 100
  ocr_max: int = 100
  decode_steps: int = 12
  obj_feat_dim: int = 2048
  ocr_feat_dim: int = 2048
  fc7_dim: int = 2048
  fasttext_dim: int = 300
  phoc_dim: int = 604
  order_dim: int = 100
  prev_pred_positions: int = 100
  prev_pred_types: int = 5
  ptr_query_key_size: int = 768
  hidden_dropout: float = 0.1
  attention_dropout: float = 0.1
  obj_dropout: float = 0.1
  ocr_dropout: float = 0.1
  compute_dtype: str = "float32"
  remat: bool = False
  pack_rows: tuple[int, int] = (0, 0)

  def __post_init__(self):
    # Lists from JSON / ml_collections become tuples so the config stays hashable.
    object.__setattr__(self, "mmt_heads", tuple(int(h) for h in self.mmt_heads))
    object.__setattr__(self, "mmt_ffn", tuple(int(f) for f in self.mmt_ffn))
    object.__setattr__(self, "pack_rows", tuple(int(n) for n in self.pack_rows))
    if len(self.pack_rows) != 2 or min(self.pack_rows) < 0:
      raise ValueError(f"pack_rows must be two row counts >= 0 (text rows, encoder "
                       f"rows; 0 = off), got {list(self.pack_rows)}.")
    if len(self.mmt_heads) != len(self.mmt_ffn):
      raise ValueError(
          f"mmt_heads has {len(self.mmt_heads)} layers but mmt_ffn has "
          f"{len(self.mmt_ffn)}; both need one entry per MMT layer.")
    if not self.mmt_heads:
      raise ValueError("the MMT needs at least one layer (mmt_heads is empty).")
    for name, values in (("mmt_heads", self.mmt_heads), ("mmt_ffn", self.mmt_ffn)):
      bad = [v for v in values if v < 0]
      if bad:
        raise ValueError(f"{name} must be >= 0 per layer, got {list(values)}.")
    if self.text_bert_layers < 0:
      raise ValueError(f"text_bert_layers must be >= 0, got {self.text_bert_layers}.")
    if self.obj_text_len < 1:
      raise ValueError(
          f"text_len ({self.text_len}) must exceed question_len ({self.question_len}) "
          f"+ ocr_text_len ({self.ocr_text_len}): the object-name segment is empty.")
    if self.decode_steps > self.prev_pred_positions:
      raise ValueError("decode_steps exceeds the decoder position table.")
    if self.compute_dtype not in COMPUTE_DTYPES:
      raise ValueError(
          f"compute_dtype must be one of {list(COMPUTE_DTYPES)}, got "
          f"{self.compute_dtype!r}.")

  # Derived sizes ---------------------------------------------------------------
  @property
  def mmt_layers(self) -> int:
    return len(self.mmt_heads)

  @property
  def obj_text_len(self) -> int:
    """Wordpieces of the object-name segment of `cmb_text`."""
    return self.text_len - self.question_len - self.ocr_text_len

  @property
  def num_classes(self) -> int:
    """Scores per decoding step: V_a fixed answers + one per OCR slot."""
    return self.num_answers + self.ocr_max

  @property
  def encoder_len(self) -> int:
    """MMT rows that never attend to decoder rows (text + objects + OCR)."""
    return self.text_len + self.obj_max + self.ocr_max

  @property
  def mmt_len(self) -> int:
    return self.encoder_len + self.decode_steps

  @property
  def ocr_in_dim(self) -> int:
    return self.fasttext_dim + self.phoc_dim + self.fc7_dim + self.order_dim

  @property
  def is_unpruned(self) -> bool:
    full_heads = self.hidden_size // self.head_dim
    return (all(h == full_heads for h in self.mmt_heads)
            and all(f == self.text_ffn for f in self.mmt_ffn))

  # Constructors ------------------------------------------------------------------
  @classmethod
  def tap(cls, **overrides: Any) -> "TapConfig":
    """TAP (`*_tap_base_best.ckpt`): 3 text-BERT layers, 4 MMT layers."""
    return cls(**{**dict(arch="tap", text_bert_layers=3, mmt_heads=(12,) * 4,
                         mmt_ffn=(3072,) * 4), **overrides})

  @classmethod
  def tap12(cls, **overrides: Any) -> "TapConfig":
    """TAP12 (`*_tap_ocrcc_best.ckpt`): no text-BERT layers, 12 MMT layers."""
    return cls(**{**dict(arch="tap12", text_bert_layers=0, mmt_heads=(12,) * 12,
                         mmt_ffn=(3072,) * 12), **overrides})

  def pruned(self, heads: Sequence[int], ffn: Sequence[int], *,
             learnable_masks: bool = True) -> "TapConfig":
    """The config of this model with new per-layer MMT shapes (`m4c_lfpr_config`)."""
    if len(heads) != self.mmt_layers or len(ffn) != self.mmt_layers:
      raise ValueError(
          f"need {self.mmt_layers} per-layer head counts and FFN widths, got "
          f"{len(heads)} and {len(ffn)}.")
    return dataclasses.replace(self, mmt_heads=tuple(heads), mmt_ffn=tuple(ffn),
                               learnable_masks=learnable_masks)

  # JSON --------------------------------------------------------------------------
  def to_dict(self) -> dict[str, Any]:
    """JSON-ready dict (the per-layer tuples become lists)."""
    return dataclass_to_dict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "TapConfig":
    """Inverse of `to_dict`; unknown keys raise a ValueError."""
    return dataclass_from_dict(cls, d)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=1)

  @classmethod
  def from_json(cls, text: str) -> "TapConfig":
    return cls.from_dict(json.loads(text))
