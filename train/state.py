"""Train state, created directly in its sharded layout.

eval_shape gives the boxed (logically named) state without allocating; its
names become shardings; jit(init, out_shardings=...) then materialises every
shard on its own device, so no device ever holds the whole model.

A float16 run's state is a ScaledTrainState: the TrainState and its loss scale
(train/loss_scale.py), replicated scalars. Every other dtype keeps the plain
TrainState, so its checkpoints are as they always were (Orbax would not restore a
checkpoint without a field into a state that has one, even a None field).
"""
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from train import sharding
from train.loss_scale import LossScale


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # batches trained on (a float16 run's skipped updates included)
  params: Any
  opt_state: Any


@flax.struct.dataclass
class ScaledTrainState(TrainState):
  loss_scale: LossScale


def state_at_step_zero(params, tx: optax.GradientTransformation,
                       loss_scale: LossScale | None = None):
  """A TrainState of `params` with fresh optimizer moments (and, for float16, a fresh
  loss scale): what training starts from, from an initialisation or an import."""
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  if loss_scale is None:
    return state
  return ScaledTrainState(state.step, state.params, state.opt_state, loss_scale)


def _all(params):
  return params


def _init_boxed(task, tx: optax.GradientTransformation, rng: jax.Array, seq_len: int,
                loss_scale: LossScale | None = None, trainable: Callable = _all):
  params = trainable(task.init(rng, task.example_batch(1, seq_len)))
  return state_at_step_zero(params, tx, loss_scale)


def state_shardings(task, tx, mesh: Mesh, seq_len: int, offload_optimizer: bool = False,
                    loss_scale: LossScale | None = None, trainable: Callable = _all):
  """(abstract unboxed state, NamedSharding tree) without allocating anything.

  offload_optimizer keeps the optimizer state (AdamW's moments: twice the parameters)
  in pinned host memory; the train step brings it in for the update only. loss_scale:
  the fresh scaler of a float16 run (None otherwise). trainable: the model's parameters
  -> the part the state trains (train/frozen.py; LoRA's adapters), by default all."""
  boxed = jax.eval_shape(lambda r: _init_boxed(task, tx, r, seq_len, loss_scale, trainable),
                         jax.random.key(0))
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
                       offload_optimizer: bool = False, loss_scale: LossScale | None = None,
                       trainable: Callable = _all):
  _, shardings = state_shardings(task, tx, mesh, seq_len, offload_optimizer, loss_scale,
                                 trainable)
  init = jax.jit(lambda r: nn.unbox(_init_boxed(task, tx, r, seq_len, loss_scale, trainable)),
                 out_shardings=shardings)
  with sharding.mesh_context(mesh):
    return init(rng)


def count_params(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))


def save_step_zero(config, cfg, params: dict, workdir: str) -> int:
  """Saves a TrainState of `params` (the whole model's, fresh optimizer moments) as step 0
  of `workdir`, laid out as training lays it out, so a run, sample or eval reads it as any
  other (--mode=import and --mode=merge write workdirs so); returns the parameter count.
  ValueError when `params` is not the tree the model of `config`/`cfg` builds."""
  import tasks
  from flax import traverse_util
  from train import checkpointing, config_checks, loss_scale, optimizer
  task = tasks.from_config(config, cfg)
  tx = optimizer.make_optimizer(config.train)
  mesh = sharding.make_mesh(config.mesh)
  # A float16 run's state carries its loss scale: save the state that run restores.
  scaler = loss_scale.from_config(config, config_checks.compute_dtype(config,
                                                                      jax.default_backend()))
  abstract, shardings = state_shardings(task, tx, mesh, config.data.seq_len, loss_scale=scaler)
  expected = traverse_util.flatten_dict(abstract.params, sep='/')
  got = traverse_util.flatten_dict(params, sep='/')
  differ = sorted(set(expected) ^ set(got) | {k for k in set(expected) & set(got)
                                               if expected[k].shape != got[k].shape})
  if differ:
    raise ValueError(f"parameters other than the model builds: {', '.join(differ[:5])}.")
  params = traverse_util.unflatten_dict({k: got[k] for k in expected}, sep='/')
  with sharding.mesh_context(mesh):
    state = jax.jit(lambda p: state_at_step_zero(p, tx, scaler),
                    in_shardings=(shardings.params,), out_shardings=shardings)(params)
  manager = checkpointing.make_manager(workdir, config.train.keep_checkpoints)
  checkpointing.save(manager, 0, state, None)
  checkpointing.finish(manager)
  return count_params(state.params)
