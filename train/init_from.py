"""`config.init_from`: start a run from another workdir's parameters (fine-tuning).

The source is a workdir of this project (its latest checkpoint, or `DIR@STEP`), an
imported one included (`--mode=import` writes a workdir at step 0). Only its parameters
load: the optimizer, the step and the data iterator start fresh.

Two calls from train/loop.py, and only while the run's workdir has no checkpoint of
its own (a rerun resumes from its own checkpoints exactly as pre-training does, even if
the source has changed or gone since):

  prepare(config, workdir)  before the corpus loads. The model is the source's: its
      `model.*` fields that define the weights, `param_dtype` and `data.tokenizer.*`
      are taken into the run's config (logged; config.json saves them), so fine-tuning
      needs no re-typed model. The source's tokenizer files are copied into the workdir,
      since the embedding rows are the source tokenizer's ids.
  start_state(...)  the fresh step-0 state with the source's parameters merged in:
      parameters the run's model has and the source lacks (a new head) keep their fresh
      initialisation; parameters the source has and the run lacks (BERT's MLM head or
      next-sentence pooler when classifying) are dropped, named in one info log; a
      parameter whose shape differs fails with one line naming both sides.

Precedence of a model field: an explicit command-line override (--config.model.X=V)
> the source's value > the config file's. An override may change how the model trains
(dropout, remat, attention kernel, max_len where positions are not learned), not the
weights: one that would fails, naming the field and the source's value.
"""
import dataclasses
import os
import re
import shutil
import sys

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import traverse_util
from jax.experimental import multihost_utils

from input_pipeline.tokenizer import (CHAT_TEMPLATE_FILE, EXTRA_IDS_FILE, HF_CONFIG_FILES,
                                      HF_FILE, ORIGINALS_DIR, SENTENCEPIECE_FILE,
                                      tokenizer_file)
from models import lora
from models.config import DEFAULT_POSITION
from train import checkpointing, config_checks, run_config, sharding
from train import state as state_lib
from train.config_checks import ConfigError

# model.* fields that say how this run trains, not what the weights are: the run's own.
RUN_OWN_MODEL_FIELDS = ('dropout', 'remat', 'attention')
# A workdir's tokenizer: the files load_tokenizer reads (the first two name it); an
# imported one also keeps the checkpoint's originals in ORIGINALS_DIR, copied too.
_TOKENIZER_FILES = (SENTENCEPIECE_FILE, HF_FILE, EXTRA_IDS_FILE, *HF_CONFIG_FILES,
                    CHAT_TEMPLATE_FILE)
_LAYER = re.compile(r'(^|/)layers?(_\d+)?(/|$)')


@dataclasses.dataclass(frozen=True)
class Source:
  """A resolved init_from: the workdir and the checkpoint step its parameters come from."""
  directory: str
  step: int

  def __str__(self):
    return f'{self.directory} (step {self.step})'


def parse(spec: str) -> tuple[str, int | None]:
  """(directory, step or None for the latest) of 'DIR' or 'DIR@STEP'; ConfigError when
  the form is wrong. Reads nothing but whether `spec` itself is a directory."""
  if spec.startswith('hf:'):
    raise ConfigError(f"init_from='{spec}' must be a workdir; import the model first (python "
                      f'main.py --mode=import --from={spec} --workdir=DIR) and set '
                      'init_from=DIR.')
  directory, at, step = spec.rpartition('@')
  if not at or os.path.isdir(spec):  # a directory whose name holds '@' is still one
    return spec, None
  if not step.isdigit() or not directory:
    raise ConfigError(f"init_from='{spec}': write DIR or DIR@STEP with a whole-number step, "
                      "e.g. runs/pretrain@1000.")
  return directory, int(step)


def _steps(directory: str) -> list[int]:
  """The committed checkpoint steps of a workdir, oldest first."""
  path = os.path.join(directory, 'checkpoints')
  return sorted(ocp.step.checkpoint_steps(path)) if os.path.isdir(path) else []


def has_checkpoint(workdir: str) -> bool:
  return bool(_steps(workdir))


