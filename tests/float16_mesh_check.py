"""Run by tests/test_float16.py in a fresh process with 8 simulated CPU devices: the
tiny model of mesh_check.py in float16 with loss scaling, 4 steps on one device and on
the (2, 2, 2) mesh, then one step that overflows; prints one JSON object with each
mesh's losses, how the scale is laid out and what the skip did.

python tests/float16_mesh_check.py (with XLA_FLAGS=--xla_force_host_platform_device_count=8)
"""
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from configs import default  # noqa: E402
from mesh_check import CFG, SEQ_LEN, batches  # noqa: E402
import tasks  # noqa: E402
from train import loss_scale, optimizer, sharding, state as state_lib, steps  # noqa: E402


def run(shape) -> dict:
  train_config = default.get_config().train
  train_config.update(warmup_steps=2, lr=1e-2)
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(zip(sharding.MESH_AXES, shape))),
                            jax.devices()[:int(np.prod(shape))])
  task = tasks.for_model(dataclasses.replace(CFG, dtype=jnp.float16))
  tx = optimizer.make_optimizer(train_config)
  scaler = loss_scale.LossScale.create(2.0**15)
  _, shardings = state_lib.state_shardings(task, tx, mesh, SEQ_LEN, False, scaler)
  state = state_lib.create_train_state(task, tx, mesh, SEQ_LEN, jax.random.key(0), False,
                                       scaler)
  step = steps.jit_train_step(task, tx, optimizer.learning_rate_schedule(train_config), 1,
                              jax.random.key(1), mesh, shardings)
  losses = []
  for batch in batches(5):
    batch = sharding.global_batch(batch, mesh)
    if len(losses) == 4:  # the fifth step overflows
      before = jax.device_get(state.params)
      overflow = jax.device_put(jnp.float32(2.0**40), shardings.loss_scale.scale)
      state = state.replace(loss_scale=state.loss_scale.replace(scale=overflow))
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss']))
  after = jax.device_get(state.params)
  scale = state.loss_scale.scale
  return {'losses': losses[:4],
          'scale_sharding': 'replicated' if scale.sharding.is_fully_replicated else str(
              scale.sharding),
          'params_sharded': any(not x.sharding.is_fully_replicated
                                for x in jax.tree.leaves(state.params)),
          'skipped_steps': int(state.loss_scale.skipped_steps),
          'params_unchanged_by_the_skip': all(
              np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before),
                                                   jax.tree.leaves(after)))}


def main():
  print(json.dumps({str(shape): run(shape) for shape in [(1, 1, 1), (2, 2, 2)]}))


if __name__ == '__main__':
  main()
