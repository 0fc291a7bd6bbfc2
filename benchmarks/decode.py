"""Greedy decoding throughput of the GPT peer shape with random weights: one JSON line.

python -m benchmarks.decode --json --batch=1 --new_tokens=128 [--arch=encoder_decoder]
    [--quantize=int8] [--compare=hf|qkv|down|embedding] [--matvec]

Vocab 8192, 6 layers, 6 heads, d_model 384 (d_ff 1536), a 32-token prompt (a T5 has
6 such layers on each side and reads the prompt with its encoder); reports
time to first token (prefill + first sample, compiled) and new tokens/s over the
whole generation (all rows together), excluding compilation, and peak_bytes: XLA's
compiled memory of the generation (arguments + outputs + temporaries).

Against the memory roofline (benchmarks/roofline.py), all measured in this process:

    bytes_per_step        = weight bytes + batch x filled key/value cache bytes
                            (roofline.decode_bytes_per_step has the exact formula)
    achieved_bytes_per_s  = bytes_per_step x new_tokens / total_s
    roofline_share        = achieved_bytes_per_s / memory_bandwidth_bytes_per_s

where memory_bandwidth_bytes_per_s is a read bandwidth (a jitted sum over 256 MB). A share
above 1 means the step read less from DRAM than it used (weights that stayed in a large
last-level cache between steps) or that other work slowed the bandwidth measurement.

--matvec adds a floor that XLA's own kernels can reach: the step's float32 weights read
at the rate a chain of XLA dots reads each weight shape at this batch (benchmarks/matvec.py,
measured here), and the cache slots it reads (the whole grown cache,
roofline.mean_cache_slots) at the read bandwidth: matvec_floor_step_s and
matvec_roofline_share = that floor / the measured step time.

The layouts `prepare` chose for the weights (models/layouts.py) are reported: qkv_joined
(each self-attention's query, key and value kernels as one, `fuse_qkv`; for one row per
step), down_transposed (each MLP's output projection stored [D, F], `transpose_down`; for
one row per step) and embedding_transposed (a tied embedding stored [D, V],
`transpose_embedding`). --compare=qkv|down|embedding also times the same generation with
that one layout the other way, the two taking turns: other_NAME_tokens_per_s,
speedup_vs_other_NAME and other_NAME_tokens_agree (the share of tokens both chose).

--compare=hf builds the same model, with the same weights (interop's GPT-2 layout), as
`transformers`' GPT2LMHeadModel in float32 and times its greedy `generate` (eager
PyTorch on every core, best of 3 after a warm-up): hf_tokens_per_s, speedup_vs_hf, and
hf_tokens_agree, the share of generated tokens equal to ours (a check that both ran the
same model; bfloat16 weights or float rounding on near-tied random logits can lower it).
"""
import importlib.util
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import tasks
from benchmarks import Program, best_seconds, matvec, peer_config, roofline
from inference.generate import decode_tokens, prepare
from inference.quantize import dequantize
from inference.sampling import Sampling
from interop import weights
from interop.families import gpt2
from models import layouts
from train import runtime

_BATCH = flags.DEFINE_integer('batch', 1, 'Prompts decoded together.')
_NEW_TOKENS = flags.DEFINE_integer('new_tokens', 128, 'Tokens generated per prompt.')
_PROMPT_LEN = flags.DEFINE_integer('prompt_len', 32, 'Prompt tokens.')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16', 'float16'],
                           'Compute dtype.')
_ARCH = flags.DEFINE_enum('arch', 'decoder', ['decoder', 'encoder_decoder'],
                          'decoder: GPT; encoder_decoder: a T5 of the same width and depth on '
                          'each side (the prompt is the encoder input).')
_QUANTIZE = flags.DEFINE_enum('quantize', 'none', ['none', 'int8'], 'Weight quantization.')
# allow_override: benchmarks/train_step.py has a --compare and a --json of its own, and
# benchmarks/profile.py imports both.
_COMPARE = flags.DEFINE_enum('compare', 'none', ['none', 'hf', 'qkv', 'embedding', 'down'],
                             "hf: also time transformers' generate on the same model; qkv, down, "
                             "embedding: also our generation with that weight layout the other "
                             "way than prepare chose (see the module docstring).",
                             allow_override=True)
