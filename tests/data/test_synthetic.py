"""The generated synthetic Text-VQA dataset (`synthetic.generate`): file formats, answer
reachability, geometry, determinism, reuse.

The spec and the scene steps are tested in test_synthetic_spec.py and
test_synthetic_scenes.py.
"""

from __future__ import annotations

import collections
import pathlib

import numpy as np
import pytest

from lfpr_jax.data import synthetic
from lfpr_jax.data.answers import process_answers
from lfpr_jax.data.readers import BERT_SPECIAL_IDS, BertTokenizer
from lfpr_jax.data.text import make_context_tokens, word_tokenize
from lfpr_jax.data.vocab import AnswerVocab

ALL_TYPES = {"ocr_position": 0.25, "ocr_relation": 0.05, "ocr_on_object": 0.20,
             "ocr_multi": 0.10, "count": 0.10, "colour": 0.10, "exists": 0.10,
             "no_ocr": 0.10}
"""Every question type (the default mix leaves `count` out)."""
TINY = synthetic.SyntheticSpec(
    seed=3, num_train=60, num_val=20, num_test=20, feat_dim=16, max_objects=10,
    min_objects=3, max_ocr=8, min_ocr=3, num_object_classes=10, ocr_lexicon_size=40,
    novel_lexicon_size=20, novel_word_fraction=0.5, answer_variant_prob=0.5,
    type_fractions=ALL_TYPES)
MICRO = synthetic.SyntheticSpec(
    seed=5, num_train=8, num_val=4, num_test=4, feat_dim=8, max_objects=8, max_ocr=7,
    num_object_classes=8, ocr_lexicon_size=20, novel_lexicon_size=10)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[pathlib.Path, dict]:
  root = tmp_path_factory.mktemp("syn") / "data"
  manifest_path = synthetic.generate(root, TINY)
  assert manifest_path == root / synthetic.MANIFEST_NAME
  return root, synthetic.read_manifest(manifest_path)


def _imdb(root: pathlib.Path, manifest: dict, split: str) -> np.ndarray:
  return np.load(root / manifest["paths"]["imdb"][split], allow_pickle=True)


def _info(root: pathlib.Path, manifest: dict, kind: str, split: str, image_id: str) -> dict:
  path = root / manifest["paths"][kind][split] / f"{image_id}_info.npy"
  return np.load(path, encoding="latin1", allow_pickle=True).item()


def _entries(root, manifest, split):
  return list(_imdb(root, manifest, split)[1:])


def _majority(answers):
  return collections.Counter(answers).most_common(1)[0][0]


def _tree_bytes(root: pathlib.Path) -> dict[str, bytes]:
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
          if p.is_file()}


# ------------------------------------------------------------------------ layout


def test_every_file_exists(dataset):
  root, manifest = dataset
  paths = manifest["paths"]
  assert paths["fasttext"] is None
  for key in ("objects_vocab", "answer_vocab", "bert_vocab"):
    assert (root / paths[key]).is_file()
  for split in synthetic.SPLITS:
    assert (root / paths["imdb"][split]).is_file()
    for entry in _entries(root, manifest, split):
      for kind in ("obj_feat_dir", "ocr_feat_dir"):
        folder = root / paths[kind][split]
        assert (folder / entry["feature_path"]).is_file()
        assert (folder / f"{entry['image_id']}_info.npy").is_file()
  leftovers = [p.name for p in root.parent.iterdir() if p.name.startswith(".")]
  assert not leftovers  # the temporary directory was renamed, nothing left behind


