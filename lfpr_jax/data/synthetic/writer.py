"""Writes a synthetic dataset in the upstream file layout, with its manifest.

`generate(out_dir, spec)` writes, atomically (a temporary sibling renamed into place):

```
<out_dir>/
  manifest.json                          paths, spec, counts, model sizes, baselines
  imdb/imdb_{train,val,test}.npy         element 0 = metadata, then one dict per question
  feat_resx/<split>/<image_id>.npy       float32 [n_obj, feat_dim] object region features
  feat_resx/<split>/<image_id>_info.npy  {bbox, objects, image_width, image_height, num_boxes}
  ocr_feat_resx/<split>/<image_id>.npy   float32 [n_ocr, feat_dim] OCR region features
  ocr_feat_resx/<split>/<image_id>_info.npy  {ocr_tokens, ocr_boxes, ocr_conf}
  1600-400-20/objects_vocab.txt          object class names (id k <-> line k-1, 0 = background)
  vocabs/fixed_answer_vocab.txt          <pad> <s> </s> <unk> + answer words (no OCR words)
  bert/vocab.txt                         small lower-case WordPiece vocabulary
```

No FastText model is written: the readers use their deterministic stand-in.

The manifest records the spec, the counts per split and type, the model sizes the data
implies (`max_*_len` counted with `readers.BertTokenizer` on the written
`bert/vocab.txt`, as the readers will tokenise) and the question-only baseline: the
accuracy of answering each val/test question with the most frequent train answer of
the same question text.

Randomness: one `numpy.random.SeedSequence(spec.seed)` is spawned into independent
streams (lexicon, embedding tables, one per split) that are passed down explicitly, so
e.g. changing the val size leaves train unchanged. The same spec gives byte-identical
files.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
from typing import Any, Mapping, Sequence

import numpy as np

from lfpr_jax.data.metrics import textvqa_accuracy
from lfpr_jax.data.readers import BERT_SPECIAL_IDS, BertTokenizer
from lfpr_jax.data.synthetic.questions import Question, build_image, group_questions
from lfpr_jax.data.synthetic.scenes import Scene
from lfpr_jax.data.synthetic.spec import COLOURS, QUESTION_TYPES, SPLITS, SyntheticSpec
from lfpr_jax.data.synthetic.vocab import (
    Lexicon, answer_vocab_words, bert_vocab_tokens, build_lexicon, image_words)

FORMAT_VERSION: int = 1
GENERATOR_NAME: str = "lfpr_jax.data.synthetic"
MANIFEST_NAME: str = "manifest.json"
MAX_DECODE_STEPS: int = 12
_MAX_SCENE_TRIES = 500


def _save_pickled(path: pathlib.Path, obj: Any) -> None:
  np.save(path, obj, allow_pickle=True)




def _write_split(root: pathlib.Path, spec: SyntheticSpec, split: str,
                 rng: np.random.Generator, lexicon: Lexicon,
                 tables: Mapping[str, np.ndarray], id_offset: int) -> list[dict[str, Any]]:
  """Generates one split's images and features; returns its imdb entries."""
  obj_dir = root / "feat_resx" / split
  ocr_dir = root / "ocr_feat_resx" / split
  obj_dir.mkdir(parents=True)
  ocr_dir.mkdir(parents=True)
  entries = []
  for image_index, (has_ocr, qtypes) in enumerate(
      group_questions(rng, spec, spec.num_questions(split))):
    scene, questions = _draw_image(rng, spec, lexicon, split, qtypes, has_ocr)
    image_id = f"{split}_{image_index:06d}"
    _write_image_features(obj_dir, ocr_dir, image_id, scene, rng, spec, lexicon, tables)
    for q in questions:
      entries.append(_imdb_entry(q, id_offset + len(entries), image_id, scene, split))
  return entries


