"""LoRA (models/lora.py, train/frozen.py): adapters start as the identity and are exactly
what merging folds into the kernels, for every family and target; rank 0 is the plain
model; a LoRA run trains, checkpoints and holds optimizer moments for its adapters only,
never changes a base parameter, and merges (--mode=merge) into a plain workdir that
computes what the adapted run did."""
import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import tasks
from conftest import tiny_config
from inference.load import load_run
from inference.merge import merge_workdir
from models import lora
from models.config import LORA_TARGETS, ModelConfig
from train import checkpointing, config_checks, frozen as frozen_lib, init_from, loop, optimizer
from train import run_config, sharding, state as state_lib
from train.config_checks import ConfigError

ALL_BUT_HEAD = tuple(t for t in LORA_TARGETS if t != 'head')


def _cfg(arch: str, **changes) -> ModelConfig:
  base = dict(arch=arch, vocab_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
              head_dim=8, d_model=16, d_ff=32, max_len=16, tie_embeddings=False,
              gated_mlp=arch == 'decoder', position='rope' if arch == 'decoder' else 'auto')
  if base['position'] == 'auto':
    base['position'] = {'encoder': 'learned', 'encoder_decoder': 'relative'}[arch]
  base.update(changes)
  return ModelConfig(**base)


def _batch(task, seed: int = 0):
  batch = task.example_batch(2, 8)
  rng = np.random.default_rng(seed)
  return {k: (jnp.asarray(rng.integers(1, 60, v.shape), v.dtype) if 'inputs' in k or
              'targets' in k else v) for k, v in batch.items()}


def _logits(task):
  return jax.jit(lambda params, batch: task.logits(params, batch))


def _init(task):
  return nn.unbox(jax.jit(task.init)(jax.random.key(0), task.example_batch(1, 8)))


def _randomised_adapters(params, seed: int = 1):
  """Adapters with B non-zero (a trained adapter), so the adapted model differs."""
  flat = traverse_util.flatten_dict(params)
  keys = jax.random.split(jax.random.key(seed), len(flat))
  return traverse_util.unflatten_dict({
      p: (jax.random.normal(k, v.shape, v.dtype) * 0.3 if p[-1] == lora.ADAPTER_B else v)
      for (p, v), k in zip(flat.items(), keys)})


@pytest.mark.parametrize('arch,scan', [('decoder', True), ('encoder', False),
                                       ('encoder_decoder', True)])
def test_adapters_start_as_the_base_and_merge_into_exactly_what_they_compute(arch, scan):
  base_cfg = _cfg(arch, scan_layers=scan)
  lora_cfg = dataclasses.replace(base_cfg, lora_rank=4, lora_alpha=8.0,
                                 lora_targets=LORA_TARGETS)
  base_task, lora_task = tasks.for_model(base_cfg), tasks.for_model(lora_cfg)
  params = _init(lora_task)
  adapters = {p for p in traverse_util.flatten_dict(params) if lora.is_adapter(p)}
  names = {p[-2] for p in adapters}
  assert names >= {'query', 'key', 'value', 'out', 'up', 'down', 'lm_head'}
  base_params = lora.merge(params, lora_cfg.lora_alpha)  # B = 0: the kernels as they were
  assert jax.tree.structure(base_params) == jax.tree.structure(_init(base_task))
  batch = _batch(base_task)
  base_logits, lora_logits = _logits(base_task), _logits(lora_task)
  base_out = base_logits(base_params, batch)
  np.testing.assert_array_equal(lora_logits(params, batch), base_out)

  trained = _randomised_adapters(params)
  unmerged = lora_logits(trained, batch)
  merged = base_logits(lora.merge(trained, lora_cfg.lora_alpha), batch)
  assert float(jnp.max(jnp.abs(unmerged - base_out))) > 1e-2
  np.testing.assert_allclose(merged, unmerged, atol=1e-5, rtol=1e-5)
  # The base's parameters alone (a reference model) run the layers without adapters.
  without = {p: v for p, v in traverse_util.flatten_dict(trained).items()
             if not lora.is_adapter(p)}
  np.testing.assert_array_equal(lora_logits(traverse_util.unflatten_dict(without), batch),
                                base_out)


def test_rank_zero_is_the_plain_model():
  cfg = _cfg('decoder')
  rank_zero = dataclasses.replace(cfg, lora_rank=0, lora_targets=ALL_BUT_HEAD)
  plain, zero = _init(tasks.for_model(cfg)), _init(tasks.for_model(rank_zero))
  assert jax.tree.structure(plain) == jax.tree.structure(zero)
  batch = _batch(tasks.for_model(cfg))
  np.testing.assert_array_equal(_logits(tasks.for_model(cfg))(plain, batch),
                                _logits(tasks.for_model(rank_zero))(zero, batch))


