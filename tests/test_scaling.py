"""Estimator, planner and sweep runner: counts match the model, FLOPs match XLA, the
planner reproduces Chinchilla's table, and an interrupted sweep resumes."""
import dataclasses
import importlib
import json
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from configs import default
from models import ModelConfig, lora
from models.config import LORA_TARGETS
from scaling import estimate, planner, sweep
from train import frozen as frozen_lib
from train.config_checks import ConfigError
import tasks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ModelConfig(vocab_size=1024, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=32,
                    d_model=128, d_ff=512, max_len=64)


@pytest.mark.parametrize('changes', [
    {}, dict(num_kv_heads=2), dict(activation='silu', gated_mlp=True), dict(tie_embeddings=False),
    dict(position='learned', norm='layernorm', use_bias=True), dict(position='relative'),
    dict(arch='encoder', position='learned', num_token_types=2, nsp_head=True),
    dict(arch='encoder_decoder', position='relative', activation='silu', gated_mlp=True, num_kv_heads=2),
    dict(arch='encoder_decoder', position='learned', tie_embeddings=False),
    # the published architectures' options (BERT, T5 v1.0 and v1.1)
    dict(arch='encoder', position='learned', norm='layernorm', use_bias=True, num_token_types=2,
         nsp_head=True, block_order='post_norm', embed_norm=True, final_norm=False,
         mlm_transform=True, output_bias=True, activation='gelu'),
    dict(arch='encoder_decoder', position='relative', activation='relu', tied_output_scale=True,
         num_decoder_layers=3, relative_buckets=16, attention_scale=1.0),
    dict(arch='encoder_decoder', position='relative', activation='gelu_tanh', gated_mlp=True,
         tie_embeddings=False, final_norm=False, num_decoder_layers=1),
    # LoRA adapters: every target, scanned and unrolled, cross-attention, gated MLP, a
    # classifier (no output projection to adapt)
    dict(lora_rank=4, lora_targets=LORA_TARGETS, tie_embeddings=False, activation='silu',
         gated_mlp=True, num_kv_heads=2),
    dict(arch='encoder', position='learned', nsp_head=True, num_token_types=2, scan_layers=False,
         lora_rank=8, lora_targets=('q', 'v', 'mlp_out')),
    dict(arch='encoder_decoder', position='relative', gated_mlp=True, tie_embeddings=False,
         num_decoder_layers=3, num_kv_heads=2, lora_rank=4, lora_targets=LORA_TARGETS),
    dict(arch='encoder_decoder', position='relative', scan_layers=False, lora_rank=2,
         lora_targets=('k', 'o', 'mlp_in')),
    dict(task='classification', num_labels=3, lora_rank=4, lora_targets=LORA_TARGETS),
])
def test_parameter_count_equals_the_initialised_model(changes):
  changes = dict(changes)
  name = changes.pop('task', 'auto')
  task = tasks.for_model(dataclasses.replace(SMALL, **changes), name)
  counted = sum(task.param_counts().values())
  initialised = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(estimate.abstract_params(task)))
  assert counted == initialised


def _run_config(arch: str) -> ml_collections.ConfigDict:
  """The tests below estimate variants of one model; estimates of the same model and
  micro-batch share their traces (scaling/estimate.py keeps them)."""
  config = default.get_config()
  config.model.update(arch=arch, num_layers=2, num_heads=4, d_model=128, d_ff=512, max_len=64,
                      vocab_size=1024, position='learned')
  config.data.update(seq_len=64, batch_size=8)
  config.train.steps = 10
  return config


@pytest.mark.parametrize('arch, task_name', [
    ('decoder', 'pretrain'), ('encoder_decoder', 'pretrain'), ('decoder', 'dpo'),
    ('encoder_decoder', 'dpo')])
