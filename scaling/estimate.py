"""What a config costs before it runs: parameters, FLOPs, compute and memory.

Parameters are counted exactly from the config (by family and option) and checked
against the initialised model's shapes. FLOPs follow train/flops.py (6 N + attention
for training, as the run counts them; the forward pass is the task's
`forward_flops_per_step`, a third of full training's; DPO's over both sides of each
pair, without the reference's). Memory is the training-memory
rule of thumb made exact: weights, gradients and AdamW's two moments in the
parameter dtype (4 + 4 + 8 = 16 bytes per float32 parameter), plus the activations
at the peak of the backward pass for the configured micro-batch (scaling/activations.py).
`by_precision` repeats that for each compute dtype (float32, bfloat16, float16, with
activations traced in it) beside the bytes of the weights served in each, int8 included.

A LoRA run (lora.rank > 0) holds every weight (its frozen base and the adapters) but
gradients and AdamW moments of its trained part only, and its backward pass keeps what
the gradients of that part need; `fine_tuning` sets it beside full fine-tuning of the
same model. Its trained part is decided as train/frozen.py decides it, without reading
the init_from source: adapters, the task's `new_modules` and lora.train_in_full's names.

A task that `uses_reference` (DPO) also holds its reference model's weights: a whole copy
without LoRA; with LoRA the frozen base is the reference (the same arrays), and only what
trains in full and the source has (lora.train_in_full's parameters) is held twice.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

import tasks
from models import kernels, lora, padded_vocab_size
from models.config import REMAT_POLICIES
from models.losses import balanced_chunk
from scaling import activations
from tasks.base import Task
from train import config_checks, flops, frozen as frozen_lib

PF_DAY = 1e15 * 86_400  # FLOPs in one PetaFLOP/s-day


def model_task(config: ml_collections.ConfigDict, platform: str | None = None) -> Task:
  """The task (and model) a run of `config` builds, without reading data: the embedding
  has model.vocab_size rows, or the tokenizer's size rounded up as training does."""
  config_checks.validate(config)
  platform = platform or jax.default_backend()
  dtype = config_checks.compute_dtype(config, platform)
  return tasks.from_config(config, tasks.model_config(config, embedding_rows(config), dtype))


_run_attention = functools.lru_cache(maxsize=None)(kernels.resolve_attention)  # probed once


def run_task(config: ml_collections.ConfigDict, platform: str | None = None) -> Task:
  """model_task, with the attention a run on this machine's accelerator would use:
  what memory and compiled figures depend on (parameter counts do not)."""
  task = model_task(config, platform)
  if (platform or jax.default_backend()) == jax.default_backend() != 'cpu':
    task = dataclasses.replace(task, cfg=_run_attention(task.cfg, config.data.seq_len))
  return task


def embedding_rows(config: ml_collections.ConfigDict) -> int:
  """model.vocab_size, or the tokenizer's size rounded up as training does."""
  return config.model.vocab_size or padded_vocab_size(config.data.tokenizer.vocab_size)


def abstract_params(task: Task):
  """The initialised model's parameter shapes, without allocating them."""
  import flax.linen as nn
  boxed = jax.eval_shape(lambda key: task.init(key, task.example_batch(1, 8)),
                         jax.random.key(0))
  return nn.unbox(boxed)


@functools.lru_cache(maxsize=256)
def _shapes(task: Task):
  return abstract_params(task)


def _param_shapes(task: Task):
  """abstract_params, kept for later estimates in this process (shared, not to be
  changed); the shapes are the same under every remat policy and dropout rate."""
  task = dataclasses.replace(task, cfg=dataclasses.replace(task.cfg, remat='none', dropout=0.0))
  try:
    hash(task)
  except TypeError:  # a task with an unhashable field
    return abstract_params(task)
  return _shapes(task)