def test_adapters_shard_with_their_layer_and_never_on_the_rank_axis():
  cfg = dataclasses.replace(_cfg('decoder'), lora_rank=4, lora_targets=('q', 'mlp_out'))
  task = tasks.for_model(cfg)
  boxed = jax.eval_shape(task.init, jax.random.key(0), task.example_batch(1, 8))
  names = {p: v.names for p, v in traverse_util.flatten_dict(
      boxed, is_leaf=lambda _, x: isinstance(x, nn.Partitioned)).items()}
  layer = ('decoder', 'layers', 'self_attention', 'query')
  assert names[layer + ('lora_a',)] == ('layers', 'embed', 'lora_rank')
  assert names[layer + ('lora_b',)] == ('layers', 'lora_rank', 'heads', 'kv')
  down = ('decoder', 'layers', 'mlp', 'down')
  assert names[down + ('lora_b',)] == ('layers', 'lora_rank', 'embed')
  assert dict(sharding.LOGICAL_AXIS_RULES)['lora_rank'] is None


@pytest.mark.parametrize('changes,message', [
    (dict(init_from=''), 'init_from'),
    (dict(targets='q,attention'), 'lora.targets'),
    (dict(targets='q,head'), 'tie_embeddings'),
    (dict(dropout=1.0), 'lora.dropout'),
])
def test_config_mistakes_fail_in_one_line(config, changes, message):
  config.init_from = changes.pop('init_from', 'runs/base')
  config.lora.update(rank=4, **changes)
  with pytest.raises(ConfigError, match=message):
    config_checks.validate(config)


# --- a LoRA run --------------------------------------------------------------------------
def _numpy(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


@pytest.fixture(scope='module')
def lora_run(tiny_corpus, tmp_path_factory):
  """(source workdir, its params, LoRA workdir) after a 4-step LoRA run on a tiny decoder
  whose source has random (not trained) parameters, written as a run writes them."""
  root = tmp_path_factory.mktemp('lora')
  cache = str(tmp_path_factory.getbasetemp() / 'data_cache')
  config = tiny_config(tiny_corpus, cache)
  source = str(root / 'source')
  run = loop.Run(config, source)
  with open(os.path.join(source, 'config.json'), 'w') as f:
    f.write(run.resolved_config.to_json(indent=2))
  tx = optimizer.make_optimizer(config.train)
  state = state_lib.create_train_state(run.task, tx, run.mesh, config.data.seq_len,
                                       jax.random.key(7))
  manager = checkpointing.make_manager(source, keep=2)
  checkpointing.save(manager, 3, state.replace(step=state.step + 3),
                     run.data.train_iter.get_state())
  checkpointing.finish(manager)

  config = tiny_config(tiny_corpus, cache)
  config.init_from = source
  config.lora.update(rank=4, alpha=8.0, dropout=0.1, targets='q,v,o,mlp_in,mlp_out')
  config.train.update(steps=4, lr=3e-2, warmup_steps=1, log_every=2, eval_every=4,
                      eval_steps=1, checkpoint_every=2)
  workdir = str(root / 'lora')
  loop.train_and_evaluate(config, workdir)
  return source, _numpy(state.params), workdir


def test_a_lora_run_trains_and_saves_only_its_adapters(lora_run):
  source, source_params, workdir = lora_run
  config = run_config.saved_config(workdir, [])
  assert config.init_from == f'{source}@3'  # pinned to the step it started from
  run = loop.Run(config, workdir)
  tx = optimizer.make_optimizer(config.train)
  abstract, _ = state_lib.state_shardings(run.task, tx, run.mesh, config.data.seq_len,
                                          trainable=run.trainable)
  manager = checkpointing.make_manager(workdir, keep=2)
  state, _ = checkpointing.restore_latest(manager, abstract)
  manager.close()
  assert int(state.step) == 4
  trained = traverse_util.flatten_dict(_numpy(state.params))
  assert trained and all(lora.is_adapter(p) for p in trained)
  # AdamW's two moments per adapter parameter, and nothing else but scalar counts.
  moments = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim)
  assert moments == 2 * sum(v.size for v in trained.values()) == 2 * lora.count(state.params)
  assert any(np.abs(v).max() > 0 for p, v in trained.items() if p[-1] == lora.ADAPTER_B)

  manager = checkpointing.make_manager(workdir, keep=2)
  whole, _ = frozen_lib.restore_params(config, manager, run.abstract_params)
  manager.close()
  base = {p: v for p, v in traverse_util.flatten_dict(_numpy(whole)).items()
          if not lora.is_adapter(p)}
  expected = traverse_util.flatten_dict(source_params)
  assert base.keys() == expected.keys()
  for path, value in base.items():  # bit for bit: the base never trains
    np.testing.assert_array_equal(value, expected[path])


