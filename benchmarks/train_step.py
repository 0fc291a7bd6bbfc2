"""Training throughput of one config on random tokens: one JSON line.

python -m benchmarks.train_step --config=configs/bench_cpu.py --json [--compare=torch|xla_defaults]

Reports tokens/s, step time, MFU, compile time and, on CPU, the float32 matmul
rate measured in the same process (the practical peak MFU is taken against).

--compare=torch trains the same model, initialised with the same weights, in eager
PyTorch (benchmarks/torch_reference.py: nanoGPT's GPT, AdamW, every core; in a process of
its own with 4 KB pages, where it runs faster than with huge pages) on the same
batch shape for the same number of steps: torch_tokens_per_s, torch_mfu (against the
same FLOPs per token and the same peak), speedup_vs_torch (ours / theirs), and both
first steps' losses (first_loss, torch_first_loss: equal when both run the same model).

--compare=xla_defaults also compiles the step with XLA's default options (without
train/steps.py `train_compiler_options`, which the line names as 'compiler_options') and
times the two in turns, which goes first alternating: each turn one untimed step, then
one timed, each waited for (a step right after the other one can pay for mapping memory
the other's temporaries did not need: an A/B in step-by-step turns read 1.11-1.19x where
blocks of steps read 1.005x, benchmarks/RESULTS.md); xla_defaults_tokens_per_s and
speedup_vs_xla_defaults (ours / theirs, from the mean step times; _median from the
median ones, steadier on a noisy machine). Both states stay in memory. Without it the
timed steps are queued and waited for once, at the end.
"""
import importlib.util
import json
import time

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

import tasks
from benchmarks import Program
from models import kernels, padded_vocab_size
from train import config_checks, flops, optimizer, runtime, sharding, state as state_lib, steps

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/bench_cpu.py', 'Config file.',
                                          lock_config=True)
# allow_override: benchmarks/profile.py imports this and benchmarks/decode.py, and has a
# --steps of its own; decode.py has its own --compare and --json.
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps (after one warm-up step).',
                              allow_override=True)
_COMPARE = flags.DEFINE_enum('compare', 'none', ['none', 'torch', 'xla_defaults'],
                             'torch: also time a PyTorch reference of the same model; '
                             "xla_defaults: the step compiled with XLA's default options.",
                             allow_override=True)
_JSON = flags.DEFINE_bool('json', False, 'Print only the JSON line on stdout.',
                          allow_override=True)


def random_batch(task, rng: np.random.Generator, batch_size: int, seq_len: int, vocab: int):
  """A batch of the task's training shapes: random token ids, one document per row."""
  batch = {k: np.asarray(v) for k, v in task.train_batch(batch_size, seq_len).items()}
  for name in batch:
    if name.endswith('inputs') or name == 'targets':
      batch[name] = rng.integers(0, vocab, size=batch[name].shape, dtype=np.int32)
  return batch


def build(config, xla_default_options: bool = False):
  """(task, compiled train step, initial state, two random batches, compile seconds,
  devices) of `config`, as a run builds them (or with XLA's default compiler options)."""
  config_checks.validate(config)
  mesh = sharding.make_mesh(config.mesh)
  config_checks.validate_against_mesh(config, dict(mesh.shape))
  vocab = config.model.vocab_size or padded_vocab_size(config.data.tokenizer.vocab_size)
  cfg = kernels.resolve_attention(  # the kernel a run picks (train/loop.py)
      tasks.model_config(config, vocab, config_checks.compute_dtype(config, jax.default_backend())),
      config.data.seq_len)
  task = tasks.from_config(config, cfg)
  tx = optimizer.make_optimizer(config.train)
  _, shardings = state_lib.state_shardings(task, tx, mesh, config.data.seq_len)
  state = state_lib.create_train_state(task, tx, mesh, config.data.seq_len,
                                       jax.random.key(config.seed))
  step = steps.jit_train_step(task, tx, optimizer.learning_rate_schedule(config.train),
                              config.train.grad_accum, jax.random.key(1), mesh, shardings,
                              xla_default_options=xla_default_options)
  rng = np.random.default_rng(0)
  batches = [sharding.global_batch(random_batch(task, rng, config.data.batch_size,
                                                config.data.seq_len, vocab), mesh)
             for _ in range(2)]
  start = time.perf_counter()
  compiled = step.lower(state, batches[0]).compile()
  return task, compiled, state, batches, time.perf_counter() - start, mesh.size


def _timed(program: Program) -> tuple[float, object]:
  """(seconds, outputs) of one call, its results waited for."""
  start = time.perf_counter()
  outputs = jax.block_until_ready(program.run())
  return time.perf_counter() - start, outputs


def memory_bytes(compiled) -> dict:
  """The step's scratch memory as XLA planned it ('temp_bytes': activations, logits,
  gradients before the update) and, where the device counts it (GPU, TPU), the peak bytes
  its allocator had in use so far in this process ('device_peak_bytes')."""
  result = {}
  analysis = compiled.memory_analysis()
  if analysis is not None:
    result['temp_bytes'] = int(analysis.temp_size_in_bytes)
  stats = jax.devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    result['device_peak_bytes'] = int(stats['peak_bytes_in_use'])
  return result


