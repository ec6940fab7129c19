"""A small mock of the TAP data release (TextVQA and ST-VQA in one root), written here.

Unlike the synthetic benchmark (`lfpr_jax.data.synthetic`), this reproduces the release
files as upstream has them, quirks included:

* one release root holding both datasets (docs/TAP.md §1.2 paths):
  `imdb/m4c_textvqa/imdb_{train,val}_ocr_en.npy`, `feat_resx/train/<image>.npy`,
  `ocr_feat_resx/textvqa_conf/train_images/<image>.npy`;
  `original_dl/ST-VQA/m4c_stvqa/imdb_sub{train,val}.npy`,
  `feat_resx/stvqa/train/<source>/<image>.npy`, `ocr_feat_resx/stvqa_conf/<source>/...`
  with the ST-VQA source sub-folders (`coco-text/`, `imdb/`, `sandwich/`, ...) inside
  `feature_path`; `m4c_vocabs/{textvqa,stvqa}/`, `1600-400-20/objects_vocab.txt`;
* `_info.npy` files pickled by Python 2 (`write_py2_npy`): protocol 2, keys and ASCII
  values as Python 2 `str` (pickle BINSTRING opcodes, which Python 3 reads through
  `encoding='latin1'`), non-ASCII OCR tokens as Python 2 `unicode`, and numpy arrays
  reconstructed through `numpy.core.multiarray._reconstruct` with raw `str` data;
* images with 0 and with 120 (> 100) OCR tokens, CJK and accented OCR tokens, ST-VQA
  answers tiled to 10.

The BERT vocabulary (not in the release) is written too unless asked not to; the fastText
model is not (tests use `fasttext_model=None` or write a header-only file).
"""

from __future__ import annotations

import io
import pathlib
import pickle
import string
import struct
from typing import Any, Sequence

import numpy as np

FEAT_DIM = 8  # tiny region features (the release has 2048)
OBJECT_CLASSES = ("sign", "car", "tree", "bottle", "building", "person")
ANSWER_WORDS = ("<pad>", "<s>", "</s>", "<unk>", "stop", "yes", "no", "coca", "cola",
                "red", "café", "北京", "2019")
WORDS = ("what is the name of this sign say does brand written on car year shown how "
         "many stop yes no red coca cola cafe building tree bottle person here which "
         "street").split()
CJK = ("北", "京")
TEXTVQA_IMDB = "imdb/m4c_textvqa/imdb_{split}_ocr_en.npy"
STVQA_IMDB = "original_dl/ST-VQA/m4c_stvqa/imdb_sub{split}.npy"


# ----------------------------------------------------------------------------------
# Python 2 pickles
# ----------------------------------------------------------------------------------
class Py2Str(bytes):
  """Marks a Python 2 `str` (a byte string) for `write_py2_npy`."""


class _Py2Pickler(pickle._Pickler):  # the pure-Python pickler lets us emit opcodes
  """Pickles as Python 2.7 + numpy 1.x did with protocol 2."""

  dispatch = dict(pickle._Pickler.dispatch)

  def save_py2_str(self, obj: bytes) -> None:
    # Python 2 `str` -> SHORT_BINSTRING / BINSTRING (Python 3 has no such type).
    n = len(obj)
    if n < 256:
      self.write(pickle.SHORT_BINSTRING + bytes([n]) + bytes(obj))
    else:
      self.write(pickle.BINSTRING + struct.pack("<i", n) + bytes(obj))
    self.memoize(obj)

  dispatch[bytes] = save_py2_str
  dispatch[Py2Str] = save_py2_str

  def save_global(self, obj: Any, name: str | None = None) -> None:
    if obj is np._core.multiarray._reconstruct:  # numpy 1.x module path
      self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
      self.memoize(obj)
      return
    super().save_global(obj, name)


