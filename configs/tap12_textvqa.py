r"""LFPR of TAP12 (12 MMT layers, OCR-CC pre-trained) on TextVQA (upstream `prune_tap12_textvqa.sh`).

    python -m converters.torch_to_flax --checkpoint textvqa_tap_ocrcc_best.ckpt --out models/tap12_textvqa
    python -m lfpr_jax.main --config=configs/tap12_textvqa.py:0.4 \
        --config.base_model=models/tap12_textvqa --config.data.root=/data/tap \
        --workdir=runs/tap12_textvqa

`/data/tap` is the TAP data release root (it holds TextVQA and ST-VQA); `:0.4` runs one
constraint, no argument the script's grid, `:thre` the percentile grid.

Expected: val accuracy 54.71 unpruned (TAP paper); the LFPR paper publishes no TAP12 table.
Runtime: the first run on a release builds the data once (about 25 min on 2 CPU cores,
README "Real data"); ReSt takes 3 to 34 min per constraint in the paper (2 TitanXP).
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return common.real_data_config("tap12", "textvqa", arg)
