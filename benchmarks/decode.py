"""Greedy decoding throughput of the GPT peer shape with random weights: one JSON line.

python -m benchmarks.decode --json --batch=1 --new_tokens=128 [--arch=encoder_decoder]

Vocab 8192, 6 layers, 6 heads, d_model 384 (d_ff 1536), a 32-token prompt (a T5 has
6 such layers on each side and reads the prompt with its encoder); reports
time to first token (prefill + first sample, compiled) and new tokens/s over the
whole generation (all rows together), excluding compilation, and peak_bytes: XLA's
compiled memory of the generation (arguments + outputs + temporaries).
"""
import json
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import tasks
from inference.generate import decode_tokens, prepare
from inference.sampling import Sampling
from models import ModelConfig

_BATCH = flags.DEFINE_integer('batch', 1, 'Prompts decoded together.')
_NEW_TOKENS = flags.DEFINE_integer('new_tokens', 128, 'Tokens generated per prompt.')
_PROMPT_LEN = flags.DEFINE_integer('prompt_len', 32, 'Prompt tokens.')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16', 'float16'],
                           'Compute dtype.')
_ARCH = flags.DEFINE_enum('arch', 'decoder', ['decoder', 'encoder_decoder'],
                          'decoder: GPT; encoder_decoder: a T5 of the same width and depth on '
                          'each side (the prompt is the encoder input).')
_QUANTIZE = flags.DEFINE_enum('quantize', 'none', ['none', 'int8'], 'Weight quantization.')
_JSON = flags.DEFINE_bool('json', False, 'Print only the JSON line.')


def _timed(fn, repeats: int = 3) -> float:
  jax.block_until_ready(fn())  # compile
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - start)
  return best


def main(argv):
  del argv
  decoder = _ARCH.value == 'decoder'
  cfg = ModelConfig(arch=_ARCH.value, vocab_size=8192, num_layers=6, num_heads=6, num_kv_heads=6,
                    head_dim=64, d_model=384, d_ff=1536,
                    max_len=(_PROMPT_LEN.value + _NEW_TOKENS.value if decoder  # prompt + output
                             else max(_PROMPT_LEN.value, _NEW_TOKENS.value + 1)),  # either side
                    position='learned' if decoder else 'relative', norm='layernorm',
                    dtype=jnp.dtype(_DTYPE.value))
  task = tasks.for_model(cfg)
  params = nn.unbox(task.init(jax.random.key(0), task.example_batch(1, 8)))
  params = jax.tree.map(lambda x: x.astype(cfg.dtype), params)  # weights stored as computed
  prompts = np.random.default_rng(0).integers(200, 8192, (_BATCH.value, _PROMPT_LEN.value))
  task, params, ids, real = prepare(task, params, prompts.tolist(), _NEW_TOKENS.value,
                                    _QUANTIZE.value)  # as generate() does
  inputs = (params, ids, real, jax.random.key(0))
  options = dict(task=task, sampling=Sampling(temperature=0.0), eos_id=-1)
  run = lambda new: decode_tokens(*inputs, max_new_tokens=new, **options)
  # XLA's compiled memory of the whole generation: arguments (weights, prompts) + outputs
  # + temporaries (cache, activations, any dequantized weights).
  memory = decode_tokens.lower(*inputs, max_new_tokens=_NEW_TOKENS.value,
                               **options).compile().memory_analysis()
  peak_bytes = (memory.argument_size_in_bytes + memory.output_size_in_bytes
                + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
  first_token_s = _timed(lambda: run(1))
  total_s = _timed(lambda: run(_NEW_TOKENS.value))
  result = {'benchmark': 'decode', 'backend': jax.default_backend(),
            'device': jax.devices()[0].device_kind, 'dtype': _DTYPE.value,
            'quantize': _QUANTIZE.value, 'arch': _ARCH.value,
            'batch': _BATCH.value, 'prompt_len': _PROMPT_LEN.value,
            'new_tokens': _NEW_TOKENS.value, 'time_to_first_token_s': first_token_s,
            'total_s': total_s, 'tokens_per_s': _BATCH.value * _NEW_TOKENS.value / total_s,
            'peak_bytes': peak_bytes}
  print(json.dumps(result), flush=True)


if __name__ == '__main__':
  app.run(main)