def source(spec: str) -> Source:
  """The source of init_from=`spec`, checked: a workdir with config.json and a tokenizer,
  and the checkpoint step asked for (or its latest). One-line ConfigError otherwise."""
  directory, step = parse(spec)
  if not os.path.isdir(directory):
    raise ConfigError(f"init_from='{spec}': {directory} is not a directory; give a run's "
                      'workdir, or import a checkpoint first (python main.py --mode=import '
                      '--from=HF_DIR --workdir=DIR).')
  for path, what in ((os.path.join(directory, 'config.json'), 'config.json'),
                     (tokenizer_file(directory), 'tokenizer')):
    if path is None or not os.path.exists(path):
      raise ConfigError(f"init_from='{spec}': {directory} has no {what}; is it a workdir of "
                        'this project (a run, or --mode=import)?')
  steps = _steps(directory)
  if not steps:
    raise ConfigError(f"init_from='{spec}': {directory}/checkpoints holds no checkpoint; "
                      'train that run first (or import one there).')
  if run_config.saved_config(directory, []).lora.rank:
    raise ConfigError(f"init_from='{spec}': {directory} is a LoRA run, whose checkpoints hold "
                      'its adapters only; merge them into a plain workdir first (python main.py '
                      f'--mode=merge --workdir={directory} --to=DIR) and set init_from=DIR.')
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise ConfigError(f"init_from='{spec}': {directory} has no checkpoint at step {step}; "
                      f"its steps are {', '.join(map(str, steps))}.")
  return Source(directory, step)


# --- the run's config ----------------------------------------------------------
def _explicit_fields(argv: list[str]) -> set[str]:
  """Dotted names of the fields given on the command line (--config.a.b=V, --config.a.b V,
  --noconfig.a.b)."""
  fields = set()
  for arg in argv:
    for prefix in ('--config.', '--noconfig.'):
      if arg.startswith(prefix):
        fields.add(arg[len(prefix):].split('=', 1)[0])
  return fields


def _weight_fields(reference: ml_collections.ConfigDict) -> dict[str, object]:
  """{dotted field: value} of what defines a model's weights in `reference`."""
  fields = {f'model.{k}': v for k, v in reference.model.items()
            if k not in RUN_OWN_MODEL_FIELDS}
  fields.update({f'data.tokenizer.{k}': v for k, v in reference.data.tokenizer.items()})
  fields['param_dtype'] = reference.param_dtype
  return fields


def _may_differ(field: str, reference: ml_collections.ConfigDict) -> bool:
  """Fields an override may change without changing the weights: the context length,
  unless positions are a learned table of max_len rows, and the precision the
  parameters are kept in (restoring casts)."""
  if field == 'model.max_len':
    m = reference.model
    return (DEFAULT_POSITION[m.arch] if m.position == 'auto' else m.position) != 'learned'
  return field == 'param_dtype'


def _node_and_leaf(config: ml_collections.ConfigDict, dotted: str):
  *parents, leaf = dotted.split('.')
  for name in parents:
    config = config[name]
  return config, leaf


def resolve_config(config: ml_collections.ConfigDict, reference: ml_collections.ConfigDict,
                   where: str, explicit: set[str] = frozenset()) -> list[str]:
  """Takes `reference`'s weight-defining fields (`_weight_fields`) into `config` in place,
  except those in `explicit` (given on the command line), which win where they keep the
  weights and otherwise raise ConfigError naming the field and both values. Returns
  'field=value (was ...)' for each field it changed. `where` names the reference."""
  changed = []
  for field, value in _weight_fields(reference).items():
    node, leaf = _node_and_leaf(config, field)
    if leaf not in node:  # a field this code no longer has: validate() names it if it matters
      continue
    current = node[leaf]
    if current == value:
      continue
    if field in explicit:
      if not _may_differ(field, reference):
        raise ConfigError(f'--config.{field}={current!r} differs from the model of init_from '
                          f"({field}={value!r} in {where}) and would change its weights; drop "
                          'the override (a fine-tuning run keeps its source\'s model) or train '
                          'from scratch without init_from.')
      continue
    node[leaf] = value
    changed.append(f'{field}={value!r} (was {current!r})')
  return changed


