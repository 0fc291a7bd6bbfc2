"""T5 (T5ForConditionalGeneration): pre-norm RMSNorm blocks without biases, attention
logits unscaled plus a relative position bias (one table per stack, held by its layer
0), an embedding shared by encoder, decoder and (tied) output.

v1.0 (t5-small ...): relu MLP, tied output with the decoder output scaled by
d_model**-0.5. v1.1 / Flan-T5: feed_forward_proj='gated-gelu' (wi_0 is the activated
gate, wi_1 the up projection) and a separate lm_head, unscaled.
"""
from interop import InteropError
from interop.families import check_copies, heads_problems, is_tied
from interop.weights import Layout, Stack, dense, linear, norm, table
from models.config import ModelConfig

ARCHITECTURES = ('T5ForConditionalGeneration',)
BASE_PREFIX, HEADS = '', ()
EMBEDDING, OUTPUT = 'shared.weight', 'lm_head.weight'
# feed_forward_proj -> (activation, gated_mlp); transformers maps 'gated-gelu' to gelu_new.
MLPS = {'relu': ('relu', False), 'gated-gelu': ('gelu_tanh', True)}

EXPORT_NEEDS = dict(
    arch=('encoder_decoder',), position=('relative',), norm=('rmsnorm',),
    block_order=('pre_norm',), embed_norm=(False,), final_norm=(True,), use_bias=(False,),
    num_token_types=(0,), mlm_transform=(False,), output_bias=(False,),
    attention_scale=(1.0,))


def _scaled_output(hf: dict) -> bool:
  """transformers' scale_decoder_outputs: written since version 5, before then implied by
  tie_word_embeddings (true unless v1.1 says false)."""
  return hf.get('scale_decoder_outputs', hf.get('tie_word_embeddings', True) is not False)


def model_fields(hf: dict, tensors: dict, architecture: str) -> dict:
  mlp = hf.get('feed_forward_proj', 'relu')
  if mlp not in MLPS:
    raise InteropError(f"config.json has feed_forward_proj='{mlp}'; import supports "
                       f"{', '.join(MLPS)}.")
  check_copies(tensors, {'encoder.embed_tokens.weight': EMBEDDING,
                         'decoder.embed_tokens.weight': EMBEDDING})
  tied, scaled = is_tied(tensors, OUTPUT, EMBEDDING), _scaled_output(hf)
  if scaled and not tied:
    raise InteropError('config.json scales the decoder output (scale_decoder_outputs) before '
                       'a separate lm_head, which import does not support.')
  activation_name, gated = MLPS[mlp]
  return dict(
      arch='encoder_decoder', vocab_size=hf['vocab_size'], num_layers=hf['num_layers'],
      num_decoder_layers=hf.get('num_decoder_layers') or hf['num_layers'],
      num_heads=hf['num_heads'], num_kv_heads=hf['num_heads'], head_dim=hf['d_kv'],
      d_model=hf['d_model'], d_ff=hf['d_ff'], max_len=hf.get('n_positions', 512),
      position='relative', relative_buckets=hf.get('relative_attention_num_buckets', 32),
      relative_max_distance=hf.get('relative_attention_max_distance', 128), norm='rmsnorm',
      norm_eps=hf.get('layer_norm_epsilon', 1e-6), block_order='pre_norm', embed_norm=False,
      final_norm=True, activation=activation_name, gated_mlp=gated, attention_scale=1.0,
      num_token_types=0, mlm_transform=False, output_bias=False, tie_embeddings=tied,
      tied_output_scale=scaled, use_bias=False, nsp_head=False,
      dropout=float(hf.get('dropout_rate', 0.0)))


def export_architecture(cfg: ModelConfig) -> str:
  return ARCHITECTURES[0]


def export_problems(cfg: ModelConfig) -> list[str]:
  problems = heads_problems(cfg, 'T5', free_head_dim=True)
  if (cfg.activation, cfg.gated_mlp) not in MLPS.values():
    problems.append(f'model.activation={cfg.activation!r} with gated_mlp={cfg.gated_mlp} (T5 '
                    "needs 'relu' ungated or 'gelu_tanh' gated)")
  return problems


