"""Readers of the upstream data files, and the tiny upstream-layout data directory.

`write_data_dir` (also used by `test_samples.py` and `test_pipeline.py`) writes a small
TextVQA-layout directory by hand: 4 train, 2 val and 2 test questions over 4 images with
real 2048-d features, a WordPiece vocabulary with the BERT special tokens at their real
ids, an answer vocabulary and object class names.
"""

from __future__ import annotations

import os
import pathlib
import string
import sys
import unicodedata

import numpy as np
import pytest

from lfpr_jax.data import readers

FEAT_DIM = 2048
OBJECT_CLASSES = ("man", "tree", "building", "window", "car", "sign", "bottle",
                  "person", "red car", "shirt", "sky", "wall")
ANSWER_WORDS = ("<pad>", "<s>", "</s>", "<unk>", "yes", "no", "coca", "cola", "stop",
                "red", "sign", "2019", "store", "the")
WORDS = ("the what is name of this store brand coca cola stop sign year shown on bottle "
         "yes no red car person man tree building window background shirt sky wall "
         "written here number how many which color a an in at to and for with "
         "street open sale price big small left right top bottom text say says "
         "does do are there it its by from").split()
LONG_QUESTION = ("what is the name of the brand that is written on the red bottle on the "
                 "left of the big window in this street")


def bert_vocab_lines() -> list[str]:
  """A small WordPiece vocabulary with `[PAD]`=0, `[UNK]`=100, ..., `[MASK]`=103."""
  lines = ["[PAD]"] + [f"[unused{i}]" for i in range(99)]
  lines += ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
  pieces = list(string.punctuation) + list(string.digits) + list(string.ascii_lowercase)
  pieces += ["##" + c for c in string.digits + string.ascii_lowercase]
  pieces += list(WORDS) + ["##s", "##ing", "##ed", "##er", "##a", "coc", "##ola", "'"]
  seen = set()
  for piece in pieces:
    if piece not in seen:
      seen.add(piece)
      lines.append(piece)
  return lines


def _save_info(path: pathlib.Path, info: dict) -> None:
  np.save(path, np.array(info, dtype=object), allow_pickle=True)