def test_forward_flops_per_token_agree_with_xla_cost_analysis(arch, task_name):
  """One forward pass of the model over a step's sequences (DPO's: both sides of each
  pair, counted per pair row's token as the rest of its estimate is)."""
  config = _run_config(arch)
  config.model.scan_layers = False  # XLA's cost analysis counts a loop body once
  if task_name == 'dpo':
    config.task, config.init_from = 'dpo', 'runs/never_read'  # the estimate reads no source
  result = estimate.estimate(config)
  task = estimate.model_task(config)
  rows = config.data.batch_size
  if task_name == 'dpo':
    task, rows = task.side_task(task.cfg), 2 * rows
  batch = task.train_batch(rows, config.data.seq_len)
  params = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), estimate.abstract_params(task))
  compiled = jax.jit(task.logits).lower(params, batch).compile()
  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, list) else analysis
  xla_per_token = analysis['flops'] / (config.data.batch_size * config.data.seq_len)
  assert abs(result['forward_flops_per_token'] / xla_per_token - 1) < 0.10, (
      result['forward_flops_per_token'], xla_per_token)


@pytest.mark.parametrize('arch', ['decoder', 'encoder', 'encoder_decoder'])
@pytest.mark.parametrize('scan_layers,remat', [
    (True, 'none'), (True, 'dots_saveable'), (True, 'full'), (False, 'none')])
def test_memory_estimate_is_within_ten_percent_of_the_compiled_train_step(arch, scan_layers,
                                                                          remat):
  config = _run_config(arch)
  config.model.update(scan_layers=scan_layers, remat=remat)
  result = estimate.estimate(config)
  compiled = estimate.compiled_memory(config)
  assert abs(result['memory_bytes'] / compiled['total_bytes'] - 1) < 0.10, (result, compiled)
  state = result['train_state_bytes']
  assert state['weights'] == 4 * result['params'] and state['adam_moments'] == 8 * result['params']
  activations = result['activation_bytes']
  assert activations['full'] < activations['dots_saveable'] < activations['none']


@pytest.mark.parametrize('arch', ['decoder', 'encoder_decoder'])
def test_memory_estimate_with_the_loss_over_chunks_is_within_ten_percent_and_smaller(arch):
  """model.logits_chunk: one chunk's logits at a time (the T5 decoder's 14 positions
  are one balanced chunk of 14, the decoder's 64 four of 16), with a vocabulary whose
  logits weigh in the step's memory."""
  config = _run_config(arch)
  config.model.vocab_size = 8192
  whole = estimate.estimate(config)['activation_bytes']
  config.model.logits_chunk = 16
  result = estimate.estimate(config)
  compiled = estimate.compiled_memory(config)
  assert abs(result['memory_bytes'] / compiled['total_bytes'] - 1) < 0.10, (result, compiled)
  for policy, chunked in result['activation_bytes'].items():
    assert chunked < whole[policy] if arch == 'decoder' else chunked <= whole[policy]


def _lora_config(arch: str, targets: str) -> ml_collections.ConfigDict:
  """A LoRA run of four scanned layers (compiled once, like two), untied output head."""
  config = _run_config(arch)
  config.model.update(num_layers=4, tie_embeddings=False)
  config.lora.update(rank=8, targets=targets)
  config.init_from = 'runs/never_read'  # the estimate reads no source
  return config


@pytest.mark.parametrize('arch,targets', [('decoder', 'q,v,head'),
                                          ('encoder_decoder', 'q,k,v,o,mlp_in,mlp_out')])
def test_lora_memory_estimate_is_within_ten_percent_of_the_compiled_train_step(arch, targets):
  """The compiled step holds the adapters' state and takes the frozen base as an argument."""
  config = _lora_config(arch, targets)
  result = estimate.estimate(config)
  compiled = estimate.compiled_memory(config)
  assert abs(result['memory_bytes'] / compiled['total_bytes'] - 1) < 0.10, (result, compiled)


