"""Orbax checkpoints of the train state and the data iterator, saved together.

Resume order (the one place it is written down): build the abstract sharded
state -> restore the latest step's state and data-iterator state together ->
continue at state.step with the iterator exactly where it was.

Faults: a latest checkpoint that cannot be read (files missing or cut short)
is moved aside to <workdir>/checkpoints_corrupt/<step> with a warning, and the newest
readable one is restored instead; a save that fails (disk full, in the background or
not) stops the run with one CheckpointSaveError that names the step, the last good
checkpoint and what to do. A kill at any moment needs nothing: Orbax writes each step
into a temporary directory and commits it (a rename, or a commit marker on object
stores) only once it is complete.
"""
import contextlib
import dataclasses
import errno
import logging as std_logging
import os
import sys
import traceback
import weakref

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

CORRUPT_DIR = 'checkpoints_corrupt'  # beside checkpoints/, where Orbax never looks


class CheckpointSaveError(RuntimeError):
  """A checkpoint could not be written; the message says which, where the last good
  one is and what to do."""

  def __init__(self, message: str, step: int, last_good_step: int | None, disk_full: bool,
               reason: str):
    super().__init__(message)
    self.step, self.last_good_step, self.disk_full = step, last_good_step, disk_full
    self.reason = reason  # the underlying error, in one line


class CheckpointRestoreError(RuntimeError):
  """No checkpoint of a run could be restored."""


# The step of the asynchronous save each manager has in flight: its errors surface at
# the next save or wait, and the message must name that step, not the next one.
_PENDING_SAVE: 'weakref.WeakKeyDictionary[ocp.CheckpointManager, int]' = (
    weakref.WeakKeyDictionary())


def make_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, save_interval_steps=1, enable_async_checkpointing=True,
      create=True)
  _quiet_orbax_logs()
  _quiet_abandoned_io()
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), 'checkpoints'),
                               options=options)


def save(manager: ocp.CheckpointManager, step: int, state, data_state: dict | None) -> None:
  """Starts an asynchronous save; the train loop goes on while it is written.

  Raises CheckpointSaveError when this save, or the previous one still in flight,
  fails (the previous one's error surfaces here, at the latest)."""
  wait(manager)
  items = {'state': ocp.args.StandardSave(state)}
  if data_state is not None:
    items['data'] = ocp.args.JsonSave(data_state)
  try:
    manager.save(step, args=ocp.args.Composite(**items), force=True)
  except Exception as e:  # noqa: BLE001 -- any failure to write is reported the same way
    raise _save_error(manager, step, e) from (None if _is_disk_full(e) else e)
  _PENDING_SAVE[manager] = step
  logging.info('Saving checkpoint at step %d to %s (in the background).', step, manager.directory)


def wait(manager: ocp.CheckpointManager) -> None:
  """Blocks until the save in flight has landed; CheckpointSaveError if it failed."""
  step = _PENDING_SAVE.pop(manager, None)
  try:
    with _quiet_orbax_tracebacks():
      manager.wait_until_finished()
  except Exception as e:  # noqa: BLE001
    if step is None:
      raise
    raise _save_error(manager, step, e) from (None if _is_disk_full(e) else e)


def finish(manager: ocp.CheckpointManager) -> None:
  """wait(), then close the manager (also when the save failed)."""
  try:
    wait(manager)
  finally:
    try:
      manager.close()
    except Exception as e:  # noqa: BLE001 -- never hide the error being raised
      logging.warning('Closing the checkpoint manager of %s: %s', manager.directory, e)


def last_good_checkpoint(manager: ocp.CheckpointManager) -> str:
  """One sentence naming the newest complete checkpoint (step and path), or saying there
  is none; a save still in flight is waited for first (and named when it failed)."""
  failed = ''
  try:
    wait(manager)
  except CheckpointSaveError as e:
    failed = f' (saving step {e.step} failed: {e.reason})'
  step = _reload_latest_step(manager)
  if step is None:
    return f'There is no checkpoint in {manager.directory}{failed}.'
  return f'The last good checkpoint is step {step} at {_step_path(manager, step)}{failed}.'


def _step_path(manager: ocp.CheckpointManager, step: int) -> epath.Path:
  return ocp.step.standard_name_format().find_step(manager.directory, step).path


def _reload_latest_step(manager: ocp.CheckpointManager) -> int | None:
  try:
    manager.reload()  # what is on disk, not the manager's cached list
  except Exception as e:  # noqa: BLE001
    logging.warning('Could not list the checkpoints in %s: %s', manager.directory, e)
  return manager.latest_step()


