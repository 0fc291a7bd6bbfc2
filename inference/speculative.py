"""Speculative decoding with a draft model (Leviathan et al. 2023, "Fast Inference from
Transformers via Speculative Decoding").

Each round the draft proposes K tokens, one cheap step at a time over its own key/value
cache; the target scores all of them in one call of K + 1 positions over its cache
(`Decoding.step_many`), keeps a prefix of them and adds one token of its own: 1 to K + 1
tokens per target call.

Exactness. The proposal d_i ~ q_i is kept with probability min(1, p_i(d_i) / q_i(d_i));
the first rejected one is replaced by a token from the residual norm(max(0, p_i - q_i)),
and after K kept ones a bonus token comes from p_{K+1}. Each token emitted is then
distributed as p_i exactly, whatever q is (`accepts`, `residual`, `verify`). p and q are
what `sample` draws from: the softmax of each model's own logits at the temperature,
after top-k and top-p (inference/sampling.py), so the output follows the target's
filtered distribution and the draft's filters only change how often it is right. At
temperature 0 p and q are one-hot on the argmax and the rule reads: keep the draft's
tokens while they are the target's argmax, then emit the target's argmax
(`verify_greedy`): plain greedy decoding's tokens. The repetition penalty is refused.

Rollback. Both models write every proposal into their caches. CacheSlots
(models/transformer.py) keeps the next slot to write in a scalar 'index' variable and
masks each query to the slots up to its own, and a call writes its keys and values
before reading; so setting 'index' back (`rewind`) drops rejected tokens: their slots
are overwritten before any query at or past them reads them. That index is one scalar
for every row of the batch, and rows keep different numbers of proposals, so this
decodes one prompt at a time (batch 1).
"""
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from inference.generate import prepare, start_decoding, through_eos, while_cache_grows
from inference.sampling import Sampling, sample, sampled_logits

Array = jax.Array


class Draft(NamedTuple):
  """The model that proposes tokens (a task and its parameters, sharing the target's
  tokenizer) and how many it proposes per round (K)."""
  task: object
  params: dict
  num_tokens: int


def check_request(sampling: Sampling, num_draft_tokens: int, beam_size: int = 0) -> None:
  """One clear error for what speculative decoding cannot do exactly."""
  if num_draft_tokens < 1:
    raise ValueError(f'--num_draft_tokens={num_draft_tokens} must be at least 1.')
  if sampling.repetition_penalty != 1.0:
    raise ValueError(f'--repetition_penalty={sampling.repetition_penalty} cannot be combined '
                     'with speculative decoding (--draft_workdir): drop one of them.')
  if beam_size:
    raise ValueError('--beam_size cannot be combined with speculative decoding '
                     '(--draft_workdir): drop one of them.')


def check_models(task, draft_task, prompts: list[list[int]], max_new_tokens: int,
                 num_draft_tokens: int) -> None:
  """Both models continue prompts with the same vocabulary, and their contexts hold the
  K proposals scored after the last token that may be kept."""
  if not (task.prompt_is_output and draft_task.prompt_is_output):
    raise ValueError(f"Speculative decoding needs decoder runs that continue the prompt; the "
                     f"target's task is '{task.name}' and the draft's '{draft_task.name}'.")
  if task.cfg.vocab_size != draft_task.cfg.vocab_size:
    raise ValueError(f'The draft model has {draft_task.cfg.vocab_size} vocabulary entries and '
                     f'the target {task.cfg.vocab_size}; speculative decoding needs the same '
                     "tokenizer: train the draft with the target's (copy its tokenizer file "
                     'into the draft workdir before training).')
  length = max(len(p) for p in prompts)
  needed = length + max_new_tokens + num_draft_tokens - 1
  for name, context in (('target', task.cfg.max_len), ('draft', draft_task.cfg.max_len)):
    if needed > context:
      raise ValueError(f'A prompt of {length} tokens with --max_new_tokens={max_new_tokens} and '
                       f'--num_draft_tokens={num_draft_tokens} needs {needed} positions (the '
                       'proposals are scored past the last token that may be kept), but the '
                       f"{name} model's context is {context}; shorten the prompt or lower "
                       '--max_new_tokens or --num_draft_tokens.')


