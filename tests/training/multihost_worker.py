"""One process of the 2-process ReSt test (tests/test_multihost.py); not a test itself.

    python tests/multihost_worker.py SPEC_JSON PROCESS_ID

Joins the CPU cluster of `spec["num_processes"]` processes through
`jax.distributed.initialize` (Gloo collectives), loads the files the test prepared,
retrains - interrupted after `spec["stop_after"]` steps and resumed from the shared
checkpoint, like a preempted multi-host job - and writes into `spec["out"]`:
`log_<i>.jsonl` (what `retrain` asked this process to log), `writes_<i>.json` (the
files this process created or replaced under `spec["directory"]`, from an audit hook)
and, on process 0 only, `params.npz` (the final parameters) and `summaries.json`.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import time
import traceback

T0 = time.time()
REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402  (after the path; JAX reads XLA_FLAGS from the parent's env)
import numpy as np  # noqa: E402

WRITE_EVENTS = ("open", "os.rename", "os.replace", "os.mkdir", "os.remove",
                "shutil.rmtree")


def _watch_writes(root: str, record: list) -> None:
  """Records Python-level writes under `root` (opens for writing, renames, mkdirs)."""
  root = os.path.realpath(root)

  def hook(event, args):
    if event not in WRITE_EVENTS or not args:
      return
    path = args[0]
    if event == "open":
      mode = args[1] if len(args) > 1 else "r"
      flags = args[2] if len(args) > 2 else 0
      writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
          mode is None and isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR))
      if not writing:
        return
    if event in ("os.rename", "os.replace") and len(args) > 1:
      path = args[1]
    if isinstance(path, (str, bytes, os.PathLike)):
      path = os.fsdecode(path)
      if os.path.realpath(path).startswith(root):
        record.append([event, os.path.relpath(os.path.realpath(path), root)])

  sys.addaudithook(hook)


def main(spec_path: str, process_id: int) -> None:
  with open(spec_path) as f:
    spec = json.load(f)
  jax.distributed.initialize(coordinator_address=spec["coordinator"],
                             num_processes=spec["num_processes"],
                             process_id=process_id, initialization_timeout=120)
  print(f"{time.time() - T0:.1f} s: process {process_id} initialized", flush=True)
  assert jax.process_index() == process_id
  assert jax.process_count() == spec["num_processes"]

  from lfpr_jax.pruning import pseudo_labels, rest  # noqa: PLC0415
  from lfpr_jax.training import checkpointing, loop, optim, parallel  # noqa: PLC0415
  from lfpr_jax.data.vocab import AnswerVocab  # noqa: PLC0415

  config, params = checkpointing.load_model(spec["model_dir"])
  labels = pseudo_labels.PseudoLabels.load(spec["labels"])
  vocab = AnswerVocab.from_file(spec["answer_vocab"])
  transform = pseudo_labels.PseudoLabelTargets(labels, vocab,
                                               decode_steps=config.decode_steps,
                                               ocr_slots=config.ocr_max)
  settings = rest.RestSettings(**spec["settings"])
  out = spec["out"]
  writes: list = []
  _watch_writes(spec["directory"], writes)

  def log(record):
    with open(os.path.join(out, f"log_{process_id}.jsonl"), "a") as f:
      f.write(json.dumps({**record, "t": round(time.time() - T0, 1)}) + "\n")

  summaries = []
  for stop_after in (spec["stop_after"], None):
    print(f"{time.time() - T0:.1f} s: retrain(stop_after={stop_after})", flush=True)
    params_out, summary = loop.train_subset(
        model_config=config, params=params,
        rules=rest.trainable_rules(config, settings.layers),
        built_dir=spec["built_dir"],
        split="train", indices=np.asarray(spec["indices"]), transforms=[transform],
        settings=settings, directory=spec["directory"], mesh=parallel.make_mesh(),
        rng=jax.random.key(spec["rng_seed"]), progress=False, log=log,
        stop_after=stop_after)
    summaries.append(summary)
  print(f"{time.time() - T0:.1f} s: done", flush=True)
  with open(os.path.join(out, f"writes_{process_id}.json"), "w") as f:
    json.dump(writes, f)
  if process_id == 0:
    np.savez(os.path.join(out, "params.npz"),
             **{k: np.asarray(v) for k, v in optim.flat(params_out).items()})
    with open(os.path.join(out, "summaries.json"), "w") as f:
      json.dump(summaries, f)
  jax.distributed.shutdown()


if __name__ == "__main__":
  try:
    main(sys.argv[1], int(sys.argv[2]))
  except BaseException:  # noqa: BLE001
    # Exit at once: a normal exit would wait for the peer in jax.distributed's
    # shutdown barrier while the peer waits for this process in a collective.
    traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)
