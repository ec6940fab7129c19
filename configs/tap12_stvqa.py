r"""LFPR of TAP12 (12 MMT layers, OCR-CC pre-trained) on ST-VQA (upstream `prune_tap12_stvqa.sh`).

    python -m converters.torch_to_flax --checkpoint stvqa_tap_ocrcc_best.ckpt --out models/tap12_stvqa
    python -m lfpr_jax.main --config=configs/tap12_stvqa.py:0.4 \
        --config.base_model=models/tap12_stvqa --config.data.root=/data/tap \
        --workdir=runs/tap12_stvqa

`/data/tap` is the TAP data release root (it holds TextVQA and ST-VQA); `:0.4` runs one
constraint, no argument the script's grid, `:thre` the percentile grid.

Expected: val accuracy 50.83, ANLS 0.598 unpruned (TAP paper); the LFPR paper publishes no
ST-VQA table.
Runtime: the first run on a release builds the data once (about 17 min on 2 CPU cores,
README "Real data"); ReSt takes 3 to 34 min per constraint in the paper (2 TitanXP).
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return common.real_data_config("tap12", "stvqa", arg)