def rewind(cache, index):
  """The cache with its next write slot (every CacheSlots 'index') set to `index`."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.full_like(x, index) if getattr(path[-1], 'key', None) == 'index'
      else x, cache)


def distribution(logits_BV: Array, sampling: Sampling) -> Array:
  """[B, V] float32: what `sample` draws from at a temperature above 0."""
  return jax.nn.softmax(sampled_logits(logits_BV, sampling), axis=-1)


def draw(key: Array, probs_BV: Array) -> Array:
  """[B] int32 tokens from the rows of probabilities (zeros are never drawn)."""
  return jax.random.categorical(key, jnp.log(probs_BV), axis=-1).astype(jnp.int32)


def accepts(p_BV: Array, q_BV: Array, token_B: Array, uniform_B: Array) -> Array:
  """[B] bool: keep `token_B`, drawn from q, with probability min(1, p / q) (u in [0, 1))."""
  p_B = jnp.take_along_axis(p_BV, token_B[:, None], axis=-1)[:, 0]
  q_B = jnp.take_along_axis(q_BV, token_B[:, None], axis=-1)[:, 0]
  return uniform_B * q_B < p_B


def residual(p_BV: Array, q_BV: Array) -> Array:
  """[B, V]: norm(max(0, p - q)), what a rejected token is replaced from; p where p <= q
  everywhere (then a rejection has probability 0, and rounding alone can cause one)."""
  r_BV = jnp.maximum(p_BV - q_BV, 0.0)
  total_B1 = jnp.sum(r_BV, axis=-1, keepdims=True)
  return jnp.where(total_B1 > 0, r_BV / jnp.where(total_B1 > 0, total_B1, 1.0), p_BV)


def verify(p_TV: Array, q_KV: Array, draft_K: Array, key: Array) -> tuple[Array, Array]:
  """(proposals kept n, the token after them) by the accept/reject rule: the target's
  T = K + 1 distributions p (p[i] follows the i-th proposal) and the draft's q of the K
  proposals it drew."""
  num_draft = draft_K.shape[0]
  uniform_key, token_key = jax.random.split(key)
  kept_K = accepts(p_TV[:num_draft], q_KV, draft_K, jax.random.uniform(uniform_key, (num_draft,)))
  n = jnp.sum(jnp.cumprod(kept_K.astype(jnp.int32)))
  # At a rejection, the residual of p and q there; after K kept, p's bonus (q taken as 0).
  q_V = jnp.where(n < num_draft, q_KV[jnp.minimum(n, num_draft - 1)], 0.0)
  return n, draw(token_key, residual(p_TV[n][None], q_V[None]))[0]


def verify_greedy(logits_TV: Array, draft_K: Array) -> tuple[Array, Array]:
  """The rule at temperature 0 (p and q one-hot): keep proposals while they are the
  target's argmax, then add the target's argmax after the last one kept."""
  target_T = jnp.argmax(logits_TV, axis=-1).astype(jnp.int32)
  n = jnp.sum(jnp.cumprod((draft_K == target_T[:-1]).astype(jnp.int32)))
  return n, target_T[n]


@functools.partial(jax.jit, static_argnames=('task', 'draft_task', 'max_new_tokens',
                                             'num_draft_tokens', 'sampling'))
def speculative_tokens(params, draft_params, ids_1P: Array, real_1P: Array, key: Array,
                       eos_id, *, task, draft_task, max_new_tokens: int, num_draft_tokens: int,
                       sampling: Sampling) -> tuple[Array, dict]:
  """(new tokens [1, max_new_tokens] after one left-padded prompt, 0 after EOS, as
  `decode_tokens` returns them; {'rounds', 'accepted'}: target calls after the prefill
  and proposals kept and emitted (not past an EOS), of num_draft_tokens per round)."""
  K, N = num_draft_tokens, max_new_tokens
  greedy = sampling.temperature == 0
  target = start_decoding(task, params, ids_1P, real_1P)
  draft = start_decoding(draft_task, draft_params, ids_1P, real_1P)
  first_slot, first_position = ids_1P.shape[1], target.position_B[0] + 1  # of new token 1
  key, first_key = jax.random.split(key)
  first = sample(target.logits_BV, first_key, sampling)[0]
  steps_T = jnp.arange(K + 1)

  def propose(key, logits_1V):
    """(the draft's token, the distribution q it was drawn from; None when greedy)."""
    if greedy:
      return jnp.argmax(logits_1V[0]).astype(jnp.int32), None
    q_1V = distribution(logits_1V, sampling)
    return draw(key, q_1V)[0], q_1V[0]

  def one_round(carry):
    n, target_cache, draft_cache, last, out_M, _, key, rounds, accepted = carry
    key, propose_key, verify_key = jax.random.split(key, 3)
    slot, position = first_slot + n - 1, first_position + n - 1  # of `last`, not yet cached

    def draft_step(carry, key):
      cache, token, i = carry  # token i (0: last) of the round, at position + i
      logits_1V, cache = draft.step(cache, token[None], (position + i)[None])
      token, q_V = propose(key, logits_1V)
      return (cache, token, i + 1), (token, q_V)

    (draft_cache, _, _), (draft_K, q_KV) = jax.lax.scan(
        draft_step, (rewind(draft_cache, slot), last, 0), jax.random.split(propose_key, K))
    logits_1TV, target_cache = target.step_many(
        rewind(target_cache, slot), jnp.concatenate([last[None], draft_K])[None],
        (position + steps_T)[None])
    if greedy:
      kept, token = verify_greedy(logits_1TV[0], draft_K)
    else:
      kept, token = verify(distribution(logits_1TV[0], sampling), q_KV, draft_K, verify_key)
    # The draft has not read its last proposal; the next round needs it cached if kept.
    draft_cache = jax.lax.cond(
        kept == K, lambda cache: draft.step(cache, draft_K[-1:], (position + K)[None])[1],
        lambda cache: cache, draft_cache)
    new_T = jnp.where(steps_T < kept, jnp.append(draft_K, token), token)
    eos_T = (new_T == eos_id) & (steps_T <= kept)
    count = jnp.where(jnp.any(eos_T), jnp.argmax(eos_T) + 1, kept + 1)
    out_M = jax.lax.dynamic_update_slice(out_M, new_T, (n,))
    return (n + count, target_cache, draft_cache, new_T[count - 1], out_M, jnp.any(eos_T), key,
            rounds + 1, accepted + jnp.minimum(kept, count))  # proposals emitted

  def not_finished(carry):
    n, *_, done, _, _, _ = carry
    return (n < N) & ~done

  zero = jnp.zeros((), jnp.int32)
  out_M = jnp.zeros((N + K,), jnp.int32).at[0].set(first)  # room for a round's overshoot
  carry = (jnp.ones((), jnp.int32), target.cache, draft.cache, first, out_M, first == eos_id,
           key, zero, zero)
  # A round writes slots first_slot + n - 1 to first_slot + n - 1 + K of both caches.
  carry = while_cache_grows(carry, (1, 2), first_slot, first_slot + N + K - 1, one_round,
                            lambda c, slots: not_finished(c) & (first_slot + c[0] + K <= slots))
  n, *_, out_M, _, _, rounds, accepted = carry
  out_N = jnp.where(jnp.arange(N) < n, out_M[:N], 0)
  return out_N[None], {'rounds': rounds, 'accepted': accepted}


def generate(task, params, draft: Draft, prompts: list[list[int]], max_new_tokens: int,
             sampling: Sampling = Sampling(temperature=0.0), seed: int = 0, eos_id: int = 1,
             quantize: str = 'none', stats: dict | None = None) -> list[list[int]]:
  """New tokens for each prompt (ending at EOS, which is kept, or at max_new_tokens), as
  inference/generate.py `generate` returns them, decoded one prompt after another (the
  cache index is shared by a batch's rows). Prompts are padded to one length, so they
  share one compiled loop. `stats`, if given, gets the rounds and kept proposals added."""
  sampling.check()
  check_request(sampling, draft.num_tokens)
  check_models(task, draft.task, prompts, max_new_tokens, draft.num_tokens)
  # One prompt at a time: the draft decodes one row per step, the target checks K + 1.
  task, params, ids, real = prepare(task, params, prompts, max_new_tokens, quantize,
                                    rows=draft.num_tokens + 1)
  draft_task, draft_params, _, _ = prepare(draft.task, draft.params, prompts, max_new_tokens,
                                           quantize, rows=1)
  results = []
  for row in range(len(prompts)):
    out, counts = speculative_tokens(
        params, draft_params, ids[row:row + 1], real[row:row + 1],
        jax.random.fold_in(jax.random.key(seed), row), eos_id, task=task, draft_task=draft_task,
        max_new_tokens=max_new_tokens, num_draft_tokens=draft.num_tokens, sampling=sampling)
    results.append(through_eos(np.asarray(out[0]), eos_id))
    if stats is not None:
      for name, value in counts.items():
        stats[name] = stats.get(name, 0) + int(value)
  return results
