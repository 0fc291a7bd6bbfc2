"""Faults a run survives (issue 12): a damaged latest checkpoint, a full disk during a
save, NaN/inf in training, and kill -9 at any moment.

Fast tier: train/checkpointing.py alone on a small TrainState (seconds). Slow tier: the
same faults through train_and_evaluate in-process, and kill -9 of `python main.py`.
"""
import errno
import gc
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from orbax.checkpoint._src.path import async_path

from train import checkpointing, loop
from train.state import TrainState

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Orbax coroutines abandoned by a failed restore or save (see _collect_abandoned_io).
pytestmark = pytest.mark.filterwarnings('ignore:coroutine .* was never awaited:RuntimeWarning')


# --- helpers ------------------------------------------------------------------------

@pytest.fixture(scope='module', autouse=True)
def _only_new_objects_to_collect():
  """What the session holds when this module starts stays (after one collection of its
  garbage), so the collection after each test walks only what the tests made."""
  gc.collect()
  gc.freeze()


@pytest.fixture(autouse=True)
def _collect_abandoned_io():
  """A failed restore or save leaves Orbax coroutines that were never awaited; they are
  collected here, quietly, rather than in whichever test the garbage collector picks."""
  yield
  with warnings.catch_warnings():
    warnings.filterwarnings('ignore', 'coroutine .* was never awaited', RuntimeWarning)
    gc.collect()


def _state(step: int) -> TrainState:
  """A small TrainState after one AdamW update (moments differ from the params)."""
  rng = np.random.default_rng(step)
  params = {'embed': jnp.asarray(rng.standard_normal((16, 8), np.float32)),
            'dense': {'kernel': jnp.asarray(rng.standard_normal((8, 4), np.float32)),
                      'bias': jnp.asarray(rng.standard_normal((4,)), jnp.bfloat16)}}
  tx = optax.adamw(1e-2)
  grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.5, p.dtype), params)
  _, opt_state = tx.update(grads, tx.init(params), params)
  return TrainState(step=jnp.asarray(step, jnp.int32), params=params, opt_state=opt_state)


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.atleast_1d(np.asarray(x)), np.atleast_1d(np.asarray(y))
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(x.view(np.uint8), y.view(np.uint8))  # bitwise


def _save_steps(workdir, steps, keep=3):
  manager = checkpointing.make_manager(str(workdir), keep=keep)
  for step in steps:
    checkpointing.save(manager, step, _state(step), {'epoch': 0, 'position': step})
  manager.wait_until_finished()
  manager.close()


def _files(path):
  return sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)


