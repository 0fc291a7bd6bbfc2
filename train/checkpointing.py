"""Orbax checkpoints of the train state and the data iterator, saved together.

Resume order (the one place it is written down): build the abstract sharded
state -> restore the latest step's state and data-iterator state together ->
continue at state.step with the iterator exactly where it was.
"""
import os

import orbax.checkpoint as ocp
from absl import logging


def make_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, save_interval_steps=1, enable_async_checkpointing=True,
      create=True)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), 'checkpoints'),
                               options=options)


def save(manager: ocp.CheckpointManager, step: int, state, data_state: dict | None) -> None:
  """Starts an asynchronous save; the train loop goes on while it is written."""
  items = {'state': ocp.args.StandardSave(state)}
  if data_state is not None:
    items['data'] = ocp.args.JsonSave(data_state)
  manager.save(step, args=ocp.args.Composite(**items), force=True)
  logging.info('Saving checkpoint at step %d to %s (in the background).', step, manager.directory)


def restore_latest(manager: ocp.CheckpointManager, abstract_state, with_data: bool = True):
  """(state, data_state) at the latest step, or (None, None) when there is none."""
  step = manager.latest_step()
  if step is None:
    return None, None
  items = {'state': ocp.args.StandardRestore(abstract_state)}
  if with_data:
    items['data'] = ocp.args.JsonRestore()
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  logging.info('Restored checkpoint at step %d.', step)
  return restored['state'], restored['data'] if with_data else None