def test_merge_writes_a_plain_workdir_that_computes_what_the_adapters_did(lora_run, tmp_path):
  _, _, workdir = lora_run
  config = run_config.saved_config(workdir, [])
  out = str(tmp_path / 'merged')
  result = merge_workdir(config, workdir, out)
  merged_config = run_config.saved_config(out, [])
  assert merged_config.lora.rank == 0 and result['params'] > 0
  task, unmerged, _ = load_run(config, workdir, merge_adapters=False)
  merged_task, merged, _ = load_run(merged_config, out)
  assert not any(lora.is_adapter(p) for p in traverse_util.flatten_dict(merged))
  batch = _batch(merged_task)
  np.testing.assert_allclose(merged_task.logits(merged, batch), task.logits(unmerged, batch),
                             atol=1e-5, rtol=1e-5)
  # --mode=eval agrees on both: the same validation loss.
  np.testing.assert_allclose(loop.evaluate(merged_config, out)['eval_loss'],
                             loop.evaluate(config, workdir)['eval_loss'], rtol=1e-5)
  with pytest.raises(ConfigError, match='not an empty directory'):
    merge_workdir(config, workdir, out)


def test_what_a_lora_run_freezes(lora_run, config):
  """Everything the source has, except what lora.train_in_full names; a new head (the
  source lacks it) and the adapters train."""
  source = lora_run[0]
  config.update(init_from=f'{source}@3', task='classification')
  config.classification.labels = ['no', 'yes']
  config.lora.update(rank=4, train_in_full='embedding')
  task = tasks.from_config(config, tasks.model_config(config, 512, jnp.float32))
  abstract = jax.eval_shape(task.init, jax.random.key(0), task.example_batch(1, 8))
  paths = set(traverse_util.flatten_dict(nn.unbox(abstract)))
  frozen = frozen_lib.frozen_paths(config, nn.unbox(abstract))
  trained = paths - frozen
  assert {p[0] for p in trained if not lora.is_adapter(p)} == {'classifier', 'token_embed'}
  assert all('embedding' in p or p[0] == 'classifier' or lora.is_adapter(p) for p in trained)
  assert frozen and not any(lora.is_adapter(p) for p in frozen)
  config.lora.train_in_full = 'embeddings'
  with pytest.raises(ConfigError, match="train_in_full names 'embeddings'"):
    frozen_lib.frozen_paths(config, nn.unbox(abstract))


def test_what_trains_in_full_starts_from_the_source(lora_run, config):
  source, source_params, _ = lora_run
  config.init_from = f'{source}@3'
  config.lora.update(rank=4, train_in_full='embedding')
  task = tasks.from_config(config, tasks.model_config(config, 512, jnp.float32))
  mesh = sharding.make_mesh(config.mesh)
  abstract, _ = state_lib.param_shardings(task, mesh, config.data.seq_len)
  paths = frozen_lib.frozen_paths(config, abstract)
  tx = optimizer.make_optimizer(config.train)
  trainable = frozen_lib.trainable_part(paths)
  state = state_lib.create_train_state(task, tx, mesh, config.data.seq_len, jax.random.key(3),
                                       trainable=trainable)
  _, shardings = state_lib.state_shardings(task, tx, mesh, config.data.seq_len,
                                           trainable=trainable)
  state = init_from.start_state(init_from.pinned_source(config), state, tx, shardings, mesh,
                                paths)
  params = traverse_util.flatten_dict(_numpy(state.params))
  np.testing.assert_array_equal(params['token_embed', 'embedding'],
                                source_params['token_embed']['embedding'])
  assert all(not v.any() for p, v in params.items() if p[-1] == lora.ADAPTER_B)


def test_a_lora_run_is_no_source_and_resumes_with_its_own_adapters(lora_run, config):
  _, _, workdir = lora_run
  with pytest.raises(ConfigError, match='is a LoRA run.*--mode=merge'):
    init_from.source(workdir)
  saved = run_config.saved_config(workdir, [])
  config.init_from = 'elsewhere'
  config.lora.update(rank=4, alpha=1.0, targets='q')
  assert init_from.prepare(config, workdir, argv=[]) is None  # it resumes
  assert config.init_from == saved.init_from
  assert (config.lora.alpha, config.lora.targets) == (8.0, 'q,v,o,mlp_in,mlp_out')
  config.lora.alpha = 1.0
  with pytest.raises(ConfigError, match='lora.alpha=1.0 differs'):
    init_from.prepare(config, workdir, argv=['--config.lora.alpha=1.0'])
