r"""LFPR of TAP (3 text-BERT + 4 MMT layers) on TextVQA (upstream `prune_tap_textvqa.sh`).

    python -m converters.torch_to_flax --checkpoint textvqa_tap_base_best.ckpt --out models/tap_textvqa
    python -m lfpr_jax.main --config=configs/tap_textvqa.py:0.4 \
        --config.base_model=models/tap_textvqa --config.data.root=/data/tap \
        --workdir=runs/tap_textvqa

`/data/tap` is the TAP data release root (it holds TextVQA and ST-VQA); `:0.4` runs one
constraint, no argument the script's grid, `:thre` the percentile grid.

Expected: val accuracy 49.91 unpruned (TAP paper); LFPR paper, c = 0.4: 47.57 at 11.4M MMT
parameters (0.58 GPU-hours on 2 TitanXP).
Runtime: the first run on a release builds the data once (about 25 min on 2 CPU cores,
README "Real data"); ReSt takes 3 to 34 min per constraint in the paper (2 TitanXP).
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return common.real_data_config("tap", "textvqa", arg)
