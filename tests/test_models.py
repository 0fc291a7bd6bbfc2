"""Model invariants: causality, packing isolation, layer options."""
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import ModelConfig, example_batch
import tasks

from conftest import initial_params

TINY = ModelConfig(vocab_size=128, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=8,
                   d_model=32, d_ff=64, max_len=32)
VARIANTS = {
    'rope_rms_gelu_tied': {},
    'learned_layernorm_swiglu_untied_gqa_bias': dict(
        position='learned', norm='layernorm', activation='silu', gated_mlp=True, tie_embeddings=False,
        num_kv_heads=2, use_bias=True),
    'sinusoidal_unscanned_remat': dict(position='sinusoidal', scan_layers=False, remat='full'),
}


@functools.lru_cache(maxsize=None)
def _init(cfg):
  """Parameters and a jitted logits function, shared by the tests of one variant."""
  task = tasks.for_model(cfg)
  logits = jax.jit(lambda p, b: task.logits(p, b))
  return initial_params(cfg), logits


def _batch(ids, segment_ids=None):
  """A batch in NumPy (built without compiling anything)."""
  ids = np.asarray(ids, np.int32)
  if segment_ids is None:
    segment_ids = np.ones_like(ids)
  segment_ids = np.asarray(segment_ids, np.int32)
  # positions restart at each new segment
  starts = np.concatenate([np.ones_like(segment_ids[:, :1], bool),
                           segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  idx = np.arange(ids.shape[1], dtype=np.int32)
  last_start = np.maximum.accumulate(np.where(starts, idx, 0), axis=1)
  return {'inputs': ids, 'segment_ids': segment_ids,
          'positions': (idx - last_start).astype(np.int32)}


@pytest.mark.parametrize('variant', sorted(VARIANTS))
def test_future_tokens_never_change_past_logits(variant):
  cfg = dataclasses.replace(TINY, **VARIANTS[variant])
  params, logits = _init(cfg)
  rng = np.random.default_rng(0)
  ids = rng.integers(3, 128, size=(2, 16))
  base = np.asarray(logits(params, _batch(ids)))
  for t in (0, 5, 14):
    perturbed = ids.copy()
    perturbed[:, t + 1:] = rng.integers(3, 128, size=perturbed[:, t + 1:].shape)
    out = np.asarray(logits(params, _batch(perturbed)))
    np.testing.assert_array_equal(np.asarray(out[:, :t + 1]), np.asarray(base[:, :t + 1]))
    assert not np.allclose(out[:, t + 1:], base[:, t + 1:])  # the perturbation is visible


@pytest.mark.parametrize('variant', sorted(VARIANTS))
def test_packed_document_ignores_other_documents(variant):
  cfg = dataclasses.replace(TINY, **VARIANTS[variant])
  params, logits = _init(cfg)
  rng = np.random.default_rng(1)
  ids = rng.integers(3, 128, size=(1, 16))
  segments = np.array([[1] * 6 + [2] * 7 + [3] * 3])
  base = np.asarray(logits(params, _batch(ids, segments)))
  changed = ids.copy()
  changed[:, :6] = rng.integers(3, 128, size=(1, 6))  # document A only
  changed[:, 13:] = rng.integers(3, 128, size=(1, 3))  # and the document after B
  out = np.asarray(logits(params, _batch(changed, segments)))
  np.testing.assert_allclose(np.asarray(out[:, 6:13]), np.asarray(base[:, 6:13]), rtol=0, atol=1e-6)
  assert not np.allclose(out[:, :6], base[:, :6])
  # Document B alone, at the start of a row, gives the same logits as packed.
  alone = np.asarray(logits(params, _batch(ids[:, 6:13])))
  np.testing.assert_allclose(np.asarray(alone[0]), np.asarray(base[0, 6:13]), atol=1e-5)


def test_parameters_carry_logical_axis_names():
  cfg = dataclasses.replace(TINY, tie_embeddings=False, use_bias=True, position='learned')
  boxed = jax.eval_shape(tasks.for_model(cfg).init, jax.random.key(0), example_batch(1, 8))
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
  specs = nn.get_partition_spec(boxed)
  assert tuple(specs['decoder']['layers']['self_attention']['query']['kernel']) == (
      'layers', 'embed', 'heads', 'kv')
  assert tuple(specs['head']['lm_head']['kernel']) == ('embed', 'vocab')


def test_bfloat16_compute_keeps_float32_params_and_loss():
  cfg = dataclasses.replace(TINY, dtype=jnp.bfloat16)
  task = tasks.for_model(cfg)
  batch = example_batch(2, 16) | {'inputs': jnp.arange(32, dtype=jnp.int32).reshape(2, 16)}
  params = nn.unbox(jax.jit(task.init)(jax.random.key(0), batch))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  assert jax.jit(task.logits)(params, batch).dtype == jnp.bfloat16
  loss, sums = jax.jit(lambda p, b: task.loss(p, b, None, False))(params, batch)
  assert loss.dtype == jnp.float32 and np.isfinite(float(loss))


@pytest.mark.parametrize('arch', ['decoder', 'encoder_decoder'])
def test_remat_policies_and_scan_give_the_plain_models_gradients(arch):
  from inference.generate import unrolled_layers
  base = dataclasses.replace(TINY, arch=arch, position='learned' if arch == 'decoder'
                             else 'relative')
  task = tasks.for_model(base)
  batch = task.example_batch(2, 16)
  rng = np.random.default_rng(0)
  for key in ('inputs', 'targets', 'encoder_inputs', 'decoder_inputs'):
    if key in batch:
      batch[key] = jnp.asarray(rng.integers(6, 128, batch[key].shape), jnp.int32)
  scanned_params = initial_params(base)  # as task.init(key 0, batch) makes them

  def gradients(cfg, params):
    loss = lambda p: tasks.for_model(cfg).loss(p, batch, jax.random.key(1), train=False)[0]
    return jax.jit(jax.grad(loss))(params)

  expected = gradients(base, scanned_params)  # scanned, no remat
  unrolled = jax.jit(lambda p: unrolled_layers(base, p)[1])
  unrolled_params, expected_unrolled = unrolled(scanned_params), unrolled(expected)
  for remat, scan in [('none', False), ('dots_saveable', True), ('full', True), ('full', False)]:
    cfg = dataclasses.replace(base, remat=remat, scan_layers=scan)
    got = gradients(cfg, scanned_params if scan else unrolled_params)
    want = expected if scan else expected_unrolled
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      # Other orders of float32 sums: a few ulps of each gradient's scale (AVX-512 and AVX2
      # CPUs order them differently; a wrong recomputation is off by far more).
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * np.abs(b).max())


@pytest.mark.parametrize('length, blocks', [(128, 2), (256, 4), (96, 1)])
def test_causal_attention_in_query_blocks_equals_the_full_product(length, blocks):
  """Queries split into blocks that skip their future keys: outputs and gradients of
  jax.nn.dot_product_attention, over packed documents, grouped heads and a bias."""
  from models.layers import attention_mask, causal_query_blocks, xla_attention
  assert causal_query_blocks(length) == blocks
  B, N, G, K = 2, 4, 2, 8
  keys = jax.random.split(jax.random.key(0), 5)
  q = jax.random.normal(keys[0], (B, length, N, K))
  k, v = (jax.random.normal(key, (B, length, G, K)) for key in keys[1:3])
  bias = jax.random.normal(keys[3], (1, N, length, length))
  segments = jnp.asarray([[1] * (length // 3) + [2] * (length - length // 3),
                          [1] * (length - 5) + [0] * 5])  # two documents; padding
  mask = attention_mask(segments, segments, causal=True)
  repeat = lambda x: jnp.repeat(x, N // G, axis=2)  # query head n reads kv head n // (N/G)
  ours = lambda q, k, v: xla_attention(q, k, v, mask, bias, 0.3)
  reference = lambda q, k, v: jax.nn.dot_product_attention(
      q, repeat(k), repeat(v), bias=bias, mask=mask.dense_B1TS, scale=0.3, implementation='xla')
  cotangent = jax.random.normal(keys[4], q.shape)
  outputs_and_gradients = lambda f: jax.jit(
      lambda q, k, v: (f(q, k, v), jax.vjp(f, q, k, v)[1](cotangent)))(q, k, v)
  (got_out, got), (want_out, want) = map(outputs_and_gradients, (ours, reference))
  np.testing.assert_allclose(got_out, want_out, atol=2e-5, rtol=2e-5)
  for got_grad, want_grad in zip(got, want):
    np.testing.assert_allclose(got_grad, want_grad, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize('num_input_axes', [1, 2])
def test_two_d_product_gradients_equal_autodiffs(num_input_axes):
  from models.layers import _contract, contract_inputs
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], (3, 5, 4, 6))  # [B, T, in...] with in = (6,) or (4, 6)
  kernel = jax.random.normal(keys[1], x.shape[4 - num_input_axes:] + (7, 2))
  cotangent = jax.random.normal(keys[2], x.shape[:4 - num_input_axes] + (7, 2))
  ours = jax.vjp(lambda x, k: contract_inputs(x, k, num_input_axes), x, kernel)
  autodiff = jax.vjp(lambda x, k: _contract(x, k, num_input_axes), x, kernel)
  np.testing.assert_allclose(ours[0], autodiff[0], rtol=1e-6)
  for got, want in zip(ours[1](cotangent), autodiff[1](cotangent)):
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('tokens', [0, 3])
def test_two_d_product_cotangents_take_the_primals_dtypes_and_shapes(tokens):
  from models.layers import contract_inputs
  x = jnp.ones((tokens, 5, 4), jnp.bfloat16)
  kernel = jnp.ones((4, 6, 2), jnp.float32)
  y, backward = jax.vjp(lambda x, k: contract_inputs(x, k, 1), x, kernel)
  dx, dkernel = backward(jnp.ones_like(y))
  assert (dx.shape, dx.dtype, dkernel.shape, dkernel.dtype) == (
      x.shape, x.dtype, kernel.shape, kernel.dtype)
  np.testing.assert_allclose(dkernel, jnp.full(kernel.shape, 5.0 * tokens))
