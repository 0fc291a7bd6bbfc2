"""Beam search for the decoder and encoder-decoder families, over the same key/value
cache as sampling.

Each prompt keeps `beam_size` live hypotheses and, apart from them, its `beam_size` best
finished ones (as Flax's examples/wmt and t5x do). Every step extends each live
hypothesis by every token and takes the best 2 * beam_size by summed log-probability:
those ending in EOS join the finished set, scored at their own length (EOS counted) by
the GNMT penalty, logprob / ((5 + length) / 6) ** length_penalty; the best beam_size of
the others stay live, and the cache rows are reordered to follow them. Taking twice the
width keeps beam_size live even when beam_size end at once. A finished hypothesis thus
never holds a live slot (extending by free padding, it would crowd out a longer answer
that the penalty prefers), and finished ones compete only on the penalised score.

The search stops at max_new_tokens, or once no live hypothesis can beat the worst
finished one: log-probabilities only fall, so a live score divided by the largest
penalty still to come bounds all its continuations. A search that runs to
max_new_tokens lets the live hypotheses cut off there compete too, penalised at that
length (as Hugging Face's finalize does). length_penalty 0 compares raw log-probabilities.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from inference.generate import prepare, start_decoding
from models.transformer import reorder_cache

Array = jax.Array


def _penalty(length, length_penalty: float):
  """GNMT length normaliser of a hypothesis of `length` tokens."""
  return ((5.0 + length) / 6.0) ** length_penalty


@functools.partial(jax.jit, static_argnames=('task', 'max_new_tokens', 'beam_size', 'eos_id',
                                             'length_penalty'))
def _beam_search(params, ids_BP: Array, real_BP: Array, *, task, max_new_tokens: int,
                 beam_size: int, eos_id: int, length_penalty: float):
  """(tokens [B, max_new_tokens], lengths [B]) of each prompt's best hypothesis."""
  batch, width, vocab = ids_BP.shape[0], beam_size, task.cfg.vocab_size
  rows, candidates = batch * width, min(2 * width, width * vocab)
  # Every prompt repeated once per beam: rows b * width + w.
  ids_RP, real_RP = (jnp.repeat(x, width, axis=0) for x in (ids_BP, real_BP))
  decoding = start_decoding(task, params, ids_RP, real_RP)
  # Identical beams at the start: only the first may extend, so no duplicates.
  live_BW = jnp.tile(jnp.where(jnp.arange(width) == 0, 0.0, -jnp.inf), (batch, 1))
  finished_BW = jnp.full((batch, width), -jnp.inf)  # penalised scores; -inf: an empty slot
  empty_BWN = jnp.zeros((batch, width, max_new_tokens), jnp.int32)

  def step(carry):
    i, cache, logp_RV, position_R, live_BW, live_BWN, finished_BW, finished_BWN = carry
    total_BX = (live_BW[:, :, None] + logp_RV.reshape(batch, width, vocab)).reshape(
        batch, width * vocab)
    total_BC, flat_BC = jax.lax.top_k(total_BX, candidates)
    beam_BC, token_BC = flat_BC // vocab, (flat_BC % vocab).astype(jnp.int32)
    tokens_BCN = jnp.take_along_axis(live_BWN, beam_BC[:, :, None], axis=1)
    tokens_BCN = tokens_BCN.at[:, :, i].set(token_BC)
    ends_BC = token_BC == eos_id
    # Finished: the best `width` of those kept so far and those ending now.
    new_BC = jnp.where(ends_BC, total_BC / _penalty(i + 1, length_penalty), -jnp.inf)
    finished_BW, pick_BW = jax.lax.top_k(jnp.concatenate([finished_BW, new_BC], axis=1), width)
    finished_BWN = jnp.take_along_axis(jnp.concatenate([finished_BWN, tokens_BCN], axis=1),
                                       pick_BW[:, :, None], axis=1)
    # Live: the best `width` that did not end.
    live_BW, keep_BW = jax.lax.top_k(jnp.where(ends_BC, -jnp.inf, total_BC), width)
    live_BWN = jnp.take_along_axis(tokens_BCN, keep_BW[:, :, None], axis=1)
    token_BW, beam_BW = (jnp.take_along_axis(x, keep_BW, axis=1) for x in (token_BC, beam_BC))
    source_R = (jnp.arange(batch)[:, None] * width + beam_BW).reshape(rows)
    cache = reorder_cache(cache, source_R)
    position_R = position_R[source_R] + 1
    logits_RV, cache = decoding.step(cache, token_BW.reshape(rows), position_R)
    return (i + 1, cache, jax.nn.log_softmax(logits_RV), position_R, live_BW, live_BWN,
            finished_BW, finished_BWN)

  def searching(carry):
    i, live_BW, finished_BW = carry[0], carry[4], carry[6]
    # Log-probs are <= 0, so the largest penalty to come (at either end of the lengths
    # left: max_new_tokens when length_penalty >= 0) gives every live beam's best score.
    largest = jnp.maximum(_penalty(i + 1, length_penalty),
                          _penalty(max_new_tokens, length_penalty))
    settled = jnp.all(finished_BW.min(axis=1) > live_BW.max(axis=1) / largest)
    return (i < max_new_tokens) & ~settled

  carry = (jnp.zeros((), jnp.int32), decoding.cache, jax.nn.log_softmax(decoding.logits_BV),
           decoding.position_B, live_BW, empty_BWN, finished_BW, empty_BWN)
  i, *_, live_BW, live_BWN, finished_BW, finished_BWN = jax.lax.while_loop(
      searching, step, carry)
  # Cut off at max_new_tokens, the live beams compete too, penalised at that length (a
  # search that stopped early has settled: no live beam could win).
  cut_BW = jnp.where(i == max_new_tokens, live_BW / _penalty(i, length_penalty), -jnp.inf)
  scores_BW = jnp.concatenate([finished_BW, cut_BW], axis=1)
  tokens_BWN = jnp.concatenate([finished_BWN, live_BWN], axis=1)
  best_B = jnp.argmax(scores_BW, axis=1)
  tokens_BN = jnp.take_along_axis(tokens_BWN, best_B[:, None, None], axis=1)[:, 0]
  ends_BN = tokens_BN == eos_id
  lengths_B = jnp.sum(jnp.cumsum(ends_BN, axis=-1) - ends_BN == 0, axis=-1)  # EOS kept
  return tokens_BN, lengths_B


