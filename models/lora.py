"""Low-rank adapters (LoRA, Hu et al. 2021): y = x W + (alpha / r) dropout(x) A B.

A layer named in `cfg.lora_targets` (models/config.py LORA_TARGETS) gets two parameters
beside its kernel W [inputs..., outputs...]: lora_a [inputs..., r], initialised like a
fan-in kernel, and lora_b [r, outputs...], zeros, so an adapted model starts exactly as
its base. Their logical axes are the kernel's plus 'lora_rank' (never sharded), so they
shard as their layer does.

An adapter runs only where its parameters are in the tree: applied to the base's
parameters alone (DPO's frozen reference) or to merged ones, the same module computes
the plain layer. `merge` folds the adapters into the kernels, W + (alpha / r) A B, for
sampling, evaluation and export at the base model's cost.
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

Array = jax.Array
ADAPTER_A, ADAPTER_B = 'lora_a', 'lora_b'
RANK_AXIS = 'lora_rank'


def parse_targets(text: str) -> tuple[str, ...]:
  """'q, v,mlp_in' (config.lora.targets) -> ('q', 'v', 'mlp_in')."""
  return tuple(t.strip() for t in text.split(',') if t.strip())


def is_adapter(path: tuple[str, ...]) -> bool:
  """Whether a parameter path (a tuple of names) is an adapter's."""
  return path[-1] in (ADAPTER_A, ADAPTER_B)


def adapted(module: nn.Module, target: str) -> bool:
  """Whether `module` (a layer with a kernel) runs an adapter: at initialisation, when the
  config targets it; when applied, when its adapter parameters were given."""
  if module.is_initializing():
    return module.cfg.lora_rank > 0 and target in module.cfg.lora_targets
  return module.has_variable('params', ADAPTER_A)


def delta(module: nn.Module, x: Array, num_input_axes: int, names: tuple[str, ...],
          features: tuple[int, ...], deterministic: bool) -> Array:
  """(alpha / r) dropout(x) A B over x's last `num_input_axes` axes, with A and B the
  parameters of `module` (created at initialisation); `names` are the kernel's axes."""
  cfg, n = module.cfg, num_input_axes
  inputs = x.shape[-n:]
  a = module.param(ADAPTER_A,
                   nn.with_logical_partitioning(nn.initializers.normal(math.prod(inputs) ** -0.5),
                                                names[:n] + (RANK_AXIS,)),
                   inputs + (cfg.lora_rank,), cfg.param_dtype)
  b = module.param(ADAPTER_B,
                   nn.with_logical_partitioning(nn.initializers.zeros, (RANK_AXIS,) + names[n:]),
                   (cfg.lora_rank,) + features, cfg.param_dtype)
  x = nn.Dropout(cfg.lora_dropout, deterministic=deterministic)(x).astype(cfg.dtype)
  contract = (tuple(range(x.ndim - n, x.ndim)), tuple(range(n)))
  h = jax.lax.dot_general(x, jnp.asarray(a, cfg.dtype), (contract, ((), ())))  # [..., r]
  y = jax.lax.dot_general(h, jnp.asarray(b, cfg.dtype), (((h.ndim - 1,), (0,)), ((), ())))
  return y * jnp.asarray(cfg.lora_alpha / cfg.lora_rank, cfg.dtype)


def merged_kernel(kernel: Array, a: Array, b: Array, scale: float) -> Array:
  """W + scale A B in W's dtype (the product in float32). Leading axes that all three
  share (scanned layers' 'layers') stay batch axes: A is [L..., in..., r], B [L..., r,
  out...] and W [L..., in..., out...]."""
  lead_and_in = a.ndim - 1
  num_out = kernel.ndim - lead_and_in
  num_lead = b.ndim - 1 - num_out
  lead = kernel.shape[:num_lead]
  a_LIR = a.reshape(lead + (-1, a.shape[-1])).astype(jnp.float32)
  b_LRO = b.reshape(lead + (b.shape[num_lead], -1)).astype(jnp.float32)
  product_LIO = jnp.matmul(a_LIR, b_LRO)
  return (kernel.astype(jnp.float32) + scale * product_LIO.reshape(kernel.shape)).astype(
      kernel.dtype)


def base(params):
  """The tree without its adapters: the base model, as DPO's reference runs it."""
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({p: v for p, v in flat.items() if not is_adapter(p)})


def merge(params, alpha: float):
  """The parameters with every adapter folded into its kernel, W + (alpha / r) A B, and
  the adapter leaves gone: the base model's tree, computing what the adapted one did."""
  flat = traverse_util.flatten_dict(params)
  merged = {path: value for path, value in flat.items() if not is_adapter(path)}
  for path, a in flat.items():
    if path[-1] != ADAPTER_A:
      continue
    kernel = path[:-1] + ('kernel',)
    b = flat[path[:-1] + (ADAPTER_B,)]
    merged[kernel] = merged_kernel(flat[kernel], a, b, alpha / a.shape[-1])
  return traverse_util.unflatten_dict(merged)


def count(params) -> int:
  """Adapter parameters in a tree."""
  return sum(v.size for path, v in traverse_util.flatten_dict(params).items()
             if is_adapter(path))
