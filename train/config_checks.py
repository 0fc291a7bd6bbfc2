"""Start-up checks: every mistake a user can make in a config fails here, before
any data is read or anything is compiled, with one line naming the field."""
import math
from collections.abc import Mapping

import jax.numpy as jnp
import ml_collections

import tasks
from models import config as model_config, lora, padded_vocab_size
from train import sharding

DTYPES = ('float32', 'bfloat16', 'float16', 'auto')
TOKENIZER_TYPES = ('bpe', 'unigram')


class ConfigError(ValueError):
  """A config field is unknown, out of range or inconsistent with another."""


def _choice(value, choices, field):
  if value not in choices:
    raise ConfigError(f"{field}='{value}' is not one of {', '.join(choices)}; set --config.{field} "
                      'to one of them.')


def _positive(value, field):
  if not value > 0:
    raise ConfigError(f'{field}={value} must be positive; set --config.{field}.')


def _get(config: ml_collections.ConfigDict, dotted: str):
  for name in dotted.split('.'):
    config = config[name]
  return config


def validate(config: ml_collections.ConfigDict) -> None:
  m, d, t = config.model, config.data, config.train
  _choice(m.arch, model_config.ARCHS, 'model.arch')
  _choice(m.position, model_config.POSITIONS, 'model.position')
  _choice(m.norm, model_config.NORMS, 'model.norm')
  _choice(m.activation, model_config.ACTIVATIONS, 'model.activation')
  _choice(m.block_order, model_config.BLOCK_ORDERS, 'model.block_order')
  _choice(m.remat, model_config.REMAT_POLICIES, 'model.remat')
  _choice(m.attention, model_config.ATTENTION_IMPLS, 'model.attention')
  _choice(config.dtype, DTYPES, 'dtype')
  _choice(config.param_dtype, ('float32', 'bfloat16'), 'param_dtype')
  _choice(d.tokenizer.type, TOKENIZER_TYPES, 'data.tokenizer.type')
  _choice(config.task, ('auto',) + tasks.NAMES, 'task')
  try:
    task = tasks.task_class(config)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  for other in dict.fromkeys(tasks.TASKS.values()):  # every section: a sweep's typo fails early
    problem = other.config_problem(config, selected=other is task)
    if problem:
      raise ConfigError(problem)
  for field in ('model.num_layers', 'model.num_heads', 'model.d_model', 'model.d_ff',
                'model.max_len', 'data.seq_len', 'data.batch_size', 'data.tokenizer.vocab_size',
                'train.steps', 'train.lr', 'train.grad_accum', 'train.log_every',
                'train.eval_every', 'train.eval_steps', 'train.checkpoint_every',
                'train.keep_checkpoints'):
    _positive(_get(config, field), field)
  num_kv_heads = m.num_kv_heads or m.num_heads
  if m.num_heads % num_kv_heads:
    raise ConfigError(f'model.num_heads={m.num_heads} is not a multiple of model.num_kv_heads='
                      f'{m.num_kv_heads}; pick num_kv_heads dividing num_heads.')
  if not m.head_dim and m.d_model % m.num_heads:
    raise ConfigError(f'model.d_model={m.d_model} is not divisible by model.num_heads='
                      f'{m.num_heads}; change one, or set model.head_dim.')
  head_dim = m.head_dim or m.d_model // m.num_heads
  if m.position == 'rope' and head_dim % 2:
    raise ConfigError(f"model.position='rope' needs an even head dimension, got {head_dim}.")
  if m.position == 'sinusoidal' and m.d_model % 2:
    raise ConfigError(f"model.position='sinusoidal' needs an even model.d_model, got {m.d_model}.")
  if d.seq_len > m.max_len:
    raise ConfigError(f'data.seq_len={d.seq_len} is longer than model.max_len={m.max_len}; '
                      'raise model.max_len or lower data.seq_len.')
  if d.batch_size % t.grad_accum:
    raise ConfigError(f'data.batch_size={d.batch_size} is not divisible by train.grad_accum='
                      f'{t.grad_accum}; make the batch a multiple of the micro-batch count.')
  if not 0 < d.eval_fraction < 1:
    raise ConfigError(f'data.eval_fraction={d.eval_fraction} must be in (0, 1).')
  if not 0 <= m.dropout < 1:
    raise ConfigError(f'model.dropout={m.dropout} must be in [0, 1).')
  if m.logits_chunk < 0:
    raise ConfigError(f'model.logits_chunk={m.logits_chunk} must be 0 (the whole sequence at '
                      'once) or a number of sequence positions.')
  if m.logits_chunk and not task.chunks_logits:
    raise ConfigError(f"model.logits_chunk={m.logits_chunk} chunks a token loss over the "
                      f"sequence, but task '{task.name}' has none to chunk; set "
                      '--config.model.logits_chunk=0.')
  _check_loss_scale(config)
  _check_lora(config)
  if t.eval_decode_examples < 0:
    raise ConfigError(f'train.eval_decode_examples={t.eval_decode_examples} must be 0 (no '
                      'decoding at eval) or more.')
  if config.get('init_from'):  # DIR or DIR@STEP; the source itself is read only when used
    from train import init_from  # imports this module
    init_from.parse(config.init_from)


