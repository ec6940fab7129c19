"""The golden upstream models' weights, regenerated with numpy alone.

The upstream outputs in `tap/` and `tap12/` were computed on weights where each
parameter depends only on (seed, state-dict key, shape):

    r = numpy.random.default_rng([seed, crc32(key)]).standard_normal(shape)  # float64
    LFPR masks (`*.head_mask.mask`, `*.ffn_mask.mask`)   ones
    `mmt.prev_pred_embeddings.ans_layer_norm.weight`    -(1 + 0.1 r)
    `ocr_ptr_net.query.weight`                          0.12 r
    other LayerNorm gains (manifest `layernorm_param_keys`)  1 + 0.1 r
    other LayerNorm biases                              0.05 r
    other tensors with 2 or more axes                   0.02 r
    other 1-d tensors                                   0.05 r
    then rounded to float32.

The negated answer-embedding LayerNorm gain keeps greedy decoding from repeating BOS
and the larger pointer query lets OCR copies win some steps, so a random model
exercises both decoder feedback paths. Tied keys (`cls.decoder.weight`) share the
array of the first key of their group, as the upstream module does.
"""

from __future__ import annotations

import json
import pathlib
import zlib

import numpy as np

MANIFESTS = pathlib.Path(__file__).resolve().parent / "manifests"

# arch -> (manifest stem, seed) of the two golden models.
GOLDEN_MODELS = {"tap": ("tap_textvqa", 7), "tap12": ("tap12_textvqa", 8)}

_ANSWER_LN_GAIN = "mmt.prev_pred_embeddings.ans_layer_norm.weight"
_POINTER_QUERY = "ocr_ptr_net.query.weight"


def _is_lfpr_mask(key: str) -> bool:
  owner, _, leaf = key.rpartition(".")
  return leaf == "mask" and owner.split(".")[-1] in ("head_mask", "ffn_mask")


def parameter(seed: int, key: str, shape, layernorm: bool) -> np.ndarray:
  """One parameter of the golden rule.

  Args:
    seed: the model's seed (7 for TAP, 8 for TAP12).
    key: the upstream state-dict key.
    shape: the tensor's shape.
    layernorm: whether `key` is a LayerNorm gain or bias.

  Returns:
    float32 array of `shape`.
  """
  shape = tuple(int(s) for s in shape)
  if _is_lfpr_mask(key):
    return np.ones(shape, np.float32)
  normal = np.random.default_rng([seed, zlib.crc32(key.encode())]).standard_normal(shape)
  if key == _ANSWER_LN_GAIN:
    value = -(1.0 + 0.1 * normal)
  elif key == _POINTER_QUERY:
    value = 0.12 * normal
  elif layernorm and key.endswith(".weight"):
    value = 1.0 + 0.1 * normal
  elif layernorm or len(shape) < 2:
    value = 0.05 * normal
  else:
    value = 0.02 * normal
  return value.astype(np.float32)


def state_dict_from_manifest(manifest: dict, seed: int) -> dict[str, np.ndarray]:
  """{upstream key: float32 array} for every key of `manifest`, in its order."""
  layernorm = frozenset(manifest["layernorm_param_keys"])
  source_of = {alias: group[0] for group in manifest["tied_state_dict_keys"]
               for alias in group[1:]}
  arrays = {key: parameter(seed, key, shape, key in layernorm)
            for key, shape in manifest["state_dict"].items() if key not in source_of}
  return {key: arrays[source_of.get(key, key)] for key in manifest["state_dict"]}


def manifest(name: str) -> dict:
  """The vendored upstream manifest `manifests/<name>.json` (keys, shapes, ties)."""
  return json.loads((MANIFESTS / f"{name}.json").read_text())


def state_dict(arch: str) -> dict[str, np.ndarray]:
  """Upstream-keyed float32 weights of the golden model `arch` ('tap' or 'tap12')."""
  if arch not in GOLDEN_MODELS:
    raise ValueError(f"golden arch must be one of {sorted(GOLDEN_MODELS)}, got {arch!r}")
  name, seed = GOLDEN_MODELS[arch]
  return state_dict_from_manifest(manifest(name), seed)
