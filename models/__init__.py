"""Flax transformers for the three families and the objectives that train them."""
from models.config import ModelConfig, padded_vocab_size
from models.objectives import CausalLM, example_batch


def build_objective(cfg: ModelConfig, z_loss: float = 0.0):
  """The model family and its pre-training objective, behind one `loss` method."""
  if cfg.arch == 'decoder':
    return CausalLM(cfg, z_loss)
  raise ValueError(f"model.arch='{cfg.arch}' is not built yet; use model.arch='decoder'.")