def test_lora_gradients_and_adamw_moments_are_the_adapters_only():
  config = _lora_config('decoder', 'q,v,head')  # the traces of the test above
  result = estimate.estimate(config)
  n, adapters = result['params'], result['params_by_part']['lora']
  assert result['trained_params'] == adapters
  assert result['train_state_bytes'] == {'weights': 4 * n, 'gradients': 4 * adapters,
                                         'adam_moments': 8 * adapters}
  full, lora = result['fine_tuning']['full'], result['fine_tuning']['lora']
  base = n - adapters
  assert (full['weights'], full['gradients'], full['adam_moments']) == (4 * base, 4 * base,
                                                                       8 * base)
  assert lora['total'] == result['memory_bytes'] < full['total']
  assert 'Full fine-tuning vs LoRA' in estimate.report(result)
  # FLOPs as the run counts them: the frozen kernels' 2 of 6 FLOPs per token (their weight
  # gradients) are not spent, nor the input gradients of the first layer's query, key and
  # value projections and A adapters, below which nothing trains, nor that layer's
  # attention key gradient dK (no key trains there); the rest of attention's are. The
  # forward pass is the whole model's.
  frozen_matmul = result['matmul_params'] - adapters
  forward = result['forward_flops_per_token']
  task = estimate.model_task(config)
  attention = estimate.abstract_params(task)['decoder']['layers']['self_attention']
  first_layer = (sum(attention[m]['kernel'].size for m in ('query', 'key', 'value'))
                 + sum(attention[m]['lora_a'].size for m in ('query', 'value'))) / 4
  first_layer_dk = 2 * task.cfg.num_heads * task.cfg.head_dim * config.data.seq_len
  assert result['flops_per_token'] == pytest.approx(3 * forward - 2 * frozen_matmul
                                                    - 2 * first_layer - first_layer_dk)
  # A task's new head (and lora.train_in_full's parameters) train beside the adapters.
  cfg = dataclasses.replace(SMALL, num_labels=3, lora_rank=4, lora_targets=('q', 'v'))
  task = tasks.for_model(cfg, 'classification')
  params = estimate.abstract_params(task)
  size = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
  def trained(in_full):
    return size(params) - size(frozen_lib.split(
        params, estimate.frozen_paths(task, params, in_full))[1])
  classifier = cfg.d_model * 3 + 3
  assert trained(()) == task.param_counts()['lora'] + classifier
  assert trained(('embedding',)) == trained(()) + cfg.vocab_size * cfg.d_model


@pytest.mark.parametrize('lora', [False, True])
def test_dpo_memory_estimate_holds_the_reference_and_is_within_ten_percent_of_the_compiled_step(
    lora):
  """DPO's reference: a whole copy of the weights; with LoRA the frozen base itself (XLA sees
  it twice, as the base and as the reference, but it is one set of arrays) and a second
  copy of what trains in full (here the embedding)."""
  config = _run_config('decoder')
  config.task, config.init_from = 'dpo', 'runs/never_read'  # the estimate reads no source
  config.data.batch_size = 4  # pairs: 8 sequences
  if lora:
    config.lora.update(rank=8, targets='q,v', train_in_full='embedding')
  result = estimate.estimate(config)
  compiled = estimate.compiled_memory(config)
  assert abs(result['memory_bytes'] / compiled['total_bytes'] - 1) < 0.10, (result, compiled)
  n, state = result['params'], result['train_state_bytes']
  embedding = config.model.vocab_size * config.model.d_model
  assert state['reference_weights'] == 4 * (embedding if lora else n)
  base = n - result['params_by_part'].get('lora', 0) - embedding
  assert compiled['shared_bytes'] == (4 * base if lora else 0)
  if lora:
    assert 'reference weights' in estimate.report(result)


def test_frozen_parts_are_those_a_run_freezes():
  """A lora.train_in_full part that names no parameter fails as the run would; an encoder
  classifier's pooler trains in full where its source has none (no next-sentence head)."""
  config = _lora_config('decoder', 'q,v,head')
  config.lora.train_in_full = 'embeding'
  with pytest.raises(ConfigError, match="lora.train_in_full names 'embeding', which is part "
                                        "of no parameter's name"):
    estimate.estimate(config)
  cfg = dataclasses.replace(SMALL, arch='encoder', position='learned', num_labels=3,
                            nsp_head=True, lora_rank=4, lora_targets=('q', 'v'))
  trained = {}
  for source_pooler in (True, False):
    task = tasks.for_model(cfg, 'classification', source_pooler=source_pooler)
    params = estimate.abstract_params(task)
    frozen = estimate.frozen_paths(task, params)
    trained[source_pooler] = {path[0] for path in traverse_util.flatten_dict(params)
                              if path not in frozen and not lora.is_adapter(path)}
  assert trained == {True: {'classifier'}, False: {'classifier', 'pooler'}}


