"""Decoding's layouts of the weights: the same values stored the way a decode step reads
them fastest on XLA:CPU, which the modules of models/layers.py read as given (the names
FUSED_QKV, TRANSPOSED_EMBEDDING, TRANSPOSED_KERNEL there mark them).

inference/generate.py `prepare` chooses them on XLA:CPU, where they were measured
(`lays_out_for_speed`; elsewhere the model's own layout stays), by the rows a step decodes
(benchmarks/RESULTS.md has the measurements both ways):
- `fuse_qkv`: one row per step reads one [D, N + 2G, K] query/key/value kernel faster
  than three small ones (each small matrix-vector product pays a fixed cost);
- `transpose_down`: one row per step reads the MLP's output projection faster stored
  [D, F], each output's weights contiguous; at 8 rows [F, D] is faster;
- `transpose_embedding`: a tied output projection reads faster stored [D, V] at every
  batch measured, and a lookup of a few ids reads its columns as cheaply as rows.

Only plain weights on one device change, outside jit: LoRA-adapted layers, a scanned
stack's layer axis and weights split over devices (whose shards would no longer line up)
stay as they are. `model_layout` undoes every one (for a weight export).
"""
from collections.abc import Callable, Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp

from models.config import ModelConfig
from models.layers import FUSED_QKV, TRANSPOSED_EMBEDDING, TRANSPOSED_KERNEL, is_int8

_QKV = ('query', 'key', 'value')


def _each_scope(params, change: Callable[[dict], dict]):
  """params with `change` applied to each module scope (a dict of params and
  sub-scopes), innermost first; int8 weights ({'int8', 'scale'}) are leaves."""
  if not isinstance(params, Mapping) or is_int8(params):
    return params
  return change({name: _each_scope(sub, change) for name, sub in params.items()})


def _on_one_device(x) -> bool:
  """Whether x lies whole on each device it is on: a host array, one device's or a full
  copy on each. (Inside jit nothing says where a value lies, so there it is no.)"""
  if isinstance(x, jax.core.Tracer):
    return False
  sharding = getattr(x, 'sharding', None)
  return sharding is None or len(sharding.device_set) == 1 or sharding.is_fully_replicated


def fuse_qkv(params):
  """Each self-attention's query, key and value projections joined into one, FUSED_QKV
  (kernel [D, J, K], bias [J, K], J = N + 2G: the three concatenated over heads), which
  Attention computes as one product and splits. Kernel and optional bias, int8 or not;
  cross-attention (whose keys and values read the encoder) stays apart."""
  def joinable(attention) -> bool:
    parts = [attention.get(name) for name in _QKV]
    if not all(isinstance(p, Mapping) for p in parts):
      return False
    names = set(parts[0])
    kernel = parts[0].get('kernel')
    kernel = kernel['int8'] if is_int8(kernel) else kernel
    return ('kernel' in names and names <= {'kernel', 'bias'} and kernel.ndim == 3
            and all(set(p) == names for p in parts)
            and all(_on_one_device(x) for x in jax.tree.leaves(parts)))

  def join(scope):
    attention = scope.get('self_attention')
    if isinstance(attention, Mapping) and joinable(attention):
      parts = [attention[name] for name in _QKV]
      joined = jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=-2), *parts)
      scope['self_attention'] = {FUSED_QKV: joined, **{
          name: sub for name, sub in attention.items() if name not in _QKV}}
    return scope
  return _each_scope(params, join)


def split_qkv(params, cfg: ModelConfig):
  """fuse_qkv undone: each FUSED_QKV back into query, key and value."""
  bounds = (cfg.num_heads, cfg.num_heads + cfg.num_kv_heads)

  def split(scope):
    joined = scope.pop(FUSED_QKV, None)
    for i, name in enumerate(_QKV if joined is not None else ()):
      scope[name] = jax.tree.map(lambda x, i=i: jnp.split(x, bounds, axis=-2)[i], joined)
    return scope
  return _each_scope(params, split)


def transpose_down(params):
  """Each MLP's output projection 'down' (kernel [F, D], int8 values and scales alike)
  stored transposed, [D, F] under TRANSPOSED_KERNEL; its bias as it was."""
  def transpose(scope):
    down = scope.get('down')
    if not isinstance(down, Mapping) or not {'kernel'} <= set(down) <= {'kernel', 'bias'}:
      return scope
    if all(x.ndim == 2 and _on_one_device(x) for x in jax.tree.leaves(down['kernel'])):
      scope['down'] = {**{k: v for k, v in down.items() if k != 'kernel'},
                       TRANSPOSED_KERNEL: jax.tree.map(jnp.transpose, down['kernel'])}
    return scope
  return _each_scope(params, transpose)


def untranspose_down(params):
  """transpose_down undone: the model's own [F, D] kernels."""
  def untranspose(scope):
    if TRANSPOSED_KERNEL in scope:
      scope['kernel'] = jax.tree.map(jnp.transpose, scope.pop(TRANSPOSED_KERNEL))
    return scope
  return _each_scope(params, untranspose)


def transpose_embedding(params):
  """Each float token embedding [V, D] stored transposed, [D, V] under
  TRANSPOSED_EMBEDDING (for a model whose output projection is tied to it). An int8
  one stays: its scales are per row."""
  def transpose(scope):
    embed = scope.get('token_embed')
    if (isinstance(embed, Mapping) and set(embed) == {'embedding'}
        and not is_int8(embed['embedding']) and _on_one_device(embed['embedding'])):
      scope['token_embed'] = {TRANSPOSED_EMBEDDING: jnp.transpose(embed['embedding'])}
    return scope
  return _each_scope(params, transpose)


def untranspose_embedding(params):
  """transpose_embedding undone: the model's own [V, D] table."""
  def untranspose(scope):
    if TRANSPOSED_EMBEDDING in scope:
      scope['embedding'] = jnp.transpose(scope.pop(TRANSPOSED_EMBEDDING))
    return scope
  return _each_scope(params, untranspose)


def has_param(params, name: str) -> bool:
  """Whether any path of the params tree names `name` (e.g. one of these layouts')."""
  return any(name in [getattr(p, 'key', '') for p in path]
             for path, _ in jax.tree_util.tree_leaves_with_path(params))


class Layout(NamedTuple):
  """One of these layouts, by the param name it introduces, with functions (params,
  cfg) -> params to it and back from it."""
  marker: str
  to: Callable
  back: Callable


LAYOUTS = {
    'qkv': Layout(FUSED_QKV, lambda params, cfg: fuse_qkv(params), split_qkv),
    'down': Layout(TRANSPOSED_KERNEL, lambda params, cfg: transpose_down(params),
                   lambda params, cfg: untranspose_down(params)),
    'embedding': Layout(TRANSPOSED_EMBEDDING, lambda params, cfg: transpose_embedding(params),
                        lambda params, cfg: untranspose_embedding(params)),
}


def model_layout(params, cfg: ModelConfig):
  """The params in the model's own layout, whichever of these layouts they are in."""
  for layout in LAYOUTS.values():
    params = layout.back(params, cfg)
  return params


def other_way(name: str, params, cfg: ModelConfig):
  """The params with layout `name` (LAYOUTS) the other way than they are (to compare
  the two); ValueError where these weights have one way only (e.g. an int8 embedding
  stays [V, D])."""
  layout = LAYOUTS[name]
  chosen = has_param(params, layout.marker)
  other = (layout.back if chosen else layout.to)(params, cfg)
  if has_param(other, layout.marker) == chosen:
    raise ValueError(f'These weights have one {name} layout only (int8, sharded or adapted '
                     'ones stay as they are).')
  return other
