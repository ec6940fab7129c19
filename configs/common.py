"""Upstream's adaptive ReSt schedules as data (docs/LFPR.md §6.7) and config defaults.

Each schedule maps a pruning target to (retraining subset %, trainable trailing MMT
layers k): a constraint c for the "sum" heuristic, a percentile p for "thre". The
smaller the kept fraction, the more data and layers are retrained.
"""

from __future__ import annotations

import ml_collections

Schedule = tuple[tuple[float, float, int], ...]

# (constraint, retrain %, k) - LFPR: scripts/tap_pruning/*/prune_*.sh
SUM: dict[tuple[str, str], Schedule] = {
    ("tap", "textvqa"): ((0.2, 100, 3), (0.3, 86, 2), (0.4, 73, 2), (0.5, 60, 1),
                         (0.6, 10, 0), (0.7, 10, 0), (0.8, 10, 0), (0.9, 10, 0)),
    ("tap", "stvqa"): ((0.3, 100, 3), (0.4, 90, 3), (0.5, 80, 2), (0.6, 70, 2),
                       (0.7, 60, 1), (0.8, 10, 0), (0.9, 10, 0)),
    ("tap12", "textvqa"): ((0.2, 100, 9), (0.3, 80, 6), (0.4, 60, 3), (0.5, 10, 0),
                           (0.6, 10, 0), (0.7, 10, 0), (0.8, 10, 0), (0.9, 10, 0)),
    ("tap12", "stvqa"): ((0.3, 100, 9), (0.4, 60, 3), (0.5, 10, 0), (0.6, 10, 0),
                         (0.7, 10, 0), (0.8, 10, 0), (0.9, 10, 0)),
}
# (percentile, retrain %, k)
THRE: dict[tuple[str, str], Schedule] = {
    ("tap", "textvqa"): ((10, 10, 0), (30, 10, 0), (50, 60, 1), (70, 80, 2),
                         (90, 100, 3)),
    ("tap", "stvqa"): ((10, 10, 0), (30, 10, 0), (50, 10, 0), (70, 73, 2),
                       (90, 100, 3)),
    ("tap12", "textvqa"): ((10, 10, 0), (30, 10, 0), (50, 10, 0), (70, 60, 3),
                           (90, 100, 9)),
    ("tap12", "stvqa"): ((10, 10, 0), (30, 10, 0), (50, 10, 0), (70, 10, 0),
                         (90, 100, 9)),
}


def prune_section(**overrides) -> ml_collections.ConfigDict:
  """`config.prune`: scoring and selection (upstream defaults, docs/LFPR.md §2-4)."""
  section = ml_collections.ConfigDict(dict(
      heuristic="sum",           # "sum" (constraints) or "thre" (percentiles)
      constraints=(0.4,),        # kept fraction of the MMT encoder parameters
      percentiles=(50,),         # for "thre"
      strict_budget=False,       # cap the head count so heads alone fit the budget
      num_samples=3000,          # scoring questions drawn from the training split
      sample_seed=0,
      batch_size=8,              # scoring batch per step (a multiple of group_size)
      group_size=8,              # upstream's scoring batch: per-batch squares
      per_sample=False,          # select on sum_i g_i^2 instead of sum_b G_b^2
      dropout=False,             # faithful: dropout on while scoring
      tstar_batch_search=False,  # faithful quirk: first hit over the whole batch
      t_star=-1,                 # >= 0: skip the search and use this step
      cost="params",             # the budget's unit: "params", "flops" or "latency"
      latency_batch=1,           # "latency": the batch the device table is timed at
      round_to=0,                # FFN widths kept at multiples of this (0: any)
  ))
  section.update(overrides)
  return section


def speed_section(**overrides) -> ml_collections.ConfigDict:
  """`config.speed`: measured greedy decoding of every model in the results table."""
  section = ml_collections.ConfigDict(dict(
      batch_sizes=(1, 32),       # latency at the first, throughput at the second
      repeats=5,                 # timed calls per figure (median)
  ))
  section.update(overrides)
  return section