def _draw_image(rng: np.random.Generator, spec: SyntheticSpec, lexicon: Lexicon,
                split: str, qtypes: Sequence[str], has_ocr: bool
                ) -> tuple[Scene, list[Question]]:
  """Draws words and a scene until one answers every question unambiguously."""
  for _ in range(_MAX_SCENE_TRIES):
    words = image_words(rng, spec, lexicon, split)
    built = build_image(rng, spec, qtypes, has_ocr, words)
    if built is not None:
      return built
  raise RuntimeError(
      f"could not build a {split} image for question types {qtypes} in "
      f"{_MAX_SCENE_TRIES} tries; the spec is too crowded (raise max_objects/max_ocr "
      "or the image size).")


def _write_image_features(obj_dir: pathlib.Path, ocr_dir: pathlib.Path, image_id: str,
                          scene: Scene, rng: np.random.Generator, spec: SyntheticSpec,
                          lexicon: Lexicon, tables: Mapping[str, np.ndarray]) -> None:
  """Writes an image's object and OCR features and infos (planted signal + noise).

  Object row = class_signal * E_class[c] + colour_signal * E_colour[k] + noise; OCR
  row = token_signal * E_token[word] + ocr_context_signal * E_class[host] + noise, the
  host term only for a token written on an object (a crop of text on a bus also looks
  like a bus).
  """
  d = spec.feat_dim
  objects = scene.objects
  obj_feat = (spec.class_signal * tables["class"][[o.cls for o in objects]]
              + spec.colour_signal * tables["colour"][[o.colour for o in objects]]
              + spec.feature_noise * rng.standard_normal((len(objects), d)))
  obj_info = {
      "bbox": np.array([o.box for o in objects], np.float32).reshape(-1, 4),
      "objects": np.array([o.cls + 1 for o in objects], np.int64),
      "image_width": scene.width,
      "image_height": scene.height,
      "num_boxes": len(objects),
  }
  np.save(obj_dir / f"{image_id}.npy", obj_feat.astype(np.float32))
  _save_pickled(obj_dir / f"{image_id}_info.npy", obj_info)

  tokens = scene.tokens
  ocr_feat = np.zeros((len(tokens), d))
  if tokens:
    context = np.array([tables["class"][objects[t.host].cls] if t.host >= 0
                        else np.zeros(d) for t in tokens])
    ocr_feat = (spec.token_signal * tables["token"][[lexicon.row[t.word] for t in tokens]]
                + spec.ocr_context_signal * context
                + spec.feature_noise * rng.standard_normal((len(tokens), d)))
  ocr_info = {
      "ocr_tokens": [t.word for t in tokens],
      "ocr_boxes": np.array([t.box for t in tokens], np.float32).reshape(-1, 4),
      "ocr_conf": rng.uniform(0.8, 1.0, size=len(tokens)).astype(np.float32),
  }
  np.save(ocr_dir / f"{image_id}.npy", ocr_feat.astype(np.float32))
  _save_pickled(ocr_dir / f"{image_id}_info.npy", ocr_info)


def _imdb_entry(q: Question, question_id: int, image_id: str, scene: Scene,
                split: str) -> dict[str, Any]:
  """One question's imdb dict, with the fields the upstream readers use."""
  return {
      "question": q.question,
      "question_id": question_id,
      "image_id": image_id,
      "image_width": scene.width,
      "image_height": scene.height,
      "feature_path": f"{image_id}.npy",
      "answers": list(q.variants),
      "set_name": split,
      "question_type": q.qtype,
  }


