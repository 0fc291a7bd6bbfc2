"""The train step: gradient accumulation, optimizer details, loss decreasing."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import default
from models import ModelConfig
import tasks
from train import optimizer, sharding, state as state_lib, steps


@functools.lru_cache(maxsize=None)
def _jitted(grad_accum: int, offload_optimizer: bool, xla_default_options: bool = False):
  """(task, tx, mesh, jitted train step), compiled once for the tests that share them."""
  config = default.get_config()
  config.train.update(steps=10, warmup_steps=2, grad_accum=grad_accum, lr=1e-2)
  cfg = ModelConfig(vocab_size=128, num_layers=2, num_heads=2, num_kv_heads=2, head_dim=8,
                    d_model=16, d_ff=32, max_len=16)
  task = tasks.for_model(cfg)
  tx = optimizer.make_optimizer(config.train)
  schedule = optimizer.learning_rate_schedule(config.train)
  mesh = sharding.make_mesh(ml_collections.ConfigDict({'data': 1, 'fsdp': 1, 'tensor': 1}),
                            jax.devices()[:1])
  _, shardings = state_lib.state_shardings(task, tx, mesh, 16, offload_optimizer)
  step = steps.jit_train_step(task, tx, schedule, grad_accum, jax.random.key(1), mesh,
                              shardings, xla_default_options=xla_default_options)
  return task, tx, mesh, step


@functools.lru_cache(maxsize=None)
def _initial_state(offload_optimizer: bool):
  """The initial train state, made (and its init compiled) once; every step count of
  accumulation starts from it."""
  task, tx, mesh, _ = _jitted(1, offload_optimizer)
  return state_lib.create_train_state(task, tx, mesh, 16, jax.random.key(0), offload_optimizer)


def _setup(grad_accum: int, offload_optimizer: bool = False):
  """A fresh train state (the step donates it: a copy, placed as the original) and the
  shared jitted step."""
  state = jax.tree.map(jnp.copy, _initial_state(offload_optimizer))
  return state, _jitted(grad_accum, offload_optimizer)[3]


def _random_batch(seed: int, batch_size: int = 8, seq_len: int = 16):
  rng = np.random.default_rng(seed)
  ids = rng.integers(6, 128, size=(batch_size, seq_len + 1)).astype(np.int32)
  segments = np.where(np.arange(seq_len) < seq_len // 2, 1, 2)[None].repeat(batch_size, 0)
  positions = np.where(segments == 1, np.arange(seq_len), np.arange(seq_len) - seq_len // 2)
  weights = np.ones((batch_size, seq_len), np.float32)
  weights[0, -3:] = 0.0  # padding: unequal token counts per micro-batch must still match
  return {'inputs': ids[:, :-1], 'targets': ids[:, 1:], 'segment_ids': segments.astype(np.int32),
          'positions': positions.astype(np.int32), 'weights': weights}


def test_gradient_accumulation_equals_one_large_batch():
  results = []
  for grad_accum in (1, 4):
    state, step = _setup(grad_accum)
    for i in range(3):
      state, metrics = step(state, _random_batch(i))
    results.append((jax.device_get(state.params), float(metrics['loss'])))
  (params_1, loss_1), (params_4, loss_4) = results
  np.testing.assert_allclose(loss_4, loss_1, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(params_1), jax.tree.leaves(params_4)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_optimizer_state_offloaded_to_host_memory_gives_the_same_updates():
  results = []
  for offload in (False, True):
    state, step = _setup(1, offload_optimizer=offload)
    for i in range(3):
      state, metrics = step(state, _random_batch(i))
    kinds = {x.sharding.memory_kind for x in jax.tree.leaves(state.opt_state)}
    assert kinds == ({'pinned_host'} if offload else {'device'})
    assert {x.sharding.memory_kind for x in jax.tree.leaves(state.params)} == {'device'}
    results.append(jax.device_get(state.params))
  for a, b in zip(*(jax.tree.leaves(r) for r in results)):
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_loss_falls_when_fitting_one_batch():
  state, step = _setup(1)
  batch = _random_batch(0)
  losses = []
  for _ in range(10):
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss']))
  assert losses[-1] < losses[0] - 0.5, losses


def test_weight_decay_skips_norms_and_biases():
  params = {'layer': {'kernel': jnp.ones((2, 2)), 'bias': jnp.ones(2)},
            'norm': {'scale': jnp.ones((3, 4))}, 'embed': {'embedding': jnp.ones((4, 2))}}
  mask = optimizer.decay_mask(params)
  assert mask == {'layer': {'kernel': True, 'bias': False}, 'norm': {'scale': False},
                  'embed': {'embedding': True}}


def test_schedule_warms_up_then_decays_to_min_ratio():
  config = default.get_config()
  config.train.update(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
  schedule = optimizer.learning_rate_schedule(config.train)
  assert float(schedule(0)) == 0.0
  np.testing.assert_allclose(float(schedule(10)), 1.0, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(100)), 0.1, rtol=1e-6)
  assert float(schedule(50)) < float(schedule(20))


def test_matmul_parameters_count_the_output_projection_not_the_lookup():
  from train import flops
  base = dict(vocab_size=128, num_layers=2, num_heads=2, num_kv_heads=2, head_dim=8, d_model=16,
              d_ff=32, max_len=16, position='learned')
  per_layer = 4 * 16 * 16 + 2 * 16 * 32
  for tie in (True, False):
    cfg = ModelConfig(tie_embeddings=tie, **base)
    params = nn.unbox(jax.eval_shape(tasks.for_model(cfg).init, jax.random.key(0),
                                     tasks.for_model(cfg).example_batch(1, 8)))  # shapes only
    # the output projection (tied embedding or lm_head) counts once; positions never
    assert flops.matmul_param_count(params, tie) == 2 * per_layer + 128 * 16
    # 8 tokens of a 2-layer stack, attention 16 wide: 6 N + 12 L T (N K) per token.
    everything = flops.Trained(params)
    tokens = dict.fromkeys(('encoder', 'decoder', 'cross_kv', 'sequence', 'other'), 8)
    assert (flops.matmul_train_flops(params, tokens, tie, everything)
            + flops.attention_train_flops(16, [('decoder', 'self_attention', 2, 8, 8)],
                                          everything)) == 8 * (
                                              6 * (2 * per_layer + 128 * 16) + 12 * 2 * 8 * 16)


def test_a_hybrid_mesh_needs_one_slice_per_process_or_tpu_slice():
  mesh_config = ml_collections.ConfigDict({'data': 2, 'fsdp': 1, 'tensor': 1, 'num_slices': 2})
  with pytest.raises(ValueError, match=r'num_slices=2, but these devices form 1 slice\(s\) '
                                       r'\(one per process\)'):
    sharding.make_mesh(mesh_config, jax.devices()[:1] * 2)
  mesh_config.data = 3
  with pytest.raises(ValueError, match=r'mesh.data=3 must be a multiple of mesh.num_slices=2'):
    sharding.make_mesh(mesh_config, jax.devices()[:1] * 3)


def test_activations_carry_sharding_constraints_in_the_train_step():
  """Flax drops logical constraints silently when it sees no mesh (recent Flax reads
  jax.set_mesh's, not the legacy `with mesh:`): the step must trace under both."""
  state, step = _setup(grad_accum=1)
  jaxpr = str(step.trace(state, _random_batch(0)).jaxpr)
  assert jaxpr.count('sharding_constraint') >= 2  # a block's input and output


def test_train_compiler_options_on_cpu_unless_the_user_or_the_jaxlib_decides(monkeypatch):
  """XLA:CPU compiles the step with YNNPACK fusing reductions only; not where XLA_FLAGS
  names the option (the user's choice), off the CPU, or where the jaxlib refuses it."""
  decide = steps.train_compiler_options.__wrapped__  # uncached
  monkeypatch.delenv('XLA_FLAGS', raising=False)
  assert decide() == {steps.YNN_FUSION_TYPE: steps.TRAIN_STEP_YNN_FUSIONS}
  monkeypatch.setenv('XLA_FLAGS', f'--{steps.YNN_FUSION_TYPE}=dot')
  assert decide() is None
  monkeypatch.delenv('XLA_FLAGS')
  monkeypatch.setattr(steps, 'TRAIN_STEP_YNN_FUSIONS', 'NOT_A_FUSION_TYPE')
  assert decide() is None
  monkeypatch.undo()
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  assert decide() is None


def test_the_compile_options_change_no_result():
  """The step compiled with and without train_compiler_options computes the same update
  (its products' kernels differ, so up to float rounding)."""
  batch = _random_batch(3)
  state, metrics = _jitted(1, False)[3](_setup(1)[0], batch)
  default_state, default_metrics = _jitted(1, False, True)[3](_setup(1)[0], batch)
  np.testing.assert_allclose(metrics['loss'], default_metrics['loss'], rtol=1e-6)
  for ours, theirs in zip(jax.tree.leaves(state.params), jax.tree.leaves(default_state.params)):
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
