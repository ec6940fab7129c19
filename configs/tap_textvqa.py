r"""LFPR on TAP (3 text-BERT + 4 MMT layers), textvqa (upstream `prune_tap_textvqa.sh`).

    python -m converters.torch_to_flax --checkpoint textvqa_tap_base_best.ckpt --out models/tap_textvqa
    python -m lfpr_jax.main --config=configs/tap_textvqa.py \
        --config.base_model=models/tap_textvqa --config.data.root=/data/textvqa \
        --workdir=runs/tap_textvqa

`--config=configs/tap_textvqa.py:0.4` runs one constraint, `:thre` the percentile
grid. The data directory is the TAP data release in its upstream layout (README,
"Real data"). Stages, their outputs and the schedule of (retrain %, k) per constraint
are described in lfpr_jax/lfpr.py and lfpr_jax/schedules.py (LFPR.md §6.7).
"""

import ml_collections

from configs import common as schedules


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return schedules.real_data_config("tap", "textvqa", arg)
