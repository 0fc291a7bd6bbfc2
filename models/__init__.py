"""Flax transformers for the three families and the objectives that train them."""
from models.config import ModelConfig, padded_vocab_size
from models.objectives import (CausalLM, MaskedLM, SpanCorruption, example_batch,
                               normalize_metrics)

OBJECTIVES = {'causal_lm': CausalLM, 'masked_lm': MaskedLM, 'span_corruption': SpanCorruption}
OBJECTIVE_OF_ARCH = {'decoder': 'causal_lm', 'encoder': 'masked_lm',
                     'encoder_decoder': 'span_corruption'}


def objective_name(arch: str, objective: str = 'auto') -> str:
  return OBJECTIVE_OF_ARCH[arch] if objective == 'auto' else objective


def build_objective(cfg: ModelConfig, z_loss: float = 0.0, objective: str = 'auto'):
  """The model family and its pre-training objective, behind one `loss` method."""
  return OBJECTIVES[objective_name(cfg.arch, objective)](cfg, z_loss)
