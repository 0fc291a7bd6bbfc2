"""float16 training with dynamic loss scaling (issue 18): an overflowing step is skipped
and leaves the state bit for bit, the scale halves and grows as configured, float16
tracks float32, accumulation skips as one step, float32 / bfloat16 states are as
before, and a float16 run resumes bitwise after kill -9 (slow tier)."""
import dataclasses
import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import default
from models import ModelConfig, layers
import tasks
from train import config_checks, loop, loss_scale, optimizer, sharding, state as state_lib, steps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ_LEN, VOCAB = 16, 128
OVERFLOW = 2.0**40  # a scale no float16 backward pass survives (max 65504)


@dataclasses.dataclass
class _Run:
  """A compiled train step and a fresh state to copy (the step donates its input)."""
  step: object
  initial: object
  schedule: object

  def fresh(self):
    return jax.tree.map(jnp.copy, self.initial)


def _run(dtype: str, grad_accum: int = 1, offload: bool = False,
         growth_interval: int = 2000) -> _Run:
  """One compiled step per setting for the whole module (keyed by value, however the
  arguments are spelt)."""
  return _compiled_run(dtype, grad_accum, offload, growth_interval)


@functools.lru_cache(maxsize=None)
def _compiled_run(dtype: str, grad_accum: int, offload: bool, growth_interval: int) -> _Run:
  config = default.get_config()
  config.dtype = dtype
  config.train.update(steps=20, warmup_steps=2, grad_accum=grad_accum, lr=1e-2,
                      loss_scale_growth_interval=growth_interval)
  config_checks.validate(config)
  cfg = ModelConfig(vocab_size=VOCAB, num_layers=2, num_heads=2, num_kv_heads=2, head_dim=16,
                    d_model=32, d_ff=64, max_len=SEQ_LEN, dtype=jnp.dtype(dtype))
  task = tasks.for_model(cfg)
  tx = optimizer.make_optimizer(config.train)
  schedule = optimizer.learning_rate_schedule(config.train)
  mesh = sharding.make_mesh(ml_collections.ConfigDict({'data': 1, 'fsdp': 1, 'tensor': 1}),
                            jax.devices()[:1])
  scaler = loss_scale.from_config(config, cfg.dtype)
  _, shardings = state_lib.state_shardings(task, tx, mesh, SEQ_LEN, offload, scaler)
  if grad_accum > 1:  # the same initial state as one batch per step (not compiled again)
    initial = _run(dtype, 1, offload, growth_interval).initial
  else:
    initial = state_lib.create_train_state(task, tx, mesh, SEQ_LEN, jax.random.key(0), offload,
                                           scaler)
  step = steps.jit_train_step(task, tx, schedule, grad_accum, jax.random.key(1), mesh,
                              shardings)
  return _Run(step, initial, schedule)


def _batch(seed: int, batch_size: int = 8):
  rng = np.random.default_rng(seed)
  ids = rng.integers(6, VOCAB, size=(batch_size, SEQ_LEN + 1)).astype(np.int32)
  weights = np.ones((batch_size, SEQ_LEN), np.float32)
  weights[0, -3:] = 0.0  # padding: unequal token counts per micro-batch
  return {'inputs': ids[:, :-1], 'targets': ids[:, 1:],
          'segment_ids': np.ones((batch_size, SEQ_LEN), np.int32),
          'positions': np.tile(np.arange(SEQ_LEN, dtype=np.int32), (batch_size, 1)),
          'weights': weights}


def _train(run: _Run, num_steps: int, cycle: int = 0):
  """num_steps from a fresh state on batches 0, 1, ... (repeating after `cycle`)."""
  state, losses = run.fresh(), []
  for i in range(num_steps):
    state, metrics = run.step(state, _batch(i % cycle if cycle else i))
    losses.append(float(metrics['loss']))
  return state, losses, metrics


def _with_scale(state, scale: float):
  """The state with another loss scale, placed as the step returns it (so the step's
  compiled program takes it as it is, not compiled again for another placement)."""
  scale = jax.device_put(jnp.float32(scale), state.loss_scale.scale.sharding)
  return state.replace(loss_scale=state.loss_scale.replace(scale=scale))


