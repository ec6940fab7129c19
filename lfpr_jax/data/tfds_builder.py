"""TFDS dataset of fixed-shape TAP examples, written as ArrayRecord without TensorFlow.

`build_dataset(data_dir, out_dir, splits)` turns an upstream-layout data directory
(`readers.DataLayout`) into one TFDS dataset per split, each example built by
`samples.SampleBuilder`:

    out_dir/tap_text_vqa/<dataset>_<split>/1.0.0/
        dataset_info.json  features.json  metadata.json  inputs.json
        tap_text_vqa-<split>.array_record-00000-of-0000N

* **Where.** Real data is built once per release, next to it: `default_built_dir`
  (`<data root>/lfpr_jax_built/<dataset>`) is where the CLI below writes and where
  `lfpr_jax.main` reads (`config.data.built_dir` overrides both, e.g. when the release
  is read-only). Synthetic data is built in `<workdir>/tfds`, next to its workdir data.
* **Reuse.** `metadata.json` stores a fingerprint of exactly what determines the
  examples (`example_inputs`): the format version, the example shapes (text / object /
  OCR lengths, feature widths, decoding steps, answer-vocabulary size; not the MMT or
  text-BERT architecture, so TAP and TAP12 runs share one build), the answer processing
  settings, content hashes of the imdb and the vocabularies, and size + mtime of the
  FastText model and of every feature/info file the imdb names. A split whose stored
  fingerprint matches is reused untouched; a mismatch deletes and rebuilds it, logging
  which inputs changed (from the `inputs.json` record of the old build).
* **Atomic writes.** TFDS generates into `incomplete.XXXXXX_1.0.0/` next to the final
  directory and renames it into place only after `dataset_info.json` and
  `metadata.json` are written, so an interrupted build never leaves a directory that
  looks complete; leftovers of interrupted builds are deleted by the next build.
* **One FastText load.** The vocabularies, tokenizer and FastText model (~8 GB) are
  loaded once per `build_dataset` call, only if some split needs building.
* **No TensorFlow.** Only `file_format='array_record'` works without TF (TFRecord
  writing imports TF); the `tfds` CLI needs TF, hence this Python entry point:

      python -m lfpr_jax.data.tfds_builder --data_dir /data/tap --dataset textvqa \\
          --splits train,val

Examples are stored one per question (features of an image are repeated for each of
its questions). Numeric features are stored as raw bytes (exact dtypes, fast to decode);
the sparse PHOC rows and targets are zlib-compressed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging as pylogging
import glob
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Iterator
from typing import Any, Mapping, Sequence

from absl import logging
import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core.utils import tqdm_utils
import tqdm

from lfpr_jax import cli
from lfpr_jax.data import readers, samples
from lfpr_jax.data import answers as answers_lib
from lfpr_jax.data.answers import NUM_ANSWERS
from lfpr_jax.data.vocab import AnswerVocab
from lfpr_jax.models.config import TapConfig

BUILDER_NAME: str = "tap_text_vqa"
FORMAT_VERSION: int = 2
"""Bump when `SampleBuilder` output or the feature spec changes (forces rebuilds)."""
FILE_FORMAT: str = "array_record"
BUILT_SUBDIR: str = "lfpr_jax_built"
INPUTS_FILE: str = "inputs.json"
EXAMPLE_FIELDS: tuple[str, ...] = (
    "question_len", "ocr_text_len", "text_len", "obj_max", "ocr_max", "obj_feat_dim",
    "ocr_feat_dim", "fasttext_dim", "phoc_dim", "decode_steps", "num_answers")
"""The `TapConfig` fields that shape the examples (`features_dict`); the rest (MMT and
text-BERT layers, heads, FFN widths, hidden size, dropout) do not change them."""
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
    resources: vocabularies and FastText vectors shared by the splits of one build
      (None: loaded from `layout` when generating).
  """
  layout: readers.DataLayout | None = None
  split: str = "train"
  tap_config: TapConfig = dataclasses.field(default_factory=TapConfig)
  fingerprint: str = ""
  progress: bool = True
  resources: samples.Resources | None = None


