"""The precision comparison, as one JSON line (and a loss-curve PNG).

Weights: one trained run's parameters served in float32, bfloat16, float16 and int8
(per-channel scales, dequantized to float32): their bytes, validation loss and bits
per byte, and how often greedy decoding picks float32's tokens (the share of
identical tokens, position by position, and the share before the first difference).

Training: the same short run from scratch (the run's config, its first batches) in
float32, bfloat16, float16 with dynamic loss scaling, and float16 without it (the
scale pinned at 1: the loss per token position as it is), each step's loss, the
loss scale and skipped steps, and every `--probe_every` steps the share of gradient
entries that are exactly zero, beside those that are zero only because float16
flushed them (nonzero in float32 at the same parameters and batch), and the relative
error of the float16 gradient against float32's there.

python -m benchmarks.precision --workdir=runs/gpt_tiny --steps=100 --json
"""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags

from train import runtime

_WORKDIR = flags.DEFINE_string('workdir', None, 'A trained run.', required=True)
_STEPS = flags.DEFINE_integer('steps', 100, 'Training steps of each short run (0: none).')
_PROBE_EVERY = flags.DEFINE_integer('probe_every', 10, 'Steps between gradient probes.')
_NEW_TOKENS = flags.DEFINE_integer('new_tokens', 32, 'Greedy tokens per prompt.')
_PLOT = flags.DEFINE_string('plot', 'benchmarks/precision_loss.png', 'The loss-curve PNG.')
_JSON = flags.DEFINE_bool('json', False, 'Print only the JSON line.')

WEIGHTS = ('float32', 'bfloat16', 'float16', 'int8')
PROMPTS = ('In the beginning', 'And God said', 'The LORD is my shepherd',
           'Blessed are the', 'Then Jesus answered', 'And it came to pass',
           'The kingdom of heaven is like', 'Now the serpent')
# Each run's train.loss_scale_* overrides; None: not float16.
TRAINING = {'float32': ('float32', None), 'bfloat16': ('bfloat16', None),
            'float16_scaled': ('float16', {}),
            'float16_unscaled': ('float16', {'loss_scale_init': 1.0,
                                             'loss_scale_growth_interval': 10**9})}


def _with(config, **fields) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(config.to_dict())
  for dotted, value in fields.items():
    *parents, leaf = dotted.split('.')
    node = config
    for name in parents:
      node = node[name]
    node[leaf] = value
  return config


def _greedy(task, params, tokenizer, quantize: str) -> list[list[int]]:
  from inference.generate import generate
  prompts = [tokenizer.encode(p) for p in PROMPTS]
  return generate(task, params, prompts, _NEW_TOKENS.value, eos_id=tokenizer.eos_id,
                  quantize=quantize)


def _agreement(outputs, reference) -> tuple[float, float]:
  """(share of reference tokens matched position by position, share before the
  first difference)."""
  same = prefix = total = 0
  for out, ref in zip(outputs, reference):
    matches = [a == b for a, b in zip(out, ref)] + [False] * (len(ref) - len(out))
    same += sum(matches)
    prefix += next((i for i, m in enumerate(matches) if not m), len(ref))
    total += len(ref)
  return same / total, prefix / total


def compare_weights(config, workdir: str) -> dict:
  from inference.quantize import dequantize, quantize_int8, weight_bytes
  from train import checkpointing, loop
  if config.lora.rank:
    raise app.UsageError(f'{workdir} is a LoRA run; merge it first (python main.py '
                         '--mode=merge --workdir=DIR --to=OUT) and benchmark OUT.')
  manager = checkpointing.make_manager(workdir, config.train.keep_checkpoints)
  results, reference, params, step = {}, None, None, None
  for name in WEIGHTS:
    run = loop.Run(_with(config, dtype='float32' if name == 'int8' else name), workdir)
    if params is None:
      params, step = checkpointing.restore_params(manager, run.abstract_params)
      if params is None:
        raise app.UsageError(f'No checkpoint in {workdir}; train first.')
    if name == 'int8':
      served, evaluated = quantize_int8(params), jax.jit(dequantize)(quantize_int8(params))
    else:
      served = evaluated = jax.tree.map(lambda x: x.astype(name), params)
    tokens = _greedy(run.task, params if name == 'int8' else served, run.data.tokenizer,
                     'int8' if name == 'int8' else 'none')
    reference = reference or tokens
    agreement, prefix = _agreement(tokens, reference)
    metrics = run.evaluate(evaluated)
    results[name] = {'weight_bytes': weight_bytes(served), 'eval_loss': metrics['eval_loss'],
                     'eval_bits_per_byte': metrics['eval_bits_per_byte'],
                     'greedy_agreement': agreement, 'greedy_prefix_agreement': prefix}
  manager.close()
  return {'step': step, 'weights': results}


