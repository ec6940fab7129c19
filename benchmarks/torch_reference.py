"""Upstream TAP (`m4c_split`) re-implemented in PyTorch, timed like `benchmarks.tap_cpu`.

PyTorch is NOT a dependency of lfpr_jax; use a separate venv (a CPU wheel of torch
2.13, the version the upstream figures were taken with):

  python3 -m venv /tmp/bvenv && /tmp/bvenv/bin/pip install torch==2.13.0 numpy
  /tmp/bvenv/bin/python -m benchmarks.torch_reference --arch tap --batch 16 \
      --repeats 5 --out benchmarks/results/torch_reference.json

Check that this re-implementation computes what upstream computes (the golden
fixtures that the upstream code produced, `golden` (docs/README.md §4); a few seconds):

  /tmp/bvenv/bin/python -m benchmarks.torch_reference --check-golden ../shared/golden

The model mirrors the upstream code module by module, with upstream's state-dict
names (so the golden weights load strictly): pytorch_transformers 1.2 `BertLayer`
(Linear Q/K/V, Q K^T / sqrt(64) + additive mask, softmax, dropout, P V, dense +
dropout + LayerNorm residual, erf-GELU FFN), `TextBert` (embeddings + 3 layers over
the 170 text ids), the object/OCR encoders (fc7 Linear 2048 -> 2048, ReLU,
F.normalize, Linear to 768 + LayerNorm(eps 1e-5) of features and boxes),
`PrevPredEmbeddings`, the `MMT` (4 layers over 382 rows, prefix-LM mask built as
upstream builds it), the classifier and `OcrPtrNet`. Greedy decoding is upstream's
eval-mode loop: obj/OCR encoders once, then 12 passes of text-BERT + MMT + heads,
refilling every later decoder input from the argmaxes. The only upstream code left
out is dead code (the `[B, 382, 4]` box tensor the MMT ignores) and the pretraining
heads (never run in fine-tuning or inference).

Stages (same names and JSON schema as benchmarks.tap_cpu): forward (teacher forced,
eval mode, no_grad), train_step (forward + M4C loss + backward, dropout off),
train_step_dropout (train mode), greedy_reference (upstream's loop, no_grad),
matmul_torch and matmul_numpy (4096^2 float32 matmuls).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Mapping, Optional, Sequence

import numpy as np

try:
  import torch
  import torch.nn.functional as F
  from torch import nn
except ImportError:  # torch is optional: say how to get it, then stop.
  sys.stderr.write(
      "benchmarks.torch_reference needs PyTorch, which is not a dependency of "
      "lfpr_jax.\nCreate a separate venv and run it from there:\n"
      "  python3 -m venv /tmp/bvenv && /tmp/bvenv/bin/pip install torch==2.13.0 numpy\n"
      "  /tmp/bvenv/bin/python -m benchmarks.torch_reference --batch 16\n")
  raise SystemExit(2) from None

from benchmarks import common
from lfpr_jax.models.config import TapConfig

Tensor = torch.Tensor

STAGES = ("forward", "train_step", "train_step_dropout", "greedy_reference",
          "matmul_torch", "matmul_numpy")

DESCRIPTIONS = {
    "forward": "teacher-forced forward, eval mode, torch.no_grad",
    "train_step": "forward + M4C loss + backward to all params, dropout off "
                  "(model.eval()); headline training figure",
    "train_step_dropout": "forward + M4C loss + backward, model.train() with dropout "
                          "(upstream's training step without the optimizer update)",
    "greedy_reference": "upstream eval-mode greedy decoding: obj/OCR encoders once, "
                        "12 passes of text-BERT + MMT + heads, torch.no_grad",
    "matmul_torch": f"{common.MATMUL_N}x{common.MATMUL_N} float32 matmul, torch",
    "matmul_numpy": f"{common.MATMUL_N}x{common.MATMUL_N} float32 matmul, numpy @",
}

BERT_LN_EPS = 1e-12
MASK_VALUE = -10000.0
BOS_IDX = 1


# pytorch_transformers 1.2 BERT blocks -----------------------------------------------

def gelu(x: Tensor) -> Tensor:
  """pytorch_transformers 1.2 `gelu` (exact erf form, written out as upstream)."""
  return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


class BertSelfAttention(nn.Module):
  """`attention.self`: Q/K/V projections, scaled dot product, softmax, dropout."""

  def __init__(self, hidden: int, heads: int, head_dim: int, dropout: float):
    super().__init__()
    self.num_attention_heads = heads
    self.attention_head_size = head_dim
    self.all_head_size = heads * head_dim
    self.query = nn.Linear(hidden, self.all_head_size)
    self.key = nn.Linear(hidden, self.all_head_size)
    self.value = nn.Linear(hidden, self.all_head_size)
    self.dropout = nn.Dropout(dropout)

  def transpose_for_scores(self, x: Tensor) -> Tensor:
    x = x.view(x.size()[:-1] + (self.num_attention_heads, self.attention_head_size))
    return x.permute(0, 2, 1, 3)

  def forward(self, hidden_states: Tensor, attention_mask: Tensor,
              head_mask: Optional[Tensor] = None) -> Tensor:
    q = self.transpose_for_scores(self.query(hidden_states))
    k = self.transpose_for_scores(self.key(hidden_states))
    v = self.transpose_for_scores(self.value(hidden_states))
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.attention_head_size)
    scores = scores + attention_mask
    probs = self.dropout(nn.Softmax(dim=-1)(scores))
    if head_mask is not None:  # LFPR: [h] multiplier of the attention probabilities
      probs = probs * head_mask.view(1, -1, 1, 1)
    ctx = torch.matmul(probs, v).permute(0, 2, 1, 3).contiguous()
    return ctx.view(ctx.size()[:-2] + (self.all_head_size,))


class BertSelfOutput(nn.Module):
  """`attention.output`: dense, dropout, LayerNorm of the residual sum."""

  def __init__(self, in_dim: int, hidden: int, dropout: float):
    super().__init__()
    self.dense = nn.Linear(in_dim, hidden)
    # Upstream's attribute name (state-dict key), hence the capital.
    self.LayerNorm = nn.LayerNorm(hidden, eps=BERT_LN_EPS)  # pylint: disable=invalid-name
    self.dropout = nn.Dropout(dropout)

  def forward(self, hidden_states: Tensor, input_tensor: Tensor) -> Tensor:
    return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)


class BertAttention(nn.Module):

  def __init__(self, c: TapConfig, heads: int):
    super().__init__()
    self.self = BertSelfAttention(c.hidden_size, heads, c.head_dim, c.attention_dropout)
    self.output = BertSelfOutput(heads * c.head_dim, c.hidden_size, c.hidden_dropout)

  def forward(self, x: Tensor, attention_mask: Tensor,
              head_mask: Optional[Tensor] = None) -> Tensor:
    return self.output(self.self(x, attention_mask, head_mask), x)


class BertIntermediate(nn.Module):

  def __init__(self, hidden: int, ffn: int):
    super().__init__()
    self.dense = nn.Linear(hidden, ffn)

  def forward(self, x: Tensor, ffn_mask: Optional[Tensor] = None) -> Tensor:
    u = gelu(self.dense(x))
    return u if ffn_mask is None else u * ffn_mask  # LFPR: [f] neuron multiplier


class BertLayer(nn.Module):
  """Post-LN BERT layer: attention, intermediate, output (dense + LN residual)."""

  def __init__(self, c: TapConfig, heads: int, ffn: int):
    super().__init__()
    self.attention = BertAttention(c, heads)
    self.intermediate = BertIntermediate(c.hidden_size, ffn)
    self.output = BertSelfOutput(ffn, c.hidden_size, c.hidden_dropout)

  def forward(self, x: Tensor, attention_mask: Tensor,
              head_mask: Optional[Tensor] = None, ffn_mask: Optional[Tensor] = None
              ) -> Tensor:
    a = self.attention(x, attention_mask, head_mask)
    return self.output(self.intermediate(a, ffn_mask), a)


class BertEncoder(nn.Module):

  def __init__(self, c: TapConfig, shapes: Sequence[tuple[int, int]]):
    super().__init__()
    self.layer = nn.ModuleList([BertLayer(c, h, f) for h, f in shapes])

  def forward(self, x: Tensor, attention_mask: Tensor,
              head_mask: Optional[Tensor] = None, ffn_mask: Optional[Tensor] = None
              ) -> Tensor:
    """`head_mask` `[L, h]` / `ffn_mask` `[L, f]`: LFPR's per-layer masks (None: off)."""
    for i, layer in enumerate(self.layer):
      x = layer(x, attention_mask, None if head_mask is None else head_mask[i],
                None if ffn_mask is None else ffn_mask[i])
    return x