def train_in_full(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """lora.train_in_full's parts of parameter names (e.g. ('embedding',))."""
  return lora.parse_targets(config.lora.train_in_full)


def frozen_paths(task: Task, params, in_full: tuple[str, ...] = ()) -> frozenset:
  """The parameters (paths) a LoRA run of `task` freezes, as train/frozen.py finds them
  in its init_from source, but read from none: all but the adapters, the task's
  `new_modules` and those whose name has a part in `in_full` (lora.train_in_full).
  Empty without LoRA."""
  if not task.cfg.lora_rank:
    return frozenset()
  paths = traverse_util.flatten_dict(params)
  frozen_lib.check_train_in_full(in_full, ['/'.join(path) for path in paths])
  return frozenset(path for path in paths
                   if not lora.is_adapter(path) and path[0] not in task.new_modules
                   and not any(frozen_lib.names_part('/'.join(path), part)
                               for part in in_full))


def reference_params(task: Task, params, frozen: frozenset) -> int | None:
  """Parameters of the reference model the run holds beside its own (None: the task has
  none), as train/frozen.py's load() reads them: without LoRA a whole copy; with LoRA
  (`frozen`: the base's paths) the base itself, plus a second copy of what trains in full
  and the source has (not the adapters, nor the task's new modules)."""
  if not task.uses_reference:
    return None
  flat = traverse_util.flatten_dict(params)
  if not task.cfg.lora_rank:
    return int(sum(np.prod(x.shape) for x in flat.values()))
  return int(sum(np.prod(x.shape) for path, x in flat.items()
                 if path not in frozen and not lora.is_adapter(path)
                 and path[0] not in task.new_modules))


def _residual_trace(config: ml_collections.ConfigDict, task: Task, remat: str,
                    scan_layers: bool) -> activations.Residuals:
  """The residuals of the loss's VJP for one micro-batch, traced with shapes only."""
  task = dataclasses.replace(task, cfg=dataclasses.replace(
      task.cfg, remat=remat, scan_layers=scan_layers, dropout=0.0))
  sequences = config.data.batch_size // config.train.grad_accum
  in_full = train_in_full(config)
  try:
    hash(task)
  except TypeError:  # a task with an unhashable field: traced every time
    return _trace_residuals.__wrapped__(task, sequences, config.data.seq_len, in_full)
  return _trace_residuals(task, sequences, config.data.seq_len, in_full)


@functools.lru_cache(maxsize=256)
def _trace_residuals(task: Task, sequences: int, seq_len: int,
                     in_full: tuple[str, ...]) -> activations.Residuals:
  """One trace, kept: estimates of related configs (another remat policy, precision or
  memory setting of the same model) share it; it depends on nothing but its arguments.
  The VJP is taken with respect to the trained part only (LoRA: the frozen base is an
  argument it does not differentiate, so nothing is kept for the base's gradients)."""
  params = _param_shapes(task)
  trained, frozen = frozen_lib.split(params, frozen_paths(task, params, in_full))
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                       task.train_batch(sequences, seq_len))
  def residuals(trained, frozen, batch):
    loss = lambda p: task.loss(frozen_lib.combine(frozen, p), batch, jax.random.key(0),
                               train=False)[0]
    return jax.vjp(loss, trained)[1]
  return activations.residuals(jax.make_jaxpr(residuals)(trained, frozen, batch),
                               len(jax.tree.leaves(trained)), len(jax.tree.leaves(frozen)))