def _host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def _assert_bitwise_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.atleast_1d(x), np.atleast_1d(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(x.view(np.uint8), y.view(np.uint8))


# --- the scaler alone ----------------------------------------------------------------

def test_the_scale_halves_on_overflow_grows_after_the_interval_and_stops_at_the_minimum():
  scaler = loss_scale.LossScale.create(8.0, growth_interval=3, factor=2.0, min_scale=2.0)
  seen = []
  for finite in [True, True, True, True, False, True, True, False, False, False]:
    scaler = scaler.update(jnp.asarray(finite))
    seen.append((float(scaler.scale), int(scaler.good_steps), int(scaler.skipped_steps)))
  assert seen == [(8, 1, 0), (8, 2, 0), (16, 0, 0), (16, 1, 0), (8, 0, 1), (8, 1, 1),
                  (8, 2, 1), (4, 0, 2), (2, 0, 3), (2, 0, 4)]


def test_a_float16_run_has_a_scaler_and_other_dtypes_the_plain_train_state():
  """float32 and bfloat16 keep the three-field TrainState: their checkpoints have the
  layout they always had, so workdirs written before float16 existed restore."""
  assert [f.name for f in dataclasses.fields(state_lib.TrainState)] == [
      'step', 'params', 'opt_state']
  for dtype in ('float32', 'bfloat16'):
    run = _run(dtype)
    assert type(run.initial) is state_lib.TrainState
    _, _, metrics = _train(run, 1)
    assert not {'loss_scale', 'skipped', 'skipped_steps'} & set(metrics)
  state = _run('float16').initial
  assert isinstance(state, state_lib.ScaledTrainState)
  assert float(state.loss_scale.scale) == 2.0**15 and int(state.loss_scale.skipped_steps) == 0


# --- the train step --------------------------------------------------------------------

def test_an_overflowing_step_is_skipped_leaving_the_state_bit_identical():
  """Step count semantics: state.step counts batches (it advances); the optimizer's
  own count (Adam's, the schedule's) counts applied updates (it does not)."""
  run = _run('float16')
  state, _, _ = _train(run, 2)
  before = _host(state)
  state, metrics = run.step(_with_scale(state, OVERFLOW), _batch(2))
  assert not np.isfinite(float(metrics['grad_norm'])) and np.isfinite(float(metrics['loss']))
  assert float(metrics['skipped']) == 1.0 and float(metrics['skipped_steps']) == 1
  assert float(metrics['loss_scale']) == OVERFLOW
  _assert_bitwise_equal(_host(state.params), before.params)
  _assert_bitwise_equal(_host(state.opt_state), before.opt_state)
  assert int(state.step) == 3
  assert (float(state.loss_scale.scale), int(state.loss_scale.good_steps),
          int(state.loss_scale.skipped_steps)) == (OVERFLOW / 2, 0, 1)
  # The next update uses the learning rate of the second applied update (schedule step 2).
  state, metrics = run.step(_with_scale(state, 2.0**15), _batch(3))
  assert float(metrics['skipped']) == 0.0
  assert float(metrics['lr']) == pytest.approx(float(run.schedule(2)))
  assert int(state.step) == 4 and int(state.loss_scale.skipped_steps) == 1
  assert not np.array_equal(np.asarray(state.params['token_embed']['embedding']),
                            before.params['token_embed']['embedding'])


def test_the_scale_grows_after_the_configured_number_of_good_steps():
  run = _run('float16', growth_interval=3)
  state = run.fresh()
  scales = []
  for i in range(7):
    state, metrics = run.step(state, _batch(i))
    scales.append(float(metrics['loss_scale']))  # the scale each step used
  assert scales == [2.0**15] * 3 + [2.0**16] * 3 + [2.0**17]
  assert int(state.loss_scale.skipped_steps) == 0


def test_float16_tracks_float32_over_20_steps():
  """Stated tolerance: every one of 20 losses within 2e-3 nats of float32's (measured
  here: 1.1e-4 at most), and no step skipped at the default initial scale."""
  _, losses32, _ = _train(_run('float32'), 20, cycle=2)
  state, losses16, _ = _train(_run('float16'), 20, cycle=2)
  assert losses32[-1] < losses32[0] - 1.0  # it learns (two batches, seen ten times)
  np.testing.assert_allclose(losses16, losses32, atol=2e-3)
  assert int(state.loss_scale.skipped_steps) == 0


def test_float16_gradient_accumulation_equals_one_batch_and_skips_as_one_step():
  results = []
  for grad_accum in (1, 4):
    run = _run('float16', grad_accum=grad_accum)
    state, losses, _ = _train(run, 3)
    params = _host(state.params)
    state, metrics = run.step(_with_scale(state, OVERFLOW), _batch(3))
    assert float(metrics['skipped']) == 1.0 and int(state.loss_scale.skipped_steps) == 1
    assert int(state.step) == 4
    _assert_bitwise_equal(_host(state.params), params)
    results.append((params, losses))
  (params_1, losses_1), (params_4, losses_4) = results
  # float16 rounds each micro-batch's weight gradients on their own (measured: losses
  # within 4e-7 relative, parameters within 3.4e-4 after 3 updates at lr 1e-2)
  np.testing.assert_allclose(losses_4, losses_1, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(params_1), jax.tree.leaves(params_4)):
    np.testing.assert_allclose(a, b, atol=1e-3)


def test_float16_with_the_optimizer_state_in_host_memory_updates_and_skips_alike():
  results = []
  for offload in (False, True):
    run = _run('float16', offload=offload)
    state, _, _ = _train(run, 3)
    opt_state = _host(state.opt_state)
    state, _ = run.step(_with_scale(state, OVERFLOW), _batch(3))
    kinds = {x.sharding.memory_kind for x in jax.tree.leaves(state.opt_state)}
    assert kinds == ({'pinned_host'} if offload else {'device'})
    _assert_bitwise_equal(_host(state.opt_state), opt_state)
    results.append(_host(state.params))
  for a, b in zip(*(jax.tree.leaves(r) for r in results)):
    np.testing.assert_allclose(a, b, rtol=1e-6)


# --- the loop's checks, the config, attention, the estimate ---------------------------

def test_a_skipped_step_goes_on_unless_the_scale_is_at_its_minimum():
  nan, inf = float('nan'), float('inf')
  skipped = {'loss': 2.5, 'grad_norm': inf, 'skipped': 1.0, 'loss_scale': 4.0}
  loop._check_finite(7, skipped, min_scale=1.0)  # goes on
  assert loop._skipped(7, skipped, 1.0)
  for metrics in ({**skipped, 'loss_scale': 1.0}, {**skipped, 'loss': nan, 'loss_scale': 1.0}):
    with pytest.raises(loop.TrainingDiverged) as e:
      loop._check_finite(7, metrics, min_scale=1.0)
    assert 'step 7' in str(e.value) and 'train.loss_scale_min=1' in str(e.value)
    assert '--config.dtype=bfloat16' in str(e.value)
  assert not loop._skipped(7, {**skipped, 'skipped': 0.0}, 1.0)
  with pytest.raises(loop.TrainingDiverged, match='The training loss is nan at step 7'):
    loop._check_finite(7, {'loss': nan, 'grad_norm': 1.0})  # float32: as before


@pytest.mark.parametrize('fields,message', [
    ({'param_dtype': 'bfloat16'}, 'float32 master parameters'),
    ({'train.loss_scale_factor': 1.0}, 'train.loss_scale_factor=1.0 must be above 1'),
    ({'train.loss_scale_min': 4.0, 'train.loss_scale_init': 2.0}, 'train.loss_scale_min=4.0'),
    ({'train.loss_scale_growth_interval': 0}, 'train.loss_scale_growth_interval=0 must be'),
])
def test_float16_config_mistakes_fail_at_start_up(fields, message):
  config = default.get_config()
  config.dtype = 'float16'
  config_checks.validate(config)
  for dotted, value in fields.items():
    *parents, leaf = dotted.split('.')
    node = config
    for name in parents:
      node = node[name]
    node[leaf] = value
  with pytest.raises(config_checks.ConfigError, match=message):
    config_checks.validate(config)


def test_float16_attention_matches_float32():
  """Grouped-query heads, two documents in a row, a causal mask and a bias."""
  rng = np.random.default_rng(0)
  B, T, N, G, K = 2, 8, 4, 2, 16
  q, k, v = (rng.standard_normal(s).astype(np.float32)
             for s in ((B, T, N, K), (B, T, G, K), (B, T, G, K)))
  segments = np.asarray([[1] * 5 + [2] * 3, [1] * 8])
  bias = rng.standard_normal((1, N, T, T)).astype(np.float32)
  half = lambda x: jnp.asarray(x, jnp.float16)

  @jax.jit  # one program, not dozens of single operations each compiled
  def attention(q, k, v, bias, segments):
    mask = layers.attention_mask(segments, segments, True)
    expected = jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask.dense_B1TS, scale=0.25)
    return expected, layers.dot_product_attention(half(q), half(k), half(v), mask, half(bias),
                                                  'xla', 0.25)
  expected, out = attention(q, k, v, bias, segments)
  assert out.dtype == jnp.float16
  np.testing.assert_allclose(np.asarray(out, np.float32), expected, atol=5e-3)