class BertEmbeddings(nn.Module):
  """Word (padding_idx 0, as pytorch_transformers 1.2) + position + token type, LN."""

  def __init__(self, c: TapConfig):
    super().__init__()
    self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=0)
    self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
    self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
    self.LayerNorm = nn.LayerNorm(  # pylint: disable=invalid-name
        c.hidden_size, eps=BERT_LN_EPS)
    self.dropout = nn.Dropout(c.hidden_dropout)

  def forward(self, input_ids: Tensor, token_type_ids: Tensor) -> Tensor:
    position_ids = torch.arange(input_ids.size(1), dtype=torch.long,
                                device=input_ids.device)
    position_ids = position_ids.unsqueeze(0).expand_as(input_ids)
    e = (self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
         + self.token_type_embeddings(token_type_ids))
    return self.dropout(self.LayerNorm(e))


# TAP modules (pythia/models/tap.py) -------------------------------------------------

class TextBert(nn.Module):

  def __init__(self, c: TapConfig):
    super().__init__()
    self.embeddings = BertEmbeddings(c)
    self.encoder = BertEncoder(c, [(c.text_heads, c.text_ffn)] * c.text_bert_layers)

  def forward(self, txt_inds: Tensor, txt_mask: Tensor, txt_type_mask: Tensor
              ) -> Tensor:
    x = self.embeddings(txt_inds, token_type_ids=txt_type_mask)
    ext = (1.0 - txt_mask.unsqueeze(1).unsqueeze(2)) * MASK_VALUE
    return self.encoder(x, ext)