def _py2(value: Any) -> Any:
  """Python 3 values as a Python 2 writer held them: ASCII str -> str (bytes),
  non-ASCII str -> unicode (str), recursively through dicts and lists."""
  if isinstance(value, str):
    return Py2Str(value.encode("ascii")) if value.isascii() else value
  if isinstance(value, dict):
    return {_py2(k): _py2(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return type(value)(_py2(v) for v in value)
  return value


def write_py2_npy(path: pathlib.Path, info: dict) -> None:
  """`np.save(path, info)` as Python 2 did it (npy 1.0 header + protocol-2 pickle)."""
  array = np.empty((), dtype=object)
  array[()] = _py2(info)
  buffer = io.BytesIO()
  np.lib.format.write_array_header_1_0(
      buffer, {"descr": "|O", "fortran_order": False, "shape": ()})
  _Py2Pickler(buffer, protocol=2).dump(array)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(buffer.getvalue())


# ----------------------------------------------------------------------------------
# The release
# ----------------------------------------------------------------------------------
def bert_vocab_lines() -> list[str]:
  """A small WordPiece vocabulary with `[PAD]`=0, `[UNK]`=100, ..., `[MASK]`=103."""
  lines = ["[PAD]"] + [f"[unused{i}]" for i in range(99)]
  lines += ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
  pieces = list(string.punctuation) + list(string.digits) + list(string.ascii_lowercase)
  pieces += ["##" + c for c in string.digits + string.ascii_lowercase]
  pieces += list(CJK) + list(WORDS)
  return lines + list(dict.fromkeys(pieces))


def ocr_box(i: int) -> list[float]:
  """The pixel box of OCR token i (x1, y1, x2, y2)."""
  return [10. * i, 5. * i + 1, 10. * i + 8, 5. * i + 9]


def write_image(root: pathlib.Path, obj_dir: str, ocr_dir: str, feature_path: str, *,
                n_obj: int, ocr_tokens: Sequence[str], width: int, height: int,
                seed: int, feat_dim: int = FEAT_DIM) -> None:
  """Writes one image's object and OCR features with Python-2 `_info.npy` files.

  Object feature rows are `seed + row / 1000` (row r, every column); OCR rows are
  `-(seed + row / 1000)`. Object boxes are `[r, 2r, r + 4, 2r + 4]`, OCR boxes `ocr_box`.
  """
  stem = feature_path[:-len(".npy")]
  rows = np.arange(n_obj, dtype=np.float32)[:, None] / 1000
  obj = np.broadcast_to(seed + rows, (n_obj, feat_dim)).astype(np.float32)
  (root / obj_dir / feature_path).parent.mkdir(parents=True, exist_ok=True)
  np.save(root / obj_dir / feature_path, obj)
  write_py2_npy(root / obj_dir / f"{stem}_info.npy", dict(
      image_id=stem.split("/")[-1], image_h=height, image_w=width, num_boxes=n_obj,
      objects=np.arange(n_obj, dtype=np.int64) % len(OBJECT_CLASSES) + 1,
      bbox=np.array([[r, 2 * r, r + 4, 2 * r + 4] for r in range(n_obj)], np.float32
                    ).reshape(n_obj, 4),
      cls_prob=np.full((n_obj,), 0.5, np.float32)))
  n_ocr = len(ocr_tokens)
  rows = np.arange(n_ocr, dtype=np.float32)[:, None] / 1000
  ocr = -np.broadcast_to(seed + rows, (n_ocr, feat_dim)).astype(np.float32)
  (root / ocr_dir / feature_path).parent.mkdir(parents=True, exist_ok=True)
  np.save(root / ocr_dir / feature_path, ocr)
  write_py2_npy(root / ocr_dir / f"{stem}_info.npy", dict(
      ocr_tokens=list(ocr_tokens),
      ocr_boxes=np.array([ocr_box(i) for i in range(n_ocr)], np.float32
                         ).reshape(n_ocr, 4),
      ocr_conf=[0.9] * n_ocr))


def write_imdb(path: pathlib.Path, entries: Sequence[dict], dataset: str) -> None:
  """An M4C imdb: element 0 is metadata, then one dict per question (Python 3 pickle)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  array = np.empty(len(entries) + 1, dtype=object)
  array[0] = dict(version=1, dataset_type="train", create_time="2020",
                  has_answer=True, dataset=dataset)
  for i, entry in enumerate(entries):
    array[i + 1] = dict(entry, question_tokens=entry["question"].split(),
                        ocr_tokens=[], set_name="train")
  np.save(path, array, allow_pickle=True)


def tile(*answers: str) -> list[str]:
  """Answers tiled to exactly 10, as the ST-VQA imdbs hold them."""
  return [answers[i % len(answers)] for i in range(10)]


MANY_OCR = tuple(f"w{i}" for i in range(120))
UNICODE_OCR = ("北京", "Café", "ÑANDÚ", "stop", "2019")


def _textvqa(root: pathlib.Path) -> None:
  obj, ocr = "feat_resx/train", "ocr_feat_resx/textvqa_conf/train_images"
  write_image(root, obj, ocr, "0054c91397f2fe05.npy", n_obj=3, ocr_tokens=(),
              width=1024, height=768, seed=1)
  write_image(root, obj, ocr, "00685bc495504d61.npy", n_obj=130, ocr_tokens=MANY_OCR,
              width=800, height=600, seed=2)
  write_image(root, obj, ocr, "0a1b2c3d4e5f6789.npy", n_obj=5, ocr_tokens=UNICODE_OCR,
              width=200, height=100, seed=3)
  q = lambda qid, question, image, w, h, answers: dict(  # noqa: E731
      question=question, question_id=qid, image_id=image, image_width=w,
      image_height=h, feature_path=f"{image}.npy", answers=answers)
  train = [
      q(34602, "what does the sign say?", "0054c91397f2fe05", 1024, 768,
        ["stop"] * 7 + ["yes"] * 3),
      q(34603, "what is the 100th word?", "00685bc495504d61", 800, 600,
        tile("w99", "w3")),
      q(34604, "which city is this?", "0a1b2c3d4e5f6789", 200, 100,
        ["北京"] * 6 + ["beijing"] * 4),
  ]
  val = [
      q(1, "what is written on the building?", "0a1b2c3d4e5f6789", 200, 100,
        tile("café", "cafe")),
      q(2, "how many words?", "00685bc495504d61", 800, 600, tile("no")),
  ]
  write_imdb(root / TEXTVQA_IMDB.format(split="train"), train, "textvqa")
  write_imdb(root / TEXTVQA_IMDB.format(split="val"), val, "textvqa")
  vocab = root / "m4c_vocabs/textvqa/fixed_answer_vocab_textvqa_5k.txt"
  vocab.parent.mkdir(parents=True, exist_ok=True)
  vocab.write_text("\n".join(ANSWER_WORDS) + "\n", encoding="utf-8")


STVQA_IMAGES = ("coco-text/COCO_train2014_000000000036.npy",
                "imdb/nm0000204_rm2837161216_1957-3-18_2006.npy",
                "sandwich/sun_aaakhpqyxlkfcxbt.npy")


def _stvqa(root: pathlib.Path) -> None:
  obj, ocr = "feat_resx/stvqa/train", "ocr_feat_resx/stvqa_conf"
  write_image(root, obj, ocr, STVQA_IMAGES[0], n_obj=4, ocr_tokens=("STOP", "Coca"),
              width=640, height=480, seed=4)
  write_image(root, obj, ocr, STVQA_IMAGES[1], n_obj=2, ocr_tokens=(), width=300,
              height=450, seed=5)
  write_image(root, obj, ocr, STVQA_IMAGES[2], n_obj=6, ocr_tokens=MANY_OCR[:105],
              width=500, height=375, seed=6)
  q = lambda qid, question, path, w, h, answers: dict(  # noqa: E731
      question=question, question_id=qid,
      image_id=path.split("/")[-1][:-len(".npy")], image_width=w, image_height=h,
      feature_path=path, image_path=path.replace(".npy", ".jpg"), answers=answers)
  train = [
      q(7, "what does the sign say?", STVQA_IMAGES[0], 640, 480, tile("stop")),
      q(8, "what brand?", STVQA_IMAGES[0], 640, 480, tile("coca", "coca cola")),
      q(9, "what year?", STVQA_IMAGES[1], 300, 450, tile("2019")),
  ]
  val = [q(10, "what is the last word?", STVQA_IMAGES[2], 500, 375, tile("w104"))]
  write_imdb(root / STVQA_IMDB.format(split="train"), train, "stvqa")
  write_imdb(root / STVQA_IMDB.format(split="val"), val, "stvqa")
  vocab = root / "m4c_vocabs/stvqa/fixed_answer_vocab_stvqa_5k.txt"
  vocab.parent.mkdir(parents=True, exist_ok=True)
  vocab.write_text("\n".join(ANSWER_WORDS) + "\n", encoding="utf-8")


def write_release(root: pathlib.Path, *, bert_vocab: bool = True) -> pathlib.Path:
  """Writes the mock release (both datasets) under `root`; returns `root`.

  Args:
    root: the release root to create.
    bert_vocab: also write `bert-base-uncased/vocab.txt` (not part of the release).
  """
  root = pathlib.Path(root)
  _textvqa(root)
  _stvqa(root)
  objects = root / "1600-400-20/objects_vocab.txt"
  objects.parent.mkdir(parents=True, exist_ok=True)
  objects.write_text("\n".join(OBJECT_CLASSES) + "\n")
  if bert_vocab:
    vocab = root / "bert-base-uncased/vocab.txt"
    vocab.parent.mkdir(parents=True, exist_ok=True)
    vocab.write_text("\n".join(bert_vocab_lines()) + "\n", encoding="utf-8")
  return root


def write_fasttext_header(path: pathlib.Path) -> None:
  """A file with the fastText binary header only (passes the cheap setup check)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(struct.pack("<ii", 793712314, 12) + b"\0" * 64)
