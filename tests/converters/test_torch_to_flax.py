"""The torch -> Flax converter: mapping, architecture inference, CLI, bad input."""

import json

import jax
import numpy as np
import pytest

from converters import torch_to_flax as conv
from lfpr_jax.training import checkpointing
from lfpr_jax.models.config import TapConfig
from lfpr_jax.models.params import abstract_params, init_params
from tests import golden
from tests.converters.torch_writer import write_checkpoint

# A small TAP-shaped model: head size 64 as upstream, a layer without heads and one
# without FFN neurons, learnable masks (the LFPR retraining model).
SMALL = TapConfig(arch="custom", text_bert_layers=1, mmt_heads=(2, 0, 1),
                  mmt_ffn=(256, 64, 0), hidden_size=128, text_heads=2, text_ffn=256,
                  vocab_size=200, num_answers=50, obj_feat_dim=64, ocr_feat_dim=64,
                  fc7_dim=64, ptr_query_key_size=128, learnable_masks=True)


@pytest.fixture(scope="module")
def small():
  params = init_params(SMALL, jax.random.key(0))
  # Non-trivial mask values, as after ReSt retraining.
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: x * 0.5 + 0.25 if "mask" in str(path[-1]) else x, params)
  return params, conv.params_to_state_dict(params, SMALL)


def _assert_trees_equal(a, b):
  fa = conv._flatten(a)
  fb = conv._flatten(b)
  assert sorted(fa) == sorted(fb)
  for k in fa:
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=str(k))


def test_upstream_shapes_of_inverse_mapping(small):
  _, sd = small
  assert sd["mmt.encoder.layer.0.attention.self.query.weight"].shape == (128, 128)
  assert sd["mmt.encoder.layer.2.attention.self.query.weight"].shape == (64, 128)
  assert sd["mmt.encoder.layer.1.attention.self.key.weight"].shape == (0, 128)
  assert sd["mmt.encoder.layer.2.attention.self.head_mask.mask"].shape == (1, 1, 1, 1)
  assert sd["mmt.encoder.layer.2.intermediate.dense.weight"].shape == (0, 128)
  assert sd["mmt.encoder.layer.1.output.dense.weight"].shape == (128, 64)
  assert sd["classifier.module.weight"].shape == (50, 128)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("pythia", [True, False], ids=["pythia", "bare"])
def test_cli_round_trip(tmp_path, small, legacy, pythia):
  params, sd = small
  ckpt = write_checkpoint(tmp_path / "model.ckpt", sd, legacy=legacy, pythia=pythia)
  out = tmp_path / "converted"
  assert conv.main(["--checkpoint", str(ckpt), "--out", str(out)]) == 0
  meta = json.loads((out / "arch.json").read_text())
  assert meta["config"]["mmt_heads"] == [2, 0, 1]
  config, restored = checkpointing.load_model(str(out))
  assert config == SMALL
  _assert_trees_equal(restored, params)
  assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_lfpr_pruned_checkpoint_quirks(tmp_path, small):
  """create_pruned_model output: `module.` prefixes on the sliced keys, unprefixed
  mask keys, pretraining heads with an untied cls.decoder copy, shuffled key order."""
  params, sd = small
  quirky = {}
  for k in reversed(list(sd)):
    quirky[k if "mask" in k else "module." + k] = sd[k]
  quirky["module.cls.decoder.weight"] = sd["text_bert.embeddings.word_embeddings.weight"].copy()
  quirky["module.cls.bias"] = np.zeros(200, np.float32)
  quirky["module.pollute_cls.decoder.bias"] = np.zeros(1, np.float32)
  ckpt = write_checkpoint(tmp_path / "pruned_model.ckpt", quirky)
  config, converted = conv.convert(str(ckpt))
  assert config == SMALL
  _assert_trees_equal(converted, params)


