"""TFDS dataset of fixed-shape TAP examples, written as ArrayRecord without TensorFlow.

`build_dataset(data_dir, out_dir, splits)` turns an upstream-layout data directory
(`readers.DataLayout`) into one TFDS dataset per split, each example built by
`samples.SampleBuilder`:

    out_dir/tap_text_vqa/<dataset>_<split>/1.0.0/
        dataset_info.json  features.json  metadata.json
        tap_text_vqa-<split>.array_record-00000-of-0000N

* **Reuse.** `metadata.json` stores a fingerprint of every input (sizes and mtimes of the
  imdb, vocabularies, FastText model and every feature/info file the imdb names) and of
  the model shapes and this module's format version. A split whose stored fingerprint
  matches is reused untouched; a mismatch deletes and rebuilds it.
* **Atomic writes.** TFDS generates into `incomplete.XXXXXX_1.0.0/` next to the final
  directory and renames it into place only after `dataset_info.json` and
  `metadata.json` are written, so an interrupted build never leaves a directory that
  looks complete; leftovers of interrupted builds are deleted by the next build.
* **No TensorFlow.** Only `file_format='array_record'` works without TF (TFRecord
  writing imports TF); the `tfds` CLI needs TF, hence this Python entry point:

      python -m lfpr_jax.data.tfds_builder --data_dir ../data --out_dir built \\
          --dataset textvqa --splits train,val

Examples are stored one per question (features of an image are repeated for each of
its questions). Numeric features are stored as raw bytes (exact dtypes, fast to decode);
the sparse PHOC rows and targets are zlib-compressed.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import shutil
import sys
from typing import Any, Sequence

import numpy as np
import tensorflow_datasets as tfds
import tqdm

from lfpr_jax import cli
from lfpr_jax.data import readers, samples
from lfpr_jax.data.answers import NUM_ANSWERS
from lfpr_jax.data.vocab import AnswerVocab
from lfpr_jax.models.config import TapConfig

BUILDER_NAME: str = "tap_text_vqa"
FORMAT_VERSION: int = 1
"""Bump when `SampleBuilder` output or the feature spec changes (forces rebuilds)."""
FILE_FORMAT: str = "array_record"
_INCOMPLETE_PREFIX: str = "incomplete."  # tensorflow_datasets.core.constants


def features_dict(config: TapConfig) -> tfds.features.FeaturesDict:
  """TFDS features of one example; fixed shapes from `config` (`SampleBuilder.build`)."""
  c = config
  raw = tfds.features.Encoding.BYTES
  zlib = tfds.features.Encoding.ZLIB

  def tensor(shape, dtype, encoding=raw):
    # Raw bytes keep the dtype exactly (the proto path widens int32 to int64).
    return tfds.features.Tensor(shape=shape, dtype=dtype, encoding=encoding)

  return tfds.features.FeaturesDict({
      "cmb_text": tensor((c.text_len,), np.int32),
      "image_feature_0": tensor((c.obj_max, c.obj_feat_dim), np.float32),
      "obj_bbox_coordinates": tensor((c.obj_max, 4), np.float32),
      "obj_num": tensor((), np.int32),
      "image_feature_1": tensor((c.ocr_max, c.ocr_feat_dim), np.float32),
      "context_feature_0": tensor((c.ocr_max, c.fasttext_dim), np.float32),
      "context_feature_1": tensor((c.ocr_max, c.phoc_dim), np.float32, zlib),
      "ocr_bbox_coordinates": tensor((c.ocr_max, 4), np.float32),
      "ocr_num": tensor((), np.int32),
      "train_prev_inds": tensor((c.decode_steps,), np.int32),
      "targets": tensor((c.decode_steps, c.num_classes), np.float32, zlib),
      "train_loss_mask": tensor((c.decode_steps,), np.float32),
      "has_answers": tensor((), np.bool_),
      "question_id": tensor((), np.int64),
      "image_id": tfds.features.Text(),
      "image_width": tensor((), np.int32),
      "image_height": tensor((), np.int32),
      "context_tokens": tensor((c.ocr_max,), np.object_, tfds.features.Encoding.NONE),
      "answers": tensor((NUM_ANSWERS,), np.object_, tfds.features.Encoding.NONE),
  })


@dataclasses.dataclass(eq=False)
class TapTextVqaConfig(tfds.core.BuilderConfig):
  """One split of one upstream-layout data directory.

  Attributes:
    layout: the data directory layout.
    split: the split to generate.
    tap_config: the model shapes the examples are padded to.
    fingerprint: `input_fingerprint(layout, split, tap_config)`, stored in metadata.
    progress: show a tqdm progress bar while generating.
  """
  layout: readers.DataLayout | None = None
  split: str = "train"
  tap_config: TapConfig = dataclasses.field(default_factory=TapConfig)
  fingerprint: str = ""
  progress: bool = True


class TapTextVqa(tfds.core.GeneratorBasedBuilder):
  """Fixed-shape TAP (TextVQA / ST-VQA / synthetic) examples, one split per config.

  Configs are made at build time (`make_config`), one per (dataset, split), so that each
  split is built, fingerprinted and reused on its own.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "TAP.md §3.2 examples with collated cmb_text."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Place the TAP data directory (imdb/, feat_resx/, ocr_feat_resx/, m4c_vocabs/, "
      "1600-400-20/, bert-base-uncased/vocab.txt, .vector_cache/wiki.en.bin) at the "
      "layout's root.")

  def __init__(self, *, config: TapTextVqaConfig, data_dir: str | os.PathLike,
               **kwargs: Any):
    if not isinstance(config, TapTextVqaConfig) or config.layout is None:
      raise ValueError("TapTextVqa needs a TapTextVqaConfig with a layout "
                       "(see make_config).")
    kwargs.setdefault("file_format", FILE_FORMAT)
    super().__init__(config=config, data_dir=os.fspath(data_dir), **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    cfg: TapTextVqaConfig = self.builder_config
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"TAP examples of {cfg.layout.dataset}/{cfg.split} from "
                    f"{cfg.layout.root}.",
        features=features_dict(cfg.tap_config),
        disable_shuffling=True,  # keep imdb order (prediction files, reproducibility)
        metadata=tfds.core.MetadataDict(
            fingerprint=cfg.fingerprint, format_version=FORMAT_VERSION,
            dataset=cfg.layout.dataset, split=cfg.split,
            tap_config=dataclasses.asdict(cfg.tap_config),
            layout=json.loads(cfg.layout.to_json())),
    )

  def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
    del dl_manager  # nothing to download
    return {self.builder_config.split: self._generate_examples()}

  def _generate_examples(self):
    cfg: TapTextVqaConfig = self.builder_config
    builder = samples.SampleBuilder.from_layout(cfg.layout, cfg.split, cfg.tap_config)
    entries = readers.read_imdb(cfg.layout.split(cfg.split).imdb)
    for entry in tqdm.tqdm(entries, desc=f"{cfg.name}", unit="question",
                           disable=not cfg.progress):
      example = builder.build(entry)
      example["image_id"] = example["image_id"].item()
      yield entry.index, example


