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
from models.transformer import DecoderOnly

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


def example_batch(batch_size: int, seq_len: int) -> Batch:
  """A batch of the right shapes and dtypes, for initialisation and shape inference."""
  ids = jnp.zeros((batch_size, seq_len), jnp.int32)
  return {'inputs': ids, 'targets': ids, 'segment_ids': ids + 1,
          'positions': jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), ids.shape),
          'weights': jnp.ones((batch_size, seq_len), jnp.float32)}
