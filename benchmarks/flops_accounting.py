"""Training FLOPs as this project counts them (train/flops.py, for MFU and --mode=estimate)
against XLA's cost analysis of the step's gradient, with and without a frozen LoRA base:
one JSON line per case.

python -m benchmarks.flops_accounting --json
python -m benchmarks.flops_accounting --cases=decoder/head/untied,encoder_decoder/q+v

A case is ARCH[/TARGETS[/untied]][@TASK]: LoRA's targets joined by '+' ('full': none).
Layers are unrolled: XLA's cost analysis counts a scanned loop's body once.
"""
import json

import jax
import jax.numpy as jnp
from absl import app, flags

from configs import default
from train import runtime

CASES = ('decoder', 'decoder/q+k+v+o+mlp_in+mlp_out', 'decoder/q+v+head/untied',
         'decoder/head/untied', 'decoder/mlp_out', 'encoder_decoder',
         'encoder_decoder/q+v', 'encoder_decoder/head/untied', 'encoder@masked_lm',
         'encoder/q+v@masked_lm')
_CASES = flags.DEFINE_list('cases', list(CASES), 'Cases: ARCH[/TARGETS[/untied]][@TASK].')
_D_MODEL = flags.DEFINE_integer('d_model', 128, 'Model width (head_dim 32, d_ff 4x).')
_SEQ_LEN = flags.DEFINE_integer('seq_len', 128, 'Tokens per sequence.')
_JSON = flags.DEFINE_bool('json', False, 'Print only the JSON lines.')


def case_config(case: str, d_model: int = 128, seq_len: int = 128):
  """A two-layer run's config for a case (module docstring); a masked LM case predicts next
  sentences too, and a LoRA case's source is never read."""
  case, _, task = case.partition('@')
  arch, *options = case.split('/')
  targets = options[0] if options else 'full'
  config = default.get_config()
  config.model.update(arch=arch, num_layers=2, num_heads=4, head_dim=32, d_model=d_model,
                      d_ff=4 * d_model, max_len=seq_len, vocab_size=1024, position='learned',
                      scan_layers=False, tie_embeddings='untied' not in options[1:])
  config.data.update(seq_len=seq_len, batch_size=2)
  if task:
    config.task = task
  if task == 'masked_lm':
    config.masked_lm.next_sentence, config.model.num_token_types = True, 2
  if targets != 'full':
    config.lora.update(rank=4, targets=targets.replace('+', ','))
    config.init_from = 'runs/never_read'
  return config


def step_flops(config) -> tuple[float, float]:
  """(ours, XLA's): FLOPs of one step's gradient over the trained part, as train/loop.py
  counts them and as XLA's cost analysis of the compiled gradient does."""
  from scaling import estimate
  from train import frozen as frozen_lib
  task = estimate.model_task(config, 'cpu')
  params = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), estimate.abstract_params(task))
  paths = estimate.frozen_paths(task, params, estimate.train_in_full(config))
  trainable, frozen = frozen_lib.split(params, paths)
  batch_size, seq_len = config.data.batch_size, config.data.seq_len
  batch = task.train_batch(batch_size, seq_len)

  def loss(trainable, frozen, batch):
    return task.loss(frozen_lib.combine(frozen, trainable), batch, None, False)[0]
  analysis = jax.jit(jax.grad(loss)).lower(trainable, frozen, batch).compile().cost_analysis()
  analysis = analysis[0] if isinstance(analysis, list) else analysis
  return task.train_flops_with_frozen(params, batch_size, seq_len, frozen), analysis['flops']


def main(argv):
  del argv
  for case in _CASES.value:
    ours, xla = step_flops(case_config(case, _D_MODEL.value, _SEQ_LEN.value))
    result = {'benchmark': 'flops_accounting', 'case': case, 'd_model': _D_MODEL.value,
              'seq_len': _SEQ_LEN.value, 'ours': ours, 'xla': xla, 'ours_over_xla': ours / xla}
    if not _JSON.value:
      print(f'{case:<40} ours / XLA {ours / xla:.3f}')
    print(json.dumps(result), flush=True)


if __name__ == '__main__':
  runtime.reexec_with_huge_pages()
  app.run(main)
