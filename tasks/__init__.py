"""The task registry: `config.task` -> the module that owns that objective.

A new task is one module (a `Task` subclass, tasks/base.py) and one line here.
"""
import jax.numpy as jnp
import ml_collections

from models.config import DEFAULT_POSITION, ModelConfig
from tasks.base import Task
from tasks.causal_lm import CausalLM
from tasks.masked_lm import MaskedLM
from tasks.span_corruption import SpanCorruption

TASKS: dict[str, type[Task]] = {t.name: t for t in (CausalLM, MaskedLM, SpanCorruption)}
# config.task='auto' trains each family on its pre-training objective.
DEFAULT_TASK = {'decoder': 'causal_lm', 'encoder': 'masked_lm',
                'encoder_decoder': 'span_corruption'}


def task_class(config: ml_collections.ConfigDict) -> type[Task]:
  name = config.task
  return TASKS[DEFAULT_TASK[config.model.arch] if name == 'auto' else name]


def model_config(config: ml_collections.ConfigDict, vocab_size: int, dtype) -> ModelConfig:
  """The ModelConfig a run of `config` builds; `vocab_size` is the padded embedding size."""
  m = config.model
  return ModelConfig(
      arch=m.arch, vocab_size=vocab_size, num_layers=m.num_layers,
      num_decoder_layers=m.num_decoder_layers,
      num_heads=m.num_heads, num_kv_heads=m.num_kv_heads or m.num_heads,
      head_dim=m.head_dim or m.d_model // m.num_heads, d_model=m.d_model,
      d_ff=m.d_ff, max_len=m.max_len,
      position=DEFAULT_POSITION[m.arch] if m.position == 'auto' else m.position,
      rope_theta=m.rope_theta, relative_buckets=m.relative_buckets,
      relative_max_distance=m.relative_max_distance, num_token_types=m.num_token_types,
      norm=m.norm, norm_eps=m.norm_eps, block_order=m.block_order, embed_norm=m.embed_norm,
      final_norm=m.final_norm, activation=m.activation, gated_mlp=m.gated_mlp,
      attention_scale=m.attention_scale, mlm_transform=m.mlm_transform,
      output_bias=m.output_bias, tie_embeddings=m.tie_embeddings,
      tied_output_scale=m.tied_output_scale, use_bias=m.use_bias,
      dropout=m.dropout, scan_layers=m.scan_layers, remat=m.remat,
      attention=m.attention, dtype=dtype, param_dtype=jnp.dtype(config.param_dtype),
      **task_class(config).model_fields(config))


def from_config(config: ml_collections.ConfigDict, cfg: ModelConfig) -> Task:
  """The run's task, training the model `cfg`."""
  return task_class(config).from_config(config, cfg)


def for_model(cfg: ModelConfig, name: str = 'auto', **settings) -> Task:
  """A task for a bare ModelConfig (tests, benchmarks): the family's pre-training
  objective unless `name` says otherwise; `settings` are the task's own fields."""
  return TASKS[DEFAULT_TASK[cfg.arch] if name == 'auto' else name](cfg, **settings)