def test_imdb_format(dataset):
  root, manifest = dataset
  question_ids = set()
  for split in synthetic.SPLITS:
    imdb = _imdb(root, manifest, split)
    assert imdb.dtype == object and imdb.ndim == 1
    meta = imdb[0]
    assert isinstance(meta, dict) and "image_id" not in meta
    assert meta["split"] == split and meta["num_questions"] == len(imdb) - 1
    assert len(imdb) - 1 == TINY.num_questions(split)
    for entry in imdb[1:]:
      assert isinstance(entry["question"], str) and entry["question"].endswith("?")
      assert type(entry["question_id"]) is int
      assert isinstance(entry["image_id"], str)
      assert type(entry["image_width"]) is int and type(entry["image_height"]) is int
      assert entry["feature_path"] == f"{entry['image_id']}.npy"
      assert entry["set_name"] == split
      assert entry["question_type"] in synthetic.QUESTION_TYPES
      answers = entry["answers"]
      assert len(answers) == 10 and all(isinstance(a, str) and a for a in answers)
      question_ids.add(entry["question_id"])
      info = _info(root, manifest, "obj_feat_dir", split, entry["image_id"])
      assert (info["image_width"], info["image_height"]) == (
          entry["image_width"], entry["image_height"])
  assert len(question_ids) == sum(TINY.num_questions(s) for s in synthetic.SPLITS)


def test_feature_rows_match_info(dataset):
  root, manifest = dataset
  n_classes = TINY.num_object_classes
  for split in synthetic.SPLITS:
    for image_id in sorted({e["image_id"] for e in _entries(root, manifest, split)}):
      feat = np.load(root / manifest["paths"]["obj_feat_dir"][split] / f"{image_id}.npy")
      info = _info(root, manifest, "obj_feat_dir", split, image_id)
      n = feat.shape[0]
      assert feat.dtype == np.float32 and feat.shape == (n, TINY.feat_dim)
      assert TINY.min_objects <= n <= TINY.max_objects
      assert info["bbox"].shape == (n, 4) and info["bbox"].dtype == np.float32
      assert info["num_boxes"] == n and info["objects"].shape == (n,)
      assert info["objects"].min() >= 1 and info["objects"].max() <= n_classes
      w, h = info["image_width"], info["image_height"]
      boxes = info["bbox"]
      assert np.all(boxes[:, 0] < boxes[:, 2]) and np.all(boxes[:, 1] < boxes[:, 3])
      assert boxes.min() >= 0
      assert np.all(boxes[:, [0, 2]] < w) and np.all(boxes[:, [1, 3]] < h)

      feat = np.load(root / manifest["paths"]["ocr_feat_dir"][split] / f"{image_id}.npy")
      info = _info(root, manifest, "ocr_feat_dir", split, image_id)
      m = feat.shape[0]
      assert feat.dtype == np.float32 and feat.shape == (m, TINY.feat_dim)
      assert len(info["ocr_tokens"]) == m and info["ocr_boxes"].shape == (m, 4)
      assert info["ocr_conf"].shape == (m,) and m <= TINY.max_ocr
      tokens = info["ocr_tokens"]
      assert len(set(tokens)) == m
      for token in tokens:  # single lower-case alphanumeric words: normalisation is a no-op
        assert token == word_tokenize(token) == token.lower()
        assert token.isascii() and token.isalnum()
      if m:
        boxes = info["ocr_boxes"]
        assert np.all(boxes[:, 0] < boxes[:, 2]) and np.all(boxes[:, 1] < boxes[:, 3])


