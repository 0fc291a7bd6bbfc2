"""Stacks of blocks and the three families: decoder-only (GPT), encoder-only (BERT)
and encoder-decoder (T5). They share every layer; only masks and wiring differ."""
import flax.linen as nn
import jax
import jax.numpy as jnp

from models.config import REMAT_POLICIES, ModelConfig
from models.layers import (ACTIVATION_FNS, INIT_STD, Array, AttentionMask, Block, Dense, Embed,
                           Norm, RelativePositionBias, attention_mask, dense, param_init,
                           sinusoidal_positions)


class Stack(nn.Module):
  """`num_layers` blocks, scanned (one compiled body whatever the depth) or unrolled.

  Scanned parameters get a leading 'layers' axis. `remat` picks what the
  backward pass recomputes instead of storing.
  """
  cfg: ModelConfig
  num_layers: int
  deterministic: bool = True
  cross_attention: bool = False

  @nn.compact
  def __call__(self, x_BTD: Array, self_mask: AttentionMask, positions_BT: Array,
               self_bias_BNTS: Array | None = None, encoded_BSD: Array | None = None,
               cross_mask: AttentionMask | None = None,
               cache_index: Array | None = None) -> Array:
    cfg = self.cfg
    block_cls = Block
    if cfg.remat != 'none':
      block_cls = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
    args = (self_mask, positions_BT, self_bias_BNTS, encoded_BSD, cross_mask, cache_index)
    if cfg.scan_layers:
      scanned = nn.scan(
          block_cls, variable_axes={'params': 0, 'cache': 0},
          split_rngs={'params': True, 'dropout': True},
          in_axes=nn.broadcast, length=self.num_layers,
          metadata_params={nn.PARTITION_NAME: 'layers'})
      x_BTD, _ = scanned(cfg, self.deterministic, self.cross_attention, name='layers')(x_BTD, *args)
    else:
      for i in range(self.num_layers):
        x_BTD, _ = block_cls(cfg, self.deterministic, self.cross_attention,
                             name=f'layer_{i}')(x_BTD, *args)
    return x_BTD


class InputEmbedding(nn.Module):
  """Token embedding plus absolute positions (learned or sinusoidal; RoPE and relative
  biases act inside attention), optional token-type (segment A/B) embeddings, and an
  optional norm of the sum (BERT)."""
  cfg: ModelConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, embed: Embed, ids_BT: Array, positions_BT: Array,
               token_type_ids_BT: Array | None = None) -> Array:
    cfg = self.cfg
    x_BTD = embed(ids_BT)
    if cfg.position == 'learned':
      table_PD = self.param(
          'position_embedding',
          param_init(INIT_STD, ('max_len', 'embed')),
          (cfg.max_len, cfg.d_model), cfg.param_dtype)
      x_BTD = x_BTD + jnp.take(table_PD.astype(cfg.dtype), positions_BT, axis=0)
    elif cfg.position == 'sinusoidal':
      x_BTD = x_BTD + sinusoidal_positions(positions_BT, cfg.d_model).astype(cfg.dtype)
    if cfg.num_token_types:
      table_YD = self.param(
          'token_type_embedding',
          param_init(INIT_STD, ('token_types', 'embed')),
          (cfg.num_token_types, cfg.d_model), cfg.param_dtype)
      if token_type_ids_BT is None:
        token_type_ids_BT = jnp.zeros_like(ids_BT)
      x_BTD = x_BTD + jnp.take(table_YD.astype(cfg.dtype), token_type_ids_BT, axis=0)
    if cfg.embed_norm:
      x_BTD = Norm(cfg, name='embed_norm')(x_BTD)
    return nn.Dropout(cfg.dropout, deterministic=self.deterministic)(x_BTD)


