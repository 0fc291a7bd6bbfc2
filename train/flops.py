"""FLOPs per token, device peak FLOP/s and model FLOPs utilisation (MFU).

Training FLOPs per token (PaLM appendix B; nanoGPT's estimate_mfu):

    flops_per_token = 6 * N_matmul + 12 * num_layers * seq_len * (num_heads * head_dim)

where N_matmul counts parameters used in matrix multiplies: every projection
kernel and the output projection (also when tied to the input embedding), but
not a lookup-only input embedding, learned position table, norms or biases.
6 = 2 (multiply-add) x 3 (forward + two backward matmuls); the second term is
the attention score (Q K^T) and value (P V) matmuls, which grow with context
length: 4 FLOPs per query-key pair and query width forward, 8 backward (Kaplan et
al. 2020 count half of this: 2 forward). Their width is that of the queries,
N x K (num_heads x head_dim), which equals d_model only when head_dim = d_model /
num_heads; grouped-query attention shares keys and values but every query head still
scores and mixes all of them.

A task (tasks/base.py `train_flops_with_frozen`) applies both terms part by part: each
part's parameters over the tokens they multiply (an encoder-decoder's encoder over the
inputs, its decoder over the targets; a pooler or classifier once per sequence), and each
kind of attention over its own queries and keys.

Where part of the model is frozen (LoRA's base), the backward pass shrinks as XLA prunes
it: a frozen matmul has no weight gradient (2 of its 6 go), and a matmul or attention
product that no trained parameter lies below needs no input gradient either, so a frozen
one there costs its forward only. `forward_position` orders the parameters by where the
forward pass uses them, and `Trained` finds what lies above a trained one.

MFU = achieved tokens/s x flops_per_token / peak FLOP/s of the devices used.
"""
import math
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from models import lora

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


# Stages of the forward pass, in order: a parameter's forward_position starts with one.
INPUTS, ENCODER, DECODER, HEAD = range(4)
_STACKS = {'encoder': ENCODER, 'decoder': DECODER}
_INPUTS = ('token_embed', 'input')  # top-level modules that run before every stack
# A block's modules in the order they run (pre-norm or post-norm names, models/layers.py
# Block); each takes three steps: an attention's projections, its core (the score and
# value products) and its output projection; an MLP's up (and gate) and down projections.
_BLOCK = ('pre_self_attention_norm', 'self_attention', 'post_self_attention_norm',
          'pre_cross_attention_norm', 'cross_attention', 'post_cross_attention_norm',
          'pre_mlp_norm', 'mlp', 'post_mlp_norm')
_LATER_STEP = {'core': 1, 'down': 1, 'out': 2}
# The heads' modules in order (models/transformer.py OutputHead, then the sequence heads).
_HEAD = ('final_norm', 'transform', 'transform_norm', 'lm_head', 'output_bias', 'pooler',
         'next_sentence', 'classifier')
_SEQUENCE_HEADS = ('pooler', 'next_sentence', 'classifier')  # once per sequence
_FIRST_SEQUENCE_HEAD = _HEAD.index(_SEQUENCE_HEADS[0])
# Relative position bias tables by the stack whose self-attention cores add them at every
# layer ('relative_bias': a one-stack model's).
_BIASES = {'encoder_bias': 'encoder', 'decoder_bias': 'decoder', 'relative_bias': None}
Position = tuple[int, float, float]  # (stage, layer, step); math.inf: after every layer
_ENCODER_OUTPUT: Position = (ENCODER, math.inf, 1)  # after encoder_norm


def _named_leaves(params):
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    yield tuple(getattr(p, 'key', str(p)) for p in path), leaf


def _is_cross_kv(names: tuple[str, ...]) -> bool:
  return 'cross_attention' in names and names[-2:-1] in (('key',), ('value',))


def matmul_part(names: tuple[str, ...], tie_embeddings: bool) -> str | None:
  """The part (see matmul_param_counts) of the parameter at path `names`, or None for
  one that takes part in no matmul."""
  if names[-1] in ('scale', 'bias', 'output_bias', 'position_embedding',
                   'relative_attention_bias', 'token_type_embedding'):
    return None
  if names[-1] == 'embedding' and not tie_embeddings:
    return None  # lookup only; the separate lm_head kernel is counted instead
  if _is_cross_kv(names):
    return 'cross_kv'
  if names[0] in _STACKS:
    return names[0]
  return 'sequence' if names[0] in _SEQUENCE_HEADS else 'other'


