"""Which attention kernel runs: model.attention='auto' resolved for this machine.

On a TPU, the splash kernel (models/splash.py) where the sequence fills its tiles and
no bias is added; on a GPU, cuDNN's fused (flash) kernel where it compiles for the
run's shapes and dtype; else XLA's einsum-softmax-einsum. The choice is logged.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
from absl import logging

from models.config import ModelConfig


def _cudnn_compiles(cfg: ModelConfig, seq_len: int) -> bool:
  q = jax.ShapeDtypeStruct((1, seq_len, cfg.num_heads, cfg.head_dim), cfg.dtype)
  kv = jax.ShapeDtypeStruct((1, seq_len, cfg.num_kv_heads, cfg.head_dim), cfg.dtype)
  mask = jax.ShapeDtypeStruct((1, 1, seq_len, seq_len), jnp.bool_)
  bias = (jax.ShapeDtypeStruct((1, cfg.num_heads, seq_len, seq_len), cfg.dtype)
          if cfg.position == 'relative' else None)  # T5's relative position bias
  cudnn = functools.partial(jax.nn.dot_product_attention, implementation='cudnn')
  try:
    jax.jit(lambda q, k, v, m, b: cudnn(q, k, v, bias=b, mask=m)).lower(
        q, kv, kv, mask, bias).compile()
    return True
  except Exception as e:  # unsupported shape, dtype or GPU: XLA's path always works
    logging.info('cuDNN attention does not apply here (%s); using XLA.', str(e)[:200])
    return False


def resolve_attention(cfg: ModelConfig, seq_len: int) -> ModelConfig:
  """`cfg` with attention='auto' replaced by the implementation that will run for
  sequences of `seq_len` (logged). Raises ValueError for 'splash' off a TPU."""
  from models import splash  # the Pallas TPU modules load only here
  backend = jax.default_backend()
  if cfg.attention == 'splash' and backend != 'tpu':
    raise ValueError(
        f"model.attention='splash' is a TPU kernel (here it would run in Pallas's slow "
        f"interpreter on {backend}); use 'auto' or 'xla'.")
  if cfg.attention == 'auto':
    implementation = 'xla'
    if backend == 'tpu':
      if splash.applies(seq_len, seq_len, True, cfg.position == 'relative'):
        implementation = 'splash'
      else:
        logging.info('Splash attention needs seq_len a multiple of %d and no relative '
                     'position bias; using XLA.', splash.BLOCK)
    elif backend == 'gpu' and _cudnn_compiles(cfg, seq_len):
      implementation = 'cudnn'
    cfg = dataclasses.replace(cfg, attention=implementation)
  logging.info('Attention: %s.', {
      'xla': 'XLA (models/layers.py xla_attention: einsums, causal query blocks)',
      'cudnn': 'cuDNN fused flash attention',
      'splash': f'splash (Pallas TPU flash kernel) where lengths are multiples of '
                f'{splash.BLOCK} and no bias is added, XLA elsewhere'}[cfg.attention])
  return cfg


def for_inference(cfg: ModelConfig) -> ModelConfig:
  """A model trained with splash on a TPU decodes anywhere: off a TPU, 'auto' picks."""
  if cfg.attention == 'splash' and jax.default_backend() != 'tpu':
    return dataclasses.replace(cfg, attention='auto')
  return cfg
