"""The memory side of the roofline: what a decode step must read, and how fast this
machine reads memory, measured in the same process as the benchmark that compares them.

A greedy decode step at small batch does little arithmetic per byte: it reads every
weight once and each row's filled key/value cache, so its floor is bytes / bandwidth.
`benchmarks/decode.py` reports achieved bytes/s against `measure_memory_bandwidth()`.
"""
import jax
import jax.numpy as jnp

from inference.generate import cache_lengths
from inference.quantize import weight_bytes
from models.config import ModelConfig
from train import flops


def measure_memory_bandwidth(megabytes: int = 256, windows: int = 8,
                             window_seconds: float = 0.25) -> float:
  """Read bandwidth in bytes/s: a jitted float32 sum over a buffer far larger than the
  caches (so every pass streams it from DRAM), the best of a few short windows (other
  processes only ever slow it down). A read figure, not a copy: a decode step reads
  weights and cache and writes almost nothing, and a copy into a fresh buffer measures
  page faults on a CPU more than DRAM."""
  x = jnp.ones((megabytes * 2**20 // 4,), jnp.float32)
  total = jax.jit(jnp.sum)
  return flops.best_rate(lambda: total(x).block_until_ready(), x.nbytes, windows,
                         window_seconds)


def kv_bytes(cfg: ModelConfig, slots: float) -> float:
  """Keys and values of `slots` cache slots of one row in every decoder layer: layers x 2
  x kv_heads x head_dim x slots x dtype bytes."""
  layers = cfg.num_decoder_layers or cfg.num_layers
  return layers * 2 * cfg.num_kv_heads * cfg.head_dim * slots * jnp.dtype(cfg.dtype).itemsize


def _cross_key_or_value(path) -> bool:
  names = [getattr(p, 'key', '') for p in path]
  return 'cross_attention' in names and ('key' in names or 'value' in names)


def decode_bytes_per_step(cfg: ModelConfig, params, batch: int, prompt_len: int,
                          new_tokens: int) -> float:
  """Bytes one decode step must read, averaged over a generation of `new_tokens` steps:

      weight_bytes + batch x kv_bytes(filled + cross)

  weight_bytes: the parameters as stored (int8 values and their float32 scales after
  --quantize=int8, else the dtype's size) that a step uses, each matrix once (the tied
  embedding as the output projection; lookups, norms and biases are small): all of a
  decoder's, an encoder-decoder's without its encoder (which reads the prompt once) and
  its cross-attention key and value projections (used at the first step only).
  filled: the mean number of self-attention slots a step attends over. Step i (0-based)
  sees its own key and everything before it: a decoder's prompt_len + i + 1 slots, mean
  prompt_len + (new_tokens + 1) / 2; an encoder-decoder's decoder starts from one start
  token, mean 1 + (new_tokens + 1) / 2, and also reads the cross-attention keys and
  values of the encoded prompt (cross = prompt_len; 0 for a decoder)."""
  if cfg.arch != 'decoder':
    # Without the encoder (it reads the prompt once) and the cross-attention key and value
    # projections (the first step fills their cache; later steps read the cache).
    params = {name: sub for name, sub in params.items() if not name.startswith('encoder')}
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: None if _cross_key_or_value(path) else x, params)
  return weight_bytes(params) + batch * kv_bytes(cfg, mean_cache_slots(cfg, prompt_len,
                                                                       new_tokens))


def mean_cache_slots(cfg: ModelConfig, prompt_len: int, new_tokens: int,
                     grown_cache: bool = False) -> float:
  """The cache slots a decode step reads, on average over `new_tokens` steps: filled +
  cross of `decode_bytes_per_step` (step i writes slot filled + i and needs the slots up
  to it); with `grown_cache`, the whole self-attention cache it attends over in
  inference/generate.py's loops, grown through `cache_lengths` (up to twice the filled
  slots). Plus an encoder-decoder's cross-attention cache of the prompt."""
  filled, cross = (prompt_len, 0) if cfg.arch == 'decoder' else (1, prompt_len)
  lengths = cache_lengths(filled, filled + new_tokens)
  read = [next(n for n in lengths if n > filled + i) if grown_cache else filled + i + 1
          for i in range(new_tokens)]
  return sum(read) / new_tokens + cross