class TapTextVqa(tfds.core.GeneratorBasedBuilder):
  """Fixed-shape TAP (TextVQA / ST-VQA / synthetic) examples, one split per config.

  Configs are made at build time (`make_config`), one per (dataset, split), so that each
  split is built, fingerprinted and reused on its own.
  """

  def _log_download_bytes(self) -> None:
    # TFDS prints "Downloading and preparing dataset Unknown size ..."; nothing is
    # downloaded here and the size is not known in advance: our own bar shows progress.
    logging.info("building %s", self.data_dir)

  def _log_download_done(self) -> None:
    # TFDS prints "downloaded and prepared" in bold; nothing was downloaded here.
    logging.info("built %s", self.data_dir)

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "docs/TAP.md §3.2 examples with collated cmb_text."}
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
            example_shapes=example_shapes(cfg.tap_config),
            layout=json.loads(cfg.layout.to_json())),
    )

  def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
    del dl_manager  # nothing to download
    return {self.builder_config.split: self._generate_examples()}

  def _generate_examples(self):
    cfg: TapTextVqaConfig = self.builder_config
    builder = samples.SampleBuilder.from_layout(cfg.layout, cfg.split, cfg.tap_config,
                                                resources=cfg.resources)
    entries = readers.read_imdb(cfg.layout.split(cfg.split).imdb)
    for entry in tqdm.tqdm(entries, desc=f"{cfg.name}", unit="question",
                           disable=not cfg.progress):
      example = builder.build(entry)
      example["image_id"] = example["image_id"].item()
      yield entry.index, example


def make_config(layout: readers.DataLayout, split: str, tap_config: TapConfig, *,
                fingerprint: str = "", progress: bool = True,
                resources: samples.Resources | None = None) -> TapTextVqaConfig:
  """The builder config of one split (name `<dataset>_<split>`)."""
  return TapTextVqaConfig(
      name=f"{layout.dataset}_{split}", description=f"{layout.dataset} {split}",
      layout=layout, split=split, tap_config=tap_config, fingerprint=fingerprint,
      progress=progress, resources=resources)


def example_shapes(config: TapConfig) -> dict[str, int]:
  """The `EXAMPLE_FIELDS` of `config`: everything of the model that shapes an example."""
  return {name: int(getattr(config, name)) for name in EXAMPLE_FIELDS}


def _stat(path: str, what: str) -> list[int]:
  """[size, mtime_ns] of `path`; FileNotFoundError naming `what` if it is missing."""
  try:
    st = os.stat(path)
  except FileNotFoundError:
    readers.require_file(path, what)
    raise
  return [st.st_size, st.st_mtime_ns]