def _is_disk_full(error: BaseException | None) -> bool:
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    if 'No space left on device' in str(error) or 'ENOSPC' in str(error):
      return True  # e.g. TensorStore's status text for the same OS error
    error = error.__cause__ or error.__context__
  return False


def _reason(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return f'{type(error).__name__}: {text[0] if text else ""}'[:500]


def _save_error(manager: ocp.CheckpointManager, step: int,
                error: BaseException) -> CheckpointSaveError:
  """The one message a failed save stops the run with."""
  disk_full = _is_disk_full(error)
  good = _reload_latest_step(manager)
  if good is not None and good >= step:  # never name the failed step as good
    good = max((s for s in manager.all_steps() if s < step), default=None)
  partial = sorted(str(p) for p in manager.directory.glob(f'{step}.orbax-checkpoint-tmp*'))
  what = ('the disk is full' if disk_full else 'the write failed')
  message = [f'Saving the checkpoint of step {step} to {manager.directory} failed: {what} '
             f'({_reason(error)}).']
  if good is None:
    message.append('There is no earlier checkpoint: a rerun starts from step 0.')
  else:
    message.append(f'The last good checkpoint is step {good} at {_step_path(manager, good)}; '
                   'a rerun resumes from it.')
  if partial:
    message.append(f'The partial write {partial[0]} can be deleted.')
  message.append('Free some disk space, then rerun the same command.' if disk_full else
                 'Fix the cause, then rerun the same command.')
  return CheckpointSaveError(' '.join(message), step, good, disk_full, _reason(error))


class _OrbaxTracebacks(std_logging.Filter):
  """Orbax logs a failed background write with its whole traceback (from the thread that
  failed, and again when the error is re-raised); a disk-full error, and any error while
  wait() turns it into a CheckpointSaveError, keeps its one-line log record instead. So
  does asyncio's 'exception was never retrieved' for Orbax operations abandoned when
  another one failed (a damaged checkpoint, a full disk)."""

  def __init__(self):
    super().__init__()
    self.waiting = False

  def filter(self, record):
    if not record.exc_info or record.exc_info[1] is None:
      return True
    if 'orbax' in record.pathname:
      strip = self.waiting or _is_disk_full(record.exc_info[1])
    elif record.name == 'asyncio':  # about an Orbax task or future nobody awaited
      strip = _from_orbax(record.exc_info[2])
    else:
      strip = False
    if strip:
      record.exc_info, record.exc_text = None, None
    return True


_ORBAX_TRACEBACKS = _OrbaxTracebacks()


def _from_orbax(tb) -> bool:
  return any('orbax' in frame.filename for frame in traceback.extract_tb(tb))


def _quiet_orbax_logs() -> None:
  for name in ('absl', 'asyncio'):
    logger = std_logging.getLogger(name)
    if _ORBAX_TRACEBACKS not in logger.filters:
      logger.addFilter(_ORBAX_TRACEBACKS)


@contextlib.contextmanager
def _quiet_orbax_tracebacks():
  _quiet_orbax_logs()
  _ORBAX_TRACEBACKS.waiting = True
  try:
    yield
  finally:
    _ORBAX_TRACEBACKS.waiting = False


def _quiet_abandoned_io() -> None:
  """A failed Orbax read or write (a damaged checkpoint, a full disk) abandons its other
  TensorStore operations and coroutines. When they complete they find Orbax's event loop
  closed ('Event loop is closed'), and the coroutines never run are closed at exit; Python
  prints a traceback for each, harmlessly, dozens of them around the one error that
  matters. Those, and only those, are dropped."""
  previous = sys.unraisablehook
  if getattr(previous, '_drops_abandoned_io', False):
    return

  def hook(unraisable):
    error, code = unraisable.exc_value, getattr(unraisable.object, 'cr_code', None)
    if code is not None and 'orbax' in code.co_filename:
      return  # an Orbax coroutine abandoned when another operation failed
    if (isinstance(error, RuntimeError) and str(error) == 'Event loop is closed'
        and any(frame.name == 'call_soon_threadsafe'
                for frame in traceback.extract_tb(unraisable.exc_traceback))):
      return
    previous(unraisable)
  hook._drops_abandoned_io = True
  sys.unraisablehook = hook


def _restore_step(manager: ocp.CheckpointManager, step: int, abstract_state, with_data: bool):
  """The step's (state, data state). A failed read is tried once more, so a transient
  storage error does not pass for damage. A step saved without the input pipeline's
  position (an imported checkpoint, `interop/`, always step 0) has data state None; a
  later step without it is damaged, and its restore fails like any other damage."""
  items = {'state': ocp.args.StandardRestore(abstract_state)}
  with_data = with_data and (step != 0 or (_step_path(manager, step) / 'data').exists())
  if with_data:
    items['data'] = ocp.args.JsonRestore()
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**items))
  except Exception:  # noqa: BLE001 -- retried once; a second failure propagates
    restored = manager.restore(step, args=ocp.args.Composite(**items))
  return restored['state'], restored['data'] if with_data else None


