r"""Entry point: `python -m lfpr_jax.main --config=configs/<name>.py --workdir=DIR`.

    python -m lfpr_jax.main --config=configs/synthetic.py --workdir=/tmp/lfpr_synthetic
    python -m lfpr_jax.main --config=configs/sweep_synthetic.py --workdir=/tmp/lfpr_synthetic
    python -m lfpr_jax.main --config=configs/synthetic.py --workdir=/tmp/lfpr_q --question_only

This file is kept short: flags, distributed init, the device log, and dispatch to a
driver (`experiments.lfpr.run`, `experiments.sweep.run` for a config with a `sweep`
section, `experiments.base_model` for `--question_only`). A user error (bad config,
missing input, refused workdir) ends with one `error: ...` line and exit status 1 (2
for bad flags); `--debug` shows the traceback. On a cluster (SLURM, Cloud TPU,
Kubernetes, or with JAX_COORDINATOR_ADDRESS set) every process runs this same command.
"""

import os

from absl import app, flags, logging
import jax
from ml_collections import config_flags

from lfpr_jax import cli
from lfpr_jax.experiments import base_model, lfpr, sweep

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (resumable).")
_QUESTION_ONLY = flags.DEFINE_bool("question_only", False,
                                   "Train the image-blind ablation instead.")
_INVALIDATE = flags.DEFINE_bool(
    "invalidate", False, "Recompute the stage outputs a changed config invalidates "
    "(only those; everything else in the workdir is kept).")
_DEBUG = flags.DEFINE_bool("debug", False, "Show tracebacks of user errors.")
flags.mark_flags_as_required(["config", "workdir"])

CLUSTER_ENV = ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES",
               "MEGASCALE_COORDINATOR_ADDRESS")


def _maybe_initialize_distributed() -> None:
  if any(os.environ.get(k) for k in CLUSTER_ENV) and int(
      os.environ.get("SLURM_NTASKS", "2")) > 1:
    jax.distributed.initialize()


def _quiet_library_logs() -> None:
  """Keeps Orbax/TFDS/Grain INFO chatter out of the console (warnings still show)."""
  import logging as pylogging  # noqa: PLC0415

  class Quiet(pylogging.Filter):
    def filter(self, record):
      return record.levelno >= pylogging.WARNING or not any(
          s in record.pathname for s in ("orbax", "tensorflow_datasets", "grain",
                                         "jax/_src", "etils"))
  logging.get_absl_handler().addFilter(Quiet())


def _config_error(e: BaseException) -> str:
  """The useful line of an error raised while loading or overriding a config."""
  text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
  text = str(text).replace("\\n", "\n").replace("\\'", "'").strip("'\"")
  if "Did you mean" in text:  # an unknown override key
    key, hint = text.split("Did you mean", 1)
    text = f"no config key {key.strip().strip(chr(39))!r}; did you mean{hint}"
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  if any(line.startswith("Traceback") for line in lines):
    lines = [lines[-1].split(": ", 1)[-1]]  # ml_collections embeds the traceback
  return " ".join(lines)


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing with one-line errors (a bad config file, key or variant)."""
  debug = "--debug" in argv
  for arg in argv[1:]:
    if arg.startswith("--config="):
      path = arg[len("--config="):].split(":", 1)[0]
      if not os.path.isfile(path):
        cli.fail(f"--config: no config file {path} (expected e.g. "
                 "configs/synthetic.py[:tiny])", 2)
  try:
    rest = flags.FLAGS(argv)
    _CONFIG.value  # noqa: B018  (loads the file: its errors surface here)
    return rest
  except Exception as e:  # pylint: disable=broad-except
    if debug:
      raise
    if isinstance(e, flags.Error) or isinstance(e, (ValueError, KeyError,
                                                    AttributeError, TypeError)):
      cli.fail(f"--config: {_config_error(e)}", 2)
    raise


def run(config, workdir: str) -> None:
  """Runs the driver the config and flags ask for and prints its table."""
  # Compiled programs persist in the workdir: a resumed or repeated run skips most of
  # the compile time (minutes for the full-size model on a GPU). A cache the user
  # chose (JAX_COMPILATION_CACHE_DIR, e.g. one shared by several workdirs) is kept.
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "jax_cache"))
  is_main = jax.process_index() == 0
  if _QUESTION_ONLY.value:
    summary = base_model.question_only(config, workdir)
    if is_main:
      print(base_model.format_summary(summary))
  elif "sweep" in config:
    sweep.run(config, workdir, invalidate=_INVALIDATE.value)
    if is_main:
      with open(os.path.join(workdir, "sweep", "results.md")) as f:
        print(f.read(), end="")
      print(f"(CSV, plot and metadata in {os.path.join(workdir, 'sweep')})")
  else:
    out = lfpr.run(config, workdir, invalidate=_INVALIDATE.value)
    if is_main:
      print(lfpr.format_table(out["rows"], out["unpruned"]), end="")
      print(f"(tables, per-target JSON and predictions in "
            f"{os.path.join(workdir, 'lfpr')})")


def main(argv):
  del argv
  _quiet_library_logs()
  _maybe_initialize_distributed()
  logging.info("process %d/%d, %d local / %d global devices (%s)", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices()[0].platform)
  cli.run(lambda _: run(_CONFIG.value, _WORKDIR.value),
          ["--debug"] if _DEBUG.value else [])


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
