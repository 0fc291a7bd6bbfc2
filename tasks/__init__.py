"""The task registry: `config.task` -> the module that owns that objective.

A new task is one module (a `Task` subclass, tasks/base.py) and one line here.
"""
import jax.numpy as jnp
import ml_collections

from models import lora as lora_lib
from models.config import DEFAULT_POSITION, ModelConfig
from tasks.base import Task
from tasks.causal_lm import CausalLM
from tasks.classification import ClassifierDecoder, ClassifierEncoder
from tasks.dpo import DPODecoder, DPOEncoderDecoder
from tasks.masked_lm import MaskedLM
from tasks.seq2seq import Seq2SeqDecoder, Seq2SeqEncoderDecoder
from tasks.sft import SFTDecoder, SFTEncoderDecoder
from tasks.span_corruption import SpanCorruption

# (config.task, model.arch) -> the class that trains that family on that task.
TASKS: dict[tuple[str, str], type[Task]] = {
    (t.name, t.arch): t for t in (CausalLM, MaskedLM, SpanCorruption, SFTDecoder,
                                  SFTEncoderDecoder, Seq2SeqDecoder, Seq2SeqEncoderDecoder,
                                  ClassifierEncoder, ClassifierDecoder, DPODecoder,
                                  DPOEncoderDecoder)}
NAMES = tuple(dict.fromkeys(name for name, _ in TASKS))
# config.task='auto' trains each family on its pre-training objective.
DEFAULT_TASK = {'decoder': 'causal_lm', 'encoder': 'masked_lm',
                'encoder_decoder': 'span_corruption'}


def task_class(config: ml_collections.ConfigDict) -> type[Task]:
  """The class for the run's task and family."""
  return _lookup(config.task, config.model.arch)


def _lookup(name: str, arch: str) -> type[Task]:
  """TASKS[name, arch] ('auto': the family's pre-training objective); ValueError (one
  line) when the task does not train that family."""
  name = DEFAULT_TASK[arch] if name == 'auto' else name
  if (name, arch) not in TASKS:
    archs = [a for n, a in TASKS if n == name]
    raise ValueError(f"task='{name}' needs model.arch={' or '.join(map(repr, archs))}, not "
                     f"'{arch}'; change one of them (or set task='auto').")
  return TASKS[name, arch]


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
      attention=m.attention, logits_chunk=m.logits_chunk, dtype=dtype,
      param_dtype=jnp.dtype(config.param_dtype),
      **_lora_fields(config), **task_class(config).model_fields(config))


def _lora_fields(config: ml_collections.ConfigDict) -> dict:
  lora = config.get('lora')
  if not lora or not lora.rank:
    return {}
  return dict(lora_rank=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
              lora_targets=lora_lib.parse_targets(lora.targets))


def from_config(config: ml_collections.ConfigDict, cfg: ModelConfig) -> Task:
  """The run's task, training the model `cfg`."""
  return task_class(config).from_config(config, cfg)


def for_model(cfg: ModelConfig, name: str = 'auto', **settings) -> Task:
  """A task for a bare ModelConfig (tests, benchmarks): the family's pre-training
  objective unless `name` says otherwise; `settings` are the task's own fields."""
  name = DEFAULT_TASK[cfg.arch] if name == 'auto' else name
  # A task of another family still constructs, and refuses the model in one line.
  same_name = [t for (n, _), t in TASKS.items() if n == name]
  if not same_name:
    raise ValueError(f"No task '{name}'; the tasks are {', '.join(NAMES)}.")
  return TASKS.get((name, cfg.arch), same_name[0])(cfg, **settings)