def _probe(task16, task32, params, batch, scale):
  """(share of gradient entries exactly zero in float16 at `scale`, share zero there
  but not in float32, |g16 - g32| / |g32| of the unscaled gradients), for the loss per
  token position as the train step scales it."""
  def grads(task, s):
    positions = batch['weights'].size
    objective = lambda p: task.loss(p, batch, None, False)[0] * (s / positions)
    return jnp.concatenate([g.ravel() for g in jax.tree.leaves(jax.grad(objective)(params))])
  g16, g32 = grads(task16, scale), grads(task32, 1.0)
  error = jnp.linalg.norm(g16 / scale - g32) / jnp.linalg.norm(g32)
  return jnp.mean(g16 == 0), jnp.mean((g16 == 0) & (g32 != 0)), error


def compare_training(config, workdir: str, steps: int) -> dict:
  from train import loop, loss_scale, optimizer, state as state_lib, steps as steps_lib
  from train import sharding
  results = {}
  config = _with(config, **{'train.steps': steps, 'train.warmup_steps': max(1, steps // 10)})
  for variant, (dtype, scaling) in TRAINING.items():
    run_config = _with(config, dtype=dtype,
                       **{f'train.{k}': v for k, v in (scaling or {}).items()})
    run = loop.Run(run_config, workdir)
    tx = optimizer.make_optimizer(run_config.train)
    scaler = loss_scale.from_config(run_config, run.model_cfg.dtype)
    _, shardings = state_lib.state_shardings(run.task, tx, run.mesh, config.data.seq_len,
                                             False, scaler)
    state = state_lib.create_train_state(run.task, tx, run.mesh, config.data.seq_len,
                                         jax.random.fold_in(jax.random.key(config.seed), 0),
                                         False, scaler)
    step_fn = steps_lib.jit_train_step(run.task, tx,
                                       optimizer.learning_rate_schedule(run_config.train),
                                       run_config.train.grad_accum,
                                       jax.random.fold_in(jax.random.key(config.seed), 1),
                                       run.mesh, shardings)
    task32 = dataclasses.replace(run.task, cfg=dataclasses.replace(run.task.cfg,
                                                                   dtype=jnp.float32))
    probe = jax.jit(_probe, static_argnums=(0, 1))
    row = {'losses': [], 'probes': [], 'loss_scales': [], 'status': 'finished'}
    for i in range(steps):
      batch = sharding.global_batch(next(run.data.train_iter), run.mesh)
      if dtype == 'float16' and i % _PROBE_EVERY.value == 0:
        zero, flushed, error = probe(run.task, task32, state.params, batch,
                                     state.loss_scale.scale)
        row['probes'].append({'step': i, 'zero_share': float(zero),
                              'flushed_share': float(flushed), 'grad_error': float(error)})
      state, metrics = step_fn(state, batch)
      row['losses'].append(float(metrics['loss']))
      if scaler is not None:
        row['loss_scales'].append(float(metrics['loss_scale']))
      if not np.isfinite(row['losses'][-1]) and scaler is None:
        row['status'] = f'loss {row["losses"][-1]} at step {i + 1}'
        break
    if scaler is not None:
      row['skipped_steps'] = int(state.loss_scale.skipped_steps)
      row['final_scale'] = float(state.loss_scale.scale)
    row['eval_loss'] = run.evaluate(state.params)['eval_loss']
    results[variant] = row
  return results


def plot(training: dict, path: str) -> None:
  """Left: each run's training loss. Right: float16's gradient against float32's at the
  same parameters and batch (relative error; share of entries flushed to zero)."""
  import matplotlib
  matplotlib.use('Agg')  # files only
  from matplotlib import pyplot as plt
  fig, (losses, grads) = plt.subplots(1, 2, figsize=(11, 4))
  for variant, row in training.items():
    line, = losses.plot(np.arange(1, len(row['losses']) + 1), row['losses'], linewidth=1.2,
                        label=variant.replace('_', ' '))
    if row['probes']:
      name, at = variant.replace('_', ' '), [p['step'] for p in row['probes']]
      grads.plot(at, [p['grad_error'] for p in row['probes']], marker='o',
                 color=line.get_color(), label=f'{name}: |g16 - g32| / |g32|')
      grads.plot(at, [p['flushed_share'] for p in row['probes']], marker='x', linestyle='--',
                 color=line.get_color(), label=f'{name}: share flushed to zero')
  losses.set(xlabel='step', ylabel='training loss (nats/token)',
             title='The same run in each precision')
  grads.set(xlabel='step', yscale='log', ylim=(1e-9, 1),
            title='float16 gradients against float32 (same parameters and batch)')
  losses.legend(fontsize=8)
  grads.legend(fontsize=8, loc='lower right')
  for ax in (losses, grads):
    ax.grid(alpha=0.3)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv):
  from train import run_config
  config = run_config.saved_config(_WORKDIR.value, argv[1:])
  result = {'benchmark': 'precision', 'workdir': _WORKDIR.value, 'device': jax.devices()[0].device_kind,
            **compare_weights(config, _WORKDIR.value)}
  if _STEPS.value:
    result['training'] = compare_training(config, _WORKDIR.value, _STEPS.value)
    plot(result['training'], _PLOT.value)
    result['plot'] = _PLOT.value
  print(json.dumps(result), flush=True)


if __name__ == '__main__':
  runtime.reexec_with_huge_pages()
  app.run(main)