def stepping(compiled, state, batches) -> Program:
  """The train step on alternate batches; each call takes the state the last one
  returned (the step donates it) and returns (state, metrics)."""
  calls = 0

  def run():
    nonlocal state, calls
    state, metrics = compiled(state, batches[calls % len(batches)])
    calls += 1
    return state, metrics
  return Program(compiled, run)


def program(config) -> Program:
  """The benchmark's train step, for benchmarks/profile.py."""
  _, compiled, state, batches, _, _ = build(config)
  return stepping(compiled, state, batches)


def program_from_flags() -> Program:
  return program(_CONFIG.value)


def measure(config, num_steps: int = 10, compare: str = 'none') -> dict:
  if compare == 'xla_defaults' and steps.train_compiler_options() is None:
    raise ValueError("--compare=xla_defaults: this step compiles with XLA's defaults already "
                     '(not XLA:CPU, XLA_FLAGS names the fusion types, or this jaxlib lacks '
                     'the option): nothing to compare.')
  if compare == 'torch':  # before anything compiles
    if jax.default_backend() != 'cpu':
      raise ValueError('--compare=torch runs PyTorch on the CPU; compare on a CPU backend.')
    if config.train.z_loss or config.train.grad_accum > 1:
      raise ValueError('--compare=torch trains one batch per step without a z-loss; set '
                       '--config.train.grad_accum=1 --config.train.z_loss=0.')
  task, compiled, state, batches, compile_s, devices = build(config)
  cfg = task.cfg
  tokens_per_step = config.data.batch_size * config.data.seq_len
  flops_per_token = (task.train_flops_per_step(state.params, config.data.batch_size,
                                               config.data.seq_len) / tokens_per_step)
  params_count = state_lib.count_params(state.params)
  reference = None
  if compare == 'torch':  # from our initial weights, copied before the step donates them
    from benchmarks import torch_reference
    reference = torch_reference.load_params(torch_reference.GPT(cfg), state.params)
  step = stepping(compiled, state, batches)
  _, first = jax.block_until_ready(step.run())  # warm-up
  other = None
  if compare == 'xla_defaults':
    other = stepping(*build(config, xla_default_options=True)[1:4])
    jax.block_until_ready(other.run())
    other_times, times = [], []
    for i in range(num_steps):  # in turns, so both see the machine's same moments
      for runner in ((other, step) if i % 2 == 0 else (step, other)):
        # Untimed: the first step after the other's pays for memory of its own (XLA:CPU
        # allocates a step's temporaries afresh; with more of them it maps new pages).
        # Each turn's two steps read the two batches, so the timed one always reads the
        # same batch; the shapes, and so the time, are the same.
        jax.block_until_ready(runner.run())
        seconds, (_, turn_metrics) = _timed(runner)
        if runner is step:
          times.append(seconds)
          metrics = turn_metrics
        else:
          other_times.append(seconds)
    step_s = sum(times) / num_steps
  else:
    start = time.perf_counter()
    for _ in range(num_steps):
      out = step.run()
    _, metrics = jax.block_until_ready(out)
    step_s = (time.perf_counter() - start) / num_steps

  peak = flops.peak_flops_per_device(cfg.dtype) * devices
  tokens_per_s = tokens_per_step / step_s
  result = {
      'benchmark': 'train_step', 'backend': jax.default_backend(),
      'device': jax.devices()[0].device_kind, 'devices': devices,
      'dtype': jax.numpy.dtype(cfg.dtype).name, 'params': params_count,
      'flops_per_token': flops_per_token, 'batch_size': config.data.batch_size,
      'seq_len': config.data.seq_len, 'tokens_per_s': tokens_per_s, 'step_s': step_s,
      'compile_s': compile_s, 'mfu': tokens_per_s * flops_per_token / peak,
      'peak_flops': peak, 'loss': float(metrics['loss']), 'attention': cfg.attention,
      'logits_chunk': cfg.logits_chunk, **memory_bytes(compiled),
      'compiler_options': steps.train_compiler_options(),
  }
  if jax.default_backend() == 'cpu':
    result['cpu_matmul_flops'] = peak
  if other is not None:
    result.update(xla_defaults_tokens_per_s=tokens_per_step * num_steps / sum(other_times),
                  speedup_vs_xla_defaults=sum(other_times) / sum(times),
                  speedup_vs_xla_defaults_median=float(np.median(other_times)
                                                       / np.median(times)))
  if reference is not None:
    batch = jax.device_get(batches[0])
    torch_result = torch_reference.measure_in_own_process(
        reference, config.train, batch['inputs'], batch['targets'], num_steps)
    # The first step's losses, from the same weights on the same batch, agree when
    # both run the same model.
    result.update(torch_tokens_per_s=torch_result['tokens_per_s'],
                  torch_mfu=torch_result['tokens_per_s'] * flops_per_token / peak,
                  speedup_vs_torch=tokens_per_s / torch_result['tokens_per_s'],
                  first_loss=float(first['loss']), torch_first_loss=torch_result['first_loss'])
  return result


def main(argv):
  del argv
  if _COMPARE.value == 'torch':
    if importlib.util.find_spec('torch') is None:
      raise app.UsageError('--compare=torch needs torch: pip install -r requirements-dev.txt')
  result = measure(_CONFIG.value, _STEPS.value, _COMPARE.value)
  if not _JSON.value:
    logging.info('%s', result)
  print(json.dumps(result), flush=True)


if __name__ == '__main__':
  runtime.reexec_with_huge_pages()
  app.run(main)