def test_estimate_shows_float16_beside_float32_bfloat16_and_int8():
  from scaling import estimate
  config = default.get_config()
  config.model.update(num_layers=2, num_heads=4, d_model=128, d_ff=512, max_len=64,
                      vocab_size=VOCAB)  # activations, not the logits, set the peak
  config.data.update(seq_len=64, batch_size=8)
  result = estimate.estimate(config, platform='cpu')
  rows = result['by_precision']
  assert list(rows) == ['float32', 'bfloat16', 'float16', 'int8']
  n = result['params']
  assert [rows[p]['served_weights'] for p in ('float32', 'bfloat16', 'float16')] == [
      4 * n, 2 * n, 2 * n]
  assert rows['int8']['served_weights'] < 2 * n and 'training' not in rows['int8']
  for precision in ('bfloat16', 'float16'):  # float32 master weights, 16-bit activations
    assert rows[precision]['weights'] == rows['float32']['weights'] == 4 * n
    assert rows[precision]['adam_moments'] == 8 * n
    assert rows[precision]['activations'] < rows['float32']['activations']
  assert rows['float32']['training'] == result['memory_bytes']
  assert 'float16' in estimate.report(result)


# --- slow tier: a float16 run through main.py ----------------------------------------

def _float16_command(corpus, cache, workdir):
  from test_faults import _main_command
  # Scale from 2**18, doubling every 2 good steps: it overflows within the run, so the
  # run skips steps and the scale moves both ways.
  return _main_command(corpus, cache, workdir) + [
      '--config.dtype=float16', '--config.train.loss_scale_init=262144.0',
      '--config.train.loss_scale_growth_interval=2']