def make_config(layout: readers.DataLayout, split: str, tap_config: TapConfig, *,
                fingerprint: str = "", progress: bool = True) -> TapTextVqaConfig:
  """The builder config of one split (name `<dataset>_<split>`)."""
  return TapTextVqaConfig(
      name=f"{layout.dataset}_{split}", description=f"{layout.dataset} {split}",
      layout=layout, split=split, tap_config=tap_config, fingerprint=fingerprint,
      progress=progress)


def _stat_entry(path: str, root: str, what: str) -> list[Any]:
  try:
    st = os.stat(path)
  except FileNotFoundError:
    readers.require_file(path, what)
    raise
  return [os.path.relpath(path, root), st.st_size, st.st_mtime_ns]


def input_fingerprint(layout: readers.DataLayout, split: str, config: TapConfig) -> str:
  """SHA-256 over everything a split's examples depend on.

  Covers the format version, the model shapes, the layout, and size + mtime of the imdb,
  the vocabularies, the FastText model and every feature/info file the imdb names.

  Raises:
    FileNotFoundError: an input file is missing (named).
  """
  files = layout.split(split)
  entries = readers.read_imdb(files.imdb)
  stats = [_stat_entry(files.imdb, layout.root, "the imdb")]
  for rel, what in ((layout.answer_vocab, "the answer vocabulary"),
                    (layout.object_vocab, "the object class names"),
                    (layout.bert_vocab, "the BERT WordPiece vocabulary")):
    stats.append(_stat_entry(layout.path(rel), layout.root, what))
  if layout.fasttext_path() is not None:
    stats.append(_stat_entry(layout.fasttext_path(), layout.root, "the FastText model"))
  seen = set()
  for entry in entries:
    if entry.feature_path in seen:
      continue
    seen.add(entry.feature_path)
    for folder, kind in ((files.obj_features, "object"), (files.ocr_features, "OCR")):
      path = os.path.join(folder, entry.feature_path)
      stats.append(_stat_entry(path, layout.root, f"the {kind} features of image "
                               f"{entry.image_id}"))
      stats.append(_stat_entry(readers.info_path(path), layout.root,
                               f"the {kind} info of image {entry.image_id}"))
  payload = dict(format_version=FORMAT_VERSION, builder_version=str(TapTextVqa.VERSION),
                 split=split, layout=json.loads(layout.to_json()),
                 tap_config=dataclasses.asdict(config), files=stats)
  del payload["layout"]["root"]  # paths are already relative to it
  text = json.dumps(payload, sort_keys=True, default=str)
  return hashlib.sha256(text.encode("utf-8")).hexdigest()