def beam_search(task, params, prompts: list[list[int]], max_new_tokens: int,
                beam_size: int = 4, length_penalty: float = 0.6, eos_id: int = 1,
                quantize: str = 'none') -> list[list[int]]:
  """The best continuation of each prompt (ending at EOS, which is kept, or at max_new_tokens)."""
  check_beam_size(beam_size)
  task, params, ids, real = prepare(task, params, prompts, max_new_tokens, quantize,
                                    rows=len(prompts) * beam_size)
  return search(task, params, ids, real, max_new_tokens, beam_size, length_penalty, eos_id)


def check_beam_size(beam_size: int) -> None:
  """One clear error for a width beam search cannot take."""
  if beam_size < 1:
    raise ValueError(f'--beam_size={beam_size} must be at least 1.')


def search(task, params, ids_BP, real_BP, max_new_tokens: int, beam_size: int,
           length_penalty: float, eos_id: int) -> list[list[int]]:
  """`beam_search` of left-padded prompts over parameters `prepare` gave (callers that
  search many batches prepare once)."""
  tokens, lengths = _beam_search(params, ids_BP, real_BP, task=task,
                                 max_new_tokens=max_new_tokens, beam_size=beam_size,
                                 eos_id=eos_id, length_penalty=length_penalty)
  return [row[:n].tolist() for row, n in zip(np.asarray(tokens), np.asarray(lengths))]