class OutputHead(nn.Module):
  """Last hidden state -> vocabulary logits: the final norm (`hidden`), then an optional
  MLM transform (dense, activation, norm: BERT) and the projection, tied to the token
  embedding (scaled by d_model**-0.5 first in T5 v1.0) or separate, plus an optional
  per-vocabulary bias. A classifier (cfg.num_labels) has the final norm only."""
  cfg: ModelConfig
  deterministic: bool = True  # a LoRA adapter's dropout on an untied projection

  def setup(self):
    cfg = self.cfg
    self.final_norm = Norm(cfg, name='final_norm') if cfg.final_norm else None
    if cfg.num_labels:
      return
    if cfg.mlm_transform:
      self.transform = dense(cfg, cfg.d_model, -1, ('embed', None), INIT_STD, 'transform')
      self.transform_norm = Norm(cfg, name='transform_norm')
    if not cfg.tie_embeddings:
      self.lm_head = Dense(cfg, (cfg.vocab_size,), ('embed', 'vocab'), INIT_STD,
                           lora_target='head', deterministic=self.deterministic,
                           bias=False, name='lm_head')
    if cfg.output_bias:
      self.output_bias = self.param(
          'output_bias', nn.with_logical_partitioning(nn.initializers.zeros, ('vocab',)),
          (cfg.vocab_size,), cfg.param_dtype)

  def hidden(self, x_BTD: Array) -> Array:
    """The stack's output as the heads read it (after the final norm, where there is one)."""
    return x_BTD if self.final_norm is None else self.final_norm(x_BTD)

  def logits(self, embed: Embed, h_BTD: Array) -> Array:
    cfg = self.cfg
    if cfg.mlm_transform:
      h_BTD = self.transform_norm(ACTIVATION_FNS[cfg.activation](self.transform(h_BTD)))
    if not cfg.tie_embeddings:
      logits_BTV = self.lm_head(h_BTD)
    else:
      if cfg.tied_output_scale:
        h_BTD = h_BTD * cfg.d_model ** -0.5
      logits_BTV = embed.attend(h_BTD)
    if cfg.output_bias:
      logits_BTV = logits_BTV + self.output_bias.astype(logits_BTV.dtype)
    return logits_BTV

  def __call__(self, embed: Embed, x_BTD: Array) -> Array:
    return self.logits(embed, self.hidden(x_BTD))


def _dense_head(cfg: ModelConfig, features: int, name: str) -> nn.Dense:
  """A dense layer with bias on one hidden state [B, D] (poolers and classifiers)."""
  return nn.Dense(features, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name,
                  kernel_init=param_init(INIT_STD, ('embed', None)),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)))


def last_real_index(segment_ids_BT: Array) -> Array:
  """[B]: the last position of each row that holds a real token (segment id > 0)."""
  length = segment_ids_BT.shape[1]
  return length - 1 - jnp.argmax((segment_ids_BT > 0)[:, ::-1], axis=1)


class Classifier(nn.Module):
  """One hidden state per example [B, D] -> label logits [B, num_labels]: dropout, then
  a dense layer with bias (BERT's sequence classifier), named 'classifier' in the model."""
  cfg: ModelConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, h_BD: Array) -> Array:
    h_BD = nn.Dropout(self.cfg.dropout, deterministic=self.deterministic)(h_BD)
    return _dense_head(self.cfg, self.cfg.num_labels, 'dense')(h_BD)


