r"""LFPR on TAP12 (TAP with OCR-CC pre-training, 12 MMT layers), textvqa (upstream `prune_tap12_textvqa.sh`).

    python -m converters.torch_to_flax --checkpoint textvqa_tap_ocrcc_best.ckpt --out models/tap12_textvqa
    python -m lfpr_jax.main --config=configs/tap12_textvqa.py \
        --config.base_model=models/tap12_textvqa --config.data.root=/data/textvqa \
        --workdir=runs/tap12_textvqa

`--config=configs/tap12_textvqa.py:0.4` runs one constraint, `:thre` the percentile
grid. The data directory is the TAP data release in its upstream layout (README,
"Real data"). Stages, their outputs and the schedule of (retrain %, k) per constraint
are described in lfpr_jax/lfpr.py and lfpr_jax/schedules.py (LFPR.md §6.7).
"""

import ml_collections

from configs import common as schedules


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return schedules.real_data_config("tap12", "textvqa", arg)
