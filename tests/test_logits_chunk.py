"""model.logits_chunk: the token loss over part of the sequence at a time gives the same
sums and gradients as the whole [B, T, V] logits at once, for both families that have a
token loss, whatever the head (tied, scaled, untied, biased, LoRA) and whether or not the
sequence is a whole number of chunks; tasks without a token loss refuse it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta

import models
import tasks
from models import losses
from configs import default
from models import ModelConfig
from train import config_checks

TASK_OF = {'decoder': 'causal_lm', 'encoder_decoder': 'span_corruption'}
CASES = [  # (family, the head's fields)
    ('decoder', {}),  # tied
    ('decoder', dict(tie_embeddings=False, lora_rank=2, lora_targets=('q', 'head'))),
    ('encoder_decoder', dict(tied_output_scale=True)),  # T5 v1.0
    ('encoder_decoder', dict(tie_embeddings=False, output_bias=True)),
]


def _cfg(arch: str, **fields) -> ModelConfig:
  return ModelConfig(arch=arch, vocab_size=96, num_layers=1, num_heads=2, num_kv_heads=2,
                     head_dim=8, d_model=16, d_ff=32, max_len=32, **fields)


def _batch(task, seq_len: int):
  """Random ids of the task's shapes; some targets unweighted."""
  rng = np.random.default_rng(0)
  batch = {k: np.asarray(v) for k, v in task.example_batch(3, seq_len).items()}
  for name in batch:
    if name.endswith('inputs') or name == 'targets':
      batch[name] = rng.integers(1, 96, batch[name].shape).astype(np.int32)
  batch['weights'] = (rng.random(batch['weights'].shape) < 0.8).astype(np.float32)
  return batch


def _loss_and_grad(task):
  return jax.jit(jax.value_and_grad(lambda p, b, rng: task.loss(p, b, rng, True),
                                    has_aux=True))


def _sums_and_grads(arch: str, chunk: int, seq_len: int, z_loss: float = 0.0, **fields):
  task = tasks.TASKS[TASK_OF[arch], arch](_cfg(arch, logits_chunk=chunk, **fields), z_loss)
  batch = _batch(task, seq_len)
  params = meta.unbox(task.init(jax.random.key(0), batch))
  params = jax.tree_util.tree_map_with_path(  # LoRA's B starts at 0: make it count
      lambda path, x: x + jax.random.normal(jax.random.key(2), x.shape)
      if 'lora_b' in jax.tree_util.keystr(path) else x, params)
  (_, sums), grads = _loss_and_grad(task)(params, batch, jax.random.key(1))
  return sums, grads