class PrevPredEmbeddings(nn.Module):

  def __init__(self, c: TapConfig):
    super().__init__()
    self.position_embeddings = nn.Embedding(c.prev_pred_positions, c.hidden_size)
    self.token_type_embeddings = nn.Embedding(c.prev_pred_types, c.hidden_size)
    self.ans_layer_norm = nn.LayerNorm(c.hidden_size, eps=BERT_LN_EPS)
    self.ocr_layer_norm = nn.LayerNorm(c.hidden_size, eps=BERT_LN_EPS)
    self.emb_layer_norm = nn.LayerNorm(c.hidden_size, eps=BERT_LN_EPS)
    self.emb_dropout = nn.Dropout(c.hidden_dropout)

  def forward(self, ans_emb: Tensor, ocr_emb: Tensor, prev_inds: Tensor) -> Tensor:
    batch_size, seq_length = prev_inds.shape
    ans_num = ans_emb.size(0)
    ans_emb = self.ans_layer_norm(ans_emb)
    ocr_emb = self.ocr_layer_norm(ocr_emb)
    ans_emb = ans_emb.unsqueeze(0).expand(batch_size, -1, -1)
    raw_dec_emb = _batch_gather(torch.cat([ans_emb, ocr_emb], dim=1), prev_inds)
    position_ids = torch.arange(seq_length, dtype=torch.long, device=ocr_emb.device)
    position_ids = position_ids.unsqueeze(0).expand(batch_size, seq_length)
    token_type_ids = prev_inds.ge(ans_num).long()
    e = self.position_embeddings(position_ids) + self.token_type_embeddings(
        token_type_ids)
    return raw_dec_emb + self.emb_dropout(self.emb_layer_norm(e))


def _batch_gather(x: Tensor, inds: Tensor) -> Tensor:
  batch_size, length, dim = x.shape
  x_flat = x.reshape(batch_size * length, dim)
  offsets = (torch.arange(batch_size, device=inds.device) * length).unsqueeze(-1)
  return F.embedding(offsets + inds, x_flat)


def _causal_mask(n: int) -> Tensor:
  return torch.tril(torch.ones(n, n))


class MMT(nn.Module):

  def __init__(self, c: TapConfig):
    super().__init__()
    self.prev_pred_embeddings = PrevPredEmbeddings(c)
    self.encoder = BertEncoder(c, list(zip(c.mmt_heads, c.mmt_ffn)))

  def forward(self, txt_emb: Tensor, txt_mask: Tensor, obj_emb: Tensor,
              obj_mask: Tensor, ocr_emb: Tensor, ocr_mask: Tensor,
              fixed_ans_emb: Tensor, prev_inds: Tensor,
              head_mask: Optional[Tensor] = None, ffn_mask: Optional[Tensor] = None
              ) -> dict[str, Tensor]:
    dec_emb = self.prev_pred_embeddings(fixed_ans_emb, ocr_emb, prev_inds)
    dec_mask = torch.zeros(dec_emb.size(0), dec_emb.size(1), dtype=torch.float32)
    x = torch.cat([txt_emb, obj_emb, ocr_emb, dec_emb], dim=1)
    mask = torch.cat([txt_mask, obj_mask, ocr_mask, dec_mask], dim=1)
    n_dec = dec_mask.size(-1)
    n = mask.size(1)
    ext = mask.unsqueeze(1).unsqueeze(2).repeat(1, 1, n, 1)
    ext[:, :, -n_dec:, -n_dec:] = _causal_mask(n_dec)
    ext = (1.0 - ext) * MASK_VALUE
    out = self.encoder(x, ext, head_mask, ffn_mask)
    ocr_begin = txt_mask.size(-1) + obj_mask.size(-1)
    return {"mmt_ocr_output": out[:, ocr_begin:ocr_begin + ocr_mask.size(-1)],
            "mmt_dec_output": out[:, -n_dec:]}


class OcrPtrNet(nn.Module):

  def __init__(self, hidden: int, query_key_size: int):
    super().__init__()
    self.query_key_size = query_key_size
    self.query = nn.Linear(hidden, query_key_size)
    self.key = nn.Linear(hidden, query_key_size)

  def forward(self, query_inputs: Tensor, key_inputs: Tensor, attention_mask: Tensor
              ) -> Tensor:
    ext = ((1.0 - attention_mask) * MASK_VALUE).unsqueeze(1)
    scores = torch.matmul(self.query(query_inputs),
                          self.key(key_inputs).transpose(-1, -2))
    return scores / math.sqrt(self.query_key_size) + ext


class FasterRcnnFc7(nn.Module):
  """`finetune_faster_rcnn_fpn_fc7`: relu(lc(x))."""

  def __init__(self, dim: int):
    super().__init__()
    self.lc = nn.Linear(dim, dim)

  def forward(self, x: Tensor) -> Tensor:
    return F.relu(self.lc(x))


class ImageEncoder(nn.Module):
  """pythia's wrapper (state-dict prefix `.module.`)."""

  def __init__(self, dim: int):
    super().__init__()
    self.module = FasterRcnnFc7(dim)

  def forward(self, x: Tensor) -> Tensor:
    return self.module(x)


