"""A run's own config: the workdir's config.json, with command-line overrides on top.

`eval`, `sample` and the benchmarks that read a trained run use it, so they see the
run exactly as it was trained (vocabulary size resolved) unless told otherwise.
"""
import json
import os

import ml_collections

from configs import default


def _config_overrides(argv: list[str]) -> list[tuple[str, str]]:
  """(field, value) pairs of --config.a.b=VALUE arguments, in order."""
  pairs = []
  for arg in argv:
    if arg.startswith('--config.') and '=' in arg:
      field, value = arg[len('--config.'):].split('=', 1)
      pairs.append((field, value))
  return pairs


def _parse_like(value: str, current):
  """Parses a command-line string to the type of the field it overrides."""
  if isinstance(current, bool):
    if value.lower() not in ('true', 'false', '1', '0'):
      raise ValueError(f'Expected true or false, got {value!r}.')
    return value.lower() in ('true', '1')
  return type(current)(value) if current is not None else value


def saved_config(workdir: str, argv: list[str]):
  """The run's own config.json, with this command's --config.a.b=VALUE overrides on top."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise ValueError(f'{path} does not exist; train a run in --workdir={workdir} first.')
  config = default.get_config()  # fields added since the run was trained keep their defaults
  with open(path) as f:
    saved = json.load(f)
  if 'objective' in saved:  # the field's name before `task`
    saved['task'] = saved.pop('objective')
  old_mlp = saved.get('model', {}).pop('mlp', None)  # before model.activation and gated_mlp
  if old_mlp is not None:
    saved['model'].update(activation='silu' if old_mlp == 'swiglu' else 'gelu_tanh',
                          gated_mlp=old_mlp == 'swiglu')
  config.update(saved)
  return apply_overrides(config, argv)


def apply_overrides(config: ml_collections.ConfigDict, argv: list[str]):
  """`config` with argv's --config.a.b=VALUE arguments applied, each parsed to its field's
  type; an unknown field or a bad value raises ValueError naming it."""
  for field, value in _config_overrides(argv):
    *parents, leaf = field.split('.')
    node = config
    for name in parents:
      node = node[name] if name in node else None
      if not isinstance(node, ml_collections.ConfigDict):
        raise ValueError(f'--config.{field}: no such config field.')
    if leaf not in node:
      raise ValueError(f'--config.{field}: no such config field.')
    if isinstance(node[leaf], ml_collections.ConfigDict):
      raise ValueError(f'--config.{field} is a group of fields, not a field; override one of '
                       f'them, e.g. --config.{field}.{next(iter(node[leaf].keys()))}=VALUE.')
    try:
      node[leaf] = _parse_like(value, node[leaf])
    except (TypeError, ValueError) as e:
      raise ValueError(f'--config.{field}={value!r} is not a valid '
                       f'{type(node[leaf]).__name__}: {e}') from None
  return config