def test_vocabulary_files(dataset):
  root, manifest = dataset
  paths, sizes = manifest["paths"], manifest["sizes"]
  lines = (root / paths["answer_vocab"]).read_text().splitlines()
  assert lines[:4] == ["<pad>", "<s>", "</s>", "<unk>"]
  vocab = AnswerVocab.from_file(root / paths["answer_vocab"])
  assert (vocab.pad_idx, vocab.bos_idx, vocab.eos_idx, vocab.unk_idx) == (0, 1, 2, 3)
  assert vocab.num_vocab == sizes["answer_vocab_size"] == len(lines)
  assert synthetic.UNANSWERABLE in vocab and "yes" in vocab and "two" in vocab

  names = (root / paths["objects_vocab"]).read_text().splitlines()
  assert tuple(names) == TINY.class_names

  bert = (root / paths["bert_vocab"]).read_text().splitlines()
  assert len(bert) == sizes["bert_vocab_size"] and len(bert) % 8 == 0
  assert len(set(bert)) == len(bert)
  for token, index in (("[PAD]", 0), ("[UNK]", 100), ("[CLS]", 101), ("[SEP]", 102),
                       ("[MASK]", 103)):
    assert bert[index] == token
  assert all(bert[i] == f"[unused{i - 1}]" for i in range(1, 100))
  tokenizer = BertTokenizer(root / paths["bert_vocab"])
  unk = BERT_SPECIAL_IDS["[UNK]"]

  for split in synthetic.SPLITS:
    for entry in _entries(root, manifest, split):
      assert unk not in tokenizer.wordpieces(entry["question"])
      info = _info(root, manifest, "ocr_feat_dir", split, entry["image_id"])
      for token in info["ocr_tokens"]:
        assert token not in vocab  # OCR answers must be copied, never generated
        assert unk not in tokenizer.wordpieces(token)
  assert unk not in tokenizer.wordpieces(" ".join(names))


def test_manifest_sizes_and_counts(dataset):
  root, manifest = dataset
  sizes = manifest["sizes"]
  assert (sizes["feat_dim"], sizes["max_objects"], sizes["max_ocr"]) == (16, 10, 8)
  tokenizer = BertTokenizer(root / manifest["paths"]["bert_vocab"])
  max_q = max(len(tokenizer.encode(e["question"]))
              for s in synthetic.SPLITS for e in _entries(root, manifest, s))
  assert sizes["max_question_len"] == max_q <= 20
  assert 2 < sizes["max_ocr_text_len"] <= 100 and 2 < sizes["max_obj_text_len"] <= 50
  assert sizes["max_answer_words"] in (2, 3) and sizes["max_decode_steps"] <= 12
  assert synthetic.SyntheticSpec.from_dict(manifest["spec"]) == TINY
  for split in synthetic.SPLITS:
    entries = _entries(root, manifest, split)
    counts = manifest["counts"][split]
    assert counts["questions"] == len(entries)
    assert counts["per_type"] == {
        t: sum(e["question_type"] == t for e in entries) for t in synthetic.QUESTION_TYPES}
    n_images = len({e["image_id"] for e in entries})
    assert counts["images"] == n_images
    assert len(entries) / 2 <= n_images <= len(entries) / 2 + 2


# ------------------------------------------------------------------------ answers


def test_every_answer_is_reachable(dataset):
  root, manifest = dataset
  vocab = AnswerVocab.from_file(root / manifest["paths"]["answer_vocab"])
  for split in synthetic.SPLITS:
    for entry in _entries(root, manifest, split):
      info = _info(root, manifest, "ocr_feat_dir", split, entry["image_id"])
      context = make_context_tokens(info["ocr_tokens"])
      result = process_answers(entry["answers"], context, vocab)
      assert result.sampled_idx_seq, entry
      assert all(result.candidates_per_answer), entry  # all 10 answers, variants too
      seq = process_answers([_majority(entry["answers"])] * 10, context,
                            vocab).sampled_idx_seq
      assert len(seq) + 1 <= 12
      qtype = entry["question_type"]
      if qtype in synthetic.OCR_COPY_TYPES:
        assert all(i >= vocab.num_vocab for i in seq), entry  # copied
      else:
        assert all(i < vocab.num_vocab for i in seq), entry  # fixed vocabulary
      if qtype == "no_ocr":
        assert not info["ocr_tokens"]
        assert _majority(entry["answers"]) == synthetic.UNANSWERABLE


def _class_in(question: str, names) -> str:
  found = [n for n in names if f" {n}?" in question or f" {n} " in question]
  assert len(found) == 1, question
  return found[0]


