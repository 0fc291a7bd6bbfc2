"""Loading a trained run for inference: its task (model), latest parameters and
tokenizer. Only the parameters are read from the checkpoint: no optimizer is built
and its moments stay on disk. A LoRA run's adapters join its frozen base (read from
its init_from source) and are folded into the kernels unless asked to run beside them."""
import jax
import ml_collections

import tasks
from input_pipeline.tokenizer import load_tokenizer, tokenizer_file
from models import kernels
from models import lora
from train import checkpointing, config_checks, frozen, sharding, state as state_lib


def load_run(config: ml_collections.ConfigDict, workdir: str, merge_adapters: bool = True):
  """(task, params, tokenizer) of the latest checkpoint in workdir; `config` is the
  run's own (config.json, with model.vocab_size resolved). A LoRA run's adapters are
  merged into the weights (W + alpha/r A B) unless `merge_adapters` is False."""
  manager = checkpointing.make_manager(workdir, config.train.keep_checkpoints)
  if manager.latest_step() is None or tokenizer_file(workdir) is None:
    raise FileNotFoundError(f'No checkpoint in {workdir}/checkpoints; train first with '
                            f'python main.py --config=CFG --workdir={workdir}.')
  dtype = config_checks.compute_dtype(config, jax.default_backend())
  cfg = kernels.for_inference(tasks.model_config(config, config.model.vocab_size, dtype))
  task = tasks.from_config(config, cfg)
  abstract, _ = state_lib.param_shardings(task, sharding.make_mesh(config.mesh),
                                          config.data.seq_len)
  params, _ = frozen.restore_params(config, manager, abstract)
  manager.close()
  if merge_adapters and cfg.lora_rank:
    params = jax.jit(lambda p: lora.merge(p, cfg.lora_alpha))(params)
  return task, params, load_tokenizer(workdir)