class ClassifierLayer(nn.Module):
  """pythia's `ClassifierLayer('linear')` (state-dict prefix `.module.`)."""

  def __init__(self, in_dim: int, out_dim: int):
    super().__init__()
    self.module = nn.Linear(in_dim, out_dim)

  def forward(self, x: Tensor) -> Tensor:
    return self.module(x)


class TorchTAP(nn.Module):
  """`m4c_split` without its pretraining heads; state-dict names as upstream."""

  def __init__(self, c: TapConfig):
    super().__init__()
    if c.fc7_dim != c.obj_feat_dim or c.fc7_dim != c.ocr_feat_dim:
      raise ValueError("the upstream fc7 layers are square (2048 -> 2048).")
    self.config = c
    d = c.hidden_size
    self.text_bert = TextBert(c)
    self.text_bert_out_linear = nn.Identity()
    self.obj_faster_rcnn_fc7 = ImageEncoder(c.fc7_dim)
    self.linear_obj_feat_to_mmt_in = nn.Linear(c.fc7_dim, d)
    self.linear_obj_bbox_to_mmt_in = nn.Linear(4, d)
    # BertLayerNorm(hidden) without eps: the torch default 1e-5 (docs/TAP.md §4.3).
    self.obj_feat_layer_norm = nn.LayerNorm(d)
    self.obj_bbox_layer_norm = nn.LayerNorm(d)
    self.obj_drop = nn.Dropout(c.obj_dropout)
    self.ocr_faster_rcnn_fc7 = ImageEncoder(c.fc7_dim)
    self.linear_ocr_feat_to_mmt_in = nn.Linear(c.ocr_in_dim, d)
    self.linear_ocr_bbox_to_mmt_in = nn.Linear(4, d)
    self.ocr_feat_layer_norm = nn.LayerNorm(d)
    self.ocr_bbox_layer_norm = nn.LayerNorm(d)
    self.ocr_drop = nn.Dropout(c.ocr_dropout)
    self.mmt = MMT(c)
    self.ocr_ptr_net = OcrPtrNet(d, c.ptr_query_key_size)
    self.classifier = ClassifierLayer(d, c.num_answers)

  # The _forward_* methods of upstream `M4C`.
  def _encode_inputs(self, s: Mapping[str, Tensor]) -> dict[str, Tensor]:
    c = self.config
    txt = s["cmb_text"]
    fwd = {"txt_inds": txt, "txt_mask": (txt != 0).float()}
    type_mask = torch.ones(txt.shape)
    type_mask[:, :c.question_len] = 0
    fwd["txt_type_mask"] = type_mask.long()

    obj_fc6 = s["image_feature_0"][:, :s["obj_bbox_coordinates"].size(1), :]
    obj_fc7 = F.normalize(self.obj_faster_rcnn_fc7(obj_fc6), dim=-1)
    obj = (self.obj_feat_layer_norm(self.linear_obj_feat_to_mmt_in(obj_fc7))
           + self.obj_bbox_layer_norm(
               self.linear_obj_bbox_to_mmt_in(s["obj_bbox_coordinates"])))
    fwd["obj_mmt_in"] = self.obj_drop(obj)
    fwd["obj_mask"] = _get_mask(s["obj_num"], obj.size(1))

    ft = F.normalize(s["context_feature_0"], dim=-1)
    ph = F.normalize(s["context_feature_1"], dim=-1)
    ocr_fc6 = s["image_feature_1"][:, :ft.size(1), :]
    ocr_fc7 = F.normalize(self.ocr_faster_rcnn_fc7(ocr_fc6), dim=-1)
    order = torch.zeros(ft.shape[:-1] + (c.order_dim,))
    feat = torch.cat([ft, ph, ocr_fc7, order], dim=-1)
    ocr = (self.ocr_feat_layer_norm(self.linear_ocr_feat_to_mmt_in(feat))
           + self.ocr_bbox_layer_norm(
               self.linear_ocr_bbox_to_mmt_in(s["ocr_bbox_coordinates"])))
    fwd["ocr_mmt_in"] = self.ocr_drop(ocr)
    fwd["ocr_mask"] = _get_mask(s["ocr_num"], ocr.size(1))
    return fwd

  def _forward_mmt_and_output(self, fwd: dict[str, Tensor], prev_inds: Tensor,
                              head_mask: Optional[Tensor] = None,
                              ffn_mask: Optional[Tensor] = None) -> Tensor:
    txt_emb = self.text_bert_out_linear(
        self.text_bert(fwd["txt_inds"], fwd["txt_mask"], fwd["txt_type_mask"]))
    out = self.mmt(txt_emb, fwd["txt_mask"], fwd["obj_mmt_in"], fwd["obj_mask"],
                   fwd["ocr_mmt_in"], fwd["ocr_mask"], self.classifier.module.weight,
                   prev_inds, head_mask, ffn_mask)
    fixed = self.classifier(out["mmt_dec_output"])
    ocr = self.ocr_ptr_net(out["mmt_dec_output"], out["mmt_ocr_output"],
                           fwd["ocr_mask"])
    return torch.cat([fixed, ocr], dim=-1)

  def teacher_forced(self, s: Mapping[str, Tensor]) -> Tensor:
    """Scores `[B, T, C]` fed `train_prev_inds` (upstream's training branch)."""
    fwd = self._encode_inputs(s)
    return self._forward_mmt_and_output(fwd, s["train_prev_inds"].clone())

  def greedy(self, s: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Upstream's eval branch: T full passes; returns last scores and their inputs."""
    fwd = self._encode_inputs(s)
    prev = torch.zeros_like(s["train_prev_inds"])
    prev[:, 0] = BOS_IDX
    scores, fed = None, prev
    for _ in range(prev.size(1)):
      scores = self._forward_mmt_and_output(fwd, prev)
      fed = prev.clone()
      prev[:, 1:] = scores.argmax(dim=-1)[:, :-1]
    return scores, fed

  def lfpr_score(self, s: Mapping[str, Tensor], head_mask: Tensor, ffn_mask: Tensor,
                 t: int) -> Tensor:
    """Upstream `m4c_lfpr_calc_score` forward: scores `[B, T, C]` of the (t+1)-th pass.

    As `M4CLFPRScore._forward_mmt_and_output`: obj/OCR encoders once, then t + 1 full
    passes of text-BERT + MMT (all 12 decoder positions, masks applied in every
    pass) + heads from `prev = [BOS, 0, ...]`, refilling `prev[:, 1:]` with the
    argmaxes. Autograd is on in every pass (as upstream); the objective's gradient
    reaches the masks through the last pass only (argmax carries none).
    """
    fwd = self._encode_inputs(s)
    prev = torch.zeros_like(s["train_prev_inds"])
    prev[:, 0] = BOS_IDX
    scores = None
    for _ in range(t + 1):
      scores = self._forward_mmt_and_output(fwd, prev, head_mask, ffn_mask)
      prev = prev.clone()
      prev[:, 1:] = scores.argmax(dim=-1)[:, :-1]
    return scores

  def forward(self, s: Mapping[str, Tensor]) -> Tensor:
    """As upstream: teacher forcing in train mode, greedy decoding in eval mode."""
    return self.teacher_forced(s) if self.training else self.greedy(s)[0]


def _get_mask(nums: Tensor, max_num: int) -> Tensor:
  arange = torch.arange(0, max_num).unsqueeze(0).expand(nums.size(0), -1)
  return arange.lt(nums.unsqueeze(-1)).float()


def m4c_decoding_bce(scores: Tensor, targets: Tensor, loss_mask: Tensor) -> Tensor:
  """pythia's `m4c_decoding_bce_with_mask`."""
  losses = F.binary_cross_entropy_with_logits(scores, targets, reduction="none")
  losses = losses * loss_mask.unsqueeze(-1)
  count = torch.max(torch.sum(loss_mask), torch.tensor(1.0))
  return torch.sum(losses) / count


def init_weights(model: nn.Module, generator: torch.Generator) -> None:
  """BertPreTrainedModel.init_weights: N(0, 0.02) weights, zero biases, LN at 1/0."""
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, (nn.Linear, nn.Embedding)):
        m.weight.normal_(0.0, 0.02, generator=generator)
      if isinstance(m, nn.Linear) and m.bias is not None:
        m.bias.zero_()
      if isinstance(m, nn.LayerNorm):
        m.weight.fill_(1.0)
        m.bias.zero_()