class CacheSlots(nn.Module):
  """Decode-mode bookkeeping of a causal self-attention key/value cache.

  Returns the mask over the cache's S slots ([B, 1, T, S]; S is max_len as the prefill
  creates it, less while a decoding loop keeps it shorter: resize_cache), the positions of
  the tokens in its slots [B, S] (for relative position biases), and the slot this call's
  first token is written to. Slots remember which rows hold real tokens (left padding
  does not), so rows of different prompt lengths share a batch.
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, segment_ids_BT: Array, positions_BT: Array):
    cfg = self.cfg
    batch, length = segment_ids_BT.shape
    valid = self.variable('cache', 'valid', jnp.zeros, (batch, cfg.max_len), bool)
    slot_positions = self.variable('cache', 'positions', jnp.zeros, (batch, cfg.max_len),
                                   jnp.int32)
    index = self.variable('cache', 'index', lambda: jnp.zeros((), jnp.int32))
    start = index.value
    valid.value = jax.lax.dynamic_update_slice(valid.value, segment_ids_BT > 0, (0, start))
    slot_positions.value = jax.lax.dynamic_update_slice(
        slot_positions.value, positions_BT.astype(jnp.int32), (0, start))
    slot_T1 = (start + jnp.arange(length))[:, None]
    slots_1S = jnp.arange(valid.value.shape[1])[None, :]  # max_len, or as resize_cache left it
    # Each query sees the real tokens up to its own slot, and always itself.
    mask_BTS = (valid.value[:, None, :] & (slots_1S <= slot_T1)) | (slots_1S == slot_T1)
    index.value = start + length
    return AttentionMask(mask_BTS[:, None], causal=True), slot_positions.value, start


# The axis that counts cache slots, for each decode-cache variable that has one (keys and
# values [B * G, S, K] in models/layers.py Attention, CacheSlots' [B, S]).
_SLOT_AXES = {'cached_key': -2, 'cached_value': -2, 'valid': -1, 'positions': -1}
_GROUPED_ROWS = ('cached_key', 'cached_value', 'cross_key', 'cross_value')


def resize_cache(cache, num_slots: int):
  """The decode cache with `num_slots` slots: the first ones kept, new ones empty (not
  valid, so masked). Attention reads every slot of the cache at every step, so a decoding
  loop keeps it only as long as the tokens so far need (inference/generate.py); slots at
  or past the cache index are free, as CacheSlots leaves them."""
  def resize(path, leaf):
    axis = _SLOT_AXES.get(getattr(path[-1], 'key', None))
    if axis is None:  # the index; an encoder-decoder's cross-attention keys and values
      return leaf
    size = leaf.shape[axis]
    if num_slots <= size:
      return jax.lax.slice_in_dim(leaf, 0, num_slots, axis=axis)
    widths = [(0, 0)] * leaf.ndim
    widths[axis] = (0, num_slots - size)
    return jnp.pad(leaf, widths)
  return jax.tree_util.tree_map_with_path(resize, cache)


def reorder_cache(cache, source_R: Array):
  """The decode cache whose row r is row source_R[r] of `cache` (beam search's beams
  following their parents). Keys and values hold G rows per example (models/layers.py
  Attention), every other variable one (the index none)."""
  rows = source_R.shape[0]
  def reorder(path, leaf):
    if not leaf.ndim:
      return leaf
    if getattr(path[-1], 'key', None) in _GROUPED_ROWS:
      grouped = leaf.reshape((rows, leaf.shape[0] // rows) + leaf.shape[1:])
      return grouped[source_R].reshape(leaf.shape)
    return leaf[source_R]
  return jax.tree_util.tree_map_with_path(reorder, cache)


def causal_self_attention_inputs(cfg: ModelConfig, slots: CacheSlots | None,
                                 bias: RelativePositionBias | None, segment_ids_BT: Array,
                                 positions_BT: Array):
  """(mask, relative bias or None, cache slot or None) for a causal stack: over the
  sequence itself when training, over the key/value cache (`slots`) in decode mode."""
  if cfg.decode:
    mask, kv_positions_BS, cache_index = slots(segment_ids_BT, positions_BT)
  else:
    mask = attention_mask(segment_ids_BT, segment_ids_BT, causal=True)
    kv_positions_BS, cache_index = positions_BT, None
  bias_BNTS = None if bias is None else bias(positions_BT, kv_positions_BS)
  return mask, bias_BNTS, cache_index


class TokenHead(nn.Module):
  """The output head alone: a stack's last hidden states [B, T, D] -> logits [B, T, V],
  on the 'token_embed' and 'head' parameters of a DecoderOnly or an EncoderDecoder (the
  same names), so a loss can run it on part of the sequence at a time."""
  cfg: ModelConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x_BTD: Array) -> Array:
    return OutputHead(self.cfg, self.deterministic, name='head')(
        Embed(self.cfg, name='token_embed'), x_BTD)


class DecoderOnly(nn.Module):
  """GPT: causal self-attention over packed sequences; returns logits [B, T, V], or with
  cfg.num_labels label logits [B, num_labels] from each row's last real token (after the
  final norm). In decode mode it runs over a key/value cache (see CacheSlots).
  `return_hidden`: the stack's output [B, T, D] instead of logits (for TokenHead)."""
  cfg: ModelConfig
  deterministic: bool = True
  return_hidden: bool = False

  @nn.compact
  def __call__(self, inputs_BT: Array, segment_ids_BT: Array, positions_BT: Array) -> Array:
    cfg = self.cfg
    embed = Embed(cfg, name='token_embed')
    x_BTD = InputEmbedding(cfg, self.deterministic, name='input')(embed, inputs_BT, positions_BT)
    slots = CacheSlots(cfg, name='cache_slots') if cfg.decode else None
    bias = (RelativePositionBias(cfg, bidirectional=False, name='relative_bias')
            if cfg.position == 'relative' else None)
    mask, bias_BNTS, cache_index = causal_self_attention_inputs(
        cfg, slots, bias, segment_ids_BT, positions_BT)
    x_BTD = Stack(cfg, cfg.num_layers, self.deterministic, name='decoder')(
        x_BTD, mask, positions_BT, bias_BNTS, cache_index=cache_index)
    if self.return_hidden:
      return x_BTD
    head = OutputHead(cfg, self.deterministic, name='head')
    if cfg.num_labels:
      last_B = last_real_index(segment_ids_BT)
      h_BD = jnp.take_along_axis(x_BTD, last_B[:, None, None], axis=1)[:, 0]
      return Classifier(cfg, self.deterministic, name='classifier')(head.hidden(h_BD))
    return head(embed, x_BTD)


