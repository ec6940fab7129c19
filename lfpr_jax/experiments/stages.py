"""What the experiment drivers share: cached stages, config validation, the run record.

A stage output is a file in the workdir plus a sidecar `<stem>.meta.json` holding the
seconds it took, the config values it depends on and the file's SHA-256. `cached`
reuses an output only when the sidecar agrees with the current run and the file is
intact; otherwise it says which file is wrong and how to recompute it.

The run record (`<stage_dir>/config.json`) is written only once the config is valid.
A rerun with a different config is accepted when the keys that differ invalidate no
stage output that exists; otherwise the error names the keys, the outputs they
invalidate and the switch that deletes exactly those (`--invalidate`), keeping the rest.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Optional, TypeVar

from absl import logging
import jax
import ml_collections

from lfpr_jax import atomic

T = TypeVar("T")
RECORD_FILE = "config.json"
RECORD_FORMAT = "lfpr_jax.run/2"


class StageError(ValueError):
  """A cached stage output that cannot be reused (corrupt, or from another run)."""


# ----------------------------------------------------------------- config as data


def flat_config(config: Mapping[str, Any] | ml_collections.ConfigDict,
                prefix: str = "") -> dict[str, Any]:
  """`{"prune.batch_size": 32, ...}`: JSON-safe leaves of a nested config."""
  out: dict[str, Any] = {}
  for k, v in config.items():
    key = f"{prefix}{k}"
    if isinstance(v, (dict, ml_collections.ConfigDict)):
      out.update(flat_config(v, key + "."))
    else:
      out[key] = v
  return json.loads(json.dumps(out, default=list))


def select_keys(flat: Mapping[str, Any], prefixes: Sequence[str]) -> dict[str, Any]:
  """The entries of `flat` whose key equals a prefix or lies under `prefix.`."""
  return {k: v for k, v in sorted(flat.items())
          if under(k, prefixes)}


# ------------------------------------------------------------------ cached stages


def _meta_path(path: str) -> str:
  stem = path[:-len(".json")] if path.endswith(".json") else os.path.splitext(path)[0]
  return stem + ".meta.json"


def file_sha256(path: str) -> str:
  """SHA-256 of a file's bytes (the checksum stored beside every stage output)."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def load_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def save_json(path: str, value: Any) -> None:
  atomic.write_json(path, value)


# Config keys added after workdirs may have been written: a run record or stage sidecar
# without one was produced at this value (so an old workdir stays reusable as long as
# the key keeps it).
ADDED_KEYS = {"compute_dtype": "float32", "train.microbatches": 1,
              "rest.microbatches": 1}


def _with_added_keys(stored: Mapping[str, Any], current: Mapping[str, Any]
                     ) -> dict[str, Any]:
  """`stored` completed with the `ADDED_KEYS` values of the keys `current` has."""
  return {**{k: v for k, v in ADDED_KEYS.items() if k in current}, **stored}


def _check_output(path: str, depends_on: Mapping[str, Any]
                  ) -> tuple[Optional[str], float]:
  """(what is wrong with the existing output at `path` or None, its seconds)."""
  meta_path = _meta_path(path)
  try:
    meta = load_json(meta_path)
    seconds, stored, sha = meta["seconds"], meta["depends_on"], meta["sha256"]
    stored = _with_added_keys(stored, depends_on)
  except (OSError, ValueError, KeyError, TypeError) as e:
    return (f"has no valid record of what produced it ({meta_path}: "
            f"{type(e).__name__})"), 0.0
  if stored != depends_on:
    differ = sorted(k for k in set(stored) | set(depends_on)
                    if stored.get(k) != depends_on.get(k))
    return f"was produced by a different run (differs in {', '.join(differ)})", 0.0
  if file_sha256(path) != sha:
    return ("is corrupt (its checksum does not match the one recorded when it was "
            "written)"), 0.0
  return None, float(seconds)


def stale_reason(path: str, depends_on: Mapping[str, Any]) -> Optional[str]:
  """Why the existing output at `path` cannot be reused with `depends_on` (no sidecar,
  another run's values, a wrong checksum), or None when it can (or does not exist)."""
  if not os.path.exists(path):
    return None
  return _check_output(path, json.loads(json.dumps(dict(depends_on), default=list)))[0]