def to_torch(batch: Mapping[str, np.ndarray]) -> dict[str, Tensor]:
  """numpy batch -> tensors: int64 ids/counts, float32 features."""
  return {k: torch.from_numpy(np.ascontiguousarray(v)).long()
          if np.issubdtype(v.dtype, np.integer)
          else torch.from_numpy(np.ascontiguousarray(v, np.float32))
          for k, v in batch.items()}


# Golden check -----------------------------------------------------------------------

def check_golden(golden: str) -> bool:
  """Runs the golden TAP / TAP12 weights and batches, compares with upstream outputs.

  Returns:
    True if teacher-forced scores, loss and greedy scores match within float32 noise.
  """
  spec = importlib.util.spec_from_file_location(
      "golden_weights", os.path.join(golden, "weights.py"))
  weights = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(weights)
  manifests = os.path.join(os.path.dirname(os.path.abspath(golden)), "manifests")
  ok = True
  for arch, manifest in (("tap", "tap_textvqa.json"), ("tap12", "tap12_textvqa.json")):
    folder = os.path.join(golden, arch)
    with open(os.path.join(folder, "meta.json")) as f:
      meta = json.load(f)
    sd = weights.state_dict(os.path.join(manifests, manifest), meta["seed"])
    sd = {k: torch.from_numpy(v) for k, v in sd.items()
          if not k.startswith(("cls.", "pollute_cls.", "overlap_cls."))}
    model = TorchTAP(common.make_config(arch))
    model.load_state_dict(sd, strict=True)
    model.eval()
    batch = to_torch(dict(np.load(os.path.join(folder, "batch.npz"))))
    want = np.load(os.path.join(folder, "outputs.npz"))
    with torch.no_grad():
      tf = model.teacher_forced(batch)
      loss = m4c_decoding_bce(tf, batch["targets"], batch["train_loss_mask"])
      greedy, fed = model.greedy(batch)
    valid = np.concatenate(
        [np.ones((tf.shape[0], 1, model.config.num_answers), bool),
         (np.arange(model.config.ocr_max) < batch["ocr_num"].numpy()[:, None]
          )[:, None, :]], -1)
    valid = np.broadcast_to(valid, tf.shape)
    tf_err = float(np.abs(tf.numpy() - want["tf_scores"])[valid].max())
    g_err = float(np.abs(greedy.numpy() - want["greedy_scores"])[valid].max())
    loss_err = abs(float(loss) - float(want["tf_loss"]))
    fed_same = bool((fed.numpy() == want["greedy_prev_inds"]).all())
    good = tf_err < 1e-3 and g_err < 1e-3 and loss_err < 1e-2 and fed_same
    ok &= good
    print(f"{arch}: teacher-forced max|diff| {tf_err:.2e}, greedy {g_err:.2e}, "
          f"loss {float(loss):.4f} (diff {loss_err:.1e}), greedy inputs "
          f"{'equal' if fed_same else 'DIFFER'}: {'OK' if good else 'MISMATCH'}")
    # LFPR scoring (m4c_lfpr_calc_score, dropout 0): objective and mask gradients.
    c = model.config
    for t in (0, 1, 2):
      head_mask = torch.ones(c.mmt_layers, c.mmt_heads[0], requires_grad=True)
      ffn_mask = torch.ones(c.mmt_layers, c.mmt_ffn[0], requires_grad=True)
      scores = model.lfpr_score(batch, head_mask, ffn_mask, t)
      objective = scores[:, t].max(dim=-1).values.sum()
      gh, gf = torch.autograd.grad(objective, [head_mask, ffn_mask])
      errs = [abs(float(objective.detach()) - float(want[f"lfpr_greedy_objective_t{t}"]))]
      for name, g in (("head", gh), ("ffn", gf)):
        ref = want[f"lfpr_greedy_{name}_grad_t{t}"]
        errs.append(float(np.abs(g.numpy() - ref).max() / max(np.abs(ref).max(), 1e-12)))
      good = errs[0] < 1e-3 and max(errs[1:]) < 1e-3
      ok &= good
      print(f"{arch}: LFPR t={t} objective diff {errs[0]:.1e}, mask gradients max rel "
            f"diff head {errs[1]:.1e} ffn {errs[2]:.1e}: {'OK' if good else 'MISMATCH'}")
  return ok


