"""End-to-end runs: loss falls, outputs exist, eval mode, resume after stop or SIGKILL."""
import json
import os
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def _unigram_entropy_nats(token_ids: np.ndarray) -> float:
  counts = np.bincount(token_ids)
  p = counts[counts > 0] / counts.sum()
  return float(-(p * np.log(p)).sum())


@pytest.mark.slow
def test_training_lowers_loss_below_unigram_and_writes_outputs(config, tmp_path):
  workdir = str(tmp_path / 'run')
  last = loop.train_and_evaluate(config, workdir)
  rows = _metrics(workdir)
  assert [r['step'] for r in rows if 'loss' in r] == [20, 40, 60, 80]
  assert rows[-1]['loss'] < rows[0]['loss'] - 1.0
  for key in ('loss', 'lr', 'grad_norm', 'tokens_per_s', 'mfu', 'eval_loss',
              'eval_bits_per_byte', 'eval_accuracy'):
    assert key in rows[-1], key
  from input_pipeline import load_tokenizer
  tokenizer = load_tokenizer(workdir)
  with open(config.data.corpus) as f:
    ids = np.concatenate([tokenizer.encode(json.loads(line)['text']) for line in f])
  assert last['eval_loss'] < _unigram_entropy_nats(ids) - 0.3
  assert os.listdir(os.path.join(workdir, 'tensorboard'))
  assert ocp.CheckpointManager(os.path.join(workdir, 'checkpoints')).latest_step() == 80
  saved = json.load(open(os.path.join(workdir, 'config.json')))
  assert saved['model']['vocab_size'] == 512  # 512 tokenizer pieces, a multiple of 128

  # --mode=eval: the same metrics for the latest checkpoint, as one JSON line.
  out = subprocess.run([sys.executable, 'main.py', '--mode=eval', f'--workdir={workdir}',
                        '--json'], cwd=ROOT, capture_output=True, text=True, check=True)
  lines = out.stdout.strip().splitlines()
  assert len(lines) == 1, out.stdout
  result = json.loads(lines[0])
  assert result['step'] == 80
  np.testing.assert_allclose(result['eval_loss'], last['eval_loss'], rtol=1e-5)

  # Int8 weights of the trained model reproduce its float32 logits. Stated tolerance:
  # mean |difference| under 1% and max under 10% of the logits' standard deviation,
  # and the same most likely token at 95% of positions or more.
  from train import run_config
  from inference.load import load_run
  from inference.quantize import dequantize, quantize_int8
  task, params, tokenizer = load_run(run_config.saved_config(workdir, []), workdir)
  ids = jnp.asarray([tokenizer.encode('The old king sees the river. A dog finds the gate.')])
  batch = {'inputs': ids, 'segment_ids': jnp.ones_like(ids),
           'positions': jnp.arange(ids.shape[1])[None]}
  exact = task.logits(params, batch)
  approx = task.logits(dequantize(quantize_int8(params)), batch)
  spread = float(jnp.std(exact))
  assert float(jnp.mean(jnp.abs(approx - exact))) < 0.01 * spread
  assert float(jnp.max(jnp.abs(approx - exact))) < 0.10 * spread
  assert float(jnp.mean(jnp.argmax(approx, -1) == jnp.argmax(exact, -1))) >= 0.95

  # --mode=sample: the prompt and a greedy continuation, for each prompt of a file.
  prompts = tmp_path / 'prompts.txt'
  prompts.write_text('The cat\nA small bird sees\n')
  out = subprocess.run([sys.executable, 'main.py', '--mode=sample', f'--workdir={workdir}',
                        f'--prompt_file={prompts}', '--max_new_tokens=6', '--greedy'],
                       cwd=ROOT, capture_output=True, text=True, check=True)
  lines = out.stdout.strip().splitlines()
  assert len(lines) == 2 and lines[0].startswith('The cat') and len(lines[0]) > len('The cat')


def _final_params(workdir):
  manager = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'))
  restored = manager.restore(manager.latest_step(),
                             args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  return manager.latest_step(), restored['state']['params']


def _train_command(config, workdir, steps):
  overrides = {
      'data.corpus': config.data.corpus, 'data.cache_dir': config.data.cache_dir,
      'data.seq_len': 32, 'data.batch_size': 8, 'data.eval_fraction': 0.1,
      'data.tokenizer.vocab_size': 512, 'model.num_layers': 2, 'model.num_heads': 2,
      'model.d_model': 32, 'model.d_ff': 64, 'model.max_len': 32, 'model.dropout': 0.1,
      'train.steps': steps, 'train.warmup_steps': 5, 'train.log_every': 5,
      'train.eval_every': 1000, 'train.checkpoint_every': 7,
  }
  return ([sys.executable, 'main.py', '--config=configs/default.py', f'--workdir={workdir}'] +
          [f'--config.{k}={v}' for k, v in overrides.items()])


def _wait_for(predicate, timeout_s=300):
  start = time.time()
  while not predicate():
    assert time.time() - start < timeout_s, 'timed out'
    time.sleep(0.02)


def _has_checkpoint(workdir):
  path = os.path.join(workdir, 'checkpoints')
  return os.path.isdir(path) and any(d.isdigit() for d in os.listdir(path))


@pytest.mark.slow
@pytest.mark.parametrize('how', ['sigterm', 'sigkill'])
def test_interrupted_run_resumes_to_the_same_parameters(config, tmp_path, how):
  """Straight 2N steps == interrupted (SIGTERM: clean save; SIGKILL: lose work since the last
  checkpoint) and restarted, bitwise, with dropout on."""
  steps = 60
  straight = str(tmp_path / 'straight')
  subprocess.run(_train_command(config, straight, steps), cwd=ROOT, check=True,
                 capture_output=True)

  interrupted = str(tmp_path / 'interrupted')
  proc = subprocess.Popen(_train_command(config, interrupted, steps), cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  _wait_for(lambda: _has_checkpoint(interrupted))
  proc.send_signal(signal.SIGTERM if how == 'sigterm' else signal.SIGKILL)
  proc.wait(timeout=120)
  stopped_at, _ = _final_params(interrupted)
  assert stopped_at < steps, 'the run finished before it could be interrupted'
  subprocess.run(_train_command(config, interrupted, steps), cwd=ROOT, check=True,
                 capture_output=True)

  step_a, params_a = _final_params(straight)
  step_b, params_b = _final_params(interrupted)
  assert step_a == step_b == steps
  import jax
  for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  loss_a = [r['loss'] for r in _metrics(straight) if r['step'] == steps]
  loss_b = [r['loss'] for r in _metrics(interrupted) if r['step'] == steps]
  assert loss_a == loss_b[-1:]
