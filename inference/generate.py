"""Autoregressive generation for the decoder and encoder-decoder families over a
preallocated key/value cache.

Decoder (GPT): the prompt is prefilled in one forward pass, then one token per step
inside a jitted `lax.while_loop`. Prompts of different lengths share a batch by left
padding: each row's positions count only its real tokens, and the cache masks the
padding. Encoder-decoder (T5): the prompt is the encoder's input, encoded once; the
decoder starts from the pad token and its cross-attention keys and values are
computed on the first step and cached. Each row stops at its own EOS; the loop stops
when all rows have.
"""
import dataclasses
import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from input_pipeline.tokenizer import PAD_ID
from inference.quantize import dequantize, quantize_int8
from inference.sampling import Sampling, penalize_repeats, sample
from models.config import ModelConfig
from models.transformer import DecoderOnly, EncoderDecoder

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


def check_prompts(cfg: ModelConfig, prompts: list[list[int]], max_new_tokens: int) -> None:
  if cfg.arch not in ('decoder', 'encoder_decoder'):
    raise ValueError(f"Generation needs model.arch='decoder' or 'encoder_decoder'; this run is "
                     f"'{cfg.arch}' (an encoder run fills [MASK]s instead).")
  for i, prompt in enumerate(prompts):
    if not prompt:
      raise ValueError(f'Prompt {i} is empty; give at least one token of text.')
    if cfg.arch == 'decoder' and len(prompt) + max_new_tokens > cfg.max_len:
      raise ValueError(
          f'Prompt {i} is {len(prompt)} tokens and --max_new_tokens={max_new_tokens}, but the '
          f"model's context is {cfg.max_len} tokens; shorten the prompt or lower --max_new_tokens.")
    if cfg.arch == 'encoder_decoder' and len(prompt) > cfg.max_len:
      raise ValueError(f"Prompt {i} is {len(prompt)} tokens but the encoder's context is "
                       f'{cfg.max_len} tokens; shorten the prompt.')
  if cfg.arch == 'encoder_decoder' and max_new_tokens + 1 > cfg.max_len:
    raise ValueError(f"--max_new_tokens={max_new_tokens} does not fit the decoder's context of "
                     f'{cfg.max_len} tokens (one slot holds the start token); lower it.')


def unrolled_layers(cfg: ModelConfig, params):
  """The same model with each scanned layer stack split into per-layer parameters.

  Decoding reads every weight once per token; inside a scan each step would first
  slice its layer out of the stacked arrays, copying the whole model per token
  (half the tokens/s at batch 1 on a CPU, benchmarks/RESULTS.md).
  """
  if not cfg.scan_layers:
    return cfg, params

  def unstack(stack):
    return {f'layer_{i}': jax.tree.map(lambda x, i=i: x[i], stack['layers'])
            for i in range(cfg.num_layers)}
  params = {name: unstack(sub) if isinstance(sub, dict) and 'layers' in sub else sub
            for name, sub in params.items()}
  return dataclasses.replace(cfg, scan_layers=False), params


def prepare(cfg: ModelConfig, params, prompts: list[list[int]], max_new_tokens: int,
            quantize: str):
  """(cfg, params, ids [B, P], real [B, P]) ready for a decoding loop, after checking
  the request: layers unrolled, weights quantized if asked, prompts left-padded."""
  check_prompts(cfg, prompts, max_new_tokens)
  if quantize not in ('none', 'int8'):
    raise ValueError(f'--quantize={quantize} is not one of none, int8.')
  cfg, params = unrolled_layers(cfg, params)
  if quantize == 'int8':
    params = quantize_int8(params)
  return (cfg, params) + left_pad(prompts)


class Decoding(NamedTuple):
  """The state after the prompt's prefill, and the function that adds one token."""
  logits_BV: Array  # float32 logits of the first new token
  cache: dict
  position_B: Array  # position of each row's last token
  step: Callable  # step(cache, token_B, position_B) -> (logits_BV, cache)


