"""Splash attention (the TPU kernel, run here by Pallas's interpreter) gives the same
losses and gradients as XLA's attention for each family, with packed documents and
grouped-query heads; calls it cannot take fall back to XLA. Its sharded form is
checked in tests/test_sharding.py."""
import dataclasses
import functools

import flax.linen as nn
import jax
import numpy as np
import pytest

from inference import generate
from models import ModelConfig, kernels
import tasks


SEQ_LEN = 128  # one kernel tile
TINY = ModelConfig(vocab_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                   d_model=32, d_ff=64, max_len=SEQ_LEN)


def _packed(batch: dict) -> dict:
  """Random tokens, and two documents per row (positions restart at the second)."""
  rng = np.random.default_rng(0)
  first = 50
  segments = np.where(np.arange(SEQ_LEN) < first, 1, 2).astype(np.int32)
  positions = np.where(segments == 1, np.arange(SEQ_LEN), np.arange(SEQ_LEN) - first)
  packed = {}
  for name, value in batch.items():
    value = np.asarray(value)
    if name.endswith('segment_ids'):
      value = np.broadcast_to(segments, value.shape)
    elif name.endswith('positions'):
      value = np.broadcast_to(positions, value.shape).astype(value.dtype)
    elif name.endswith('inputs') or name == 'targets':
      value = rng.integers(6, TINY.vocab_size, size=value.shape).astype(value.dtype)
    packed[name] = value
  return packed


def _params(cfg: ModelConfig):
  """Initial parameters of `cfg`, made once: the same weights whichever attention runs
  and whatever the batch's length and contents."""
  return _init(dataclasses.replace(cfg, attention='xla'))


@functools.lru_cache(maxsize=None)
def _init(cfg: ModelConfig):
  task = tasks.for_model(cfg)
  return nn.unbox(jax.jit(task.init)(jax.random.key(1), task.example_batch(2, SEQ_LEN)))


def _loss_fn(cfg: ModelConfig, batch):
  task = tasks.for_model(cfg)
  return lambda p: task.loss(p, batch, jax.random.key(0), train=False)[0]


def _loss_and_grads(cfg: ModelConfig, params, batch):
  return jax.jit(jax.value_and_grad(_loss_fn(cfg, batch)))(params)


@pytest.mark.parametrize('changes', [
    dict(arch='decoder', position='rope'),  # causal
    dict(arch='encoder', position='learned', num_token_types=2),  # bidirectional
    dict(arch='encoder_decoder', position='rope'),  # and cross-attention
])
def test_splash_gives_xla_losses_and_gradients(changes):
  cfg = dataclasses.replace(TINY, attention='xla', **changes)
  task = tasks.for_model(cfg)
  batch = _packed(task.example_batch(2, SEQ_LEN))
  params = _params(cfg)
  xla_loss, xla_grads = _loss_and_grads(cfg, params, batch)
  splash_cfg = dataclasses.replace(cfg, attention='splash')
  splash_loss, splash_grads = _loss_and_grads(splash_cfg, params, batch)
  np.testing.assert_allclose(splash_loss, xla_loss, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               splash_grads, xla_grads)
  # The kernel really ran.
  assert 'pallas_call' in str(jax.make_jaxpr(_loss_fn(splash_cfg, batch))(params))


@pytest.mark.parametrize('position,seq_len', [('relative', SEQ_LEN), ('rope', 96)])
def test_splash_leaves_what_it_cannot_take_to_xla(position, seq_len):
  """A relative position bias, or a sequence of partial tiles: XLA runs instead."""
  cfg = dataclasses.replace(TINY, position=position, attention='splash')
  batch = tasks.for_model(cfg).example_batch(2, seq_len)
  params = _params(cfg)
  traced = jax.jit(_loss_fn(cfg, batch)).trace(params)  # the loss, traced once
  assert 'pallas_call' not in str(traced.jaxpr)
  xla_loss = jax.jit(_loss_fn(dataclasses.replace(cfg, attention='xla'), batch))(params)
  np.testing.assert_allclose(traced.lower().compile()(params), xla_loss, rtol=1e-6)


def test_a_splash_model_decodes_like_an_xla_model():
  """Over the key/value cache the mask has no segment ids, so XLA attends."""
  cfg = dataclasses.replace(TINY, position='rope', attention='splash')
  params = _params(cfg)
  prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
  tokens = generate.generate(tasks.for_model(cfg), params, prompts, 6)
  xla = tasks.for_model(dataclasses.replace(cfg, attention='xla'))
  assert tokens == generate.generate(xla, params, prompts, 6)


def test_training_refuses_splash_off_tpu():
  with pytest.raises(ValueError, match="'splash' is a TPU kernel"):
    kernels.resolve_attention(dataclasses.replace(TINY, attention='splash'), SEQ_LEN)
