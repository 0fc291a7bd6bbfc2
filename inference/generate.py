"""Autoregressive generation for the decoder family over a preallocated key/value cache.

The prompt is prefilled in one forward pass; then one token per step inside a
jitted `lax.while_loop`. Prompts of different lengths share a batch by left
padding: each row's positions count only its real tokens, and the cache masks the
padding. Each row stops at its own EOS; the loop stops when all rows have.
"""
import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from inference.quantize import dequantize, quantize_int8
from inference.sampling import Sampling, penalize_repeats, sample
from models.config import ModelConfig
from models.transformer import DecoderOnly

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


def check_prompts(prompts: list[list[int]], max_new_tokens: int, max_len: int) -> None:
  for i, prompt in enumerate(prompts):
    if not prompt:
      raise ValueError(f'Prompt {i} is empty; give at least one token of text.')
    if len(prompt) + max_new_tokens > max_len:
      raise ValueError(
          f'Prompt {i} is {len(prompt)} tokens and --max_new_tokens={max_new_tokens}, but the '
          f"model's context is {max_len} tokens; shorten the prompt or lower --max_new_tokens.")


def unrolled_layers(cfg: ModelConfig, params):
  """The same model with its scanned layer stack split into per-layer parameters.

  Decoding reads every weight once per token; inside a scan each step would first
  slice its layer out of the stacked arrays, copying the whole model per token
  (half the tokens/s at batch 1 on a CPU, benchmarks/RESULTS.md).
  """
  if not cfg.scan_layers:
    return cfg, params
  stacked = params['decoder']['layers']
  layers = {f'layer_{i}': jax.tree.map(lambda x, i=i: x[i], stacked)
            for i in range(cfg.num_layers)}
  return dataclasses.replace(cfg, scan_layers=False), {**params, 'decoder': layers}


def start_decoding(cfg: ModelConfig, params, ids_BP: Array, real_BP: Array):
  """(forward, empty cache, positions) for decoding these left-padded prompts (traced inside
  a jitted loop). forward(cache, ids_BT, real_BT, positions_BT) runs the model over the
  new tokens and returns (float32 logits of the last one [B, V], updated cache)."""
  model = DecoderOnly(dataclasses.replace(cfg, decode=True))
  params = dequantize(params)  # int8 weights stay int8 in memory; no-op for dense ones
  positions_BP = jnp.maximum(jnp.cumsum(real_BP, axis=1) - 1, 0)
  cache = model.init(jax.random.key(0), ids_BP[:, :1], real_BP[:, :1], positions_BP[:, :1])
  cache = jax.tree.map(jnp.zeros_like, cache['cache'])

  def forward(cache, ids_BT, real_BT, positions_BT):
    logits_BTV, updated = model.apply({'params': params, 'cache': cache}, ids_BT, real_BT,
                                      positions_BT, mutable=['cache'])
    return logits_BTV[:, -1].astype(jnp.float32), updated['cache']

  return forward, cache, positions_BP


@functools.partial(jax.jit, static_argnames=('cfg', 'max_new_tokens', 'sampling', 'eos_id',
                                             'on_token'))
def _generate(params, ids_BP: Array, real_BP: Array, key: Array, *, cfg: ModelConfig,
              max_new_tokens: int, sampling: Sampling, eos_id: int,
              on_token: Callable | None = None) -> Array:
  forward, cache, positions_BP = start_decoding(cfg, params, ids_BP, real_BP)
  batch = ids_BP.shape[0]
  logits_BV, cache = forward(cache, ids_BP, real_BP, positions_BP)  # prefill
  seen_BV = jnp.zeros((batch, cfg.vocab_size), bool).at[
      jnp.arange(batch)[:, None], ids_BP].set(real_BP > 0)

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
    logits_BV, cache = forward(cache, token_B[:, None], jnp.ones((batch, 1), jnp.int32),
                               position_B[:, None])
    return i + 1, cache, logits_BV, position_B, seen_BV, done_B, out_BN, key

  def not_finished(carry):
    i, *_, done_B, _, _ = carry
    return (i < max_new_tokens) & ~jnp.all(done_B)

  carry = (jnp.zeros((), jnp.int32), cache, logits_BV, positions_BP[:, -1], seen_BV,
           jnp.zeros((batch,), bool), jnp.zeros((batch, max_new_tokens), jnp.int32), key)
  return jax.lax.while_loop(not_finished, step, carry)[6]


def generate(cfg: ModelConfig, params, prompts: list[list[int]], max_new_tokens: int,
             sampling: Sampling = Sampling(temperature=0.0), seed: int = 0, eos_id: int = 1,
             on_token: Callable | None = None, quantize: str = 'none') -> list[list[int]]:
  """New tokens for each prompt (ending at EOS, which is kept, or at max_new_tokens).

  quantize='int8' keeps the weights as int8 with per-channel scales (inference/quantize.py).
  `on_token(tokens [B])` is called as each step's tokens are chosen (for streaming).
  """
  if cfg.arch != 'decoder':
    raise ValueError(f"Sampling supports model.arch='decoder'; this run is '{cfg.arch}'.")
  if cfg.position == 'relative':
    raise ValueError("Sampling with model.position='relative' is not supported for decoders.")
  sampling.check()
  check_prompts(prompts, max_new_tokens, cfg.max_len)
  ids, real = left_pad(prompts)
  cfg, params = unrolled_layers(cfg, params)
  if quantize == 'int8':
    params = quantize_int8(params)
  elif quantize != 'none':
    raise ValueError(f"--quantize={quantize} is not one of none, int8.")
  out = np.asarray(_generate(params, ids, real, jax.random.key(seed), cfg=cfg,
                             max_new_tokens=max_new_tokens, sampling=sampling, eos_id=eos_id,
                             on_token=on_token))
  results = []
  for row in out:
    ends = np.flatnonzero(row == eos_id)
    results.append(row[:ends[0] + 1].tolist() if len(ends) else row.tolist())
  return results
