"""Int8 weight-only quantization of a trained run: weight memory and validation loss
before and after, as one JSON line.

python -m benchmarks.quantize --workdir=runs/gpt_tiny --json
"""
import json

import jax
from absl import app, flags

from train import runtime

_WORKDIR = flags.DEFINE_string('workdir', None, 'A trained run.', required=True)
_JSON = flags.DEFINE_bool('json', False, 'Print only the JSON line.')


def main(argv):
  from inference.quantize import dequantize, quantize_int8, weight_bytes
  from train import checkpointing, loop, run_config
  config = run_config.saved_config(_WORKDIR.value, argv[1:])
  if config.lora.rank:
    raise app.UsageError(f'{_WORKDIR.value} is a LoRA run; merge it first (python main.py '
                         '--mode=merge --workdir=DIR --to=OUT) and benchmark OUT.')
  run = loop.Run(config, _WORKDIR.value)
  manager = checkpointing.make_manager(_WORKDIR.value, config.train.keep_checkpoints)
  params, step = checkpointing.restore_params(manager, run.abstract_params)
  manager.close()
  if params is None:
    raise app.UsageError(f'No checkpoint in {_WORKDIR.value}; train first.')
  quantized = quantize_int8(params)
  before = run.evaluate(params)
  after = run.evaluate(jax.jit(dequantize)(quantized))
  result = {'benchmark': 'quantize', 'workdir': _WORKDIR.value, 'step': step,
            'float32_weight_bytes': weight_bytes(params),
            'int8_weight_bytes': weight_bytes(quantized),
            'eval_loss_float32': before['eval_loss'], 'eval_loss_int8': after['eval_loss'],
            'eval_bits_per_byte_float32': before['eval_bits_per_byte'],
            'eval_bits_per_byte_int8': after['eval_bits_per_byte']}
  print(json.dumps(result), flush=True)


if __name__ == '__main__':
  runtime.reexec_with_huge_pages()
  app.run(main)