def matmul_param_counts(params, tie_embeddings: bool) -> dict[str, int]:
  """Parameters that take part in a matmul for each token (see module docstring), by
  part: 'encoder' and 'decoder' stacks; the decoder's cross-attention key and value
  projections, which run over the encoder's outputs rather than the decoder's tokens,
  under 'cross_kv'; the pooler and classifiers, which run once per sequence, under
  'sequence'; everything else (the output head) under 'other'."""
  counts = dict.fromkeys(('encoder', 'decoder', 'cross_kv', 'sequence', 'other'), 0)
  for names, leaf in _named_leaves(params):
    part = matmul_part(names, tie_embeddings)
    if part is not None:
      counts[part] += int(np.prod(leaf.shape))
  return counts


def matmul_param_count(params, tie_embeddings: bool) -> int:
  return sum(matmul_param_counts(params, tie_embeddings).values())


def _in_block(stack: str, layer: float, module: str, part: str) -> Position:
  return _STACKS[stack], layer, 3 * _BLOCK.index(module) + _LATER_STEP.get(part, 0)


# A decoder position the encoder's output reaches: its first cross-attention core and on.
_FED_BY_ENCODER = _in_block('decoder', 0, 'cross_attention', 'core')[1:]


def forward_position(names: tuple[str, ...], layer: int | None = None,
                     stack: str = 'decoder') -> Position:
  """Where the forward pass first uses the parameter at path `names`: (stage, layer,
  step), ordered as the computation runs. A scanned stack's parameter ('layers', one
  slice per layer) is used at every layer: `layer` picks one. Embeddings come first (a
  stack's own position table just before it), then a stack's parameters by layer and by
  module within the block (a relative bias table at its first self-attention core; a
  one-stack model's 'relative_bias' serves `stack`), the heads last."""
  top = names[0]
  if top in _STACKS and len(names) > 3 and names[2] in _BLOCK and (
      names[1] == 'layers' or names[1].startswith('layer_')):
    index = layer if names[1] == 'layers' else int(names[1].removeprefix('layer_'))
    return _in_block(top, index, names[2], names[3])
  if top in ('encoder_input', 'decoder_input'):
    return _STACKS[top.removesuffix('_input')], -1, 0
  if top == 'encoder_norm':
    return ENCODER, math.inf, 0
  if top in _BIASES:
    return _in_block(_BIASES[top] or stack, 0, 'self_attention', 'core')
  if top in _INPUTS:
    return INPUTS, 0, 0
  module = names[1] if top == 'head' else top
  if module in _HEAD:
    return HEAD, 0, _HEAD.index(module)
  raise ValueError(f"train/flops.py forward_position does not know where the forward pass "
                   f"uses {'/'.join(names)}; give its module a place there.")


def _feeds(lower: Position, position: Position) -> bool:
  """Whether the forward pass carries `lower` (a position below `position`) into
  `position`: everything carries upwards, except the encoder into the decoder before the
  decoder's first cross-attention, and the token heads (after the final norm) into the
  sequence heads, which read the final norm's output."""
  encoder_to_decoder = lower[0] == ENCODER and position[0] == DECODER
  token_to_sequence_head = (lower[0] == position[0] == HEAD
                            and 0 < lower[2] < _FIRST_SEQUENCE_HEAD <= position[2])
  return lower < position and not (encoder_to_decoder and position[1:] < _FED_BY_ENCODER
                                   or token_to_sequence_head)


