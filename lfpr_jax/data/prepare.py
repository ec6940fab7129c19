"""From `config.data` to a built dataset: generate (synthetic), build ArrayRecord splits.

`prepare_data` turns `config.data` into a built (TFDS ArrayRecord) dataset and the model
shapes it implies (answer vocabulary, BERT vocabulary, feature widths of the synthetic
set), filled into `config.model`'s TapConfig fields.
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


def prepare_data(config: ml_collections.ConfigDict, workdir: str) -> PreparedData:
  """Generates (synthetic only) and builds the dataset of `config.data`.

  The model shapes that depend on the data (answer vocabulary, BERT vocabulary, feature
  widths of the synthetic set) are filled into `config.model`'s TapConfig fields.
  """
  d = config.data
  root = d.root or os.path.join(workdir, "data", d.dataset)
  model_fields = dict(config.model)
  if d.dataset == "synthetic":
    spec = synthetic.SyntheticSpec(**dict(d.get("synthetic", {})))
    manifest = json.loads(synthetic.generate(root, spec).read_text())
    sizes = manifest["sizes"]
    model_fields.setdefault("obj_feat_dim", sizes["feat_dim"])
    model_fields.setdefault("ocr_feat_dim", sizes["feat_dim"])
    model_fields.setdefault("obj_max", sizes["max_objects"])
    model_fields.setdefault("ocr_max", sizes["max_ocr"])
  else:
    readers.require_dir(root, (
        f"the {d.dataset} data directory. Put the TAP data release there (imdb/, "
        "feat_resx/, ocr_feat_resx/, m4c_vocabs/, 1600-400-20/, bert-base-uncased/) and "
        "set config.data.root, or run the synthetic benchmark instead: python -m "
        "lfpr_jax.main --config=configs/synthetic.py --workdir=/tmp/lfpr_synthetic"))
  layout = readers.DataLayout.for_dataset(d.dataset, root)
  vocab = AnswerVocab.from_file(layout.path(layout.answer_vocab))
  with open(layout.path(layout.bert_vocab)) as f:
    bert_vocab_size = sum(1 for _ in f)
  model_fields.setdefault("num_answers", vocab.num_vocab)
  model_fields.setdefault("vocab_size", bert_vocab_size)
  model_config = TapConfig(**model_fields)
  built_dir = d.built_dir or os.path.join(workdir, "tfds")
  tfds_builder.build_dataset(None, built_dir, tuple(d.splits), layout=layout,
                             config=model_config, progress=jax.process_index() == 0)
  return PreparedData(layout, built_dir, model_config, vocab)