def _check_lora(config: ml_collections.ConfigDict) -> None:
  """LoRA adapts a frozen base model: init_from, known targets, a sane scale."""
  settings = config.lora
  if settings.rank < 0:
    raise ConfigError(f'lora.rank={settings.rank} must be 0 (off) or positive.')
  if not settings.rank:
    if settings.train_in_full:
      raise ConfigError(f"lora.train_in_full='{settings.train_in_full}' names what trains in "
                        'full beside LoRA adapters, but lora.rank=0 trains everything; set '
                        'lora.rank, or clear lora.train_in_full.')
    return
  if not config.init_from:
    raise ConfigError('lora.rank > 0 adapts a pre-trained model, whose weights stay frozen; set '
                      '--config.init_from=DIR (a run or an imported workdir), or lora.rank=0 '
                      'to train every parameter.')
  targets = lora.parse_targets(config.lora.targets)
  unknown = [t for t in targets if t not in model_config.LORA_TARGETS]
  if unknown or not targets:
    raise ConfigError(f"lora.targets='{settings.targets}' must name some of "
                      f"{', '.join(model_config.LORA_TARGETS)} (comma-separated).")
  if 'head' in targets and config.model.tie_embeddings:
    raise ConfigError("lora.targets has 'head', but this model's output projection is its "
                      'input embedding (model.tie_embeddings); drop head from lora.targets.')
  if not 0 <= settings.dropout < 1:
    raise ConfigError(f'lora.dropout={settings.dropout} must be in [0, 1).')
  _positive(settings.alpha, 'lora.alpha')


def _check_loss_scale(config: ml_collections.ConfigDict) -> None:
  """float16 trains on float32 master parameters with a sane dynamic loss scale."""
  t = config.train
  if config.dtype == 'float16' and config.param_dtype != 'float32':
    raise ConfigError(f"dtype='float16' keeps float32 master parameters; set "
                      f"--config.param_dtype=float32 (not '{config.param_dtype}').")
  for field in ('train.loss_scale_init', 'train.loss_scale_min',
                'train.loss_scale_growth_interval'):
    _positive(_get(config, field), field)
  if not t.loss_scale_factor > 1:
    raise ConfigError(f'train.loss_scale_factor={t.loss_scale_factor} must be above 1; set '
                      '--config.train.loss_scale_factor (e.g. 2).')
  if t.loss_scale_min > t.loss_scale_init:
    raise ConfigError(f'train.loss_scale_min={t.loss_scale_min} is above '
                      f'train.loss_scale_init={t.loss_scale_init}; lower the minimum or raise '
                      'the initial scale.')


def embedding_rows(config: ml_collections.ConfigDict) -> int:
  """model.vocab_size, or (0) the tokenizer's vocabulary rounded up as training sizes it."""
  return config.model.vocab_size or padded_vocab_size(config.data.tokenizer.vocab_size)


def validate_against_mesh(config: ml_collections.ConfigDict, mesh_shape: Mapping[str, int]) -> None:
  """The config against the mesh's axis sizes ({'data': .., 'fsdp': .., 'tensor': ..}, e.g.
  dict(mesh.shape)): each micro-batch must split evenly over the data-parallel devices, and
  each model dimension over the mesh axes train/sharding.py's rules shard it on; otherwise
  jit fails deep inside with a shape error."""
  data_parallel = mesh_shape.get('data', 1) * mesh_shape.get('fsdp', 1)
  micro_batch = config.data.batch_size // config.train.grad_accum
  if micro_batch % data_parallel:
    raise ConfigError(
        f'data.batch_size={config.data.batch_size} (micro-batch {micro_batch} with '
        f'train.grad_accum={config.train.grad_accum}) is not divisible by the {data_parallel} '
        'data-parallel devices (mesh.data x mesh.fsdp); change data.batch_size or the mesh.')
  m = config.model
  rows = embedding_rows(config)
  # logical axis (models/layers.py) -> the config field that sets its size, and that size
  dims = {'embed': ('model.d_model', m.d_model), 'heads': ('model.num_heads', m.num_heads),
          'kv_heads': ('model.num_kv_heads', m.num_kv_heads or m.num_heads),
          'mlp': ('model.d_ff', m.d_ff), 'vocab': ('model.vocab_size', rows)}
  rules = dict(sharding.LOGICAL_AXIS_RULES)
  for logical, (field, size) in dims.items():
    axes = rules.get(logical)
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    devices = math.prod(mesh_shape.get(axis, 1) for axis in axes)
    if devices <= 1 or size % devices == 0:
      continue
    where = ' x '.join(f'mesh.{axis}={mesh_shape.get(axis, 1)}' for axis in axes)
    if logical == 'vocab' and not m.vocab_size:
      pieces = config.data.tokenizer.vocab_size
      suggestion = -(-pieces // math.lcm(128, devices)) * math.lcm(128, devices)
      raise ConfigError(
          f"model.vocab_size=0 sizes the embedding from the tokenizer's {pieces} pieces, padded "
          f"to {size} rows, which is not divisible by {where} (it shards the '{logical}' axis); "
          f'set model.vocab_size={suggestion} (a multiple of {devices} and of 128) or change '
          'the mesh.')
    raise ConfigError(f"{field}={size} is not divisible by {where}, which shards its '{logical}' "
                      f'axis; make {field} a multiple of {devices} or change the mesh.')


def compute_dtype(config: ml_collections.ConfigDict, platform: str):
  """'auto' is bfloat16 on GPU/TPU and float32 on CPU (never float16)."""
  if config.dtype == 'auto':
    return jnp.bfloat16 if platform in ('gpu', 'tpu', 'cuda', 'rocm') else jnp.float32
  return jnp.dtype(config.dtype)
