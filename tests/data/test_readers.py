"""Readers of the upstream data files, on the tiny upstream-layout data directory
(`tests/data/upstream_layout.py`)."""

from __future__ import annotations

import os
import sys
import unicodedata

import numpy as np
import pytest

from lfpr_jax.data import readers
from tests.data.upstream_layout import (FEAT_DIM, LONG_QUESTION, OBJECT_CLASSES, WORDS,
                                        bert_vocab_lines, layout_of, save_info, write_imdb)


# -------------------------------------------------------------------------------
# imdb
# -------------------------------------------------------------------------------
def test_read_imdb_fields_and_upstream_hacks(data_dir):
  entries = readers.read_imdb(data_dir / "imdb/m4c_textvqa/imdb_train_ocr_en.npy")
  assert [e.question_id for e in entries] == [10, 11, 12, 13]
  assert [e.index for e in entries] == [0, 1, 2, 3]
  first, second = entries[0], entries[1]
  assert first.question == "What is the brand name?"
  assert first.feature_path == "img0.npy" and first.image_id == "img0"
  assert (first.image_width, first.image_height) == (640.0, 480.0)
  assert len(first.answers) == 10
  # question_str fallback, int image id -> str, default feature path,
  # valid_answers preferred over all_answers, trailing <copy> dropped.
  assert second.question == "Is this a store?"
  assert second.image_id == "7" and second.feature_path == "7.npy"
  assert second.answers == ("yes",) * 10
  test = readers.read_imdb(data_dir / "imdb/m4c_textvqa/imdb_test_ocr_en.npy")
  assert all(e.answers is None for e in test)


@pytest.mark.parametrize("drop", ["question", "question_id", "image_id", "image_width",
                                  "image_height"])
def test_read_imdb_entry_without_field(tmp_path, drop):
  good = dict(question="q?", question_id=1, image_id="a", image_width=10,
              image_height=10)
  bad = dict(good, question_id=2)
  del bad[drop]
  path = tmp_path / "imdb.npy"
  write_imdb(path, [good, good, bad])
  with pytest.raises(ValueError) as e:
    readers.read_imdb(path)
  message = str(e.value)
  assert str(path) in message and "entry 2" in message and repr(drop) in message


def test_read_imdb_bad_values(tmp_path):
  path = tmp_path / "imdb.npy"
  base = dict(question="q?", question_id=1, image_id="a", image_width=10,
              image_height=10)
  for bad, needle in ((dict(base, image_width=0), "image_width"),
                      (dict(base, answers=["a"] * 3), "3 answers"),
                      (dict(base, feature_path="a.jpg"), "feature_path"),
                      (dict(base, question=5), "question"),
                      ("not a dict", "expected a dict")):
    write_imdb(path, [base, bad])
    with pytest.raises(ValueError, match="entry 1") as e:
      readers.read_imdb(path)
    assert needle in str(e.value) and str(path) in str(e.value)


def test_read_imdb_missing_and_not_an_imdb(tmp_path):
  with pytest.raises(FileNotFoundError, match="imdb"):
    readers.read_imdb(tmp_path / "nope.npy")
  np.save(tmp_path / "x.npy", np.zeros((3, 3)))
  with pytest.raises(ValueError, match="1-D object array"):
    readers.read_imdb(tmp_path / "x.npy")


# -------------------------------------------------------------------------------
# features
# -------------------------------------------------------------------------------
def test_read_object_and_ocr_features(data_dir):
  names = readers.read_object_class_names(data_dir / "1600-400-20/objects_vocab.txt")
  assert names[0] == "background" and names[1:] == OBJECT_CLASSES
  obj = readers.read_object_features(data_dir / "feat_resx/train/img0.npy", names)
  info = np.load(data_dir / "feat_resx/train/img0_info.npy", allow_pickle=True).item()
  assert obj.features.shape == (5, FEAT_DIM) and obj.num_rows == 5
  assert obj.tokens == tuple(names[k] for k in info["objects"])
  np.testing.assert_array_equal(obj.boxes, info["bbox"])
  tokens = readers.read_object_features(data_dir / "feat_resx/test/img3.npy", names)
  info3 = np.load(data_dir / "feat_resx/test/img3_info.npy", allow_pickle=True).item()
  assert tokens.tokens == tuple(info3["object_tokens"])
  ocr = readers.read_ocr_features(
      data_dir / "ocr_feat_resx/textvqa_conf/train_images/img0.npy")
  assert ocr.tokens == ("Coca", "Cola's", "2019", "STOP?", "red,")
  assert ocr.boxes.shape == (5, 4) and ocr.features.shape == (5, FEAT_DIM)
  empty = readers.read_ocr_features(
      data_dir / "ocr_feat_resx/textvqa_conf/train_images/7.npy")
  assert empty.num_rows == 0 and empty.boxes.shape == (0, 4) and empty.tokens == ()