class Trained:
  """Where a model's trained parameters (all of `params` but `frozen_params`, a subtree of
  it or None) sit in its forward pass. The backward pass runs only through what depends on
  a trained parameter: only what such a parameter lies below (and feeds) needs an input
  gradient."""

  def __init__(self, params, frozen_params=None):
    frozen = {names for names, _ in _named_leaves(frozen_params or {})}
    leaves = list(_named_leaves(params))
    tops = {names[0] for names, _ in leaves}
    self.stack = 'encoder' if 'encoder' in tops and 'decoder' not in tops else 'decoder'
    self.paths = {names for names, _ in leaves if names not in frozen}
    # The lowest trained position of each branch of the computation (a stage; the heads'
    # two), within which a lower position feeds every higher one.
    self._lowest_by_branch: dict[tuple[int, bool], Position] = {}
    for names, leaf in leaves:
      if names in self.paths:
        first = min(self.uses(names, leaf))
        branch = first[0], first[0] == HEAD and first[2] >= _FIRST_SEQUENCE_HEAD
        self._lowest_by_branch[branch] = min(self._lowest_by_branch.get(branch, first), first)

  def uses(self, names: tuple[str, ...], leaf) -> list[Position]:
    """The positions of a parameter's uses: one per layer for a scanned stack's."""
    scanned = names[0] in _STACKS and len(names) > 3 and names[1] == 'layers'
    return [forward_position(names, layer, self.stack)
            for layer in (range(leaf.shape[0]) if scanned else [None])]

  def below(self, position: Position) -> bool:
    """Whether a trained parameter lies below `position` and feeds it."""
    return any(_feeds(lower, position) for lower in self._lowest_by_branch.values())

  def within(self, *prefix: str) -> bool:
    """Whether a trained parameter's path starts with `prefix`."""
    return any(path[:len(prefix)] == prefix for path in self.paths)

  def in_layer(self, stack: str, layer: int, *prefix: str) -> bool:
    """Whether a trained parameter of the layer (unrolled or scanned) starts with `prefix`."""
    return self.within(stack, f'layer_{layer}', *prefix) or self.within(stack, 'layers', *prefix)

  def bias_of(self, stack: str) -> bool:
    """Whether a relative bias table that `stack`'s self-attention adds trains."""
    return any(self.within(top) for top, owner in _BIASES.items()
               if (owner or self.stack) == stack)


def _input_position(names: tuple[str, ...], position: Position) -> Position:
  """Where a matmul's input comes from, as far as its input gradient goes: an adapter's B
  multiplies the output of its A, just below it; the tied embedding multiplies at the
  output head; the cross-attention keys and values multiply the encoder's output."""
  if names[-1] == lora.ADAPTER_B:
    return position[:2] + (position[2] + 0.5,)
  if names[-1] == 'embedding':
    return HEAD, 0, _HEAD.index('lm_head')
  if _is_cross_kv(names):
    return _ENCODER_OUTPUT
  return position


def matmul_train_flops(params, tokens: dict[str, int], tie_embeddings: bool,
                       trained: Trained) -> float:
  """Training FLOPs of the matmul parameters per example, over the `tokens` each part
  multiplies (matmul_param_counts' parts). Per parameter and token: 2 forward, 2 for
  its weight gradient if it trains, and 2 for its input gradient where a trained
  parameter lies below it (`trained`): 6 in full training."""
  total = 0.0
  for names, leaf in _named_leaves(params):
    part = matmul_part(names, tie_embeddings)
    if part is None:
      continue
    uses = trained.uses(names, leaf)
    weight_gradient = 2 * (names in trained.paths)
    for position in uses:
      input_gradient = 2 * trained.below(_input_position(names, position))
      total += ((2 + weight_gradient + input_gradient) * int(np.prod(leaf.shape)) / len(uses)
                * tokens[part])
  return total


def attention_train_flops(attention_width: int, products: list[tuple[str, str, int, int, int]],
                          trained: Trained) -> float:
  """Training FLOPs of attention's score and value products per example, per query-key
  pair and width N K (num_heads x head_dim): 4 forward (Q K^T, P V) and 2 for each backward
  product the trained parameters need (`trained`): dV = P^T dO where the values need a
  gradient; dP = dO V^T where the queries, keys or a trained bias do; dQ and dK where the
  queries and the keys do: 8 in full training. `products` lists (stack, attention, layers,
  queries, keys) for each kind of attention, e.g. a decoder's self-attention ('decoder',
  'self_attention', L, T, T)."""
  total = 0.0
  for stack, attention, layers, queries, keys in products:
    for layer in range(layers):
      projections = _in_block(stack, layer, attention, 'query')
      keys_from = _ENCODER_OUTPUT if attention == 'cross_attention' else projections
      query = trained.below(projections) or trained.in_layer(stack, layer, attention, 'query')
      key, value = (trained.below(keys_from) or trained.in_layer(stack, layer, attention, m)
                    for m in ('key', 'value'))
      bias = attention == 'self_attention' and trained.bias_of(stack)
      backward = 2 * (value + (query or key or bias) + query + key)
      total += (4 + backward) * attention_width * queries * keys
  return total


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