@pytest.mark.parametrize('name', ['gpt_tiny', 'bench_cpu'])
def test_memory_estimate_of_shipped_cpu_configs_is_within_ten_percent(name):
  """Unrolled layers, where XLA (not JAX) decides which activations are stored."""
  config = importlib.import_module(f'configs.{name}').get_config()
  compiled = estimate.compiled_memory(config)['total_bytes']
  ratio = estimate.estimate(config)['memory_bytes'] / compiled
  assert abs(ratio - 1) < 0.10, ratio


def test_unrolled_layers_on_cpu_count_their_activations_whatever_the_remat_policy():
  config = _run_config('decoder')
  config.model.update(scan_layers=False, remat='full')
  result = estimate.estimate(config, platform='cpu')
  assert result['effective_remat'] == 'none'
  assert result['memory_bytes'] == (sum(result['train_state_bytes'].values())
                                    + result['activation_bytes']['none'])
  assert 'scan_layers=True' in estimate.report(result)
  assert estimate.estimate(config, platform='gpu')['effective_remat'] == 'full'


# Hoffmann et al. (2022), Table 3 (approach 1): (FLOPs, parameters, tokens).
CHINCHILLA_TABLE_3 = [
    (1.92e19, 400e6, 8.0e9), (1.21e20, 1e9, 20.2e9), (1.23e22, 10e9, 205.1e9),
    (5.76e23, 67e9, 1.5e12), (3.85e24, 175e9, 3.7e12), (9.90e24, 280e9, 5.9e12),
    (3.43e25, 520e9, 11.0e12), (1.27e26, 1e12, 21.2e12), (1.30e28, 10e12, 216.2e12),
]


@pytest.mark.parametrize('flops, params, tokens', CHINCHILLA_TABLE_3)
def test_planner_reproduces_chinchilla_table_3(flops, params, tokens):
  result = planner.plan(flops)
  assert abs(result['params'] / params - 1) < 0.15
  assert abs(result['tokens'] / tokens - 1) < 0.15
  shape = result['shape']
  assert abs(shape['params'] / result['params'] - 1) < 0.15
  assert shape['d_model'] == 64 * shape['num_heads']


def test_planner_with_a_fitted_law_and_shapes():
  result = planner.plan(5.76e23, law='chinchilla')
  assert 6 * result['params'] * result['tokens'] == pytest.approx(5.76e23)
  assert planner.model_shape(124e6, 50304) == dict(num_layers=12, d_model=768, num_heads=12,
                                                   d_ff=3072, params=123_568_128)
  with pytest.raises(ValueError, match='--flops'):
    planner.plan(-1.0)


@pytest.mark.slow
def test_estimate_and_plan_print_one_json_line():
  for args in (['--mode=plan', '--flops=1e18', '--json'],
               ['--mode=estimate', '--config=configs/gpt_tiny.py', '--nocompile', '--json']):
    out = subprocess.run([sys.executable, 'main.py', *args], cwd=ROOT, capture_output=True,
                         text=True, check=True)
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1, out.stdout
    result = json.loads(lines[0])
    assert result['params'] > 0
  assert result['flops_per_token'] > 6 * result['matmul_params']
  assert result['memory_bytes'] > 16 * result['params']


def _tiny_sweep(config) -> ml_collections.ConfigDict:
  config.train.update(log_every=10, eval_every=1000, checkpoint_every=10, eval_steps=2)
  s = ml_collections.ConfigDict()
  s.base = config
  s.budgets = [5e8, 1e9]
  s.size_factors = [0.5, 4.0]
  s.head_dim = 8
  s.aspect_ratio = 16.0
  s.max_loss_factor = 1.5
  s.launch = 'local'
  return s


