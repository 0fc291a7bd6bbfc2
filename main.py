"""Entry point: python main.py --config=configs/gpt_tiny.py --workdir=runs/gpt_tiny [--mode=...]

Parses flags and calls one function of `train.loop`; tests call the same functions.
"""
import json
import logging as std_logging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file (configs/*.py); override fields with --config.a.b=VALUE.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory: config, checkpoints, metrics.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'sample', 'estimate', 'plan', 'sweep'],
                          'What to do.')
_JSON = flags.DEFINE_bool('json', False, 'Print exactly one JSON line on stdout (logs on stderr).')
_COMPILE = flags.DEFINE_bool('compile', True, 'estimate: also compile the train step on one '
                             "device and show XLA's memory analysis beside the estimate.")
_FLOPS = flags.DEFINE_float('flops', None, 'plan: the training compute budget in FLOPs, e.g. 1e18.')
_LAW = flags.DEFINE_enum('law', 'rule', ['rule', 'chinchilla', 'besiroglu'],
                         'plan: D = 20 N (rule), or the minimum of a fitted L(N, D).')
_TOKENS_PER_PARAM = flags.DEFINE_float('tokens_per_param', 20.0, 'plan: D / N for --law=rule.')
_VOCAB = flags.DEFINE_integer('vocab_size', 32_000, 'plan: vocabulary of the proposed shape.')
_SWEEP_RUN = flags.DEFINE_string('sweep_run', None, 'sweep: run only this member (a cluster job).')
_PROMPT = flags.DEFINE_string('prompt', None, 'sample: the text to continue.')
_PROMPT_FILE = flags.DEFINE_string('prompt_file', None, 'sample: one prompt per line, batched.')
_MAX_NEW_TOKENS = flags.DEFINE_integer('max_new_tokens', 100, 'sample: tokens to generate.')
_TEMPERATURE = flags.DEFINE_float('temperature', 1.0, 'sample: softmax temperature; 0 is greedy.')
_TOP_K = flags.DEFINE_integer('top_k', 0, 'sample: keep the k most likely tokens (0: all).')
_TOP_P = flags.DEFINE_float('top_p', 1.0, 'sample: keep the smallest set with this mass.')
_REPETITION_PENALTY = flags.DEFINE_float('repetition_penalty', 1.0,
                                         'sample: >1 discourages repeating seen tokens.')
_STOP = flags.DEFINE_multi_string('stop', [], 'sample: cut each completion at this string.')
_SEED = flags.DEFINE_integer('seed', 0, 'sample: random seed.')
_BEAM_SIZE = flags.DEFINE_integer('beam_size', 0, 'sample: beam search with this many beams '
                                  '(0: sampling / greedy as the other flags say).')
_LENGTH_PENALTY = flags.DEFINE_float('length_penalty', 0.6, 'sample: GNMT length penalty of '
                                     'beam search (0: raw log-probabilities).')
_QUANTIZE = flags.DEFINE_enum('quantize', 'none', ['none', 'int8'],
                              'sample: int8 weight-only quantization (per-channel scales).')
_DTYPE = flags.DEFINE_enum('dtype', None, ['float32', 'bfloat16'],
                           'sample: compute dtype and weight storage (default: the run\'s).')
_GREEDY = flags.DEFINE_bool('greedy', False, 'sample: always take the most likely token.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'HOST:PORT of process 0, for runs over several processes.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in a multi-host run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process index in a multi-host run.')


def _quiet_library_info_logs() -> None:
  """Keeps the console to this project's progress lines: libraries' INFO chatter
  (Orbax logs dozens of lines per checkpoint) is dropped; their warnings stay."""
  def keep(record):
    return record.levelno >= std_logging.WARNING or not any(
        name in record.pathname for name in ('orbax', 'jax/_src', 'grain', 'absl/'))
  logging.get_absl_handler().addFilter(keep)


def _sample(config, workdir: str) -> None:
  """Prints each prompt's completion; streams tokens when there is one prompt."""
  import jax
  from inference.generate import generate
  from inference.load import load_run
  from inference.sampling import Sampling
  if _PROMPT_FILE.value:
    with open(_PROMPT_FILE.value) as f:
      prompts = [line.rstrip('\n') for line in f if line.strip()]
  else:
    prompts = [_PROMPT.value or '']
  sampling = Sampling(temperature=0.0 if _GREEDY.value else _TEMPERATURE.value,
                      top_k=_TOP_K.value, top_p=_TOP_P.value,
                      repetition_penalty=_REPETITION_PENALTY.value)
  sampling.check()
  if _DTYPE.value:
    config.dtype = _DTYPE.value
  cfg, params, tokenizer = load_run(config, workdir)
  if cfg.arch == 'encoder':  # BERT: fill the prompt's [MASK]s
    from inference.fill_mask import fill_masks
    from models import build_objective
    for text in fill_masks(build_objective(cfg), params, tokenizer, prompts, cfg.max_len):
      print(text, flush=True)
    return
  if _DTYPE.value == 'bfloat16':
    params = jax.tree.map(lambda x: x.astype(jax.numpy.bfloat16), params)
  streamed = []

  def stream(tokens):
    streamed.append(int(tokens[0]))
    text = tokenizer.decode(streamed)
    print(text[len(tokenizer.decode(streamed[:-1])):], end='', flush=True)

  spans = cfg.arch == 'encoder_decoder'  # T5: the decoder writes a span for each [MASK]
  one = (len(prompts) == 1 and sys.stdout.isatty() and not _STOP.value and not spans
         and not _BEAM_SIZE.value)  # beams are only known at the end
  if one:
    print(prompts[0], end='', flush=True)
  if spans:
    from inference.fill_mask import fill_spans, span_prompt
    prompt_ids = [span_prompt(tokenizer, p) for p in prompts]
  else:
    prompt_ids = [tokenizer.encode(p) for p in prompts]
  if _BEAM_SIZE.value:
    from inference.beam import beam_search
    completions = beam_search(cfg, params, prompt_ids, _MAX_NEW_TOKENS.value, _BEAM_SIZE.value,
                              _LENGTH_PENALTY.value, quantize=_QUANTIZE.value)
  else:
    completions = generate(cfg, params, prompt_ids, _MAX_NEW_TOKENS.value, sampling, _SEED.value,
                           on_token=stream if one else None, quantize=_QUANTIZE.value)
  if one:
    print()
    return
  for prompt, context, ids in zip(prompts, prompt_ids, completions):
    if spans:
      print(fill_spans(tokenizer, context, ids), flush=True)
      continue
    text = tokenizer.decode(ids)
    for stop in _STOP.value:
      text = text.split(stop)[0]
    print(prompt + text, flush=True)


def _estimate(config) -> None:
  """Parameters, FLOPs, compute and memory of a config; XLA's figure beside it."""
  from scaling import estimate
  result = estimate.estimate(config)
  if _COMPILE.value:
    result['compiled'] = estimate.compiled_memory(config)
  print(json.dumps(result) if _JSON.value else estimate.report(result), flush=True)


def _plan() -> None:
  """Compute-optimal parameters and tokens for --flops."""
  from scaling import planner
  if _FLOPS.value is None:
    raise app.UsageError('--flops is required for --mode=plan, e.g. --flops=1e18.')
  result = planner.plan(_FLOPS.value, _LAW.value, _TOKENS_PER_PARAM.value, _VOCAB.value)
  if _JSON.value:
    print(json.dumps(result), flush=True)
    return
  shape = result['shape']
  loss = f", predicted loss {result['predicted_loss']:.3f}" if 'predicted_loss' in result else ''
  print(f"{result['flops']:.3g} FLOPs ({result['pf_days']:.3g} PF-days), law={result['law']}: "
        f"{result['params']:.3g} parameters on {result['tokens']:.3g} tokens "
        f"({result['tokens_per_param']:.1f} tokens/parameter){loss}\n"
        f"a shape of that size: num_layers={shape['num_layers']} d_model={shape['d_model']} "
        f"num_heads={shape['num_heads']} d_ff={shape['d_ff']} ({shape['params']:.3g} parameters "
        f"with a {_VOCAB.value}-token vocabulary)", flush=True)


def _multi_host_environment() -> bool:
  """A TPU VM pod slice (several workers) or a SLURM job of several tasks, where
  jax.distributed.initialize() finds the coordinator and process ids by itself."""
  tpu_workers = os.environ.get('TPU_WORKER_HOSTNAMES', '')
  return (',' in tpu_workers or 'MEGASCALE_COORDINATOR_ADDRESS' in os.environ
          or int(os.environ.get('SLURM_STEP_NUM_TASKS', '1')) > 1)  # inside `srun`, not sbatch


def _initialize_distributed() -> None:
  """JAX's multi-controller runtime: one process per host, all running this command."""
  explicit = _COORDINATOR.value or _NUM_PROCESSES.value
  if not explicit and not _multi_host_environment():
    return
  import jax
  try:  # CPU processes (tests, simulated hosts) exchange collectives through gloo
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  except AttributeError:  # a JAX without the option (gloo is then its default)
    pass
  if explicit:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  else:
    jax.distributed.initialize()
  logging.info('Process %d of %d; %d local and %d global devices.', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def _use_compilation_cache(workdir: str) -> None:
  """Compiled programs persist beside the workdir, so a resumed run or the next run of
  a sweep skips compilation."""
  import jax
  parent = (os.path.expanduser('~/.cache') if '://' in workdir  # a bucket: cache locally
            else os.path.dirname(os.path.abspath(workdir.rstrip('/'))))
  jax.config.update('jax_compilation_cache_dir', os.path.join(parent, 'jax_cache'))


def main(argv):
  del argv
  _quiet_library_info_logs()
  if _MODE.value not in ('plan', 'estimate'):  # those run alone, on one process
    _initialize_distributed()
  from train import loop, run_config  # after distributed init: importing jax-heavy modules is cheap, using them is not
  if _MODE.value in ('train', 'estimate', 'sweep') and _CONFIG.value is None:
    raise app.UsageError(f'--config is required for --mode={_MODE.value}, e.g. '
                         '--config=configs/gpt_tiny.py')
  if _MODE.value == 'estimate':
    _estimate(_CONFIG.value)
    return
  if _MODE.value == 'plan':
    _plan()
    return
  if not _WORKDIR.value:
    raise app.UsageError('--workdir is required.')
  _use_compilation_cache(_WORKDIR.value)
  if _MODE.value == 'train':
    loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  elif _MODE.value == 'sweep':
    from scaling import sweep
    # This very command (config file and --config.* overrides), for printed cluster jobs.
    command = ' '.join(['python main.py --mode=sweep',
                        f'--config={config_flags.get_config_filename(flags.FLAGS["config"])}',
                        f'--workdir={_WORKDIR.value}',
                        *[a for a in sys.argv[1:] if a.startswith('--config.')]])
    sweep.run_sweep(_CONFIG.value, _WORKDIR.value, _SWEEP_RUN.value, command)
  elif _MODE.value == 'sample':
    _sample(run_config.saved_config(_WORKDIR.value, sys.argv[1:]), _WORKDIR.value)
  elif _MODE.value == 'eval':
    config = run_config.saved_config(_WORKDIR.value, sys.argv[1:])
    results = loop.evaluate(config, _WORKDIR.value)
    print(json.dumps(results) if _JSON.value else results, flush=True)


if __name__ == '__main__':
  app.run(main)