# lora.* fields that define what a LoRA run's checkpoints hold and mean.
LORA_WEIGHT_FIELDS = ('rank', 'alpha', 'targets', 'train_in_full')


def _keep_saved_lora(config: ml_collections.ConfigDict, saved: ml_collections.ConfigDict,
                     where: str, explicit: set[str]) -> None:
  """A resumed run keeps the adapters it saved: their rank, scale, layers and what
  trains in full come from its config.json; an explicit override that changes them fails."""
  for field in LORA_WEIGHT_FIELDS:
    value, current = saved.lora[field], config.lora[field]
    if value == current:
      continue
    if f'lora.{field}' in explicit:
      raise ConfigError(f'--config.lora.{field}={current!r} differs from lora.{field}={value!r} '
                        f'in {where}, which this run\'s checkpoints were trained with; drop the '
                        'override, or start a new --workdir.')
    config.lora[field] = value


def prepare(config: ml_collections.ConfigDict, workdir: str,
            argv: list[str] | None = None) -> Source | None:
  """Before the run's corpus loads: the model fields (and tokenizer) of init_from.

  Without a checkpoint in `workdir`: checks the source, takes its weight-defining fields
  into `config` (resolve_config), pins config.init_from to DIR@STEP (the step found) and
  copies its tokenizer into `workdir`. With one, the source is not read here: the fields
  and the pinned init_from come from workdir's own config.json (written by the run's
  first start), so the resumed run builds the same model (and a LoRA or DPO run reads
  its frozen parameters from the same step). `argv`: the
  command line whose --config.* overrides win (default sys.argv[1:]). Returns the
  source when the run will start from it, else None."""
  if not config.init_from:
    return None
  explicit = _explicit_fields(sys.argv[1:] if argv is None else argv)
  own = os.path.join(workdir, 'config.json')
  if has_checkpoint(workdir) and os.path.exists(own):
    saved = run_config.saved_config(workdir, [])
    resolve_config(config, saved, own, explicit)
    _keep_saved_lora(config, saved, own, explicit)
    same = parse(saved.get('init_from') or '')[0] == parse(config.init_from)[0]
    (logging.info if same else logging.warning)(
        'init_from=%s: %s has checkpoints of its own (started from init_from=%r), and the run '
        'resumes from them.', config.init_from, workdir, saved.get('init_from'))
    if saved.get('init_from'):  # the step it started from, which LoRA and DPO read again
      config.init_from = saved.init_from
    return None
  src = source(config.init_from)
  # Pinned: config.json saves the step, and the absolute path (sample, eval and a LoRA run's
  # restarts read it from anywhere).
  config.init_from = f'{os.path.abspath(src.directory)}@{src.step}'
  where = os.path.join(src.directory, 'config.json')
  changed = resolve_config(config, run_config.saved_config(src.directory, []), where, explicit)
  logging.info('init_from: the model of %s%s', where,
               f": took {', '.join(changed)}." if changed else ' (the config already matched).')
  config_checks.validate(config)  # before anything is written into workdir
  copy_tokenizer(src.directory, workdir)
  return src


# --- the tokenizer ---------------------------------------------------------------
def _tokenizer_bytes(directory: str) -> dict[str, bytes]:
  found = {}
  for name in _TOKENIZER_FILES:
    path = os.path.join(directory, name)
    if os.path.exists(path):
      with open(path, 'rb') as f:
        found[name] = f.read()
  return found