def activation_bytes(config: ml_collections.ConfigDict, task: Task,
                     policies=REMAT_POLICIES) -> dict[str, int]:
  """Peak activation bytes of one micro-batch's backward pass under each remat policy
  (scaling/activations.py), with the run's scanned or unrolled layers."""
  cfg = task.cfg
  scanned = {policy: _residual_trace(config, task, policy, True)
             for policy in set(policies) | {'none'}}
  sequences = config.data.batch_size // config.train.grad_accum
  positions = task.scored_length(config.data.seq_len)
  # The logits' float32 cotangent; over chunks (model.logits_chunk), one chunk's
  # recomputed logits and their cotangent at a time.
  arrays = 1
  if cfg.logits_chunk:
    positions, arrays = balanced_chunk(positions, cfg.logits_chunk), 2
  logits_bytes = arrays * sequences * positions * cfg.vocab_size * 4
  return {policy: activations.peak_bytes(
              scanned[policy] if cfg.scan_layers else _residual_trace(config, task, policy, False),
              scanned[policy], scanned['none'], cfg.num_layers, logits_bytes)
          for policy in policies}


# Compute dtypes a run can train in; float16 keeps float32 master weights (and adds a
# loss scale of three scalars, train/loss_scale.py).
TRAINING_PRECISIONS = ('float32', 'bfloat16', 'float16')


def _device_bytes(state: dict[str, int], activation: int, offload_optimizer: bool) -> int:
  """Training memory per device: the train state (and a reference model's weights) and
  the activations at their peak."""
  if offload_optimizer:  # the moments visit the devices for the update only, after the
    # activations are freed
    return (sum(state.values()) - state['adam_moments']
            + max(activation, state['adam_moments']))
  return sum(state.values()) + activation


def train_state_bytes(config: ml_collections.ConfigDict, n: int, trained: int,
                      param_bytes: int, reference: int | None = None) -> dict[str, int]:
  """Bytes of the weights of all `n` parameters, and of the gradients (with accumulation
  over micro-batches, also their running sum) and AdamW's two moments of the `trained`;
  with a reference model, the weights of its `reference` parameters held beside them."""
  state = {'weights': n * param_bytes,
           'gradients': trained * param_bytes * (2 if config.train.grad_accum > 1 else 1),
           'adam_moments': 2 * trained * param_bytes}
  if reference is not None:
    state['reference_weights'] = reference * param_bytes
  return state


def by_precision(config: ml_collections.ConfigDict, task: Task, remat: str, n: int,
                 trained: int, int8_bytes: int, run_activation: int,
                 reference: int | None = None) -> dict[str, dict]:
  """For each precision: the weights as served for inference and, for the training
  precisions, the master weights, gradients and AdamW moments (in the parameter dtype;
  float16's are float32; of the `trained` parameters for the last two), a reference
  model's weights (`reference` parameters, in the parameter dtype) and the activations
  traced in that compute dtype (remat policy `remat`), with their total per device."""
  run_dtype = jnp.dtype(task.cfg.dtype).name
  rows = {}
  for name in TRAINING_PRECISIONS:
    param_bytes = 4 if name == 'float16' else jnp.dtype(config.param_dtype).itemsize
    state = train_state_bytes(config, n, trained, param_bytes, reference)
    if name == run_dtype:
      activation = run_activation
    else:
      other = dataclasses.replace(task, cfg=dataclasses.replace(task.cfg, dtype=jnp.dtype(name)))
      activation = activation_bytes(config, other, (remat,))[remat]
    rows[name] = {'served_weights': n * jnp.dtype(name).itemsize, **state,
                  'activations': activation,
                  'training': _device_bytes(state, activation, config.train.offload_optimizer)}
  rows['int8'] = {'served_weights': int8_bytes}
  return rows


