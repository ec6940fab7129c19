"""From `config.data` to a built dataset: generate (synthetic), build ArrayRecord splits.

`prepare_data` turns `config.data` into a built (TFDS ArrayRecord) dataset and the model
shapes it implies (answer vocabulary, BERT vocabulary, feature widths of the synthetic
set), filled into `config.model`'s TapConfig fields.

Real data (`config.data`):

* `root`: the TAP data release (TextVQA and ST-VQA in one root; `readers.DataLayout`).
* `bert_vocab`, `fasttext_model`: the two inputs that are not in the release; default
  `<root>/bert-base-uncased/vocab.txt` and `<root>/.vector_cache/wiki.en.bin`
  (`readers.BERT_VOCAB_SOURCE`, `readers.FASTTEXT_MODEL_SOURCE` say where to get them).
  Both, and the `fasttext` package, are checked before any long work.
  `fasttext_model="none"` selects the deterministic stand-in vectors (tests only).
* `built_dir`: default `tfds_builder.default_built_dir(root, dataset)`
  (`<root>/lfpr_jax_built/<dataset>`), shared by every workdir and by TAP and TAP12
  runs; it is where `python -m lfpr_jax.data.tfds_builder --data_dir <root>` writes.

Synthetic data is generated into and built under the workdir (`<workdir>/data/synthetic`,
`<workdir>/tfds`).
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import ml_collections

from lfpr_jax.data import readers, synthetic, tfds_builder
from lfpr_jax.data.vocab import AnswerVocab
from lfpr_jax.models.config import TapConfig


@dataclasses.dataclass(frozen=True)
class PreparedData:
  """A built dataset and everything needed to read and score it."""
  layout: readers.DataLayout
  built_dir: str
  model_config: TapConfig
  vocab: AnswerVocab


def data_layout(data: ml_collections.ConfigDict, root: str) -> readers.DataLayout:
  """The layout of `config.data` under `root`, with its `bert_vocab` /
  `fasttext_model` overrides (relative paths are relative to `root`)."""
  overrides = {}
  for field in ("bert_vocab", "fasttext_model"):
    value = data.get(field, "")
    if value:
      overrides[field] = os.fspath(value)
  if str(overrides.get("fasttext_model", "")).lower() == "none":
    overrides["fasttext_model"] = None  # stand-in vectors: tests only, not upstream's
  return readers.DataLayout.for_dataset(data.dataset, root, **overrides)


def prepare_data(config: ml_collections.ConfigDict, workdir: str) -> PreparedData:
  """Generates (synthetic only) and builds the dataset of `config.data`.

  The model shapes that depend on the data (answer vocabulary, BERT vocabulary, feature
  widths of the synthetic set) are filled into `config.model`'s TapConfig fields.

  Raises:
    FileNotFoundError / ValueError / ImportError: a missing or broken input (release
      directory, BERT vocabulary, fastText model, `fasttext` package), one message
      naming it and where to get it, before any long work.
  """
  d = config.data
  model_fields = dict(config.model)
  if d.dataset == "synthetic":
    root = d.root or os.path.join(workdir, "data", d.dataset)
    spec = synthetic.SyntheticSpec(**dict(d.get("synthetic", {})))
    manifest = json.loads(synthetic.generate(root, spec).read_text())
    sizes = manifest["sizes"]
    model_fields.setdefault("obj_feat_dim", sizes["feat_dim"])
    model_fields.setdefault("ocr_feat_dim", sizes["feat_dim"])
    model_fields.setdefault("obj_max", sizes["max_objects"])
    model_fields.setdefault("ocr_max", sizes["max_ocr"])
    default_built = os.path.join(workdir, "tfds")
  else:
    if not d.root:
      raise ValueError(
          "config.data.root is not set: pass --config.data.root=<the TAP data release "
          "root> (holds imdb/, feat_resx/, ocr_feat_resx/, m4c_vocabs/, 1600-400-20/ "
          "for TextVQA and ST-VQA), or run the synthetic benchmark instead: python -m "
          "lfpr_jax.main --config=configs/synthetic.py --workdir=/tmp/lfpr_synthetic")
    root = d.root
    readers.require_dir(root, (
        f"the TAP data release ({d.dataset}: imdb/, feat_resx/, ocr_feat_resx/, "
        "m4c_vocabs/, 1600-400-20/); set config.data.root"))
    default_built = tfds_builder.default_built_dir(root, d.dataset)
  layout = data_layout(d, root)
  # Before anything long: the inputs that are not in the release (and the package).
  bert_vocab_size = readers.check_setup_files(layout)
  vocab = AnswerVocab.from_file(layout.path(layout.answer_vocab))
  model_fields.setdefault("num_answers", vocab.num_vocab)
  model_fields.setdefault("vocab_size", bert_vocab_size)
  model_config = TapConfig(**model_fields)
  built_dir = d.built_dir or default_built
  tfds_builder.build_dataset(None, built_dir, tuple(d.splits), layout=layout,
                             config=model_config, progress=jax.process_index() == 0)
  return PreparedData(layout, built_dir, model_config, vocab)
