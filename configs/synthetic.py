r"""The embedded synthetic Text-VQA benchmark with a reduced TAP.

    python -m lfpr_jax.main --config=configs/synthetic.py --workdir=/tmp/lfpr_synthetic
    python -m lfpr_jax.main --config=configs/synthetic.py:tiny --workdir=/tmp/lfpr_tiny

The dataset is generated into `<workdir>/data/synthetic` (upstream file layout, read by
the same readers as TextVQA), built to ArrayRecord in `<workdir>/tfds`, and a reduced TAP
(hidden 128, 2 heads of 64, FFN 512, 4 MMT layers, 1 text-BERT layer, 16 objects / 16
OCR tokens, 104 text wordpieces; 1.4M parameters) is trained from scratch for at most 10
minutes. Measured on 2 CPU cores: 0.387 val accuracy after 1348 steps (still rising;
the issue's bar of 0.7 is not met yet), against 0.19 for the best question-only answer.
`:tiny` (CI smoke test): a few hundred questions, 1 MMT layer, a few steps.
"""

import ml_collections

from lfpr_jax import schedules


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.data = ml_collections.ConfigDict()
  config.data.dataset = "synthetic"
  config.data.root = ""        # default: <workdir>/data/synthetic
  config.data.built_dir = ""   # default: <workdir>/tfds
  config.data.splits = ("train", "val")
  config.data.synthetic = ml_collections.ConfigDict(dict(
      seed=0, num_train=6000, num_val=1000, num_test=1000))

  # TapConfig fields; data-dependent sizes (answer and BERT vocabularies, feature
  # widths, object/OCR slots) come from the generated dataset.
  config.model = ml_collections.ConfigDict(dict(
      arch="synthetic", text_bert_layers=1, mmt_heads=(2, 2, 2, 2),
      mmt_ffn=(512, 512, 512, 512), hidden_size=128, head_dim=64, text_heads=2,
      text_ffn=512, question_len=16, ocr_text_len=64, text_len=104, fc7_dim=128,
      ptr_query_key_size=128, max_position_embeddings=128))

  config.optim = ml_collections.ConfigDict(dict(
      lr=1e-3, warmup_steps=100, warmup_factor=0.2, decay_steps=(), decay_ratio=0.1,
      clip_norm=0.25))

  config.train = ml_collections.ConfigDict(dict(
      batch_size=32, num_steps=4000, max_minutes=10.0, log_every=20, eval_every=400,
      eval_limit=300))

  # LFPR (issue 5): score, prune to 40% of the MMT, ReSt with TAP/TextVQA's schedule.
  config.base_model = ""       # empty: <workdir>/base_model, trained when missing
  config.prune = schedules.prune_section(constraints=(0.4,), num_samples=1024,
                                         batch_size=32)
  config.rest = schedules.rest_section("tap", "textvqa", ckpt_every=200)
  config.eval = ml_collections.ConfigDict(dict(batch_size=64))
  config.progress = True

  if arg == "tiny":
    config.data.synthetic.update(num_train=192, num_val=64, num_test=64)
    config.model.update(mmt_heads=(2,), mmt_ffn=(128,), hidden_size=128, text_heads=2,
                        text_ffn=128, fc7_dim=64, ptr_query_key_size=128)
    config.train.update(batch_size=16, num_steps=6, eval_every=0, log_every=1,
                        max_minutes=2.0)
    config.prune.update(num_samples=40, batch_size=16)
    config.rest.update(ckpt_every=4, schedule=((0.4, 73, 1),))
    config.eval.update(batch_size=32)
  elif arg:
    raise ValueError(f"unknown config variant {arg!r}; known: 'tiny'.")
  return config
