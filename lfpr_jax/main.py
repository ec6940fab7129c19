r"""Entry point: `python -m lfpr_jax.main --config=configs/<name>.py --workdir=DIR`.

    python -m lfpr_jax.main --config=configs/synthetic.py --workdir=/tmp/lfpr_synthetic
    python -m lfpr_jax.main --config=configs/synthetic.py --workdir=/tmp/lfpr_q --question_only

Stages run today: data preparation (synthetic generation, ArrayRecord build) and the
base model (trained from scratch on the synthetic benchmark when the workdir has none;
skipped when `<workdir>/base_model` exists). The LFPR stages (t*, importance,
selection, surgery, pseudo-labels, ReSt, evaluation) are the next milestone.

On a cluster (SLURM, Cloud TPU, Kubernetes, or with JAX_COORDINATOR_ADDRESS set) every
process runs this same command; `jax.distributed.initialize()` detects the cluster.
"""

import json
import os

from absl import app, flags, logging
import jax
from ml_collections import config_flags

from lfpr_jax import finetune

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (resumable).")
_QUESTION_ONLY = flags.DEFINE_bool("question_only", False,
                                   "Train the image-blind ablation instead.")
flags.mark_flags_as_required(["config", "workdir"])

CLUSTER_ENV = ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES",
               "MEGASCALE_COORDINATOR_ADDRESS")


def _maybe_initialize_distributed() -> None:
  if any(os.environ.get(k) for k in CLUSTER_ENV) and int(
      os.environ.get("SLURM_NTASKS", "2")) > 1:
    jax.distributed.initialize()


def main(argv):
  del argv
  _maybe_initialize_distributed()
  logging.info("process %d/%d, %d local / %d global devices (%s)", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices()[0].platform)
  config, workdir = _CONFIG.value, _WORKDIR.value
  name = "question_only_model" if _QUESTION_ONLY.value else "base_model"
  summary_path = os.path.join(workdir, f"{name}.json")
  if os.path.exists(os.path.join(workdir, name, "arch.json")) and os.path.exists(
      summary_path):
    with open(summary_path) as f:
      summary = json.load(f)
    logging.info("reusing %s", os.path.join(workdir, name))
  else:
    summary = finetune.train_and_evaluate(config, workdir,
                                          question_only=_QUESTION_ONLY.value)
  if jax.process_index() == 0:
    print(f"{name}: val accuracy {summary['val_accuracy']:.4f} on "
          f"{summary['val_examples']} questions after {summary['steps']} steps "
          f"({summary['train_seconds']:.0f} s), {summary['num_params']:,} parameters")


if __name__ == "__main__":
  app.run(main)
