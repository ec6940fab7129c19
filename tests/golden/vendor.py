"""Rebuilds this folder from the project's full golden fixture set (maintainers only).

    python -m tests.golden.vendor SOURCE_GOLDEN_DIR SOURCE_MANIFESTS_DIR

Copies the small files as they are and rewrites the large npz files with only the keys
the tests read, compressed, every kept array unchanged (values, dtype, shape). Keys that
are bit-identical to another stored array (or to a slice of one) are stored once and
listed in `<arch>/aliases.json`; `tests.golden.outputs` rebuilds them. Each alias is
checked bit for bit here before it is written. Finally the numpy weight rule of
`weights.py` is checked against the source's own generator, bit for bit.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import shutil
import sys
import tempfile

import numpy as np

from tests.golden import weights

HERE = pathlib.Path(__file__).resolve().parent
ARCHS = {"tap": (4, 3), "tap12": (12, 0)}  # arch -> (MMT layers, text-BERT layers)
NUM_ANSWERS = 5000
STEPS = (0, 1, 2)
LFPR_STATS = ("objective", "head_grad", "ffn_grad", "objective_per_sample",
              "head_grad_per_sample", "ffn_grad_per_sample", "head_fisher_per_sample",
              "ffn_fisher_per_sample")
# The model reads these batch fields (lfpr_jax.models.batch.STEP_FIELDS, upstream names).
BATCH_KEYS = ("cmb_text", "image_feature_0", "obj_bbox_coordinates", "obj_num",
              "image_feature_1", "context_feature_0", "context_feature_1",
              "ocr_bbox_coordinates", "ocr_num", "train_prev_inds", "targets",
              "train_loss_mask")
PRUNED_KEYS = ("head_mask", "ffn_mask", "tf_scores", "tf_argmax", "tf_top2_margin",
               "tf_loss", "greedy_scores", "greedy_argmax", "greedy_top2_margin",
               "greedy_loss", "masked_full_tf_scores", "masked_full_greedy_scores")
SMALL_FILES = ("pruning.json",)
MANIFESTS = ("tap_textvqa.json", "tap12_textvqa.json", "tap_textvqa_pruned_example.json")


def output_keys(mmt_layers: int, text_layers: int) -> list[str]:
  """The keys of outputs.npz that tests/models/test_tap_parity.py reads."""
  keys = ["tf_txt_emb", "tf_obj_mmt_in", "tf_ocr_mmt_in", "tf_dec_emb", "tf_fixed_scores",
          "tf_ocr_scores", "tf_scores", "tf_argmax", "tf_top2_margin", "tf_loss",
          "tf_mmt_layer_0", f"tf_mmt_layer_{mmt_layers - 1}", "tf_mmt_seq_output",
          "greedy_scores", "greedy_argmax", "greedy_top2_margin", "greedy_prev_inds",
          "greedy_loss", "greedy_max_time_step"]
  keys += [f"tf_text_bert_layer_{i}" for i in range(text_layers)]
  keys += [f"lfpr_{v}_{s}_t{t}" for v in ("tf", "greedy") for s in LFPR_STATS for t in STEPS]
  return keys


def candidate_aliases(mmt_layers: int, text_layers: int) -> dict[str, list]:
  """key -> [source key] or [source key, start, stop] (a slice of the last axis)."""
  aliases = {
      "tf_mmt_seq_output": [f"tf_mmt_layer_{mmt_layers - 1}"],
      "tf_fixed_scores": ["tf_scores", 0, NUM_ANSWERS],
      "tf_ocr_scores": ["tf_scores", NUM_ANSWERS, None],
  }
  if text_layers:  # the MMT's text rows come straight out of text-BERT
    aliases["tf_txt_emb"] = [f"tf_text_bert_layer_{text_layers - 1}"]
  for s in LFPR_STATS:  # at t = 0 both decode from BOS: the same pass
    aliases[f"lfpr_greedy_{s}_t0"] = [f"lfpr_tf_{s}_t0"]
  return aliases


def resolve(stored, spec):
  src = stored[spec[0]]
  return src if len(spec) == 1 else src[..., spec[1]:spec[2]]


def save_npz(path: pathlib.Path, arrays: dict[str, np.ndarray]) -> None:
  fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz")
  os.close(fd)
  np.savez_compressed(tmp, **arrays)
  os.chmod(tmp, 0o644)
  os.replace(tmp, path)


def load_npz(path: pathlib.Path) -> dict[str, np.ndarray]:
  with np.load(path) as z:
    return {k: z[k] for k in z.files}


def vendor_arch(src: pathlib.Path, arch: str) -> dict:
  mmt_layers, text_layers = ARCHS[arch]
  out_dir = HERE / arch
  out_dir.mkdir(exist_ok=True)
  for name in SMALL_FILES:
    shutil.copyfile(src / arch / name, out_dir / name)
  batch = load_npz(src / arch / "batch.npz")
  save_npz(out_dir / "batch.npz", {k: batch[k] for k in BATCH_KEYS})
  save_npz(out_dir / "pruning.npz", load_npz(src / arch / "pruning.npz"))  # all read
  pruned = load_npz(src / arch / "outputs_pruned_0.4.npz")
  save_npz(out_dir / "outputs_pruned_0.4.npz", {k: pruned[k] for k in PRUNED_KEYS})

  full = load_npz(src / arch / "outputs.npz")
  keys = output_keys(mmt_layers, text_layers)
  aliases = candidate_aliases(mmt_layers, text_layers)
  stored = {k: full[k] for k in keys if k not in aliases}
  for key, spec in aliases.items():
    got = resolve(stored, spec)
    if not (got.dtype == full[key].dtype and np.array_equal(got, full[key])):
      raise ValueError(f"{arch}: {key} is not bit-identical to {spec}")
  save_npz(out_dir / "outputs.npz", stored)
  tmp = out_dir / "aliases.json.tmp"
  tmp.write_text("{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}"
                                     for k, v in aliases.items()) + "\n}\n")
  os.replace(tmp, out_dir / "aliases.json")
  return {"outputs.npz": sorted(set(full) - set(keys)),
          "batch.npz": sorted(set(batch) - set(BATCH_KEYS)),
          "outputs_pruned_0.4.npz": sorted(set(pruned) - set(PRUNED_KEYS))}


def check_weights(src_golden: pathlib.Path, src_manifests: pathlib.Path) -> None:
  spec = importlib.util.spec_from_file_location("source_weights", src_golden / "weights.py")
  source = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(source)
  for arch, (name, seed) in weights.GOLDEN_MODELS.items():
    want = source.state_dict(str(src_manifests / f"{name}.json"), seed)
    got = weights.state_dict(arch)
    assert list(got) == list(want), arch
    for k in want:
      assert got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]), (arch, k)
    print(f"weights {arch}: {len(want)} tensors bit-identical to the source generator")


def main(argv: list[str]) -> int:
  if len(argv) != 2:
    print(__doc__, file=sys.stderr)
    return 2
  src, manifests = pathlib.Path(argv[0]), pathlib.Path(argv[1])
  (HERE / "manifests").mkdir(exist_ok=True)
  for name in MANIFESTS:
    shutil.copyfile(manifests / name, HERE / "manifests" / name)
  shutil.copyfile(src / "batch_fields.md", HERE / "batch_fields.md")
  for folder in ("data", "torch_files"):  # copyfile: the source is read-only
    (HERE / folder).mkdir(exist_ok=True)
    for f in sorted((src / folder).iterdir()):
      shutil.copyfile(f, HERE / folder / f.name)
  for arch in ARCHS:
    print(arch, "dropped:", json.dumps(vendor_arch(src, arch)))
  check_weights(src, manifests)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