def start_decoding(cfg: ModelConfig, params, ids_BP: Array, real_BP: Array) -> Decoding:
  """Prefills left-padded prompts (traced inside a jitted loop); creates the cache."""
  cfg = dataclasses.replace(cfg, decode=True)
  params = dequantize(params)  # int8 weights stay int8 in memory; no-op for dense ones
  positions_BP = jnp.maximum(jnp.cumsum(real_BP, axis=1) - 1, 0)
  batch = ids_BP.shape[0]
  ones_B1 = jnp.ones((batch, 1), jnp.int32)

  def logits_and_cache(out):
    logits_BTV, variables = out
    return logits_BTV[:, -1].astype(jnp.float32), variables['cache']

  if cfg.arch == 'decoder':
    model = DecoderOnly(cfg)
    run = lambda variables, ids_BT, real_BT, positions_BT: logits_and_cache(model.apply(
        variables, ids_BT, real_BT, positions_BT, mutable=['cache']))
    logits_BV, cache = run({'params': params}, ids_BP, real_BP, positions_BP)
    step = lambda cache, token_B, position_B: run(
        {'params': params, 'cache': cache}, token_B[:, None], ones_B1, position_B[:, None])
    return Decoding(logits_BV, cache, positions_BP[:, -1], step)

  model = EncoderDecoder(cfg)
  encoded_BPD = model.apply({'params': params}, ids_BP, real_BP, positions_BP, method='encode')
  run = lambda variables, encoded, token_B, position_B: logits_and_cache(model.apply(
      variables, encoded, real_BP, token_B[:, None], ones_B1, position_B[:, None],
      method='decode', mutable=['cache']))
  start_B = jnp.full((batch,), PAD_ID, jnp.int32)  # T5 starts decoding from pad
  position_B = jnp.zeros((batch,), jnp.int32)
  logits_BV, cache = run({'params': params}, encoded_BPD, start_B, position_B)
  step = lambda cache, token_B, position_B: run({'params': params, 'cache': cache}, None,
                                                 token_B, position_B)
  return Decoding(logits_BV, cache, position_B, step)


@functools.partial(jax.jit, static_argnames=('cfg', 'max_new_tokens', 'sampling', 'eos_id',
                                             'on_token'))
def _generate(params, ids_BP: Array, real_BP: Array, key: Array, *, cfg: ModelConfig,
              max_new_tokens: int, sampling: Sampling, eos_id: int,
              on_token: Callable | None = None) -> Array:
  decoding = start_decoding(cfg, params, ids_BP, real_BP)
  batch = ids_BP.shape[0]
  # The repetition penalty counts a decoder's prompt; an encoder's input is not output.
  seen_BV = jnp.zeros((batch, cfg.vocab_size), bool)
  if cfg.arch == 'decoder':
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
  return jax.lax.while_loop(not_finished, step, carry)[6]


def generate(cfg: ModelConfig, params, prompts: list[list[int]], max_new_tokens: int,
             sampling: Sampling = Sampling(temperature=0.0), seed: int = 0, eos_id: int = 1,
             on_token: Callable | None = None, quantize: str = 'none') -> list[list[int]]:
  """New tokens for each prompt (ending at EOS, which is kept, or at max_new_tokens).

  A decoder continues each prompt; an encoder-decoder reads each prompt as its
  encoder input (end it with EOS, as span corruption does) and writes the target.
  quantize='int8' keeps the weights as int8 with per-channel scales (inference/quantize.py).
  `on_token(tokens [B])` is called as each step's tokens are chosen (for streaming).
  """
  sampling.check()
  cfg, params, ids, real = prepare(cfg, params, prompts, max_new_tokens, quantize)
  out = np.asarray(_generate(params, ids, real, jax.random.key(seed), cfg=cfg,
                             max_new_tokens=max_new_tokens, sampling=sampling, eos_id=eos_id,
                             on_token=on_token))
  results = []
  for row in out:
    ends = np.flatnonzero(row == eos_id)
    results.append(row[:ends[0] + 1].tolist() if len(ends) else row.tolist())
  return results
