"""Training throughput of one config on random tokens: one JSON line.

python -m benchmarks.train_step --config=configs/bench_cpu.py --json

Reports tokens/s, step time, MFU, compile time and, on CPU, the float32 matmul
rate measured in the same process (the practical peak MFU is taken against).
"""
import json
import time

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

import tasks
from models import padded_vocab_size
from train import config_checks, flops, optimizer, sharding, state as state_lib, steps

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/bench_cpu.py', 'Config file.',
                                          lock_config=True)
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps (after one warm-up step).')
_JSON = flags.DEFINE_bool('json', False, 'Print only the JSON line on stdout.')


def random_batch(task, rng: np.random.Generator, batch_size: int, seq_len: int, vocab: int):
  """A batch of the task's training shapes: random token ids, one document per row."""
  batch = {k: np.asarray(v) for k, v in task.train_batch(batch_size, seq_len).items()}
  for name in batch:
    if name.endswith('inputs') or name == 'targets':
      batch[name] = rng.integers(0, vocab, size=batch[name].shape, dtype=np.int32)
  return batch


def measure(config) -> dict:
  config_checks.validate(config)
  mesh = sharding.make_mesh(config.mesh)
  config_checks.validate_against_mesh(config, dict(mesh.shape))
  vocab = config.model.vocab_size or padded_vocab_size(config.data.tokenizer.vocab_size)
  cfg = tasks.model_config(config, vocab,
                           config_checks.compute_dtype(config, jax.default_backend()))
  task = tasks.from_config(config, cfg)
  tx = optimizer.make_optimizer(config.train)
  _, shardings = state_lib.state_shardings(task, tx, mesh, config.data.seq_len)
  state = state_lib.create_train_state(task, tx, mesh, config.data.seq_len,
                                       jax.random.key(config.seed))
  step = steps.jit_train_step(task, tx, optimizer.learning_rate_schedule(config.train),
                              config.train.grad_accum, jax.random.key(1), mesh, shardings)
  rng = np.random.default_rng(0)
  batches = [sharding.global_batch(random_batch(task, rng, config.data.batch_size,
                                                config.data.seq_len, vocab), mesh)
             for _ in range(2)]

  start = time.perf_counter()
  compiled = step.lower(state, batches[0]).compile()
  compile_s = time.perf_counter() - start
  state, metrics = compiled(state, batches[0])  # warm-up
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for i in range(_STEPS.value):
    state, metrics = compiled(state, batches[i % 2])
  jax.block_until_ready((state, metrics))
  step_s = (time.perf_counter() - start) / _STEPS.value

  tokens_per_step = config.data.batch_size * config.data.seq_len
  flops_per_token = (task.train_flops_per_step(state.params, config.data.batch_size,
                                               config.data.seq_len) / tokens_per_step)
  peak = flops.peak_flops_per_device(cfg.dtype) * mesh.size
  tokens_per_s = tokens_per_step / step_s
  result = {
      'benchmark': 'train_step', 'backend': jax.default_backend(),
      'device': jax.devices()[0].device_kind, 'devices': mesh.size,
      'dtype': jax.numpy.dtype(cfg.dtype).name, 'params': state_lib.count_params(state.params),
      'flops_per_token': flops_per_token, 'batch_size': config.data.batch_size,
      'seq_len': config.data.seq_len, 'tokens_per_s': tokens_per_s, 'step_s': step_s,
      'compile_s': compile_s, 'mfu': tokens_per_s * flops_per_token / peak,
      'peak_flops': peak, 'loss': float(metrics['loss']),
  }
  if jax.default_backend() == 'cpu':
    result['cpu_matmul_flops'] = peak
  return result


def main(argv):
  del argv
  result = measure(_CONFIG.value)
  if not _JSON.value:
    logging.info('%s', result)
  print(json.dumps(result), flush=True)


if __name__ == '__main__':
  app.run(main)