def rest_section(model: str, dataset: str, **overrides) -> ml_collections.ConfigDict:
  """`config.rest`: ReSt retraining (docs/LFPR.md §6) with the schedule of (model, dataset)."""
  section = ml_collections.ConfigDict(dict(
      schedule=SUM[(model, dataset)], thre_schedule=THRE[(model, dataset)],
      lr=5e-5, mask_lr=1e-3, clip_norm=0.25, batch_size=16,
      loss_shards=1,             # faithful: 2 (two GPUs of 8, losses averaged)
      fixed_dropout_key=False,   # faithful: True (torch re-seeded every forward)
      # Gradient accumulation over this many micro-batches per step (a divisor of
      # batch_size): less activation memory; the same step with dropout off, other
      # dropout masks (same distribution) with dropout on.
      microbatches=1,
      seed=0, subset_seed=0, ckpt_every=100,
  ))
  section.update(overrides)
  return section


# Matmul precision of every stage after the base model (scoring, t*, pseudo-labels,
# evaluation, ReSt, speed): "float32" (upstream numerics) or "bfloat16" (bfloat16
# inputs, float32 accumulation; `TapConfig.compute_dtype`). Saved models are float32.
COMPUTE_DTYPE = "float32"

MODEL_FIELDS = {
    # Region feature widths of the release (Faster R-CNN fc6, 2048): settable for a
    # release with other features (e.g. --config.model.obj_feat_dim=1024).
    "tap": dict(arch="tap", text_bert_layers=3, mmt_heads=(12,) * 4,
                mmt_ffn=(3072,) * 4, obj_feat_dim=2048, ocr_feat_dim=2048),
    "tap12": dict(arch="tap12", text_bert_layers=0, mmt_heads=(12,) * 12,
                  mmt_ffn=(3072,) * 12, obj_feat_dim=2048, ocr_feat_dim=2048),
}


def real_data_config(model: str, dataset: str, arg: str | None = None
                     ) -> ml_collections.ConfigDict:
  """The LFPR run of upstream's `prune_<model>_<dataset>.sh` on the real data.

  Args:
    model: "tap" or "tap12".
    dataset: "textvqa" or "stvqa".
    arg: config-file argument: "" (the constraint grid of the upstream script), a
      constraint like "0.4", or "thre" (the percentile grid).
  """
  if (model, dataset) not in SUM:
    raise ValueError(f"no upstream schedule for {model} on {dataset}.")
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.data = ml_collections.ConfigDict(dict(
      dataset=dataset,
      # The TAP data release root (required): one root holds TextVQA and ST-VQA.
      root="",
      # bert-base-uncased vocab.txt and fastText wiki.en.bin are not in the release;
      # default <root>/bert-base-uncased/vocab.txt, <root>/.vector_cache/wiki.en.bin
      # (relative paths are relative to root).
      bert_vocab="",
      fasttext_model="",
      # ArrayRecord build; default <root>/lfpr_jax_built/<dataset>, shared by every
      # workdir and by TAP and TAP12 (python -m lfpr_jax.data.tfds_builder writes it).
      built_dir="",
      splits=("train", "val")))
  # Shapes of the converted checkpoint (python -m converters.torch_to_flax).
  config.model = ml_collections.ConfigDict(MODEL_FIELDS[model])
  config.base_model = ""  # the converted fine-tuned checkpoint directory (required)
  constraints = tuple(c for c, _, _ in SUM[(model, dataset)])
  config.prune = prune_section(constraints=constraints,
                               percentiles=tuple(p for p, _, _ in THRE[(model, dataset)]))
  if arg == "thre":
    config.prune.heuristic = "thre"
  elif arg:
    config.prune.constraints = (float(arg),)
  config.rest = rest_section(model, dataset)
  config.eval = ml_collections.ConfigDict(dict(batch_size=32))
  config.speed = speed_section()
  # Exact variable-length execution (lfpr_jax.models.trim): evaluation, pseudo-labels
  # and t* (length-sorted), importance scoring and ReSt (upstream's batch composition);
  # the padded model's results up to float summation order (ReSt's dropout masks are
  # drawn for the trimmed shapes: the same distribution, other masks).
  config.trim = True
  config.compute_dtype = COMPUTE_DTYPE
  config.progress = True
  return config
