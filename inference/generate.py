"""Autoregressive generation over a preallocated key/value cache, for any task with a
decode entry point (`task.start_decoding`, tasks/).

The task prefills the prompts (left-padded, so prompts of different lengths share a
batch) and returns a step function; here one token per step is chosen inside jitted
`lax.while_loop`s, one per cache length (`cache_lengths`). Each row stops at its own EOS;
the loops stop when all rows have.
"""
import dataclasses
import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from inference.quantize import for_decoding, quantize_int8
from inference.sampling import Sampling, penalize_repeats, sample
from models.config import ModelConfig
from models.layouts import fuse_qkv, transpose_down, transpose_embedding
from models.transformer import resize_cache

Array = jax.Array


def left_pad(prompts: list[list[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(ids [B, P], real-token mask [B, P]) with each prompt right-aligned."""
  length = max(len(p) for p in prompts)
  ids = np.full((len(prompts), length), pad_id, np.int32)
  real = np.zeros((len(prompts), length), np.int32)
  for row, prompt in enumerate(prompts):
    ids[row, length - len(prompt):] = prompt
    real[row, length - len(prompt):] = 1
  return ids, real


def unrolled_layers(cfg: ModelConfig, params):
  """The same model with each scanned layer stack split into per-layer parameters.

  Decoding reads every weight once per token; inside a scan each step would first
  slice its layer out of the stacked arrays, copying the whole model per token.
  """
  if not cfg.scan_layers:
    return cfg, params

  def unstack(stack):
    return {f'layer_{i}': jax.tree.map(lambda x, i=i: x[i], stack['layers'])
            for i in range(cfg.num_layers)}
  params = {name: unstack(sub) if isinstance(sub, dict) and 'layers' in sub else sub
            for name, sub in params.items()}
  return dataclasses.replace(cfg, scan_layers=False), params


@dataclasses.dataclass(frozen=True)
class Request:
  """What `--mode=sample` asks for: how many tokens, how to choose them, where to stop."""
  max_new_tokens: int = 100
  sampling: Sampling = Sampling()
  seed: int = 0
  beam_size: int = 0  # > 0: beam search with this many beams instead of sampling
  length_penalty: float = 0.6  # GNMT length penalty of beam search
  quantize: str = 'none'  # 'int8': weight-only int8 (inference/quantize.py)
  stop: tuple[str, ...] = ()  # cut each completion at the first of these strings
  # A speculative.Draft: its model proposes tokens the run's model checks (one prompt at a
  # time; inference/speculative.py). Not compared or hashed: it holds parameters.
  draft: object = dataclasses.field(default=None, compare=False)


def prepare(task, params, prompts: list[list[int]], max_new_tokens: int, quantize: str,
            rows: int | None = None):
  """(task, params, ids [B, P], real [B, P]) ready for a decoding loop, after checking
  the request: layers unrolled, weights quantized if asked, prompts left-padded.

  On a CPU the weights are laid out as a decode step reads them fastest (models/layouts.py
  has the why; benchmarks/RESULTS.md the measurements, on XLA:CPU only). Where each step
  decodes one row (`rows`: rows of activations per call, batch x tokens; one per prompt by
  default; beam search has one per beam, a speculative target K + 1), each
  self-attention's query, key and value kernels are joined into one and each MLP's output
  projection is stored [D, F]; at several rows both stay as they are (a one-row decode's
  prefill and encoder then read the one-row layout). A tied float embedding is stored [D,
  V] at any batch. Weights split over devices, int8 embeddings and LoRA-adapted layers
  stay as they are. The params returned are new arrays wherever they differ from those
  given: while the caller keeps its own unscanned float weights, the changed ones exist
  twice (on an accelerator, whose memory that would take, nothing changes)."""
  task.check_prompts(prompts, max_new_tokens)
  if quantize not in ('none', 'int8'):
    raise ValueError(f'--quantize={quantize} is not one of none, int8.')
  cfg, params = unrolled_layers(task.cfg, params)
  if quantize == 'int8':
    params = quantize_int8(params)
  if lays_out_for_speed():
    if (len(prompts) if rows is None else rows) == 1:
      params = transpose_down(fuse_qkv(params))
    if cfg.tie_embeddings:
      params = transpose_embedding(params)
  return (dataclasses.replace(task, cfg=cfg), params) + left_pad(prompts)


def lays_out_for_speed() -> bool:
  """Whether `prepare` lays the weights out for speed: on XLA:CPU, where it was measured."""
  return jax.default_backend() == 'cpu'


class Decoding(NamedTuple):
  """The state after the prompt's prefill, and the function that adds one token."""
  logits_BV: Array  # float32 logits of the first new token
  cache: dict
  position_B: Array  # position of each row's last token
  step: Callable  # step(cache, token_B, position_B) -> (logits_BV, cache)
  filled: int  # self-attention cache slots the prefill wrote (the next step writes this one)
  # step_many(cache, tokens_BT, positions_BT) -> (float32 logits_BTV, cache): T tokens in one
  # call (speculative decoding); None where the task has none (an encoder-decoder's).
  step_many: Callable | None = None


def start_decoding(task, params, ids_BP: Array, real_BP: Array) -> Decoding:
  """The task's prefill. Int8 weights (if any) stay int8, and so are the operands of
  the decode loop that closes over them: the model's Dense and Embed layers dequantize
  each matrix where it is used, inside the prefill and inside every step, so no float
  copy of the whole model is ever live (models/layers.py; a layer that reads dense
  weights only, such as an untied flax output head, gets its matrix dequantized here,
  once: inference/quantize.py `for_decoding`)."""
  return task.start_decoding(for_decoding(params), ids_BP, real_BP)


@functools.partial(jax.jit, static_argnames=('task', 'max_new_tokens', 'sampling', 'eos_id',
                                             'on_token'))
def decode_tokens(params, ids_BP: Array, real_BP: Array, key: Array, *, task,
                  max_new_tokens: int, sampling: Sampling, eos_id: int,
                  on_token: Callable | None = None) -> Array:
  """New tokens [B, max_new_tokens] after left-padded prompts (0 after a row's EOS)."""
  decoding = start_decoding(task, params, ids_BP, real_BP)
  batch = ids_BP.shape[0]
  # The repetition penalty counts a prompt the output continues (not an encoder's input).
  seen_BV = jnp.zeros((batch, task.cfg.vocab_size), bool)
  if task.prompt_is_output:
    seen_BV = seen_BV.at[jnp.arange(batch)[:, None], ids_BP].set(real_BP > 0)

  def step(carry):
    i, cache, logits_BV, position_B, seen_BV, done_B, out_BN, key = carry
    key, step_key = jax.random.split(key)
    token_B = sample(penalize_repeats(logits_BV, seen_BV, sampling.repetition_penalty),
                     step_key, sampling)
    token_B = jnp.where(done_B, 0, token_B)
    if on_token is not None:
      jax.experimental.io_callback(on_token, None, token_B, ordered=True)
    out_BN = out_BN.at[:, i].set(token_B)
    done_B = done_B | (token_B == eos_id)
    seen_BV = seen_BV.at[jnp.arange(batch), token_B].set(True)
    position_B = position_B + 1
    logits_BV, cache = decoding.step(cache, token_B, position_B)
    return i + 1, cache, logits_BV, position_B, seen_BV, done_B, out_BN, key

  def not_finished(carry):
    i, *_, done_B, _, _ = carry
    return (i < max_new_tokens) & ~jnp.all(done_B)

  carry = (jnp.zeros((), jnp.int32), decoding.cache, decoding.logits_BV, decoding.position_B,
           seen_BV, jnp.zeros((batch,), bool), jnp.zeros((batch, max_new_tokens), jnp.int32), key)
  # Step i writes cache slot `filled` + i.
  filled = decoding.filled
  carry = while_cache_grows(carry, (1,), filled, filled + max_new_tokens, step,
                            lambda c, slots: not_finished(c) & (filled + c[0] < slots))
  return carry[6]


def while_cache_grows(carry: tuple, cache_items: tuple[int, ...], filled: int, total_len: int,
                      body: Callable, fits: Callable) -> tuple:
  """`lax.while_loop(cond, body, carry)` over decode caches that grow: one loop per cache
  length of `cache_lengths(filled, total_len)`, the caches (carry[i] for i in
  `cache_items`) resized to it first, each loop going on while fits(carry, slots), i.e.
  while the next body's cache writes fit and the decoding is not finished. Attention reads
  every slot of a cache, so it reads about the filled ones, not all of max_len."""
  for slots in cache_lengths(filled, total_len):
    carry = tuple(resize_cache(item, slots) if i in cache_items else item
                  for i, item in enumerate(carry))
    carry = jax.lax.while_loop(functools.partial(fits, slots=slots), body, carry)
  return carry


def cache_lengths(filled: int, total_len: int, shortest: int = 64) -> list[int]:
  """The cache lengths a decoding loop moves through: powers of two from `shortest`
  (each longer than the `filled` slots) up to `total_len`, which ends the list. Past the
  shortest, attention reads at most twice the filled slots, for few compiled loops (one
  per length)."""
  lengths = []
  length = shortest
  while length < total_len:
    if length > filled:
      lengths.append(length)
    length *= 2
  return lengths + [total_len]


def generate(task, params, prompts: list[list[int]], max_new_tokens: int,
             sampling: Sampling = Sampling(temperature=0.0), seed: int = 0, eos_id: int = 1,
             on_token: Callable | None = None, quantize: str = 'none') -> list[list[int]]:
  """New tokens for each prompt (ending at EOS, which is kept, or at max_new_tokens).

  A decoder continues each prompt; an encoder-decoder reads each prompt as its
  encoder input (end it with EOS, as span corruption does) and writes the target.
  quantize='int8' stores the weights as int8 with per-channel scales
  (inference/quantize.py); each matrix is dequantized where the model uses it, at
  every step, so weights take a quarter of the float32 memory while decoding too.
  `on_token(tokens [B])` is called as each step's tokens are chosen (for streaming).
  """
  sampling.check()
  task, params, ids, real = prepare(task, params, prompts, max_new_tokens, quantize)
  out = np.asarray(decode_tokens(params, ids, real, jax.random.key(seed), task=task,
                                 max_new_tokens=max_new_tokens, sampling=sampling,
                                 eos_id=eos_id, on_token=on_token))
  return [through_eos(row, eos_id) for row in out]


def through_eos(tokens_N: np.ndarray, eos_id: int) -> list[int]:
  """A decoded row up to and including its first EOS (the zeros after it dropped)."""
  ends = np.flatnonzero(tokens_N == eos_id)
  return tokens_N[:ends[0] + 1].tolist() if len(ends) else tokens_N.tolist()
