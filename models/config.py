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
ACTIVATIONS = ('gelu_tanh', 'gelu', 'relu', 'silu')  # 'gelu' is the exact (erf) form
BLOCK_ORDERS = ('pre_norm', 'post_norm')
# What the backward pass may keep instead of recomputing; 'none' does not rematerialise.
REMAT_POLICIES = {
    'none': None,
    'dots_saveable': jax.checkpoint_policies.dots_saveable,
    'full': jax.checkpoint_policies.nothing_saveable,
}
ATTENTION_IMPLS = ('auto', 'xla', 'cudnn', 'splash')
# Layers a LoRA adapter may attach to: the attention projections, the MLP's up (and gate)
# and down projections, and an untied output projection.
LORA_TARGETS = ('q', 'k', 'v', 'o', 'mlp_in', 'mlp_out', 'head')


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hyper-parameters of one transformer; layers read what they need from it."""
  arch: str = 'decoder'
  vocab_size: int = 256
  num_layers: int = 2  # an encoder-decoder's encoder depth
  num_decoder_layers: int = 0  # an encoder-decoder's decoder depth; 0: num_layers
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
  block_order: str = 'pre_norm'  # 'post_norm': x = norm(x + f(x)) (BERT)
  embed_norm: bool = False  # a norm on the embedding sum (BERT)
  final_norm: bool = True  # a norm on the last block's output (every stack's)
  activation: str = 'gelu_tanh'  # of the MLP (and of the MLM transform)
  gated_mlp: bool = False  # activation(x W_gate) * (x W_up): silu -> SwiGLU, gelu_tanh -> GeGLU
  attention_scale: float = 0.0  # multiplies q.k; 0: 1/sqrt(head_dim) (T5 uses 1)
  num_token_types: int = 0  # segment (token-type) embeddings, e.g. 2 for BERT's A/B; 0: none
  nsp_head: bool = False  # BERT's pooler (dense + tanh) on the first token, and (without
  #                         num_labels) a binary next-sentence classifier on it
  num_labels: int = 0  # >0: a classifier over this many labels replaces the token logits
  #                      (an encoder's on its first token, pooled; a decoder's on its last
  #                      real token)
  mlm_transform: bool = False  # dense -> activation -> norm before the output projection (BERT)
  output_bias: bool = False  # a learned bias per vocabulary entry on the logits
  tie_embeddings: bool = True
  tied_output_scale: bool = False  # scale the last hidden by d_model**-0.5 before the tied
  #                                  projection (T5 v1.0)
  use_bias: bool = False
  dropout: float = 0.0
  scan_layers: bool = True
  remat: str = 'none'
  attention: str = 'auto'
  logits_chunk: int = 0  # >0: a token loss computes the output head and softmax over at
  #                        most this many sequence positions at a time (equal chunks,
  #                        losses.balanced_chunk), recomputed in the backward pass, so the
  #                        [B, T, V] logits never exist whole; 0: all at once
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  decode: bool = False  # one token at a time over a key/value cache (inference only)
  lora_rank: int = 0  # >0: low-rank adapters on lora_targets (Hu et al. 2021, models/lora.py)
  lora_alpha: float = 16.0  # the adapters' output is scaled by lora_alpha / lora_rank
  lora_dropout: float = 0.0  # dropout on the adapters' input, in training
  lora_targets: tuple[str, ...] = ()  # of LORA_TARGETS


def padded_vocab_size(tokenizer_vocab: int, multiple: int = 128) -> int:
  """Embedding rows: the tokenizer's vocabulary rounded up so matmuls tile evenly."""
  return -(-tokenizer_vocab // multiple) * multiple