@pytest.mark.slow
def test_an_interrupted_sweep_resumes_without_redoing_finished_runs(config, tmp_path,
                                                                    monkeypatch, capsys):
  from train import loop, metrics
  spec = _tiny_sweep(config)
  runs = sweep.plan_runs(spec)
  assert len(runs) == 4 and len({r.name for r in runs}) == 4
  for run in runs:  # 6 N D within one step of the budget
    tokens_per_step = config.data.batch_size * config.data.seq_len
    assert abs(6 * run.params * run.steps * tokens_per_step / run.budget - 1) < (
        6 * run.params * tokens_per_step / run.budget)
  workdir = str(tmp_path / 'sweep')
  original_write, trained = metrics.MetricsWriter.write, []

  def write_then_stop(self, step, scalars):  # SIGTERM in the second run, after step 10
    original_write(self, step, scalars)
    if len(set(trained)) == 2 and step == 10:
      os.kill(os.getpid(), signal.SIGTERM)

  original_train = loop.train_and_evaluate

  def recording_train(config, run_dir):
    trained.append(os.path.basename(run_dir))
    return original_train(config, run_dir)

  monkeypatch.setattr(metrics.MetricsWriter, 'write', write_then_stop)
  monkeypatch.setattr(loop, 'train_and_evaluate', recording_train)
  monkeypatch.setattr('scaling.report.write_report', lambda *a, **k: 'summary.md')
  sweep.run_sweep(spec, workdir)
  assert list(sweep.read_results(workdir)) == [runs[0].name]  # the second was interrupted

  monkeypatch.setattr(metrics.MetricsWriter, 'write', original_write)
  trained.clear()
  rows = sweep.run_sweep(spec, workdir)
  assert trained == [r.name for r in runs[1:]]  # the finished run was skipped
  assert sorted(r['run'] for r in rows) == sorted(r.name for r in runs)
  assert all(r['status'] == 'done' and np.isfinite(r['eval_loss']) for r in rows)
  with open(os.path.join(workdir, 'runs', runs[1].name, 'metrics.jsonl')) as f:
    steps = [json.loads(line)['step'] for line in f]
  assert steps == sorted(steps) and steps.count(10) == 1  # resumed after step 10

  # A run that finished but was not recorded (stopped in between) is evaluated, not retrained.
  before = sweep.read_results(workdir)
  os.remove(os.path.join(workdir, sweep.RESULTS))
  rows = sweep.run_sweep(spec, workdir)
  for row in rows:
    np.testing.assert_allclose(row['eval_loss'], before[row['run']]['eval_loss'], rtol=1e-5)
  with open(os.path.join(workdir, 'runs', runs[1].name, 'metrics.jsonl')) as f:
    assert [json.loads(line)['step'] for line in f] == steps  # no step trained again

  # launch='print': one command per unfinished run (with this sweep's overrides), and
  # such a command trains its run.
  printed = str(tmp_path / 'printed')
  spec.launch = 'print'
  command = 'python main.py --mode=sweep --config=S.py --config.base.seed=3'
  sweep.run_sweep(spec, printed, command=command)
  assert capsys.readouterr().out.splitlines() == [f'{command} --sweep_run={r.name}' for r in runs]
  assert not sweep.read_results(printed)
  sweep.run_sweep(spec, printed, only=runs[0].name, command=command)
  assert list(sweep.read_results(printed)) == [runs[0].name]
  spec.launch = 'local'

  # A run whose loss passes the bound is marked diverged and not run again.
  spec.max_loss_factor = 0.01
  diverged = str(tmp_path / 'diverged')
  sweep.run_sweep(spec, diverged, only=runs[0].name)
  assert sweep.read_results(diverged)[runs[0].name]['status'] == 'diverged'
  trained.clear()
  sweep.run_sweep(spec, diverged, only=runs[0].name)
  assert trained == []
