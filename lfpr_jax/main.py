r"""Entry point: `python -m lfpr_jax.main --config=configs/<name>.py --workdir=DIR`.

    python -m lfpr_jax.main --config=configs/synthetic.py --workdir=/tmp/lfpr_synthetic
    python -m lfpr_jax.main --config=configs/synthetic.py --workdir=/tmp/lfpr_q --question_only

Stages (each cached in the workdir and skipped when its output exists): data
preparation (synthetic generation, ArrayRecord build), the base model (trained from
scratch on the synthetic benchmark when the workdir has none, else
`config.base_model`), then LFPR (`lfpr_jax.experiments.lfpr`): t*, importance, selection,
surgery, pseudo-labels, ReSt and evaluation, ending with the results table.
A config with a `sweep` section (configs/sweep_synthetic.py) runs the comparison grid
of `lfpr_jax.experiments.sweep` instead. `--question_only` trains the image-blind ablation.

On a cluster (SLURM, Cloud TPU, Kubernetes, or with JAX_COORDINATOR_ADDRESS set) every
process runs this same command; `jax.distributed.initialize()` detects the cluster.
"""

import json
import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from lfpr_jax.experiments import base_model as finetune
from lfpr_jax.experiments import lfpr
from lfpr_jax.experiments import sweep

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


def _quiet_library_logs() -> None:
  """Keeps Orbax/TFDS/Grain INFO chatter out of the console (warnings still show)."""
  import logging as pylogging

  class Quiet(pylogging.Filter):
    def filter(self, record):
      return record.levelno >= pylogging.WARNING or not any(
          s in record.pathname for s in ("orbax", "tensorflow_datasets", "grain",
                                         "jax/_src", "etils"))
  logging.get_absl_handler().addFilter(Quiet())


def main(argv):
  del argv
  _quiet_library_logs()
  _maybe_initialize_distributed()
  logging.info("process %d/%d, %d local / %d global devices (%s)", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices()[0].platform)
  config, workdir = _CONFIG.value, _WORKDIR.value
  # Compiled programs persist in the workdir: a resumed or repeated run skips most of
  # the compile time (minutes for the full-size model on a GPU).
  jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "jax_cache"))
  if not _QUESTION_ONLY.value:
    try:
      if "sweep" in config:
        rows = sweep.run_sweep(config, workdir)
      else:
        rows = lfpr.run(config, workdir)
    except (ValueError, FileNotFoundError) as e:  # bad input: one clear message
      sys.exit(f"lfpr_jax: error: {e}")
    if "sweep" in config:
      if jax.process_index() == 0:
        with open(os.path.join(workdir, "sweep", "results.md")) as f:
          print(f.read(), end="")
        print(f"(CSV, plot and metadata in {os.path.join(workdir, 'sweep')})")
      return
    if jax.process_index() == 0:
      print(lfpr.format_table(rows), end="")
      print(f"(table and per-target JSON in {os.path.join(workdir, 'lfpr')})")
    return
  name = "question_only_model"
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
