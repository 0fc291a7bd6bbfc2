"""GPT-2 (GPT2LMHeadModel): learned positions, pre-norm LayerNorm blocks with biases,
a non-gated MLP, and fused query/key/value in GPT-2's Conv1D layout ([in, out])."""
from interop.families import (ACTIVATION_TO_HF, activation, is_tied, refuse_if,
                              heads_problems)
from interop.weights import Layout, Stack, conv1d, linear, norm, table, vector
from models.config import ModelConfig

ARCHITECTURES = ('GPT2LMHeadModel',)
BASE_PREFIX, HEADS = 'transformer.', ('lm_head.',)
EMBEDDING, OUTPUT = 'transformer.wte.weight', 'lm_head.weight'

EXPORT_NEEDS = dict(
    arch=('decoder',), position=('learned',), norm=('layernorm',), block_order=('pre_norm',),
    embed_norm=(False,), final_norm=(True,), gated_mlp=(False,), num_token_types=(0,),
    mlm_transform=(False,), output_bias=(False,), tied_output_scale=(False,),
    attention_scale=(0.0, 1.0))


def model_fields(hf: dict, tensors: dict, architecture: str) -> dict:
  refuse_if(hf.get('scale_attn_by_inverse_layer_idx', False),
            'scale_attn_by_inverse_layer_idx=true')
  refuse_if(hf.get('add_cross_attention', False), 'add_cross_attention=true')
  d, heads = hf['n_embd'], hf['n_head']
  return dict(
      arch='decoder', vocab_size=hf['vocab_size'], num_layers=hf['n_layer'], num_heads=heads,
      num_kv_heads=heads, head_dim=d // heads, d_model=d, d_ff=hf.get('n_inner') or 4 * d,
      max_len=hf['n_positions'], position='learned', norm='layernorm',
      norm_eps=hf.get('layer_norm_epsilon', 1e-5), block_order='pre_norm', embed_norm=False,
      final_norm=True,
      activation=activation(hf.get('activation_function', 'gelu_new'), 'activation_function'),
      gated_mlp=False, attention_scale=0.0 if hf.get('scale_attn_weights', True) else 1.0,
      num_token_types=0, mlm_transform=False, output_bias=False,
      tie_embeddings=is_tied(tensors, OUTPUT, EMBEDDING), tied_output_scale=False,
      use_bias=True, nsp_head=False, dropout=float(hf.get('resid_pdrop', 0.0)))


def export_architecture(cfg: ModelConfig) -> str:
  return ARCHITECTURES[0]


def export_problems(cfg: ModelConfig) -> list[str]:
  return heads_problems(cfg, ARCHITECTURES[0])


def hf_config(cfg: ModelConfig) -> dict:
  return dict(
      model_type='gpt2', vocab_size=cfg.vocab_size, n_embd=cfg.d_model, n_layer=cfg.num_layers,
      n_head=cfg.num_heads, n_inner=cfg.d_ff, n_positions=cfg.max_len,
      activation_function=ACTIVATION_TO_HF[cfg.activation], layer_norm_epsilon=cfg.norm_eps,
      scale_attn_weights=cfg.attention_scale != 1.0, tie_word_embeddings=cfg.tie_embeddings,
      resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=0.0)


def layout(cfg: ModelConfig) -> Layout:
  """Biases are written as zeros for a model without them."""
  D, N, K, F, V = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.d_ff, cfg.vocab_size
  h = 'transformer.h.{i}.'
  qkv = tuple(f'self_attention/{p}' for p in ('query', 'key', 'value'))
  block = (
      *norm(h + 'ln_1', 'pre_self_attention_norm', D, bias=True),
      conv1d(h + 'attn.c_attn.weight', tuple(f'{p}/kernel' for p in qkv), (D,), (N, K)),
      vector(h + 'attn.c_attn.bias', tuple(f'{p}/bias' for p in qkv), (N, K), True),
      conv1d(h + 'attn.c_proj.weight', 'self_attention/out/kernel', (N, K), (D,)),
      vector(h + 'attn.c_proj.bias', 'self_attention/out/bias', (D,), True),
      *norm(h + 'ln_2', 'pre_mlp_norm', D, bias=True),
      conv1d(h + 'mlp.c_fc.weight', 'mlp/up/kernel', (D,), (F,)),
      vector(h + 'mlp.c_fc.bias', 'mlp/up/bias', (F,), True),
      conv1d(h + 'mlp.c_proj.weight', 'mlp/down/kernel', (F,), (D,)),
      vector(h + 'mlp.c_proj.bias', 'mlp/down/bias', (D,), True))
  rules = [table(EMBEDDING, 'token_embed/embedding', (V, D)),
           table('transformer.wpe.weight', 'input/position_embedding', (cfg.max_len, D)),
           *norm('transformer.ln_f', 'head/final_norm', D, bias=True)]
  if not cfg.tie_embeddings:
    rules.append(linear(OUTPUT, 'head/lm_head/kernel', (D,), (V,)))
  # Old checkpoints keep the causal-mask buffers; a tied one may keep lm_head's copy.
  ignored = (r'transformer\.h\.\d+\.attn\.(masked_)?bias',) + (
      (OUTPUT,) if cfg.tie_embeddings else ())
  return Layout(tuple(rules), (Stack('decoder', cfg.num_layers, block),), ignored)