def copy_tokenizer(source_dir: str, workdir: str) -> None:
  """Copies source_dir's tokenizer into workdir; nothing happens when workdir already has
  the same one, and ConfigError when it has another (the model's vocabulary is the
  source's; nothing there is overwritten). With several processes, process 0 copies."""
  existing = tokenizer_file(workdir)
  differs = existing is not None and _tokenizer_bytes(workdir) != _tokenizer_bytes(source_dir)
  if jax.process_count() > 1:  # every process has looked before process 0 writes anything
    multihost_utils.sync_global_devices('init_from tokenizer checked')
  if differs:  # the same on every process
    raise ConfigError(f'{existing} differs from the tokenizer of init_from ({source_dir}), '
                      'whose ids the model was trained on; use a fresh --workdir (or move '
                      f'{existing} away).')
  if existing is None and jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    originals = os.path.join(source_dir, ORIGINALS_DIR)  # an import's files, for export
    names = ([os.path.join(ORIGINALS_DIR, n) for n in sorted(os.listdir(originals))]
             if os.path.isdir(originals) else [])
    # The file load_tokenizer looks for goes last: a killed copy leaves no tokenizer.
    names += sorted(_tokenizer_bytes(source_dir),
                    key=lambda n: n in (SENTENCEPIECE_FILE, HF_FILE))
    for name in names:
      _copy(os.path.join(source_dir, name), os.path.join(workdir, name))
    logging.info('init_from: copied the tokenizer of %s into %s.', source_dir, workdir)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('init_from tokenizer copied')


def _copy(src: str, dst: str) -> None:
  """An atomic copy; an existing `dst` must already hold the same bytes."""
  if os.path.exists(dst):
    with open(src, 'rb') as a, open(dst, 'rb') as b:
      if a.read() == b.read():
        return
    raise ConfigError(f'{dst} exists and differs from {src}, the tokenizer of init_from; use a '
                      'fresh --workdir (or move it away).')
  os.makedirs(os.path.dirname(dst), exist_ok=True)
  tmp = f'{dst}.tmp{os.getpid()}'
  shutil.copyfile(src, tmp)
  os.replace(tmp, dst)


# --- the parameters ----------------------------------------------------------------
def _without_layer_names(path: str) -> str:
  return _LAYER.sub(r'\1layers\3', path)


def match(run_shapes: dict[str, tuple], source_shapes: dict[str, tuple],
          where: str, required: bool = True) -> tuple[list[str], list[str], list[str]]:
  """(loaded, new, dropped) parameter paths ('a/b/kernel') of a run's model and a
  source's, by path. ConfigError (one line) when a shared path's shape differs, when
  the layers are laid out differently (scanned vs unrolled, or another unrolled depth:
  paths that differ only in their layer's name), or when nothing matches."""
  for path in sorted(run_shapes.keys() & source_shapes.keys()):
    if tuple(run_shapes[path]) != tuple(source_shapes[path]):
      raise ConfigError(
          f'init_from: parameter {path} has shape {tuple(source_shapes[path])} in {where} '
          f'but {tuple(run_shapes[path])} in this run; the run must build the source\'s model '
          '(the model.* fields of its config.json, its tokenizer): drop the overrides that '
          'change it, or train from scratch without init_from.')
  loaded = sorted(run_shapes.keys() & source_shapes.keys())
  new = sorted(run_shapes.keys() - source_shapes.keys())
  dropped = sorted(source_shapes.keys() - run_shapes.keys())
  in_run = {_without_layer_names(p): p for p in run_shapes}
  in_source = {_without_layer_names(p): p for p in source_shapes}
  for mine, theirs, paths in ((in_run, in_source, new), (in_source, in_run, dropped)):
    for path in paths:
      other = theirs.get(_without_layer_names(path))
      if other is not None:
        run_path, source_path = (path, other) if mine is in_run else (other, path)
        raise ConfigError(
            f'init_from: the layers of this run ({run_path}) and of {where} ({source_path}) '
            'differ in layout or depth; set model.scan_layers, model.num_layers and '
            'model.num_decoder_layers to the source\'s values.')
  if not loaded and required:
    raise ConfigError(f'init_from: no parameter of {where} is one of this run\'s model '
                      f"(the source has {', '.join(dropped[:3])}..., the run "
                      f"{', '.join(new[:3])}...); is it the same model.arch?")
  return loaded, new, dropped


def _merged(run_flat: dict, source_flat: dict):
  return traverse_util.unflatten_dict(
      {k: source_flat.get(k, v) for k, v in run_flat.items()}, sep='/')


def merge(run_params, source_params, where: str = 'the source'):
  """`run_params` with each leaf that `source_params` has at the same path replaced by
  the source's; leaves only the run has keep their values (fresh initialisation), leaves
  only the source has are dropped (one info log names them)."""
  run_flat = traverse_util.flatten_dict(run_params, sep='/')
  source_flat = traverse_util.flatten_dict(source_params, sep='/')
  _log_plan(where, *match({k: v.shape for k, v in run_flat.items()},
                          {k: v.shape for k, v in source_flat.items()}, where))
  return _merged(run_flat, source_flat)


