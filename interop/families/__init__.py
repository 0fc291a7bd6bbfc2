"""One module per Hugging Face architecture family (gpt2, bert, t5, llama), each with:

  ARCHITECTURES            the `architectures` names it reads and writes
  BASE_PREFIX, HEADS       tensor-name prefixes of the base model and of the heads
  model_fields(hf, tensors, architecture) -> ModelConfig fields (refusing what does not map)
  EXPORT_NEEDS             ModelConfig field -> the values the architecture can hold
  export_architecture(cfg) the `architectures` name a model exports as
  export_problems(cfg)     what else prevents an export ([] when none)
  hf_config(cfg)           config.json's model fields (`architectures` is added by the caller)
  layout(cfg)              every tensor (interop/weights.py)

and here what they share.
"""
import numpy as np

from interop import InteropError
from models.config import ModelConfig

# transformers' ACT2FN names -> models/layers.py ACTIVATION_FNS, and back.
ACTIVATION_FROM_HF = {'gelu_new': 'gelu_tanh', 'gelu_pytorch_tanh': 'gelu_tanh', 'gelu': 'gelu',
                      'relu': 'relu', 'silu': 'silu', 'swish': 'silu'}
ACTIVATION_TO_HF = {'gelu_tanh': 'gelu_new', 'gelu': 'gelu', 'relu': 'relu', 'silu': 'silu'}


def activation(name: str, field: str) -> str:
  if name not in ACTIVATION_FROM_HF:
    raise InteropError(f"config.json has {field}='{name}'; import supports "
                       f"{', '.join(ACTIVATION_FROM_HF)}.")
  return ACTIVATION_FROM_HF[name]


def refuse_if(condition: bool, what: str) -> None:
  """Refuses a checkpoint option the model cannot express."""
  if condition:
    raise InteropError(f'config.json has {what}, which import does not support.')


def is_tied(tensors: dict[str, np.ndarray], output: str, embedding: str) -> bool:
  """The output projection is the embedding: absent from the file, or equal to it (as
  `transformers` decides when it loads)."""
  return output not in tensors or np.array_equal(tensors[output], tensors[embedding])


def check_copies(tensors: dict[str, np.ndarray], copies: dict[str, str]) -> None:
  """Tensors that `transformers` ties to another (copy -> original) must equal it."""
  for copy, original in copies.items():
    if copy in tensors and original in tensors and not np.array_equal(tensors[copy],
                                                                      tensors[original]):
      raise InteropError(f'The checkpoint has {copy} different from {original}, which this '
                         'architecture ties to it; import does not support that variant.')


def needs_problems(cfg: ModelConfig, needs: dict[str, tuple], architecture: str) -> list[str]:
  """Options outside what `architecture` holds, one phrase each."""
  return [f'model.{field}={getattr(cfg, field)!r} ({architecture} needs '
          f"{' or '.join(repr(v) for v in allowed)})"
          for field, allowed in needs.items() if getattr(cfg, field) not in allowed]


def heads_problems(cfg: ModelConfig, architecture: str,
                   free_head_dim: bool = False) -> list[str]:
  """Attention without grouped-query heads (GPT-2, BERT, T5), with num_heads * head_dim
  = d_model unless the architecture has a head_dim of its own (T5's d_kv)."""
  problems = []
  if cfg.num_kv_heads != cfg.num_heads:
    problems.append(f'model.num_kv_heads={cfg.num_kv_heads} ({architecture} needs '
                    f'num_heads={cfg.num_heads})')
  if not free_head_dim and cfg.num_heads * cfg.head_dim != cfg.d_model:
    problems.append(f'model.head_dim={cfg.head_dim} ({architecture} needs d_model / num_heads = '
                    f'{cfg.d_model / cfg.num_heads:g})')
  return problems
