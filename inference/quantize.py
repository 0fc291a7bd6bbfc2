"""Weight-only int8 quantization with per-channel scales.

Every matrix (projection kernels, embeddings) is stored as int8 values q and
float32 scales s with w ~= q * s, s = max|w| / 127 taken over the input axis
(axis 0 of a kernel, after the layer axis of a scanned stack; each row of an
embedding, which is both a lookup and the tied output projection). Norm scales and biases stay in float32. Weights take a
quarter of their float32 memory; `dequantize` runs inside the jitted decode.
"""
import jax
import jax.numpy as jnp
import numpy as np


def _is_quantized(x) -> bool:
  return isinstance(x, dict) and set(x) == {'int8', 'scale'}


def quantize_int8(params):
  """The params tree with every matrix replaced by {'int8': q, 'scale': s}."""
  def quantize(path, w):
    names = [getattr(p, 'key', '') for p in path]
    if w.ndim < 2 or names[-1] not in ('kernel', 'embedding'):
      return w
    stacked = 'layers' in names  # a scanned stack leads with its layer axis
    reduce_axis = (1 if names[-1] == 'embedding' else 0) + stacked
    scale = jnp.max(jnp.abs(w), axis=reduce_axis, keepdims=True) / 127.0
    scale = jnp.where(scale == 0, 1.0, scale).astype(jnp.float32)
    return {'int8': jnp.round(w / scale).astype(jnp.int8), 'scale': scale}
  return jax.tree_util.tree_map_with_path(quantize, params)


def dequantize(params, dtype=jnp.float32):
  """Back to dense weights (in `dtype`); a tree without int8 leaves passes through."""
  return jax.tree.map(
      lambda x: (x['int8'].astype(jnp.float32) * x['scale']).astype(dtype) if _is_quantized(x)
      else x, params, is_leaf=_is_quantized)


def weight_bytes(params) -> int:
  return int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(params)))