def test_answers_follow_the_geometry(dataset):
  root, manifest = dataset
  names = TINY.class_names
  plurals = {p: s for s, p in synthetic.OBJECT_CLASSES}
  directions = {t: name for name, _, templates in synthetic.POSITIONS for t in templates}
  seen = collections.Counter()
  for split in synthetic.SPLITS:
    for entry in _entries(root, manifest, split):
      q, answer = entry["question"], _majority(entry["answers"])
      obj = _info(root, manifest, "obj_feat_dir", split, entry["image_id"])
      ocr = _info(root, manifest, "ocr_feat_dir", split, entry["image_id"])
      classes = [names[k - 1] for k in obj["objects"]]
      tokens, boxes = ocr["ocr_tokens"], ocr["ocr_boxes"]
      qtype = entry["question_type"]
      seen[qtype] += 1
      if qtype == "ocr_position":
        index = synthetic.position_answer(directions[q], boxes, obj["image_width"],
                                          obj["image_height"], TINY.position_margin)
        assert index >= 0 and tokens[index] == answer
      elif qtype in ("ocr_on_object", "ocr_multi"):
        name = _class_in(q, names)
        assert classes.count(name) == 1
        host = obj["bbox"][classes.index(name)]
        inside = synthetic.text_on_object(host, boxes)
        assert " ".join(tokens[i] for i in inside) == answer
        assert len(inside) == (1 if qtype == "ocr_on_object" else len(answer.split()))
        if qtype == "ocr_multi":
          assert len(inside) in (2, 3)
          xs = [boxes[i][0] for i in inside]
          assert xs == sorted(xs)
      elif qtype == "ocr_relation":
        side = [s for s, phrase in synthetic.RELATIONS if f" {phrase} the " in q]
        assert len(side) == 1, q
        name = _class_in(q, names)
        assert classes.count(name) == 1
        index = synthetic.relation_answer(obj["bbox"][classes.index(name)], side[0], boxes)
        assert index >= 0 and tokens[index] == answer
      elif qtype == "count":
        plural = [p for p in plurals if f" {p} " in q]
        assert len(plural) == 1, q
        assert synthetic.NUMBER_WORDS[classes.count(plurals[plural[0]])] == answer
      elif qtype == "colour":
        assert classes.count(_class_in(q, names)) == 1 and answer in synthetic.COLOURS
      elif qtype == "exists":
        assert answer == ("yes" if _class_in(q, names) in classes else "no")
  assert set(seen) == set(synthetic.QUESTION_TYPES)


def test_some_answers_have_variants(dataset):
  root, manifest = dataset
  entries = [e for s in synthetic.SPLITS for e in _entries(root, manifest, s)]
  with_variants = [e for e in entries if len(set(e["answers"])) > 1]
  assert with_variants
  for e in with_variants:
    assert e["answers"].count(_majority(e["answers"])) >= 8


def test_question_type_counts_match_fractions(dataset):
  root, manifest = dataset
  for split in synthetic.SPLITS:
    counts = collections.Counter(e["question_type"] for e in _entries(root, manifest, split))
    n = TINY.num_questions(split)
    for qtype, fraction in TINY.type_fractions:
      assert abs(counts[qtype] - fraction * n) <= 1, (split, qtype)


def test_question_only_baseline_is_low(dataset):
  _, manifest = dataset
  for split in ("val", "test"):
    assert manifest["question_only_baseline"][split]["accuracy"] < 0.5
    per_type = manifest["question_only_baseline"][split]["per_type"]
    copy_scores = [per_type[t] for t in synthetic.OCR_COPY_TYPES if t in per_type]
    assert copy_scores and np.mean(copy_scores) <= 0.2


# ---------------------------------------------------------------------- held out


def test_val_test_images_are_held_out(dataset):
  root, manifest = dataset
  images = {s: {e["image_id"] for e in _entries(root, manifest, s)} for s in synthetic.SPLITS}
  assert not images["train"] & images["val"]
  assert not images["train"] & images["test"]
  assert not images["val"] & images["test"]

  def tokens(split):
    return {t for i in images[split]
            for t in _info(root, manifest, "ocr_feat_dir", split, i)["ocr_tokens"]}

  train_tokens = tokens("train")
  for split in ("val", "test"):
    novel = tokens(split) - train_tokens
    assert novel and manifest["counts"][split]["novel_ocr_tokens"] > 0
  assert manifest["counts"]["train"]["novel_ocr_tokens"] == 0