# LFPR scoring (upstream's path), for benchmarks.lfpr_cpu / lfpr_gpu -----------------

LFPR_MODES = {
    "": "upstream: loss.backward() with every parameter requiring grad (as "
        "base_trainer_lfpr_calc_score: parameter gradients are computed too)",
    "_masks_only": "torch.autograd.grad to the two masks only (a lower bound upstream "
                   "does not use)",
    "_anomaly": "upstream as run: backward() inside torch.autograd.set_detect_anomaly"
                "(True), which base_trainer_lfpr_calc_score switches on",
}


class LfprScorer:
  """Upstream LFPR scoring of one batch: (t+1) greedy passes + backward to the masks.

  Model in train mode with every dropout probability 0 (deterministic, like the
  golden runs), masks `[L, 12]` / `[L, 3072]` at ones as fresh leaf tensors per call.
  Stages are named `lfpr_score_t{t}{mode}` with mode one of `LFPR_MODES`.
  """

  def __init__(self, arch: str, seed: int, max_batch: int, device: str = "cpu"):
    import dataclasses  # pylint: disable=import-outside-toplevel
    config = dataclasses.replace(common.make_config(arch), hidden_dropout=0.0,
                                 attention_dropout=0.0, obj_dropout=0.0,
                                 ocr_dropout=0.0)
    self.config, self.device = config, torch.device(device)
    if self.device.type != "cpu":
      # The upstream code allocates helper tensors without a device (as here).
      torch.set_default_device(self.device)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.device("cpu"):
      model = TorchTAP(config)
      init_weights(model, gen)
    self.model = model.to(self.device).train()
    # The same batch as the JAX side: common.random_batch on the first spawned rng.
    batch_rng = np.random.default_rng(seed).spawn(2)[0]
    self.full = {k: v.to(self.device) for k, v in
                 to_torch(common.random_batch(batch_rng, config, max_batch)).items()}
    self.num_params = sum(p.numel() for p in self.model.parameters())

  def batch(self, size: int) -> dict[str, Tensor]:
    n = next(iter(self.full.values())).shape[0]
    if size <= n:
      return {k: v[:size] for k, v in self.full.items()}
    reps = -(-size // n)
    return {k: torch.cat([v] * reps)[:size] for k, v in self.full.items()}

  def _sync(self) -> None:
    if self.device.type == "cuda":
      torch.cuda.synchronize()

  def run(self, stage: str, batch: Mapping[str, Tensor]) -> dict[str, Any]:
    """One timed call; returns seconds and the objective."""
    rest = stage[len("lfpr_score_t"):]
    t = int(rest.split("_", 1)[0])
    mode = rest[len(str(t)):]
    if not stage.startswith("lfpr_score_t") or mode not in LFPR_MODES:
      raise ValueError(f"unknown LFPR stage {stage!r}")
    c = self.config
    self._sync()
    t0 = time.perf_counter()
    self.model.zero_grad(set_to_none=True)
    head_mask = torch.ones(c.mmt_layers, c.mmt_heads[0], device=self.device,
                           requires_grad=True)
    ffn_mask = torch.ones(c.mmt_layers, c.mmt_ffn[0], device=self.device,
                          requires_grad=True)
    torch.manual_seed(0)  # upstream re-seeds at every forward call
    with torch.autograd.set_detect_anomaly(mode == "_anomaly"):
      scores = self.model.lfpr_score(batch, head_mask, ffn_mask, t)
      objective = scores[:, t].max(dim=-1).values.sum()
      if mode == "_masks_only":
        gh, gf = torch.autograd.grad(objective, [head_mask, ffn_mask])
      else:
        objective.backward()
        gh, gf = head_mask.grad, ffn_mask.grad
    gh, gf = gh.detach().cpu(), gf.detach().cpu()
    self._sync()
    seconds = time.perf_counter() - t0
    self.model.zero_grad(set_to_none=True)
    return {"seconds": seconds, "objective": float(objective.detach()),
            "head_grad_norm": float(gh.norm()), "ffn_grad_norm": float(gf.norm())}


def lfpr_worker() -> None:
  """JSON-lines server on stdin/stdout, driven by benchmarks.lfpr_cpu / lfpr_gpu.

  Requests: `{"op": "init", "arch", "seed", "threads", "max_batch", "device"}`,
  `{"op": "run", "stage", "batch"}`, `{"op": "quit"}`. Every reply is one JSON line
  (`{"ok": true, ...}` or `{"ok": false, "error": ...}`); logs go to stderr.
  """
  import resource  # pylint: disable=import-outside-toplevel
  scorer = None
  batches: dict[int, Any] = {}
  for line in sys.stdin:
    if not line.strip():
      continue
    req = json.loads(line)
    try:
      op = req["op"]
      if op == "quit":
        break
      if op == "init":
        torch.set_num_threads(int(req.get("threads", 2)))
        scorer = LfprScorer(req["arch"], int(req["seed"]), int(req["max_batch"]),
                            req.get("device", "cpu"))
        reply = {"versions": {"torch": torch.__version__, "numpy": np.__version__},
                 "torch_threads": torch.get_num_threads(),
                 "torch_interop_threads": torch.get_num_interop_threads(),
                 "device": str(scorer.device),
                 "device_name": (torch.cuda.get_device_name(scorer.device)
                                 if scorer.device.type == "cuda" else None),
                 "num_params": scorer.num_params,
                 "modes": {f"lfpr_score_t*{k}": v for k, v in LFPR_MODES.items()}}
      elif op == "run":
        size = int(req["batch"])
        if size not in batches:
          batches[size] = scorer.batch(size)
        reply = scorer.run(req["stage"], batches[size])
      else:
        raise ValueError(f"unknown op {op!r}")
      reply["ok"] = True
    except Exception as e:  # pylint: disable=broad-except  # reported to the driver
      reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    reply["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    if scorer is not None and scorer.device.type == "cuda":
      reply["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    sys.stdout.write(json.dumps(reply) + "\n")
    sys.stdout.flush()


# Benchmark --------------------------------------------------------------------------

def run_stage(stage: str, model: Optional[TorchTAP], batch: Mapping[str, Tensor],
              gen: torch.Generator, matmul_rng: np.random.Generator,
              args: argparse.Namespace) -> dict[str, Any]:
  """Warms up and times one stage; returns its JSON record (model None: matmuls)."""
  c, n = common.make_config(args.arch), args.repeats

  def record(first, times, notes=""):
    return common.stage_record(stage, DESCRIPTIONS[stage], c, args.batch, first,
                               times, notes=notes)

  if stage == "forward":
    model.eval()

    def fwd():
      with torch.no_grad():
        model.teacher_forced(batch)
    first, times = common.time_calls(stage, fwd, n)
    return record(first, times)

  if stage in ("train_step", "train_step_dropout"):
    model.train(stage == "train_step_dropout")

    def step():
      model.zero_grad(set_to_none=True)
      scores = model.teacher_forced(batch)
      m4c_decoding_bce(scores, batch["targets"], batch["train_loss_mask"]).backward()
    first, times = common.time_calls(stage, step, n)
    model.zero_grad(set_to_none=True)
    model.eval()
    return record(first, times, "zero_grad(set_to_none) + forward + loss + backward; "
                  "no optimizer update; GFLOP counted as 3 x forward")

  if stage == "greedy_reference":
    model.eval()

    def greedy():
      with torch.no_grad():
        model.greedy(batch)
    first, times = common.time_calls(stage, greedy, n)
    return record(first, times, "GFLOP counted as upstream's loop (obj/OCR encoders "
                  "once, 12 x text-BERT + MMT + heads)")

  if stage == "matmul_torch":
    shape = (common.MATMUL_N, common.MATMUL_N)
    a = torch.randn(shape, generator=gen)
    b = torch.randn(shape, generator=gen)
    first, times = common.time_calls(stage, lambda: a @ b, n)
    return record(first, times)

  if stage == "matmul_numpy":
    shape = (common.MATMUL_N, common.MATMUL_N)
    a = matmul_rng.standard_normal(shape, np.float32)
    b = matmul_rng.standard_normal(shape, np.float32)
    first, times = common.time_calls(stage, lambda: a @ b, n)
    return record(first, times, f"numpy {np.__version__} BLAS")

  raise ValueError(f"unknown stage {stage!r}")


def run_in_subprocess(stage: str, args: argparse.Namespace) -> dict[str, Any]:
  """Runs one stage in a fresh interpreter; returns its record (or an error record)."""
  with tempfile.TemporaryDirectory(prefix="torch_ref_") as tmp:
    out = os.path.join(tmp, "stage.json")
    cmd = [sys.executable, "-m", "benchmarks.torch_reference", "--arch", args.arch,
           "--batch", str(args.batch), "--repeats", str(args.repeats),
           "--seed", str(args.seed), "--threads", str(args.threads),
           "--stages", stage, "--out", out, "--quiet"]
    common.log(f"[{stage}] fresh subprocess: {' '.join(cmd[1:])}")
    proc = subprocess.run(cmd, check=False)
    if proc.returncode != 0 or not os.path.exists(out):
      return {"status": "error", "description": DESCRIPTIONS[stage],
              "error": f"subprocess exited with {proc.returncode}"}
    with open(out) as f:
      rec = json.load(f)["stages"][stage]
  rec["isolated"] = True
  return rec


def parse_args(argv: Optional[Sequence[str]] = None
               ) -> tuple[argparse.Namespace, list[str]]:
  p = common.base_parser(__doc__.split("\n", 1)[0],
                         "benchmarks/results/torch_reference.json", STAGES)
  p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
  p.add_argument("--isolate", action="store_true",
                 help="run every stage in a fresh subprocess (per-stage peak RSS)")
  p.add_argument("--lfpr-worker", action="store_true",
                 help="serve LFPR scoring timings over stdin/stdout (JSON lines) for "
                      "benchmarks.lfpr_cpu / lfpr_gpu, then exit")
  p.add_argument("--check-golden", metavar="DIR", default=None,
                 help="instead of timing, compare with the upstream golden outputs "
                      "in DIR (../shared/golden) and exit 0 (match) or 1")
  args = p.parse_args(argv)
  if args.threads < 1:
    p.error(f"--threads must be >= 1, got {args.threads}.")
  return args, common.validate_args(p, args, STAGES)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  args, stages = parse_args(argv)
  if args.lfpr_worker:
    lfpr_worker()
    raise SystemExit(0)
  torch.set_num_threads(args.threads)
  if args.check_golden is not None:
    raise SystemExit(0 if check_golden(args.check_golden) else 1)
  config = common.make_config(args.arch)
  machine = common.machine_info(
      {"torch": torch.__version__, "numpy": np.__version__},
      {"torch_threads": torch.get_num_threads(),
       "torch_interop_threads": torch.get_num_interop_threads(),
       "torch_mkldnn": bool(torch.backends.mkldnn.is_available())})

  # Seeds are used once here: the generators below are passed down explicitly. Dropout
  # masks come from torch's default generator, seeded here once.
  torch.manual_seed(args.seed)
  gen = torch.Generator().manual_seed(args.seed)
  # Both benchmarks split the numpy generator the same way: identical batches.
  batch_rng, matmul_rng = np.random.default_rng(args.seed).spawn(2)

  with torch.device("meta"):  # shapes only, no memory
    num_params = sum(p.numel() for p in TorchTAP(config).parameters())
  model = None  # not needed in this process (keeps the RSS figures clean)
  if not args.isolate and not all(s.startswith("matmul_") for s in stages):
    model = TorchTAP(config)
    init_weights(model, gen)
  batch = to_torch(common.random_batch(batch_rng, config, args.batch))

  result = common.result_skeleton("torch", args, stages, config, num_params, machine,
                                  module="benchmarks.torch_reference", argv=argv)
  result["stages"] = {}
  t_start = time.perf_counter()
  for i, stage in enumerate(stages):
    common.log(f"=== stage {i + 1}/{len(stages)}: {stage} "
               f"(elapsed {common.fmt_s(time.perf_counter() - t_start)})")
    if args.isolate:
      rec = run_in_subprocess(stage, args)
    else:
      try:
        rec = run_stage(stage, model, batch, gen, matmul_rng, args)
      except Exception as e:  # pylint: disable=broad-except  # keep other stages
        common.log(f"[{stage}] FAILED: {type(e).__name__}: {e}")
        rec = {"status": "error", "description": DESCRIPTIONS[stage],
               "error": f"{type(e).__name__}: {e}"}
      rec["isolated"] = False
    result["stages"][stage] = rec
  result["total_wall_s"] = time.perf_counter() - t_start
  ok = [r["peak_rss_mb"] for r in result["stages"].values() if "peak_rss_mb" in r]
  result["peak_rss_mb"] = max(ok + [common.peak_rss_mb()])
  result["ratios"] = common.ratios(result["stages"], args.arch, args.batch,
                                   machine["cpu_model"])
  common.write_json(args.out, result)
  if not args.quiet:
    print(common.format_table(result))
    print(f"wrote {args.out}")
  return result


if __name__ == "__main__":
  main()