def cached(path: str, compute: Callable[[], T], *, depends_on: Mapping[str, Any],
           save: Callable[[str, T], None] = save_json,
           load: Callable[[str], T] = load_json,
           is_writer: Optional[bool] = None) -> tuple[T, float]:
  """Loads the stage output at `path`, or computes, times and writes it.

  Args:
    path: the output file (the sidecar `<stem>.meta.json` goes next to it).
    compute: produces the value when no valid output exists.
    depends_on: the config values (and input hashes) the value is a function of;
      stored in the sidecar and compared on reuse.
    save, load: how the value is written to / read from `path` (JSON by default).
    is_writer: whether this process writes (default: process 0).

  Returns:
    (value, seconds it took to compute, also when reused).

  Raises:
    StageError: the output exists but is corrupt, has no sidecar, or was produced
      with other `depends_on` values; the message names the file and the remedy.
  """
  meta_path = _meta_path(path)
  depends_on = json.loads(json.dumps(dict(depends_on), default=list))
  remedy = (f"delete {path} (and {os.path.basename(meta_path)}) to recompute it, or "
            "rerun with --invalidate")
  if os.path.exists(path):
    problem, seconds = _check_output(path, depends_on)
    if problem:
      raise StageError(f"{path} {problem}: {remedy}.")
    try:
      value = load(path)
    except Exception as e:  # pylint: disable=broad-except
      raise StageError(f"{path} cannot be read ({type(e).__name__}: {e}): "
                       f"{remedy}.") from None
    logging.info("reusing %s", path)
    return value, float(seconds)
  t0 = time.time()
  value = compute()
  seconds = round(time.time() - t0, 2)
  if is_writer is None:
    is_writer = jax.process_index() == 0
  if is_writer:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save(path, value)
    atomic.write_json(meta_path, {"seconds": seconds, "depends_on": depends_on,
                                  "sha256": file_sha256(path)})
  return value, seconds


# ------------------------------------------------------------------- run record


@dataclasses.dataclass(frozen=True)
class Stage:
  """A stage of a driver: the outputs it owns and the config keys it reads.

  Attributes:
    name: shown in messages.
    outputs: glob patterns relative to the workdir.
    keys: dotted config key prefixes the stage's outputs depend on (directly).
    after: names of the stages whose outputs it reads (their keys count too).
    self_checked: key prefixes each of the stage's outputs records and checks on its
      own (a cell of the sweep depends on its restoration's keys only): a change in
      them does not invalidate the stage as a whole; `--invalidate` lets the driver
      recompute exactly the outputs whose own record disagrees.
  """
  name: str
  outputs: tuple[str, ...]
  keys: tuple[str, ...]
  after: tuple[str, ...] = ()
  self_checked: tuple[str, ...] = ()


def _closure(stages: Sequence[Stage]) -> dict[str, tuple[str, ...]]:
  by_name = {s.name: s for s in stages}
  out: dict[str, tuple[str, ...]] = {}
  for s in stages:  # in order: a stage only reads earlier ones
    keys = list(s.keys)
    for dep in s.after:
      keys += out[by_name[dep].name]
    out[s.name] = tuple(dict.fromkeys(keys))
  return out


def invalidated(stages: Sequence[Stage], changed: Iterable[str]) -> list[Stage]:
  """The stages whose outputs depend on any of the `changed` keys."""
  keys = _closure(stages)
  changed = list(changed)
  return [s for s in stages
          if any(under(k, keys[s.name]) and not under(k, s.self_checked)
                 for k in changed)]


def under(key: str, prefixes: Iterable[str]) -> bool:
  """Whether dotted `key` equals one of `prefixes` or lies below one."""
  return any(key == p or key.startswith(p + ".") for p in prefixes)


def existing_outputs(workdir: str, stage: Stage) -> list[str]:
  return sorted(p for pattern in stage.outputs
                for p in glob.glob(os.path.join(workdir, pattern)))


