"""FLOPs per token, device peak FLOP/s and model FLOPs utilisation (MFU).

Training FLOPs per token (Kaplan et al. 2020; PaLM appendix B; nanoGPT):

    flops_per_token = 6 * N_matmul + 12 * num_layers * seq_len * d_model

where N_matmul counts parameters used in matrix multiplies: every projection
kernel and the output projection (also when tied to the input embedding), but
not a lookup-only input embedding, learned position table, norms or biases.
6 = 2 (multiply-add) x 3 (forward + two backward matmuls); the second term is
the attention score and value matmuls, which grow with context length.

MFU = achieved tokens/s x flops_per_token / peak FLOP/s of the devices used.
"""
import time

import jax
import jax.numpy as jnp
import numpy as np

# Dense peak FLOP/s per device by dtype family, from vendor data sheets.
PEAK_FLOPS = {
    # device_kind substring: (bf16/fp16 dense, fp32)
    'H200': (989e12, 67e12),
    'H100': (989e12, 67e12),  # SXM; PCIe is lower
    'A100': (312e12, 19.5e12),
    'L4': (121e12, 30e12),
    'A10': (125e12, 31e12),
    'V100': (125e12, 15.7e12),
    'TPU v6': (918e12, 918e12 / 4),
    'TPU v5p': (459e12, 459e12 / 4),
    'TPU v5 lite': (197e12, 197e12 / 4),
    'TPU v5e': (197e12, 197e12 / 4),
    'TPU v4': (275e12, 275e12 / 4),
    'TPU v3': (123e12, 123e12 / 4),
}


def matmul_param_counts(params, tie_embeddings: bool) -> dict[str, int]:
  """Parameters that take part in a matmul for each token (see module docstring), by
  top-level module: 'encoder' and 'decoder' stacks, and everything else (output head,
  poolers) under 'other'."""
  counts = {'encoder': 0, 'decoder': 0, 'other': 0}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    names = [getattr(p, 'key', str(p)) for p in path]
    if names[-1] in ('scale', 'bias', 'position_embedding', 'relative_attention_bias',
                     'token_type_embedding'):
      continue
    if names[-1] == 'embedding' and not tie_embeddings:
      continue  # lookup only; the separate lm_head kernel is counted instead
    counts[names[0] if names[0] in counts else 'other'] += int(np.prod(leaf.shape))
  return counts


def matmul_param_count(params, tie_embeddings: bool) -> int:
  return sum(matmul_param_counts(params, tie_embeddings).values())


def stack_train_flops(params, tie_embeddings: bool, num_layers: int, d_model: int,
                      batch_size: int, seq_len: int) -> float:
  """Training FLOPs of one step of a single stack (decoder-only or encoder-only):
  batch x flops_per_token(N_matmul, L, T, D) x T."""
  n_matmul = matmul_param_count(params, tie_embeddings)
  return batch_size * seq_len * flops_per_token(n_matmul, num_layers, seq_len, d_model)


def encoder_decoder_train_flops(params, tie_embeddings: bool, num_layers: int, d_model: int,
                                batch_size: int, inputs_len: int, targets_len: int) -> float:
  """Training FLOPs of one encoder-decoder step: the encoder's matmuls see the
  S = inputs_len input tokens, the decoder's and the output head's the T = targets_len
  target tokens; attention adds 12 L D (S^2 + T^2 + T S) per example (encoder self,
  decoder self, cross)."""
  counts = matmul_param_counts(params, tie_embeddings)
  s, t = inputs_len, targets_len
  per_example = (6.0 * (counts['encoder'] * s + (counts['decoder'] + counts['other']) * t)
                 + 12.0 * num_layers * d_model * (s * s + t * t + t * s))
  return batch_size * per_example


def flops_per_token(n_matmul: int, num_layers: int, seq_len: int, d_model: int) -> float:
  """Training FLOPs per token: 6 N_matmul + 12 L T D."""
  return 6.0 * n_matmul + 12.0 * num_layers * seq_len * d_model


_measured_cpu_peak: float | None = None


def measure_matmul_flops(size: int = 2048, dtype=jnp.float32, windows: int = 4,
                         window_seconds: float = 0.25) -> float:
  """FLOP/s of a large jitted matmul on the default device, the best of a few short
  windows (other processes only ever slow it down): the practical CPU peak."""
  a = jnp.ones((size, size), dtype)
  matmul = jax.jit(lambda x, y: x @ y)
  matmul(a, a).block_until_ready()
  best = 0.0
  for _ in range(windows):
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < window_seconds:
      matmul(a, a).block_until_ready()
      runs += 1
    best = max(best, 2.0 * size ** 3 * runs / (time.perf_counter() - start))
  return best


def peak_flops_per_device(dtype) -> float:
  """Table lookup for known accelerators; on CPU, a matmul measured once per process."""
  global _measured_cpu_peak
  device = jax.devices()[0]
  if device.platform == 'cpu':
    if _measured_cpu_peak is None:
      _measured_cpu_peak = measure_matmul_flops() / max(1, jax.local_device_count())
    return _measured_cpu_peak
  kind = device.device_kind
  for name, (half, single) in PEAK_FLOPS.items():
    if name.lower() in kind.lower():
      return half if jnp.dtype(dtype).itemsize == 2 else single
  return float('nan')