def _question_only_baseline(train: Sequence[Mapping[str, Any]],
                            evaluated: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """Accuracy of answering with the most frequent train answer of the same question."""
  by_question: dict[str, dict[str, int]] = {}
  overall: dict[str, int] = {}
  for e in train:
    majority = max(set(e["answers"]), key=lambda a: (e["answers"].count(a), a))
    table = by_question.setdefault(e["question"], {})
    table[majority] = table.get(majority, 0) + 1
    overall[majority] = overall.get(majority, 0) + 1
  fallback = max(overall, key=lambda a: (overall[a], a)) if overall else ""
  totals: dict[str, list[float]] = {}
  for e in evaluated:
    table = by_question.get(e["question"])
    pred = max(table, key=lambda a: (table[a], a)) if table else fallback
    totals.setdefault(e["question_type"], []).append(textvqa_accuracy(pred, e["answers"]))
  all_scores = [s for v in totals.values() for s in v]
  return {
      "accuracy": float(np.mean(all_scores)) if all_scores else 0.0,
      "per_type": {t: float(np.mean(totals[t])) for t in QUESTION_TYPES if t in totals},
  }


def _relative_paths() -> dict[str, Any]:
  return {
      "imdb": {s: f"imdb/imdb_{s}.npy" for s in SPLITS},
      "obj_feat_dir": {s: f"feat_resx/{s}" for s in SPLITS},
      "ocr_feat_dir": {s: f"ocr_feat_resx/{s}" for s in SPLITS},
      "objects_vocab": "1600-400-20/objects_vocab.txt",
      "answer_vocab": "vocabs/fixed_answer_vocab.txt",
      "bert_vocab": "bert/vocab.txt",
      "fasttext": None,
  }


def _write_text_lines(path: pathlib.Path, lines: Sequence[str]) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")


def _generate_into(root: pathlib.Path, spec: SyntheticSpec) -> dict[str, Any]:
  """Writes every file of the dataset under `root`; returns the manifest dict."""
  lex_seq, emb_seq, *split_seqs = np.random.SeedSequence(spec.seed).spawn(2 + len(SPLITS))
  answer_words = answer_vocab_words(spec)
  lexicon = build_lexicon(np.random.default_rng(lex_seq), spec)
  bert_tokens = bert_vocab_tokens(
      spec, lexicon.train_words if spec.bert_whole_ocr_words else ())
  emb_rng = np.random.default_rng(emb_seq)
  tables = {
      "class": emb_rng.standard_normal((spec.num_object_classes, spec.feat_dim)),
      "colour": emb_rng.standard_normal((len(COLOURS), spec.feat_dim)),
      "token": emb_rng.standard_normal((len(lexicon.row), spec.feat_dim)),
  }

  paths = _relative_paths()
  _write_text_lines(root / paths["objects_vocab"], spec.class_names)
  _write_text_lines(root / paths["answer_vocab"], answer_words)
  _write_text_lines(root / paths["bert_vocab"], bert_tokens)
  (root / "imdb").mkdir()

  entries_by_split: dict[str, list[dict[str, Any]]] = {}
  for split_index, (split, seq) in enumerate(zip(SPLITS, split_seqs)):
    entries = _write_split(root, spec, split, np.random.default_rng(seq), lexicon, tables,
                           id_offset=split_index * 10_000_000)
    metadata = {"dataset_name": "synthetic_textvqa", "generator": GENERATOR_NAME,
                "format_version": FORMAT_VERSION, "split": split, "seed": spec.seed,
                "has_answer": True, "num_questions": len(entries)}
    imdb = np.empty(len(entries) + 1, dtype=object)
    imdb[0] = metadata
    for i, entry in enumerate(entries):
      imdb[i + 1] = entry
    np.save(root / paths["imdb"][split], imdb, allow_pickle=True)
    entries_by_split[split] = entries

  return _manifest(root, spec, paths, entries_by_split, lexicon, answer_words, bert_tokens)


def _manifest(root: pathlib.Path, spec: SyntheticSpec, paths: Mapping[str, Any],
              entries_by_split: Mapping[str, Sequence[Mapping[str, Any]]],
              lexicon: Lexicon, answer_words: Sequence[str],
              bert_tokens: Sequence[str]) -> dict[str, Any]:
  """Counts, observed sequence lengths and baselines of a freshly written dataset.

  The `max_*_len` sizes count wordpieces with the readers' own `BertTokenizer` on the
  written `bert/vocab.txt`, so they are the lengths the model input will have.
  """
  tokenizer = BertTokenizer(root / paths["bert_vocab"])
  unk_id = BERT_SPECIAL_IDS["[UNK]"]
  cache: dict[str, int] = {}

  def pieces(text: str) -> int:
    """Wordpieces of `text` with [CLS] and [SEP] (the TAP text input length)."""
    total = 0
    for word in text.split():
      if word not in cache:
        ids = tokenizer.wordpieces(word)
        if unk_id in ids:
          raise RuntimeError(f"internal error: {word!r} is not covered by bert/vocab.txt")
        cache[word] = len(ids)
      total += cache[word]
    return total + 2  # [CLS] ... [SEP]

  names = spec.class_names
  train_words = set(lexicon.train_words)
  max_q = max_ocr_text = max_obj_text = max_words = 0
  counts: dict[str, Any] = {}
  for split, entries in entries_by_split.items():
    image_ids = sorted({e["image_id"] for e in entries})
    n_tokens = n_novel = n_no_text = 0
    for image_id in image_ids:
      ocr_info = np.load(root / paths["ocr_feat_dir"][split] / f"{image_id}_info.npy",
                         allow_pickle=True).item()
      obj_info = np.load(root / paths["obj_feat_dir"][split] / f"{image_id}_info.npy",
                         allow_pickle=True).item()
      tokens = ocr_info["ocr_tokens"]
      n_tokens += len(tokens)
      n_novel += sum(t not in train_words for t in tokens)
      n_no_text += not tokens
      max_ocr_text = max(max_ocr_text, pieces(" ".join(tokens)))
      max_obj_text = max(max_obj_text,
                         pieces(" ".join(names[int(k) - 1] for k in obj_info["objects"])))
    per_type = {t: 0 for t in QUESTION_TYPES}
    for e in entries:
      per_type[e["question_type"]] += 1
      max_q = max(max_q, pieces(e["question"]))
      max_words = max(max_words, max(len(a.split()) for a in e["answers"]))
    counts[split] = {
        "questions": len(entries), "images": len(image_ids), "per_type": per_type,
        "images_without_ocr": n_no_text, "ocr_tokens": n_tokens,
        "novel_ocr_tokens": n_novel,
    }
  baselines = {s: _question_only_baseline(entries_by_split["train"], entries_by_split[s])
               for s in SPLITS if s != "train" and entries_by_split[s]}
  return {
      "generator": GENERATOR_NAME,
      "format_version": FORMAT_VERSION,
      "dataset_name": "synthetic_textvqa",
      "spec": spec.to_dict(),
      "paths": dict(paths),
      "counts": counts,
      "sizes": {
          "feat_dim": spec.feat_dim,
          "max_objects": spec.max_objects,
          "max_ocr": spec.max_ocr,
          "num_object_classes": spec.num_object_classes,
          "answer_vocab_size": len(answer_words),
          "bert_vocab_size": len(bert_tokens),
          "max_question_len": max_q,
          "max_ocr_text_len": max_ocr_text,
          "max_obj_text_len": max_obj_text,
          "max_answer_words": max_words,
          "max_decode_steps": min(max_words + 1, MAX_DECODE_STEPS),
          "ocr_lexicon_size": len(lexicon.train_words),
          "novel_lexicon_size": len(lexicon.novel_words),
      },
      "question_only_baseline": baselines,
  }


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
  """Loads a manifest, given its path or the dataset directory.

  Raises:
    FileNotFoundError: there is no manifest.
    ValueError: the file is not a manifest written by this module.
  """
  path = pathlib.Path(path)
  if path.is_dir():
    path = path / MANIFEST_NAME
  if not path.is_file():
    raise FileNotFoundError(f"no synthetic dataset manifest at {path}")
  manifest = json.loads(path.read_text(encoding="utf-8"))
  if not isinstance(manifest, dict) or manifest.get("generator") != GENERATOR_NAME:
    raise ValueError(f"{path} is not a manifest written by {GENERATOR_NAME}.")
  return manifest


def _check_reusable(root: pathlib.Path, spec: SyntheticSpec) -> pathlib.Path:
  """Path of the existing manifest if it matches `spec`; raises otherwise."""
  manifest_path = root / MANIFEST_NAME
  manifest = read_manifest(manifest_path)
  if manifest.get("format_version") != FORMAT_VERSION:
    raise ValueError(
        f"{root} holds a synthetic dataset of format version "
        f"{manifest.get('format_version')}, this code writes {FORMAT_VERSION}; pass "
        "overwrite=True to regenerate it.")
  wanted = json.loads(json.dumps(spec.to_dict()))
  if manifest.get("spec") != wanted:
    diff = sorted(k for k in set(wanted) | set(manifest.get("spec", {}))
                  if wanted.get(k) != manifest.get("spec", {}).get(k))
    raise ValueError(
        f"{root} holds a synthetic dataset generated from a different spec (fields "
        f"{diff} differ); pass overwrite=True to replace it or choose another out_dir.")
  missing = []
  for value in manifest["paths"].values():
    for rel in (value.values() if isinstance(value, dict) else [value]):
      if rel is not None and not (root / rel).exists():
        missing.append(rel)
  if missing:
    raise ValueError(f"{root} is an incomplete synthetic dataset (missing {missing}); "
                     "pass overwrite=True to regenerate it.")
  return manifest_path


def generate(out_dir: str | os.PathLike, spec: SyntheticSpec | None = None, *,
             overwrite: bool = False) -> pathlib.Path:
  """Writes the synthetic Text-VQA dataset of `spec` to `out_dir` (atomically).

  The files are written into a temporary sibling directory that is renamed into place
  once complete, so `out_dir` is either absent or complete.

  Args:
    out_dir: dataset root to create.
    spec: what to generate (defaults to `SyntheticSpec()`).
    overwrite: replace an existing synthetic dataset at `out_dir`. Without it an
      existing dataset with the same spec is reused and returned as is.

  Returns:
    Path of `<out_dir>/manifest.json`.

  Raises:
    ValueError: `out_dir` holds a dataset of another spec/format, or an incomplete one
      (without `overwrite`), or a `manifest.json` this module did not write.
    FileExistsError: `out_dir` exists, is not empty and is not a synthetic dataset
      (never deleted, not even with `overwrite`).
  """
  spec = SyntheticSpec() if spec is None else spec
  root = pathlib.Path(out_dir)
  manifest_path = root / MANIFEST_NAME
  if root.exists():
    if not root.is_dir():
      raise FileExistsError(f"{root} exists and is not a directory.")
    if manifest_path.is_file():
      read_manifest(manifest_path)  # raises if it is not ours
      if not overwrite:
        return _check_reusable(root, spec)
    elif any(root.iterdir()):
      raise FileExistsError(
          f"{root} exists, is not empty and has no {MANIFEST_NAME}: not a synthetic "
          "dataset, refusing to touch it.")
  root.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
  tmp.chmod(0o755)  # mkdtemp makes it private; the dataset is meant to be shared
  try:
    manifest = _generate_into(tmp, spec)
    (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n",
                                     encoding="utf-8")
    old = None
    if root.exists():
      if any(root.iterdir()):
        old = pathlib.Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
        os.rename(root, old / "data")
      else:
        root.rmdir()
    try:
      os.rename(tmp, root)
    except OSError:
      if old is not None:  # put the previous dataset back
        os.rename(old / "data", root)
        old.rmdir()
      elif manifest_path.is_file() and not overwrite:
        # Another process finished the same directory first: reuse it if it matches.
        shutil.rmtree(tmp, ignore_errors=True)
        return _check_reusable(root, spec)
      raise
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return manifest_path
