"""Losses that hide the model family from the train loop.

An objective turns (params, batch) into a scalar to differentiate and a dict of
metric *sums* (never means), so micro-batches, eval batches and hosts add up
exactly: the loop divides by the summed 'weight' (number of scored tokens) once.
"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.config import ModelConfig
from models.transformer import DecoderOnly, EncoderDecoder, EncoderOnly

Array = jax.Array
Batch = dict[str, Array]


def cross_entropy_sums(logits_BTV: Array, targets_BT: Array, weights_BT: Array,
                       z_loss: float = 0.0) -> tuple[Array, dict[str, Array]]:
  """Token cross-entropy in float32, with an optional z-loss on log Z.

  Returns (objective_sum, metrics) where objective_sum = Σ w·(nll + z_loss·logZ²)
  and metrics hold 'loss' (Σ w·nll), 'z_loss', 'correct' and 'weight' sums.
  """
  logits_BTV = logits_BTV.astype(jnp.float32)
  log_z_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
  nll_BT = log_z_BT - target_logit_BT
  z_BT = z_loss * jnp.square(log_z_BT)
  correct_BT = (jnp.argmax(logits_BTV, axis=-1) == targets_BT).astype(jnp.float32)
  metrics = {
      'loss': jnp.sum(nll_BT * weights_BT),
      'z_loss': jnp.sum(z_BT * weights_BT),
      'correct': jnp.sum(correct_BT * weights_BT),
      'weight': jnp.sum(weights_BT),
  }
  return metrics['loss'] + metrics['z_loss'], metrics


def normalize_metrics(sums: dict[str, Array]) -> dict[str, Array]:
  """Per-token means of token metrics (over 'weight'), per-example means of 'nsp_*'
  metrics (over 'nsp_count'); the counts themselves are dropped."""
  tokens = jnp.maximum(sums['weight'], 1.0)
  examples = jnp.maximum(sums.get('nsp_count', 1.0), 1.0)
  return {k: v / (examples if k.startswith('nsp_') else tokens)
          for k, v in sums.items() if k not in ('weight', 'nsp_count')}


@dataclasses.dataclass(frozen=True)
class CausalLM:
  """Next-token prediction with a decoder-only transformer (GPT)."""
  cfg: ModelConfig
  z_loss: float = 0.0

  def module(self, train: bool) -> nn.Module:
    return DecoderOnly(self.cfg, deterministic=not train)

  def logits(self, params, batch: Batch, train: bool = False, dropout_rng=None) -> Array:
    rngs = {'dropout': dropout_rng} if train else {}
    return self.module(train).apply({'params': params}, batch['inputs'], batch['segment_ids'],
                                    batch['positions'], rngs=rngs)

  def init(self, rng: Array, batch: Batch):
    """Returns boxed (logically partitioned) parameters."""
    return self.module(False).init(rng, batch['inputs'], batch['segment_ids'],
                                   batch['positions'])['params']

  def loss(self, params, batch: Batch, dropout_rng: Array, train: bool):
    logits_BTV = self.logits(params, batch, train, dropout_rng)
    return cross_entropy_sums(logits_BTV, batch['targets'], batch['weights'], self.z_loss)

  def example_batch(self, batch_size: int, seq_len: int) -> Batch:
    return example_batch(batch_size, seq_len)


@dataclasses.dataclass(frozen=True)
class MaskedLM:
  """BERT: predict the chosen ([MASK]ed, replaced or kept) tokens from both sides, plus,
  with the next-sentence head, whether segment B follows segment A."""
  cfg: ModelConfig
  z_loss: float = 0.0

  def module(self, train: bool) -> nn.Module:
    return EncoderOnly(self.cfg, deterministic=not train)

  def _apply(self, params, batch: Batch, train: bool, dropout_rng=None, **kwargs):
    rngs = {'dropout': dropout_rng} if train else {}
    return self.module(train).apply({'params': params} if params is not None else {},
                                    batch['inputs'], batch['segment_ids'], batch['positions'],
                                    batch.get('token_type_ids'), rngs=rngs, **kwargs)

  def logits(self, params, batch: Batch, train: bool = False, dropout_rng=None) -> Array:
    return self._apply(params, batch, train, dropout_rng)[0]

  def init(self, rng: Array, batch: Batch):
    return self.module(False).init(rng, batch['inputs'], batch['segment_ids'],
                                   batch['positions'], batch.get('token_type_ids'))['params']

  def loss(self, params, batch: Batch, dropout_rng: Array, train: bool):
    logits_BTV, nsp_logits_B2 = self._apply(params, batch, train, dropout_rng)
    objective, sums = cross_entropy_sums(logits_BTV, batch['targets'], batch['weights'],
                                         self.z_loss)
    if nsp_logits_B2 is not None:
      labels_B = batch['nsp_labels']
      log_p_B2 = jax.nn.log_softmax(nsp_logits_B2.astype(jnp.float32))
      nll_B = -jnp.take_along_axis(log_p_B2, labels_B[:, None], axis=-1)[:, 0]
      sums.update(nsp_loss=jnp.sum(nll_B), nsp_count=jnp.asarray(labels_B.shape[0], jnp.float32),
                  nsp_correct=jnp.sum(jnp.argmax(log_p_B2, -1) == labels_B).astype(jnp.float32))
      # The step divides by the token count; this makes the NSP term a per-example mean.
      objective += sums['nsp_loss'] * jax.lax.stop_gradient(
          jnp.maximum(sums['weight'], 1.0) / sums['nsp_count'])
    return objective, sums

  def example_batch(self, batch_size: int, seq_len: int) -> Batch:
    batch = example_batch(batch_size, seq_len)
    batch['token_type_ids'] = jnp.zeros((batch_size, seq_len), jnp.int32)
    if self.cfg.nsp_head:
      batch['nsp_labels'] = jnp.zeros((batch_size,), jnp.int32)
    return batch


@dataclasses.dataclass(frozen=True)
class SpanCorruption:
  """T5: the encoder reads text with spans replaced by sentinels; the decoder writes
  the sentinels and the spans they replaced."""
  cfg: ModelConfig
  z_loss: float = 0.0

  def module(self, train: bool) -> nn.Module:
    return EncoderDecoder(self.cfg, deterministic=not train)

  @staticmethod
  def _args(batch: Batch):
    return (batch['encoder_inputs'], batch['encoder_segment_ids'], batch['encoder_positions'],
            batch['decoder_inputs'], batch['decoder_segment_ids'], batch['decoder_positions'])

  def logits(self, params, batch: Batch, train: bool = False, dropout_rng=None) -> Array:
    rngs = {'dropout': dropout_rng} if train else {}
    return self.module(train).apply({'params': params}, *self._args(batch), rngs=rngs)

  def init(self, rng: Array, batch: Batch):
    return self.module(False).init(rng, *self._args(batch))['params']

  def loss(self, params, batch: Batch, dropout_rng: Array, train: bool):
    logits_BTV = self.logits(params, batch, train, dropout_rng)
    return cross_entropy_sums(logits_BTV, batch['targets'], batch['weights'], self.z_loss)

  def example_batch(self, batch_size: int, seq_len: int) -> Batch:
    decoder = example_batch(batch_size, seq_len)
    return {'encoder_inputs': decoder['inputs'], 'encoder_segment_ids': decoder['segment_ids'],
            'encoder_positions': decoder['positions'], 'decoder_inputs': decoder['inputs'],
            'decoder_segment_ids': decoder['segment_ids'],
            'decoder_positions': decoder['positions'], 'targets': decoder['targets'],
            'weights': decoder['weights']}


def example_batch(batch_size: int, seq_len: int) -> Batch:
  """A decoder batch of the right shapes and dtypes, for initialisation and shape inference."""
  ids = jnp.zeros((batch_size, seq_len), jnp.int32)
  return {'inputs': ids, 'targets': ids, 'segment_ids': ids + 1,
          'positions': jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), ids.shape),
          'weights': jnp.ones((batch_size, seq_len), jnp.float32)}
