"""Flax transformers for the three families, the loss math they need, and the choice of
attention kernel. The tasks (tasks/) build them and train them."""
from models.config import ModelConfig, padded_vocab_size
from models.losses import cross_entropy_sums, example_batch, normalize_metrics
