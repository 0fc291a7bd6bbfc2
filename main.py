"""Entry point: python main.py --config=configs/gpt_tiny.py --workdir=runs/gpt_tiny [--mode=...]

Parses flags and makes one call per mode; tests call the same functions. Each mode's
own flags live beside it (inference/cli.py, scaling/cli.py, interop/cli.py).
"""
import json
import sys

from absl import app, flags
from ml_collections import config_flags

from evals import cli as eval_cli
from inference import cli as sample_cli
from inference import predict as predict_cli
from interop import cli as interop_cli
from scaling import cli as scaling_cli
from train import runtime

flags.adopt_module_key_flags(sample_cli)  # `--help` lists every mode's flags
flags.adopt_module_key_flags(eval_cli)
flags.adopt_module_key_flags(predict_cli)
flags.adopt_module_key_flags(scaling_cli)
flags.adopt_module_key_flags(interop_cli)
_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file (configs/*.py); override fields with --config.a.b=VALUE.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory: config, checkpoints, metrics.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'sample', 'estimate', 'plan', 'sweep',
                                           'import', 'export', 'predict', 'merge'],
                            'What to do.')
_JSON = flags.DEFINE_bool('json', False, 'Print exactly one JSON line on stdout (logs on stderr).')
_SWEEP_RUN = flags.DEFINE_string('sweep_run', None, 'sweep: run only this member (a cluster job).')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'HOST:PORT of process 0, for runs over several processes.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in a multi-host run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process index in a multi-host run.')


def _sweep_command() -> str:
  """This very command (config file and --config.* overrides), for printed cluster jobs."""
  return ' '.join(['python main.py --mode=sweep',
                   f'--config={config_flags.get_config_filename(flags.FLAGS["config"])}',
                   f'--workdir={_WORKDIR.value}',
                   *[a for a in sys.argv[1:] if a.startswith('--config.')]])


def main(argv):
  del argv
  mode = _MODE.value
  runtime.quiet_library_info_logs()
  if mode in ('train', 'estimate', 'sweep') and _CONFIG.value is None:
    raise app.UsageError(f'--config is required for --mode={mode}, e.g. '
                         '--config=configs/gpt_tiny.py')
  if mode == 'plan':  # plan and estimate run alone, on one process
    return scaling_cli.plan(_JSON.value)
  if mode == 'estimate':
    return scaling_cli.estimate(_CONFIG.value, _JSON.value)
  runtime.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if not _WORKDIR.value:
    raise app.UsageError('--workdir is required.')
  runtime.use_compilation_cache(_WORKDIR.value)
  from train import loop, run_config  # after distributed init: importing is cheap, using is not
  if mode == 'train':
    loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  elif mode == 'sweep':
    from scaling import sweep
    sweep.run_sweep(_CONFIG.value, _WORKDIR.value, _SWEEP_RUN.value, _sweep_command())
  elif mode == 'sample':
    sample_cli.sample(run_config.saved_config(_WORKDIR.value, sys.argv[1:]), _WORKDIR.value)
  elif mode == 'predict':
    predict_cli.predict(run_config.saved_config(_WORKDIR.value, sys.argv[1:]), _WORKDIR.value)
  elif mode == 'eval':
    config = run_config.saved_config(_WORKDIR.value, sys.argv[1:])
    if eval_cli.requested():  # zero/few-shot tasks; else validation loss and bits per byte
      results = eval_cli.evaluate_tasks(config, _WORKDIR.value)
    else:
      results = loop.evaluate(config, _WORKDIR.value)
    print(json.dumps(results) if _JSON.value else results, flush=True)
  elif mode == 'import':
    interop_cli.import_from_flags(_WORKDIR.value, sys.argv[1:], _JSON.value)
  elif mode == 'export':
    interop_cli.export_from_flags(_WORKDIR.value, sys.argv[1:])
  elif mode == 'merge':
    if not flags.FLAGS.to:
      raise app.UsageError('--to is required for --mode=merge: the new workdir to write.')
    from inference.merge import merge_workdir
    result = merge_workdir(run_config.saved_config(_WORKDIR.value, sys.argv[1:]),
                           _WORKDIR.value, flags.FLAGS.to)
    print(json.dumps(result) if _JSON.value else
          f"Merged the adapters of {result['workdir']} into {result['out']} "
          f"({result['params']:,} parameters).", flush=True)


if __name__ == '__main__':
  runtime.reexec_with_huge_pages()  # first: JAX is not loaded yet (the modes import it)
  app.run(main)
