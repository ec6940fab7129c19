"""`python -m converters.flax_to_torch`: model directory -> upstream .ckpt + cfg.txt."""

import jax
import numpy as np
import pytest

from converters import flax_to_torch, torch_pickle
from converters import torch_to_flax as conv
from lfpr_jax.api import TapModel
from lfpr_jax.pruning import surgery
from lfpr_jax.pruning.selection import parse_cfg_txt
from lfpr_jax.training import checkpointing
from tests.converters.torch_writer import write_checkpoint
from tests.helpers import SMALL, random_batch, random_params


def _assert_trees_equal(a, b):
  fa, fb = conv._flatten(a), conv._flatten(b)
  assert sorted(fa) == sorted(fb)
  for k in fa:
    assert np.asarray(fa[k]).dtype == np.asarray(fb[k]).dtype, k
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=str(k))


@pytest.fixture(scope="module")
def unpruned():
  return SMALL, jax.tree.map(np.asarray, random_params(SMALL, seed=1))


@pytest.fixture(scope="module")
def pruned(unpruned):
  """SMALL pruned to 0 heads in layer 0 and 16 of 32 neurons in layer 1, with
  learnable masks of non-trivial values (as after ReSt)."""
  config, params = unpruned
  head = np.array([[0, 0], [1, 0]], np.float32)
  ffn = np.zeros((2, 64), np.float32)
  ffn[0] = 1
  ffn[1, 1:32:2] = 1
  params, config = surgery.prune(params, config, head, ffn, learnable_masks=True)
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: np.asarray(x) * np.float32(0.5) + np.float32(0.25)
      if "mask" in str(path[-1]) else np.asarray(x), params)
  assert config.mmt_heads == (0, 1) and config.mmt_ffn == (64, 16)
  return config, params


def _save(tmp_path, config, params, name="model"):
  path = tmp_path / name
  checkpointing.save_model(str(path), config, params)
  return path


@pytest.mark.parametrize("which", ["unpruned", "pruned"])
def test_round_trip_is_bit_identical(tmp_path, request, which, capsys):
  config, params = request.getfixturevalue(which)
  model_dir = _save(tmp_path, config, params)
  ckpt = tmp_path / "out" / "pruned_model.ckpt"
  assert flax_to_torch.main(["--model", str(model_dir), "--out", str(ckpt)]) == 0
  assert f"mmt_heads={list(config.mmt_heads)}" in capsys.readouterr().out
  cfg = ckpt.parent / "cfg.txt"
  assert parse_cfg_txt(cfg.read_text()) == (config.mmt_heads, config.mmt_ffn)
  assert sorted(p.name for p in ckpt.parent.iterdir()) == ["cfg.txt", "pruned_model.ckpt"]

  # Back through the torch -> flax converter, architecture from cfg.txt.
  back = tmp_path / "back"
  assert conv.main(["--checkpoint", str(ckpt), "--out", str(back),
                    "--cfg-file", str(cfg)]) == 0
  config_back, params_back = checkpointing.load_model(str(back))
  assert config_back == config
  _assert_trees_equal(params_back, params)


def test_upstream_names_layouts_and_order(tmp_path, pruned):
  config, params = pruned
  ckpt = tmp_path / "m.ckpt"
  flax_to_torch.export_checkpoint(str(_save(tmp_path, config, params)), str(ckpt))
  obj = torch_pickle.load(str(ckpt))
  assert list(obj) == ["model"]  # as LFPR's create_pruned_model saves it
  sd = obj["model"]
  keys = list(sd)
  assert keys[0] == "text_bert.embeddings.word_embeddings.weight"
  assert keys[-1] == "overlap_cls.decoder.bias"
  layer = [k[len("mmt.encoder.layer.1."):] for k in keys
           if k.startswith("mmt.encoder.layer.1.")]
  assert layer == list(conv.LAYER_RULES)  # upstream's registration order
  assert keys.index("obj_faster_rcnn_fc7.module.lc.weight") < keys.index(
      "mmt.prev_pred_embeddings.position_embeddings.weight") < keys.index(
      "mmt.encoder.layer.0.attention.self.query.weight")
  # Layer 0 has no heads, layer 1 one head and 16 neurons (PyTorch [out, in] layouts).
  assert sd["mmt.encoder.layer.0.attention.self.query.weight"].shape == (0, 128)
  assert sd["mmt.encoder.layer.0.attention.output.dense.weight"].shape == (128, 0)
  assert sd["mmt.encoder.layer.0.attention.self.head_mask.mask"].shape == (1, 0, 1, 1)
  assert sd["mmt.encoder.layer.1.attention.self.head_mask.mask"].shape == (1, 1, 1, 1)
  assert sd["mmt.encoder.layer.1.intermediate.dense.weight"].shape == (16, 128)
  assert sd["mmt.encoder.layer.1.intermediate.ffn_mask.mask"].shape == (16,)
  np.testing.assert_array_equal(
      sd["mmt.encoder.layer.1.output.dense.weight"],
      params["mmt_layer_1"]["ffn"]["wo"]["kernel"].T)
  np.testing.assert_array_equal(
      sd["mmt.encoder.layer.1.intermediate.ffn_mask.mask"],
      params["mmt_layer_1"]["ffn"]["ffn_mask"])
  # Strict upstream loading needs the (unused) pretraining heads; the tied decoder is
  # the word embedding matrix.
  np.testing.assert_array_equal(sd["cls.decoder.weight"],
                                sd["text_bert.embeddings.word_embeddings.weight"])
  assert sd["overlap_cls.dense.weight"].shape == (512, 256)
  assert all(v.dtype == np.float32 for v in sd.values())


