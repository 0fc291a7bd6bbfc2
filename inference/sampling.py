"""Turning next-token logits into tokens: greedy, temperature, top-k, top-p, repetition penalty."""
import dataclasses

import jax
import jax.numpy as jnp

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Sampling:
  """temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off."""
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  repetition_penalty: float = 1.0  # >1 discourages tokens already in the prompt or output

  def check(self) -> None:
    if self.temperature < 0:
      raise ValueError(f'--temperature={self.temperature} must be >= 0 (0 is greedy).')
    if not 0 < self.top_p <= 1:
      raise ValueError(f'--top_p={self.top_p} must be in (0, 1].')
    if self.top_k < 0:
      raise ValueError(f'--top_k={self.top_k} must be >= 0 (0 keeps every token).')
    if self.repetition_penalty <= 0:
      raise ValueError(f'--repetition_penalty={self.repetition_penalty} must be positive.')


def penalize_repeats(logits_BV: Array, seen_BV: Array, penalty: float) -> Array:
  """CTRL's penalty: seen tokens' logits divided by it when positive, multiplied when negative."""
  if penalty == 1.0:
    return logits_BV
  penalized = jnp.where(logits_BV > 0, logits_BV / penalty, logits_BV * penalty)
  return jnp.where(seen_BV, penalized, logits_BV)


def filter_logits(logits_BV: Array, top_k: int, top_p: float) -> Array:
  """-inf outside the k most likely tokens and outside the smallest set with mass >= top_p."""
  neg_inf = jnp.finfo(jnp.float32).min
  if top_k:
    kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth_B1, neg_inf, logits_BV)
  if top_p < 1.0:
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    # The nucleus: tokens whose preceding mass is still below top_p (always the first).
    kept_BV = mass_before_BV < top_p
    threshold_B1 = jnp.min(jnp.where(kept_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
    logits_BV = jnp.where(logits_BV < threshold_B1, neg_inf, logits_BV)
  return logits_BV


def sample(logits_BV: Array, key: Array, sampling: Sampling) -> Array:
  """One token per row, [B] int32."""
  if sampling.temperature == 0:
    return jnp.argmax(logits_BV.astype(jnp.float32), axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, sampled_logits(logits_BV, sampling),
                                axis=-1).astype(jnp.int32)


def sampled_logits(logits_BV: Array, sampling: Sampling) -> Array:
  """[B, V] float32 logits that `sample` draws from at a temperature above 0: divided by
  the temperature, then top-k and top-p filtered (-inf outside)."""
  logits_BV = logits_BV.astype(jnp.float32) / sampling.temperature
  return filter_logits(logits_BV, sampling.top_k, sampling.top_p)
