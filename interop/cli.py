"""`--mode=import` and `--mode=export`: Hugging Face checkpoints in and out.

Import writes a workdir like a run's at step 0 (config.json, an Orbax TrainState with
fresh optimizer moments, the tokenizer), so sample, eval and training read it as any
other; `--config.*` overrides (e.g. --config.model.scan_layers=false) apply on top of
the mapped config. Export writes config.json, model.safetensors (float32) and the
tokenizer, which `transformers`' from_pretrained loads.
"""
import json
import os

from absl import app, flags, logging

from interop import InteropError

_FROM = flags.DEFINE_string('from', None, 'import: a Hugging Face checkpoint directory '
                            '(config.json and safetensors or pytorch_model.bin), or hf:NAME '
                            'from the hub.')
_TO = flags.DEFINE_string('to', None, 'export: a new or empty directory for config.json, '
                          'model.safetensors and the tokenizer; merge: a new workdir.')

HUB_PREFIX = 'hf:'
# What import reads from a hub repository: configs, weights, tokenizer files.
_HUB_PATTERNS = ['*.json', '*.safetensors', '*.model', '*.txt']


def import_from_flags(workdir: str, argv: list[str], as_json: bool) -> None:
  """`--mode=import`: prints one line (JSON with --json)."""
  if not _FROM.value:
    raise app.UsageError('--from is required for --mode=import, e.g. --from=hf:gpt2 or '
                         '--from=DIR (a directory saved by save_pretrained).')
  result = import_checkpoint(_FROM.value, workdir, argv)
  print(json.dumps(result) if as_json else
        f"Imported {result['architecture']} ({result['params']:,} parameters) into "
        f"{result['workdir']} at step 0.", flush=True)


def export_from_flags(workdir: str, argv: list[str]) -> None:
  """`--mode=export`."""
  if not _TO.value:
    raise app.UsageError('--to is required for --mode=export, e.g. --to=exported/.')
  result = export_checkpoint(workdir, _TO.value, argv)
  print(f"Exported {result['architecture']} to {result['out']}.", flush=True)


# --- import -----------------------------------------------------------------------
def resolve_source(source: str) -> str:
  """The local directory of `source`: itself, or hf:NAME's snapshot in the hub cache
  (downloaded when missing; pytorch_model.bin only where there are no safetensors)."""
  if not source.startswith(HUB_PREFIX):
    if not os.path.isfile(os.path.join(source, 'config.json')):
      raise InteropError(f'--from={source} has no config.json; give a directory written by '
                         f'save_pretrained, or {HUB_PREFIX}NAME for a hub model.')
    return source
  name = source[len(HUB_PREFIX):]
  try:
    from huggingface_hub import snapshot_download
  except ImportError:
    raise InteropError(f'--from={source} needs huggingface_hub: pip install huggingface_hub '
                       '(or download the model and pass --from=DIR).') from None
  try:
    directory = snapshot_download(name, allow_patterns=_HUB_PATTERNS)
    if not any(f.endswith('.safetensors') for f in os.listdir(directory)):
      directory = snapshot_download(name, allow_patterns=_HUB_PATTERNS + ['pytorch_model*.bin'])
  except Exception as e:  # noqa: BLE001 -- offline, unknown name, gated model: one message
    reason = (str(e).strip().splitlines() or [''])[0][:300]
    raise InteropError(f'Could not get {name} from the Hugging Face hub ({type(e).__name__}: '
                       f'{reason}); check the name and the network, or download it elsewhere '
                       f'(hf download {name} --local-dir DIR) and pass '
                       '--from=DIR.') from None
  return directory


def _check_fresh_workdir(workdir: str) -> None:
  for name in ('config.json', 'checkpoints'):
    if os.path.exists(os.path.join(workdir, name)):
      raise InteropError(f'{workdir} already has {name}; import into a new --workdir (nothing '
                         'there is overwritten).')


def import_checkpoint(source: str, workdir: str, argv: list[str] = ()) -> dict:
  """Imports `source` (a directory or hf:NAME) into a new workdir at step 0; returns
  what --json prints."""
  from input_pipeline import tokenizer as tokenizer_lib
  from interop import hf_config, weights
  from train import config_checks, run_config
  _check_fresh_workdir(workdir)
  directory = resolve_source(source)
  with open(os.path.join(directory, 'config.json')) as f:
    hf = json.load(f)
  architecture, family = hf_config.family_of(hf, directory)
  tensors = weights.normalized(weights.read_tensors(directory), family.BASE_PREFIX,
                               family.HEADS)
  fields = family.model_fields(hf, tensors, architecture)
  config = run_config.apply_overrides(hf_config.run_config(fields), list(argv))
  cfg = hf_config.model_config(config)
  hf_config.check_model(cfg, fields)
  params = weights.to_params(family.layout(cfg), tensors, cfg.scan_layers, directory)
  del tensors
  os.makedirs(workdir, exist_ok=True)
  tokenizer = tokenizer_lib.import_tokenizer(directory, workdir)
  if tokenizer.vocab_size > cfg.vocab_size:
    raise InteropError(f'The tokenizer of {source} has {tokenizer.vocab_size} ids but the model '
                       f'only {cfg.vocab_size} embedding rows; is it the tokenizer of this model?')
  config.data.tokenizer.vocab_size = tokenizer.vocab_size
  config_checks.validate(config)
  from train import state as state_lib
  try:
    count = state_lib.save_step_zero(config, cfg, params, workdir)
  except ValueError as e:  # the family's layout and the model disagree: a bug here
    raise InteropError(f'interop/families lays out {e}') from None
  with open(os.path.join(workdir, 'config.json'), 'w') as f:  # last: the workdir is complete
    f.write(config.to_json(indent=2))
  logging.info('Imported %s from %s into %s.', architecture, source, workdir)
  return {'architecture': architecture, 'arch': cfg.arch, 'params': count,
          'workdir': workdir, 'source': source, 'vocab_size': cfg.vocab_size,
          'tokenizer_vocab_size': tokenizer.vocab_size, 'scan_layers': cfg.scan_layers,
          'step': 0}


# --- export -----------------------------------------------------------------------
def export_checkpoint(workdir: str, out: str, argv: list[str] = ()) -> dict:
  """Writes the latest checkpoint of `workdir` into `out` (new or empty) in the layout
  `transformers` loads; returns {'architecture', 'out', 'files'}."""
  import jax

  from input_pipeline import tokenizer as tokenizer_lib
  from inference.load import load_run
  from interop import hf_config, weights
  from train import run_config
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise InteropError(f'--to={out} exists and is not an empty directory; export into a new '
                       'one (nothing there is overwritten).')
  config = run_config.saved_config(workdir, list(argv))
  cfg = hf_config.model_config(config)
  architecture, family = hf_config.export_family(cfg)
  _, params, tokenizer = load_run(config, workdir)
  tensors = weights.to_hf(family.layout(cfg), jax.device_get(params), cfg.scan_layers)
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, 'config.json'), 'w') as f:
    json.dump(hf_config.hf_config(cfg, architecture, family, tokenizer.special), f, indent=2)
  weights.write_safetensors(os.path.join(out, weights.SAFETENSORS), tensors)
  files = ['config.json', weights.SAFETENSORS] + [
      os.path.basename(p) for p in tokenizer_lib.export_tokenizer(workdir, out)]
  logging.info('Exported %s from %s to %s.', architecture, workdir, out)
  return {'architecture': architecture, 'out': out, 'files': files}