def test_feature_errors(tmp_path):
  names = ("background",) + OBJECT_CLASSES
  d = tmp_path / "f"
  d.mkdir()
  with pytest.raises(FileNotFoundError, match="a.npy"):
    readers.read_object_features(d / "a.npy", names)
  np.save(d / "a.npy", np.zeros((3, 8), np.float32))
  with pytest.raises(FileNotFoundError, match="a_info.npy"):
    readers.read_object_features(d / "a.npy", names)
  save_info(d / "a_info.npy", dict(objects=[1, 2, 3]))
  with pytest.raises(ValueError, match="'bbox'"):
    readers.read_object_features(d / "a.npy", names)
  save_info(d / "a_info.npy", dict(bbox=np.zeros((3, 4))))
  with pytest.raises(ValueError, match="'objects'"):
    readers.read_object_features(d / "a.npy", names)
  save_info(d / "a_info.npy", dict(bbox=np.zeros((3, 4)), objects=[1, 2, 99]))
  with pytest.raises(ValueError, match="outside"):
    readers.read_object_features(d / "a.npy", names)
  save_info(d / "a_info.npy", dict(bbox=np.zeros((2, 4)), objects=[1, 2]))
  with pytest.raises(ValueError) as e:
    readers.read_object_features(d / "a.npy", names)
  assert "a.npy" in str(e.value) and "(3, 8)" in str(e.value) \
      and "(2, 4)" in str(e.value)
  save_info(d / "a_info.npy", dict(ocr_boxes=np.zeros((3, 4))))
  with pytest.raises(ValueError, match="'ocr_tokens'"):
    readers.read_ocr_features(d / "a.npy")
  save_info(d / "a_info.npy", dict(ocr_boxes=np.zeros((4, 4)), ocr_tokens=list("abcd")))
  with pytest.raises(ValueError) as e:
    readers.read_ocr_features(d / "a.npy")
  assert "a_info.npy" in str(e.value) and "(3, 8)" in str(e.value) \
      and "(4, 4)" in str(e.value)


def test_object_class_names_missing(tmp_path):
  with pytest.raises(FileNotFoundError, match="objects_vocab"):
    readers.read_object_class_names(tmp_path / "objects_vocab.txt")


# -------------------------------------------------------------------------------
# BERT WordPiece vs a pure-Python port of pytorch-transformers 1.2
# -------------------------------------------------------------------------------
def _ref_is_punctuation(ch: str) -> bool:
  cp = ord(ch)
  if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
    return True
  return unicodedata.category(ch).startswith("P")


def _ref_is_chinese(cp: int) -> bool:
  return any(lo <= cp <= hi for lo, hi in (
      (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
      (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F)))


def _ref_tokenize(text: str, vocab: dict[str, int]) -> list[int]:
  """`BertTokenizer(do_lower_case=True).encode(text, add_special_tokens=True)` (1.2)."""
  cleaned = []
  for ch in text:
    cp = ord(ch)
    is_control = ch not in "\t\n\r" and unicodedata.category(ch).startswith("C")
    if cp == 0 or cp == 0xFFFD or is_control:
      continue
    is_space = ch in " \t\n\r" or unicodedata.category(ch) == "Zs"
    cleaned.append(" " if is_space else (f" {ch} " if _ref_is_chinese(cp) else ch))
  pieces = []
  for token in "".join(cleaned).strip().split():
    token = unicodedata.normalize("NFD", token.lower())
    token = "".join(c for c in token if unicodedata.category(c) != "Mn")
    words, current = [], ""
    for ch in token:
      if _ref_is_punctuation(ch):
        if current:
          words.append(current)
        words.append(ch)
        current = ""
      else:
        current += ch
    if current:
      words.append(current)
    for word in words:
      if len(word) > 100:
        pieces.append("[UNK]")
        continue
      start, sub = 0, []
      while start < len(word):
        end = len(word)
        found = None
        while start < end:
          cand = word[start:end] if start == 0 else "##" + word[start:end]
          if cand in vocab:
            found = cand
            break
          end -= 1
        if found is None:
          sub = ["[UNK]"]
          break
        sub.append(found)
        start = end
      pieces.extend(sub)
  return [vocab["[CLS]"]] + [vocab[p] for p in pieces] + [vocab["[SEP]"]]


TRICKY_TEXTS = [
    "What is the brand name?", "", "   ", "Héllo, WORLD!", "naïve café résumé",
    "COCA-COLA 2019 $5.99", "e-mail@x.com (open)", "tab\tand\nnewline\r",
    "ctrl\x00a\x07b", "日本 text", "“quoted” — dash…", "what's this store's name",
    "a" * 150, "zzzzqqqx", "Ünïcödé ßtrasse", "mcdonald 's", "word3 word105",
]


def test_bert_tokenizer_matches_pytorch_transformers_rules(data_dir):
  path = data_dir / "bert-base-uncased/vocab.txt"
  tok = readers.BertTokenizer(path)
  vocab = {line: i for i, line in enumerate(bert_vocab_lines())}
  for text in TRICKY_TEXTS:
    assert tok.encode(text) == _ref_tokenize(text, vocab), text
  assert tok.encode("") == [101, 102]
  # pytorch-transformers 1.2 splits on special tokens in the raw text first.
  assert tok.encode("stop [SEP] sign") == [101, vocab["stop"], 102, vocab["sign"], 102]


def test_encode_segment(data_dir):
  tok = readers.BertTokenizer(data_dir / "bert-base-uncased/vocab.txt")
  ids, n = tok.encode_segment("stop sign", 6)
  assert ids.dtype == np.int32 and n == 4
  assert ids.tolist() == tok.encode("stop sign") + [0, 0]
  ids, n = tok.encode_segment(LONG_QUESTION, 20)
  assert n == 20 and ids.tolist() == tok.encode(LONG_QUESTION)[:20]
  assert ids[-1] != 102 and ids[0] == 101  # the long question loses its [SEP]


def test_bert_vocab_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="vocab.txt"):
    readers.BertTokenizer(tmp_path / "vocab.txt")
  lines = bert_vocab_lines()
  lines[101], lines[104] = lines[104], lines[101]  # [CLS] at the wrong id
  (tmp_path / "vocab.txt").write_text("\n".join(lines) + "\n")
  with pytest.raises(ValueError, match=r"\[CLS\]"):
    readers.BertTokenizer(tmp_path / "vocab.txt")


