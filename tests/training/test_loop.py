"""`loop.run_steps`: periodic actions, resume == uninterrupted, log without duplicate
steps after a crash, wall time accumulated over attempts, time budget."""

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lfpr_jax.data.pipeline import make_loader
from lfpr_jax.training import loop, parallel
from lfpr_jax.training.step import TrainState, init_state

RECORDS = [{"x": np.random.default_rng(i).standard_normal(3).astype(np.float32),
            "y": np.float32(i % 3), "question_id": np.int64(i)} for i in range(24)]
TX = optax.adam(0.1)


def _step(state, frozen, batch, rng):
  """Least squares with a dropout-like key: a pure step like `step.train_step`."""
  noise = jax.random.normal(jax.random.fold_in(rng, state.step), (3,)) * 0.01

  def loss_fn(w):
    err = batch["x"] @ (w["w"] + noise) + frozen["b"] - batch["y"]
    return jnp.sum(batch["weight"] * err ** 2) / jnp.sum(batch["weight"])
  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  updates, opt = TX.update(grads, state.opt_state, state.params)
  return (TrainState(state.step + 1, optax.apply_updates(state.params, updates), opt),
          {"loss": loss, "grad_norm": optax.tree.norm(grads)})


def _run(directory, log_path, *, sleep=0.0, fail_at=None, **kw):
  mesh = parallel.make_mesh(jax.devices()[:2])
  loader = make_loader(RECORDS, "train", 2, seed=0, num_epochs=None, shard_index=0,
                       shard_count=1)
  jitted = jax.jit(_step)

  def step_fn(*args):
    time.sleep(sleep)
    return jitted(*args)

  def on_eval(state, step):
    if step == fail_at:
      raise KeyboardInterrupt("simulated crash")
    return {"w0": float(state.params["w"][0])}

  def batches_from(start):
    return parallel.global_batches(loader, local_batch=2, num_batches=6 - start,
                                   mesh=mesh, fields=("x", "y"), progress=False)

  state = init_state({"w": np.zeros(3, np.float32)}, TX)
  state, summary = loop.run_steps(
      step_fn, state, {"b": np.float32(0.5)}, batches_from, jax.random.key(0),
      num_steps=6, mesh=mesh, directory=directory, loader=loader, ckpt_every=2,
      log_path=log_path, eval_every=1, on_eval=on_eval, progress=False, **kw)
  return jax.device_get(state.params), summary


def _log(path):
  return [json.loads(line) for line in open(path)]


def test_is_time():
  assert [s for s in range(1, 11) if loop.is_time(s, 4, 10)] == [4, 8, 10]
  assert [s for s in range(1, 11) if loop.is_time(s, 4)] == [4, 8]
  assert [s for s in range(1, 11) if loop.is_time(s, 0, 10)] == [10]
  assert not any(loop.is_time(s, None) for s in range(1, 5))


def test_resume_equals_uninterrupted_and_accumulates_time(tmp_path):
  full, s_full = _run(str(tmp_path / "a"), str(tmp_path / "a.jsonl"))
  assert s_full["complete"] and s_full["resumed_from"] == 0
  part, first = _run(str(tmp_path / "b"), str(tmp_path / "b.jsonl"), sleep=0.3,
                     stop_after=3)
  assert (first["steps"], first["complete"], first["stopped_by"]) == (3, False,
                                                                      "stop_after")
  assert first["seconds"] >= 0.9
  resumed, second = _run(str(tmp_path / "b"), str(tmp_path / "b.jsonl"))
  assert (second["resumed_from"], second["steps"], second["complete"]) == (3, 6, True)
  np.testing.assert_array_equal(resumed["w"], full["w"])
  assert not np.array_equal(part["w"], full["w"])
  # Wall time of both attempts: the first one's, up to its last checkpoint (at least
  # its three 0.3 s steps; time after that checkpoint is not recorded), plus this one's.
  assert (0.9 + second["attempt_seconds"] - 0.1 <= second["seconds"]
          <= first["seconds"] + second["attempt_seconds"] + 0.1)
  a, b = _log(tmp_path / "a.jsonl"), _log(tmp_path / "b.jsonl")
  losses = lambda log: [(r["step"], r["loss"]) for r in log if "loss" in r]
  assert losses(b) == losses(a) and [s for s, _ in losses(a)] == [1, 2, 3, 4, 5, 6]
  assert b[-1]["elapsed_s"] >= 0.9


def test_crash_truncates_the_log_to_the_checkpoint(tmp_path):
  full, _ = _run(str(tmp_path / "a"), str(tmp_path / "a.jsonl"))
  with pytest.raises(KeyboardInterrupt):
    _run(str(tmp_path / "b"), str(tmp_path / "b.jsonl"), fail_at=5)
  assert max(r["step"] for r in _log(tmp_path / "b.jsonl")) == 5   # past ckpt 4
  resumed, summary = _run(str(tmp_path / "b"), str(tmp_path / "b.jsonl"))
  assert summary["resumed_from"] == 4
  np.testing.assert_array_equal(resumed["w"], full["w"])
  log = _log(tmp_path / "b.jsonl")
  train_steps = [r["step"] for r in log if "loss" in r]
  eval_steps = [r["step"] for r in log if "w0" in r]
  assert train_steps == [1, 2, 3, 4, 5, 6] and eval_steps == [1, 2, 3, 4, 5]
  strip = lambda log: [{k: v for k, v in r.items() if k != "elapsed_s"} for r in log]
  assert strip(log) == strip(_log(tmp_path / "a.jsonl"))


def test_time_budget_stops_with_a_checkpoint(tmp_path):
  _, summary = _run(str(tmp_path / "c"), None, max_seconds=0.0)
  assert (summary["steps"], summary["stopped_by"], summary["complete"]) == (
      1, "time_budget", False)
  # A rerun resumes from that checkpoint and stops after one more step.
  _, again = _run(str(tmp_path / "c"), None, max_seconds=0.0)
  assert (again["resumed_from"], again["steps"]) == (1, 2)


def test_non_finite_loss_names_the_step(tmp_path):
  mesh = parallel.make_mesh(jax.devices()[:1])
  batches = lambda start: iter([{"x": jnp.ones((1, 3))}] * 3)
  bad = lambda s, f, b, r: (s, {"loss": jnp.float32(jnp.nan)})
  with pytest.raises(FloatingPointError, match="toy step 1 produced a non-finite"):
    loop.run_steps(bad, init_state({"w": np.zeros(3)}, TX), {}, batches,
                   jax.random.key(0), num_steps=3, mesh=mesh, progress=False,
                   desc="toy")
