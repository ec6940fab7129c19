r"""Submission files for any model directory: `python -m lfpr_jax.predict`.

    python -m lfpr_jax.predict --config configs/tap_textvqa.py --model DIR \
        --split test --out textvqa_test_submission.json
    python -m lfpr_jax.predict --config configs/tap_stvqa.py --model DIR \
        --split test --out stvqa_task3_submission.json --set data.root=/data/tap

The model (unpruned, pruned or retrained: any directory with `arch.json`) answers every
question of the split by greedy decoding. The file is a JSON list of
`{"question_id": int, "answer": str}` in split order: the EvalAI submission format of
TextVQA (upstream `format_for_evalai`) and of ST-VQA task 3. On `val` the dataset's
metrics are printed too. The split is built first if needed (a shared build).
"""

from __future__ import annotations

import os
import runpy
import sys
from typing import Any, Optional, Sequence

import jax
import ml_collections

from lfpr_jax import atomic, cli
from lfpr_jax.data.pipeline import make_loader, open_source
from lfpr_jax.data.prepare import prepare_data
from lfpr_jax.training import checkpointing, parallel
from lfpr_jax.training import evaluate as evaluation

SPLITS = ("train", "val", "test")


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """`path.py[:arg]` -> its `get_config(arg)`, with `key=value` overrides applied to a
  copy (values parsed as Python literals when they are, else kept as strings)."""
  import ast  # noqa: PLC0415
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise cli.UsageError(f"--config: no config file {path}")
  config = runpy.run_path(path)["get_config"](arg or None)
  flat = {}
  for item in overrides:
    key, sep, value = item.partition("=")
    if not sep:
      raise cli.UsageError(f"--set {item!r}: expected key=value")
    try:
      flat[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      flat[key] = value
  config = ml_collections.ConfigDict(config.to_dict())
  try:
    config.update_from_flattened_dict(flat)
  except (KeyError, AttributeError) as e:
    raise cli.UsageError(f"--set: no config key {e}") from None
  return config


def predictions(config: ml_collections.ConfigDict, model_dir: str, split: str, *,
                workdir: str, batch_size: Optional[int] = None, progress: bool = True
                ) -> dict[str, Any]:
  """Greedy answers of the model on `split` (and metrics when it has answers)."""
  model_config, params = checkpointing.load_model(model_dir)
  build = ml_collections.ConfigDict(config.to_dict())
  build.data.splits = tuple(sorted(set(build.data.splits) | {split}))
  data = prepare_data(build, workdir)
  mesh = parallel.make_mesh()
  global_batch = batch_size or config.eval.batch_size
  parallel.check_batch_size(global_batch, mesh)
  local = global_batch // jax.process_count()
  n = len(open_source(data.built_dir, split))
  trim = bool(config.get("trim", False))  # exact; sorted by length, unsorted results
  order = parallel.length_order(
      parallel.shard_lengths(data.built_dir, split, model_config), model_config,
      num_records=n, local_batch=local, mesh=mesh) if trim else None
  batches = make_loader(data.built_dir, split, local, shuffle=False,
                        drop_remainder=False, indices=None if order is None else order.indices)
  if trim:
    batches = parallel.with_positions(batches, order.positions)
  kw = dict(local_batch=local, num_batches=parallel.num_global_batches(n, local),
            desc=f"predict {split}", progress=progress)
  predict = evaluation.greedy_predictor(model_config, mesh, data.vocab.bos_idx,
                                        trim=trim)
  rep = parallel.replicate(params, mesh)
  if split == "test":  # no answers to score against
    rows = evaluation.answers(predict, rep, batches, data.vocab, mesh, **kw)
    return {"predictions": rows, "metrics": None}
  result = evaluation.evaluate(predict, rep, batches, data.vocab, mesh,
                               dataset=data.layout.dataset, predictions=True, **kw)
  return {"predictions": result["predictions"], "metrics": result["metrics"]}


@cli.command
def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = cli.ArgumentParser(prog="python -m lfpr_jax.predict",
                              description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", required=True,
                      help="the run's config file[:arg] (data paths, dataset)")
  parser.add_argument("--model", required=True, help="model directory (arch.json)")
  parser.add_argument("--split", default="val", choices=SPLITS)
  parser.add_argument("--out", required=True, help="submission JSON file")
  parser.add_argument("--workdir", default=None,
                      help="where a synthetic dataset lives (default: beside --out)")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="config override, e.g. data.root=/data/tap (repeatable)")
  parser.add_argument("--batch_size", type=int, default=None)
  parser.add_argument("--overwrite", action="store_true")
  args = parser.parse_args(argv)
  if not os.path.isfile(os.path.join(args.model, checkpointing.ARCH_FILE)):
    raise ValueError(f"--model {args.model} is not a model directory (no "
                     f"{checkpointing.ARCH_FILE}).")
  atomic.check_new_file(args.out, overwrite=args.overwrite)
  config = load_config(args.config, args.set)
  workdir = args.workdir or os.path.dirname(os.path.abspath(args.out))
  out = predictions(config, args.model, args.split, workdir=workdir,
                    batch_size=args.batch_size)
  if jax.process_index() == 0:
    atomic.write_json(args.out, out["predictions"], indent=None)
    metrics = "" if out["metrics"] is None else " (" + ", ".join(
        f"{k} {100 * v:.2f}" for k, v in out["metrics"].items()) + ")"
    print(f"{len(out['predictions'])} answers on {args.split} -> {args.out}{metrics}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