def estimate(config: ml_collections.ConfigDict, platform: str | None = None) -> dict:
  """Parameters, FLOPs, compute and memory of a config (one device, no sharding)."""
  from inference.quantize import quantize_int8, weight_bytes
  platform = platform or jax.default_backend()
  task = run_task(config, platform)
  cfg = task.cfg
  counts = task.param_counts()
  params = _param_shapes(task)
  initialised = int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
  n = sum(counts.values())
  if n != initialised:  # a new layer that the task's count does not know about yet
    raise AssertionError(f'Counted {n:,} parameters but the model has {initialised:,}; update '
                         f'param_counts of the {task.name} task (tasks/).')
  paths = frozen_paths(task, params, train_in_full(config))
  frozen = frozen_lib.split(params, paths)[1]
  trained = n - int(sum(np.prod(x.shape) for x in jax.tree.leaves(frozen)))
  reference = reference_params(task, params, paths)
  seq_len, batch = config.data.seq_len, config.data.batch_size
  forward_flops = task.forward_flops_per_step(params, batch, seq_len)
  # As the run counts them (train/loop.py): LoRA's frozen kernels get no weight gradient,
  # and what no trained parameter lies below no input gradient.
  step_flops = task.train_flops_with_frozen(params, batch, seq_len, frozen)
  tokens_per_step = batch * seq_len
  train_flops = step_flops * config.train.steps
  param_bytes = jnp.dtype(cfg.param_dtype).itemsize
  int8_bytes = weight_bytes(jax.eval_shape(quantize_int8, params))
  activation = activation_bytes(config, task)
  # XLA:CPU schedules unrolled layers' rematerialisation into the forward pass, so it
  # keeps their activations whatever the policy (measured: equal compiled memory).
  remat = 'none' if platform == 'cpu' and not cfg.scan_layers else cfg.remat
  state = train_state_bytes(config, n, trained, param_bytes, reference)
  device_bytes = _device_bytes(state, activation[remat], config.train.offload_optimizer)
  result = {
      'arch': cfg.arch, 'params': n, 'params_by_part': counts, 'trained_params': trained,
      'matmul_params': flops.matmul_param_count(params, task.output_is_embedding()),
      'flops_per_token': step_flops / tokens_per_step,
      'forward_flops_per_token': forward_flops / tokens_per_step,
      'tokens_per_step': tokens_per_step, 'steps': config.train.steps,
      'train_tokens': tokens_per_step * config.train.steps,
      'train_flops': train_flops, 'pf_days': train_flops / PF_DAY,
      'weight_bytes': {'float32': 4 * n, 'bfloat16': 2 * n, 'float16': 2 * n, 'int8': int8_bytes},
      'by_precision': by_precision(config, task, remat, n, trained, int8_bytes,
                                   activation[remat], reference),
      'train_state_bytes': state,
      'activation_bytes': activation,
      'memory_bytes': device_bytes,
      'host_bytes': state['adam_moments'] if config.train.offload_optimizer else 0,
      'remat': cfg.remat, 'effective_remat': remat, 'compute_dtype': jnp.dtype(cfg.dtype).name,
  }
  if cfg.lora_rank:
    result['fine_tuning'] = fine_tuning(config, task, remat, {
        **state, 'activations': activation[remat], 'total': device_bytes})
  return result


def fine_tuning(config: ml_collections.ConfigDict, task: Task, remat: str,
                lora_row: dict[str, int]) -> dict[str, dict[str, int]]:
  """Memory per device of full fine-tuning (the same model without adapters, every
  parameter trained) beside the LoRA run's own (`lora_row`)."""
  full = dataclasses.replace(task, cfg=dataclasses.replace(task.cfg, lora_rank=0,
                                                           lora_targets=()))
  n = sum(full.param_counts().values())
  state = train_state_bytes(config, n, n, jnp.dtype(task.cfg.param_dtype).itemsize,
                            n if full.uses_reference else None)
  activation = activation_bytes(config, full, (remat,))[remat]
  return {'full': {**state, 'activations': activation,
                   'total': _device_bytes(state, activation, config.train.offload_optimizer)},
          'lora': lora_row}


