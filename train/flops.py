"""FLOPs per token, device peak FLOP/s and model FLOPs utilisation (MFU).

Training FLOPs per token (Kaplan et al. 2020; PaLM appendix B; nanoGPT):

    flops_per_token = 6 * N_matmul + 12 * num_layers * seq_len * (num_heads * head_dim)

where N_matmul counts parameters used in matrix multiplies: every projection
kernel and the output projection (also when tied to the input embedding), but
not a lookup-only input embedding, learned position table, norms or biases.
6 = 2 (multiply-add) x 3 (forward + two backward matmuls); the second term is
the attention score (Q K^T) and value (P V) matmuls, which grow with context
length. Their width is that of the queries, N x K (num_heads x head_dim), which
equals d_model only when head_dim = d_model / num_heads; grouped-query attention
shares keys and values but every query head still scores and mixes all of them.
A task (tasks/base.py `train_flops_with_frozen`) applies both terms part by part: each
part's parameters over the tokens they multiply (an encoder-decoder's encoder over the
inputs, its decoder over the targets; a classifier head once per sequence), and each
kind of attention over its own queries and keys.

MFU = achieved tokens/s x flops_per_token / peak FLOP/s of the devices used.
"""
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

# Dense (no 2:4 sparsity) peak FLOP/s of one JAX device, by dtype family:
# (bf16/fp16, fp32). Sources: NVIDIA data sheets (their tensor-core figures are
# "with sparsity": halved here) and Google Cloud's TPU pages (per chip).
# - fp32 on GPUs is the TF32 tensor-core figure: JAX's default matmul precision
#   lets XLA run float32 dots as TF32 on Ampere and newer. V100 has no TF32: its
#   plain FP32 figure. (A100 156, A10 62.5, L4 60, L40S 183, L40 90.5, H100 SXM /
#   H200 / GH200 494.5, H100 PCIe 378 TFLOPs TF32 dense.)
# - TPU v2 and v3 chips have two TensorCores and JAX makes each core a device: half
#   the chip's 45 / 123 TFLOPs. v4 and v5p chips are megacores (one JAX device per
#   chip, both cores): the chip's figure. v5e and v6e chips have one core.
# Keys match whole words of jax.Device.device_kind (e.g. 'NVIDIA A100-SXM4-80GB',
# 'NVIDIA L40S', 'TPU v5 lite'), the longest matching key winning: 'L4' is not
# 'L40S', 'H100' is not 'H100 PCIe', 'TPU v5' (v5p) is not 'TPU v5 lite'.
PEAK_FLOPS = {
    'GH200': (989.5e12, 494.5e12),  # the H100 / H200 SXM GPU
    'H200': (989.5e12, 494.5e12),  # SXM; same compute as H100 SXM
    'H100': (989.5e12, 494.5e12),  # SXM (device kind 'NVIDIA H100 80GB HBM3')
    'H100 PCIe': (756.5e12, 378e12),
    'A100': (312e12, 156e12),  # SXM and PCIe alike
    'L40S': (362e12, 183e12),
    'L40': (181e12, 90.5e12),
    'L4': (121e12, 60e12),
    'A10': (125e12, 62.5e12),
    'V100': (125e12, 15.7e12),  # fp16 tensor cores; no TF32
    'TPU v6 lite': (918e12, 918e12 / 4),
    'TPU v6e': (918e12, 918e12 / 4),
    'TPU v5p': (459e12, 459e12 / 4),
    'TPU v5': (459e12, 459e12 / 4),  # v5p's device kind in some JAX versions
    'TPU v5 lite': (197e12, 197e12 / 4),
    'TPU v5e': (197e12, 197e12 / 4),
    'TPU v4': (275e12, 275e12 / 4),
    'TPU v3': (123e12 / 2, 123e12 / 2 / 4),
    'TPU v2': (45e12 / 2, 45e12 / 2 / 4),
}


def _words(text: str) -> tuple[str, ...]:
  return tuple(re.findall(r'[a-z0-9]+', text.lower()))


