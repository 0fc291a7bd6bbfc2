"""Beam search for the decoder and encoder-decoder families, over the same key/value
cache as sampling.

Each prompt keeps `beam_size` hypotheses; every step extends each by every token
and keeps the best `beam_size` by summed log-probability, reordering the cache
rows to follow their hypotheses. A finished hypothesis (EOS) only extends by
padding at no cost. The winner maximises score / ((5 + length) / 6) ** length_penalty
(GNMT); length_penalty 0 compares raw log-probabilities.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from inference.generate import prepare, start_decoding

Array = jax.Array


@functools.partial(jax.jit, static_argnames=('task', 'max_new_tokens', 'beam_size', 'eos_id',
                                             'length_penalty'))
def _beam_search(params, ids_BP: Array, real_BP: Array, *, task, max_new_tokens: int,
                 beam_size: int, eos_id: int, length_penalty: float):
  batch, width, vocab = ids_BP.shape[0], beam_size, task.cfg.vocab_size
  rows = batch * width
  # Every prompt repeated once per beam: rows b * width + w.
  ids_RP, real_RP = (jnp.repeat(x, width, axis=0) for x in (ids_BP, real_BP))
  decoding = start_decoding(task, params, ids_RP, real_RP)
  # Identical beams at the start: only the first may extend, so no duplicates.
  scores_BW = jnp.tile(jnp.where(jnp.arange(width) == 0, 0.0, -jnp.inf), (batch, 1))

  def step(carry):
    i, cache, logp_RV, position_R, scores_BW, done_BW, tokens_BWN = carry
    done_R = done_BW.reshape(rows)
    # A finished hypothesis extends only by padding (id 0), at no cost.
    pad_only = jnp.where(jnp.arange(vocab) == 0, 0.0, -jnp.inf)
    logp_RV = jnp.where(done_R[:, None], pad_only, logp_RV)
    candidates_BX = (scores_BW[:, :, None] + logp_RV.reshape(batch, width, vocab)).reshape(
        batch, width * vocab)
    scores_BW, flat_BW = jax.lax.top_k(candidates_BX, width)
    beam_BW, token_BW = flat_BW // vocab, (flat_BW % vocab).astype(jnp.int32)
    source_R = (jnp.arange(batch)[:, None] * width + beam_BW).reshape(rows)
    cache = jax.tree.map(lambda c: c[source_R] if c.ndim else c, cache)
    tokens_BWN = jnp.take_along_axis(tokens_BWN, beam_BW[:, :, None], axis=1)
    tokens_BWN = tokens_BWN.at[:, :, i].set(token_BW)
    done_BW = jnp.take_along_axis(done_BW, beam_BW, axis=1) | (token_BW == eos_id)
    position_R = position_R[source_R] + 1
    logits_RV, cache = decoding.step(cache, token_BW.reshape(rows), position_R)
    logp_RV = jax.nn.log_softmax(logits_RV)
    return i + 1, cache, logp_RV, position_R, scores_BW, done_BW, tokens_BWN

  def not_finished(carry):
    i, *_, done_BW, _ = carry
    return (i < max_new_tokens) & ~jnp.all(done_BW)

  carry = (jnp.zeros((), jnp.int32), decoding.cache, jax.nn.log_softmax(decoding.logits_BV),
           decoding.position_B, scores_BW, jnp.zeros((batch, width), bool),
           jnp.zeros((batch, width, max_new_tokens), jnp.int32))
  _, _, _, _, scores_BW, _, tokens_BWN = jax.lax.while_loop(not_finished, step, carry)
  ends_BWN = jnp.cumsum(tokens_BWN == eos_id, axis=-1) - (tokens_BWN == eos_id) > 0
  lengths_BW = jnp.sum(~ends_BWN, axis=-1)
  normalized_BW = scores_BW / ((5.0 + lengths_BW) / 6.0) ** length_penalty
  best_B = jnp.argmax(normalized_BW, axis=1)
  return jnp.take_along_axis(tokens_BWN, best_B[:, None, None], axis=1)[:, 0], lengths_BW[
      jnp.arange(batch), best_B]


def beam_search(task, params, prompts: list[list[int]], max_new_tokens: int,
                beam_size: int = 4, length_penalty: float = 0.6, eos_id: int = 1,
                quantize: str = 'none') -> list[list[int]]:
  """The best continuation of each prompt (ending at EOS, which is kept, or at max_new_tokens)."""
  if beam_size < 1:
    raise ValueError(f'--beam_size={beam_size} must be at least 1.')
  task, params, ids, real = prepare(task, params, prompts, max_new_tokens, quantize)
  tokens, lengths = _beam_search(params, ids, real, task=task, max_new_tokens=max_new_tokens,
                                 beam_size=beam_size, eos_id=eos_id,
                                 length_penalty=length_penalty)
  return [row[:n].tolist() for row, n in zip(np.asarray(tokens), np.asarray(lengths))]
