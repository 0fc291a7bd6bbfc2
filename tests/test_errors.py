"""Each mistake a user can make gets one clear message, before anything compiles."""
import os
import subprocess
import sys

import pytest

from train import config_checks, loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize('field, value, message', [
    ('model.arch', 'gpt', "model.arch='gpt' is not one of decoder"),
    ('task', 'masked_lm', "task='masked_lm' needs model.arch='encoder'"),
    ('model.position', 'alibi', "model.position='alibi' is not one of"),
    ('model.activation', 'tanh', "model.activation='tanh' is not one of"),
    ('model.num_kv_heads', 3, 'not a multiple of model.num_kv_heads=3'),
    ('data.seq_len', 64, 'data.seq_len=64 is longer than model.max_len=32'),
    ('train.grad_accum', 3, 'not divisible by train.grad_accum=3'),
    ('data.tokenizer.type', 'wordpiece', "data.tokenizer.type='wordpiece' is not one of"),
    ('train.steps', 0, 'train.steps=0 must be positive'),
])
def test_bad_config_values_name_the_field(config, field, value, message):
  *sections, name = field.split('.')
  node = config
  for part in sections:
    node = node[part]
  node[name] = value
  with pytest.raises(config_checks.ConfigError, match=message.replace('(', r'\(')):
    config_checks.validate(config)


def test_batch_not_divisible_by_data_parallel_devices(config):
  config.data.batch_size = 12
  with pytest.raises(config_checks.ConfigError, match='not divisible by the 8 data-parallel'):
    config_checks.validate_against_mesh(config, {'data': 8, 'fsdp': 1, 'tensor': 1})


def test_misspelled_override_is_rejected_by_the_locked_config(tmp_path):
  out = subprocess.run([sys.executable, 'main.py', '--config=configs/gpt_tiny.py',
                        f'--workdir={tmp_path}', '--config.model.num_layer=2'],
                       cwd=ROOT, capture_output=True, text=True)
  assert out.returncode != 0
  assert 'num_layer' in out.stderr and 'num_layers' in out.stderr  # names it, suggests the fix


def test_data_path_with_no_files(config, tmp_path):
  config.data.corpus = str(tmp_path / 'missing' / '*.txt')
  with pytest.raises(ValueError, match='matches no files'):
    loop.train_and_evaluate(config, str(tmp_path / 'run'))


def test_empty_corpus(config, tmp_path):
  (tmp_path / 'empty.txt').write_text('  \n')
  config.data.corpus = str(tmp_path / 'empty.txt')
  with pytest.raises(ValueError, match='empty'):
    loop.train_and_evaluate(config, str(tmp_path / 'run'))


@pytest.mark.slow  # trains (2 steps) and checkpoints a run first
def test_tokenizer_of_another_size_than_the_run(config, tmp_path):
  workdir = str(tmp_path / 'run')
  config.train.steps = 2
  loop.train_and_evaluate(config, workdir)
  config.data.tokenizer.vocab_size = 640
  with pytest.raises(config_checks.ConfigError, match='tokenizer.model has 512 pieces'):
    loop.train_and_evaluate(config, workdir)


def test_eval_mode_reads_the_saved_config_and_applies_overrides(tmp_path):
  from train import run_config
  (tmp_path / 'config.json').write_text('{"train": {"eval_steps": 20, "lr": 0.001}, "dtype": "float32"}')
  config = run_config.saved_config(str(tmp_path), ['--config.train.eval_steps=2', '--json'])
  assert config.train.eval_steps == 2 and config.train.lr == 0.001
  assert config.train.offload_optimizer is False  # absent from an older run's config.json
  with pytest.raises(Exception, match='no such config field'):
    run_config.saved_config(str(tmp_path), ['--config.train.eval_stepz=2'])
  with pytest.raises(Exception, match='train a run'):
    run_config.saved_config(str(tmp_path / 'missing'), [])