def hf_config(cfg: ModelConfig) -> dict:
  mlps = {v: k for k, v in MLPS.items()}
  return dict(
      model_type='t5', is_encoder_decoder=True, vocab_size=cfg.vocab_size, d_model=cfg.d_model,
      d_kv=cfg.head_dim, d_ff=cfg.d_ff, num_layers=cfg.num_layers,
      num_decoder_layers=cfg.num_decoder_layers or cfg.num_layers, num_heads=cfg.num_heads,
      relative_attention_num_buckets=cfg.relative_buckets,
      relative_attention_max_distance=cfg.relative_max_distance,
      feed_forward_proj=mlps[(cfg.activation, cfg.gated_mlp)], layer_norm_epsilon=cfg.norm_eps,
      n_positions=cfg.max_len, dropout_rate=cfg.dropout, tie_word_embeddings=cfg.tie_embeddings,
      scale_decoder_outputs=cfg.tie_embeddings and cfg.tied_output_scale)


def layout(cfg: ModelConfig) -> Layout:
  D, N, K, F, V = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.d_ff, cfg.vocab_size
  buckets = (cfg.relative_buckets, N)

  def attention(hf: str, param: str):
    return [*dense(f'{hf}.q', f'{param}/query', (D,), (N, K), bias=False),
            *dense(f'{hf}.k', f'{param}/key', (D,), (N, K), bias=False),
            *dense(f'{hf}.v', f'{param}/value', (D,), (N, K), bias=False),
            *dense(f'{hf}.o', f'{param}/out', (N, K), (D,), bias=False)]

  def mlp(hf: str):
    wi = ([*dense(f'{hf}.wi_0', 'mlp/gate', (D,), (F,), bias=False),
           *dense(f'{hf}.wi_1', 'mlp/up', (D,), (F,), bias=False)] if cfg.gated_mlp else
          dense(f'{hf}.wi', 'mlp/up', (D,), (F,), bias=False))
    return [*wi, *dense(f'{hf}.wo', 'mlp/down', (F,), (D,), bias=False)]
  encoder, decoder = 'encoder.block.{i}.layer.', 'decoder.block.{i}.layer.'
  encoder_block = (
      *norm(encoder + '0.layer_norm', 'pre_self_attention_norm', D, bias=False),
      *attention(encoder + '0.SelfAttention', 'self_attention'),
      *norm(encoder + '1.layer_norm', 'pre_mlp_norm', D, bias=False),
      *mlp(encoder + '1.DenseReluDense'))
  decoder_block = (
      *norm(decoder + '0.layer_norm', 'pre_self_attention_norm', D, bias=False),
      *attention(decoder + '0.SelfAttention', 'self_attention'),
      *norm(decoder + '1.layer_norm', 'pre_cross_attention_norm', D, bias=False),
      *attention(decoder + '1.EncDecAttention', 'cross_attention'),
      *norm(decoder + '2.layer_norm', 'pre_mlp_norm', D, bias=False),
      *mlp(decoder + '2.DenseReluDense'))
  rules = [
      table(EMBEDDING, 'token_embed/embedding', (V, D)),
      table('encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight',
            'encoder_bias/relative_attention_bias', buckets),
      table('decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight',
            'decoder_bias/relative_attention_bias', buckets),
      *norm('encoder.final_layer_norm', 'encoder_norm', D, bias=False),
      *norm('decoder.final_layer_norm', 'head/final_norm', D, bias=False)]
  if not cfg.tie_embeddings:
    rules.append(linear(OUTPUT, 'head/lm_head/kernel', (D,), (V,)))
  # Tied copies of the shared embedding, and a table transformers ignores too.
  ignored = [r'(en|de)coder\.embed_tokens\.weight',
             r'decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight']
  if cfg.tie_embeddings:
    ignored.append(OUTPUT)
  stacks = (Stack('encoder', cfg.num_layers, encoder_block),
            Stack('decoder', cfg.num_decoder_layers or cfg.num_layers, decoder_block))
  return Layout(tuple(rules), stacks, tuple(ignored))
