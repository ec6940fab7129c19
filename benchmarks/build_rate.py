r"""Build rate, disk and peak RAM of the ArrayRecord build at full TAP shapes.

Writes a mock TextVQA release (`tests/data/release_mock.py`, Python-2 `_info.npy`
files) of `--questions` questions over images with 2048-d features, 100 objects and a
random number of OCR tokens (0 .. `--max_ocr`), (features post-ReLU-like: half zeros, half |N(0, 1)|), then builds its train split in a child
process (so `ru_maxrss` is the build's own peak) with the full TAP example shapes (100
object / 100 OCR slots, 170 text wordpieces, 5000 answers, 12 decoding steps), and
extrapolates to the real splits:

    python benchmarks/build_rate.py --questions 300 --out /tmp/build_rate

FastText vectors come from a real fastText model (300-d, trained on a tiny corpus) when
the `fasttext` package is importable, else from the stand-in (slower per token). The
real `wiki.en.bin` adds its own ~8 GB to the peak RAM (loaded once per build).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

# Questions of the splits that are built (TextVQA: docs/LFPR.md §6.1 / §7.1; ST-VQA
# imdb_subtrain ≈ 23,446 (docs/LFPR.md §6.1); imdb_subval = the rest of the 26,308 ST-VQA
# train questions (Biten et al. 2019, Task 3 train) ≈ 2,862).
SPLITS = {"TextVQA train": 34602, "TextVQA val": 5000,
          "ST-VQA subtrain": 23446, "ST-VQA subval": 2862}
QUESTIONS_PER_IMAGE = 34602 / 21953  # TextVQA train: questions / images


def write_mock(root: pathlib.Path, questions: int, max_ocr: int, seed: int) -> None:
  from tests.data import release_mock as mock  # noqa: PLC0415

  rng = np.random.default_rng(seed)
  images = max(1, round(questions / QUESTIONS_PER_IMAGE))
  obj, ocr = "feat_resx/train", "ocr_feat_resx/textvqa_conf/train_images"
  words = list(mock.WORDS) + ["Coca-Cola", "北京", "Café", "2019", "STOP"]
  entries = []
  for i in range(images):
    n_ocr = int(rng.integers(0, max_ocr + 1))
    tokens = [words[int(k)] for k in rng.integers(0, len(words), n_ocr)]
    mock.write_image(root, obj, ocr, f"{i:016x}.npy", n_obj=100, ocr_tokens=tokens,
                     width=1024, height=768, seed=i, feat_dim=2048)
    # Post-ReLU-like values (about half zeros): the mock's constant rows would
    # compress far better than real detector features.
    for folder, n in ((obj, 100), (ocr, n_ocr)):
      feats = np.maximum(rng.standard_normal((n, 2048), np.float32), 0)
      np.save(root / folder / f"{i:016x}.npy", feats)
  for q in range(questions):
    image = q % images
    entries.append(dict(question="what is written on the sign next to the car?",
                        question_id=q, image_id=f"{image:016x}", image_width=1024,
                        image_height=768, feature_path=f"{image:016x}.npy",
                        answers=mock.tile("stop", "coca", "red")))
  mock.write_imdb(root / mock.TEXTVQA_IMDB.format(split="train"), entries, "textvqa")
  vocab = root / "m4c_vocabs/textvqa/fixed_answer_vocab_textvqa_5k.txt"
  vocab.parent.mkdir(parents=True, exist_ok=True)
  filler = [f"answer{i}" for i in range(5000 - len(mock.ANSWER_WORDS))]
  vocab.write_text("\n".join(list(mock.ANSWER_WORDS) + filler) + "\n", encoding="utf-8")
  (root / "1600-400-20").mkdir(exist_ok=True)
  (root / "1600-400-20/objects_vocab.txt").write_text(
      "\n".join(f"class{i}" for i in range(1600)) + "\n")
  (root / "bert-base-uncased").mkdir(exist_ok=True)
  (root / "bert-base-uncased/vocab.txt").write_text(
      "\n".join(mock.bert_vocab_lines()) + "\n", encoding="utf-8")
  try:
    import fasttext  # noqa: PLC0415
  except ImportError:
    return
  corpus = root / "corpus.txt"
  corpus.write_text(" ".join(words * 50) + "\n", encoding="utf-8")
  model = fasttext.train_unsupervised(str(corpus), dim=300, minCount=1, epoch=1,
                                      thread=1, bucket=200000, verbose=0)
  (root / ".vector_cache").mkdir(exist_ok=True)
  model.save_model(str(root / ".vector_cache/wiki.en.bin"))


def child(root: str, out: str) -> None:
  """Builds the train split and prints a JSON line of measurements."""
  from lfpr_jax.data import readers, tfds_builder  # noqa: PLC0415
  from lfpr_jax.models.config import TapConfig  # noqa: PLC0415

  real_ft = os.path.isfile(os.path.join(root, ".vector_cache/wiki.en.bin"))
  layout = readers.DataLayout.for_dataset(
      "textvqa", root, **({} if real_ft else {"fasttext_model": None}))
  rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  t0 = time.perf_counter()
  result = tfds_builder.build_dataset(None, out, ("train",), layout=layout,
                                      config=TapConfig(), progress=False)["train"]
  seconds = time.perf_counter() - t0
  size = sum(p.stat().st_size for p in pathlib.Path(result.path).rglob("*"))
  print(json.dumps(dict(
      examples=result.num_examples, seconds=seconds, bytes=size,
      peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      rss_before_build_mb=rss0 / 1024, fasttext="real" if real_ft else "stand-in")))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--questions", type=int, default=300)
  parser.add_argument("--max_ocr", type=int, default=60)
  parser.add_argument("--out", default="/tmp/lfpr_build_rate")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    child(*args.child)
    return
  work = pathlib.Path(args.out) / f"q{args.questions}"
  root, out = work / "release", work / "built"
  if not (root / "imdb").exists():
    write_mock(root, args.questions, args.max_ocr, args.seed)
  proc = subprocess.run([sys.executable, __file__, "--child", str(root), str(out)],
                        check=True, capture_output=True, text=True)
  m = json.loads(proc.stdout.strip().splitlines()[-1])
  rate = m["examples"] / m["seconds"]
  per_example = m["bytes"] / m["examples"]
  print(f"{m['examples']} examples in {m['seconds']:.1f} s = {rate:.1f} examples/s; "
        f"{per_example / 1e6:.2f} MB/example; peak RSS {m['peak_rss_mb']:.0f} MB "
        f"(FastText: {m['fasttext']})")
  print("| split | questions | build time | disk |")
  print("| --- | ---: | ---: | ---: |")
  for name, n in SPLITS.items():
    print(f"| {name} | {n:,} | {n / rate / 60:.0f} min | "
          f"{n * per_example / 1e9:.1f} GB |")


if __name__ == "__main__":
  main()