def compiled_memory(config: ml_collections.ConfigDict) -> dict | None:
  """XLA's memory analysis of the compiled train step, per device: arguments (train
  state and batch), temporaries (activations, gradients) and outputs not aliased to
  the donated state. On the configured mesh where these devices can form it, else on
  one device; None where the backend does not report it."""
  from train import optimizer, sharding, state as state_lib, steps as steps_lib
  task = run_task(config)
  try:
    mesh = sharding.make_mesh(config.mesh)
  except ValueError:  # e.g. a pod's mesh estimated on a laptop
    mesh = sharding.make_mesh(ml_collections.ConfigDict({'data': 1, 'fsdp': 1, 'tensor': 1}),
                              jax.devices()[:1])
  tx = optimizer.make_optimizer(config.train)
  seq_len = config.data.seq_len
  # Parameters the step takes beside its state: LoRA's frozen base (the state trains the
  # adapters and new heads) and a reference model (DPO).
  paths, frozen_shardings, frozen = frozenset(), None, ()
  if task.cfg.lora_rank or task.uses_reference:
    abstract_params, param_shardings = state_lib.param_shardings(task, mesh, seq_len)
    paths = frozen_paths(task, abstract_params, train_in_full(config))
    frozen_shardings = frozen_lib.shardings_of(task, param_shardings, paths)
    frozen = (frozen_lib.shardings_of(task, abstract_params, paths),)  # ShapeDtypeStructs
  abstract_state, shardings = state_lib.state_shardings(
      task, tx, mesh, seq_len, config.train.offload_optimizer,
      trainable=frozen_lib.trainable_part(paths))
  batch_sharding = sharding.batch_sharding(mesh)
  abstract_batch = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=batch_sharding),
      task.train_batch(config.data.batch_size, seq_len))
  step = steps_lib.jit_train_step(task, tx, optimizer.learning_rate_schedule(config.train),
                                  config.train.grad_accum, jax.random.key(0), mesh, shardings,
                                  frozen_shardings)
  analysis = step.lower(abstract_state, abstract_batch, *frozen).compile().memory_analysis()
  if analysis is None:
    return None
  # LoRA's reference (DPO) is its frozen base: Frozen.reference and Frozen.params hold the
  # same arrays at run time, which XLA, seeing two arguments, counts twice.
  shared = 0
  if task.uses_reference and paths:
    flat = traverse_util.flatten_dict(abstract_params)
    shards = traverse_util.flatten_dict(param_shardings)
    shared = sum(int(np.prod(shards[p].shard_shape(flat[p].shape))) * flat[p].dtype.itemsize
                 for p in paths)
  total = (analysis.argument_size_in_bytes + analysis.temp_size_in_bytes
           + analysis.output_size_in_bytes - analysis.alias_size_in_bytes - shared)
  return {'mesh': dict(mesh.shape), 'argument_bytes': int(analysis.argument_size_in_bytes),
          'temp_bytes': int(analysis.temp_size_in_bytes),
          'output_bytes': int(analysis.output_size_in_bytes),
          'alias_bytes': int(analysis.alias_size_in_bytes), 'shared_bytes': shared,
          'total_bytes': int(total)}


def _size(n: float) -> str:
  for unit in ('', 'K', 'M', 'G', 'T', 'P'):
    if abs(n) < 1000:
      return f'{n:.3g}{unit}'
    n /= 1000
  return f'{n:.3g}E'


def _bytes(n: float) -> str:
  return f'{n / 2**30:.3f} GiB' if n >= 2**30 else f'{n / 2**20:.2f} MiB'


def _precision_lines(result: dict) -> list[str]:
  """Training memory per device by compute dtype, and int8 (inference only)."""
  lines = [f"By precision (training: master weights, gradients and AdamW moments in the "
           f"parameter dtype, activations at remat={result['effective_remat']}):"]
  for name, row in result['by_precision'].items():
    if 'training' not in row:
      lines.append(f"  {name:<9} served weights {_bytes(row['served_weights'])}; inference only")
      continue
    reference = (f"reference {_bytes(row['reference_weights'])} + "
                 if 'reference_weights' in row else '')
    lines.append(f"  {name:<9} served weights {_bytes(row['served_weights'])}; training "
                 f"{_bytes(row['training'])} = weights {_bytes(row['weights'])} + gradients "
                 f"{_bytes(row['gradients'])} + AdamW {_bytes(row['adam_moments'])} + "
                 f"{reference}activations {_bytes(row['activations'])}"
                 + (' (+ dynamic loss scaling)' if name == 'float16' else ''))
  return lines


