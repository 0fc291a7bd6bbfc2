"""checkpointing.restore_params: the params alone, bit for bit, from a checkpoint written
by checkpointing.save, with no optimizer built and the optimizer moments never read."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorstore as ts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # for the subprocess that runs this file as a script
  sys.path.insert(0, ROOT)

from train import checkpointing  # noqa: E402
from train.state import TrainState  # noqa: E402

# Values whose bits a lossy or casting round trip would change: NaN with a payload,
# signed zero, infinities, a subnormal and the extremes.
_SPECIAL_F32 = np.array([np.nan, -0.0, np.inf, -np.inf, 1e-45, np.finfo(np.float32).max,
                         np.finfo(np.float32).tiny, -1.0 / 3.0], np.float32)
_SPECIAL_F32[0] = np.frombuffer(np.uint32(0x7FC01234).tobytes(), np.float32)[0]


def _params(seed: int):
  rng = np.random.default_rng(seed)
  return {
      'embed': {'embedding': jnp.asarray(rng.standard_normal((16, 8), np.float32))},
      'block': {
          'kernel': jnp.asarray(np.concatenate([_SPECIAL_F32, rng.standard_normal(
              (4 * 8 - _SPECIAL_F32.size,), np.float32)]).reshape(8, 4)),
          'bias': jnp.asarray(rng.standard_normal((4,)), jnp.bfloat16),
          'scale': jnp.asarray([np.nan, -0.0, 1e-40, 3.0], jnp.bfloat16),
      },
  }


def _train_state(step: int):
  """A TrainState after one AdamW update, so that the moments differ from the params."""
  params = _params(step)
  tx = optax.adamw(1e-2, weight_decay=0.1)
  opt_state = tx.init(params)
  grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.5, p.dtype), params)
  _, opt_state = tx.update(grads, opt_state, params)
  return TrainState(step=jnp.asarray(step, jnp.int32), params=params, opt_state=opt_state)


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _bits(x):
  x = np.asarray(x)
  return x.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[x.dtype.itemsize])


def _assert_bitwise_equal(restored, saved):
  assert jax.tree.structure(restored) == jax.tree.structure(saved)
  for (path, r), s in zip(jax.tree_util.tree_leaves_with_path(restored), jax.tree.leaves(saved)):
    assert isinstance(r, jax.Array), path
    assert r.dtype == s.dtype and r.shape == s.shape, path
    assert r.sharding == s.sharding, path
    np.testing.assert_array_equal(_bits(r), _bits(s), err_msg=str(path))


def _save(workdir, steps):
  manager = checkpointing.make_manager(str(workdir), keep=2)
  states = {}
  for step in steps:
    states[step] = _train_state(step)
    checkpointing.save(manager, step, states[step], {'epoch': 0, 'position': step})
  manager.wait_until_finished()
  return manager, states


def test_restores_the_params_of_the_latest_or_a_given_step(tmp_path):
  manager, states = _save(tmp_path, [1, 2, 3])
  assert manager.all_steps() == [2, 3]  # keep=2
  abstract = _abstract(states[3].params)

  params, step = checkpointing.restore_params(manager, abstract)
  assert step == 3
  _assert_bitwise_equal(params, states[3].params)
  # The params tree alone (same structure as the saved params, checked above): no
  # optimizer state, no step, no TrainState around it.
  assert not isinstance(params, TrainState) and set(params) == {'embed', 'block'}

  params, step = checkpointing.restore_params(manager, abstract, step=2)
  assert step == 2
  _assert_bitwise_equal(params, states[2].params)

  # A fresh manager on the same directory (another process, say) reads the same.
  fresh = checkpointing.make_manager(str(tmp_path), keep=2)
  params, step = checkpointing.restore_params(fresh, abstract)
  assert step == 3
  _assert_bitwise_equal(params, states[3].params)

  # restore_params leaves the managers' handlers alone: a full restore still works on both.
  for m in (manager, fresh):
    state, data = checkpointing.restore_latest(m, _abstract(states[3]))
    _assert_bitwise_equal(state.params, states[3].params)
    _assert_bitwise_equal(state.opt_state, states[3].opt_state)
    assert data == {'epoch': 0, 'position': 3}
  # ...and restore_params still works after restore_latest registered its handlers.
  params, step = checkpointing.restore_params(fresh, abstract, step=2)
  assert step == 2
  _assert_bitwise_equal(params, states[2].params)


def test_missing_checkpoints(tmp_path):
  manager = checkpointing.make_manager(str(tmp_path), keep=2)
  assert checkpointing.restore_params(manager, _abstract(_params(0))) == (None, None)
  _save(tmp_path, [5])
  manager = checkpointing.make_manager(str(tmp_path), keep=2)
  with pytest.raises(ValueError):  # no step 4 there
    checkpointing.restore_params(manager, _abstract(_params(0)), step=4)


def _full_restore_fails(workdir: str, step: int) -> None:
  """Run in a process of its own: a failed Orbax restore abandons its other reads, which
  complain (harmlessly) when the garbage collector finds them, at a time of its choosing."""
  manager = checkpointing.make_manager(workdir, keep=2)
  try:
    checkpointing.restore_latest(manager, _abstract(_train_state(step)), with_data=False)
  except Exception as e:  # noqa: BLE001
    missing = 'NOT_FOUND' in str(e) and ('opt_state.' in str(e) or 'step/' in str(e))
    print('FULL_RESTORE_FAILED', missing, flush=True)
    os._exit(0)  # skip the noisy teardown of the abandoned reads
  print('FULL_RESTORE_SUCCEEDED')


def _run_self(*args, devices: int = 1):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu',
         # this process's flags (conftest.py's faster compiling), and the devices
         'XLA_FLAGS': f"{os.environ.get('XLA_FLAGS', '')} "
                      f'--xla_force_host_platform_device_count={devices}'}
  out = subprocess.run([sys.executable, os.path.abspath(__file__), *map(str, args)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout


def test_optimizer_state_is_never_read(tmp_path):
  """Delete the optimizer moments (and the step counter) from the saved OCDBT database:
  a full restore now fails, restore_params does not notice."""
  manager, states = _save(tmp_path, [7])
  state_dir = os.path.join(manager.directory, '7', 'state')
  kv = ts.KvStore.open({'driver': 'ocdbt', 'base': 'file://' + state_dir}).result()
  keys = [k.decode() for k in kv.list().result()]
  # One zarr array per leaf, keyed by its path: params.*, opt_state.*, step.
  assert any(k.startswith('opt_state.0.mu.') for k in keys), keys
  assert any(k.startswith('opt_state.0.nu.') for k in keys), keys
  kv.delete_range(ts.KvStore.KeyRange(b'opt_state.', b'opt_state/')).result()
  kv.delete_range(ts.KvStore.KeyRange(b'step/', b'step0')).result()
  left = [k.decode() for k in kv.list().result()]
  assert left and all(k.startswith('params.') for k in left), left
  del kv

  assert 'FULL_RESTORE_FAILED True' in _run_self('full_restore_fails', tmp_path, 7)

  params, step = checkpointing.restore_params(
      checkpointing.make_manager(str(tmp_path), keep=2), _abstract(states[7].params))
  assert step == 7
  _assert_bitwise_equal(params, states[7].params)


def _sharded_check(workdir: str) -> None:
  """Runs in a process with 4 CPU devices: saved split over one mesh axis, restored
  split over the other and replicated; the shardings are the requested ones."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ('fsdp', 'tensor'))
  state = _train_state(11)
  on = lambda spec: NamedSharding(mesh, spec)  # noqa: E731
  saved_shardings = {'embed': {'embedding': on(P('fsdp', 'tensor'))},
                     'block': {'kernel': on(P('fsdp')), 'bias': on(P('tensor')), 'scale': on(P())}}
  params = jax.tree.map(jax.device_put, state.params, saved_shardings)
  state = state.replace(params=params,
                        opt_state=jax.device_put(state.opt_state, on(P())))
  manager = checkpointing.make_manager(workdir, keep=2)
  checkpointing.save(manager, 11, state, None)
  manager.wait_until_finished()

  wanted = {'embed': {'embedding': on(P('tensor', None))},
            'block': {'kernel': on(P(None, 'fsdp')), 'bias': on(P()), 'scale': on(P('fsdp'))}}
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          params, wanted)
  restored, step = checkpointing.restore_params(
      checkpointing.make_manager(workdir, keep=2), abstract)
  assert step == 11
  for (path, r), x, s in zip(jax.tree_util.tree_leaves_with_path(restored),
                             jax.tree.leaves(params), jax.tree.leaves(wanted)):
    assert r.sharding == s, (path, r.sharding, s)
    np.testing.assert_array_equal(_bits(r), _bits(x), err_msg=str(path))
  print('SHARDED_OK')


@pytest.mark.slow  # a mesh of 4 devices, in a process of its own
def test_restores_into_the_requested_shardings(tmp_path):
  assert 'SHARDED_OK' in _run_self('sharded', tmp_path, devices=4)


if __name__ == '__main__':
  {'sharded': lambda d: _sharded_check(d),
   'full_restore_fails': lambda d, step: _full_restore_fails(d, int(step)),
   }[sys.argv[1]](*sys.argv[2:])
