"""How fast this backend's matrix products read weights at decode's batch sizes, beside
the streaming read bandwidth (benchmarks/roofline.py) measured in the same process.

A decode step is a chain of products of a few rows with every weight matrix; its memory
roofline assumes they read weights as fast as a streaming sum reads memory. This
measures what XLA's dot actually reaches for each of the decode benchmark model's matrix
shapes: the ceiling a decode step can reach without a faster matrix-vector kernel.

python -m benchmarks.matvec [--rows=1] [--shapes=384x384,384x1536,1536x384,384x8192t]

Each shape IxO (t: stored transposed, [O, I], as a tied embedding is read for the
logits) is timed as rows x [I] times distinct float32 matrices, enough of them that
they cannot stay in the caches between uses (about 128 MB), one after another in a compiled
loop, each product's result feeding the next one's input so none is skipped or hoisted.
Prints one JSON line: bytes/s per shape, and its share of the streaming bandwidth.
"""
import json

import jax
import jax.numpy as jnp
from absl import app, flags

from benchmarks import roofline
from models import layouts
from models.layers import FUSED_QKV, TRANSPOSED_EMBEDDING, TRANSPOSED_KERNEL
from train import flops, runtime

_ROWS = flags.DEFINE_integer('rows', 1, 'Rows multiplied at once (the decode batch).')
_SHAPES = flags.DEFINE_list('shapes', ['384x384', '384x1536', '1536x384', '384x8192t'],
                            'Matrix shapes IxO (a trailing t: stored [O, I]).')


def parse_shape(text: str) -> tuple[int, int, bool]:
  """'IxO' or 'IxOt' -> (inputs, outputs, stored transposed)."""
  transposed = text.endswith('t')
  try:
    inputs, outputs = (int(n) for n in text.rstrip('t').split('x'))
  except ValueError:
    raise app.UsageError(f"--shapes: '{text}' is not IxO or IxOt (e.g. 384x1536).") from None
  return inputs, outputs, transposed


def matvec_bytes_per_s(rows: int, inputs: int, outputs: int, transposed: bool,
                       megabytes: int = 128, window_seconds: float = 0.25) -> float:
  """Weight bytes read per second by a chain of [rows, inputs] x [inputs, outputs]
  products over distinct matrices of `megabytes` in all (best of a few windows,
  train/flops.py best_rate)."""
  chain, matrices = matvec_chain(rows, inputs, outputs, transposed, megabytes)
  x_RI = jnp.ones((rows, inputs), jnp.float32)
  return flops.best_rate(lambda: chain(matrices, x_RI).block_until_ready(),
                         sum(m.nbytes for m in matrices), windows=5,
                         window_seconds=window_seconds)


def matvec_chain(rows: int, inputs: int, outputs: int, transposed: bool, megabytes: int):
  """(jitted chain(matrices, x_RI), the matrices): each matrix a separate argument, read
  by its own product as it lies (as a decode step reads its weights; a slice of one
  stacked array would be copied first), each product's output feeding the next input so
  that none is skipped or hoisted."""
  count = max(2, megabytes * 2**20 // (inputs * outputs * 4))
  shape = (outputs, inputs) if transposed else (inputs, outputs)
  keys = jax.random.split(jax.random.key(0), count)
  matrices = tuple(jax.random.normal(key, shape, jnp.float32) * inputs ** -0.5 for key in keys)
  contract = 1 if transposed else 0

  @jax.jit
  def chain(matrices, x_RI):
    for matrix in matrices:
      y_RO = jax.lax.dot_general(x_RI, matrix, (((1,), (contract,)), ((), ())))
      # At the cost of a few elementwise ops on [rows, inputs].
      x_RI = x_RI + 1e-30 * jnp.sum(y_RO, axis=1, keepdims=True)
    return x_RI
  return chain, matrices


def decode_matrices(cfg, params) -> list[tuple[int, int, bool, int]]:
  """(inputs, outputs, stored transposed, how many) of each weight matrix a decode step
  of `cfg` multiplies (a decoder's, or an encoder-decoder's decoder with its
  cross-attention's query and output; the cross keys and values are cached), in the
  layouts inference/generate.py `prepare` chose for `params` (models/layouts.py):
  self-attention's query, key and value as one matrix (`fuse_qkv`), the MLP's output
  projection stored [D, F] (`transpose_down`), a tied embedding stored [D, V] rather than
  [V, D] (`transpose_embedding`)."""
  d, heads, kv = cfg.d_model, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  layers = cfg.num_decoder_layers or cfg.num_layers
  attention = ([(d, heads + 2 * kv, False, 1)] if layouts.has_param(params, FUSED_QKV)
               else [(d, heads, False, 1), (d, kv, False, 2)]) + [(heads, d, False, 1)]
  if cfg.arch == 'encoder_decoder':
    attention += [(d, heads, False, 1), (heads, d, False, 1)]
  mlp = [(d, cfg.d_ff, False, 2 if cfg.gated_mlp else 1),
         (cfg.d_ff, d, layouts.has_param(params, TRANSPOSED_KERNEL), 1)]
  shapes = {}
  for i, o, t, n in attention + mlp:
    shapes[i, o, t] = shapes.get((i, o, t), 0) + n * layers
  head = (d, cfg.vocab_size,
          cfg.tie_embeddings and not layouts.has_param(params, TRANSPOSED_EMBEDDING))
  shapes[head] = shapes.get(head, 0) + 1
  return [key + (n,) for key, n in shapes.items()]


def step_seconds_at_matvec_rates(cfg, params, rows: int, other_bytes: float, bandwidth: float,
                                 window_seconds: float = 0.25) -> float:
  """The decode step's floor when its float32 weights (`params` as `prepare` left them)
  are read at the rate XLA's dot reaches for each of their shapes at `rows` rows
  (measured here), and `other_bytes` (the key/value cache) at the streaming `bandwidth`."""
  seconds = other_bytes / bandwidth
  for inputs, outputs, transposed, count in decode_matrices(cfg, params):
    rate = matvec_bytes_per_s(rows, inputs, outputs, transposed, window_seconds=window_seconds)
    seconds += count * inputs * outputs * 4 / rate
  return seconds


def measure(rows: int, shapes: list[str]) -> dict:
  bandwidth = roofline.measure_memory_bandwidth()
  result = {'benchmark': 'matvec', 'backend': jax.default_backend(),
            'device': jax.devices()[0].device_kind, 'rows': rows,
            'memory_bandwidth_bytes_per_s': bandwidth, 'shapes': {}}
  for text in shapes:
    rate = matvec_bytes_per_s(rows, *parse_shape(text))
    result['shapes'][text] = {'bytes_per_s': rate, 'bandwidth_share': rate / bandwidth}
  return result


def main(argv):
  del argv
  for text in _SHAPES.value:
    parse_shape(text)  # a bad shape fails before anything is measured
  print(json.dumps(measure(_ROWS.value, _SHAPES.value)), flush=True)


if __name__ == '__main__':
  runtime.reexec_with_huge_pages()
  app.run(main)
