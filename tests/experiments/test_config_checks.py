"""Config validation before any work (lfpr_jax/experiments/config_checks.py)."""

import pytest

from configs import sweep_synthetic, synthetic, tap12_stvqa, tap_textvqa
from lfpr_jax.experiments import config_checks, stages
from lfpr_jax.models.config import TapConfig


@pytest.mark.parametrize("config", [
    synthetic.get_config(), synthetic.get_config("tiny"), sweep_synthetic.get_config(),
    sweep_synthetic.get_config("tiny"), tap_textvqa.get_config(),
    tap12_stvqa.get_config("thre")], ids=["synthetic", "tiny", "sweep", "sweep_tiny",
                                           "tap_textvqa", "tap12_stvqa_thre"])
def test_shipped_configs_are_valid(config):
  config_checks.validate(config)


def _problems(edit, base=None):
  config = base or synthetic.get_config("tiny")
  edit(config)
  with pytest.raises(stages.ConfigError) as e:
    config_checks.validate(config)
  return e.value.problems


@pytest.mark.parametrize("edit,expected", [
    (lambda c: c.prune.update(batch_size=0), "prune.batch_size=0: expected an integer >= 1"),
    (lambda c: c.prune.update(batch_size=20, group_size=8),
     "prune.batch_size=20: expected a multiple of prune.group_size=8"),
    (lambda c: c.prune.update(num_samples=0), "prune.num_samples=0"),
    (lambda c: c.prune.update(t_star=-2), "prune.t_star=-2"),
    (lambda c: c.prune.update(heuristic="max"), "prune.heuristic='max': expected one of"),
    (lambda c: c.prune.update(constraints=(1.5,)), "prune.constraints=(1.5,)"),
    (lambda c: c.prune.update(constraints=(0.3,)),
     "rest.schedule: has no (retrain %, k) row for prune.constraints [0.3]"),
    (lambda c: c.rest.update(lr=0.0), "rest.lr=0.0: expected a number > 0"),
    (lambda c: c.rest.update(batch_size=15, loss_shards=2),
     "rest.batch_size=15: expected a multiple of rest.loss_shards=2"),
    (lambda c: c.train.update(num_steps=0), "train.num_steps=0"),
    (lambda c: c.train.update(microbatches=0),
     "train.microbatches=0: expected an integer >= 1"),
    (lambda c: c.train.update(microbatches=3),
     "train.microbatches=3: expected a divisor of train.batch_size=16"),
    (lambda c: c.rest.update(microbatches=5),
     "rest.microbatches=5: expected a divisor of rest.batch_size=16"),
    (lambda c: c.rest.update(microbatches=-1),
     "rest.microbatches=-1: expected an integer >= 1"),
    (lambda c: c.eval.update(batch_size=-1), "eval.batch_size=-1"),
    (lambda c: c.data.update(dataset="vqa2"), "data.dataset='vqa2'"),
    (lambda c: c.model.update(mmt_ffn=(8, 8)),
     "model.mmt_heads / model.mmt_ffn: expected one entry per MMT layer"),
    (lambda c: c.update(compute_dtype="float16"),
     "compute_dtype='float16': expected one of 'float32', 'bfloat16'"),
])
def test_each_bad_value_is_named(edit, expected):
  problems = _problems(edit)
  assert any(p.startswith(expected) for p in problems), problems


def test_all_problems_in_one_error():
  def edit(c):
    c.prune.batch_size = 0
    c.rest.lr = -1.0
    c.eval.batch_size = 0
  problems = _problems(edit)
  keys = [p.split("=")[0] for p in problems]
  assert keys == ["eval.batch_size", "prune.batch_size", "rest.lr"]


def test_unknown_model_field_and_sweep_names():
  config = synthetic.get_config("tiny")
  config.model.unlock()
  config.model.mmt_head = (2,)
  assert any(p.startswith("model.mmt_head: not a TapConfig field")
             for p in _problems(lambda c: None, config))
  config = synthetic.get_config("tiny")
  config.model.unlock()
  config.model.remat = True
  config_checks.validate(config)  # a valid switch
  config = synthetic.get_config("tiny")
  config.model.unlock()
  config.model.remat = "yes"
  assert _problems(lambda c: None, config) == ["model.remat='yes': expected True or False"]
  problems = _problems(lambda c: c.sweep.update(criteria=("lfpr", "snip"),
                                                restorations=("magic",)),
                       sweep_synthetic.get_config("tiny"))
  assert any(p.startswith("sweep.criteria=") for p in problems)
  assert any(p.startswith("sweep.restorations=") for p in problems)


def test_compute_dtype_is_one_top_level_switch():
  for config in (synthetic.get_config(), tap_textvqa.get_config()):
    assert config.compute_dtype == "float32"
  config = synthetic.get_config("tiny")
  config.compute_dtype = "bfloat16"
  config_checks.validate(config)
  config.model.unlock()
  config.model.compute_dtype = "bfloat16"   # would also change the base model
  assert any(p.startswith("model.compute_dtype: set the top-level compute_dtype")
             for p in _problems(lambda c: None, config))
  config = synthetic.get_config("tiny")
  del config["compute_dtype"]
  assert "compute_dtype: missing" in _problems(lambda c: None, config)


def test_checks_against_the_model():
  config = synthetic.get_config("tiny")
  config.prune.t_star = 4
  config.eval.batch_size = 3
  model = TapConfig(arch="x", mmt_heads=(2,), mmt_ffn=(8,), decode_steps=4)
  with pytest.raises(stages.ConfigError) as e:
    config_checks.check_against_model(config, model)
  assert e.value.problems[0].startswith("prune.t_star=4: expected -1 or a step below")
  assert any(p.startswith("eval.batch_size=3: expected a multiple of the 4 devices")
             for p in e.value.problems)
  config = synthetic.get_config("tiny")
  config.rest.schedule = ((0.4, 73, 2),)
  with pytest.raises(stages.ConfigError, match="retrains \\[2\\] trailing layers"):
    config_checks.check_against_model(config, model)