def _sha256(path: str, what: str) -> str:
  readers.require_file(path, what)
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def example_inputs(layout: readers.DataLayout, split: str, config: TapConfig
                   ) -> dict[str, Any]:
  """Everything the examples of `split` depend on, by role (not by path).

  Small files (imdb, vocabularies) are identified by their SHA-256, so a copy of the
  release elsewhere is still recognised; the FastText model and the per-image feature
  and info files by size + mtime (hashing ~8 GB and tens of GB would take minutes).

  Args:
    layout: the data layout.
    split: the split.
    config: the model config; only `example_shapes(config)` is recorded.

  Returns:
    A JSON-serialisable dict: `format_version`, `builder_version`, `split`,
    `example_shapes`, `answer_processing`, `imdb`, `answer_vocab`, `object_vocab`,
    `bert_vocab`, `fasttext` and `features` (`obj/<feature_path>`, `ocr/...` and their
    `_info.npy` -> [size, mtime_ns]).

  Raises:
    FileNotFoundError: an input file is missing (named).
  """
  files = layout.split(split)
  entries = readers.read_imdb(files.imdb)
  fasttext_path = layout.fasttext_path()
  if fasttext_path is None:
    fasttext = {"stand_in": True}  # FastTextVectors(None)
  else:
    fasttext = {"model": _stat(fasttext_path, "the fastText binary model: "
                               + readers.FASTTEXT_MODEL_SOURCE)}
  features = {}
  for entry in entries:
    for folder, kind in ((files.obj_features, "obj"), (files.ocr_features, "ocr")):
      key = f"{kind}/{entry.feature_path}"
      if key in features:
        continue
      path = os.path.join(folder, entry.feature_path)
      what = "object" if kind == "obj" else "OCR"
      features[key] = _stat(path, f"the {what} features of image {entry.image_id}")
      features[readers.info_path(key)] = _stat(
          readers.info_path(path), f"the {what} info of image {entry.image_id}")
  return dict(
      format_version=FORMAT_VERSION, builder_version=str(TapTextVqa.VERSION),
      split=split, example_shapes=example_shapes(config),
      answer_processing=dict(num_answers=NUM_ANSWERS,
                             max_match_num=answers_lib.MAX_MATCH_NUM,
                             max_copy_steps=config.decode_steps,
                             num_ocr_slots=config.ocr_max),
      imdb=_sha256(files.imdb, "the imdb"),
      answer_vocab=_sha256(layout.path(layout.answer_vocab), "the answer vocabulary"),
      object_vocab=_sha256(layout.path(layout.object_vocab),
                           "the object class names (objects_vocab.txt)"),
      bert_vocab=_sha256(layout.path(layout.bert_vocab),
                         "the BERT WordPiece vocabulary: " + readers.BERT_VOCAB_SOURCE),
      fasttext=fasttext, features=features)


def fingerprint_of(inputs: Mapping[str, Any]) -> str:
  """SHA-256 of an `example_inputs` record."""
  text = json.dumps(inputs, sort_keys=True, default=str)
  return hashlib.sha256(text.encode("utf-8")).hexdigest()


def input_fingerprint(layout: readers.DataLayout, split: str, config: TapConfig) -> str:
  """SHA-256 over exactly what a split's examples depend on (`example_inputs`).

  Raises:
    FileNotFoundError: an input file is missing (named).
  """
  return fingerprint_of(example_inputs(layout, split, config))


_INPUT_NAMES = {
    "format_version": "the build format version", "builder_version": "the TFDS version",
    "split": "the split", "imdb": "the imdb", "answer_vocab": "the answer vocabulary",
    "object_vocab": "the object class names", "bert_vocab": "the BERT vocabulary",
    "fasttext": "the FastText model",
}


