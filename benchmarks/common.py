"""Framework-free helpers shared by the JAX and the PyTorch CPU benchmarks of TAP.

Imports only the standard library, numpy and `lfpr_jax.models.config` (itself
jax-free), so `benchmarks.torch_reference` runs in a torch-only venv. Holds what
both benchmarks must agree on: the random batch, the analytic FLOP counts, the
stage names, the JSON schema (timing summaries, machine info, ratios to the
upstream figures) and the atomic JSON writer. Not an entry point: run
`python -m benchmarks.tap_cpu` or `python -m benchmarks.torch_reference`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
import types
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from lfpr_jax.models.config import KNOWN_ARCHS, TapConfig

SCHEMA = "lfpr_jax.benchmarks.tap_cpu/1"

# Upstream PyTorch TAP on machines of this kind (2 cores, torch 2.13 CPU, 2 threads,
# full TAP, batch 16, float32, median of 5; `golden/README.md` (docs/README.md §4)). Read-only.
UPSTREAM = types.MappingProxyType({
    "source": "upstream PyTorch TAP (m4c_split), torch 2.13 CPU, 2 threads, full TAP, "
              "batch 16, float32, median of 5 (shared/golden/README.md)",
    "arch": "tap",
    "batch": 16,
    "machines": {
        "intel_xeon": {"forward": 2.83, "train_step": 8.94, "greedy": 25.6,
                       "matmul_gflops": 300.0, "forward_gflops": 190.0},
        "amd_epyc": {"forward": 5.12, "train_step": 15.06, "greedy": 38.9},
    },
    "forward_gflop_per_sample": 33.7,
    "peak_rss_gb": 4.8,
    "run_to_run_spread": "about +-15%",
})

# Stage name -> which upstream figure it is compared with (None: not compared).
UPSTREAM_FIGURE = types.MappingProxyType({
    "forward": "forward",
    "train_step": "train_step",
    "train_step_dropout": "train_step",
    "greedy_cached": "greedy",
    "greedy_reference": "greedy",
})

MATMUL_N = 4096


# Argument handling ------------------------------------------------------------------

def base_parser(description: str, default_out: str, stages: Sequence[str]
                ) -> argparse.ArgumentParser:
  """The flags both benchmarks share.

  Args:
    description: the `--help` text.
    default_out: default JSON path.
    stages: the stage names this benchmark knows (for `--stages`).

  Returns:
    An `argparse.ArgumentParser`; the caller may add flags before parsing.
  """
  p = argparse.ArgumentParser(
      description=description,
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--arch", default="tap",
                 help=f"model architecture, one of {sorted(KNOWN_ARCHS)}")
  p.add_argument("--batch", type=int, default=16, help="batch size (>= 1)")
  p.add_argument("--repeats", type=int, default=5,
                 help="timed calls per stage, after one excluded warm-up call")
  p.add_argument("--out", default=default_out, help="JSON result path")
  p.add_argument("--seed", type=int, default=0,
                 help="seed of the weights, the batch and the dropout masks")
  p.add_argument("--skip-reference", action="store_true",
                 help="skip the upstream-style 12-full-pass greedy decoding")
  p.add_argument("--skip-dropout", action="store_true",
                 help="skip the dropout-on (train mode) forward+loss+backward")
  p.add_argument("--stages", default=",".join(stages),
                 help="comma-separated subset of: " + ",".join(stages))
  p.add_argument("--quiet", action="store_true", help="do not print the table")
  return p


def validate_args(parser: argparse.ArgumentParser, args: argparse.Namespace,
                  stages: Sequence[str]) -> list[str]:
  """Checks the shared flags; returns the stages to run, in canonical order.

  Raises:
    SystemExit: through `parser.error` (usage + a message naming the bad flag,
      exit status 2).
  """
  if args.arch not in KNOWN_ARCHS:
    parser.error(f"--arch must be one of {sorted(KNOWN_ARCHS)}, got {args.arch!r}.")
  if args.batch < 1:
    parser.error(f"--batch must be >= 1, got {args.batch}.")
  if args.repeats < 1:
    parser.error(f"--repeats must be >= 1, got {args.repeats}.")
  wanted = [s.strip() for s in args.stages.split(",") if s.strip()]
  unknown = sorted(set(wanted) - set(stages))
  if unknown:
    parser.error(f"unknown --stages {unknown}; known: {list(stages)}.")
  if not wanted:
    parser.error("--stages selects no stage.")
  skip = set()
  if args.skip_reference:
    skip.add("greedy_reference")
  if args.skip_dropout:
    skip.add("train_step_dropout")
  return [s for s in stages if s in wanted and s not in skip]


def make_config(arch: str) -> TapConfig:
  """Full-size `TapConfig` of a known architecture name."""
  return TapConfig.tap() if arch == "tap" else TapConfig.tap12()


# The random batch -------------------------------------------------------------------

def _text_segment(rng: np.random.Generator, length: int, min_len: int, first_id: int
                  ) -> np.ndarray:
  """`[first_id] wordpieces... [SEP]` right-padded with zeros to `length`."""
  seg = np.zeros(length, np.int64)
  n = int(rng.integers(min_len, length + 1))
  seg[0] = first_id
  seg[1:n - 1] = rng.integers(1000, 30522, size=n - 2)
  seg[n - 1] = 102
  return seg


def _boxes(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
  """Normalised x1, y1, x2, y2 boxes with x1 < x2, y1 < y2, `[B, N, 4]` float32."""
  a = rng.random(shape + (2,))
  b = rng.random(shape + (2,))
  return np.concatenate([np.minimum(a, b), np.maximum(a, b)], -1).astype(np.float32)


def random_batch(rng: np.random.Generator, config: TapConfig, batch_size: int
                 ) -> dict[str, np.ndarray]:
  """A random batch shaped and laid out like a real TextVQA batch (docs/TAP.md §3.2, §3.5).

  `cmb_text` holds `[CLS] question [SEP] 0.. | [SEP] ocr words [SEP] 0.. | [SEP]
  object tags [SEP] 0..` with random wordpiece ids in [1000, 30522) and random segment
  lengths (so padding zeros sit inside the sequence, as upstream). obj_num / ocr_num
  are uniform in 1..100 and feature rows past them are zero. Detector features are
  non-negative (post-ReLU fc6), FastText vectors Gaussian, PHOC binary. Decoding:
  a random number of supervised steps, BOS then random answer/OCR indices as
  teacher-forcing inputs, soft targets at step 0 and one-hot next-token targets after.

  Args:
    rng: numpy generator (created once by the caller).
    config: model shapes.
    batch_size: B.

  Returns:
    Upstream-named numpy arrays: the model fields of `lfpr_jax.models.batch.model_inputs`
    plus `targets` `[B, T, C]` and `train_loss_mask` `[B, T]`.
  """
  c, b = config, batch_size
  q_len = c.question_len
  ocr_len = (c.text_len - q_len) * 2 // 3  # 100 of the 150 non-question ids
  obj_len = c.text_len - q_len - ocr_len
  text = np.stack([
      np.concatenate([_text_segment(rng, q_len, 4, 101),
                      _text_segment(rng, ocr_len, 2, 102),
                      _text_segment(rng, obj_len, 2, 102)])
      for _ in range(b)])
  obj_num = rng.integers(1, c.obj_max + 1, size=b)
  ocr_num = rng.integers(1, c.ocr_max + 1, size=b)
  obj_valid = (np.arange(c.obj_max)[None] < obj_num[:, None])[..., None]
  ocr_valid = (np.arange(c.ocr_max)[None] < ocr_num[:, None])[..., None]

  def feats(shape, valid, kind):
    if kind == "relu":
      x = np.maximum(rng.standard_normal(shape, np.float32), 0.0) * 2.0
    elif kind == "gauss":
      x = rng.standard_normal(shape, np.float32) * 0.3
    else:  # binary (PHOC)
      x = (rng.random(shape) < 0.05).astype(np.float32)
    return (x * valid).astype(np.float32)

  steps, classes = c.decode_steps, c.num_classes
  n_dec = rng.integers(1, steps + 1, size=b)
  # Answer words (indices 4.. of the vocabulary) or copies of valid OCR slots.
  is_copy = rng.random((b, steps)) < 0.3
  seq = np.where(is_copy,
                 c.num_answers + rng.integers(0, ocr_num[:, None], size=(b, steps)),
                 rng.integers(4, c.num_answers, size=(b, steps)))
  prev = np.zeros((b, steps), np.int64)
  prev[:, 0] = 1  # BOS
  loss_mask = (np.arange(steps)[None] < n_dec[:, None]).astype(np.float32)
  prev[:, 1:] = seq[:, :-1] * loss_mask[:, 1:].astype(np.int64)
  targets = np.zeros((b, steps, classes), np.float32)
  for i in range(b):
    targets[i, 0, seq[i, 0]] = 1.0
    for k in rng.integers(4, c.num_answers, size=2):  # other soft VQA scores
      targets[i, 0, k] = max(targets[i, 0, k], float(rng.choice([0.3, 0.6])))
    for t in range(1, int(n_dec[i])):
      targets[i, t, seq[i, t] if t < n_dec[i] - 1 else 2] = 1.0  # 2 = EOS
  return {
      "cmb_text": text,
      "image_feature_0": feats((b, c.obj_max, c.obj_feat_dim), obj_valid, "relu"),
      "obj_bbox_coordinates": _boxes(rng, (b, c.obj_max)) * obj_valid,
      "obj_num": obj_num,
      "image_feature_1": feats((b, c.ocr_max, c.ocr_feat_dim), ocr_valid, "relu"),
      "context_feature_0": feats((b, c.ocr_max, c.fasttext_dim), ocr_valid, "gauss"),
      "context_feature_1": feats((b, c.ocr_max, c.phoc_dim), ocr_valid, "binary"),
      "ocr_bbox_coordinates": _boxes(rng, (b, c.ocr_max)) * ocr_valid,
      "ocr_num": ocr_num,
      "train_prev_inds": prev,
      "targets": targets,
      "train_loss_mask": loss_mask,
  }


# Analytic FLOPs (2 per multiply-add; matmuls and attention only) --------------------

def _bert_layer_flops(c: TapConfig, rows: int, keys: int, heads: int, ffn: int,
                      packed: Optional[float] = None) -> float:
  """One post-LN BERT layer: `rows` query rows attending over `keys` keys; with
  `packed`, the row-wise work (projections, FFN) runs on that many rows instead."""
  d, inner = c.hidden_size, heads * c.head_dim
  p = rows if packed is None else packed
  return (2 * p * d * inner * 3       # Q, K, V (keys: only for rows computed here)
          + 2 * p * inner * d         # attention output dense
          + 2 * 2 * rows * keys * inner  # Q K^T and P V
          + 2 * 2 * p * d * ffn)      # FFN in and out


def forward_flops(c: TapConfig, batch_size: Optional[int] = None) -> dict[str, float]:
  """Per-sample FLOPs of one teacher-forced forward pass, by component.

  A config with `pack_rows` (packed execution, counts for a whole batch) needs
  `batch_size`: its text-BERT and MMT row-wise work is counted on the packed rows.

  Returns:
    `{'text_bert', 'obj_ocr_encoders', 'mmt', 'heads', 'total'}` in FLOPs; the full
    TAP gives about 33.7e9 (MMT 23.4, text-BERT 7.5, encoders 2.5, heads 0.2).
  """
  d, n_o, n_c, t = c.hidden_size, c.obj_max, c.ocr_max, c.decode_steps
  packed_text = packed_mmt = None
  if any(c.pack_rows):
    if not batch_size:
      raise ValueError("a config with pack_rows needs batch_size (its counts are "
                       "for the whole batch).")
    packed_text = c.pack_rows[0] / batch_size if c.pack_rows[0] else None
    packed_mmt = c.pack_rows[1] / batch_size + t if c.pack_rows[1] else None
  text = c.text_bert_layers * _bert_layer_flops(c, c.text_len, c.text_len,
                                                c.text_heads, c.text_ffn, packed_text)
  enc = (2 * n_o * c.obj_feat_dim * c.fc7_dim + 2 * n_o * c.fc7_dim * d + 2 * n_o * 4 * d
         + 2 * n_c * c.ocr_feat_dim * c.fc7_dim + 2 * n_c * c.ocr_in_dim * d
         + 2 * n_c * 4 * d)
  s = c.mmt_len
  mmt = sum(_bert_layer_flops(c, s, s, h, f, packed_mmt)
            for h, f in zip(c.mmt_heads, c.mmt_ffn))
  heads = _heads_flops(c, t)
  parts = {"text_bert": text, "obj_ocr_encoders": enc, "mmt": mmt, "heads": heads}
  parts["total"] = sum(parts.values())
  return parts


def _heads_flops(c: TapConfig, rows: int) -> float:
  """Classifier + OCR pointer net for `rows` decoder rows (pointer keys once)."""
  d, q = c.hidden_size, c.ptr_query_key_size
  return (2 * rows * d * c.num_answers + 2 * rows * d * q + 2 * c.ocr_max * d * q
          + 2 * rows * c.ocr_max * q)


def greedy_reference_flops(c: TapConfig, *, text_bert_once: bool = False) -> float:
  """The 12-full-pass greedy loop per sample.

  Args:
    c: model shapes.
    text_bert_once: False counts upstream's loop (obj/OCR encoders once, T x
      (text-BERT + MMT + heads)). True counts text-BERT once: it does not depend
      on the decoder inputs, and XLA deduplicates the T identical copies in the
      jitted JAX loop.
  """
  f = forward_flops(c)
  t = c.decode_steps
  text = f["text_bert"] * (1 if text_bert_once else t)
  return f["obj_ocr_encoders"] + text + t * (f["mmt"] + f["heads"])


def greedy_cached_flops(c: TapConfig) -> float:
  """Cached greedy decoding per sample: the 370 encoder rows once, then T single rows.

  Each step attends over the 370 cached encoder keys plus the T-row decoder buffer
  (masked past t) and runs the output heads on one row. Counts the pointer-net keys
  of the OCR rows once (an implementation that recomputes them per step does
  2 * 100 * 768^2 = 0.12 GFLOP more per step).
  """
  f = forward_flops(c)
  n_enc, t = c.encoder_len, c.decode_steps
  enc_mmt = sum(_bert_layer_flops(c, n_enc, n_enc, h, ff)
                for h, ff in zip(c.mmt_heads, c.mmt_ffn))
  step = sum(_bert_layer_flops(c, 1, n_enc + t, h, ff)
             for h, ff in zip(c.mmt_heads, c.mmt_ffn))
  d, q = c.hidden_size, c.ptr_query_key_size
  per_step_heads = 2 * d * c.num_answers + 2 * d * q + 2 * c.ocr_max * q
  ptr_keys = 2 * c.ocr_max * d * q
  return (f["text_bert"] + f["obj_ocr_encoders"] + enc_mmt + ptr_keys
          + t * (step + per_step_heads))


def stage_gflop(stage: str, c: TapConfig, batch_size: int) -> Optional[float]:
  """Model GFLOP of one call of a stage for the whole batch (None if unknown).

  Model FLOPs count every row of every layer, as upstream computes them, for the
  algorithm the stage runs (the upstream loop for `greedy_reference`), so
  `gflop / seconds` is an upstream-equivalent throughput. An implementation that
  skips work whose result is never read executes fewer FLOPs than this.
  """
  fwd = forward_flops(c)["total"]
  per_sample = {
      "forward": fwd,
      "train_step": 3 * fwd,
      "train_step_dropout": 3 * fwd,
      "train_step_adam": 3 * fwd,
      "greedy_cached": greedy_cached_flops(c),
      "greedy_reference": greedy_reference_flops(c),
  }.get(stage)
  if stage.startswith("matmul_"):
    return 2 * MATMUL_N ** 3 / 1e9
  return None if per_sample is None else per_sample * batch_size / 1e9


# Timing, memory, progress -----------------------------------------------------------

def peak_rss_mb() -> float:
  """Peak resident set size of this process so far (monotone), MiB."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mb() -> Optional[float]:
  """Current resident set size (VmRSS), MiB; None where /proc is missing."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmRSS:"):
          return int(line.split()[1]) / 1024.0
  except OSError:
    pass
  return None


def log(msg: str) -> None:
  """Progress line on stderr (the table goes to stdout)."""
  print(msg, file=sys.stderr, flush=True)


def fmt_s(seconds: float) -> str:
  return f"{seconds:.2f}s" if seconds < 120 else f"{seconds / 60:.1f}min"


def time_calls(label: str, call: Callable[[], Any], repeats: int
               ) -> tuple[float, list[float]]:
  """Times one warm-up call and then `repeats` calls of `call` (which must block).

  Prints one progress line per call to stderr with an ETA for the rest of the stage.

  Returns:
    (warm-up seconds, list of timed seconds).
  """
  log(f"[{label}] warm-up call ...")
  t0 = time.perf_counter()
  call()
  first = time.perf_counter() - t0
  log(f"[{label}] warm-up {fmt_s(first)}; timing {repeats} call(s), "
      f"ETA ~{fmt_s(first * repeats)}")
  times = []
  for i in range(repeats):
    t0 = time.perf_counter()
    call()
    times.append(time.perf_counter() - t0)
    left = repeats - i - 1
    eta = f", ETA {fmt_s(statistics.median(times) * left)}" if left else ""
    log(f"[{label}] {i + 1}/{repeats}: {fmt_s(times[-1])}{eta}")
  return first, times


def stage_record(stage: str, description: str, c: TapConfig, batch_size: int,
                 first_s: float, times: Sequence[float], *,
                 compile_s: Optional[float] = None, notes: str = "",
                 extra: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
  """The JSON record of one finished stage (schema in benchmarks/README.md)."""
  med = statistics.median(times)
  gflop = stage_gflop(stage, c, batch_size)
  rec = {
      "status": "ok",
      "description": description,
      "compile_s": compile_s,
      "first_call_s": first_s,
      "repeats": len(times),
      "times_s": list(times),
      "min_s": min(times),
      "median_s": med,
      "max_s": max(times),
      "mean_s": statistics.fmean(times),
      "gflop": gflop,
      "gflops_per_s": None if gflop is None else gflop / med,
      "gflops_per_s_best": None if gflop is None else gflop / min(times),
      "rss_after_mb": current_rss_mb(),
      "peak_rss_mb": peak_rss_mb(),
      "notes": notes,
  }
  if extra:
    rec.update(extra)
  return rec


# Machine info, ratios, output -------------------------------------------------------

def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def machine_info(versions: Mapping[str, str], extra: Optional[Mapping[str, Any]] = None
                 ) -> dict[str, Any]:
  """CPU, cores, memory, load, library versions and the relevant env variables."""
  mem_gb = None
  try:
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
  except (ValueError, OSError, AttributeError):
    pass
  try:
    usable = len(os.sched_getaffinity(0))
  except AttributeError:
    usable = os.cpu_count()
  info = {
      "cpu_model": cpu_model(),
      "cpu_count": os.cpu_count(),
      "usable_cores": usable,
      "mem_total_gb": mem_gb,
      "load_avg_at_start": list(os.getloadavg()),
      "python": platform.python_version(),
      "platform": platform.platform(),
      "versions": dict(versions),
      "env": {k: os.environ.get(k) for k in
              ("XLA_FLAGS", "JAX_PLATFORMS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
               "OPENBLAS_NUM_THREADS")},
  }
  if extra:
    info.update(extra)
  return info


def closest_upstream_machine(model: str) -> Optional[str]:
  m = model.lower()
  if "intel" in m or "xeon" in m:
    return "intel_xeon"
  if "amd" in m or "epyc" in m:
    return "amd_epyc"
  return None


def ratios(stages: Mapping[str, Mapping[str, Any]], arch: str, batch_size: int,
           cpu: str, torch_result: Optional[Mapping[str, Any]] = None
           ) -> dict[str, Any]:
  """Speed-ups against the upstream figures (and optionally a torch_reference run).

  Every ratio is `other median seconds / our median seconds`: > 1 means this run
  was faster. Upstream figures are for full TAP at batch 16; for other settings the
  ratios are still computed but flagged `comparable: false`.
  """
  out: dict[str, Any] = {
      "definition": "other_median_s / this_median_s (> 1: this run is faster)",
      "comparable": arch == UPSTREAM["arch"] and batch_size == UPSTREAM["batch"],
      "closest_upstream_machine": closest_upstream_machine(cpu),
  }
  for machine, figs in UPSTREAM["machines"].items():
    r = {}
    for stage, fig in UPSTREAM_FIGURE.items():
      rec = stages.get(stage)
      if rec and rec.get("status") == "ok" and arch == UPSTREAM["arch"]:
        r[stage] = figs[fig] / rec["median_s"]
    out[f"vs_upstream_{machine}"] = r
  peak = {k: stages[k]["gflops_per_s"] for k in ("matmul_jax", "matmul_torch",
                                                  "matmul_numpy")
          if stages.get(k, {}).get("status") == "ok"}
  fwd = stages.get("forward", {})
  if peak and fwd.get("status") == "ok":
    best_peak = max(peak.values())
    out["forward_fraction_of_matmul_peak"] = fwd["gflops_per_s"] / best_peak
    xeon = UPSTREAM["machines"]["intel_xeon"]
    out["upstream_forward_fraction_of_matmul_peak"] = (
        xeon["forward_gflops"] / xeon["matmul_gflops"])
  if torch_result is not None:
    t_stages = torch_result.get("stages", {})
    same = (torch_result.get("settings", {}).get("arch") == arch
            and torch_result.get("settings", {}).get("batch") == batch_size)
    r = {}
    for stage in ("forward", "train_step", "train_step_dropout"):
      a, b = stages.get(stage, {}), t_stages.get(stage, {})
      if a.get("status") == "ok" and b.get("status") == "ok":
        r[stage] = b["median_s"] / a["median_s"]
    t_greedy = t_stages.get("greedy_reference", {})
    for stage in ("greedy_cached", "greedy_reference"):
      a = stages.get(stage, {})
      if a.get("status") == "ok" and t_greedy.get("status") == "ok":
        r[stage] = t_greedy["median_s"] / a["median_s"]
    out["vs_torch_reference"] = {
        "comparable": same,
        "torch_machine": torch_result.get("machine", {}).get("cpu_model"),
        "ratios": r,
    }
  return out


def run_header(schema: str, module: str, argv: Optional[Sequence[str]] = None
               ) -> dict[str, Any]:
  """The opening keys of every benchmark's result JSON: its schema, when it was
  written (UTC, ISO 8601) and the command that reruns it (`python -m <module> ...`;
  `argv`: the arguments `main` was given, default the process's own)."""
  args = sys.argv[1:] if argv is None else list(argv)
  return {"schema": schema,
          "created": datetime.datetime.now(datetime.timezone.utc).isoformat(
              timespec="seconds"),
          "command": [os.path.basename(sys.executable), "-m", module, *args]}


def result_skeleton(framework: str, args: argparse.Namespace, stages: Sequence[str],
                    c: TapConfig, num_params: int, machine: Mapping[str, Any], *,
                    module: str, argv: Optional[Sequence[str]] = None
                    ) -> dict[str, Any]:
  """Everything of the result JSON but `stages`, `ratios` and `peak_rss_mb`."""
  return {
      **run_header(SCHEMA, module, argv),
      "framework": framework,
      "settings": {
          "arch": args.arch, "batch": args.batch, "repeats": args.repeats,
          "seed": args.seed, "dtype": "float32", "stages": list(stages),
          "isolate": bool(getattr(args, "isolate", False)),
      },
      "model": {
          "arch": c.arch,
          "config": c.to_dict(),
          "num_params": num_params,
          "forward_flops_per_sample": forward_flops(c),
          "greedy_cached_flops_per_sample": greedy_cached_flops(c),
          "greedy_reference_flops_per_sample": greedy_reference_flops(c),
          "greedy_reference_flops_per_sample_text_bert_once": greedy_reference_flops(
              c, text_bert_once=True),
      },
      "machine": dict(machine),
      "upstream": json.loads(json.dumps(dict(UPSTREAM))),
  }


def write_json(path: str, obj: Any) -> None:
  """Writes JSON to a temporary file in the target folder, then renames it."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".json", dir=folder)
  try:
    with os.fdopen(fd, "w") as f:
      json.dump(obj, f, indent=1, sort_keys=False)
      f.write("\n")
    os.chmod(tmp, 0o644)  # mkstemp creates 0600 files
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def _f(x: Optional[float], width: int, decimals: int) -> str:
  return "-".rjust(width) if x is None else f"{x:{width}.{decimals}f}"


def format_table(result: Mapping[str, Any]) -> str:
  """Human-readable summary of a result dict."""
  m, s = result["machine"], result["settings"]
  lines = [
      f"{result['framework']} | {s['arch']} batch {s['batch']} float32 | "
      f"{m['cpu_model']} ({m['usable_cores']} cores) | repeats {s['repeats']}",
      f"{'stage':<20}{'compile':>9}{'warm-up':>9}{'min':>8}{'median':>8}{'max':>8}"
      f"{'GFLOP':>8}{'GFLOP/s':>9}{'exec/s':>8}{'fwd-eq':>8}{'peakRSS':>9}",
  ]
  fwd = result["stages"].get("forward", {})
  fwd_med = fwd.get("median_s") if fwd.get("status") == "ok" else None
  for name, r in result["stages"].items():
    if r.get("status") != "ok":
      lines.append(f"{name:<20}{r.get('status')}: {r.get('reason', r.get('error', ''))}")
      continue
    eq = None
    if fwd_med and not name.startswith("matmul_"):
      eq = r["median_s"] / fwd_med
    lines.append(
        f"{name:<20}{_f(r.get('compile_s'), 9, 2)}{r['first_call_s']:9.2f}"
        f"{r['min_s']:8.3f}{r['median_s']:8.3f}{r['max_s']:8.3f}"
        f"{_f(r.get('gflop'), 8, 1)}{_f(r.get('gflops_per_s'), 9, 1)}"
        f"{_f(r.get('xla_gflops_per_s'), 8, 1)}"
        f"{_f(eq, 8, 2)}{r['peak_rss_mb'] / 1024:8.2f}G")
  rat = result.get("ratios", {})
  note = ("" if rat.get("comparable")
          else " (settings differ from upstream's: indicative only)")
  for key in ("vs_upstream_intel_xeon", "vs_upstream_amd_epyc"):
    if rat.get(key):
      parts = ", ".join(f"{k} {v:.2f}x" for k, v in rat[key].items())
      lines.append(f"speed-up {key[3:]}{note}: {parts}")
  if "vs_torch_reference" in rat:
    v = rat["vs_torch_reference"]
    parts = ", ".join(f"{k} {x:.2f}x" for k, x in v["ratios"].items())
    lines.append(f"speed-up vs torch_reference.json"
                 f"{'' if v['comparable'] else ' (different settings)'}: {parts}")
  if "forward_fraction_of_matmul_peak" in rat:
    lines.append(
        f"forward reaches {rat['forward_fraction_of_matmul_peak']:.0%} of the matmul "
        f"peak (upstream on the Xeon: "
        f"{rat['upstream_forward_fraction_of_matmul_peak']:.0%})")
  lines.append(f"peak RSS {result['peak_rss_mb'] / 1024:.2f} GiB. GFLOP: model FLOPs "
               "(upstream-equivalent); exec/s: FLOPs XLA executes per second")
  return "\n".join(lines)