# -------------------------------------------------------------------------------
# FastText
# -------------------------------------------------------------------------------
def test_fasttext_stand_in():
  ft = readers.FastTextVectors(None)
  again = readers.FastTextVectors(None)
  assert ft.is_stand_in and ft.dim == 300
  v = ft.word_vector("coca")
  assert v.dtype == np.float32 and v.shape == (300,)
  np.testing.assert_array_equal(v, again.word_vector("coca"))
  np.testing.assert_array_equal(ft.word_vector(""), np.zeros(300, np.float32))
  cos = lambda a, b: float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))  # noqa: E731
  assert cos(ft.word_vector("restaurant"), ft.word_vector("restaurants")) > \
      cos(ft.word_vector("restaurant"), ft.word_vector("zebra")) + 0.3
  np.testing.assert_allclose(
      ft.token_vector("joe 's"), (ft.word_vector("joe") + ft.word_vector("'s")) / 2,
      rtol=1e-6)
  m = ft.matrix(["a", "b c"], 4)
  assert m.shape == (4, 300) and not m[2:].any()
  assert not np.array_equal(readers.FastTextVectors(None, seed=1).word_vector("coca"), v)


def test_fasttext_model_file(tmp_path, monkeypatch):
  with pytest.raises(FileNotFoundError, match="wiki.en.bin"):
    readers.FastTextVectors(tmp_path / "wiki.en.bin")
  model = tmp_path / "model.bin"
  model.write_bytes(b"not a model")
  monkeypatch.setitem(sys.modules, "fasttext", None)
  with pytest.raises(ImportError, match="pip install fasttext-wheel"):
    readers.FastTextVectors(model)


def test_fasttext_real_model(tmp_path):
  fasttext = pytest.importorskip("fasttext")
  corpus = tmp_path / "corpus.txt"
  corpus.write_text(" ".join(WORDS * 20) + "\n")
  path = tmp_path / "tiny.bin"
  fasttext.train_unsupervised(str(corpus), dim=8, minCount=1, epoch=1, thread=1,
                              verbose=0).save_model(str(path))
  ft = readers.FastTextVectors(path)
  model = fasttext.load_model(str(path))
  assert ft.dim == 8 and not ft.is_stand_in
  np.testing.assert_array_equal(ft.word_vector("store"), model.get_word_vector("store"))
  np.testing.assert_allclose(
      ft.token_vector("joe 's"),
      np.mean([model.get_word_vector("joe"), model.get_word_vector("'s")], axis=0),
      rtol=1e-6)


# -------------------------------------------------------------------------------
# layouts
# -------------------------------------------------------------------------------
def test_layout(tmp_path, data_dir):
  layout = readers.DataLayout.for_dataset("stvqa", "/data")
  assert layout.split("test").imdb == "/data/original_dl/ST-VQA/m4c_stvqa/" \
      "imdb_test_task3.npy"
  synthetic = readers.DataLayout.for_dataset("synthetic", "/s")
  assert synthetic.split("val") == readers.SplitFiles(
      "/s/imdb/imdb_val.npy", "/s/feat_resx/val", "/s/ocr_feat_resx/val")
  assert synthetic.fasttext_path() is None
  assert layout.fasttext_path() == "/data/.vector_cache/wiki.en.bin"
  text = layout_of(data_dir).to_json()
  (data_dir / "layout.json").write_text(text.replace(str(data_dir), "."))
  again = readers.DataLayout.from_json(data_dir / "layout.json")
  assert os.path.samefile(again.root, data_dir)
  assert again.splits == layout_of(data_dir).splits and again.fasttext_model is None
  with pytest.raises(ValueError, match="no split 'dev'"):
    layout.split("dev")
  with pytest.raises(ValueError, match="unknown dataset"):
    readers.DataLayout.for_dataset("vqa2", "/data")
  with pytest.raises(FileNotFoundError, match="directory .*nope"):
    readers.require_dir(tmp_path / "nope", "things")
