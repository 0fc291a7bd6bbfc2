"""Stacks of blocks and the decoder-only language model (GPT)."""
import flax.linen as nn
import jax
import jax.numpy as jnp

from models.config import ModelConfig
from models.layers import Array, Block, Embed, Norm, attention_mask, sinusoidal_positions

REMAT_POLICIES = {
    'dots_saveable': jax.checkpoint_policies.dots_saveable,
    'full': jax.checkpoint_policies.nothing_saveable,
}


class Stack(nn.Module):
  """`num_layers` blocks, scanned (one compiled body whatever the depth) or unrolled.

  Scanned parameters get a leading 'layers' axis. `remat` picks what the
  backward pass recomputes instead of storing.
  """
  cfg: ModelConfig
  deterministic: bool = True
  cross_attention: bool = False

  @nn.compact
  def __call__(self, x_BTD: Array, self_mask_B1TS: Array, positions_BT: Array,
               encoded_BSD: Array | None = None, cross_mask_B1TS: Array | None = None) -> Array:
    cfg = self.cfg
    block_cls = Block
    if cfg.remat != 'none':
      block_cls = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
    args = (self_mask_B1TS, positions_BT, encoded_BSD, cross_mask_B1TS)
    if cfg.scan_layers:
      scanned = nn.scan(
          block_cls, variable_axes={'params': 0}, split_rngs={'params': True, 'dropout': True},
          in_axes=nn.broadcast, length=cfg.num_layers,
          metadata_params={nn.PARTITION_NAME: 'layers'})
      x_BTD, _ = scanned(cfg, self.deterministic, self.cross_attention, name='layers')(x_BTD, *args)
    else:
      for i in range(cfg.num_layers):
        x_BTD, _ = block_cls(cfg, self.deterministic, self.cross_attention,
                             name=f'layer_{i}')(x_BTD, *args)
    return x_BTD


class InputEmbedding(nn.Module):
  """Token embedding plus absolute positions (learned or sinusoidal; RoPE acts in attention)."""
  cfg: ModelConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, embed: Embed, ids_BT: Array, positions_BT: Array) -> Array:
    cfg = self.cfg
    x_BTD = embed(ids_BT)
    if cfg.position == 'learned':
      table_PD = self.param(
          'position_embedding',
          nn.with_logical_partitioning(nn.initializers.normal(0.02), ('max_len', 'embed')),
          (cfg.max_len, cfg.d_model), cfg.param_dtype)
      x_BTD = x_BTD + jnp.take(table_PD.astype(cfg.dtype), positions_BT, axis=0)
    elif cfg.position == 'sinusoidal':
      x_BTD = x_BTD + sinusoidal_positions(positions_BT, cfg.d_model).astype(cfg.dtype)
    return nn.Dropout(cfg.dropout, deterministic=self.deterministic)(x_BTD)


class OutputHead(nn.Module):
  """Final norm and projection to vocabulary logits (tied to the embedding or separate)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, embed: Embed, x_BTD: Array) -> Array:
    cfg = self.cfg
    x_BTD = Norm(cfg, name='final_norm')(x_BTD)
    if cfg.tie_embeddings:
      return embed.attend(x_BTD)
    return nn.DenseGeneral(
        cfg.vocab_size, use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ('embed', 'vocab')),
        name='lm_head')(x_BTD)


class DecoderOnly(nn.Module):
  """GPT: causal self-attention over packed sequences; returns logits [B, T, V]."""
  cfg: ModelConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, inputs_BT: Array, segment_ids_BT: Array, positions_BT: Array) -> Array:
    cfg = self.cfg
    embed = Embed(cfg, name='token_embed')
    x_BTD = InputEmbedding(cfg, self.deterministic, name='input')(embed, inputs_BT, positions_BT)
    mask_B1TS = attention_mask(segment_ids_BT, segment_ids_BT, causal=True)
    x_BTD = Stack(cfg, self.deterministic, name='decoder')(x_BTD, mask_B1TS, positions_BT)
    return OutputHead(cfg, name='head')(embed, x_BTD)
