"""Multi-host ReSt: 2 processes on localhost (Gloo CPU collectives) against one process.

The parent prepares the :tiny synthetic dataset, a pruned model directory and
pseudo-labels as files, computes the single-process reference with `loop.train_subset` on a
2-device mesh, then launches `tests/multihost_worker.py` twice (1 CPU device each) as
processes 0 and 1 of a `jax.distributed` cluster. Each worker reads only its rows of
every global batch; the pair runs 2 steps, stops, resumes from the shared Orbax
checkpoint and finishes the epoch (3 steps of 8, the last one partial and empty on
process 1). The final parameters must equal the single-process ones, and only
process 0 may log, while process 1 writes nothing but its own Grain iterator state.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs.synthetic import get_config
from lfpr_jax.data import prepare
from lfpr_jax.training import checkpointing
from lfpr_jax.training import parallel
from lfpr_jax.pruning import pseudo_labels
from lfpr_jax.pruning import rest
from lfpr_jax.pruning import surgery
from lfpr_jax.training import loop
from lfpr_jax.training import optim
from lfpr_jax.data import pipeline
from lfpr_jax.models.params import init_params
from tests.conftest import FAST_COMPILE_XLA_FLAGS

REPO = pathlib.Path(__file__).resolve().parents[2]
WORKER = REPO / "tests" / "training" / "multihost_worker.py"
NUM_PROCESSES = 2
TIMEOUT_S = 300


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _fake_labels(built_dir: str, vocab, config) -> pseudo_labels.PseudoLabels:
  """Deterministic pseudo-labels (vocabulary words and OCR copies, then EOS)."""
  qids = np.concatenate([b["question_id"] for b in pipeline.make_loader(
      built_dir, "train", 64, shuffle=False, drop_remainder=False, shard_index=0,
      shard_count=1)]).astype(np.int64)
  indices = np.full((len(qids), config.decode_steps), vocab.eos_idx, np.int32)
  words = np.arange(len(qids)) % (vocab.num_vocab - 4) + 4
  copies = vocab.num_vocab + np.arange(len(qids)) % 3
  indices[:, 0] = np.where(np.arange(len(qids)) % 3 == 0, copies, words)
  indices[::4, 1] = words[::4]      # some two-word answers
  indices[::4, 2] = vocab.eos_idx
  return pseudo_labels.PseudoLabels(qids, indices)


def _launch(spec_path: pathlib.Path, logs: pathlib.Path) -> None:
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": ("--xla_force_host_platform_device_count=1 "
                       + FAST_COMPILE_XLA_FLAGS),
         # The resumed run compiles the same step again; process 0 (the only one
         # JAX lets write the cache) takes it from disk.
         "JAX_COMPILATION_CACHE_DIR": str(logs / "jax_cache"),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
         "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
  procs, files = [], []
  for i in range(NUM_PROCESSES):
    f = open(logs / f"worker_{i}.txt", "w")  # noqa: SIM115
    files.append(f)
    procs.append(subprocess.Popen([sys.executable, str(WORKER), str(spec_path), str(i)],
                                  env=env, stdout=f, stderr=subprocess.STDOUT, cwd=REPO))
  deadline = time.monotonic() + TIMEOUT_S
  failed = None
  try:
    while any(p.poll() is None for p in procs):
      bad = [i for i, p in enumerate(procs) if p.poll() not in (None, 0)]
      if bad:
        failed = f"process {bad[0]} exited with {procs[bad[0]].returncode}"
        break
      if time.monotonic() > deadline:
        failed = f"timed out after {TIMEOUT_S} s"
        break
      time.sleep(0.2)
    if failed is None and any(p.returncode for p in procs):
      failed = f"exit codes {[p.returncode for p in procs]}"
  finally:
    for p in procs:       # a peer of a failed process would wait in a collective
      if p.poll() is None:
        p.kill()
        p.wait()
    for f in files:
      f.close()
  if failed:
    tails = "\n".join(f"--- process {i} ---\n" +
                      (logs / f"worker_{i}.txt").read_text()[-4000:]
                      for i in range(NUM_PROCESSES))
    pytest.fail(f"multi-host workers failed: {failed}\n{tails}")


def test_two_processes_equal_one(tmp_path):
  config = get_config("tiny")
  data = prepare.prepare_data(config, str(tmp_path / "work"))
  mc = data.model_config
  params = init_params(mc, jax.random.key(0))
  head = np.ones((mc.mmt_layers, mc.mmt_heads[0]), np.float32)
  ffn = np.ones((mc.mmt_layers, mc.mmt_ffn[0]), np.float32)
  head[0, 1] = 0
  ffn[0, ::3] = 0
  pruned, pruned_config = surgery.prune(params, mc, head, ffn)
  model_dir = str(tmp_path / "pruned_model")
  checkpointing.save_model(model_dir, pruned_config, pruned)
  labels = _fake_labels(data.built_dir, data.vocab, pruned_config)
  labels_path = str(tmp_path / "pseudo_labels.npz")
  labels.save(labels_path)

  # 20 records in global batches of 8: two full steps and one of 4 rows, all of which
  # belong to process 0 (process 1 feeds a fully masked batch).
  indices = pseudo_labels.subset_indices(len(labels.question_ids), 50, seed=0)[:20]
  settings = dict(percent=50, layers=1, batch_size=8, ckpt_every=2, lr=1e-3)
  rng_seed = 1
  transform = pseudo_labels.PseudoLabelTargets(labels, data.vocab,
                                               decode_steps=pruned_config.decode_steps,
                                               ocr_slots=pruned_config.ocr_max)
  assert jax.process_count() == 1 and jax.device_count() >= NUM_PROCESSES
  ref_log = []
  reference, ref_summary = loop.train_subset(
      model_config=pruned_config, params=pruned,
      rules=rest.trainable_rules(pruned_config, settings["layers"]),
      built_dir=data.built_dir, split="train", indices=indices, transforms=[transform],
      settings=rest.RestSettings(**settings), directory=str(tmp_path / "single"),
      mesh=parallel.make_mesh(jax.devices()[:NUM_PROCESSES]),
      rng=jax.random.key(rng_seed), progress=False, log=ref_log.append)
  assert ref_summary["steps"] == 3 and ref_summary["complete"]

  out = tmp_path / "out"
  out.mkdir()
  directory = tmp_path / "multi"
  spec = dict(coordinator=f"localhost:{_free_port()}", num_processes=NUM_PROCESSES,
              model_dir=model_dir, labels=labels_path,
              answer_vocab=str(data.layout.path(data.layout.answer_vocab)),
              built_dir=data.built_dir, indices=[int(i) for i in indices],
              settings=settings, rng_seed=rng_seed, stop_after=2,
              directory=str(directory), out=str(out))
  spec_path = tmp_path / "spec.json"
  spec_path.write_text(json.dumps(spec))
  _launch(spec_path, tmp_path)

  # Same parameters as one process with the same global batches.
  with np.load(out / "params.npz") as z:
    multi = {k: z[k] for k in z.files}
  want = optim.flat(reference)
  assert multi.keys() == want.keys()
  for k in want:
    np.testing.assert_allclose(multi[k], np.asarray(want[k]), rtol=1e-5, atol=1e-6,
                               err_msg=k)
  before = optim.flat(pruned)
  assert any(not np.array_equal(multi[k], before[k]) for k in multi)  # it trained

  # Interrupted after 2 steps and resumed from the shared checkpoint.
  first, second = json.loads((out / "summaries.json").read_text())
  assert (first["steps"], first["complete"]) == (2, False)
  assert (second["resumed_from"], second["steps"], second["complete"]) == (2, 3, True)

  # Process 0 alone logs: one record per step, the single-process losses.
  assert not (out / "log_1.jsonl").exists()
  records = [json.loads(line) for line in (out / "log_0.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [1, 2, 3]
  np.testing.assert_allclose([r["loss"] for r in records],
                             [r["loss"] for r in ref_log], rtol=1e-5)

  # One checkpoint directory, written by process 0 except process 1's iterator state.
  assert checkpointing.train_manager(str(directory / "ckpt")).latest_step() == 3
  writes = {i: json.loads((out / f"writes_{i}.json").read_text())
            for i in range(NUM_PROCESSES)}
  assert writes[0], "the audit hook saw no checkpoint writes on process 0"
  foreign = [w for w in writes[1] if f"process_1-of-{NUM_PROCESSES}" not in w[1]]
  assert not foreign, f"process 1 wrote {foreign}"


def test_global_batch_positions_match_single_host():
  """Each process's rows of every global batch; together the single-host batches."""
  n, batch = 21, 8
  ds = pipeline.make_loader([{"i": np.int64(i)} for i in range(n)], "train", batch,
                            seed=3, drop_remainder=False, shard_index=0, shard_count=1)
  single = [list(b["i"]) for b in ds]
  for k in (1, 2, 4):
    parts = [pipeline.global_batch_positions(n, batch, slice(i * batch // k,
                                                             (i + 1) * batch // k),
                                             seed=3) for i in range(k)]
    assert sorted(np.concatenate(parts)) == list(range(n))
    local = [[list(p[j:j + batch // k]) for j in range(0, len(p), batch // k)]
             for p in parts]
    merged = [sum((loc[j] for loc in local if j < len(loc)), [])
              for j in range(len(single))]
    assert merged == single, k
  with pytest.raises(ValueError, match="contiguous"):
    pipeline.global_batch_positions(n, batch, slice(0, 8, 2))
