"""Run by tests/test_sharding.py in a fresh process with 8 simulated CPU devices
(XLA_FLAGS must be set before JAX starts): trains the same tiny model for 5 steps on
several meshes and prints one JSON object per mesh with its losses and the per-device
shard shapes of a few parameters; also checks a checkpoint saved on one mesh
restores onto another, that splash attention under a mesh trains like XLA's on
one device, and that the loss over chunks of the sequence (model.logits_chunk) does too.

python tests/mesh_check.py (with XLA_FLAGS=--xla_force_host_platform_device_count=8)
"""
import dataclasses
import json
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from configs import default  # noqa: E402
from models import ModelConfig  # noqa: E402
import tasks  # noqa: E402
from train import checkpointing, optimizer, sharding, state as state_lib, steps  # noqa: E402

MESHES = [(1, 1, 1), (8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 1, 8)]
SEQ_LEN, BATCH = 16, 8
CFG = ModelConfig(vocab_size=128, num_layers=2, num_heads=8, num_kv_heads=8, head_dim=4,
                  d_model=32, d_ff=64, max_len=SEQ_LEN)


# Splash attention (run by Pallas's interpreter here) on a mesh against XLA on one
# device: a sequence of whole kernel tiles, two documents packed in each row, and
# grouped-query heads split over the tensor axis.
SPLASH_SEQ_LEN = 128
SPLASH_CFG = dataclasses.replace(CFG, num_kv_heads=2, max_len=SPLASH_SEQ_LEN, attention='splash')


def batches(count: int, seq_len: int = SEQ_LEN, vocab_size: int = CFG.vocab_size):
  rng = np.random.default_rng(0)
  for _ in range(count):
    ids = rng.integers(6, vocab_size, size=(BATCH, seq_len + 1)).astype(np.int32)
    first = seq_len // 3  # where the second document starts
    positions = np.arange(seq_len, dtype=np.int32)
    positions = np.where(positions < first, positions, positions - first)
    yield {'inputs': ids[:, :-1], 'targets': ids[:, 1:],
           'segment_ids': np.broadcast_to(1 + (np.arange(seq_len) >= first), (BATCH, seq_len)
                                          ).astype(np.int32),
           'positions': np.broadcast_to(positions, (BATCH, seq_len)),
           'weights': np.ones((BATCH, seq_len), np.float32)}


def splash_losses(shape, attention: str) -> dict:
  cfg = dataclasses.replace(SPLASH_CFG, attention=attention)
  mesh, task, tx, _, step = setup(shape, cfg, SPLASH_SEQ_LEN)
  state = state_lib.create_train_state(task, tx, mesh, SPLASH_SEQ_LEN, jax.random.key(0))
  losses, manual = [], None
  for batch in batches(2, SPLASH_SEQ_LEN):
    batch = sharding.global_batch(batch, mesh)
    if manual is None:  # shard_map lowers to a manually partitioned region
      manual = 'manual' in step.lower(state, batch).as_text()
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss']))
  return {'losses': losses, 'per_device_kernel': manual}


def setup(shape, cfg: ModelConfig = CFG, seq_len: int = SEQ_LEN):
  train_config = default.get_config().train
  train_config.update(warmup_steps=2, lr=1e-2)
  mesh_config = ml_collections.ConfigDict(dict(zip(sharding.MESH_AXES, shape)))
  mesh = sharding.make_mesh(mesh_config, jax.devices()[:int(np.prod(shape))])
  task = tasks.for_model(cfg)
  tx = optimizer.make_optimizer(train_config)
  abstract, shardings = state_lib.state_shardings(task, tx, mesh, seq_len)
  step = steps.jit_train_step(task, tx, optimizer.learning_rate_schedule(train_config), 1,
                              jax.random.key(1), mesh, shardings)
  return mesh, task, tx, abstract, step


def train_five_steps(mesh, task, tx, step):
  """(state, losses) after five steps from the same initial parameters."""
  state = state_lib.create_train_state(task, tx, mesh, SEQ_LEN, jax.random.key(0))
  losses = []
  for batch in batches(5):
    state, metrics = step(state, sharding.global_batch(batch, mesh))
    losses.append(float(metrics['loss']))
  return state, losses


def main():
  results = {}
  workdir = tempfile.mkdtemp()
  manager = checkpointing.make_manager(workdir, 1)
  for shape in MESHES:
    mesh, task, tx, _, step = setup(shape)
    state, losses = train_five_steps(mesh, task, tx, step)
    params = state.params['decoder']['layers']
    shard = lambda x: list(x.addressable_shards[0].data.shape)
    leaves = jax.tree.leaves((state.params, state.opt_state))
    on_one_device = sum(x.addressable_shards[0].data.size for x in leaves)
    results[str(shape)] = {
        'losses': losses,
        'state_fraction_per_device': on_one_device / sum(x.size for x in leaves),
        'up_kernel': [list(params['mlp']['up']['kernel'].shape),
                      shard(params['mlp']['up']['kernel'])],
        'query_kernel': [list(params['self_attention']['query']['kernel'].shape),
                         shard(params['self_attention']['query']['kernel'])],
        'embedding': [list(state.params['token_embed']['embedding'].shape),
                      shard(state.params['token_embed']['embedding'])],
    }
    if shape == (2, 2, 2):  # save here, restore on two other meshes and go on training
      checkpointing.save(manager, 5, state, None)
      manager.wait_until_finished()
      _, metrics = step(state, sharding.global_batch(next(batches(1)), mesh))
      results['sixth step on (2, 2, 2)'] = float(metrics['loss'])
  for shape in [(1, 1, 8), (1, 1, 1)]:
    mesh, _, _, abstract, step = setup(shape)
    restored, _ = checkpointing.restore_latest(manager, abstract, with_data=False)
    kernel_shard = list(restored.params['decoder']['layers']['mlp']['up']['kernel']
                        .addressable_shards[0].data.shape)
    state, metrics = step(restored, sharding.global_batch(next(batches(1)), mesh))
    results[f'restored on {shape}'] = {'step': int(state.step), 'loss': float(metrics['loss']),
                                       'up_kernel_shard': kernel_shard}
  manager.close()
  shutil.rmtree(workdir)
  # The loss over chunks of 6 positions (16 = 6 + 6 + 4: the last one padded), sharded.
  mesh, task, tx, _, step = setup((2, 2, 2), dataclasses.replace(CFG, logits_chunk=6))
  results['logits chunked on (2, 2, 2)'] = {'losses': train_five_steps(mesh, task, tx, step)[1]}
  results['splash'] = {'xla on (1, 1, 1)': splash_losses((1, 1, 1), 'xla'),
                       'splash on (2, 2, 2)': splash_losses((2, 2, 2), 'splash')}
  print(json.dumps(results))


if __name__ == '__main__':
  main()
