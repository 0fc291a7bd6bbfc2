"""BERT (BertForPreTraining with its next-sentence head, BertForMaskedLM without):
learned positions and token types, a LayerNorm on the embedding sum, post-norm blocks
with biases, and the MLM head's transform (dense, activation, LayerNorm) and output bias.
The pooler (dense + tanh) reads the first token of the last block's output."""
from interop.families import (ACTIVATION_TO_HF, activation, check_copies, is_tied, refuse_if,
                              heads_problems)
from interop.weights import Layout, Stack, dense, linear, norm, table, vector
from models.config import ModelConfig

PRETRAINING, MASKED_LM = 'BertForPreTraining', 'BertForMaskedLM'
ARCHITECTURES = (PRETRAINING, MASKED_LM)
BASE_PREFIX, HEADS = 'bert.', ('cls.',)
EMBEDDING, OUTPUT = 'bert.embeddings.word_embeddings.weight', 'cls.predictions.decoder.weight'
OUTPUT_BIAS = 'cls.predictions.bias'

EXPORT_NEEDS = dict(
    arch=('encoder',), position=('learned',), norm=('layernorm',), block_order=('post_norm',),
    embed_norm=(True,), final_norm=(False,), gated_mlp=(False,), mlm_transform=(True,),
    tied_output_scale=(False,), attention_scale=(0.0,))


def model_fields(hf: dict, tensors: dict, architecture: str) -> dict:
  refuse_if(hf.get('position_embedding_type', 'absolute') != 'absolute',
            f"position_embedding_type='{hf.get('position_embedding_type')}'")
  refuse_if(hf.get('is_decoder', False), 'is_decoder=true')
  refuse_if(hf.get('add_cross_attention', False), 'add_cross_attention=true')
  check_copies(tensors, {'cls.predictions.decoder.bias': OUTPUT_BIAS})
  d, heads = hf['hidden_size'], hf['num_attention_heads']
  return dict(
      arch='encoder', vocab_size=hf['vocab_size'], num_layers=hf['num_hidden_layers'],
      num_heads=heads, num_kv_heads=heads, head_dim=d // heads, d_model=d,
      d_ff=hf['intermediate_size'], max_len=hf.get('max_position_embeddings', 512),
      position='learned', num_token_types=hf.get('type_vocab_size', 2), norm='layernorm',
      norm_eps=hf.get('layer_norm_eps', 1e-12), block_order='post_norm', embed_norm=True,
      final_norm=False, activation=activation(hf.get('hidden_act', 'gelu'), 'hidden_act'),
      gated_mlp=False, attention_scale=0.0, mlm_transform=True, output_bias=True,
      tie_embeddings=is_tied(tensors, OUTPUT, EMBEDDING), tied_output_scale=False,
      use_bias=True, nsp_head=architecture == PRETRAINING,
      dropout=float(hf.get('hidden_dropout_prob', 0.0)))


def export_architecture(cfg: ModelConfig) -> str:
  return PRETRAINING if cfg.nsp_head else MASKED_LM


def export_problems(cfg: ModelConfig) -> list[str]:
  return heads_problems(cfg, export_architecture(cfg))


def hf_config(cfg: ModelConfig) -> dict:
  return dict(
      model_type='bert', vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
      intermediate_size=cfg.d_ff, hidden_act=ACTIVATION_TO_HF[cfg.activation],
      max_position_embeddings=cfg.max_len, type_vocab_size=max(cfg.num_token_types, 1),
      layer_norm_eps=cfg.norm_eps, position_embedding_type='absolute',
      tie_word_embeddings=cfg.tie_embeddings, hidden_dropout_prob=cfg.dropout,
      attention_probs_dropout_prob=0.0)


def layout(cfg: ModelConfig) -> Layout:
  """A model without biases, token types or output bias gets zeros in their place."""
  D, N, K, F, V = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.d_ff, cfg.vocab_size
  h = 'bert.encoder.layer.{i}.'

  def linear_with_bias(hf: str, param: str, in_shape, out_shape):
    return dense(hf, param, in_shape, out_shape, bias=True, zeros_if_absent=True)
  block = (
      *linear_with_bias(h + 'attention.self.query', 'self_attention/query', (D,), (N, K)),
      *linear_with_bias(h + 'attention.self.key', 'self_attention/key', (D,), (N, K)),
      *linear_with_bias(h + 'attention.self.value', 'self_attention/value', (D,), (N, K)),
      *linear_with_bias(h + 'attention.output.dense', 'self_attention/out', (N, K), (D,)),
      *norm(h + 'attention.output.LayerNorm', 'post_self_attention_norm', D, bias=True),
      *linear_with_bias(h + 'intermediate.dense', 'mlp/up', (D,), (F,)),
      *linear_with_bias(h + 'output.dense', 'mlp/down', (F,), (D,)),
      *norm(h + 'output.LayerNorm', 'post_mlp_norm', D, bias=True))
  rules = [
      table(EMBEDDING, 'token_embed/embedding', (V, D)),
      table('bert.embeddings.position_embeddings.weight', 'input/position_embedding',
            (cfg.max_len, D)),
      table('bert.embeddings.token_type_embeddings.weight', 'input/token_type_embedding',
            (max(cfg.num_token_types, 1), D), zeros_if_absent=True),
      *norm('bert.embeddings.LayerNorm', 'input/embed_norm', D, bias=True),
      *linear_with_bias('cls.predictions.transform.dense', 'head/transform', (D,), (D,)),
      *norm('cls.predictions.transform.LayerNorm', 'head/transform_norm', D, bias=True),
      vector(OUTPUT_BIAS, 'head/output_bias', (V,), zeros_if_absent=True)]
  if not cfg.tie_embeddings:
    rules.append(linear(OUTPUT, 'head/lm_head/kernel', (D,), (V,)))
  if cfg.nsp_head:
    rules += [*dense('bert.pooler.dense', 'pooler', (D,), (D,), bias=True),
              *dense('cls.seq_relationship', 'next_sentence', (D,), (2,), bias=True)]
  ignored = [r'bert\.embeddings\.position_ids', r'cls\.predictions\.decoder\.bias']
  if cfg.tie_embeddings:
    ignored.append(OUTPUT)
  if not cfg.nsp_head:  # checkpoints saved from pre-training keep heads BertForMaskedLM drops
    ignored += [r'bert\.pooler\..*', r'cls\.seq_relationship\..*']
  return Layout(tuple(rules), (Stack('encoder', cfg.num_layers, block),), tuple(ignored))
