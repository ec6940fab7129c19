r"""LFPR of TAP (3 text-BERT + 4 MMT layers) on ST-VQA (upstream `prune_tap_stvqa.sh`).

    python -m converters.torch_to_flax --checkpoint stvqa_tap_base_best.ckpt --out models/tap_stvqa
    python -m lfpr_jax.main --config=configs/tap_stvqa.py:0.4 \
        --config.base_model=models/tap_stvqa --config.data.root=/data/tap \
        --workdir=runs/tap_stvqa

`/data/tap` is the TAP data release root (it holds TextVQA and ST-VQA); `:0.4` runs one
constraint, no argument the script's grid, `:thre` the percentile grid.

Expected: val accuracy 45.29 unpruned (TAP paper); the LFPR paper publishes no ST-VQA table.
Runtime: the first run on a release builds the data once (about 17 min on 2 CPU cores,
README "Real data"); ReSt takes 3 to 34 min per constraint in the paper (2 TitanXP).
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return common.real_data_config("tap", "stvqa", arg)
