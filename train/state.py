"""Train state, created directly in its sharded layout.

eval_shape gives the boxed (logically named) state without allocating; its
names become shardings; jit(init, out_shardings=...) then materialises every
shard on its own device, so no device ever holds the whole model.
"""
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from train import sharding


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def _init_boxed(task, tx: optax.GradientTransformation, rng: jax.Array, seq_len: int):
  params = task.init(rng, task.example_batch(1, seq_len))
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def state_shardings(task, tx, mesh: Mesh, seq_len: int, offload_optimizer: bool = False):
  """(abstract unboxed state, NamedSharding tree) without allocating anything.

  offload_optimizer keeps the optimizer state (AdamW's moments: twice the parameters)
  in pinned host memory; the train step brings it in for the update only."""
  boxed = jax.eval_shape(lambda r: _init_boxed(task, tx, r, seq_len), jax.random.key(0))
  shardings = sharding.logical_to_sharding(boxed, mesh)
  if offload_optimizer:
    shardings = shardings.replace(opt_state=jax.tree.map(
        lambda s: s.with_memory_kind('pinned_host'), shardings.opt_state))
  return _abstract(boxed, shardings), shardings


def param_shardings(task, mesh: Mesh, seq_len: int):
  """(abstract params, NamedSharding tree) of the model alone: what inference and
  evaluation restore, with no optimizer built."""
  boxed = jax.eval_shape(lambda r: task.init(r, task.example_batch(1, seq_len)),
                         jax.random.key(0))
  shardings = sharding.logical_to_sharding(boxed, mesh)
  return _abstract(boxed, shardings), shardings


def _abstract(boxed, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      nn.unbox(boxed), shardings)


def create_train_state(task, tx, mesh: Mesh, seq_len: int, rng: jax.Array,
                       offload_optimizer: bool = False):
  _, shardings = state_shardings(task, tx, mesh, seq_len, offload_optimizer)
  init = jax.jit(lambda r: nn.unbox(_init_boxed(task, tx, r, seq_len)),
                 out_shardings=shardings)
  with sharding.mesh_context(mesh):
    return init(rng)


def count_params(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))