# -------------------------------------------------------------- determinism, reuse


def test_same_seed_same_files_other_seed_other_files(dataset, tmp_path):
  root, _ = dataset
  again = tmp_path / "again"
  synthetic.generate(again, TINY)
  first, second = _tree_bytes(root), _tree_bytes(again)
  assert first.keys() == second.keys()
  assert all(first[k] == second[k] for k in first)

  other = tmp_path / "other"
  synthetic.generate(other, synthetic.SyntheticSpec(**{**TINY.to_dict(), "seed": 4}))
  third = _tree_bytes(other)
  assert third["imdb/imdb_train.npy"] != first["imdb/imdb_train.npy"]
  common = [k for k in first if k in third and k.endswith(".npy") and "feat" in k]
  assert any(first[k] != third[k] for k in common)


def test_split_streams_are_independent(tmp_path):
  a = synthetic.generate(tmp_path / "a", MICRO)
  b = synthetic.generate(tmp_path / "b",
                         synthetic.SyntheticSpec(**{**MICRO.to_dict(), "num_val": 6}))
  train_a = (a.parent / "imdb/imdb_train.npy").read_bytes()
  train_b = (b.parent / "imdb/imdb_train.npy").read_bytes()
  assert train_a == train_b


def test_reuse_and_overwrite(tmp_path):
  root = tmp_path / "ds"
  path = synthetic.generate(root, MICRO)
  stamp = path.stat().st_mtime_ns
  assert synthetic.generate(root, MICRO) == path
  assert path.stat().st_mtime_ns == stamp  # reused, not rewritten

  other = synthetic.SyntheticSpec(**{**MICRO.to_dict(), "seed": 6})
  with pytest.raises(ValueError, match="different spec"):
    synthetic.generate(root, other)
  assert synthetic.generate(root, other, overwrite=True) == path
  assert synthetic.read_manifest(root)["spec"]["seed"] == 6
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]

  (root / "imdb" / "imdb_val.npy").unlink()
  with pytest.raises(ValueError, match="incomplete"):
    synthetic.generate(root, other)

  foreign = tmp_path / "foreign"
  foreign.mkdir()
  (foreign / "notes.txt").write_text("keep me")
  for overwrite in (False, True):
    with pytest.raises(FileExistsError):
      synthetic.generate(foreign, MICRO, overwrite=overwrite)
  assert (foreign / "notes.txt").read_text() == "keep me"

  empty = tmp_path / "empty"
  empty.mkdir()
  assert synthetic.generate(empty, MICRO) == empty / "manifest.json"


# ------------------------------------------------------------------------ margins


def test_position_margin(tmp_path):
  spec = synthetic.SyntheticSpec(
      seed=7, num_train=40, num_val=4, num_test=4, feat_dim=8, max_objects=8,
      max_ocr=8, num_object_classes=8, ocr_lexicon_size=30, novel_lexicon_size=10,
      position_margin=0.2, type_fractions={"ocr_position": 0.8, "no_ocr": 0.2})
  root = synthetic.generate(tmp_path / "d", spec).parent
  manifest = synthetic.read_manifest(root)
  directions = {t: d for d, (_, _, templates) in enumerate(synthetic.POSITIONS)
                for t in templates}
  checked = 0
  for entry in _entries(root, manifest, "train"):
    if entry["question_type"] != "ocr_position":
      continue
    obj = _info(root, manifest, "obj_feat_dir", "train", entry["image_id"])
    boxes = _info(root, manifest, "ocr_feat_dir", "train", entry["image_id"])["ocr_boxes"]
    d = directions[entry["question"]]
    assert synthetic.position_answer(d, boxes, obj["image_width"], obj["image_height"],
                                     0.2) >= 0
    checked += 1
  assert checked == 32
  with pytest.raises(ValueError, match="position_margin"):
    synthetic.SyntheticSpec(position_margin=1.5)
