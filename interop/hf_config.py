"""Hugging Face config.json <-> this project's run config, by architecture.

Import: config.json's `architectures` picks a family (interop/families/), which maps
its fields to ModelConfig fields; the run config is configs/default.py with those set
(the run config's model.* fields carry ModelConfig's names). Export: the first family
whose architecture holds every option of the model writes config.json.
"""
import jax.numpy as jnp
import ml_collections

import tasks
from configs import default
from interop import InteropError
from interop.families import bert, gpt2, llama, needs_problems, t5
from models.config import ModelConfig

FAMILIES = (gpt2, llama, bert, t5)  # export tries them in this order
BY_ARCHITECTURE = {name: family for family in FAMILIES for name in family.ARCHITECTURES}
# Model fields the run config sets elsewhere (masked_lm.next_sentence), or not at all.
_NOT_MODEL_FIELDS = ('nsp_head',)
MAX_SEQ_LEN = 512  # data.seq_len of an imported run: its context, up to this


def family_of(hf: dict, source: str):
  """(architecture, family module) of a config.json."""
  names = hf.get('architectures') or []
  if len(names) != 1 or names[0] not in BY_ARCHITECTURE:
    raise InteropError(f"{source}/config.json has architectures {names or 'unset'}; import "
                       f"supports {', '.join(BY_ARCHITECTURE)}.")
  return names[0], BY_ARCHITECTURE[names[0]]


def run_config(fields: dict) -> ml_collections.ConfigDict:
  """configs/default.py with the model, its task and a context-sized seq_len set."""
  config = default.get_config()
  for name, value in fields.items():
    if name not in _NOT_MODEL_FIELDS:
      config.model[name] = value
  config.task = tasks.DEFAULT_TASK[fields['arch']]
  config.masked_lm.next_sentence = fields['nsp_head']
  config.data.seq_len = min(fields['max_len'], MAX_SEQ_LEN)
  # Parameters are stored in float32 whatever the checkpoint's dtype; computation runs as
  # for any run ('auto': bfloat16 on GPU/TPU, float32 on a CPU; --config.dtype overrides).
  config.dtype = 'auto'
  return config


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
  """The float32 ModelConfig a run of `config` builds (model.vocab_size is exact)."""
  return tasks.model_config(config, config.model.vocab_size, jnp.float32)


def check_model(cfg: ModelConfig, fields: dict) -> None:
  """The model the run config builds is the checkpoint's (a command-line override may
  change how it runs, not what it computes)."""
  free = ('dropout', 'max_len') if cfg.position != 'learned' else ('dropout',)
  for name, value in fields.items():
    if name not in free and getattr(cfg, name) != value:
      raise InteropError(f'The checkpoint has {name}={value!r} but the run config builds '
                         f'model.{name}={getattr(cfg, name)!r}; drop the --config.model.{name} '
                         'override.')


def export_family(cfg: ModelConfig):
  """(architecture, family) that holds the model, or InteropError naming the options
  that prevent each candidate of its family."""
  problems = []
  for family in FAMILIES:
    if family.EXPORT_NEEDS['arch'] != (cfg.arch,):
      continue
    name = family.export_architecture(cfg)
    found = needs_problems(cfg, family.EXPORT_NEEDS, name) + family.export_problems(cfg)
    if not found:
      return name, family
    problems.append(f"as {name}: {'; '.join(found)}")
  raise InteropError(f"No Hugging Face architecture holds this model.arch='{cfg.arch}' model: "
                     f"{' | '.join(problems)}.")


def hf_config(cfg: ModelConfig, architecture: str, family, special) -> dict:
  """config.json for `transformers`; `special`: the tokenizer's SpecialIds."""
  ids = dict(pad_token_id=special.pad, eos_token_id=special.eos, bos_token_id=special.bos)
  if cfg.arch == 'encoder_decoder':
    ids['decoder_start_token_id'] = special.pad  # T5 starts decoding from pad
  return dict(architectures=[architecture], **family.hf_config(cfg), **ids, dtype='float32')