def peak_flops_entry(device_kind: str) -> tuple[float, float] | None:
  """PEAK_FLOPS's (bf16, fp32) for a device kind: the longest key whose words occur
  consecutively among the kind's words; None for an unknown device."""
  kind = _words(device_kind)
  best = None
  for name, peaks in PEAK_FLOPS.items():
    key = _words(name)
    if any(kind[i:i + len(key)] == key for i in range(len(kind) - len(key) + 1)):
      if best is None or len(key) > len(best[0]):
        best = (key, peaks)
  return None if best is None else best[1]


def matmul_param_counts(params, tie_embeddings: bool) -> dict[str, int]:
  """Parameters that take part in a matmul for each token (see module docstring), by
  top-level module: 'encoder' and 'decoder' stacks, and everything else (output head,
  poolers) under 'other'; the decoder's cross-attention key and value projections,
  which run over the encoder's outputs rather than the decoder's tokens, under 'cross_kv'."""
  counts = {'encoder': 0, 'decoder': 0, 'cross_kv': 0, 'other': 0}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    names = [getattr(p, 'key', str(p)) for p in path]
    if names[-1] in ('scale', 'bias', 'position_embedding', 'relative_attention_bias',
                     'token_type_embedding'):
      continue
    if names[-1] == 'embedding' and not tie_embeddings:
      continue  # lookup only; the separate lm_head kernel is counted instead
    if 'cross_attention' in names and names[-2:-1] in (['key'], ['value']):
      part = 'cross_kv'
    else:
      part = names[0] if names[0] in ('encoder', 'decoder') else 'other'
    counts[part] += int(np.prod(leaf.shape))
  return counts


def matmul_param_count(params, tie_embeddings: bool) -> int:
  return sum(matmul_param_counts(params, tie_embeddings).values())


def matmul_train_flops(counts: dict[str, int], tokens: dict[str, int],
                       frozen: dict[str, int] | None = None) -> float:
  """Training FLOPs of the matmul parameters per example: 6 per parameter (`counts`, by
  part) per token it multiplies (`tokens`, by part); a frozen one (`frozen`: LoRA's
  base) gets no weight gradient, so 4 of its 6."""
  frozen = frozen or {}
  return sum((6.0 * n - 2.0 * frozen.get(part, 0)) * tokens[part] for part, n in counts.items())


def attention_train_flops(attention_width: int,
                          products: list[tuple[int, int, int]]) -> float:
  """Training FLOPs of attention's score and value products per example: 12 (N K) per
  query-key pair of each layer, over `products` (layers, queries, keys) (a stack's
  self-attention: (L, T, T)), attention_width = N K (num_heads x head_dim)."""
  return 12.0 * attention_width * sum(layers * q * k for layers, q, k in products)


_measured_cpu_peak: float | None = None


def best_rate(run, work_per_run: float, windows: int, window_seconds: float) -> float:
  """work_per_run x runs / seconds of `run` (compiled, warmed up, blocking), the best of a
  few short windows: other processes only ever slow it down."""
  run()
  best = 0.0
  for _ in range(windows):
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < window_seconds:
      run()
      runs += 1
    best = max(best, work_per_run * runs / (time.perf_counter() - start))
  return best


def measure_matmul_flops(size: int = 2048, dtype=jnp.float32, windows: int = 4,
                         window_seconds: float = 0.25) -> float:
  """FLOP/s of a large jitted matmul on the default device: the practical CPU peak."""
  a = jnp.ones((size, size), dtype)
  matmul = jax.jit(lambda x, y: x @ y)
  return best_rate(lambda: matmul(a, a).block_until_ready(), 2.0 * size ** 3, windows,
                   window_seconds)


def peak_flops_per_device(dtype) -> float:
  """Table lookup for known accelerators; on CPU, a matmul measured once per process."""
  global _measured_cpu_peak
  device = jax.devices()[0]
  if device.platform == 'cpu':
    if _measured_cpu_peak is None:
      _measured_cpu_peak = measure_matmul_flops() / max(1, jax.local_device_count())
    return _measured_cpu_peak
  peaks = peak_flops_entry(device.device_kind)
  if peaks is None:
    return float('nan')
  half, single = peaks
  return half if jnp.dtype(dtype).itemsize == 2 else single