def test_pretrain_heads_copied_from_upstream_checkpoint(tmp_path, unpruned):
  config, params = unpruned
  rng = np.random.default_rng(0)
  upstream = {k: rng.standard_normal(v.shape).astype(np.float32)
              for k, v in flax_to_torch.placeholder_pretrain_heads(config).items()}
  upstream["cls.decoder.weight"] = rng.standard_normal((300, 128)).astype(np.float32)
  source = write_checkpoint(tmp_path / "orig.ckpt",
                            {**conv.params_to_state_dict(params, config), **upstream})
  ckpt = tmp_path / "m.ckpt"
  assert flax_to_torch.main(["--model", str(_save(tmp_path, config, params)),
                             "--out", str(ckpt), "--pretrain-heads-from",
                             str(source)]) == 0
  sd = torch_pickle.load(str(ckpt))["model"]
  for k, v in upstream.items():
    if k != "cls.decoder.weight":
      np.testing.assert_array_equal(sd[k], v, err_msg=k)
  np.testing.assert_array_equal(sd["cls.decoder.weight"],
                                params["text_bert"]["word"]["embedding"])


def test_fold_masks_keeps_the_function(tmp_path, pruned):
  config, params = pruned
  ckpt = tmp_path / "folded.ckpt"
  assert flax_to_torch.main(["--model", str(_save(tmp_path, config, params)),
                             "--out", str(ckpt), "--fold-masks"]) == 0
  assert not any("mask" in k for k in torch_pickle.load(str(ckpt))["model"])
  folded_config, folded = conv.convert(str(ckpt))
  assert not folded_config.learnable_masks
  assert (folded_config.mmt_heads, folded_config.mmt_ffn) == ((0, 1), (64, 16))
  assert parse_cfg_txt((tmp_path / "cfg.txt").read_text()) == ((0, 1), (64, 16))
  batch = random_batch(SMALL, 2, seed=4)
  before = TapModel(config, params).scores(batch)
  after = TapModel(folded_config, folded).scores(batch)
  # Same function; the mask multiplies the weight instead of the activation.
  np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)
  assert not np.array_equal(  # the masks (0.25..0.75) were not simply dropped
      folded["mmt_layer_1"]["ffn"]["wo"]["kernel"], params["mmt_layer_1"]["ffn"]["wo"]["kernel"])


def test_not_a_model_directory(tmp_path, capsys):
  (tmp_path / "empty").mkdir()
  ckpt = tmp_path / "m.ckpt"
  with pytest.raises(ValueError, match="not an lfpr_jax model directory.*arch.json"):
    flax_to_torch.export_checkpoint(str(tmp_path / "empty"), str(ckpt))
  assert flax_to_torch.main(["--model", str(tmp_path / "empty"), "--out", str(ckpt)]) == 2
  err = capsys.readouterr().err
  assert err.count("error:") == 1 and "arch.json" in err
  assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


@pytest.mark.parametrize("existing", ["m.ckpt", "cfg.txt"])
def test_existing_output_needs_overwrite(tmp_path, unpruned, capsys, existing):
  model_dir = _save(tmp_path, *unpruned)
  (tmp_path / existing).write_bytes(b"keep me")
  argv = ["--model", str(model_dir), "--out", str(tmp_path / "m.ckpt")]
  assert flax_to_torch.main(argv) == 2
  err = capsys.readouterr().err
  assert err.count("error:") == 1 and "already exists" in err and existing in err
  assert (tmp_path / existing).read_bytes() == b"keep me"
  assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
  assert flax_to_torch.main(argv + ["--overwrite"]) == 0
  assert torch_pickle.load(str(tmp_path / "m.ckpt"))["model"]


@pytest.mark.torch
def test_torch_load_weights_only(tmp_path, pruned):
  torch = pytest.importorskip("torch")
  config, params = pruned
  ckpt = tmp_path / "m.ckpt"
  flax_to_torch.export_checkpoint(str(_save(tmp_path, config, params)), str(ckpt))
  expected = torch_pickle.load(str(ckpt))["model"]
  for kwargs in ({}, {"mmap": True}):  # mmap needs the 64-byte aligned records
    loaded = torch.load(str(ckpt), weights_only=True, **kwargs)
    assert list(loaded) == ["model"]
    assert list(loaded["model"]) == list(expected)
    for k, v in loaded["model"].items():
      assert v.dtype == torch.float32 and tuple(v.shape) == expected[k].shape, k
      np.testing.assert_array_equal(v.numpy(), expected[k], err_msg=k)
