"""Padding and multi-host lockstep of `parallel.global_batches`, on 4 fake devices."""

import jax
import numpy as np
import pytest

from lfpr_jax.training import parallel


def _loader(sizes, start=0):
  """Batches of `sizes` rows: `x` = question id, a loss mask of ones."""
  qid = start
  for n in sizes:
    ids = np.arange(qid, qid + n)
    qid += n
    yield {"x": ids.astype(np.float32)[:, None] * np.ones((1, 3), np.float32),
           "train_loss_mask": np.ones((n, 2), np.float32),
           "question_id": ids, "name": np.array([b"s"] * n, dtype=object)}


def test_num_global_batches():
  assert parallel.num_global_batches(10, 4) == 3
  assert parallel.num_global_batches(8, 4) == 2
  assert parallel.num_global_batches(0, 4) == 0
  with pytest.raises(ValueError, match="local_batch"):
    parallel.num_global_batches(3, 0)


def test_pad_batch_repeats_last_row_and_masks_the_loss():
  out = parallel.pad_batch({"x": np.array([[1.], [2.]]),
                            "train_loss_mask": np.ones((2, 1), np.float32),
                            "s": np.array(["a", "b"])}, 4)
  np.testing.assert_array_equal(out["x"][:, 0], [1, 2, 2, 2])
  np.testing.assert_array_equal(out["train_loss_mask"][:, 0], [1, 1, 0, 0])
  assert "s" not in out
  with pytest.raises(ValueError, match="exceeds"):
    parallel.pad_batch({"x": np.zeros((5, 1))}, 4)


def test_global_batches_pad_and_feed_padding_after_the_end():
  mesh = parallel.make_mesh(jax.devices()[:4])
  got = list(parallel.global_batches(_loader([4, 2]), local_batch=4, num_batches=3,
                                     mesh=mesh, fields=("x", "train_loss_mask"),
                                     progress=False))
  assert len(got) == 3
  assert set(got[0]) == {"x", "train_loss_mask", "weight", "question_id"}
  assert got[0]["x"].sharding.spec == parallel.data_sharded(mesh).spec
  np.testing.assert_array_equal(got[0]["weight"], [1, 1, 1, 1])
  np.testing.assert_array_equal(got[1]["weight"], [1, 1, 0, 0])
  np.testing.assert_array_equal(got[1]["question_id"], [4, 5, -1, -1])
  np.testing.assert_array_equal(got[1]["x"][:, 0], [4, 5, 5, 5])
  np.testing.assert_array_equal(got[1]["train_loss_mask"][:, 0], [1, 1, 0, 0])
  # The loader ran out: an all-padding batch keeps the collectives in step, and its
  # loss mask is 0 everywhere so a training step learns nothing from it.
  np.testing.assert_array_equal(got[2]["weight"], [0, 0, 0, 0])
  np.testing.assert_array_equal(got[2]["question_id"], [-1] * 4)
  np.testing.assert_array_equal(got[2]["train_loss_mask"], np.zeros((4, 2)))


def test_global_batches_stop_at_num_batches_and_fill_an_empty_loader():
  mesh = parallel.make_mesh(jax.devices()[:2])
  it = _loader([2, 2, 2])
  got = list(parallel.global_batches(it, local_batch=2, num_batches=2, mesh=mesh,
                                     fields=("x",), progress=False))
  assert [list(np.asarray(b["question_id"])) for b in got] == [[0, 1], [2, 3]]
  assert len(list(it)) == 1                       # the third batch was not read
  with pytest.raises(ValueError, match="fill"):
    list(parallel.global_batches(iter([]), local_batch=2, num_batches=1, mesh=mesh,
                                 fields=("x",), progress=False))
  filled = list(parallel.global_batches(iter([]), local_batch=2, num_batches=2,
                                        mesh=mesh, fields=("x",), progress=False,
                                        fill=lambda: next(_loader([2], start=7))))
  assert len(filled) == 2 and all(float(np.sum(b["weight"])) == 0 for b in filled)
  np.testing.assert_array_equal(filled[0]["x"][:, 0], [7, 8])


def test_progress_bar_counts_the_yielded_batches_and_finishes(capsys):
  mesh = parallel.make_mesh(jax.devices()[:1])
  n = len(list(parallel.global_batches(_loader([1, 1]), local_batch=1, num_batches=3,
                                       mesh=mesh, fields=("x",), desc="bar-test")))
  err = capsys.readouterr().err
  assert n == 3
  assert "bar-test: 100%" in err and "3/3" in err
