"""Llama (LlamaForCausalLM): rotary positions, pre-norm RMSNorm blocks without biases,
grouped-query attention and a gated MLP (gate_proj -> gate, up_proj -> up).

Rotary embeddings rotate (first half, second half) of each head in both codebases
(HF's rotate_half, models/layers.py apply_rope), so q_proj/k_proj load unpermuted.
"""
from interop.families import ACTIVATION_TO_HF, activation, is_tied, refuse_if
from interop.weights import Layout, Stack, dense, linear, norm, table
from models.config import ModelConfig

ARCHITECTURES = ('LlamaForCausalLM',)
BASE_PREFIX, HEADS = 'model.', ('lm_head.',)
EMBEDDING, OUTPUT = 'model.embed_tokens.weight', 'lm_head.weight'

EXPORT_NEEDS = dict(
    arch=('decoder',), position=('rope',), norm=('rmsnorm',), block_order=('pre_norm',),
    embed_norm=(False,), final_norm=(True,), gated_mlp=(True,), use_bias=(False,),
    num_token_types=(0,), mlm_transform=(False,), output_bias=(False,),
    tied_output_scale=(False,), attention_scale=(0.0,))


def _rope(hf: dict) -> tuple[float, str | None]:
  """(theta, the scaling type when it is not plain RoPE): `rope_parameters` since
  transformers 5, `rope_theta` and `rope_scaling` before."""
  parameters = hf.get('rope_parameters') or {}
  scaling = hf.get('rope_scaling') or {}
  kind = parameters.get('rope_type') or scaling.get('rope_type') or scaling.get('type')
  theta = parameters.get('rope_theta', hf.get('rope_theta', 10_000.0))
  return float(theta), None if kind in (None, 'default') else kind


def model_fields(hf: dict, tensors: dict, architecture: str) -> dict:
  theta, scaling = _rope(hf)
  refuse_if(scaling is not None, f"RoPE scaling '{scaling}' (rope_scaling / rope_parameters)")
  refuse_if(hf.get('attention_bias', False), 'attention_bias=true')
  refuse_if(hf.get('mlp_bias', False), 'mlp_bias=true')
  d, heads = hf['hidden_size'], hf['num_attention_heads']
  return dict(
      arch='decoder', vocab_size=hf['vocab_size'], num_layers=hf['num_hidden_layers'],
      num_heads=heads, num_kv_heads=hf.get('num_key_value_heads') or heads,
      head_dim=hf.get('head_dim') or d // heads, d_model=d, d_ff=hf['intermediate_size'],
      max_len=hf.get('max_position_embeddings', 2048), position='rope', rope_theta=theta,
      norm='rmsnorm', norm_eps=hf.get('rms_norm_eps', 1e-6), block_order='pre_norm',
      embed_norm=False, final_norm=True,
      activation=activation(hf.get('hidden_act', 'silu'), 'hidden_act'), gated_mlp=True,
      attention_scale=0.0, num_token_types=0, mlm_transform=False, output_bias=False,
      tie_embeddings=is_tied(tensors, OUTPUT, EMBEDDING), tied_output_scale=False,
      use_bias=False, nsp_head=False, dropout=0.0)


def export_architecture(cfg: ModelConfig) -> str:
  return ARCHITECTURES[0]


def export_problems(cfg: ModelConfig) -> list[str]:
  return []


def hf_config(cfg: ModelConfig) -> dict:
  return dict(
      model_type='llama', vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
      intermediate_size=cfg.d_ff, num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
      head_dim=cfg.head_dim, hidden_act=ACTIVATION_TO_HF[cfg.activation],
      max_position_embeddings=cfg.max_len, rms_norm_eps=cfg.norm_eps,
      rope_parameters={'rope_type': 'default', 'rope_theta': cfg.rope_theta},
      rope_theta=cfg.rope_theta, rope_scaling=None,  # what transformers before 5 reads
      attention_bias=False, mlp_bias=False, tie_word_embeddings=cfg.tie_embeddings)


def layout(cfg: ModelConfig) -> Layout:
  D, N, G, K, F, V = (cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.d_ff,
                      cfg.vocab_size)
  h = 'model.layers.{i}.'
  block = (
      *norm(h + 'input_layernorm', 'pre_self_attention_norm', D, bias=False),
      *dense(h + 'self_attn.q_proj', 'self_attention/query', (D,), (N, K), bias=False),
      *dense(h + 'self_attn.k_proj', 'self_attention/key', (D,), (G, K), bias=False),
      *dense(h + 'self_attn.v_proj', 'self_attention/value', (D,), (G, K), bias=False),
      *dense(h + 'self_attn.o_proj', 'self_attention/out', (N, K), (D,), bias=False),
      *norm(h + 'post_attention_layernorm', 'pre_mlp_norm', D, bias=False),
      *dense(h + 'mlp.gate_proj', 'mlp/gate', (D,), (F,), bias=False),
      *dense(h + 'mlp.up_proj', 'mlp/up', (D,), (F,), bias=False),
      *dense(h + 'mlp.down_proj', 'mlp/down', (F,), (D,), bias=False))
  rules = [table(EMBEDDING, 'token_embed/embedding', (V, D)),
           *norm('model.norm', 'head/final_norm', D, bias=False)]
  if not cfg.tie_embeddings:
    rules.append(linear(OUTPUT, 'head/lm_head/kernel', (D,), (V,)))
  # Old checkpoints keep the rotary frequencies; a tied one may keep lm_head's copy.
  ignored = (r'model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq',) + (
      (OUTPUT,) if cfg.tie_embeddings else ())
  return Layout(tuple(rules), (Stack('decoder', cfg.num_layers, block),), ignored)
