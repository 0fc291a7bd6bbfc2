"""Loops of one kind of decoding call alone, which benchmarks/speculative.py times to split
a speculative round's cost into its draft steps and its target check. No flags: tests
import it (the benchmark's flags would clash with inference/cli.py's)."""
import functools

import jax
import jax.numpy as jnp

from inference.generate import start_decoding, while_cache_grows


@functools.partial(jax.jit, static_argnames=('task',))
def prefill(params, ids_1P, real_1P, *, task):
  """The prompt's prefill alone (its first token's logits)."""
  return start_decoding(task, params, ids_1P, real_1P).logits_BV


@functools.partial(jax.jit, static_argnames=('task', 'tokens_per_call', 'calls'))
def target_calls(params, ids_1P, real_1P, *, task, tokens_per_call: int, calls: int):
  """The target alone, as speculative rounds call it: after the prefill, `calls` calls of
  `tokens_per_call` positions each, each call's positions all given the greedy token after
  the last call. Returns those greedy tokens [calls + 1] (the prefill's first; with one
  token per call this is greedy decoding) and the cache they were written to."""
  decoding = start_decoding(task, params, ids_1P, real_1P)
  T, filled = tokens_per_call, decoding.filled
  positions_T = decoding.position_B[0] + 1 + jnp.arange(T)

  def call(carry):
    i, cache, tokens_N = carry
    logits_1TV, cache = decoding.step_many(cache, jnp.full((1, T), tokens_N[i]),
                                           (positions_T + i * T)[None])
    return i + 1, cache, tokens_N.at[i + 1].set(jnp.argmax(logits_1TV[0, -1]).astype(jnp.int32))

  tokens_N = jnp.zeros((calls + 1,), jnp.int32).at[0].set(
      jnp.argmax(decoding.logits_BV[0]).astype(jnp.int32))
  carry = (jnp.zeros((), jnp.int32), decoding.cache, tokens_N)
  carry = while_cache_grows(carry, (1,), filled, filled + calls * T, call,
                            lambda c, slots: (c[0] < calls) & (filled + (c[0] + 1) * T <= slots))
  return carry[2], carry[1]