_MATVEC = flags.DEFINE_bool(
    'matvec', False, 'Also report the step time floor at the rates XLA\'s dot reads each '
    'weight shape at this batch (benchmarks/matvec.py) and the share of it reached.')
_JSON = flags.DEFINE_bool('json', False, 'Print only the JSON line.', allow_override=True)


def setup(batch: int, prompt_len: int, new_tokens: int, dtype: str = 'float32',
          arch: str = 'decoder', quantize: str = 'none'):
  """(task, decode_tokens' arguments, its static options): the peer shape with random
  weights, prepared as generate() prepares them (layers unrolled, int8 if asked)."""
  decoder = arch == 'decoder'
  cfg = peer_config(6, (prompt_len + new_tokens if decoder  # prompt + output
                        else max(prompt_len, new_tokens + 1)),  # either side
                    arch=arch, position='learned' if decoder else 'relative',
                    dtype=jnp.dtype(dtype))
  task = tasks.for_model(cfg)
  params = nn.unbox(task.init(jax.random.key(0), task.example_batch(1, 8)))
  params = jax.tree.map(lambda x: x.astype(cfg.dtype), params)  # weights stored as computed
  prompts = np.random.default_rng(0).integers(200, 8192, (batch, prompt_len))
  task, params, ids, real = prepare(task, params, prompts.tolist(), new_tokens, quantize)
  options = dict(task=task, sampling=Sampling(temperature=0.0), eos_id=-1)
  return task, (params, ids, real, jax.random.key(0)), options


def generation(inputs, options, new_tokens: int) -> Program:
  """The compiled generation of `new_tokens` tokens per row (prefill and every step)."""
  compiled = decode_tokens.lower(*inputs, max_new_tokens=new_tokens, **options).compile()
  return Program(compiled, lambda: compiled(*inputs))


def program(batch: int, prompt_len: int, new_tokens: int, dtype: str = 'float32',
            arch: str = 'decoder', quantize: str = 'none') -> Program:
  """The benchmark's whole generation, for benchmarks/profile.py."""
  _, inputs, options = setup(batch, prompt_len, new_tokens, dtype, arch, quantize)
  return generation(inputs, options, new_tokens)


def program_from_flags() -> Program:
  return program(_BATCH.value, _PROMPT_LEN.value, _NEW_TOKENS.value, _DTYPE.value,
                 _ARCH.value, _QUANTIZE.value)


def hf_generate(task, params, ids_BP: np.ndarray, new_tokens: int) -> tuple[np.ndarray, float]:
  """(new tokens [B, new_tokens], best seconds of 3 after a warm-up) of transformers'
  greedy GPT2LMHeadModel.generate on our model's weights as `prepare` left them (in the
  model's own layout again, models/layouts.py `model_layout`; int8 ones dequantized, so
  both compute with the same values), float32, eager PyTorch on every core, in a process
  of its own with 4 KB pages (benchmarks/torch_reference.py `in_own_process`). No eos
  token: generate runs all max_new_tokens steps, as ours with eos_id=-1 does (a
  min_new_tokens would instead forbid one real token)."""
  import torch
  from benchmarks import torch_reference
  cfg = task.cfg
  fields = {k: v for k, v in gpt2.hf_config(cfg).items() if k != 'model_type'}
  own_layout = dequantize(layouts.model_layout(params, cfg))
  tensors = weights.to_hf(gpt2.layout(cfg), jax.device_get(own_layout), cfg.scan_layers)
  result = torch_reference.in_own_process({
      'kind': 'generate', 'new_tokens': new_tokens, 'ids': np.asarray(ids_BP),
      'config': {**fields, 'bos_token_id': None, 'eos_token_id': None, 'pad_token_id': 0},
      'state': {name: torch.from_numpy(np.asarray(x, np.float32)) for name, x in tensors.items()}})
  return np.asarray(result['tokens']), result['seconds']


# --compare=NAME (models/layouts.py LAYOUTS): the JSON field that says whether `prepare`
# chose that layout.
LAYOUT_FIELDS = {'qkv': 'qkv_joined', 'down': 'down_transposed',
                 'embedding': 'embedding_transposed'}