class EncoderOnly(nn.Module):
  """BERT: bidirectional self-attention; returns (token logits [B, T, V], next-sentence
  logits [B, 2] from the first token, or None without the NSP head), or with
  cfg.num_labels label logits [B, num_labels] from the first token ([CLS]), through the
  pooler where the model has one (cfg.nsp_head)."""
  cfg: ModelConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, inputs_BT: Array, segment_ids_BT: Array, positions_BT: Array,
               token_type_ids_BT: Array | None = None):
    cfg = self.cfg
    embed = Embed(cfg, name='token_embed')
    x_BTD = InputEmbedding(cfg, self.deterministic, name='input')(
        embed, inputs_BT, positions_BT, token_type_ids_BT)
    mask = attention_mask(segment_ids_BT, segment_ids_BT, causal=False)
    bias_BNTS = (RelativePositionBias(cfg, bidirectional=True, name='relative_bias')(
        positions_BT, positions_BT) if cfg.position == 'relative' else None)
    x_BTD = Stack(cfg, cfg.num_layers, self.deterministic, name='encoder')(
        x_BTD, mask, positions_BT, bias_BNTS)
    head = OutputHead(cfg, self.deterministic, name='head')
    if cfg.num_labels:
      h_BD = head.hidden(x_BTD[:, 0])
      if cfg.nsp_head:
        h_BD = jnp.tanh(_dense_head(cfg, cfg.d_model, 'pooler')(h_BD))
      return Classifier(cfg, self.deterministic, name='classifier')(h_BD)
    h_BTD = head.hidden(x_BTD)
    logits_BTV = head.logits(embed, h_BTD)
    if not cfg.nsp_head:
      return logits_BTV, None
    pooled_BD = jnp.tanh(_dense_head(cfg, cfg.d_model, 'pooler')(h_BTD[:, 0]))
    return logits_BTV, _dense_head(cfg, 2, 'next_sentence')(pooled_BD)


class EncoderDecoder(nn.Module):
  """T5: a bidirectional encoder, and a causal decoder that also attends to every
  encoder token of its own example; returns decoder logits [B, T, V] (`return_hidden`:
  the decoder stack's output [B, T, D] instead, for TokenHead)."""
  cfg: ModelConfig
  deterministic: bool = True
  return_hidden: bool = False

  def setup(self):
    cfg = self.cfg
    self.embed = Embed(cfg, name='token_embed')
    self.encoder_input = InputEmbedding(cfg, self.deterministic, name='encoder_input')
    self.decoder_input = InputEmbedding(cfg, self.deterministic, name='decoder_input')
    self.encoder = Stack(cfg, cfg.num_layers, self.deterministic, name='encoder')
    self.encoder_norm = Norm(cfg, name='encoder_norm') if cfg.final_norm else None
    self.decoder = Stack(cfg, cfg.num_decoder_layers or cfg.num_layers, self.deterministic,
                         cross_attention=True, name='decoder')
    self.head = OutputHead(cfg, self.deterministic, name='head')
    relative = cfg.position == 'relative'
    self.encoder_bias = (RelativePositionBias(cfg, bidirectional=True, name='encoder_bias')
                         if relative else None)
    self.decoder_bias = (RelativePositionBias(cfg, bidirectional=False, name='decoder_bias')
                         if relative else None)
    self.cache_slots = CacheSlots(cfg, name='cache_slots') if cfg.decode else None

  def encode(self, inputs_BS: Array, segment_ids_BS: Array, positions_BS: Array) -> Array:
    x_BSD = self.encoder_input(self.embed, inputs_BS, positions_BS)
    mask = attention_mask(segment_ids_BS, segment_ids_BS, causal=False)
    bias = None if self.encoder_bias is None else self.encoder_bias(positions_BS, positions_BS)
    x_BSD = self.encoder(x_BSD, mask, positions_BS, bias)
    return x_BSD if self.encoder_norm is None else self.encoder_norm(x_BSD)

  def decode(self, encoded_BSD: Array | None, encoder_segment_ids_BS: Array, inputs_BT: Array,
             segment_ids_BT: Array, positions_BT: Array) -> Array:
    """Decoder logits [B, T, V]. In decode mode (one step at a time over a key/value
    cache) only the first call needs `encoded_BSD`: its cross-attention keys and values
    are cached, and later calls pass None."""
    x_BTD = self.decoder_input(self.embed, inputs_BT, positions_BT)
    self_mask, bias_BNTS, cache_index = causal_self_attention_inputs(
        self.cfg, self.cache_slots, self.decoder_bias, segment_ids_BT, positions_BT)
    cross_mask = attention_mask(segment_ids_BT, encoder_segment_ids_BS, causal=False)
    x_BTD = self.decoder(x_BTD, self_mask, positions_BT, bias_BNTS, encoded_BSD, cross_mask,
                         cache_index)
    return x_BTD if self.return_hidden else self.head(self.embed, x_BTD)

  def __call__(self, encoder_inputs_BS, encoder_segment_ids_BS, encoder_positions_BS,
               decoder_inputs_BT, decoder_segment_ids_BT, decoder_positions_BT) -> Array:
    encoded_BSD = self.encode(encoder_inputs_BS, encoder_segment_ids_BS, encoder_positions_BS)
    return self.decode(encoded_BSD, encoder_segment_ids_BS, decoder_inputs_BT,
                       decoder_segment_ids_BT, decoder_positions_BT)
