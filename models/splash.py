"""Splash attention: the TPU's Pallas flash-attention kernel (block-sparse over the
mask), used for training and evaluation when `model.attention='splash'` (what 'auto'
picks on a TPU).

The kernel attends one example at a time over [heads, length, head_dim] and takes the
mask as segment ids (equal ids attend) plus a static causal pattern, so it never
builds a [T, S] mask. It cannot add a bias (T5's relative positions) and tiles by
`BLOCK`, so other calls fall back to XLA (`applies`). Under a mesh it runs inside
`shard_map`, each device on its own batch rows and heads, as the logical axis rules
split them. Off TPU the same kernel runs in Pallas's interpreter, for tests: training
refuses 'splash' there and inference falls back to XLA (models/kernels.py).
"""
import functools
import math
import warnings

import flax.linen as nn
import jax
from absl import logging
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernels
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
from jax.interpreters import pxla
from jax.sharding import PartitionSpec as P

try:  # jax >= 0.7
  from jax import shard_map as _shard_map
  _UNCHECKED = {'check_vma': False}
except ImportError:
  from jax.experimental.shard_map import shard_map as _shard_map
  _UNCHECKED = {'check_rep': False}

Array = jax.Array
BLOCK = 128  # the smallest query and key tile; lengths must be multiples of it
TILES = (512, 256, BLOCK)  # the largest that divides both lengths is used


def applies(q_len: int, kv_len: int, has_segments: bool, has_bias: bool) -> bool:
  """Whether the kernel can take this call: segment ids known, no bias, whole tiles."""
  return has_segments and not has_bias and q_len % BLOCK == 0 and kv_len % BLOCK == 0


def _kernel(num_heads: int, q_len: int, kv_len: int, causal: bool, interpret: bool):
  """Built in each trace that uses it: the kernel holds arrays of the mask's block
  layout, which must not outlive the trace."""
  pattern = masks.CausalMask if causal else masks.FullMask
  mask = masks.MultiHeadMask([pattern((q_len, kv_len)) for _ in range(num_heads)])
  tile = next(t for t in TILES if q_len % t == 0 and kv_len % t == 0)
  blocks = kernels.BlockSizes(block_q=tile, block_kv=tile, block_kv_compute=tile,
                              block_q_dkv=tile, block_kv_dkv=tile, block_kv_dkv_compute=tile,
                              block_q_dq=tile, block_kv_dq=tile)
  return kernels.make_splash_mha(mask, head_shards=1, q_seq_shards=1, block_sizes=blocks,
                                 interpret=interpret)


def _attend_local(q_BTNK: Array, k_BSGK: Array, v_BSGK: Array, q_segment_BT: Array,
                  kv_segment_BS: Array, causal: bool) -> Array:
  """The kernel over this device's rows and heads (grouped-query heads as they are)."""
  kernel = _kernel(q_BTNK.shape[2], q_BTNK.shape[1], k_BSGK.shape[1], causal,
                   interpret=jax.default_backend() != 'tpu')
  def one_example(q_TNK, k_SGK, v_SGK, q_segment_T, kv_segment_S):
    out_NTK = kernel(q_TNK.transpose(1, 0, 2), k_SGK.transpose(1, 0, 2),
                     v_SGK.transpose(1, 0, 2),
                     segment_ids=kernels.SegmentIds(q_segment_T, kv_segment_S))
    return out_NTK.transpose(1, 0, 2)
  return jax.vmap(one_example)(q_BTNK, k_BSGK, v_BSGK, q_segment_BT, kv_segment_BS)


def _context_mesh():
  """The mesh the caller traces under (train/sharding.py:mesh_context sets both): the
  abstract mesh where this JAX has one, else the legacy `with mesh:` one."""
  get_abstract_mesh = getattr(jax.sharding, 'get_abstract_mesh', None)
  mesh = get_abstract_mesh() if get_abstract_mesh else None
  if mesh is not None and not mesh.empty:
    return mesh
  with warnings.catch_warnings():  # deprecated in JAX 0.8.2, with `with mesh:` itself
    warnings.simplefilter('ignore', DeprecationWarning)
    resources = getattr(pxla, 'thread_resources', None)
    mesh = resources.env.physical_mesh if resources is not None else None
  return None if mesh is None or mesh.empty else mesh


def _divisible(mesh_axes, size: int, mesh):
  """The mesh axes a dimension is split over, or None where they do not divide it
  (a batch of one at initialisation): that dimension is then whole on every device."""
  if mesh_axes is None:
    return None
  names = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
  return mesh_axes if size % math.prod(mesh.shape[name] for name in names) == 0 else None


def attention(q_BTNK: Array, k_BSGK: Array, v_BSGK: Array, q_segment_BT: Array,
              kv_segment_BS: Array, causal: bool, scale: float) -> Array:
  """softmax(scale q k^T + mask) v, as jax.nn.dot_product_attention computes it."""
  q_BTNK = q_BTNK * scale  # the kernel does not scale
  local = functools.partial(_attend_local, causal=causal)
  mesh = _context_mesh()
  if mesh is None or mesh.size == 1:
    return local(q_BTNK, k_BSGK, v_BSGK, q_segment_BT, kv_segment_BS)
  batch = _divisible(nn.logical_to_mesh_axes(('batch',))[0], q_BTNK.shape[0], mesh)
  # Query and key/value heads split alike, so each device keeps whole GQA groups.
  heads = _divisible(nn.logical_to_mesh_axes(('kv_heads',))[0], k_BSGK.shape[2], mesh)
  q_spec = kv_spec = P(batch, None, heads, None)
  segment_spec = P(batch, None)
  if batch is None and heads is None:
    logging.warning('Splash attention under a %d-device mesh without logical axis rules: '
                    'every device computes every row and head (trace under '
                    'train.sharding.mesh_context).', mesh.size)
  sharded = _shard_map(local, mesh=mesh, out_specs=q_spec, **_UNCHECKED,
                       in_specs=(q_spec, kv_spec, kv_spec, segment_spec, segment_spec))
  return sharded(q_BTNK, k_BSGK, v_BSGK, q_segment_BT, kv_segment_BS)
