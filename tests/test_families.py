"""Encoder (BERT) and encoder-decoder (T5) models: attention patterns, packing isolation,
and a layer-by-layer check against a plain-NumPy reference."""
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import ModelConfig
from models.layers import Block, attention_mask, relative_position_buckets
import tasks

from conftest import initial_params

TINY = ModelConfig(vocab_size=128, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=8,
                   d_model=32, d_ff=64, max_len=32)


@functools.lru_cache(maxsize=None)
def _task(arch: str, **changes):
  cfg = dataclasses.replace(TINY, arch=arch, **changes)
  task = tasks.for_model(cfg)
  return task, initial_params(cfg), jax.jit(lambda p, b: task.logits(p, b))


def _positions(segment_ids):
  starts = np.concatenate([np.ones_like(segment_ids[:, :1], bool),
                           segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  index = np.arange(segment_ids.shape[1])
  return index - np.maximum.accumulate(np.where(starts, index, 0), axis=1)


def _encoder_batch(ids, segment_ids=None):
  segment_ids = np.ones_like(ids) if segment_ids is None else segment_ids
  return {'inputs': jnp.asarray(ids, jnp.int32), 'segment_ids': jnp.asarray(segment_ids, jnp.int32),
          'positions': jnp.asarray(_positions(segment_ids), jnp.int32)}


@pytest.mark.parametrize('position', ['learned', 'relative', 'rope'])
def test_encoder_is_bidirectional(position):
  _, params, logits = _task('encoder', position=position)
  rng = np.random.default_rng(0)
  ids = rng.integers(6, 128, size=(1, 12))
  base = np.asarray(logits(params, _encoder_batch(ids)))
  for t in (0, 5, 11):
    changed = ids.copy()
    changed[0, t] = (ids[0, t] + 1 - 6) % 122 + 6
    out = np.asarray(logits(params, _encoder_batch(changed)))
    others = [i for i in range(12) if i != t]
    assert np.all(np.abs(out[0, others] - base[0, others]).max(axis=-1) > 1e-6), t


def test_encoder_packed_examples_do_not_see_each_other():
  _, params, logits = _task('encoder', position='learned')
  rng = np.random.default_rng(1)
  ids = rng.integers(6, 128, size=(1, 12))
  segments = np.array([[1] * 5 + [2] * 7])
  base = np.asarray(logits(params, _encoder_batch(ids, segments)))
  changed = ids.copy()
  changed[0, :5] = rng.integers(6, 128, size=5)
  out = np.asarray(logits(params, _encoder_batch(changed, segments)))
  np.testing.assert_allclose(out[0, 5:], base[0, 5:], atol=1e-6)


def _seq2seq_batch(enc_ids, dec_ids, enc_segments=None, dec_segments=None):
  enc_segments = np.ones_like(enc_ids) if enc_segments is None else enc_segments
  dec_segments = np.ones_like(dec_ids) if dec_segments is None else dec_segments
  as_int = lambda x: jnp.asarray(x, jnp.int32)
  return {'encoder_inputs': as_int(enc_ids), 'encoder_segment_ids': as_int(enc_segments),
          'encoder_positions': as_int(_positions(enc_segments)),
          'decoder_inputs': as_int(dec_ids), 'decoder_segment_ids': as_int(dec_segments),
          'decoder_positions': as_int(_positions(dec_segments))}


@pytest.mark.parametrize('position', ['relative', 'rope'])
def test_decoder_is_causal_and_reads_every_encoder_token(position):
  _, params, logits = _task('encoder_decoder', position=position)
  rng = np.random.default_rng(2)
  enc = rng.integers(6, 128, size=(1, 10))
  dec = rng.integers(6, 128, size=(1, 8))
  base = np.asarray(logits(params, _seq2seq_batch(enc, dec)))
  for t in (0, 3, 6):
    changed = dec.copy()
    changed[0, t + 1:] = rng.integers(6, 128, size=7 - t)
    out = np.asarray(logits(params, _seq2seq_batch(enc, changed)))
    np.testing.assert_array_equal(out[0, :t + 1], base[0, :t + 1])
  for s in range(10):
    changed = enc.copy()
    changed[0, s] = (enc[0, s] + 1 - 6) % 122 + 6
    out = np.asarray(logits(params, _seq2seq_batch(changed, dec)))
    assert np.abs(out - base).max(axis=-1).min() > 1e-6, s  # every decoder position moves


def test_encoder_decoder_packed_examples_are_isolated():
  _, params, logits = _task('encoder_decoder', position='relative')
  rng = np.random.default_rng(3)
  enc = rng.integers(6, 128, size=(1, 10))
  dec = rng.integers(6, 128, size=(1, 8))
  enc_seg = np.array([[1] * 4 + [2] * 6])
  dec_seg = np.array([[1] * 3 + [2] * 5])
  base = np.asarray(logits(params, _seq2seq_batch(enc, dec, enc_seg, dec_seg)))
  enc2, dec2 = enc.copy(), dec.copy()
  enc2[0, :4] = rng.integers(6, 128, size=4)  # example 1's encoder tokens
  dec2[0, :3] = rng.integers(6, 128, size=3)  # and its decoder tokens
  out = np.asarray(logits(params, _seq2seq_batch(enc2, dec2, enc_seg, dec_seg)))
  np.testing.assert_allclose(out[0, 3:], base[0, 3:], atol=1e-6)
  assert not np.allclose(out[0, :3], base[0, :3])


def test_relative_buckets_match_t5_definition():
  rel = np.arange(-200, 201)[None, None, :]
  b = np.asarray(relative_position_buckets(jnp.asarray(rel), True, 32, 128))[0, 0]
  assert b[200] == 0 and b[201] == 16 + 1 and b[199] == 1  # exact near zero, sign split
  assert b.min() == 0 and b.max() == 31 and b[-1] == 31 and b[0] == 15
  causal = np.asarray(relative_position_buckets(jnp.asarray(rel), False, 32, 128))[0, 0]
  assert np.all(causal[201:] == 0) and causal[0] == 31  # the future is one bucket


# --- plain-NumPy reference ---------------------------------------------------

def _np_rms_norm(x, scale, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _np_attention(x, kv, p, mask, num_heads):
  q = np.einsum('td,dnk->tnk', x, p['query']['kernel'])
  k = np.einsum('sd,dnk->snk', kv, p['key']['kernel'])
  v = np.einsum('sd,dnk->snk', kv, p['value']['kernel'])
  scores = np.einsum('tnk,snk->nts', q, k) / np.sqrt(q.shape[-1])
  scores = np.where(mask[None], scores, -np.inf)
  weights = np.exp(scores - scores.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  out = np.einsum('nts,snk->tnk', weights, v)
  return np.einsum('tnk,nkd->td', out, p['out']['kernel'])


def _np_gelu(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def _np_block(x, p, self_mask, eps, encoded=None, cross_mask=None):
  h = _np_rms_norm(x, p['pre_self_attention_norm']['scale'], eps)
  x = x + _np_attention(h, h, p['self_attention'], self_mask, 4)
  if encoded is not None:
    h = _np_rms_norm(x, p['pre_cross_attention_norm']['scale'], eps)
    x = x + _np_attention(h, encoded, p['cross_attention'], cross_mask, 4)
  h = _np_rms_norm(x, p['pre_mlp_norm']['scale'], eps)
  return x + _np_gelu(h @ p['mlp']['up']['kernel']) @ p['mlp']['down']['kernel']


@pytest.mark.parametrize('cross_attention', [False, True])
def test_blocks_match_a_numpy_reference(cross_attention):
  cfg = dataclasses.replace(TINY, position='learned')
  rng = np.random.default_rng(4)
  x = rng.normal(size=(1, 6, 32)).astype(np.float32)
  encoded = rng.normal(size=(1, 5, 32)).astype(np.float32)
  seg_x, seg_e = np.ones((1, 6), np.int32), np.ones((1, 5), np.int32)
  causal = cross_attention  # the decoder block is causal, the encoder block is not
  self_mask = attention_mask(jnp.asarray(seg_x), jnp.asarray(seg_x), causal=causal)
  cross_mask = attention_mask(jnp.asarray(seg_x), jnp.asarray(seg_e), causal=False)
  block = Block(cfg, cross_attention=cross_attention)
  args = (jnp.asarray(x), self_mask, jnp.zeros((1, 6), jnp.int32), None,
          jnp.asarray(encoded) if cross_attention else None, cross_mask if cross_attention else None)
  # Compiled, not run op by op (faster; the same block).
  params = nn.unbox(jax.jit(lambda key: block.init(key, *args)['params'])(jax.random.key(5)))
  # Non-trivial norm scales, so a reference that ignored them would fail.
  params = jax.tree_util.tree_map_with_path(
      lambda path, v: v * 1.5 if path[-1].key == 'scale' else v, params)
  out, _ = jax.jit(lambda p: block.apply({'params': p}, *args))(params)
  np_params = jax.tree.map(np.asarray, params)
  expected = _np_block(x[0], np_params, np.asarray(self_mask.dense_B1TS[0, 0]), cfg.norm_eps,
                       encoded[0] if cross_attention else None,
                       np.asarray(cross_mask.dense_B1TS[0, 0]))
  np.testing.assert_allclose(np.asarray(out[0]), expected, rtol=2e-5, atol=2e-5)


def test_masked_lm_loss_counts_only_chosen_positions():
  task, params, _ = _task('encoder', position='learned')
  rng = np.random.default_rng(6)
  batch = _encoder_batch(rng.integers(6, 128, size=(2, 12)))
  weights = np.zeros((2, 12), np.float32)
  weights[:, [2, 7]] = 1.0
  targets = rng.integers(6, 128, size=(2, 12))
  batch.update(targets=jnp.asarray(targets, jnp.int32), weights=jnp.asarray(weights),
               token_type_ids=jnp.zeros((2, 12), jnp.int32))
  loss_and_sums = jax.jit(lambda p, b: task.loss(p, b, None, False))
  loss, sums = loss_and_sums(params, batch)
  other = targets.copy()
  other[weights == 0] = rng.integers(6, 128, size=int((weights == 0).sum()))
  loss_other, _ = loss_and_sums(params, batch | {'targets': jnp.asarray(other, jnp.int32)})
  assert float(sums['weight']) == 4.0
  np.testing.assert_allclose(float(loss_other), float(loss), rtol=1e-6)
  other[0, 2] = (targets[0, 2] + 1 - 6) % 122 + 6  # a chosen position does count
  loss_chosen, _ = loss_and_sums(params, batch | {'targets': jnp.asarray(other, jnp.int32)})
  assert abs(float(loss_chosen) - float(loss)) > 1e-4
