"""config.init_from (train/init_from.py): a run starts from another workdir's parameters
(bit for bit, at its latest step or DIR@STEP) with step 0 and fresh optimizer moments,
takes the source's model fields and tokenizer, keeps new heads' initialisation, drops
(and names) what it lacks, refuses other shapes and tokenizers in one line, and resumes
from its own checkpoints without reading the source again."""
import json
import logging
import os
import shutil

import jax
import numpy as np
import pytest
from flax import traverse_util

import input_pipeline
import tasks
from conftest import tiny_config
from models.config import ModelConfig
from train import checkpointing, config_checks, init_from, loop, optimizer, run_config
from train import state as state_lib
from train.config_checks import ConfigError

SOURCE_STEPS = (2, 5)


def _numpy(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


@pytest.fixture(scope='module')
def source(tiny_corpus, tmp_path_factory):
  """(workdir, {step: params as numpy}) of a tiny decoder run with checkpoints at
  SOURCE_STEPS (each different random parameters), written as train_and_evaluate writes
  them, without compiling a train step."""
  root = tmp_path_factory.mktemp('init_from_source')
  config = tiny_config(tiny_corpus, str(tmp_path_factory.getbasetemp() / 'data_cache'))
  workdir = str(root / 'source')
  run = loop.Run(config, workdir)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(run.resolved_config.to_json(indent=2))
  tx = optimizer.make_optimizer(config.train)
  manager = checkpointing.make_manager(workdir, keep=5)
  saved = {}
  for step in SOURCE_STEPS:
    state = state_lib.create_train_state(run.task, tx, run.mesh, config.data.seq_len,
                                         jax.random.key(100 + step))
    state = state.replace(step=state.step + step)
    checkpointing.save(manager, step, state, run.data.train_iter.get_state())
    saved[step] = _numpy(state.params)
  checkpointing.finish(manager)
  return workdir, saved


def _target_config(tiny_corpus, tmp_path, spec):
  """A config file's model that is not the source's (d_model, depth, layout, dropout)."""
  config = tiny_config(tiny_corpus, str(tmp_path / 'cache'))
  config.model.update(d_model=64, num_layers=3, scan_layers=False, dropout=0.1)
  config.init_from = spec
  return config


def _assert_same(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# --- the parameters, the step and the optimizer state ------------------------------------
def test_loads_the_sources_params_at_step_zero_with_fresh_moments(source, tiny_corpus,
                                                                  tmp_path):
  src_dir, saved = source
  workdir = str(tmp_path / 'finetune')
  config = _target_config(tiny_corpus, tmp_path, src_dir)
  src = init_from.prepare(config, workdir, argv=[])
  assert src.step == SOURCE_STEPS[-1]  # DIR alone: its latest checkpoint
  # The source's model (and tokenizer) replaced the config file's; dropout is the run's.
  assert (config.model.d_model, config.model.num_layers, config.model.scan_layers) == (
      32, 2, True)
  assert config.model.dropout == 0.1 and config.model.vocab_size == 512
  with open(os.path.join(src_dir, 'tokenizer.model'), 'rb') as a, open(
      os.path.join(workdir, 'tokenizer.model'), 'rb') as b:
    assert a.read() == b.read()

  run = loop.Run(config, workdir)
  tx = optimizer.make_optimizer(config.train)
  _, shardings = state_lib.state_shardings(run.task, tx, run.mesh, config.data.seq_len)
  fresh = state_lib.create_train_state(run.task, tx, run.mesh, config.data.seq_len,
                                       jax.random.key(0))
  for spec, step in ((src_dir, SOURCE_STEPS[-1]), (f'{src_dir}@{SOURCE_STEPS[0]}',
                                                   SOURCE_STEPS[0])):
    state = init_from.start_state(init_from.source(spec), fresh, tx, shardings, run.mesh)
    _assert_same(_numpy(state.params), saved[step])
    assert int(state.step) == 0
    moments = jax.tree.leaves(state.opt_state)
    assert moments and all(not np.any(np.asarray(x)) for x in moments)  # counts, mu, nu
    for leaf, sharding in zip(jax.tree.leaves(state), jax.tree.leaves(shardings)):
      assert leaf.sharding == sharding
  # The two steps' parameters really differ, so the step asked for is the one loaded.
  assert not np.array_equal(saved[2]['token_embed']['embedding'],
                            saved[5]['token_embed']['embedding'])


def test_source_errors_are_one_line(source, tmp_path):
  src_dir, _ = source
  cases = {
      f'{src_dir}@3': f'has no checkpoint at step 3; its steps are '
                      f"{', '.join(map(str, SOURCE_STEPS))}.",
      f'{src_dir}@last': 'DIR@STEP with a whole-number step',
      str(tmp_path / 'missing'): 'is not a directory',
      'hf:gpt2': 'import the model first',
  }
  for spec, expected in cases.items():
    with pytest.raises(ConfigError) as e:
      init_from.source(spec)
    assert expected in str(e.value) and '\n' not in str(e.value), spec
  empty = tmp_path / 'no_checkpoint'
  shutil.copytree(src_dir, empty, ignore=shutil.ignore_patterns('checkpoints'))
  with pytest.raises(ConfigError, match='holds no checkpoint'):
    init_from.source(str(empty))
  # validate() checks the form (without reading the source).
  config = tiny_config('unused', str(tmp_path))
  config.init_from = 'runs/x@step10'
  with pytest.raises(ConfigError, match='whole-number step'):
    config_checks.validate(config)
  config.init_from = 'runs/x@10'
  config_checks.validate(config)


# --- merging parameter trees -------------------------------------------------------------
def test_merge_keeps_new_heads_and_drops_what_the_run_lacks(caplog):
  rng = np.random.default_rng(0)
  source = {'encoder': {'kernel': rng.normal(size=(4, 3))},
            'next_sentence': {'kernel': rng.normal(size=(3, 2)), 'bias': np.zeros(2)},
            'head': {'output_bias': np.zeros(7), 'final_norm': {'scale': np.ones(3)}}}
  run = {'encoder': {'kernel': np.zeros((4, 3))},
         'head': {'final_norm': {'scale': np.full(3, 2.0)}},
         'classifier': {'kernel': rng.normal(size=(3, 5))}}
  with caplog.at_level(logging.INFO, logger='absl'):
    merged = init_from.merge(run, source, 'SRC')
  np.testing.assert_array_equal(merged['encoder']['kernel'], source['encoder']['kernel'])
  np.testing.assert_array_equal(merged['head']['final_norm']['scale'], np.ones(3))
  assert merged['classifier']['kernel'] is run['classifier']['kernel']  # its own init
  assert set(merged) == {'encoder', 'head', 'classifier'} and 'output_bias' not in merged['head']
  [dropped] = [r.getMessage() for r in caplog.records if 'dropped' in r.getMessage()]
  assert dropped == ("init_from: dropped 3 parameter arrays of the source this run's model "
                     'lacks: head/output_bias, next_sentence/bias, next_sentence/kernel.')
  assert any('classifier/kernel' in r.getMessage() and 'fresh' in r.getMessage()
             for r in caplog.records)


def test_another_shape_or_layer_layout_fails_naming_both_sides():
  with pytest.raises(ConfigError) as e:
    init_from.merge({'token_embed': {'embedding': np.zeros((640, 32))}},
                    {'token_embed': {'embedding': np.zeros((512, 32))}}, 'runs/src (step 5)')
  message = str(e.value)
  assert '\n' not in message
  assert message.startswith('init_from: parameter token_embed/embedding has shape (512, 32) in '
                            'runs/src (step 5) but (640, 32) in this run;')

  def shapes(**fields):  # the real parameter paths of a tiny decoder
    fields = {'num_layers': 2, **fields}
    cfg = ModelConfig(num_heads=2, num_kv_heads=2, head_dim=8, d_model=16, d_ff=32,
                      vocab_size=128, max_len=16, **fields)
    task = tasks.for_model(cfg)
    params = jax.eval_shape(lambda r: task.init(r, task.example_batch(1, 8)),
                            jax.random.key(0))
    return {k: v.value.shape if hasattr(v, 'value') else v.shape
            for k, v in traverse_util.flatten_dict(params, sep='/').items()}
  for run, src in ((shapes(scan_layers=False), shapes()),
                   (shapes(scan_layers=False), shapes(scan_layers=False, num_layers=3))):
    with pytest.raises(ConfigError, match='layers of this run .* differ in layout or depth'):
      init_from.match(run, src, 'SRC')
  with pytest.raises(ConfigError, match=r'parameter decoder/layers/mlp/down/kernel has shape '
                                        r'\(2, 32, 16\) in SRC but \(3, 32, 16\)'):
    init_from.match(shapes(num_layers=3), shapes(), 'SRC')


# --- the config -------------------------------------------------------------------------
def test_explicit_overrides_win_or_fail_when_they_change_the_weights(source, tiny_corpus,
                                                                     tmp_path):
  src_dir, _ = source
  reference = run_config.saved_config(src_dir, [])
  config = _target_config(tiny_corpus, tmp_path, src_dir)
  config.model.max_len = 64  # the source's positions are rope: a longer context is free
  changed = init_from.resolve_config(config, reference, 'SRC', {'model.max_len'})
  assert config.model.max_len == 64 and config.model.d_model == 32
  assert 'model.d_model=32 (was 64)' in changed
  config.model.d_model = 48
  with pytest.raises(ConfigError) as e:
    init_from.resolve_config(config, reference, 'SRC/config.json', {'model.d_model'})
  assert str(e.value).startswith('--config.model.d_model=48 differs from the model of '
                                 'init_from (model.d_model=32 in SRC/config.json)')
  # Explicit fields are read from the command line.
  config = _target_config(tiny_corpus, tmp_path, src_dir)
  with pytest.raises(ConfigError, match='--config.model.scan_layers=False differs'):
    init_from.prepare(config, str(tmp_path / 'w'), ['--config=c.py',
                                                    '--config.model.scan_layers=false'])


# --- the tokenizer ----------------------------------------------------------------------
def test_tokenizer_is_copied_and_another_one_refused(source, tmp_path):
  src_dir, _ = source
  workdir = tmp_path / 'w'
  init_from.copy_tokenizer(src_dir, str(workdir))
  assert input_pipeline.load_tokenizer(str(workdir)).fingerprint == (
      input_pipeline.load_tokenizer(src_dir).fingerprint)
  init_from.copy_tokenizer(src_dir, str(workdir))  # the same one again: nothing to do
  other = tmp_path / 'other'
  other.mkdir()
  (other / 'tokenizer.model').write_bytes(b'another tokenizer')
  with pytest.raises(ConfigError, match='differs from the tokenizer of init_from') as e:
    init_from.copy_tokenizer(src_dir, str(other))
  assert '\n' not in str(e.value)
  assert (other / 'tokenizer.model').read_bytes() == b'another tokenizer'  # untouched


# --- end to end -------------------------------------------------------------------------
def _metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def _latest_params(workdir):
  config = run_config.saved_config(workdir, [])
  run = loop.Run(config, workdir)
  manager = checkpointing.make_manager(workdir, 3)
  params, step = checkpointing.restore_params(manager, run.abstract_params)
  manager.close()
  return step, _numpy(params)


@pytest.mark.slow
def test_finetune_resumes_from_its_own_checkpoint_like_an_uninterrupted_run(
    source, tiny_corpus, tmp_path, monkeypatch):
  """4 steps straight == 2 steps, the source deleted, 2 more: the resumed run reads its
  own checkpoint and config.json, never init_from again."""
  src_dir = str(tmp_path / 'source')
  shutil.copytree(source[0], src_dir)

  def finetune(workdir):
    config = _target_config(tiny_corpus, tmp_path, src_dir)
    config.train.update(steps=4, checkpoint_every=2, log_every=1, eval_every=2, eval_steps=1)
    return loop.train_and_evaluate(config, workdir)

  straight, interrupted = str(tmp_path / 'straight'), str(tmp_path / 'interrupted')
  finetune(straight)
  with monkeypatch.context() as m:  # a stop request (SIGTERM) after step 2
    m.setattr(loop._StopRequested, 'should_stop', lambda self, step: step == 2)
    assert finetune(interrupted)['step'] == 2
  shutil.rmtree(src_dir)
  assert finetune(interrupted)['step'] == 4

  saved = json.load(open(os.path.join(interrupted, 'config.json')))
  assert saved['model']['d_model'] == 32 and saved['model']['scan_layers'] is True
  assert saved['model']['dropout'] == 0.1
  step_a, params_a = _latest_params(straight)
  step_b, params_b = _latest_params(interrupted)
  assert step_a == step_b == 4
  _assert_same(params_a, params_b)
  losses = lambda w: [(r['step'], r['loss']) for r in _metrics(w) if 'loss' in r]
  assert losses(straight) == losses(interrupted)
  assert losses(straight)[0][0] == 1  # the fine-tuning run counts its own steps from 0


@pytest.mark.slow
def test_an_imported_bert_fine_tunes_without_its_next_sentence_head(tiny_corpus, tmp_path,
                                                                    caplog):
  """An imported workdir (--mode=import) as the source: the model and tokenizer.json are
  the checkpoint's; the masked-LM run keeps every parameter but the next-sentence pooler
  and head, which it drops with one log line naming them."""
  transformers = pytest.importorskip('transformers')
  pytest.importorskip('torch')
  import hf_fixtures
  from inference.load import load_run
  from interop import cli
  directory = hf_fixtures.bert_tokenizer_dir(str(tmp_path / 'hf'))
  vocab = len(transformers.AutoTokenizer.from_pretrained(directory))
  transformers.BertForPreTraining(transformers.BertConfig(
      vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
      intermediate_size=48, max_position_embeddings=64, type_vocab_size=2)
  ).save_pretrained(directory)
  imported = str(tmp_path / 'imported')
  cli.import_checkpoint(directory, imported)
  _, imported_params, _ = load_run(run_config.saved_config(imported, []), imported)
  imported_params = traverse_util.flatten_dict(_numpy(imported_params), sep='/')

  config = tiny_config(tiny_corpus, str(tmp_path / 'cache'))  # a decoder config file
  config.init_from = imported
  workdir = str(tmp_path / 'finetune')
  with caplog.at_level(logging.INFO, logger='absl'):
    src = init_from.prepare(config, workdir, argv=[])
    assert config.model.arch == 'encoder' and tasks.task_class(config).name == 'masked_lm'
    assert os.path.exists(os.path.join(workdir, 'tokenizer.json'))
    run = loop.Run(config, workdir)
    tx = optimizer.make_optimizer(config.train)
    _, shardings = state_lib.state_shardings(run.task, tx, run.mesh, config.data.seq_len)
    fresh = state_lib.create_train_state(run.task, tx, run.mesh, config.data.seq_len,
                                         jax.random.key(0))
    state = init_from.start_state(src, fresh, tx, shardings, run.mesh)
  params = traverse_util.flatten_dict(_numpy(state.params), sep='/')
  dropped = sorted(imported_params.keys() - params.keys())
  assert dropped and all(p.split('/')[0] in ('pooler', 'next_sentence') for p in dropped)
  for path, value in params.items():
    np.testing.assert_array_equal(value, imported_params[path], err_msg=path)
  [line] = [r.getMessage() for r in caplog.records if 'dropped' in r.getMessage()]
  assert line.endswith(f"lacks: {', '.join(dropped)}.")