def explain_change(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> str:
  """Which inputs differ between two `example_inputs` records, in words."""
  if old is None:
    return "the existing build has no readable input record (built by an older version)"
  reasons = []
  for key, name in _INPUT_NAMES.items():
    if old.get(key) != new.get(key):
      reasons.append(f"{name} changed")
  for group in ("example_shapes", "answer_processing"):
    a, b = old.get(group) or {}, new.get(group) or {}
    diffs = [f"{k} {a.get(k)} -> {b.get(k)}" for k in sorted(set(a) | set(b))
             if a.get(k) != b.get(k)]
    if diffs:
      reasons.append(f"{group.replace('_', ' ')}: " + ", ".join(diffs))
  a, b = old.get("features") or {}, new.get("features") or {}
  for label, names in (("changed", [k for k in b if k in a and a[k] != b[k]]),
                       ("new", [k for k in b if k not in a]),
                       ("no longer used", [k for k in a if k not in b])):
    if names:
      shown = ", ".join(sorted(names)[:3]) + (", ..." if len(names) > 3 else "")
      reasons.append(f"{len(names)} feature/info file(s) {label} ({shown})")
  return "; ".join(reasons) or "the fingerprint differs"


def _read_inputs(dataset_dir: str) -> dict[str, Any] | None:
  try:
    with open(os.path.join(dataset_dir, INPUTS_FILE), encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _write_inputs(dataset_dir: str, inputs: Mapping[str, Any]) -> None:
  """Writes the input record next to the build (temp file, then rename)."""
  path = os.path.join(dataset_dir, INPUTS_FILE)
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(inputs, f, sort_keys=True)
  os.replace(tmp, path)


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
    reason: why the split was (re)built: "" when reused, "no build yet", "forced", or
      the changed inputs (`explain_change`).
  """
  split: str
  path: str
  num_examples: int
  fingerprint: str
  reused: bool
  reason: str = ""


def default_built_dir(root: str | os.PathLike, dataset: str) -> str:
  """Where real data is built by default: `<root>/lfpr_jax_built/<dataset>`.

  Next to the release, so every workdir (and TAP and TAP12 runs) shares one build; the
  `<dataset>` level keeps TextVQA and ST-VQA of one release apart.
  """
  return os.path.join(os.fspath(root), BUILT_SUBDIR, dataset)


class _DropCustomConfig(pylogging.Filter):
  def filter(self, record: pylogging.LogRecord) -> bool:
    return not str(record.msg).startswith("Using custom data configuration")


@contextlib.contextmanager
def _quiet_custom_config_warning() -> Iterator[None]:
  """TFDS warns with the whole builder config for every config made at build time
  (ours all are); that dump says nothing to a user, so it is dropped here."""
  logger = logging.get_absl_logger()
  f = _DropCustomConfig()
  logger.addFilter(f)
  try:
    yield
  finally:
    logger.removeFilter(f)


@contextlib.contextmanager
def _without_tfds_bars() -> Iterator[None]:
  """TFDS's own bars ("Generating splits... 0/1", "Generating train examples...: N
  examples" with no total, "Shuffling ...") describe its internal steps, not the
  questions built; our bar (one per split, total = its questions) is the progress a
  user reads. TFDS keeps the switch module-wide, so it is restored afterwards."""
  previous = tqdm_utils._active  # pylint: disable=protected-access
  tqdm_utils.display_progress_bar(False)
  try:
    yield
  finally:
    tqdm_utils.display_progress_bar(previous)


def dataset_dir(out_dir: str | os.PathLike, dataset: str, split: str) -> str:
  """Where `build_dataset` puts one split."""
  return os.path.join(os.fspath(out_dir), BUILDER_NAME, f"{dataset}_{split}",
                      str(TapTextVqa.VERSION))


def build_dataset(data_dir: str | os.PathLike | None,
                  out_dir: str | os.PathLike | None,
                  splits: Sequence[str] = ("train", "val"), *, dataset: str = "textvqa",
                  layout: readers.DataLayout | None = None,
                  config: TapConfig | None = None, force: bool = False,
                  progress: bool = True) -> dict[str, BuiltSplit]:
  """Builds (or reuses) one TFDS ArrayRecord dataset per split.

  Args:
    data_dir: the upstream-layout data directory (ignored when `layout` is given).
    out_dir: where the datasets go (a TFDS `data_dir`); None: `default_built_dir`.
    splits: split names of the layout.
    dataset: `textvqa`, `stvqa` or `synthetic` (selects the default layout).
    layout: explicit layout (overrides `data_dir` / `dataset`).
    config: model shapes; default `TapConfig()` with `num_answers` = answer vocabulary
      size. Only `example_shapes(config)` matters: configs that differ elsewhere (TAP
      and TAP12) share a build.
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
  out_dir = os.fspath(out_dir if out_dir is not None
                      else default_built_dir(layout.root, layout.dataset))
  for split in splits:
    layout.split(split)  # unknown split -> ValueError before any work
  os.makedirs(out_dir, exist_ok=True)
  resources = None  # loaded on the first split that needs building, then shared
  results = {}
  for split in splits:
    inputs = example_inputs(layout, split, config)
    fingerprint = fingerprint_of(inputs)
    target = dataset_dir(out_dir, layout.dataset, split)
    _remove_incomplete(os.path.dirname(target))
    stored = stored_fingerprint(target)
    if force:
      reason = "forced"
    elif stored is None:
      reason = "no build yet"
    elif stored != fingerprint:
      reason = explain_change(_read_inputs(target), inputs)
    else:
      reason = ""
    if reason and stored is not None:
      logging.warning("rebuilding %s: %s.", target, reason)
    if reason and os.path.exists(target):
      shutil.rmtree(target)
    if reason and resources is None:
      resources = samples.load_resources(layout, config.fasttext_dim)
    with _quiet_custom_config_warning():
      builder = TapTextVqa(
          config=make_config(layout, split, config, fingerprint=fingerprint,
                             progress=progress, resources=resources),
          data_dir=out_dir)
    if reason:
      download_dir = os.path.join(out_dir, BUILDER_NAME, ".downloads")
      with _without_tfds_bars():
        builder.download_and_prepare(file_format=FILE_FORMAT,
                                     download_dir=download_dir)
      if not any(files for _, _, files in os.walk(download_dir)):
        shutil.rmtree(download_dir, ignore_errors=True)  # TFDS's empty scaffolding
      _write_inputs(target, inputs)
    else:
      logging.info("reusing %s (inputs unchanged).", target)
    if os.path.normpath(os.fspath(builder.data_path)) != os.path.normpath(target):
      raise RuntimeError(f"TFDS wrote {builder.data_path}, expected {target}.")
    results[split] = BuiltSplit(
        split=split, path=target, num_examples=builder.info.splits[split].num_examples,
        fingerprint=fingerprint, reused=not reason, reason=reason)
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
  parser.add_argument("--data_dir", required=True, help="upstream-layout data directory "
                      "(the TAP data release root: TextVQA and ST-VQA)")
  parser.add_argument("--out_dir", default=None, help="where the datasets go; default "
                      f"<data_dir>/{BUILT_SUBDIR}/<dataset>, where lfpr_jax.main reads "
                      "(config.data.built_dir overrides both)")
  parser.add_argument("--dataset", default="textvqa", choices=readers.DATASET_NAMES)
  parser.add_argument("--splits", default="train,val", help="comma-separated")
  parser.add_argument("--layout", default=None, help="DataLayout JSON (overrides "
                      "--data_dir/--dataset)")
  parser.add_argument("--bert_vocab", default=None, help="bert-base-uncased vocab.txt "
                      "if not <data_dir>/bert-base-uncased/vocab.txt")
  parser.add_argument("--fasttext_model", default=None, help="wiki.en.bin if not "
                      "<data_dir>/.vector_cache/wiki.en.bin ('none': stand-in vectors, "
                      "for tests only)")
  parser.add_argument("--feat_dim", type=int, default=None, help="object/OCR feature "
                      "width if not 2048 (the synthetic benchmark's is smaller)")
  parser.add_argument("--force", action="store_true", help="rebuild unchanged splits")
  args = parser.parse_args(argv)
  splits = [s for s in args.splits.split(",") if s]
  if not splits:
    parser.error(f"--splits {args.splits!r} names no split")
  overrides = {}
  if args.bert_vocab:
    overrides["bert_vocab"] = os.path.abspath(args.bert_vocab)
  if args.fasttext_model:
    overrides["fasttext_model"] = (None if args.fasttext_model.lower() == "none"
                                   else os.path.abspath(args.fasttext_model))
  if args.layout:
    try:
      layout = readers.DataLayout.from_json(args.layout)
    except (ValueError, TypeError, AttributeError) as e:  # bad JSON or fields
      raise ValueError(f"--layout {args.layout} is not a DataLayout JSON (see "
                       f"DataLayout.to_json): {e}") from e
  else:
    layout = readers.DataLayout.for_dataset(args.dataset, args.data_dir)
  layout = dataclasses.replace(layout, **overrides)
  readers.require_dir(layout.root, f"the {layout.dataset} data directory")
  readers.check_setup_files(layout)
  config = None
  if args.feat_dim is not None:
    vocab = AnswerVocab.from_file(layout.path(layout.answer_vocab))
    config = TapConfig(num_answers=vocab.num_vocab, obj_feat_dim=args.feat_dim,
                       ocr_feat_dim=args.feat_dim)
  results = build_dataset(None, args.out_dir, splits, layout=layout, config=config,
                          force=args.force)
  for r in results.values():
    print(f"{r.split}: {r.num_examples} examples at {r.path}"
          + (" (reused)" if r.reused else f" (built: {r.reason})"))
  return 0


if __name__ == "__main__":
  sys.exit(main())