def write_image(root: pathlib.Path, obj_dir: str, ocr_dir: str, name: str, *,
                n_obj: int, ocr_tokens: list[str], width: int, height: int, seed: int,
                object_tokens: bool = False) -> None:
  """Writes the object and OCR feature files (+ `_info.npy`) of one image."""
  rng = np.random.default_rng(seed)
  obj = root / obj_dir
  ocr = root / ocr_dir
  obj.mkdir(parents=True, exist_ok=True)
  ocr.mkdir(parents=True, exist_ok=True)
  np.save(obj / name, rng.random((n_obj, FEAT_DIM), dtype=np.float32))
  x1 = rng.integers(0, width // 2, n_obj)
  y1 = rng.integers(0, height // 2, n_obj)
  boxes = np.stack([x1, y1, x1 + rng.integers(1, width // 2, n_obj),
                    y1 + rng.integers(1, height // 2, n_obj)], 1).astype(np.float32)
  classes = rng.integers(0, len(OBJECT_CLASSES) + 1, n_obj)
  info = dict(bbox=boxes, num_boxes=n_obj, image_width=width, image_height=height,
              conf=np.ones(n_obj, np.float32))
  if object_tokens:
    info["object_tokens"] = [OBJECT_CLASSES[k % len(OBJECT_CLASSES)] for k in classes]
  else:
    info["objects"] = classes
  _save_info(obj / (name[:-4] + "_info.npy"), info)
  n_ocr = len(ocr_tokens)
  np.save(ocr / name, rng.random((n_ocr, FEAT_DIM), dtype=np.float32))
  ox = rng.uniform(0, width / 2, n_ocr)
  oy = rng.uniform(0, height / 2, n_ocr)
  ocr_boxes = np.stack([ox, oy, ox + 20, oy + 10], 1).astype(np.float32) \
      if n_ocr else np.zeros((0,), np.float32)
  _save_info(ocr / (name[:-4] + "_info.npy"),
             dict(ocr_tokens=list(ocr_tokens), ocr_boxes=ocr_boxes,
                  ocr_conf=np.ones(n_ocr, np.float32), image_width=width,
                  image_height=height))


def write_imdb(path: pathlib.Path, entries: list[dict]) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  meta = {"version": 1, "dataset_type": path.stem, "has_answer": True}
  np.save(path, np.array([meta] + entries, dtype=object), allow_pickle=True)


def write_data_dir(root: pathlib.Path) -> pathlib.Path:
  """The tiny TextVQA-layout data directory described in the module docstring."""
  root = pathlib.Path(root)
  tr_obj, tr_ocr = "feat_resx/train", "ocr_feat_resx/textvqa_conf/train_images"
  te_obj, te_ocr = "feat_resx/test", "ocr_feat_resx/textvqa_conf/test_images"
  write_image(root, tr_obj, tr_ocr, "img0.npy", n_obj=5, width=640, height=480, seed=0,
              ocr_tokens=["Coca", "Cola's", "2019", "STOP?", "red,"])
  write_image(root, tr_obj, tr_ocr, "7.npy", n_obj=3, width=800, height=600, seed=1,
              ocr_tokens=[])
  write_image(root, tr_obj, tr_ocr, "img2.npy", n_obj=120, width=1024, height=768,
              seed=2, ocr_tokens=[f"word{i}" for i in range(110)])
  write_image(root, te_obj, te_ocr, "img3.npy", n_obj=2, width=300, height=200, seed=3,
              ocr_tokens=["Sale", "open"], object_tokens=True)
  ten = lambda *a: [a[i % len(a)] for i in range(10)]  # noqa: E731
  train = [
      dict(question="What is the brand name?", question_id=10, image_id="img0",
           image_width=640, image_height=480, feature_path="img0.npy",
           answers=["coca"] * 6 + ["Coca Cola"] * 2 + ["stop", "2019"]),
      dict(question_str="Is this a store?", question_id=11, image_id=7,
           image_width=800, image_height=600, valid_answers=["yes"] * 10 + ["<copy>"],
           all_answers=["no"] * 10),
      dict(question=LONG_QUESTION, question_id=12, image_id="img2", image_width=1024,
           image_height=768, feature_path="img2.npy",
           answers=ten("word3", "word3 word105", "nothing here")),
      dict(question="what year is shown?", question_id=13, image_id="img0",
           image_width=640, image_height=480, feature_path="img0.npy",
           answers=ten("2019")),
  ]
  val = [
      dict(question="what does the sign say?", question_id=20, image_id="img0",
           image_width=640, image_height=480, feature_path="img0.npy",
           answers=ten("stop", "stop", "red")),
      dict(question="how many cars?", question_id=21, image_id=7, image_width=800,
           image_height=600, answers=ten("no")),
  ]
  test = [
      dict(question="what is written here?", question_id=30, image_id="img3",
           image_width=300, image_height=200, feature_path="img3.npy"),
      dict(question="is it open?", question_id=31, image_id="img3", image_width=300,
           image_height=200, feature_path="img3.npy"),
  ]
  write_imdb(root / "imdb/m4c_textvqa/imdb_train_ocr_en.npy", train)
  write_imdb(root / "imdb/m4c_textvqa/imdb_val_ocr_en.npy", val)
  write_imdb(root / "imdb/m4c_textvqa/imdb_test_ocr_en.npy", test)
  vocab = root / "m4c_vocabs/textvqa/fixed_answer_vocab_textvqa_5k.txt"
  vocab.parent.mkdir(parents=True)
  vocab.write_text("\n".join(ANSWER_WORDS) + "\n")
  objects = root / "1600-400-20/objects_vocab.txt"
  objects.parent.mkdir(parents=True)
  objects.write_text("\n".join(OBJECT_CLASSES) + "\n")
  bert = root / "bert-base-uncased/vocab.txt"
  bert.parent.mkdir(parents=True)
  bert.write_text("\n".join(bert_vocab_lines()) + "\n")
  return root


def layout_of(root: pathlib.Path, **overrides) -> readers.DataLayout:
  """The TextVQA layout of `write_data_dir`, with the FastText stand-in."""
  return readers.DataLayout.for_dataset("textvqa", root,
                                        **{"fasttext_model": None, **overrides})


@pytest.fixture
def data_dir(tmp_path) -> pathlib.Path:
  return write_data_dir(tmp_path / "data")


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
  _save_info(d / "a_info.npy", dict(objects=[1, 2, 3]))
  with pytest.raises(ValueError, match="'bbox'"):
    readers.read_object_features(d / "a.npy", names)
  _save_info(d / "a_info.npy", dict(bbox=np.zeros((3, 4))))
  with pytest.raises(ValueError, match="'objects'"):
    readers.read_object_features(d / "a.npy", names)
  _save_info(d / "a_info.npy", dict(bbox=np.zeros((3, 4)), objects=[1, 2, 99]))
  with pytest.raises(ValueError, match="outside"):
    readers.read_object_features(d / "a.npy", names)
  _save_info(d / "a_info.npy", dict(bbox=np.zeros((2, 4)), objects=[1, 2]))
  with pytest.raises(ValueError) as e:
    readers.read_object_features(d / "a.npy", names)
  assert "a.npy" in str(e.value) and "(3, 8)" in str(e.value) \
      and "(2, 4)" in str(e.value)
  _save_info(d / "a_info.npy", dict(ocr_boxes=np.zeros((3, 4))))
  with pytest.raises(ValueError, match="'ocr_tokens'"):
    readers.read_ocr_features(d / "a.npy")
  _save_info(d / "a_info.npy", dict(ocr_boxes=np.zeros((4, 4)), ocr_tokens=list("abcd")))
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
