"""Hyper-parameters of one transformer: a frozen dataclass passed once to every layer.

The model knows nothing of the run config; `tasks.model_config` maps a run config to it.
"""
import dataclasses

import jax
import jax.numpy as jnp

ARCHS = ('decoder', 'encoder', 'encoder_decoder')
POSITIONS = ('auto', 'learned', 'sinusoidal', 'rope', 'relative')
# 'auto' picks each family's customary positions.
DEFAULT_POSITION = {'decoder': 'rope', 'encoder': 'learned', 'encoder_decoder': 'relative'}
NORMS = ('layernorm', 'rmsnorm')
MLPS = ('gelu', 'swiglu')
# What the backward pass may keep instead of recomputing; 'none' does not rematerialise.
REMAT_POLICIES = {
    'none': None,
    'dots_saveable': jax.checkpoint_policies.dots_saveable,
    'full': jax.checkpoint_policies.nothing_saveable,
}
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
  relative_buckets: int = 32  # T5's relative position bias: learned buckets (split between
  #                              the two directions in a bidirectional stack)
  relative_max_distance: int = 128  # distances beyond this share the last bucket
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


def padded_vocab_size(tokenizer_vocab: int, multiple: int = 128) -> int:
  """Embedding rows: the tokenizer's vocabulary rounded up so matmuls tile evenly."""
  return -(-tokenizer_vocab // multiple) * multiple
