"""The model's own view of the run config: a frozen dataclass passed once to every layer."""
import dataclasses

import jax.numpy as jnp
import ml_collections

ARCHS = ('decoder', 'encoder', 'encoder_decoder')
POSITIONS = ('auto', 'learned', 'sinusoidal', 'rope', 'relative')
# 'auto' picks each family's customary positions.
DEFAULT_POSITION = {'decoder': 'rope', 'encoder': 'learned', 'encoder_decoder': 'relative'}
NORMS = ('layernorm', 'rmsnorm')
MLPS = ('gelu', 'swiglu')
REMAT_POLICIES = ('none', 'dots_saveable', 'full')
ATTENTION_IMPLS = ('auto', 'xla', 'cudnn', 'splash')


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hyper-parameters of one transformer; layers read what they need from it."""
  arch: str = 'decoder'
  vocab_size: int = 256
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 4
  head_dim: int = 32
  d_model: int = 128
  d_ff: int = 512
  max_len: int = 128
  position: str = 'rope'
  rope_theta: float = 10_000.0
  norm: str = 'rmsnorm'
  norm_eps: float = 1e-6
  mlp: str = 'gelu'
  num_token_types: int = 0  # segment (token-type) embeddings, e.g. 2 for BERT's A/B; 0: none
  nsp_head: bool = False  # a binary next-sentence head on the first ([CLS]) token
  tie_embeddings: bool = True
  use_bias: bool = False
  dropout: float = 0.0
  scan_layers: bool = True
  remat: str = 'none'
  attention: str = 'auto'
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  decode: bool = False  # one token at a time over a key/value cache (inference only)

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, vocab_size: int,
                  dtype: jnp.dtype) -> 'ModelConfig':
    """Builds the model config from a run config; `vocab_size` is the padded embedding size."""
    m = config.model
    return cls(
        arch=m.arch, vocab_size=vocab_size, num_layers=m.num_layers,
        num_heads=m.num_heads, num_kv_heads=m.num_kv_heads or m.num_heads,
        head_dim=m.head_dim or m.d_model // m.num_heads, d_model=m.d_model,
        d_ff=m.d_ff, max_len=m.max_len,
        position=DEFAULT_POSITION[m.arch] if m.position == 'auto' else m.position,
        rope_theta=m.rope_theta, num_token_types=m.num_token_types,
        nsp_head=m.arch == 'encoder' and config.masked_lm.next_sentence,
        norm=m.norm, norm_eps=m.norm_eps, mlp=m.mlp,
        tie_embeddings=m.tie_embeddings, use_bias=m.use_bias,
        dropout=m.dropout, scan_layers=m.scan_layers, remat=m.remat,
        attention=m.attention, dtype=dtype,
        param_dtype=jnp.dtype(config.param_dtype))


def padded_vocab_size(tokenizer_vocab: int, multiple: int = 128) -> int:
  """Embedding rows: the tokenizer's vocabulary rounded up so matmuls tile evenly."""
  return -(-tokenizer_vocab // multiple) * multiple
