"""A tiny data directory in the upstream TextVQA file layout, written by hand.

`write_data_dir(root)` writes 4 train, 2 val and 2 test questions over 4 images with real
2048-d features, a WordPiece vocabulary with the BERT special tokens at their real ids, an
answer vocabulary and object class names (the layout of docs/TAP.md, the data files).
Used by the reader, sample and pipeline tests (`data_dir` fixture in conftest.py).
"""

from __future__ import annotations

import pathlib
import string

import numpy as np

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


def save_info(path: pathlib.Path, info: dict) -> None:
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
  save_info(obj / (name[:-4] + "_info.npy"), info)
  n_ocr = len(ocr_tokens)
  np.save(ocr / name, rng.random((n_ocr, FEAT_DIM), dtype=np.float32))
  ox = rng.uniform(0, width / 2, n_ocr)
  oy = rng.uniform(0, height / 2, n_ocr)
  ocr_boxes = np.stack([ox, oy, ox + 20, oy + 10], 1).astype(np.float32) \
      if n_ocr else np.zeros((0,), np.float32)
  save_info(ocr / (name[:-4] + "_info.npy"),
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