def _damage(step_dir: str, how: str) -> None:
  """files_deleted: the array data of the 'state' item is gone; bytes_cut: every file of
  the 'state' item keeps only its first half (a write cut short)."""
  files = _files(os.path.join(step_dir, 'state'))
  assert files
  for f in files:
    if how == 'files_deleted':
      if f'{os.sep}d{os.sep}' in f:
        os.remove(f)
    else:
      os.truncate(f, os.path.getsize(f) // 2)


def _messages(caplog, level=logging.WARNING):
  return [r.getMessage() for r in caplog.records if r.levelno >= level]


class _DiskFull:
  """Every Orbax file write under a checkpoint of step >= from_step raises ENOSPC, in the
  background thread that writes it (what a full disk does to an asynchronous save)."""

  def __init__(self, monkeypatch, from_step: int):
    self.from_step, self.hits = from_step, 0
    original = async_path.write_text

    async def write_text(path, text):
      match = re.search(r'(\d+)\.orbax-checkpoint-tmp', str(path))
      if self.from_step is not None and match and int(match.group(1)) >= self.from_step:
        self.hits += 1
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
      return await original(path, text)
    monkeypatch.setattr(async_path, 'write_text', write_text)


# --- fast tier: checkpointing alone ---------------------------------------------------

@pytest.mark.parametrize('how', ['files_deleted', 'bytes_cut'])
def test_damaged_latest_checkpoint_is_moved_aside_and_the_newest_readable_restores(
    tmp_path, caplog, how):
  _save_steps(tmp_path, [1, 2, 3])
  _damage(str(tmp_path / 'checkpoints' / '3'), how)
  before = _files(tmp_path / 'checkpoints' / '3')

  manager = checkpointing.make_manager(str(tmp_path), keep=3)
  assert manager.all_steps() == [1, 2, 3]
  with caplog.at_level(logging.WARNING):
    state, data = checkpointing.restore_latest(manager, _abstract(_state(3)))
  _assert_trees_equal(state, _state(2))
  assert data == {'epoch': 0, 'position': 2}

  # Moved, never deleted: every file that was left is there, where the warning says.
  aside = tmp_path / 'checkpoints_corrupt' / '3'
  assert [f.replace(str(aside), str(tmp_path / 'checkpoints' / '3')) for f in _files(aside)] == before
  assert not (tmp_path / 'checkpoints' / '3').exists()
  warnings = [m for m in _messages(caplog) if str(aside) in m]
  assert len(warnings) == 1 and 'step 3' in warnings[0] and 'step 2' in warnings[0], warnings

  # The manager forgot step 3: it saves step 3 again, and keep=3 collects only real steps.
  assert manager.all_steps() == [1, 2]
  checkpointing.save(manager, 3, _state(30), None)
  checkpointing.save(manager, 4, _state(4), None)
  checkpointing.finish(manager)
  manager = checkpointing.make_manager(str(tmp_path), keep=3)
  assert manager.all_steps() == [2, 3, 4]
  state, _ = checkpointing.restore_latest(manager, _abstract(_state(4)), with_data=False)
  _assert_trees_equal(state, _state(4))
  assert _files(aside) and os.listdir(tmp_path / 'checkpoints_corrupt') == ['3']

  # A second damaged step 3 goes beside the first one, not over it.
  _damage(str(tmp_path / 'checkpoints' / '4'), how)
  _damage(str(tmp_path / 'checkpoints' / '3'), how)
  state, _ = checkpointing.restore_latest(manager, _abstract(_state(4)), with_data=False)
  _assert_trees_equal(state, _state(2))
  assert sorted(os.listdir(tmp_path / 'checkpoints_corrupt')) == ['3', '3.1', '4']


def test_a_later_step_without_its_data_state_is_damaged_not_a_fresh_start(tmp_path):
  """Only an imported step 0 may lack the input pipeline's position; at a later step the
  missing item is damage, or the run would silently replay data it had already seen."""
  _save_steps(tmp_path, [1, 2])
  shutil.rmtree(tmp_path / 'checkpoints' / '2' / 'data')
  manager = checkpointing.make_manager(str(tmp_path), keep=3)
  state, data = checkpointing.restore_latest(manager, _abstract(_state(2)))
  _assert_trees_equal(state, _state(1))
  assert data == {'epoch': 0, 'position': 1}
  assert (tmp_path / 'checkpoints_corrupt' / '2').exists()
  checkpointing.finish(manager)


def test_nothing_is_moved_when_no_checkpoint_restores(tmp_path):
  """A model of another shape (a changed config), or damage to every step: an error that
  says so, and every checkpoint stays where it is."""
  _save_steps(tmp_path, [1, 2])
  other_shape = _abstract(_state(2).replace(params={'embed': jnp.zeros((3, 3))}))
  manager = checkpointing.make_manager(str(tmp_path), keep=3)
  with pytest.raises(Exception, match='steps 2, 1') as e:
    checkpointing.restore_latest(manager, other_shape)
  assert 'config changed' in str(e.value)
  assert isinstance(e.value, checkpointing.CheckpointRestoreError)
  _damage(str(tmp_path / 'checkpoints' / '1'), 'bytes_cut')
  _damage(str(tmp_path / 'checkpoints' / '2'), 'files_deleted')
  with pytest.raises(Exception, match='could be restored'):
    checkpointing.restore_latest(manager, _abstract(_state(2)))
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['1', '2']
  assert not (tmp_path / 'checkpoints_corrupt').exists()


@pytest.mark.parametrize('surfaces_at', ['next_save', 'final_wait'])
def test_disk_full_during_a_background_save_stops_with_one_message(
    tmp_path, monkeypatch, caplog, surfaces_at):
  disk = _DiskFull(monkeypatch, from_step=2)
  manager = checkpointing.make_manager(str(tmp_path), keep=2)
  checkpointing.save(manager, 1, _state(1), {'position': 1})
  checkpointing.save(manager, 2, _state(2), {'position': 2})  # fails later, in the background
  with caplog.at_level(logging.ERROR), pytest.raises(Exception) as e:
    if surfaces_at == 'next_save':
      checkpointing.save(manager, 3, _state(3), {'position': 3})
    else:
      checkpointing.finish(manager)
  assert disk.hits
  message = str(e.value)
  good = tmp_path / 'checkpoints' / '1'
  for part in ('step 2', 'the disk is full', 'No space left on device',
               f'The last good checkpoint is step 1 at {good}',
               'Free some disk space, then rerun the same command'):
    assert part in message, message
  assert isinstance(e.value, checkpointing.CheckpointSaveError)
  assert (e.value.step, e.value.last_good_step, e.value.disk_full) == (2, 1, True)
  # One message: no chained background traceback, and Orbax's log records keep one line.
  assert e.value.__cause__ is None and e.value.__suppress_context__
  assert not [r for r in caplog.records if r.exc_info and 'orbax' in r.pathname], [
      r.getMessage() for r in caplog.records]
  checkpointing.finish(manager)  # reported once: closing does not raise it again

  # The previous checkpoint is intact and restores.
  monkeypatch.undo()
  manager = checkpointing.make_manager(str(tmp_path), keep=2)
  assert manager.all_steps() == [1]
  state, data = checkpointing.restore_latest(manager, _abstract(_state(1)))
  _assert_trees_equal(state, _state(1))
  assert data == {'position': 1}


def test_last_good_checkpoint_names_the_step_and_path_or_says_there_is_none(tmp_path):
  manager = checkpointing.make_manager(str(tmp_path), keep=2)
  assert checkpointing.last_good_checkpoint(manager) == (
      f'There is no checkpoint in {tmp_path / "checkpoints"}.')
  checkpointing.save(manager, 4, _state(4), None)  # still in flight: waited for
  assert checkpointing.last_good_checkpoint(manager) == (
      f'The last good checkpoint is step 4 at {tmp_path / "checkpoints" / "4"}.')
  checkpointing.finish(manager)


# --- slow tier: through train_and_evaluate ---------------------------------------------

STEPS = 8


def _loop_config(tiny_corpus, cache_dir):
  from conftest import tiny_config
  config = tiny_config(tiny_corpus, cache_dir)
  config.train.update(steps=STEPS, checkpoint_every=2, keep_checkpoints=3, log_every=1,
                      eval_every=1000, eval_steps=1)
  return config


def _rows(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def _saved_params(workdir, step=None):
  manager = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'))
  step = manager.latest_step() if step is None else step
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  return step, restored['state']['params']


@pytest.fixture(scope='module')
def baseline(tiny_corpus, tmp_path_factory):
  """An uninterrupted run: its workdir, per-step training metrics and final params."""
  config = _loop_config(tiny_corpus, str(tmp_path_factory.getbasetemp() / 'data_cache'))
  workdir = str(tmp_path_factory.mktemp('faults') / 'baseline')
  loop.train_and_evaluate(config, workdir)
  losses = {r['step']: (r['loss'], r['grad_norm']) for r in _rows(workdir) if 'loss' in r}
  assert sorted(losses) == list(range(1, STEPS + 1))
  return config, workdir, losses, _saved_params(workdir)


def _assert_same_training(workdir, baseline, from_step):
  """Steps after from_step logged the baseline's losses (the rerun's rows come last) and
  the final checkpoint holds the baseline's params, bit for bit."""
  _, _, losses, (final_step, final_params) = baseline
  rerun = {r['step']: (r['loss'], r['grad_norm']) for r in _rows(workdir) if 'loss' in r}
  for step in range(from_step + 1, STEPS + 1):
    assert rerun[step] == losses[step], step
  step, params = _saved_params(workdir)
  assert step == final_step == STEPS
  _assert_trees_equal(params, final_params)


@pytest.mark.slow
def test_run_resumes_past_a_damaged_latest_checkpoint_with_the_same_losses(
    baseline, tmp_path, caplog):
  config, straight, _, _ = baseline
  workdir = str(tmp_path / 'run')
  shutil.copytree(straight, workdir)
  os.remove(os.path.join(workdir, 'metrics.jsonl'))
  _damage(os.path.join(workdir, 'checkpoints', str(STEPS)), 'bytes_cut')
  with caplog.at_level(logging.INFO):
    loop.train_and_evaluate(config, workdir)
  aside = os.path.join(workdir, 'checkpoints_corrupt', str(STEPS))
  assert _files(aside)
  assert any(aside in m and f'step {STEPS}' in m for m in _messages(caplog)), _messages(caplog)
  assert f'Restored checkpoint at step {STEPS - 2}.' in _messages(caplog, logging.INFO)
  assert [r['step'] for r in _rows(workdir) if 'loss' in r] == [STEPS - 1, STEPS]
  _assert_same_training(workdir, baseline, STEPS - 2)


@pytest.mark.slow
def test_full_disk_stops_the_run_with_one_message_and_a_rerun_resumes(
    baseline, tmp_path, monkeypatch, caplog):
  config, _, _, _ = baseline
  workdir = str(tmp_path / 'run')
  _DiskFull(monkeypatch, from_step=4)  # the save of step 4 fails in the background
  with pytest.raises(Exception) as e:
    loop.train_and_evaluate(config, workdir)
  message = str(e.value)
  good = os.path.join(workdir, 'checkpoints', '2')
  for part in ('step 4', 'the disk is full', f'The last good checkpoint is step 2 at {good}',
               'Free some disk space, then rerun the same command'):
    assert part in message, message
  assert isinstance(e.value, checkpointing.CheckpointSaveError)
  assert e.value.__cause__ is None and e.value.__suppress_context__

  monkeypatch.undo()  # space freed: the same command resumes from step 2
  with caplog.at_level(logging.INFO):
    loop.train_and_evaluate(config, workdir)
  assert 'Restored checkpoint at step 2.' in _messages(caplog, logging.INFO)
  _assert_same_training(workdir, baseline, 2)


class _Poison:
  """Multiplies the updated params by NaN or inf at step k, and that step's loss (as a
  NaN/inf loss on its batch would do) or only its gradient norm (as NaN/inf gradients of
  a finite loss would do), through the real jitted step of the loop."""

  def __init__(self, monkeypatch, step: int, value: float, target: str):
    original = loop.steps_lib.jit_train_step

    def jit_train_step(*args, **kwargs):
      train_step = original(*args, **kwargs)

      def poisoned(state, batch):
        new_state, metrics = train_step(state, batch)
        if int(new_state.step) == step:
          bad = jnp.float32(value)
          new_state = new_state.replace(params=jax.tree.map(lambda p: p * bad, new_state.params))
          key = 'loss' if target == 'loss' else 'grad_norm'
          metrics = {**metrics, key: metrics[key] * bad}
        return new_state, metrics
      return poisoned
    monkeypatch.setattr(loop.steps_lib, 'jit_train_step', jit_train_step)


@pytest.mark.slow
@pytest.mark.parametrize('step,value,target', [(5, float('nan'), 'loss'),
                                               (6, float('inf'), 'grads'),
                                               (1, float('nan'), 'loss')])
def test_nan_or_inf_at_step_k_stops_and_no_checkpoint_of_it_exists(
    baseline, tmp_path, monkeypatch, step, value, target):
  config = baseline[0].copy_and_resolve_references()
  config.train.log_every = 4  # NaN/inf is caught at its own step, logged or not
  workdir = str(tmp_path / 'run')
  _Poison(monkeypatch, step, value, target)
  with pytest.raises(loop.TrainingDiverged) as e:
    loop.train_and_evaluate(config, workdir)
  message = str(e.value)
  assert f'is {value} at step {step};' in message, message
  assert 'No checkpoint of the diverged state was written' in message, message
  good = (step - 1) // 2 * 2  # checkpoint_every=2
  saved = sorted(int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints')) if d.isdigit())
  if good:
    assert f'The last good checkpoint is step {good} at ' \
           f'{os.path.join(workdir, "checkpoints", str(good))}.' in message, message
    assert saved and max(saved) == good
    for s in saved:
      params = _saved_params(workdir, s)[1]
      assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(params))
  else:
    assert f'There is no checkpoint in {os.path.join(workdir, "checkpoints")}.' in message
    assert saved == []


# --- slow tier: kill -9 of `python main.py` at pseudo-random moments -------------------

KILL_STEPS = 24


def _main_command(corpus, cache_dir, workdir):
  overrides = {
      'data.corpus': corpus, 'data.cache_dir': cache_dir, 'data.seq_len': 32,
      'data.batch_size': 8, 'data.eval_fraction': 0.1, 'data.tokenizer.vocab_size': 512,
      'model.num_layers': 2, 'model.num_heads': 2, 'model.d_model': 32, 'model.d_ff': 64,
      'model.max_len': 32, 'model.dropout': 0.1, 'train.steps': KILL_STEPS,
      'train.warmup_steps': 5, 'train.log_every': 1, 'train.eval_every': 1000,
      'train.eval_steps': 1, 'train.checkpoint_every': 3, 'train.keep_checkpoints': 2,
  }
  return ([sys.executable, 'main.py', '--config=configs/default.py', f'--workdir={workdir}'] +
          [f'--config.{k}={v}' for k, v in overrides.items()])


# Every compiled program goes to the run's persistent cache (main.py puts it beside the
# workdir), so that restarts skip compilation; the results are the same programs.
_ENV = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0'}


def _complete_steps(workdir):
  path = os.path.join(workdir, 'checkpoints')
  return sorted(int(d) for d in os.listdir(path) if d.isdigit()) if os.path.isdir(path) else []


def _run_until(command, kill_when=None, delay_s=0.0):
  """Runs command, reading its log; SIGKILLs it delay_s after the first line for which
  kill_when(line) holds. Returns (log lines, killed)."""
  proc = subprocess.Popen(command, cwd=ROOT, env=_ENV, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, bufsize=1)
  lines = []
  try:
    for line in proc.stderr:
      lines.append(line)
      if kill_when is not None and kill_when(line):
        time.sleep(delay_s)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        return lines, True
    assert proc.wait(timeout=300) == 0, ''.join(lines[-40:])
    return lines, False
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()


def _started_at(lines):
  """(step restored from or None, first step trained) from a run's log."""
  text = ''.join(lines)
  restored = re.search(r'Restored checkpoint at step (\d+)\.', text)
  start = re.search(r'training steps (\d+)\.\.', text)
  assert start, text[-3000:]
  return (int(restored.group(1)) if restored else None), int(start.group(1))


@pytest.mark.slow
def test_kill_9_at_random_moments_resumes_to_the_same_parameters(tiny_corpus, tmp_path):
  """SIGKILL 5 times at pseudo-random steps spread over the run (checkpoint_every=3):
  3 times shortly after a step's log line, twice right after 'Saving checkpoint' (the
  background save in flight); each restart resumes from the newest complete checkpoint
  and the last one ends with the uninterrupted run's parameters, bit for bit."""
  cache = str(tmp_path / 'data_cache')
  straight = str(tmp_path / 'straight')
  _run_until(_main_command(tiny_corpus, cache, straight))

  workdir = str(tmp_path / 'killed')
  command = _main_command(tiny_corpus, cache, workdir)
  rng = random.Random(7)
  # One kill step at random in each of 1-4, 5-8, ..., 17-20: spread over the run, and a
  # mid-save kill hits a save before the last one (step 24), so no kill comes too late.
  points = [4 * i + rng.randint(1, 4) for i in range(5)]
  moments = ['after_step', 'during_save', 'after_step', 'during_save', 'after_step']
  left_mid_save, resumes = 0, []
  for point, moment in zip(points + [None], moments + ['finish']):
    complete = _complete_steps(workdir)
    resume = complete[-1] if complete else 0
    resumes.append(resume)
    if moment == 'finish':
      lines, killed = _run_until(command)
    elif moment == 'during_save':  # SIGKILL the moment a background save has started
      target = -(-max(point, resume + 1) // 3) * 3  # the first save at or after point
      lines, killed = _run_until(command, lambda l, t=target: f'Saving checkpoint at step {t} ' in l)
      left_mid_save += any('orbax-checkpoint-tmp' in d
                           for d in os.listdir(os.path.join(workdir, 'checkpoints')))
    else:  # a few milliseconds after a step
      target = max(point, resume + 1)
      lines, killed = _run_until(
          command, lambda l, t=target: re.search(rf'\bstep {t}/{KILL_STEPS} \|', l) is not None,
          delay_s=rng.uniform(0.0, 0.03))
    assert killed == (moment != 'finish'), (moment, point, resume)
    # Each restart resumes from the newest complete checkpoint on disk.
    restored, start = _started_at(lines)
    assert (restored or 0) == start == resume, (moment, complete, restored, start)
  print(f'kill steps {points}, resumed from {resumes}; {left_mid_save} of 2 kills during a '
        'save left a partial (temporary) checkpoint')
  assert resumes == sorted(resumes) and resumes[-1] > 0

  step_a, params_a = _saved_params(straight)
  step_b, params_b = _saved_params(workdir)
  assert step_a == step_b == KILL_STEPS
  _assert_trees_equal(params_a, params_b)
  loss_a = [r['loss'] for r in _rows(straight) if r['step'] == KILL_STEPS]
  loss_b = [r['loss'] for r in _rows(workdir) if r['step'] == KILL_STEPS]
  assert loss_a == loss_b[-1:]
