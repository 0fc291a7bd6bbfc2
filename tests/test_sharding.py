"""Meshes and hosts: every mesh trains like one device, parameters and optimizer state
are split as the mesh says, checkpoints move between meshes, and two processes
train like one. Each check runs in fresh processes with simulated CPU devices."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # the end-to-end tier: runs that train, stop and resume

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(devices: int) -> dict:
  return {**os.environ, 'JAX_PLATFORMS': 'cpu',
          # this process's flags (conftest.py's faster compiling), and the devices
          'XLA_FLAGS': f"{os.environ.get('XLA_FLAGS', '')} "
                       f'--xla_force_host_platform_device_count={devices}'}


@pytest.fixture(scope='module')
def mesh_results():
  out = subprocess.run([sys.executable, os.path.join(ROOT, 'tests', 'mesh_check.py')], cwd=ROOT,
                       env=_env(8), capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize('mesh', ['(8, 1, 1)', '(2, 4, 1)', '(2, 2, 2)', '(1, 1, 8)'])
def test_every_mesh_trains_like_one_device(mesh_results, mesh):
  np.testing.assert_allclose(mesh_results[mesh]['losses'], mesh_results['(1, 1, 1)']['losses'],
                             rtol=1e-5)
  data, fsdp, tensor = eval(mesh)
  # Each device holds about 1 / (fsdp x tensor) of the parameters and AdamW moments
  # (norm scales, too small to split over tensor, stay whole).
  assert 1 <= mesh_results[mesh]['state_fraction_per_device'] * fsdp * tensor < 1.1
  (full_up, up), (full_q, q), (full_e, e) = (mesh_results[mesh][k] for k in (
      'up_kernel', 'query_kernel', 'embedding'))
  assert up == [full_up[0], full_up[1] // fsdp, full_up[2] // tensor]  # [layers, embed, mlp]
  assert q == [full_q[0], full_q[1] // fsdp, full_q[2] // tensor, full_q[3]]  # heads split
  assert e == [full_e[0] // tensor, full_e[1] // fsdp]  # [vocab, embed]


def test_splash_attention_on_a_mesh_trains_like_xla_on_one_device(mesh_results):
  splash, xla = mesh_results['splash']['splash on (2, 2, 2)'], mesh_results['splash'][
      'xla on (1, 1, 1)']
  np.testing.assert_allclose(splash['losses'], xla['losses'], rtol=1e-5)
  assert splash['per_device_kernel'] and not xla['per_device_kernel']  # inside shard_map


def test_the_loss_over_chunks_of_the_sequence_on_a_mesh_trains_like_one_device(mesh_results):
  np.testing.assert_allclose(mesh_results['logits chunked on (2, 2, 2)']['losses'],
                             mesh_results['(1, 1, 1)']['losses'], rtol=1e-5)


def test_a_checkpoint_restores_onto_other_meshes(mesh_results):
  expected = mesh_results['sixth step on (2, 2, 2)']
  for mesh, shard in [('(1, 1, 8)', [2, 32, 8]), ('(1, 1, 1)', [2, 32, 64])]:
    restored = mesh_results[f'restored on {mesh}']
    assert restored['step'] == 6 and restored['up_kernel_shard'] == shard
    np.testing.assert_allclose(restored['loss'], expected, rtol=1e-5)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _train_args(config, workdir, steps: int, mesh=(2, 2, 2)):
  overrides = {
      'data.corpus': config.data.corpus, 'data.cache_dir': config.data.cache_dir,
      'data.seq_len': 32, 'data.batch_size': 8, 'data.eval_fraction': 0.1,
      'data.tokenizer.vocab_size': 512, 'model.num_layers': 2, 'model.num_heads': 2,
      'model.d_model': 32, 'model.d_ff': 64, 'model.max_len': 32, 'train.steps': steps,
      'train.warmup_steps': 2, 'train.log_every': 5, 'train.eval_every': 5,
      'train.eval_steps': 2, 'train.checkpoint_every': 5,
      'mesh.data': mesh[0], 'mesh.fsdp': mesh[1], 'mesh.tensor': mesh[2]}
  return [sys.executable, 'main.py', '--config=configs/gpt_tiny.py', f'--workdir={workdir}',
          *[f'--config.{k}={v}' for k, v in overrides.items()]]


def _losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return {row['step']: row['loss'] for row in map(json.loads, f) if 'loss' in row}


def _run_two_processes(args: list[str]) -> list[str]:
  """Runs `args` as processes 0 and 1 of one job, 4 CPU devices each; their stderr."""
  port = _free_port()
  processes = [subprocess.Popen(
      args + [f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
              f'--process_id={i}'],
      cwd=ROOT, env=_env(4), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  errors = []
  for p in processes:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    errors.append(err)
  return errors


def test_two_processes_train_like_one_and_their_checkpoint_resumes_on_one_device(
    config, tmp_path):
  two, one = str(tmp_path / 'two'), str(tmp_path / 'one')
  # Train the tokenizer once, before processes race to build the cache.
  subprocess.run(_train_args(config, one, 10), cwd=ROOT, env=_env(8), check=True,
                 capture_output=True)
  _run_two_processes(_train_args(config, two, 10))
  losses_two, losses_one = _losses(two), _losses(one)
  assert sorted(losses_two) == [5, 10]
  for step in losses_one:
    np.testing.assert_allclose(losses_two[step], losses_one[step], rtol=1e-5)

  # A hybrid mesh, each process one slice: the data axis crosses between processes
  # (as it crosses the data-centre network between TPU slices or GPU hosts).
  hybrid = str(tmp_path / 'hybrid')
  for err in _run_two_processes(_train_args(config, hybrid, 10) + ['--config.mesh.num_slices=2']):
    assert 'Hybrid mesh over 2 slices; the processes of each data index: [[0], [1]]' in err
  losses_hybrid = _losses(hybrid)
  for step in losses_one:
    np.testing.assert_allclose(losses_hybrid[step], losses_one[step], rtol=1e-5)

  # The 8-device checkpoint of the two processes restores on one device and trains on.
  subprocess.run(_train_args(config, two, 15, mesh=(-1, 1, 1)), cwd=ROOT, env=_env(1),
                 check=True, capture_output=True)
  assert sorted(_losses(two)) == [5, 10, 15]


def test_sigterm_to_one_process_stops_every_process_at_the_same_step(config, tmp_path):
  workdir = str(tmp_path / 'preempted')
  args = _train_args(config, workdir, 5000) + ['--config.train.log_every=20',
                                                '--config.train.checkpoint_every=5000']
  port, logs = _free_port(), [tmp_path / f'process_{i}.log' for i in range(2)]
  processes = [subprocess.Popen(
      args + [f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
              f'--process_id={i}'], cwd=ROOT, env=_env(4), stdout=subprocess.DEVNULL,
      stderr=open(logs[i], 'w')) for i in range(2)]
  deadline = time.time() + 300
  while 'step 20/' not in logs[0].read_text() and time.time() < deadline:
    time.sleep(0.5)
  processes[1].send_signal(signal.SIGTERM)  # as a TPU maintenance event or scancel would
  for p in processes:
    assert p.wait(timeout=300) == 0
  stopped = [re.findall(r'Stopped at step (\d+)', log.read_text()) for log in logs]
  assert stopped[0] == stopped[1] and len(stopped[0]) == 1, stopped
  step = int(stopped[0][0])
  assert 20 <= step < 5000
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == [str(step)]
