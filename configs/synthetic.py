r"""The embedded synthetic Text-VQA benchmark with a reduced TAP (1.17M parameters).

    python -m lfpr_jax.main --config=configs/synthetic.py --workdir=/tmp/lfpr_synthetic

Generates the dataset, trains the base model for 2,750 steps, prunes 60% of the MMT
with LFPR and retrains with ReSt. Expected (dataset seeds 0-6): base model 78-85% val
accuracy, 94-99% of it retained at c = 0.4; under 12 minutes even on one CPU core.
`:tiny` is the 1-minute CI smoke variant. Seed check: results/synthetic/SEEDS.md; run
history and the tuning runs: results/synthetic/HISTORY.md.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.data = ml_collections.ConfigDict()
  config.data.dataset = "synthetic"
  config.data.root = ""        # default: <workdir>/data/synthetic
  config.data.built_dir = ""   # default: <workdir>/tfds
  config.data.splits = ("train", "val")
  # ocr_context_signal 2 (SyntheticSpec's default is 1): the host object's class shows
  # more strongly in the features of text written on it; with 1, the base model of
  # some dataset seeds had not learned `ocr_on_object` / `ocr_position` by the last
  # step (seed 3: 52% val accuracy). results/synthetic/SEEDS.md has the seed check.
  config.data.synthetic = ml_collections.ConfigDict(dict(
      seed=0, num_train=6000, num_val=1000, num_test=1000, ocr_context_signal=2.0))

  # TapConfig fields; data-dependent sizes (answer and BERT vocabularies, feature
  # widths, object/OCR slots) come from the generated dataset.
  config.model = ml_collections.ConfigDict(dict(
      arch="synthetic", text_bert_layers=0, mmt_heads=(2, 2, 2, 2),
      mmt_ffn=(512, 512, 512, 512), hidden_size=128, head_dim=64, text_heads=2,
      text_ffn=512, question_len=12, ocr_text_len=22, text_len=46, decode_steps=4,
      fc7_dim=128, ptr_query_key_size=128, max_position_embeddings=64,
      # No dropout (TAP's is 0.1): in 2,750 steps it slowed learning; seed 3's base
      # model: 52.1% with both old settings, 66.9% with signal 2, 71.6% without
      # dropout, 80.2% with both changes. LFPR's train-mode scoring is then
      # deterministic on this benchmark.
      hidden_dropout=0.0, attention_dropout=0.0, obj_dropout=0.0, ocr_dropout=0.0))

  config.optim = ml_collections.ConfigDict(dict(
      lr=1e-3, warmup_steps=100, warmup_factor=0.2, decay_steps=(1800,),
      decay_ratio=0.3, clip_norm=0.25))

  config.train = ml_collections.ConfigDict(dict(
      batch_size=32, num_steps=2750, max_minutes=0.0, log_every=20, eval_every=1000,
      eval_limit=300,
      # Gradient accumulation over this many micro-batches per step (a divisor of
      # batch_size): less activation memory, the same step with dropout off.
      microbatches=1))

  # LFPR (issue 5): score, prune to 40% of the MMT, ReSt with TAP/TextVQA's schedule.
  config.base_model = ""       # empty: <workdir>/base_model, trained when missing
  config.prune = common.prune_section(constraints=(0.4,), num_samples=1024,
                                         batch_size=32)
  # ReSt at the base model's peak learning rate, upstream's (percent, k) schedule
  # except at c = 0.4: all of the training data instead of 73% (k = 2 as upstream).
  # Upstream's 5e-5 (set for a pre-trained TAP) barely moves this from-scratch model in
  # 274 steps (retention 92.7% on dataset seed 2); the rate was chosen on seeds 0-3
  # (seed 1: 94.7% at 5e-4, 95.3% at 1e-3, 93.5% at 2e-3). At 73% the held-out seed 6
  # kept 93.7%; with 100% (375 steps) every seed 0-6 keeps >= 95.6% and the held-out
  # seeds 7 and 8 97.7% / 95.3%, while k = 4 instead broke seed 5 (92.6%):
  # results/synthetic/SEEDS.md and HISTORY.md.
  schedule = tuple((c, 100, k) if c == 0.4 else (c, pct, k)
                   for c, pct, k in common.SUM[("tap", "textvqa")])
  config.rest = common.rest_section("tap", "textvqa", ckpt_every=200, lr=1e-3,
                                    schedule=schedule)
  config.eval = ml_collections.ConfigDict(dict(batch_size=64))
  config.speed = common.speed_section()
  # Exact variable-length execution (lfpr_jax.models.trim: evaluation, pseudo-labels,
  # t*, scoring, base-model training and ReSt) is off for this 1.17M-parameter model: its
  # padded batches are cheap and every trimmed shape is a program to compile (one
  # val evaluation: 29 s trimmed vs 5 s padded, compile included, on 1 CPU core). The
  # full-size configs keep it on; `:tiny` turns it on so CI runs the trimmed stages.
  config.trim = False
  config.compute_dtype = common.COMPUTE_DTYPE
  config.progress = True

  if arg == "tiny":
    config.data.synthetic.update(num_train=192, num_val=64, num_test=64)
    config.model.update(mmt_heads=(2,), mmt_ffn=(128,), hidden_size=128, text_heads=2,
                        text_ffn=128, fc7_dim=64, ptr_query_key_size=128)
    config.train.update(batch_size=16, num_steps=6, eval_every=0, log_every=1,
                        max_minutes=0.0)
    config.prune.update(num_samples=40, batch_size=16)
    config.rest.update(ckpt_every=4, schedule=((0.4, 73, 1),))
    config.eval.update(batch_size=32)
    config.speed.update(batch_sizes=(1, 16), repeats=2)
    config.trim = True
  elif arg:
    raise ValueError(f"unknown config variant {arg!r}; known: 'tiny'.")
  return config