@pytest.mark.parametrize('arch, head', CASES)
def test_chunked_loss_and_gradients_equal_the_whole_sequence_at_once(arch, head):
  seq_len, z_loss = 13, 1e-3  # 13 = 3 chunks of 5, the last padded with 2 positions
  whole_sums, whole_grads = _sums_and_grads(arch, 0, seq_len, z_loss, **head)
  sums, grads = _sums_and_grads(arch, 5, seq_len, z_loss, **head)
  assert sums.keys() == whole_sums.keys()
  for name in sums:
    np.testing.assert_allclose(sums[name], whole_sums[name], rtol=1e-6, err_msg=name)
  assert whole_sums['weight'] < 3 * seq_len  # some targets weigh 0, and stay unscored
  leaves = jax.tree_util.tree_leaves_with_path(grads)
  assert len(leaves) == len(jax.tree.leaves(whole_grads))
  for (path, grad), whole in zip(leaves, jax.tree.leaves(whole_grads)):
    np.testing.assert_allclose(grad, whole, rtol=1e-5, atol=1e-6 * np.abs(whole).max(),
                               err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize('arch', sorted(TASK_OF))
def test_the_whole_logits_never_exist_when_chunked(arch):
  """In the traced loss and gradient, no [B, T, V] array: [3, 13, 96] without chunks,
  [3, 5, 96] (three balanced chunks of 5) with them."""
  def traced(chunk):
    task = tasks.TASKS[TASK_OF[arch], arch](_cfg(arch, logits_chunk=chunk))
    batch = _batch(task, 13)
    params = meta.unbox(task.init(jax.random.key(0), batch))
    return str(jax.make_jaxpr(jax.grad(lambda p: task.loss(p, batch, None, False)[0]))(params))
  whole, chunked = traced(0), traced(5)
  assert 'f32[3,13,96]' in whole and 'f32[3,5,96]' not in whole
  assert 'f32[3,13,96]' not in chunked and 'f32[3,5,96]' in chunked


@pytest.mark.parametrize('length, chunk, expected', [
    (13, 5, 5), (12, 5, 4), (114, 256, 114), (100, 64, 50), (256, 64, 64), (6, 16, 6)])
def test_chunks_are_balanced_so_padding_is_under_one_position_per_chunk(length, chunk,
                                                                         expected):
  assert losses.balanced_chunk(length, chunk) == expected


def test_balanced_chunks_never_exceed_the_field_nor_add_chunks_or_padding():
  for length in range(1, 300):
    for chunk in (1, 3, 5, 16, 64, 256):
      balanced = losses.balanced_chunk(length, chunk)
      chunks = -(-length // balanced)
      assert balanced <= chunk and chunks == -(-length // min(chunk, length))
      assert chunks * balanced - length < chunks, (length, chunk)


def test_lora_dropout_in_the_head_draws_a_new_mask_for_each_chunk():
  """Chunk c's LoRA dropout draws from the key folded with c; with one key for all, every
  chunk would drop the same adapter inputs."""
  task = tasks.TASKS['causal_lm', 'decoder'](_cfg(
      'decoder', logits_chunk=4, tie_embeddings=False, lora_rank=4, lora_dropout=0.5,
      lora_targets=('head',)))
  batch = _batch(task, 8)
  params = meta.unbox(task.init(jax.random.key(0), batch))
  lora_b = params['head']['lm_head']['lora_b']  # zeros at first: make the adapter count
  params['head']['lm_head']['lora_b'] = jax.random.normal(jax.random.key(2), lora_b.shape)
  rng = jax.random.key(3)
  _, sums = task.loss(params, batch, rng, True)
  h_BTD = task.module(True).clone(return_hidden=True).apply(
      {'params': params}, *task.model_inputs(batch), rngs={'dropout': rng})
  head = tasks.base.TokenHead(task.cfg, deterministic=False)
  head_params = {'params': {k: params[k] for k in ('token_embed', 'head')}}

  def loss_with_keys(keys):
    return sum(models.cross_entropy_sums(
        head.apply(head_params, h_BTD[:, 4 * c:4 * c + 4], rngs={'dropout': key}),
        batch['targets'][:, 4 * c:4 * c + 4], batch['weights'][:, 4 * c:4 * c + 4])[1]['loss']
               for c, key in enumerate(keys))
  np.testing.assert_allclose(sums['loss'], loss_with_keys(
      [jax.random.fold_in(rng, c) for c in range(2)]), rtol=1e-6)
  same_mask = loss_with_keys([jax.random.fold_in(rng, 0)] * 2)
  assert abs(float(sums['loss'] - same_mask)) > 1e-3 * float(sums['loss'])


@pytest.mark.parametrize('task, arch, fields', [
    ('masked_lm', 'encoder', {}),
    ('classification', 'decoder', {}),
    ('dpo', 'decoder', {'init_from': '/some/run'}),
])
def test_a_task_without_a_token_loss_refuses_logits_chunk(task, arch, fields):
  config = default.get_config()
  config.model.update(arch=arch, logits_chunk=64)
  config.task = task
  config.update(fields)
  if task == 'classification':
    config.classification.labels = ['a', 'b']
  with pytest.raises(config_checks.ConfigError, match='set --config.model.logits_chunk=0'):
    config_checks.validate(config)


def test_a_negative_logits_chunk_is_refused():
  config = default.get_config()
  config.model.logits_chunk = -1
  with pytest.raises(config_checks.ConfigError, match='model.logits_chunk=-1 must be 0'):
    config_checks.validate(config)


def test_logits_chunk_reaches_the_model_config():
  config = default.get_config()
  config.model.logits_chunk = 64
  assert tasks.model_config(config, 128, jnp.float32).logits_chunk == 64
