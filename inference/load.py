"""Loading a trained run for inference: its config, tokenizer and latest parameters."""
import dataclasses
import os

import jax
import ml_collections

from input_pipeline import Tokenizer
from models import ModelConfig, build_objective, objective_name
from train import checkpointing, config_checks, optimizer, sharding, state as state_lib


def load_run(config: ml_collections.ConfigDict, workdir: str):
  """(ModelConfig, params, tokenizer) of the latest checkpoint in workdir; `config` is the
  run's own (config.json, with model.vocab_size resolved)."""
  tokenizer_path = os.path.join(workdir, 'tokenizer.model')
  manager = checkpointing.make_manager(workdir, config.train.keep_checkpoints)
  if manager.latest_step() is None or not os.path.exists(tokenizer_path):
    raise FileNotFoundError(f'No checkpoint in {workdir}/checkpoints; train first with '
                            f'python main.py --config=CFG --workdir={workdir}.')
  dtype = config_checks.compute_dtype(config, jax.default_backend())
  cfg = ModelConfig.from_config(config, config.model.vocab_size, dtype)
  if cfg.attention == 'splash' and jax.default_backend() != 'tpu':  # trained on a TPU
    cfg = dataclasses.replace(cfg, attention='auto')
  objective = build_objective(cfg, objective=objective_name(cfg.arch, config.objective))
  mesh = sharding.make_mesh(config.mesh)
  abstract, _ = state_lib.state_shardings(objective, optimizer.make_optimizer(config.train), mesh,
                                          config.data.seq_len)
  state, _ = checkpointing.restore_latest(manager, abstract, with_data=False)
  manager.close()
  return cfg, state.params, Tokenizer(tokenizer_path)