def check_run_record(config: ml_collections.ConfigDict, workdir: str, stage_dir: str,
                     stages: Sequence[Stage], *, ignore: Sequence[str] = (),
                     invalidate: bool = False) -> None:
  """Compares the config with the workdir's run record, then (re)writes the record.

  Call it after `validate` and before any stage runs.

  Args:
    config: the (valid) run config.
    workdir: the run's directory; stage outputs are globbed relative to it.
    stage_dir: where the record lives.
    stages: the driver's stages, in order.
    ignore: key prefixes that may change freely (e.g. more pruning targets).
    invalidate: delete the outputs the changed keys invalidate (they were written by
      this project: every path comes from a stage's own output patterns).

  Raises:
    ValueError: the config differs in keys whose stage outputs exist (and not
      `invalidate`); the message lists keys, outputs and how to keep the rest.
  """
  path = os.path.join(stage_dir, RECORD_FILE)
  current = flat_config(config)
  closure = _closure(stages)
  stored: dict[str, Any] = {}
  stored_stages: dict[str, Any] = {}
  legacy: Optional[dict[str, Any]] = None
  if os.path.exists(path):
    try:
      record = load_json(path)
      stored = _with_added_keys(record.get("config", {}), current)
      stored_stages = {name: _with_added_keys(values, current)
                       for name, values in record.get("stages", {}).items()}
      # A record from before per-stage values: its config is what every stage then
      # present was made with, and stays so for the stages no run has recorded since.
      if "stages" not in record:
        legacy = stored
      elif "legacy_config" in record:
        legacy = _with_added_keys(record["legacy_config"], current)
    except (OSError, ValueError, AttributeError, TypeError) as e:
      raise ValueError(f"{path} (the workdir's run record) cannot be read "
                       f"({type(e).__name__}); remove it to start the record anew "
                       "(stage outputs are checked on their own).") from None
  # Each stage is compared with the values its outputs were last made with (the main
  # command and the sweep share a workdir and may differ in, e.g., ReSt's rate: each
  # sees only its own stages' values; a record without them: its last run's config).
  changes: dict[str, tuple[Any, Any]] = {}
  hit = []
  for stage in stages:
    outs = existing_outputs(workdir, stage)
    made_with = stored_stages.get(stage.name, stored if legacy is None else legacy)
    differ = [k for k in current
              if under(k, closure[stage.name]) and not under(k, stage.self_checked)
              and not under(k, ignore) and made_with.get(k) != current[k]]
    if outs and differ:
      hit.append((stage, outs))
      changes.update({k: (made_with.get(k), current[k]) for k in differ})
  if hit and not invalidate:
    shown = [os.path.relpath(o, workdir) for _, outs in hit for o in outs]
    keys = sorted(changes)
    raise ValueError(
        f"{workdir} holds a run whose config differs in "
        f"{', '.join(f'{k} ({changes[k][0]!r} -> {changes[k][1]!r})' for k in keys[:6])}"
        f"{' ...' if len(keys) > 6 else ''}; that invalidates the stage(s) "
        f"{', '.join(s.name for s, _ in hit)} ({', '.join(shown[:6])}"
        f"{' ...' if len(shown) > 6 else ''}). Rerun with --invalidate to recompute "
        "only those (everything else is kept), or use a new --workdir.")
  if hit and jax.process_index() == 0:
    for stage, outs in hit:
      for out in outs:
        logging.warning("config changed: removing %s (stage %s)", out, stage.name)
        if os.path.isdir(out):
          shutil.rmtree(out)
        else:
          os.remove(out)
        meta = _meta_path(out)
        if os.path.exists(meta) and not os.path.isdir(out):
          os.remove(meta)
  if jax.process_index() == 0:
    os.makedirs(stage_dir, exist_ok=True)
    # Keys and stages only the other driver has are kept for its next run.
    atomic.write_json(path, {
        "format": RECORD_FORMAT, "config": {**stored, **current},
        "stages": {**stored_stages, **{stage.name: select_keys(current, closure[stage.name])
                                       for stage in stages}},
        **({} if legacy is None else {"legacy_config": legacy})})


# ------------------------------------------------------------------- validation


class ConfigError(ValueError):
  """Every problem found in a config, one `dotted.key: problem` per entry."""

  def __init__(self, problems: Sequence[str]):
    self.problems = list(problems)
    super().__init__("invalid config: " + "; ".join(self.problems))


class Checker:
  """Collects config problems, each naming its dotted key and what is allowed."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.problems: list[str] = []

  def get(self, key: str, default: Any = None) -> Any:
    node: Any = self.config
    for part in key.split("."):
      if not isinstance(node, (dict, ml_collections.ConfigDict)) or part not in node:
        return default
      node = node[part]
    return node

  def require(self, key: str) -> bool:
    if self.get(key, _MISSING) is _MISSING:
      self.problems.append(f"{key}: missing")
      return False
    return True

  def check(self, key: str, ok: Callable[[Any], bool], allowed: str) -> None:
    if not self.require(key):
      return
    value = self.get(key)
    try:
      good = bool(ok(value))
    except (TypeError, ValueError):
      good = False
    if not good:
      self.problems.append(f"{key}={value!r}: expected {allowed}")

  def int_at_least(self, key: str, low: int) -> None:
    self.check(key, lambda v: isinstance(v, int) and not isinstance(v, bool)
               and v >= low, f"an integer >= {low}")

  def positive(self, key: str) -> None:
    self.check(key, lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
               and v > 0, "a number > 0")

  def boolean(self, key: str) -> None:
    self.check(key, lambda v: isinstance(v, bool), "True or False")

  def one_of(self, key: str, choices: Sequence[Any]) -> None:
    self.check(key, lambda v: v in choices, "one of " + ", ".join(map(repr, choices)))

  def raise_if_any(self) -> None:
    if self.problems:
      raise ConfigError(self.problems)


_MISSING = object()


def depends_on(config: ml_collections.ConfigDict, stage_list: Sequence[Stage],
               name: str) -> dict[str, Any]:
  """The config values stage `name`'s outputs are a function of (its own keys and
  those of every stage it reads)."""
  keys = _closure(stage_list)[name]
  return select_keys(flat_config(config), keys)
