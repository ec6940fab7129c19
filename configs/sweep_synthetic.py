r"""The comparison sweep on the embedded synthetic benchmark.

    python -m lfpr_jax.main --config=configs/sweep_synthetic.py --workdir=/tmp/lfpr_sweep

Criteria lfpr (per batch), lfpr_ps (per sample), l1, alg, fisher x restorations none
and ReSt x constraints 0.2, 0.4, 0.6, 0.8 of the MMT parameters, over 3 seeds: seed i
regenerates the dataset and trains its own base model in <workdir>/seed_<i>/ (each a
complete one-seed sweep), and <workdir>/sweep/ holds the aggregate (mean ± std per
cell, the gap to the best method per constraint and whether it exceeds the spread):
results.{md,csv}, per_seed.csv, accuracy_vs_params.png and metadata.json.

Variants (combine with flags, e.g. --config.sweep.seeds=5):
  `:full`   adds full fine-tuning, Kwon's retraining-free restoration (`kwon`) and its
            label-free variant (`kwon_lf`), and the FLOPs (MACs) and latency (this
            device's measured MMT table) constraints beside the parameter one
            (`sweep.costs`; full fine-tuning only under the parameter budget,
            `sweep.finetune_costs`).
  `:flops`  the default grid with the constraint on MACs only ("best model at a
            given speed"); `:latency` the same on measured latency.
  `:tiny`   the CI smoke variant: one seed (run in the workdir itself, so it reuses
            the data, base model, t* and pseudo-labels of configs/synthetic.py:tiny),
            one constraint, every restoration.
"""

import ml_collections

from configs import synthetic as _synthetic

ALL_RESTORATIONS = ("none", "rest", "finetune", "kwon", "kwon_lf")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = _synthetic.get_config("tiny" if arg == "tiny" else None)
  config.sweep = ml_collections.ConfigDict(dict(
      criteria=("lfpr", "lfpr_ps", "l1", "alg", "fisher"),
      restorations=("none", "rest"),
      constraints=(0.2, 0.4, 0.6, 0.8),
      costs=("params",),  # and/or "flops" (Kwon's MACs), "latency" (measured table)
      # The budgets full fine-tuning runs under (an epoch over all the data per cell:
      # the costliest baseline, and a rate not tuned per budget): the parameter one.
      finetune_costs=("params",),
      # Seeds: each shifts `seed` and `data.synthetic.seed` (a new dataset and base
      # model per seed, in <workdir>/seed_<i>/); 1 runs in the workdir itself.
      seeds=3,
      # Every method meets the budget, so rows compare at equal size (upstream's
      # "sum" may exceed it when head scores dominate, e.g. l1 and alg's normalised
      # head scores; configs/synthetic.py keeps upstream's behaviour for LFPR).
      strict_budget=True,
      alg_normalize_by_layer=True,
      kwon_tune_samples=256,
      # Full fine-tuning: (regex, lr group) rules of the trained parameters (all), at
      # ReSt's rate, so the two rows differ in data, labels and trained parameters only.
      finetune=ml_collections.ConfigDict(dict(percent=100, lr=config.rest.lr,
                                              trainable=((".*", "base"),))),
  ))
  if arg == "tiny":
    config.sweep.update(criteria=("lfpr", "fisher"),
                        constraints=(0.4,), kwon_tune_samples=32, seeds=1,
                        restorations=ALL_RESTORATIONS)
  elif arg == "full":
    config.sweep.update(restorations=ALL_RESTORATIONS,
                        costs=("params", "flops", "latency"))
  elif arg in ("flops", "latency"):
    config.sweep.costs = (arg,)
  elif arg:
    raise ValueError(f"unknown variant {arg!r}; known: 'tiny', 'full', 'flops', 'latency'.")
  return config
