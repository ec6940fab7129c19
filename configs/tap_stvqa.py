r"""LFPR on TAP (3 text-BERT + 4 MMT layers), stvqa (upstream `prune_tap_stvqa.sh`).

    python -m converters.torch_to_flax --checkpoint stvqa_tap_base_best.ckpt --out models/tap_stvqa
    python -m lfpr_jax.main --config=configs/tap_stvqa.py \
        --config.base_model=models/tap_stvqa --config.data.root=/data/stvqa \
        --workdir=runs/tap_stvqa

`--config=configs/tap_stvqa.py:0.4` runs one constraint, `:thre` the percentile
grid. The data directory is the TAP data release in its upstream layout (README,
"Real data"). Stages, their outputs and the schedule of (retrain %, k) per constraint
are described in lfpr_jax/lfpr.py and lfpr_jax/schedules.py (LFPR.md §6.7).
"""

import ml_collections

from configs import common as schedules


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return schedules.real_data_config("tap", "stvqa", arg)
