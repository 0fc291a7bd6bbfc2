"""`python main.py --mode=merge --workdir=DIR --to=OUT`: a LoRA run as a plain workdir.

OUT gets the run's config with lora.rank=0, its tokenizer and a step-0 checkpoint of the
merged weights W + (alpha / r) A B (fresh optimizer moments), so sampling, evaluation,
export and further training read it as any other run, without the adapters' source.
"""
import os

import jax
import ml_collections

import tasks
from inference.load import load_run
from train import config_checks, init_from, state as state_lib


def merge_workdir(config: ml_collections.ConfigDict, workdir: str, out: str) -> dict:
  """Writes OUT (a new or empty directory) and returns what was written."""
  if not config.lora.rank:
    raise config_checks.ConfigError(f'{workdir} is not a LoRA run (lora.rank=0): its '
                                    'checkpoints already hold every weight.')
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise config_checks.ConfigError(f'--to={out} exists and is not an empty directory; merge '
                                    'into a new one (nothing there is overwritten).')
  _, params, _ = load_run(config, workdir, merge_adapters=True)
  merged = ml_collections.ConfigDict(config.to_dict())
  merged.lora.rank = 0
  cfg = tasks.model_config(merged, merged.model.vocab_size,
                           config_checks.compute_dtype(merged, jax.default_backend()))
  count = state_lib.save_step_zero(merged, cfg, jax.device_get(params), out)
  init_from.copy_tokenizer(workdir, out)
  with open(os.path.join(out, 'config.json'), 'w') as f:  # last: the workdir is complete
    f.write(merged.to_json(indent=2))
  return {'workdir': workdir, 'out': out, 'params': count}