def _fine_tuning_lines(result: dict) -> list[str]:
  """LoRA's memory per device beside full fine-tuning's, one row per part."""
  columns = result['fine_tuning']
  full_trained = result['params'] - result['params_by_part']['lora']
  parts = (('weights', 'weights'), ('gradients', 'gradients'), ('AdamW moments', 'adam_moments'),
           ('reference weights', 'reference_weights'), ('activations', 'activations'),
           ('total', 'total'))
  rows = [('trained parameters', f'{full_trained:,}', f"{result['trained_params']:,}"),
          *((label, _bytes(columns['full'][key]), _bytes(columns['lora'][key]))
            for label, key in parts if key in columns['lora'])]
  return [f"Full fine-tuning vs LoRA, per device (weights: LoRA's frozen base and adapters; "
          f"gradients and AdamW: the trained part; activations at "
          f"remat={result['effective_remat']}):",
          f"  {'':<20}{'full':>14}{'LoRA':>14}",
          *(f'  {label:<20}{full:>14}{lora_value:>14}' for label, full, lora_value in rows),
          "  FLOPs above count a LoRA step as it runs: the frozen weights get no weight "
          "gradient (4 of their 6 FLOPs per token remain), and those no trained parameter lies "
          "below run forward only."]


def report(result: dict) -> str:
  """Human-readable lines of an estimate (with the compiled analysis if present)."""
  lines = [f"{result['arch']}: {result['params']:,} parameters "
           f"({', '.join(f'{k} {v:,}' for k, v in result['params_by_part'].items())}); "
           f"{result['matmul_params']:,} in matmuls",
           f"FLOPs per token: {_size(result['flops_per_token'])} training, "
           f"{_size(result['forward_flops_per_token'])} forward",
           f"Training: {result['steps']:,} steps x {result['tokens_per_step']:,} tokens = "
           f"{_size(result['train_tokens'])} tokens, {result['train_flops']:.3g} FLOPs = "
           f"{result['pf_days']:.3g} PF-days",
           'Weights: ' + ', '.join(f'{k} {_bytes(v)}' for k, v in result['weight_bytes'].items()),
           *_precision_lines(result),
           'Train state: ' + ', '.join(f'{k} {_bytes(v)}'
                                       for k, v in result['train_state_bytes'].items()),
           'Activations (' + result['compute_dtype'] + '): ' + ', '.join(
               f'remat={k} {_bytes(v)}' for k, v in result['activation_bytes'].items()),
           f"Estimated training memory per device (remat={result['remat']}): "
           f"{_bytes(result['memory_bytes'])}"
           + (f" (+ {_bytes(result['host_bytes'])} of AdamW moments in host memory)"
              if result['host_bytes'] else '')]
  if 'fine_tuning' in result:
    lines.extend(_fine_tuning_lines(result))
  if result['effective_remat'] != result['remat']:
    lines.append(f"  XLA:CPU keeps unrolled layers' activations whatever the remat policy: counted "
                 f"with remat={result['effective_remat']}; set model.scan_layers=True for remat "
                 "to save memory here")
  compiled = result.get('compiled')
  if compiled:
    line = (f"XLA compiled train step on mesh {compiled['mesh']}, per device: "
            f"{_bytes(compiled['total_bytes'])} (arguments {_bytes(compiled['argument_bytes'])}, "
            f"temporaries {_bytes(compiled['temp_bytes'])})")
    if all(size == 1 for size in compiled['mesh'].values()):
      line += f"; estimate / XLA = {result['memory_bytes'] / compiled['total_bytes']:.3f}"
    lines.append(line)
  return '\n'.join(lines)