def _saved_state(workdir):
  import orbax.checkpoint as ocp
  manager = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'))
  step = manager.latest_step()
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  return step, restored['state']


@pytest.fixture(scope='module')
def float16_run(tiny_corpus, tmp_path_factory):
  """An uninterrupted float16 run of `python main.py` (24 steps, logged each step)."""
  from test_faults import _run_until
  tmp = tmp_path_factory.mktemp('float16')
  cache, workdir = str(tmp / 'data_cache'), str(tmp / 'straight')
  _run_until(_float16_command(tiny_corpus, cache, workdir))
  return tiny_corpus, cache, workdir


def _rows(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


@pytest.mark.slow
def test_float16_run_skips_overflows_logs_the_scale_and_resumes_bitwise_after_kill_9(
    float16_run, tmp_path):
  from test_faults import KILL_STEPS, _assert_trees_equal, _run_until, _started_at
  corpus, cache, straight = float16_run
  rows = _rows(straight)
  assert [r['step'] for r in rows if 'loss' in r] == list(range(1, KILL_STEPS + 1))
  assert all('loss_scale' in r and 'skipped_steps' in r for r in rows if 'loss' in r)
  assert rows[-1]['skipped_steps'] >= 1  # overflows were skipped, and the run went on
  scales = [r['loss_scale'] for r in rows if 'loss' in r]
  assert max(scales) > 262144.0 and min(scales) < max(scales)

  workdir = str(tmp_path / 'killed')
  command = _float16_command(corpus, cache, workdir)
  for kill_when in (lambda l: f'step 8/{KILL_STEPS} |' in l,  # after a step
                    lambda l: 'Saving checkpoint at step 15 ' in l):  # a save in flight
    _, killed = _run_until(command, kill_when, delay_s=0.01)
    assert killed
  lines, killed = _run_until(command)
  assert not killed and _started_at(lines)[0] is not None  # resumed from a checkpoint
  (step_a, state_a), (step_b, state_b) = _saved_state(straight), _saved_state(workdir)
  assert step_a == step_b == KILL_STEPS
  _assert_trees_equal(state_a, state_b)  # params, AdamW moments and the loss scale
  assert set(state_b['loss_scale']) == {'scale', 'good_steps', 'skipped_steps'}
  assert _rows(workdir)[-1] == {**rows[-1], 'tokens_per_s': _rows(workdir)[-1]['tokens_per_s'],
                                'mfu': _rows(workdir)[-1]['mfu']}


@pytest.mark.slow
def test_persistent_overflow_halves_the_scale_to_its_minimum_and_then_stops(config, tmp_path):
  """Every step overflows: four skips halve 2**44 to the minimum 2**40, the skip there
  stops the run with one message, and the skipped (intact) states were checkpointed."""
  config.dtype = 'float16'
  config.train.update(steps=20, log_every=1, checkpoint_every=2, eval_every=1000,
                      loss_scale_init=2.0**44, loss_scale_min=2.0**40)
  workdir = str(tmp_path / 'run')
  with pytest.raises(loop.TrainingDiverged) as e:
    loop.train_and_evaluate(config, workdir)
  message = str(e.value)
  assert 'The float16 gradients overflow at step 5' in message, message
  assert 'train.loss_scale_min=1.09951e+12' in message and 'last good checkpoint is step 4' in message
  rows = _rows(workdir)
  assert [(r['step'], r['loss_scale'], r['skipped_steps']) for r in rows] == [
      (s, 2.0**(45 - s), s) for s in range(1, 6)]


@pytest.mark.slow
def test_eval_and_sample_run_in_float16_from_the_command_line(float16_run, tmp_path):
  """The run's dtype is overridable for eval and sample (--config=configs/default.py
  --config.dtype=...); float16 and float32 evaluation agree within 1e-3 nats."""
  _, _, workdir = float16_run
  def main(*args):
    out = subprocess.run([sys.executable, 'main.py', f'--workdir={workdir}', *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()
  evaluated = {dtype: json.loads(main('--mode=eval', '--json', '--config=configs/default.py',
                                      f'--config.dtype={dtype}')[-1])
               for dtype in ('float16', 'float32')}
  assert evaluated['float16']['step'] == evaluated['float32']['step']
  assert abs(evaluated['float16']['eval_loss'] - evaluated['float32']['eval_loss']) < 1e-3
  for args in (['--config=configs/default.py', '--config.dtype=float16'], ['--dtype=float16']):
    lines = main('--mode=sample', '--prompt=The cat', '--max_new_tokens=6', '--greedy', *args)
    assert len(lines) == 1 and lines[0].startswith('The cat') and len(lines[0]) > len('The cat')


@pytest.mark.slow
def test_float16_on_a_mesh_trains_like_one_device_with_a_replicated_scale():
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu',
         'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
  out = subprocess.run([sys.executable, os.path.join(ROOT, 'tests', 'float16_mesh_check.py')],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  results = json.loads(out.stdout.strip().splitlines()[-1])
  one, mesh = results['(1, 1, 1)'], results['(2, 2, 2)']
  np.testing.assert_allclose(mesh['losses'], one['losses'], rtol=1e-3)
  assert mesh['scale_sharding'] == 'replicated' and mesh['params_sharded']
  for run in (one, mesh):
    assert run['skipped_steps'] == 1 and run['params_unchanged_by_the_skip']