def stored_fingerprint(dataset_dir: str | os.PathLike) -> str | None:
  """The fingerprint of a complete built split, or None if there is none."""
  dataset_dir = os.fspath(dataset_dir)
  if not os.path.isfile(os.path.join(dataset_dir, "dataset_info.json")):
    return None
  try:
    with open(os.path.join(dataset_dir, "metadata.json"), encoding="utf-8") as f:
      return json.load(f).get("fingerprint")
  except (OSError, ValueError):
    return None


def _remove_incomplete(config_dir: str) -> None:
  """Deletes leftovers of interrupted builds (`incomplete.XXXXXX_<version>`)."""
  for path in glob.glob(os.path.join(config_dir, _INCOMPLETE_PREFIX + "*")):
    shutil.rmtree(path, ignore_errors=True)


@dataclasses.dataclass(frozen=True)
class BuiltSplit:
  """Result of building (or reusing) one split.

  Attributes:
    split: split name.
    path: the TFDS dataset directory (holds `dataset_info.json`).
    num_examples: number of examples.
    fingerprint: the input fingerprint.
    reused: True when an existing build was kept.
  """
  split: str
  path: str
  num_examples: int
  fingerprint: str
  reused: bool


def dataset_dir(out_dir: str | os.PathLike, dataset: str, split: str) -> str:
  """Where `build_dataset` puts one split."""
  return os.path.join(os.fspath(out_dir), BUILDER_NAME, f"{dataset}_{split}",
                      str(TapTextVqa.VERSION))


def build_dataset(data_dir: str | os.PathLike | None, out_dir: str | os.PathLike,
                  splits: Sequence[str] = ("train", "val"), *, dataset: str = "textvqa",
                  layout: readers.DataLayout | None = None,
                  config: TapConfig | None = None, force: bool = False,
                  progress: bool = True) -> dict[str, BuiltSplit]:
  """Builds (or reuses) one TFDS ArrayRecord dataset per split.

  Args:
    data_dir: the upstream-layout data directory (ignored when `layout` is given).
    out_dir: where the datasets go (a TFDS `data_dir`).
    splits: split names of the layout.
    dataset: `textvqa`, `stvqa` or `synthetic` (selects the default layout).
    layout: explicit layout (overrides `data_dir` / `dataset`).
    config: model shapes; default `TapConfig()` with `num_answers` = answer vocabulary
      size.
    force: rebuild even when the fingerprint matches.
    progress: show progress bars.

  Returns:
    split -> `BuiltSplit`.

  Raises:
    FileNotFoundError: the data directory or an input file is missing.
    ValueError: malformed inputs (named), unknown split or dataset.
  """
  if layout is None:
    if data_dir is None:
      raise ValueError("build_dataset needs data_dir or layout.")
    layout = readers.DataLayout.for_dataset(dataset, data_dir)
  readers.require_dir(layout.root, f"the {layout.dataset} data directory (imdb/, "
                      "feat_resx/, ocr_feat_resx/, m4c_vocabs/, ...)")
  if config is None:
    vocab = AnswerVocab.from_file(layout.path(layout.answer_vocab))
    config = TapConfig(num_answers=vocab.num_vocab)
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  results = {}
  for split in splits:
    layout.split(split)  # unknown split -> ValueError before any work
    fingerprint = input_fingerprint(layout, split, config)
    target = dataset_dir(out_dir, layout.dataset, split)
    _remove_incomplete(os.path.dirname(target))
    reused = not force and stored_fingerprint(target) == fingerprint
    if not reused and os.path.exists(target):
      shutil.rmtree(target)
    builder = TapTextVqa(
        config=make_config(layout, split, config, fingerprint=fingerprint,
                           progress=progress),
        data_dir=out_dir)
    if not reused:
      download_dir = os.path.join(out_dir, BUILDER_NAME, ".downloads")
      builder.download_and_prepare(file_format=FILE_FORMAT, download_dir=download_dir)
      if not any(files for _, _, files in os.walk(download_dir)):
        shutil.rmtree(download_dir, ignore_errors=True)  # TFDS's empty scaffolding
    if os.path.normpath(os.fspath(builder.data_path)) != os.path.normpath(target):
      raise RuntimeError(f"TFDS wrote {builder.data_path}, expected {target}.")
    results[split] = BuiltSplit(
        split=split, path=target, num_examples=builder.info.splits[split].num_examples,
        fingerprint=fingerprint, reused=reused)
  return results