def test_overrides_checked_against_shapes(tmp_path, small, capsys):
  _, sd = small
  ckpt = write_checkpoint(tmp_path / "m.ckpt", sd)
  out = tmp_path / "o"
  rc = conv.main(["--checkpoint", str(ckpt), "--out", str(out), "--cfg-head", "[2,1,1]"])
  err = capsys.readouterr().err
  assert rc == 2 and not out.exists()
  # Names the key and both shapes.
  assert "mmt_layer_1/attention" in err and "missing parameters" in err
  cfg = tmp_path / "cfg.txt"
  cfg.write_text("[2,0,1]\n[256,32,0]\n")
  rc = conv.main(["--checkpoint", str(ckpt), "--out", str(out), "--cfg-file", str(cfg)])
  err = capsys.readouterr().err
  assert rc == 2
  assert "mmt_layer_1/ffn/wi/kernel has shape (128, 64), the model expects (128, 32)" in err


def test_missing_and_unknown_keys(small):
  _, sd = small
  broken = dict(sd)
  del broken["ocr_ptr_net.key.bias"]
  with pytest.raises(ValueError, match="missing parameters: \\['ocr_ptr_net/key/bias'\\]"):
    conv.state_dict_to_params(broken, SMALL)
  extra = {**sd, "mmt.encoder.layer.0.attention.self.rotary.weight": np.zeros(3)}
  with pytest.raises(conv.ConversionError, match="rotary"):
    conv.state_dict_to_params(extra, SMALL)
  with pytest.raises(conv.ConversionError, match="no 'classifier.module.weight'"):
    conv.infer_config({k: v for k, v in sd.items() if not k.startswith("classifier")})


@pytest.mark.parametrize("name", ["truncated.ckpt", "malicious.ckpt"])
def test_cli_refuses_bad_files(tmp_path, capsys, name):
  out = tmp_path / "o"
  rc = conv.main(["--checkpoint", str(golden.GOLDEN / "torch_files" / name), "--out", str(out)])
  assert rc == 2
  assert name in capsys.readouterr().err
  assert not out.exists()


def test_cli_refuses_existing_output_before_reading(tmp_path, small, capsys):
  out = tmp_path / "o"
  out.mkdir()
  rc = conv.main(["--checkpoint", str(tmp_path / "absent.ckpt"), "--out", str(out)])
  assert rc == 2 and "already exists" in capsys.readouterr().err


@pytest.mark.parametrize("arch", [golden.arch_param("tap"), golden.arch_param("tap12")])
def test_golden_architectures_inferred_and_mapped(arch, golden_models):
  sd, _, _ = golden_models.get(arch)
  config = conv.infer_config(sd)
  expected = TapConfig.tap() if arch == "tap" else TapConfig.tap12()
  assert config == expected
  params = conv.state_dict_to_params(sd, config)
  # The self-attention key bias is invisible in every output (a per-query constant
  # before the softmax): check the converted parameter itself.
  for i in range(config.mmt_layers):
    np.testing.assert_array_equal(
        params[f"mmt_layer_{i}"]["attention"]["key"]["bias"].reshape(-1),
        sd[f"mmt.encoder.layer.{i}.attention.self.key.bias"])
    np.testing.assert_array_equal(
        params[f"mmt_layer_{i}"]["attention"]["key"]["kernel"].reshape(768, 768).T,
        sd[f"mmt.encoder.layer.{i}.attention.self.key.weight"])
  manifest = golden.manifest(f"{arch}_textvqa")
  pretrain = sum(int(np.prod(s)) for k, s in manifest["state_dict"].items()
                 if k.startswith(conv.PRETRAIN_PREFIXES) and k != conv.TIED_DUPLICATE)
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_params(config)))
  assert n == manifest["num_params_unique"] - pretrain
  # Inverse mapping restores the upstream tensors bit for bit.
  back = conv.params_to_state_dict(params, config)
  for k, v in back.items():
    np.testing.assert_array_equal(v, sd[k], err_msg=k)


def test_pruned_manifest_shapes():
  """The example pruned checkpoint of upstream's manifests maps onto the model."""
  manifest = golden.manifest("tap_textvqa_pruned_example")
  sd = {k: np.zeros(s, np.float32) for k, s in manifest["state_dict"].items()}
  config = conv.infer_config(sd)
  assert list(config.mmt_heads) == manifest["cfg_head"]
  assert list(config.mmt_ffn) == manifest["cfg_ffn"]
  assert config.learnable_masks
  conv.state_dict_to_params(sd, config)
