"""The task registry: config.task picks one module; settings of every task are checked;
old workdirs that named the field `objective` still load."""
import json

import pytest

import tasks
from configs import default
from models import ModelConfig
from train import config_checks, run_config


def test_auto_follows_the_arch_and_each_task_trains_its_family():
  config = default.get_config()
  for arch, name in tasks.DEFAULT_TASK.items():
    config.model.arch = arch
    assert tasks.task_class(config).name == name
    assert tasks.TASKS[name, arch].arch == arch
    assert tasks.for_model(ModelConfig(arch=arch)).name == name


def test_a_task_refuses_a_model_of_another_family():
  with pytest.raises(ValueError, match="trains model.arch='decoder', not 'encoder'"):
    tasks.for_model(ModelConfig(arch='encoder'), 'causal_lm')


@pytest.mark.parametrize('field, value, message', [
    ('masked_lm.mask_rate', 0.0, 'masked_lm.mask_rate=0.0 must be in'),
    ('span_corruption.noise_density', 2.0, 'span_corruption.noise_density=2.0 must be in'),
])
def test_settings_of_a_task_the_run_does_not_train_are_still_checked(field, value, message):
  config = default.get_config()  # a decoder run
  section, name = field.split('.')
  config[section][name] = value
  with pytest.raises(config_checks.ConfigError, match=message):
    config_checks.validate(config)


def test_next_sentence_without_token_types_fails_only_for_masked_lm():
  config = default.get_config()
  config.masked_lm.next_sentence = True
  config_checks.validate(config)  # a decoder run ignores the BERT-only option
  config.model.arch = 'encoder'
  with pytest.raises(config_checks.ConfigError, match='model.num_token_types=2'):
    config_checks.validate(config)


def test_a_workdir_that_named_the_field_objective_loads(tmp_path):
  saved = default.get_config().to_dict()
  saved['objective'] = saved.pop('task')
  saved['model']['arch'] = 'encoder'
  saved['objective'] = 'masked_lm'
  (tmp_path / 'config.json').write_text(json.dumps(saved))
  config = run_config.saved_config(str(tmp_path), [])
  assert config.task == 'masked_lm' and 'objective' not in config
  config_checks.validate(config)
