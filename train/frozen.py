"""Parameters a run holds but does not train: LoRA's frozen base and DPO's reference model.

A LoRA run (config.lora.rank > 0) trains its adapters (models/lora.py), the parameters
its init_from source lacks (a new classifier head) and those config.lora.train_in_full
names (e.g. 'embedding': tokens the source never saw, such as chat markers); every other
parameter stays as the source saved it. The TrainState holds the trainable part only, so the optimizer's
moments, the gradients and the checkpoints cover the adapters alone; the frozen part is
read from the source at every start (config.json pins the source's step) and joins the
trainable part inside each step (`combine`), so no copy of it is made.

A task that `uses_reference` (DPO) compares the model with its init_from source as it
was: with LoRA that is the frozen base itself (the model without its adapters, no second
copy); without, a frozen copy of the source's parameters.
"""
from typing import Any

import flax.struct
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from flax import traverse_util

from models import lora
from train import checkpointing, init_from
from train.config_checks import ConfigError


@flax.struct.dataclass
class Frozen:
  params: Any  # the frozen part of the model's parameters ({}: every parameter trains)
  reference: Any = None  # the reference model's parameters (None: the task has none)


def combine(frozen_params, trainable):
  """The model's whole parameter tree: the frozen part and the trainable part side by side."""
  if not frozen_params:
    return trainable
  flat = traverse_util.flatten_dict(frozen_params)
  flat.update(traverse_util.flatten_dict(trainable))
  return traverse_util.unflatten_dict(flat)


def split(params, frozen_paths: frozenset):
  """(trainable, frozen) parts of a parameter tree; `frozen_paths` are tuples of names."""
  if not frozen_paths:
    return params, {}
  flat = traverse_util.flatten_dict(params)
  trainable = {p: v for p, v in flat.items() if p not in frozen_paths}
  frozen = {p: v for p, v in flat.items() if p in frozen_paths}
  return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def trainable_part(frozen_paths: frozenset):
  """params -> their trainable part (what the TrainState holds)."""
  return lambda params: split(params, frozen_paths)[0]


def frozen_paths(config: ml_collections.ConfigDict, abstract_params) -> frozenset:
  """The parameters a LoRA run freezes: every one its source has (adapters never are).
  Empty without LoRA. Reads the source checkpoint's metadata only."""
  if not config.lora.rank:
    return frozenset()
  in_source = init_from.source_shapes(init_from.pinned_source(config))
  names = ['/'.join(path) for path in traverse_util.flatten_dict(abstract_params)]
  in_full = lora.parse_targets(config.lora.train_in_full)  # parts of names, as 'embedding'
  check_train_in_full(in_full, names)
  return frozenset(tuple(name.split('/')) for name in names
                   if name in in_source and not lora.is_adapter(tuple(name.split('/')))
                   and not any(names_part(name, part) for part in in_full))


def check_train_in_full(in_full: tuple[str, ...], names: list[str]) -> None:
  """Raises ConfigError if a part of lora.train_in_full is part of none of the parameter
  names `names` ('a/b/c')."""
  for part in in_full:
    if not any(names_part(name, part) for name in names):
      raise ConfigError(f"lora.train_in_full names '{part}', which is part of no parameter's "
                        f"name (they are like {names[0]}); name parts of the parameters to "
                        'train in full, e.g. embedding.')


def names_part(name: str, part: str) -> bool:
  """Whether `part` ('embedding', 'token_embed', 'mlp/down') is whole components of the
  parameter's name 'a/b/c'."""
  return f'/{part.strip("/")}/' in f'/{name}/'


def _subtree(tree, paths):
  flat = traverse_util.flatten_dict(tree)
  return traverse_util.unflatten_dict({p: flat[p] for p in paths})


def shardings_of(task, param_shardings, paths: frozenset) -> Frozen | None:
  """The shardings of what `load` returns (None where it returns None)."""
  if not paths and not task.uses_reference:
    return None
  frozen = split(param_shardings, paths)[1]
  reference = None
  if task.uses_reference:  # LoRA's reference: the model without its adapters
    reference = lora.base(param_shardings) if paths else param_shardings
  return Frozen(frozen, reference)


def load(config: ml_collections.ConfigDict, task, abstract_params,
         paths: frozenset) -> Frozen | None:
  """The run's frozen parameters, read from its init_from source straight into the
  shardings and dtypes of `abstract_params` (the whole model's, ShapeDtypeStructs with
  shardings); None when the run has none (every parameter trains, no reference)."""
  if not paths and not task.uses_reference:
    return None
  src = init_from.pinned_source(config)
  sharded = abstract_params
  in_source = init_from.source_shapes(src)
  if paths:  # LoRA: the base
    params = init_from.read_params(src, _subtree(sharded, paths))
    logging.info('LoRA: %d parameter arrays of %s stay frozen; %s adapter parameters train.',
                 len(paths), src, f'{lora.count(abstract_params):,}')
    if not task.uses_reference:
      return Frozen(params)
    # The reference is the base as the source saved it: the frozen part, and the source's
    # values of what trains in full beside the adapters (read once more, those only).
    trained = [p for p in traverse_util.flatten_dict(sharded)
               if p not in paths and not lora.is_adapter(p) and '/'.join(p) in in_source]
    return Frozen(params, combine(params, init_from.read_params(src, _subtree(sharded, trained)))
                  if trained else params)
  flat = traverse_util.flatten_dict(sharded, sep='/')
  missing = sorted(set(flat) - set(in_source))
  if missing:
    raise ConfigError(
        f"task '{task.name}' compares with its init_from model, but {src} lacks "
        f"{', '.join(missing[:3])}; start from a checkpoint of the same model.")
  logging.info('The reference model: the parameters of %s, frozen.', src)
  return Frozen({}, init_from.read_params(src, sharded))


def restore_params(config: ml_collections.ConfigDict, manager: ocp.CheckpointManager,
                   abstract_params, step: int | None = None):
  """(whole parameter tree, step) of a checkpoint of the run, or (None, None): a LoRA
  run's checkpoints hold its trainable part, and the frozen base comes from its source."""
  paths = frozen_paths(config, abstract_params)
  trainable_abstract = split(abstract_params, paths)[0]
  params, step = checkpointing.restore_params(manager, trainable_abstract, step)
  if params is None or not paths:
    return params, step
  return combine(init_from.read_params(init_from.pinned_source(config),
                                       _subtree(abstract_params, paths)), params), step
