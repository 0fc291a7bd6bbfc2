"""Orbax checkpoints of the train state and the data iterator, saved together.

Resume order (the one place it is written down): build the abstract sharded
state -> restore the latest step's state and data-iterator state together ->
continue at state.step with the iterator exactly where it was.
"""
import dataclasses
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


# PyTreeRestore(partial_restore=True) appeared in orbax-checkpoint 0.11.14. Older 0.11.x
# releases restore a subset of a tree through the legacy `transforms={}` path, which
# likewise skips (never reads) every saved leaf that the target `item` does not name.
_HAS_PARTIAL_RESTORE = 'partial_restore' in {
    f.name for f in dataclasses.fields(ocp.args.PyTreeRestore)}


def restore_params(manager: ocp.CheckpointManager, abstract_params, step: int | None = None):
  """(params, step) of a checkpoint written by save(), or (None, None) when there is none.

  Restores only the `params` subtree of the 'state' item, laid out (sharding, dtype) as
  `abstract_params` (a pytree of jax.ShapeDtypeStruct) says: no optimizer is built, and
  neither the step counter nor the optimizer's moments are read from disk. step=None
  means the latest step.

  It reads through a checkpointer of its own, so the handlers that `manager` has
  registered for 'state' (StandardSave/StandardRestore) stay as they are and
  restore_latest() keeps working on the same manager. Step directories are found by
  Orbax's standard step naming, the one make_manager() uses.
  """
  if step is None:
    step = manager.latest_step()
    if step is None:
      return None, None
  step_dir = ocp.step.standard_name_format().find_step(manager.directory, step).path
  item = {'params': abstract_params}
  restore_args = {'params': ocp.checkpoint_utils.construct_restore_args(abstract_params)}
  if _HAS_PARTIAL_RESTORE:
    args = ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
  else:
    args = ocp.args.PyTreeRestore(item=item, restore_args=restore_args, transforms={})
  checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
  try:
    restored = checkpointer.restore(step_dir / 'state', args=args)
  finally:
    checkpointer.close()
  logging.info('Restored the params of the checkpoint at step %d.', step)
  return restored['params'], step