def restore_latest(manager: ocp.CheckpointManager, abstract_state, with_data: bool = True):
  """(state, data_state) at the latest readable step, or (None, None) when there is none.

  A newer step that fails to restore while an older one restores was damaged (files
  missing or cut short): it is moved to <workdir>/checkpoints_corrupt/<step>, never
  deleted, with a warning that says where. When no step restores (a changed model
  config, say) nothing is moved and CheckpointRestoreError says why. With several
  processes there is no fallback: a failed read raises CheckpointRestoreError at once
  (Orbax's restore ends in a barrier that a failed process never reaches, so the
  processes could not agree on an older step without risking a hang).
  """
  steps = sorted(manager.all_steps(), reverse=True)
  failed: list[tuple[int, Exception]] = []
  for step in steps:
    try:
      state, data_state = _restore_step(manager, step, abstract_state, with_data)
    except Exception as e:  # noqa: BLE001 -- whatever a damaged checkpoint raises
      logging.warning('Could not restore the checkpoint at step %d in %s (%s).', step,
                      manager.directory, _reason(e))
      failed.append((step, e))
      if jax.process_count() > 1:
        break
      continue
    if failed:
      _move_aside(manager, [s for s, _ in failed], step)
    logging.info('Restored checkpoint at step %d.', step)
    return state, data_state
  if not failed:
    return None, None
  step, error = failed[0]
  if jax.process_count() > 1:
    raise CheckpointRestoreError(
        f'The checkpoint at step {step} in {manager.directory} could not be restored '
        f'({_reason(error)}). If the model or optimizer config changed, rerun with the one '
        f'this run started with; if it is damaged, move {_step_path(manager, step)} aside '
        'and rerun to resume from the step before.') from error
  raise CheckpointRestoreError(
      f'No checkpoint in {manager.directory} could be restored (steps '
      f'{", ".join(map(str, steps))}); step {step} failed with {_reason(error)}. If the '
      'model or optimizer config changed, rerun with the one this run started with; if '
      f'the checkpoints are damaged, move {manager.directory} aside to start from step 0.'
  ) from error


def _move_aside(manager: ocp.CheckpointManager, steps: list[int], good_step: int) -> None:
  """Moves unreadable step directories out of Orbax's sight and makes the manager forget
  them (so that neither a later save of the same step nor keep_checkpoints trips on them)."""
  target_root = epath.Path(manager.directory).parent / CORRUPT_DIR
  moved = {}
  for step in steps:
    source = _step_path(manager, step)
    target, n = target_root / str(step), 1
    while target.exists():
      target, n = target_root / f'{step}.{n}', n + 1
    moved[step] = (source, target)
  target_root.mkdir(parents=True, exist_ok=True)  # one process: restore_latest
  for source, target in moved.values():
    source.rename(target)
  manager.reload()
  for step, (source, target) in moved.items():
    logging.warning('The checkpoint at step %d (%s) could not be read; it was moved to %s '
                    '(delete it once you no longer need it). Resuming from step %d instead.',
                    step, source, target, good_step)


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
  missing = [jax.tree_util.keystr(path) for path, leaf in
             jax.tree_util.tree_leaves_with_path(restored['params'])
             if isinstance(leaf, jax.ShapeDtypeStruct)]
  if missing:  # a partial restore leaves what the checkpoint lacks as placeholders
    raise CheckpointRestoreError(
        f"The checkpoint at step {step} in {manager.directory} has no parameter "
        f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}; is it a run of this "
        'model (a LoRA run\'s checkpoints hold its adapters only: read them with its config)?')
  logging.info('Restored the params of the checkpoint at step %d.', step)
  return restored['params'], step
