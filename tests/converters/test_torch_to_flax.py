"""The torch -> Flax converter: mapping, architecture inference, CLI, bad input."""

import json
import os
import stat

import jax
import numpy as np
import pytest

from converters import torch_to_flax as conv
from lfpr_jax import atomic
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


def _fails(capsys, status, *argv) -> str:
  """Runs the CLI in-process; asserts `status` and ONE `error:` line; returns it."""
  capsys.readouterr()
  with pytest.raises(SystemExit) as e:
    conv.main(list(argv))
  assert e.value.code == status
  captured = capsys.readouterr()
  lines = [line for line in captured.err.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
  assert captured.out == ""
  return lines[0]


def _leftovers(folder) -> list[str]:
  return [p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


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
  err = _fails(capsys, 1, "--checkpoint", str(ckpt), "--out", str(out),
               "--cfg-head", "[2,1,1]")
  assert not out.exists()
  # Names the key and both shapes.
  assert "mmt_layer_1/attention" in err and "missing parameters" in err
  cfg = tmp_path / "cfg.txt"
  cfg.write_text("[2,0,1]\n[256,32,0]\n")
  err = _fails(capsys, 1, "--checkpoint", str(ckpt), "--out", str(out),
               "--cfg-file", str(cfg))
  assert "mmt_layer_1/ffn/wi/kernel has shape (128, 64), the model expects (128, 32)" in err
  assert not out.exists()


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
  bad = golden.GOLDEN / "torch_files" / name
  assert bad.is_file()  # refused for what it holds, not for being absent
  err = _fails(capsys, 1, "--checkpoint", str(bad), "--out", str(out))
  assert name in err and "not found" not in err
  assert not out.exists()
  assert _leftovers(tmp_path) == []


def test_cli_refuses_existing_output_before_reading(tmp_path, small, capsys):
  out = tmp_path / "o"
  out.mkdir()
  err = _fails(capsys, 1, "--checkpoint", str(tmp_path / "absent.ckpt"), "--out",
               str(out))
  assert "already exists" in err and "--overwrite" in err


def _snapshot(folder) -> dict[str, bytes]:
  return {str(p.relative_to(folder)): p.read_bytes()
          for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", ["foreign_dir", "file"])
def test_cli_overwrite_never_deletes_foreign_paths(tmp_path, small, capsys, case):
  _, sd = small
  ckpt = write_checkpoint(tmp_path / "m.ckpt", sd)
  out = tmp_path / "mine"
  if case == "file":
    out.write_text("not a model")
    before = {"": out.read_bytes()}
  else:
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("precious")
    (out / "sub" / "arch.json").write_text("{}")
    before = _snapshot(out)
  for extra in ([], ["--overwrite"]):
    err = _fails(capsys, 1, "--checkpoint", str(ckpt), "--out", str(out), *extra)
    assert f"refusing to replace {out}" in err
    after = {"": out.read_bytes()} if case == "file" else _snapshot(out)
    assert after == before
  assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("legacy_dir", [False, True], ids=["marked", "arch_json_only"])
def test_cli_overwrite_replaces_own_model_dir(tmp_path, small, capsys, legacy_dir):
  params, sd = small
  first = write_checkpoint(tmp_path / "first.ckpt", sd)
  second = write_checkpoint(tmp_path / "second.ckpt", sd, legacy=True)
  out = tmp_path / "converted"
  assert conv.main(["--checkpoint", str(first), "--out", str(out)]) == 0
  if legacy_dir:  # written before markers existed: recognised by its arch.json
    (out / atomic.MARKER).unlink()
  (out / "stale.txt").write_text("from an earlier run")
  assert conv.main(["--checkpoint", str(second), "--out", str(out),
                    "--overwrite"]) == 0
  meta = json.loads((out / "arch.json").read_text())
  assert meta["source_checkpoint"] == str(second)
  assert not (out / "stale.txt").exists() and atomic.is_marked(out)
  config, restored = checkpointing.load_model(str(out))
  assert config == SMALL
  _assert_trees_equal(restored, params)
  assert _leftovers(tmp_path) == []


def test_cli_output_permissions_follow_umask(tmp_path, small):
  _, sd = small
  ckpt = write_checkpoint(tmp_path / "m.ckpt", sd)
  out = tmp_path / "converted"
  previous = os.umask(0o022)
  try:
    assert conv.main(["--checkpoint", str(ckpt), "--out", str(out)]) == 0
  finally:
    os.umask(previous)
  assert stat.S_IMODE(os.stat(out).st_mode) == 0o755
  assert stat.S_IMODE(os.stat(out / "arch.json").st_mode) == 0o644


@pytest.mark.parametrize("args,status,expect", [
    (["--cfg-head", "[3,2"], 2, "argument --cfg-head: expected a list of non-negative"),
    (["--cfg-ffn", "[1,-2]"], 2, "argument --cfg-ffn: expected a list of non-negative"),
    (["--cfg-head", "__import__('os')"], 2, "argument --cfg-head"),
    (["--cfg-file", "CFG", "--cfg-head", "[1,1,1]"], 2, "--cfg-file gives both lists"),
    (["--arch", "nope"], 2, "argument --arch: invalid choice"),
    (["--cfg-file", "ABSENT"], 1, "--cfg-file ABSENT not found"),
])
def test_cli_bad_arguments(tmp_path, small, capsys, args, status, expect):
  _, sd = small
  ckpt = write_checkpoint(tmp_path / "m.ckpt", sd)
  (tmp_path / "cfg.txt").write_text("[2,0,1]\n[256,64,0]\n")
  args = [a.replace("CFG", str(tmp_path / "cfg.txt")).replace(
      "ABSENT", str(tmp_path / "absent.txt")) for a in args]
  out = tmp_path / "o"
  err = _fails(capsys, status, "--checkpoint", str(ckpt), "--out", str(out), *args)
  assert expect.replace("ABSENT", str(tmp_path / "absent.txt")) in err
  assert not out.exists() and _leftovers(tmp_path) == []


@pytest.mark.parametrize("text,expect", [
    ("[2,0,1]\n", "must have two lines"),
    ("[2,0,1]\n[256,64\n", "neurons line '[256,64' is not a Python list"),
    ("[2,0,1]\n[256,64]\n", "lists 3 head counts and 2 FFN widths"),
    ("2 0 1\n256 64 0\n", "heads line '2 0 1' is not a Python list"),
])
def test_cli_malformed_cfg_file(tmp_path, small, capsys, text, expect):
  _, sd = small
  ckpt = write_checkpoint(tmp_path / "m.ckpt", sd)
  cfg = tmp_path / "cfg.txt"
  cfg.write_text(text)
  out = tmp_path / "o"
  err = _fails(capsys, 1, "--checkpoint", str(ckpt), "--out", str(out), "--cfg-file",
               str(cfg))
  assert f"--cfg-file {cfg}: " in err and expect in err
  assert not out.exists()


def test_cli_cfg_file_matches_checkpoint(tmp_path, small):
  """A correct cfg.txt (parsed by selection.parse_cfg_txt) converts as inferred."""
  params, sd = small
  ckpt = write_checkpoint(tmp_path / "m.ckpt", sd)
  cfg = tmp_path / "cfg.txt"
  cfg.write_text("[2, 0, 1]\n[256, 64, 0]\n")
  out = tmp_path / "o"
  assert conv.main(["--checkpoint", str(ckpt), "--out", str(out), "--cfg-file",
                    str(cfg)]) == 0
  assert checkpointing.load_config(str(out)) == SMALL


@pytest.mark.parametrize("kind", ["absent", "directory"])
def test_cli_missing_checkpoint(tmp_path, capsys, kind):
  ckpt = tmp_path / "model.ckpt"
  if kind == "directory":
    ckpt.mkdir()
  out = tmp_path / "o"
  err = _fails(capsys, 1, "--checkpoint", str(ckpt), "--out", str(out))
  assert f"--checkpoint {ckpt}: " in err
  assert ("not found" if kind == "absent" else "is a directory") in err
  assert not out.exists()


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