def main(argv):
  del argv
  batch, new_tokens, prompt_len = _BATCH.value, _NEW_TOKENS.value, _PROMPT_LEN.value
  if _COMPARE.value == 'hf':
    if _ARCH.value != 'decoder':
      raise app.UsageError('--compare=hf compares a decoder (GPT-2); drop --arch or --compare.')
    if not all(importlib.util.find_spec(m) for m in ('torch', 'transformers')):
      raise app.UsageError('--compare=hf needs torch and transformers: '
                           'pip install -r requirements-dev.txt')
  if _MATVEC.value and (_DTYPE.value, _QUANTIZE.value) != ('float32', 'none'):
    raise app.UsageError('--matvec measures float32 weights; drop --dtype and --quantize.')
  task, inputs, options = setup(batch, prompt_len, new_tokens, _DTYPE.value, _ARCH.value,
                                _QUANTIZE.value)
  other = f'other_{_COMPARE.value}'
  if _COMPARE.value in LAYOUT_FIELDS:  # before compiling: the weights may have one way only
    try:
      other_params = layouts.other_way(_COMPARE.value, inputs[0], task.cfg)
    except ValueError as e:
      raise app.UsageError(f'--compare={_COMPARE.value}: {e}') from None
  whole, first = generation(inputs, options, new_tokens), generation(inputs, options, 1)
  # XLA's compiled memory of the whole generation: arguments (weights, prompts) + outputs
  # + temporaries (cache, activations, any dequantized weights).
  memory = whole.compiled.memory_analysis()
  peak_bytes = (memory.argument_size_in_bytes + memory.output_size_in_bytes
                + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
  runs = {'first': first.run, 'whole': whole.run}
  if _COMPARE.value in LAYOUT_FIELDS:
    runs[other] = generation((other_params,) + inputs[1:], options, new_tokens).run
  seconds, outputs = best_seconds(runs)
  first_token_s, total_s = seconds['first'], seconds['whole']
  bandwidth = roofline.measure_memory_bandwidth()
  bytes_per_step = roofline.decode_bytes_per_step(task.cfg, inputs[0], batch, prompt_len,
                                                  new_tokens)
  achieved = bytes_per_step * new_tokens / total_s
  tokens_per_s = batch * new_tokens / total_s
  result = {'benchmark': 'decode', 'backend': jax.default_backend(),
            'device': jax.devices()[0].device_kind, 'dtype': _DTYPE.value,
            'quantize': _QUANTIZE.value, 'arch': _ARCH.value,
            'batch': batch, 'prompt_len': prompt_len,
            'new_tokens': new_tokens, 'time_to_first_token_s': first_token_s,
            'total_s': total_s, 'tokens_per_s': tokens_per_s,
            'peak_bytes': peak_bytes, 'bytes_per_step': bytes_per_step,
            'achieved_bytes_per_s': achieved, 'memory_bandwidth_bytes_per_s': bandwidth,
            'roofline_share': achieved / bandwidth,
            **{field: layouts.has_param(inputs[0], layouts.LAYOUTS[name].marker)
               for name, field in LAYOUT_FIELDS.items()}}
  if _MATVEC.value:
    read_slots = roofline.mean_cache_slots(task.cfg, prompt_len, new_tokens, grown_cache=True)
    cache_bytes = batch * roofline.kv_bytes(task.cfg, read_slots)
    floor_s = matvec.step_seconds_at_matvec_rates(task.cfg, inputs[0], batch, cache_bytes,
                                                  bandwidth)
    result.update(matvec_floor_step_s=floor_s,
                  matvec_roofline_share=floor_s * new_tokens / total_s)
  if _COMPARE.value in LAYOUT_FIELDS:
    result.update({
        f'{other}_tokens_per_s': batch * new_tokens / seconds[other],
        f'speedup_vs_{other}': seconds[other] / total_s,
        f'{other}_tokens_agree': float(np.mean(np.asarray(outputs['whole'])
                                               == np.asarray(outputs[other])))})
  if _COMPARE.value == 'hf':
    hf_tokens, hf_s = hf_generate(task, inputs[0], inputs[1], new_tokens)
    ours = np.asarray(whole.run())
    hf_tokens_per_s = batch * new_tokens / hf_s
    result.update(hf_tokens_per_s=hf_tokens_per_s, speedup_vs_hf=tokens_per_s / hf_tokens_per_s,
                  hf_tokens_agree=float(np.mean(ours == hf_tokens)))
  print(json.dumps(result), flush=True)


if __name__ == '__main__':
  runtime.reexec_with_huge_pages()
  app.run(main)
