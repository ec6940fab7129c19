"""Padded vs length-trimmed TAP (`lfpr_jax.models.trim`) on the CPU, side by side.

Run from the repository root (about 10 minutes on 2 quiet cores, most of it compiling
one program per trimmed shape):

  python -m benchmarks.trim_speed --batch 16 --batches 3 --repeats 3 \
      --out benchmarks/results/trim_speed.json
  python -m benchmarks.trim_speed --stages eval --batch 16 --eval-pool 6 \
      --repeats 2 --simulate 50      # the evaluation pass only (about 4 minutes)

Full-size TAP, float32 (`--compute-dtype bfloat16`: bfloat16 matmuls), random weights
(`init_params`). Batches follow a TextVQA-like
length distribution (`textvqa_like_lengths`): questions of 5-14 words (about 1.2
wordpieces per word plus [CLS]/[SEP]), no OCR token for 15% of images, otherwise
typically 5-40 tokens and rarely up to 100 (1.5 wordpieces each in the text stream),
10-100 objects with 70% of images at 100 (the object-name stream, 50 wordpieces, is
almost always full). Stages, each padded (always 382 MMT rows) and trimmed (bucketed
to the batch's longest valid lengths, `trim.DEFAULT_BUCKETS` unless `--buckets`):

  forward   teacher-forced scores, eval mode (the trimmed one includes
            `restore_scores`, on device);
  greedy    cached greedy decoding, 12 steps (`greedy_decode`).
  train_grad  value_and_grad of the M4C loss w.r.t. all params (eval mode, as
            `benchmarks.precision`): the work of a training step (base model, ReSt);
  mask_grad the scoring step: grad of the M4C loss w.r.t. the head and FFN masks (run
            it with `--batch 8`, LFPR's scoring batch);
  eval      the greedy evaluation pass as `evaluate(config.trim)` runs it, over a pool
            of `--eval-pool` batches of TextVQA-like examples: padded in data order
            (one program) vs sorted by length (`parallel.length_order`) and trimmed on
            the host (`trim_batch`, timed with it) with one program per shape
            (`evaluate.greedy_predictor(trim=True)`); argmax indices checked equal
            after unsorting. Reported: the first pass including every compile (what
            one evaluation costs) and the steady-state passes, alternating padded /
            trimmed pass by pass.

Every program is compiled ahead of time (reported, not timed). The timed calls
alternate padded / trimmed batch by batch, so machine noise (the machine is shared)
hits both alike; `/proc/loadavg` is recorded before and after. Host-side trimming
(`trim_batch`) is timed separately. Also reported, without running anything: the
FLOP fraction a trimmed batch executes (`benchmarks.common` FLOP counts), as the mean
over `--simulate` random batches, and the number of distinct shapes they produce, for
several bucket sets.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from lfpr_jax.models import trim
from lfpr_jax.models.batch import model_inputs
from lfpr_jax.models.config import TapConfig
from lfpr_jax.models.decoding import greedy_decode
from lfpr_jax.models.losses import m4c_decoding_bce
from lfpr_jax.models.params import init_params
from lfpr_jax.models.tap import TAP
from lfpr_jax.training import evaluate as evaluation
from lfpr_jax.training import parallel

STAGES = ("forward", "greedy", "eval", "train_grad", "mask_grad")
BUCKET_SETS = {
    "pow2 (8,16,32,64) [default]": (8, 16, 32, 64),
    "multiples of 8": tuple(range(8, 100, 8)),
    "multiples of 16": tuple(range(16, 100, 16)),
    "none (full size)": (10_000,),
}


def textvqa_like_lengths(rng: np.random.Generator, config: TapConfig, batch_size: int
                         ) -> np.ndarray:
  """Per-example valid lengths `[B, 5]` (`trim.SEGMENTS` order) of TextVQA-like images."""
  c = config
  out = []
  for _ in range(batch_size):
    words = int(rng.integers(5, 15))
    q = min(c.question_len, 2 + int(round(words * rng.uniform(1.0, 1.4))))
    if rng.random() < 0.15:
      n_ocr = 0
    elif rng.random() < 0.9:
      n_ocr = int(rng.integers(5, 41))
    else:
      n_ocr = int(rng.integers(41, c.ocr_max + 1))
    o = min(c.ocr_text_len, 2 + int(round(n_ocr * rng.uniform(1.2, 1.8))))
    n_obj = c.obj_max if rng.random() < 0.7 else int(rng.integers(10, c.obj_max))
    t = min(c.obj_text_len, 2 + int(round(n_obj * 1.3)))
    out.append((q, o, t, n_obj, min(n_ocr, c.ocr_max)))
  return np.asarray(out)


def make_batch(rng: np.random.Generator, config: TapConfig, lengths: np.ndarray
               ) -> dict[str, np.ndarray]:
  """`common.random_batch` with the given per-example lengths imposed (model inputs)."""
  c = config
  b = common.random_batch(rng, c, len(lengths))
  text = np.zeros_like(b["cmb_text"])
  starts = (0, c.question_len, c.question_len + c.ocr_text_len)
  for i, row in enumerate(lengths):
    for k, (start, n) in enumerate(zip(starts, row[:3])):
      text[i, start] = 101 if k == 0 else 102
      text[i, start + 1:start + n - 1] = rng.integers(1000, 30522, max(n - 2, 0))
      text[i, start + n - 1] = 102
  b["cmb_text"] = text
  b["obj_num"], b["ocr_num"] = lengths[:, 3], lengths[:, 4]
  obj_valid = (np.arange(c.obj_max)[None] < lengths[:, 3:4])[..., None]
  ocr_valid = (np.arange(c.ocr_max)[None] < lengths[:, 4:5])[..., None]
  for name in ("image_feature_0", "obj_bbox_coordinates"):
    b[name] = b[name] * obj_valid
  for name in ("image_feature_1", "context_feature_0", "context_feature_1",
               "ocr_bbox_coordinates"):
    b[name] = b[name] * ocr_valid
  # Copies of OCR slots that no longer exist become answer words.
  prev = b["train_prev_inds"]
  bad = (prev >= c.num_answers) & (prev - c.num_answers >= lengths[:, 4:5])
  b["train_prev_inds"] = np.where(bad, 4, prev)
  b["targets"][..., c.num_answers:] *= ocr_valid[:, None, :, 0]
  return {k: np.asarray(v) for k, v in model_inputs(b, c, with_targets=True).items()}


def flop_fraction(config: TapConfig, trimmed: TapConfig, batch_size: int = 1
                  ) -> dict[str, float]:
  """Trimmed / padded FLOPs per stage (the gradient stages: the forward's fraction,
  backward FLOPs being proportional to the forward's). Packed row-wise work
  (`pack_rows`) is counted on the packed rows (`common.forward_flops`)."""
  forward = (common.forward_flops(trimmed, batch_size)["total"]
             / common.forward_flops(config)["total"])
  return {"forward": forward, "train_grad": forward, "mask_grad": forward,
          "greedy": _greedy_fraction(config, trimmed, batch_size)}


def _greedy_fraction(config: TapConfig, trimmed: TapConfig, batch_size: int = 1
                     ) -> float:
  """Cached greedy decoding: the encoder part packed as in `forward_flops`, the
  single-row steps unchanged."""
  unpacked = trim.unpacked(trimmed)
  fwd, fwd_unpacked = (common.forward_flops(c, batch_size)
                       for c in (trimmed, unpacked))
  saved = ((fwd_unpacked["text_bert"] - fwd["text_bert"])
           + (fwd_unpacked["mmt"] - fwd["mmt"])
           * trimmed.encoder_len / max(trimmed.mmt_len, 1))
  return ((common.greedy_cached_flops(unpacked) - saved)
          / common.greedy_cached_flops(config))


def simulate(config: TapConfig, batch_size: int, n: int, seed: int) -> dict[str, Any]:
  """Mean FLOP fraction and distinct shapes over n random batches, per bucket set."""
  rng = np.random.default_rng(seed)
  batches = [textvqa_like_lengths(rng, config, batch_size) for _ in range(n)]
  maxima = [b.max(0) for b in batches]
  full = trim.segment_sizes(config)
  out = {}
  packed = []
  for lengths, mx in zip(batches, maxima):
    tc = trim.trimmed_config(config, [trim.bucket_size(int(m), f) for m, f in
                                      zip(mx, full)])
    text = int(lengths[:, :3].sum())
    enc = text + int(lengths[:, 3:].sum())
    tc = dataclasses.replace(tc, pack_rows=(
        trim.pack_bucket(text, batch_size * tc.text_len),
        trim.pack_bucket(enc, batch_size * tc.encoder_len)))
    packed.append(flop_fraction(config, tc, batch_size))
  out["pow2 + packed rows (trim_batch(pack=True), data order)"] = {
      "forward_flop_fraction": statistics.mean(f["forward"] for f in packed),
      "greedy_flop_fraction": statistics.mean(f["greedy"] for f in packed)}
  for name, buckets in BUCKET_SETS.items():
    sizes = [tuple(trim.bucket_size(int(m), f, buckets) for m, f in zip(mx, full))
             for mx in maxima]
    fr = [flop_fraction(config, trim.trimmed_config(config, s)) for s in sizes]
    out[name] = {
        "possible_shapes": trim.num_shapes(config, buckets),
        "distinct_shapes": len(set(sizes)),
        "forward_flop_fraction": statistics.mean(f["forward"] for f in fr),
        "greedy_flop_fraction": statistics.mean(f["greedy"] for f in fr),
    }
  # Order-free stages: a pool of n batches sorted by total length, then cut in order.
  pool = np.concatenate([textvqa_like_lengths(rng, config, batch_size)
                         for _ in range(n)])
  pool = pool[trim.sort_by_length(np.arange(len(pool)), pool.sum(1))[0]]
  sizes = [tuple(trim.bucket_size(int(m), f, trim.DEFAULT_BUCKETS)
                 for m, f in zip(pool[i:i + batch_size].max(0), full))
           for i in range(0, len(pool), batch_size)]
  fr = [flop_fraction(config, trim.trimmed_config(config, s)) for s in sizes]
  out["pow2, pool sorted by total length (sort_by_length)"] = {
      "distinct_shapes": len(set(sizes)),
      "forward_flop_fraction": statistics.mean(f["forward"] for f in fr),
      "greedy_flop_fraction": statistics.mean(f["greedy"] for f in fr)}
  exact = [flop_fraction(config, trim.trimmed_config(
      config, [max(int(m), 1) for m in mx])) for mx in maxima]
  out["exact lengths (no buckets)"] = {
      "forward_flop_fraction": statistics.mean(f["forward"] for f in exact),
      "greedy_flop_fraction": statistics.mean(f["greedy"] for f in exact)}
  return out


def eval_stage(config: TapConfig, params: Any, rng: np.random.Generator, *,
               batch: int, pool: int, repeats: int, buckets: Sequence[int],
               pack: bool = True) -> dict[str, Any]:
  """Greedy evaluation of `pool * batch` examples, padded vs sorted + trimmed."""
  lengths = np.concatenate([textvqa_like_lengths(rng, config, batch)
                            for _ in range(pool)])
  n = len(lengths)
  data = make_batch(rng, config, lengths)
  mesh = parallel.make_mesh(jax.devices()[:1])
  padded_fn = evaluation.greedy_predictor(config, mesh, 1, trim=False)
  order = parallel.length_order(lengths, config, num_records=n, local_batch=batch,
                                mesh=mesh, buckets=buckets)
  take = lambda idx: {k: v[idx] for k, v in data.items()}  # noqa: E731
  chunks = [np.arange(i, min(i + batch, n)) for i in range(0, n, batch)]
  padded_batches = [take(c) for c in chunks]
  sorted_batches = [take(order.indices[c]) for c in chunks]

  def run_padded():
    return [np.asarray(padded_fn(params, jax.device_put(b))) for b in padded_batches]

  def run_trimmed(fn):
    out, sizes = [], []
    for b in sorted_batches:  # host trim is part of the timed pass, as in evaluate
      cut, tc, info = trim.trim_batch(b, config, buckets=buckets, pack=pack)
      cut["text_position_ids"] = np.broadcast_to(cut["text_position_ids"][None],
                                                 (len(b["cmb_text"]),
                                                  len(info.text_columns))).copy()
      out.append(np.asarray(fn.specialised(tc)(jax.device_put(cut), params)))
      sizes.append((info.sizes, tc))
    return out, sizes

  trimmed_fn = evaluation.greedy_predictor(config, mesh, 1, trim=True, buckets=buckets)
  load = {"before": loadavg()}
  first = {}
  t0 = time.perf_counter()
  ref = run_padded()
  first["padded"] = time.perf_counter() - t0
  t0 = time.perf_counter()
  got, sizes = run_trimmed(trimmed_fn)
  first["trimmed"] = time.perf_counter() - t0
  ref = np.concatenate(ref)
  got = np.concatenate(got)[parallel.data_order(order.positions)]
  equal = bool(np.array_equal(ref, got))
  common.log(f"[eval] first pass (with compiles): padded {first['padded']:.1f} s, "
             f"trimmed {first['trimmed']:.1f} s, {trimmed_fn.num_specialisations} "
             f"trimmed programs; argmax equal: {equal}")
  steady = {"padded": [], "trimmed": []}
  for r in range(repeats):
    t0 = time.perf_counter()
    run_padded()
    steady["padded"].append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    run_trimmed(trimmed_fn)
    steady["trimmed"].append(time.perf_counter() - t0)
    common.log(f"[eval] round {r}: padded {steady['padded'][-1]:.2f} s, trimmed "
               f"{steady['trimmed'][-1]:.2f} s")
  pad, cut = statistics.median(steady["padded"]), statistics.median(steady["trimmed"])
  unsorted_sizes = {tuple(trim.bucket_size(int(m), f, buckets) for m, f in
                          zip(lengths[c].max(0), trim.segment_sizes(config)))
                    for c in chunks}
  load["after"] = loadavg()
  return {"examples": n, "batches": len(chunks), "argmax_equal": equal, "loadavg": load,
          "compiles": {"padded": 1, "trimmed": trimmed_fn.num_specialisations},
          "shapes_unsorted": len(unsorted_sizes), "sizes": [z for z, _ in sizes],
          "pack_rows": [tc.pack_rows for _, tc in sizes],
          "first_pass_s": first, "first_pass_ratio": first["padded"] / first["trimmed"],
          "steady_s": steady, "padded_s": pad, "trimmed_s": cut,
          "speedup": pad / cut, "time_fraction": cut / pad,
          "flop_fraction": statistics.mean(flop_fraction(config, tc, batch)["greedy"]
                                           for _, tc in sizes)}


def loadavg() -> Optional[str]:
  try:
    with open("/proc/loadavg") as f:
      return f.read().strip()
  except OSError:
    return None


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--arch", default="tap", choices=("tap", "tap12"))
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--batches", type=int, default=3, help="distinct random batches")
  p.add_argument("--repeats", type=int, default=3, help="timed rounds over all batches")
  p.add_argument("--stages", default="forward,greedy,eval")
  p.add_argument("--eval-pool", type=int, default=8,
                 help="batches of examples in the eval stage's pool")
  p.add_argument("--buckets", default=None,
                 help="comma-separated bucket sizes (default trim.DEFAULT_BUCKETS)")
  p.add_argument("--simulate", type=int, default=2000,
                 help="random batches for the FLOP-fraction statistics")
  p.add_argument("--sorted-pool", type=int, default=0,
                 help="if > 0: time batches cut from this many batches' worth of "
                      "examples sorted by total length (trim.sort_by_length)")
  p.add_argument("--compute-dtype", default="float32", choices=("float32", "bfloat16"),
                 help="matmul precision (TapConfig.compute_dtype)")
  p.add_argument("--no-pack", action="store_true",
                 help="trimmed batches without packed rows (trim_batch(pack=False); "
                      "default: packed, as one device runs them)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=None, help="JSON output path")
  args = p.parse_args(argv)
  if args.batch < 1 or args.batches < 1 or args.repeats < 1:
    p.error("--batch, --batches and --repeats must be >= 1")
  args.stages = [s for s in args.stages.split(",") if s]
  if not set(args.stages) <= set(STAGES) or not args.stages:
    p.error(f"--stages must name some of {', '.join(STAGES)}")
  return args


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  args = parse_args(argv)
  config = dataclasses.replace(common.make_config(args.arch),
                               compute_dtype=args.compute_dtype)
  buckets = (trim.DEFAULT_BUCKETS if args.buckets is None
             else tuple(int(x) for x in args.buckets.split(",")))
  rng = np.random.default_rng(args.seed)
  params = init_params(config, jax.random.key(args.seed))

  def forward(c):
    model = TAP(c)
    return lambda p, x: model.apply({"params": p}, x)

  def greedy(c):
    model = TAP(c)
    return lambda p, x: greedy_decode(model, {"params": p}, x)

  def train_grad(c):
    model = TAP(c)

    def loss(p, x):
      return m4c_decoding_bce(model.apply({"params": p}, x), x["targets"],
                              x["train_loss_mask"])
    return jax.value_and_grad(loss)

  def mask_grad(c):
    model = TAP(c)
    ones = (jnp.ones((c.mmt_layers, c.mmt_heads[0]), jnp.float32),
            jnp.ones((c.mmt_layers, c.mmt_ffn[0]), jnp.float32))

    def loss(hm, fm, p, x):
      return m4c_decoding_bce(model.apply({"params": p}, x, head_mask=hm, ffn_mask=fm),
                              x["targets"], x["train_loss_mask"])
    return lambda p, x: jax.grad(loss, argnums=(0, 1))(*ones, p, x)

  stage_fns = {"forward": forward, "greedy": greedy, "train_grad": train_grad,
               "mask_grad": mask_grad}
  batches = []
  if args.sorted_pool:
    # Batches cut from a sorted pool of sorted_pool batches (an order-free stage
    # using sort_by_length): evenly spaced slices, short to long.
    pool = np.concatenate([textvqa_like_lengths(rng, config, args.batch)
                           for _ in range(args.sorted_pool)])
    pool = pool[trim.sort_by_length(np.arange(len(pool)), pool.sum(1))[0]]
    starts = np.linspace(0, len(pool) - args.batch, args.batches).astype(int)
  for i in range(args.batches):
    if args.sorted_pool:
      lengths = pool[starts[i]:starts[i] + args.batch]
    else:
      lengths = textvqa_like_lengths(rng, config, args.batch)
    padded = make_batch(rng, config, lengths)
    t0 = time.perf_counter()
    trimmed, tc, info = trim.trim_batch(padded, config, buckets=buckets,
                                        pack=not args.no_pack)
    trim_s = time.perf_counter() - t0
    padded = jax.device_put(padded)
    trimmed = jax.device_put({k: v for k, v in trimmed.items()})
    batches.append(dict(padded=padded, trimmed=trimmed, config=tc, info=info,
                        trim_s=trim_s, lengths=info.lengths, sizes=info.sizes,
                        flop_fraction=flop_fraction(config, tc, args.batch)))
    common.log(f"batch {i}: longest {info.lengths} -> sizes {info.sizes}, MMT rows "
               f"{tc.mmt_len} of {config.mmt_len}, packed rows {tc.pack_rows}")

  load_before = loadavg()
  results: dict[str, Any] = {}
  if "eval" in args.stages:
    results["eval"] = eval_stage(config, params, rng, batch=args.batch,
                                 pool=args.eval_pool, repeats=args.repeats,
                                 buckets=buckets, pack=not args.no_pack)
  for stage in (s for s in args.stages if s != "eval"):
    compiled, compile_s = {}, {"padded": 0.0, "trimmed": 0.0}
    t0 = time.perf_counter()
    compiled["padded"] = jax.jit(stage_fns[stage](config)).lower(
        params, batches[0]["padded"]).compile()
    compile_s["padded"] = time.perf_counter() - t0
    for bt in batches:
      key = ("trimmed", bt["config"])  # may equal config, but takes position ids
      if key not in compiled:
        t0 = time.perf_counter()
        fn = stage_fns[stage](bt["config"])
        if stage == "forward":  # restore the full score width, as a caller would
          inner, info = fn, bt["info"]
          fn = lambda p, x, inner=inner, info=info: trim.restore_scores(  # noqa: E731
              inner(p, x), config, info)
        compiled[key] = jax.jit(fn).lower(params, bt["trimmed"]).compile()
        compile_s["trimmed"] += time.perf_counter() - t0
    common.log(f"[{stage}] compiled {len(compiled)} programs "
               f"(padded {compile_s['padded']:.1f} s, trimmed {compile_s['trimmed']:.1f} s)")
    times = {"padded": [[] for _ in batches], "trimmed": [[] for _ in batches]}
    for r in range(args.repeats + 1):  # round 0 is the excluded warm-up
      for i, bt in enumerate(batches):
        for kind in ("padded", "trimmed"):
          fn = compiled["padded" if kind == "padded" else ("trimmed", bt["config"])]
          t0 = time.perf_counter()
          jax.block_until_ready(fn(params, bt[kind]))
          dt = time.perf_counter() - t0
          if r:
            times[kind][i].append(dt)
      common.log(f"[{stage}] round {r}{' (warm-up)' if not r else ''} done")
    per_batch = []
    for i, bt in enumerate(batches):
      pad, cut = statistics.median(times["padded"][i]), statistics.median(
          times["trimmed"][i])
      per_batch.append({"sizes": bt["sizes"], "padded_s": pad, "trimmed_s": cut,
                        "speedup": pad / cut,
                        "flop_fraction": bt["flop_fraction"][stage]})
    tot_pad = sum(b["padded_s"] for b in per_batch)
    tot_cut = sum(b["trimmed_s"] for b in per_batch)
    results[stage] = {"compile_s": compile_s, "programs": len(compiled),
                      "per_batch": per_batch, "padded_total_s": tot_pad,
                      "trimmed_total_s": tot_cut, "speedup": tot_pad / tot_cut,
                      "time_fraction": tot_cut / tot_pad,
                      "flop_fraction": statistics.mean(
                          b["flop_fraction"] for b in per_batch)}
    common.log(f"[{stage}] padded {tot_pad:.2f} s, trimmed {tot_cut:.2f} s over "
               f"{len(batches)} batches: speed-up x{tot_pad / tot_cut:.2f}, FLOP "
               f"fraction {results[stage]['flop_fraction']:.3f}")
  result = {
      "arch": args.arch, "compute_dtype": args.compute_dtype,
      "batch": args.batch, "batches": args.batches,
      "repeats": args.repeats, "buckets": list(buckets), "seed": args.seed,
      "sorted_pool": args.sorted_pool, "pack": not args.no_pack,
      "loadavg_before": load_before, "loadavg_after": loadavg(),
      "cpu": common.cpu_model(), "jax": jax.__version__,
      "trim_batch_host_s": [b["trim_s"] for b in batches],
      "stages": results,
      "simulated": simulate(config, args.batch, args.simulate, args.seed + 1),
  }
  print(json.dumps(result, indent=1))
  if args.out:
    common.write_json(args.out, result)
  return result


if __name__ == "__main__":
  main()