def find_split(built: str | os.PathLike, split: str, *, dataset: str | None = None
               ) -> str:
  """Locates a built split.

  Args:
    built: a dataset directory (holding `dataset_info.json`) or a `build_dataset`
      `out_dir`.
    split: the split name.
    dataset: dataset name, needed only when `out_dir` holds several for `split`.

  Returns:
    The TFDS dataset directory.

  Raises:
    FileNotFoundError: nothing built for `split` there.
    ValueError: several datasets match.
  """
  built = os.fspath(built)
  readers.require_dir(built, "a dataset built by lfpr_jax.data.tfds_builder."
                      "build_dataset (or its out_dir)")
  if os.path.isfile(os.path.join(built, "dataset_info.json")):
    return built
  name = f"{dataset}_{split}" if dataset else f"*_{split}"
  matches = sorted(
      os.path.dirname(p) for p in glob.glob(
          os.path.join(built, BUILDER_NAME, name, "*", "dataset_info.json"))
      if not os.path.basename(os.path.dirname(p)).startswith(_INCOMPLETE_PREFIX))
  if not matches:
    raise FileNotFoundError(
        f"{built}: no built split {split!r}"
        + (f" of dataset {dataset!r}" if dataset else "")
        + f"; expected {os.path.join(built, BUILDER_NAME, name, '<version>')} with "
        "dataset_info.json (run lfpr_jax.data.tfds_builder.build_dataset).")
  if len(matches) > 1:
    raise ValueError(f"{built}: several built datasets have split {split!r}: {matches}; "
                     "pass dataset=... or the dataset directory itself.")
  return matches[0]


@cli.command
def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point (the `tfds build` CLI needs TensorFlow).

  A missing or malformed input ends with one `error: ...` line on stderr and exit
  status 1 (2 for malformed arguments); `--debug` shows the traceback.
  """
  parser = cli.ArgumentParser(prog="python -m lfpr_jax.data.tfds_builder",
                              description=__doc__.split("\n\n")[0])
  parser.add_argument("--data_dir", required=True, help="upstream-layout data directory")
  parser.add_argument("--out_dir", required=True, help="where the datasets go")
  parser.add_argument("--dataset", default="textvqa", choices=readers.DATASET_NAMES)
  parser.add_argument("--splits", default="train,val", help="comma-separated")
  parser.add_argument("--layout", default=None, help="DataLayout JSON (overrides "
                      "--data_dir/--dataset)")
  parser.add_argument("--feat_dim", type=int, default=None, help="object/OCR feature "
                      "width if not 2048 (the synthetic benchmark's is smaller)")
  parser.add_argument("--force", action="store_true", help="rebuild unchanged splits")
  args = parser.parse_args(argv)
  splits = [s for s in args.splits.split(",") if s]
  if not splits:
    parser.error(f"--splits {args.splits!r} names no split")
  if args.layout:
    try:
      layout = readers.DataLayout.from_json(args.layout)
    except (ValueError, TypeError, AttributeError) as e:  # bad JSON or fields
      raise ValueError(f"--layout {args.layout} is not a DataLayout JSON (see "
                       f"DataLayout.to_json): {e}") from e
  else:
    layout = readers.DataLayout.for_dataset(args.dataset, args.data_dir)
  config = None
  if args.feat_dim is not None:
    vocab = AnswerVocab.from_file(layout.path(layout.answer_vocab))
    config = TapConfig(num_answers=vocab.num_vocab, obj_feat_dim=args.feat_dim,
                       ocr_feat_dim=args.feat_dim)
  results = build_dataset(None, args.out_dir, splits, layout=layout, config=config,
                          force=args.force)
  for r in results.values():
    print(f"{r.split}: {r.num_examples} examples at {r.path}"
          + (" (reused)" if r.reused else ""))
  return 0


if __name__ == "__main__":
  sys.exit(main())
