"""The synthetic Text-VQA benchmark (temporary: everything still lives in `writer`)."""

from lfpr_jax.data.synthetic.writer import *  # noqa: F403
from lfpr_jax.data.synthetic.writer import (  # noqa: F401
    _POSITION_MARGIN, generate, read_manifest, SyntheticSpec)
