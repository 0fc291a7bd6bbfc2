"""Weight-only int8 quantization with per-channel scales.

Every matrix (projection kernels, embeddings) is stored as int8 values q and
float32 scales s with w ~= q * s, s = max|w| / 127 taken over the matrix's input
(contraction) axes, after the layer axis of a scanned stack: axis 0 of a kernel, axes
(0, 1) of attention's output kernel [N, K, D] (models/layers.py `dense`), and each
row of an embedding (both a lookup and the tied output projection). So s has one
value per output channel. Norm scales and biases stay in float32. Weights take a
quarter of their float32 memory.

Decoding keeps the weights int8: the model's Dense and Embed layers (models/layers.py)
read {'int8', 'scale'} and dequantize each matrix where it is used, so no float copy
of the whole model is ever live; `for_decoding` dequantizes up front only the matrices
of layers that read dense arrays only (flax's nn.Dense: poolers and classifiers).
"""
import jax
import jax.numpy as jnp
import numpy as np

from models.layers import FUSED_QKV, TRANSPOSED_EMBEDDING, TRANSPOSED_KERNEL, is_int8

# Kernels with more than one input axis, by module name: attention's output projection
# contracts heads and head_dim ([N, K, D], models/layers.py Attention). Others: axis 0.
_INPUT_AXES = {'out': 2}
# Modules of models/layers.py that read int8 weights themselves (Dense by the names
# its callers give it, an untied output projection included; Embed): their matrices
# stay int8 while decoding.
_READS_INT8 = ('query', 'key', 'value', FUSED_QKV, 'out', 'up', 'gate', 'down', 'lm_head',
               'token_embed')


def _names(path) -> list[str]:
  return [getattr(p, 'key', '') for p in path]


def quantize_int8(params):
  """The params tree with every matrix replaced by {'int8': q, 'scale': s}."""
  def quantize(path, w):
    names = _names(path)
    if names[-1] in (TRANSPOSED_KERNEL, TRANSPOSED_EMBEDDING):
      raise ValueError(f"{'/'.join(names)} is in a decoding layout; quantize the model's own "
                       'layout (models/layouts.py model_layout), as prepare does.')
    if w.ndim < 2 or names[-1] not in ('kernel', 'embedding'):
      return w
    stacked = int('layers' in names)  # a scanned stack leads with its layer axis
    if names[-1] == 'embedding':
      reduce_axes = (stacked + 1,)  # per row
    else:
      reduce_axes = tuple(range(stacked, stacked + _INPUT_AXES.get(names[-2], 1)))
    scale = jnp.max(jnp.abs(w), axis=reduce_axes, keepdims=True) / 127.0
    scale = jnp.where(scale == 0, 1.0, scale).astype(jnp.float32)
    return {'int8': jnp.round(w / scale).astype(jnp.int8), 'scale': scale}
  return jax.tree_util.tree_map_with_path(quantize, params)


def dequantize(params, dtype=jnp.float32, keep=lambda names: False):
  """Back to dense weights (in `dtype`), except those whose path names `keep` accepts;
  a tree without int8 leaves passes through."""
  def dense(path, x):
    if not is_int8(x) or keep(_names(path)):
      return x
    return (x['int8'].astype(jnp.float32) * x['scale']).astype(dtype)
  return jax.tree_util.tree_map_with_path(dense, params, is_leaf=is_int8)


def for_decoding(params):
  """The weights as the model reads them while decoding: int8 where its own layers
  dequantize at use, dense for any other layer."""
  return dequantize(params, keep=lambda names: len(names) > 1 and names[-2] in _READS_INT8)


def weight_bytes(params) -> int:
  return int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(params)))