def _log_plan(where: str, loaded: list[str], new: list[str], dropped: list[str]) -> None:
  logging.info('init_from: loading %d parameter arrays from %s.', len(loaded), where)
  if new:
    logging.info('init_from: %d parameter arrays the source lacks keep their fresh '
                 'initialisation: %s.', len(new), ', '.join(new))
  if dropped:
    logging.info('init_from: dropped %d parameter arrays of the source this run\'s model '
                 'lacks: %s.', len(dropped), ', '.join(dropped))


def source_shapes(src: Source) -> dict[str, tuple]:
  """{path: shape} of the parameters saved at the source's step, read from the checkpoint's
  metadata (nothing is built from the source's config)."""
  step_dir = ocp.step.standard_name_format().find_step(
      epath.Path(os.path.abspath(src.directory)) / 'checkpoints', src.step).path
  metadata = ocp.PyTreeCheckpointHandler().metadata(step_dir / 'state')
  tree = getattr(metadata, 'tree', metadata)['params']
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(tree, sep='/').items()}


def pinned_source(config: ml_collections.ConfigDict) -> Source:
  """The source of a run that reads it at every start (LoRA's frozen base, DPO's reference):
  config.init_from as the run's config.json saved it, DIR@STEP (prepare pins the step)."""
  directory, step = parse(config.init_from)
  if step is None or not os.path.isdir(directory):
    return source(config.init_from)  # checked, with its one-line errors
  if step not in _steps(directory):
    raise ConfigError(f'init_from={config.init_from}: this run reads its frozen parameters '
                      f'from that checkpoint at every start, and {directory} no longer has step '
                      f'{step}; restore it there (the run cannot go on without it).')
  return Source(directory, step)


def read_params(src: Source, abstract_params):
  """The source's parameters at the paths of `abstract_params` (ShapeDtypeStructs with
  shardings), read straight into those shardings and dtypes; nothing else is read."""
  manager = ocp.CheckpointManager(os.path.join(os.path.abspath(src.directory), 'checkpoints'),
                                  options=ocp.CheckpointManagerOptions(
                                      read_only=True, save_interval_steps=0, create=False))
  try:
    params, _ = checkpointing.restore_params(manager, abstract_params, src.step)
  finally:
    manager.close()
  return params


def start_state(src: Source, state, tx, state_shardings, mesh, frozen_paths=frozenset()):
  """The step-0 state of `state` (a fresh one: create_train_state) with src's parameters
  in place of its own where the source has them; optimizer moments (and a float16 run's
  loss scale) fresh, every array laid out by `state_shardings`. Only the parameters the
  run keeps are read from disk, straight into the run's shardings and dtypes.
  frozen_paths: a LoRA run's frozen base (train/frozen.py), which its state lacks and
  the run reads apart; its adapters are the new parameters, and may be all there is."""
  run_abstract = traverse_util.flatten_dict(
      jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                   state.params, state_shardings.params), sep='/')
  frozen = {'/'.join(path) for path in frozen_paths}
  shapes = {k: v for k, v in source_shapes(src).items() if k not in frozen}
  loaded, new, dropped = match({k: v.shape for k, v in run_abstract.items()}, shapes,
                               str(src), required=not frozen)
  _log_plan(str(src), loaded, [k for k in new if not lora.is_adapter(tuple(k.split('/')))],
            dropped)
  restored = read_params(
      src, traverse_util.unflatten_dict({k: run_abstract[k] for k in loaded}, sep='/')
  ) if loaded else {}
  params = _merged(traverse_util.flatten_dict(state.params, sep='/'),
                   traverse_util.flatten_dict(restored, sep='/'))
  with sharding.mesh_context(mesh):
    return jax.jit(lambda p, scale: state_lib.state_at_step_zero(p, tx, scale),
                   out_shardings=state_shardings)(params, getattr(state, 'loss_scale', None))
