"""Hugging Face tensors <-> this project's parameter tree: reading and writing the
files, and the name and layout of every tensor in both directions.

A family (interop/families/) describes its checkpoint as a Layout: the rules for the
tensors outside the layer stacks and, for each stack, one layer's rules ('{i}' in the
HF name is the layer index). The same Layout converts both ways, for scanned stacks
(`STACK/layers/...` with a leading layer axis) and unrolled ones (`STACK/layer_{i}/...`).
Parameters are float32 whatever the file holds.
"""
import dataclasses
import json
import math
import os
import re

import ml_dtypes  # noqa: F401 -- registers bfloat16 with NumPy, so safetensors.numpy reads it
import numpy as np
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from interop import InteropError

SAFETENSORS, SAFETENSORS_INDEX = 'model.safetensors', 'model.safetensors.index.json'
TORCH, TORCH_INDEX = 'pytorch_model.bin', 'pytorch_model.bin.index.json'


@dataclasses.dataclass(frozen=True)
class Rule:
  """One HF tensor and the parameter(s) it holds. Several parameters split its last
  (output) axis evenly, as GPT-2's fused query/key/value does."""
  hf: str  # the HF tensor's name; in a stack's rules '{i}' stands for the layer index
  params: tuple[str, ...]  # parameter paths ('/'-joined), relative to the block in a stack
  shape: tuple[int, ...]  # each parameter's shape
  hf_shape: tuple[int, ...]  # the HF tensor's shape
  linear: bool = False  # a torch nn.Linear weight: stored [out, in], the kernel is [in, out]
  zeros_if_absent: bool = False  # export writes zeros where the model has no such parameter

  def to_params(self, x: np.ndarray) -> list[np.ndarray]:
    x = np.asarray(x, np.float32)
    if self.linear:
      x = x.T
    return [piece.reshape(self.shape) for piece in np.split(x, len(self.params), axis=-1)]

  def to_hf(self, arrays: list[np.ndarray]) -> np.ndarray:
    shape = self.hf_shape[::-1] if self.linear else self.hf_shape
    piece = shape[:-1] + (shape[-1] // len(self.params),)
    x = np.concatenate([np.asarray(a, np.float32).reshape(piece) for a in arrays], axis=-1)
    return x.T if self.linear else x


def _paths(params: str | tuple[str, ...]) -> tuple[str, ...]:
  return (params,) if isinstance(params, str) else tuple(params)


def linear(hf: str, param: str, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> Rule:
  """A torch nn.Linear weight [out, in] -> a kernel in_shape + out_shape."""
  return Rule(hf, (param,), in_shape + out_shape, (math.prod(out_shape), math.prod(in_shape)),
              linear=True)


def conv1d(hf: str, params, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> Rule:
  """GPT-2's Conv1D weight [in, out] (the outputs of `params` side by side) -> kernels."""
  params = _paths(params)
  return Rule(hf, params, in_shape + out_shape,
              (math.prod(in_shape), math.prod(out_shape) * len(params)))


def vector(hf: str, params, shape: tuple[int, ...], zeros_if_absent: bool = False) -> Rule:
  """A bias or norm weight [n * size] -> `params` of `shape` each."""
  params = _paths(params)
  return Rule(hf, params, shape, (math.prod(shape) * len(params),),
              zeros_if_absent=zeros_if_absent)


def table(hf: str, param: str, shape: tuple[int, ...], zeros_if_absent: bool = False) -> Rule:
  """An embedding table, the same layout on both sides."""
  return Rule(hf, (param,), shape, shape, zeros_if_absent=zeros_if_absent)


def norm(hf: str, param: str, size: int, bias: bool) -> list[Rule]:
  """A norm's weight (and LayerNorm's bias) -> its scale (and bias)."""
  return [vector(f'{hf}.weight', f'{param}/scale', (size,))] + (
      [vector(f'{hf}.bias', f'{param}/bias', (size,))] if bias else [])


def dense(hf: str, param: str, in_shape: tuple[int, ...], out_shape: tuple[int, ...],
          bias: bool, zeros_if_absent: bool = False) -> list[Rule]:
  """An nn.Linear (and its bias) -> kernel (and bias)."""
  return [linear(f'{hf}.weight', f'{param}/kernel', in_shape, out_shape)] + (
      [vector(f'{hf}.bias', f'{param}/bias', out_shape, zeros_if_absent)] if bias else [])


@dataclasses.dataclass(frozen=True)
class Stack:
  """A stack of layers: its parameter name and one layer's rules."""
  name: str  # 'encoder' | 'decoder'
  num_layers: int
  rules: tuple[Rule, ...]


@dataclasses.dataclass(frozen=True)
class Layout:
  """Every tensor of one architecture's checkpoint."""
  rules: tuple[Rule, ...]
  stacks: tuple[Stack, ...]
  ignored: tuple[str, ...] = ()  # regexes of HF tensors that hold nothing the model uses


def _placements(layout: Layout, scan: bool):
  """(HF name, rule, [(parameter path, layer index into a scanned array, or None)])."""
  for rule in layout.rules:
    yield rule.hf, rule, [(p, None) for p in rule.params]
  for stack in layout.stacks:
    for i in range(stack.num_layers):
      for rule in stack.rules:
        where = [(f'{stack.name}/layers/{p}', i) if scan else (f'{stack.name}/layer_{i}/{p}', None)
                 for p in rule.params]
        yield rule.hf.format(i=i), rule, where


def _listed(names) -> str:
  names = sorted(names)
  return ', '.join(names[:5]) + (f' (and {len(names) - 5} more)' if len(names) > 5 else '')


def to_params(layout: Layout, tensors: dict[str, np.ndarray], scan: bool, source: str) -> dict:
  """The parameter tree held by `tensors`, every tensor accounted for: one that is
  missing, of another shape, or left over (not ignored) fails, since each means the
  checkpoint is not the model config.json describes."""
  missing = [name for name, _, _ in _placements(layout, scan) if name not in tensors]
  if missing:
    raise InteropError(f'{source} lacks tensors its config.json implies: {_listed(missing)}; '
                       'is config.json the one saved with these weights?')
  flat, stacked, used = {}, {}, set()
  for name, rule, where in _placements(layout, scan):
    x = tensors[name]
    if tuple(x.shape) != rule.hf_shape:
      raise InteropError(f'{source}: tensor {name} has shape {tuple(x.shape)}, but config.json '
                         f'implies {rule.hf_shape}; is config.json the one saved with it?')
    used.add(name)
    for (path, layer), array in zip(where, rule.to_params(x)):
      if layer is None:
        flat[path] = array
      else:  # layers come in order
        stacked.setdefault(path, []).append(array)
  flat.update({path: np.stack(arrays) for path, arrays in stacked.items()})
  left = [n for n in set(tensors) - used if not any(re.fullmatch(p, n) for p in layout.ignored)]
  if left:
    raise InteropError(f'{source} has tensors this architecture does not use: {_listed(left)}; '
                       'it is a variant import does not support.')
  return traverse_util.unflatten_dict(flat, sep='/')


def to_hf(layout: Layout, params, scan: bool) -> dict[str, np.ndarray]:
  """HF tensors from a parameter tree; every parameter must find its place."""
  flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep='/').items()}
  tensors, used = {}, set()
  for name, rule, where in _placements(layout, scan):
    present = [path in flat for path, _ in where]
    if not all(present):
      if rule.zeros_if_absent and not any(present):
        tensors[name] = np.zeros(rule.hf_shape, np.float32)
        continue
      raise InteropError(f'The model has no parameter {where[present.index(False)][0]} for '
                         f'{name}; its config does not match its checkpoint.')
    tensors[name] = rule.to_hf([flat[p] if layer is None else flat[p][layer]
                                for p, layer in where])
    used.update(p for p, _ in where)
  left = set(flat) - used
  if left:
    raise InteropError(f'Parameters with no place in the Hugging Face layout: {_listed(left)}.')
  return tensors


# --- files ----------------------------------------------------------------------
def _torch_load(path: str) -> dict[str, np.ndarray]:
  try:
    import torch
  except ImportError:
    raise InteropError(f'{path} is a PyTorch pickle and reading it needs torch: pip install '
                       'torch (or save the checkpoint as safetensors).') from None
  state = torch.load(path, map_location='cpu', weights_only=True)
  return {k: (v.float() if v.is_floating_point() else v).numpy() for k, v in state.items()}


def _shards(directory: str, index: str) -> list[str]:
  with open(os.path.join(directory, index)) as f:
    return sorted(set(json.load(f)['weight_map'].values()))


def read_tensors(directory: str) -> dict[str, np.ndarray]:
  """Every tensor of a checkpoint directory: model.safetensors, sharded safetensors
  (an index), or pytorch_model.bin (sharded or not; needs torch), in that preference."""
  for index, single, read in ((SAFETENSORS_INDEX, SAFETENSORS, load_file),
                              (TORCH_INDEX, TORCH, _torch_load)):
    if os.path.exists(os.path.join(directory, index)):
      files = _shards(directory, index)
    elif os.path.exists(os.path.join(directory, single)):
      files = [single]
    else:
      continue
    tensors = {}
    for name in files:
      tensors.update(read(os.path.join(directory, name)))
    return tensors
  raise InteropError(f'{directory} has no {SAFETENSORS}, {SAFETENSORS_INDEX} or {TORCH}; '
                     'point --from at a directory written by save_pretrained.')


def normalized(tensors: dict[str, np.ndarray], base_prefix: str,
               head_prefixes: tuple[str, ...]) -> dict[str, np.ndarray]:
  """Names as the current `transformers` writes them: a base model saved on its own
  (GPT-2's 'h.0...') gets the task model's prefix ('transformer.'), and the old
  'LayerNorm.gamma' / '.beta' become '.weight' / '.bias', as from_pretrained does."""
  bare = not any(name.startswith(base_prefix) for name in tensors)

  def rename(name: str) -> str:
    name = re.sub(r'LayerNorm\.gamma$', 'LayerNorm.weight', name)
    name = re.sub(r'LayerNorm\.beta$', 'LayerNorm.bias', name)
    if bare and base_prefix and not name.startswith(head_prefixes):
      name = base_prefix + name
    return name
  return {rename(name): x for name, x in tensors.items()}


def write_safetensors(path: str, tensors: dict[str, np.ndarray]) -> None:
  save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}, path,
            metadata={'format': 'pt'})
