"""Transformer layers shared by the decoder, encoder and encoder-decoder families.

Shape letters used in names and einsums:
  B batch, T query length, S key length, D d_model, N query heads,
  G key/value heads (grouped-query attention), K head dim, F MLP hidden, V vocab,
  J = N + 2G heads of query, key and value joined (models/layouts.py fuse_qkv).

Every parameter carries logical axis names ('vocab', 'embed', 'heads', 'kv_heads',
'kv', 'mlp'); `train/sharding.py` maps them to mesh axes. Parameters live in
`param_dtype`; matmuls run in `dtype`; norm statistics and softmax run in float32.
"""
import functools
import math
from collections.abc import Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from models import lora
from models.config import ModelConfig

Array = jax.Array

INIT_STD = 0.02  # GPT-2's initialiser; output projections divide it by sqrt(2 * layers)


def param_init(stddev: float, names: tuple[str | None, ...]):
  return nn.with_logical_partitioning(nn.initializers.normal(stddev), names)


def is_int8(value) -> bool:
  """An int8 weight {'int8': q, 'scale': s} of inference/quantize.py."""
  return isinstance(value, Mapping) and set(value) == {'int8', 'scale'}


def _int8_param(module: nn.Module, name: str, *init):
  """module.param(name, *init), or the stored int8 weight as it is."""
  if module.has_variable('params', name) and is_int8(module.get_variable('params', name)):
    return module.get_variable('params', name)
  return module.param(name, *init)


def _weight(value, x: Array, dtype) -> Array:
  """The weight in `dtype`. An int8 weight is dequantized here, at its use, so only
  this one matrix exists in float at a time. Its dequantization is made to depend on
  the input x (a clamp that changes nothing, by a bound XLA cannot know), so XLA can
  neither hoist it out of a decode loop (whose weights are loop-invariant) nor run it
  before x exists: either would keep a float copy of every weight live. (XLA:CPU
  schedules independent work early, and drops optimisation barriers before scheduling.)"""
  if not is_int8(value):
    return jnp.asarray(value, dtype)
  # |q| <= 127 (inference/quantize.py), so this is q whether or not x's first value is NaN.
  low = jnp.int8(-127) - jnp.isnan(x.reshape(-1)[0]).astype(jnp.int8)
  q = jnp.maximum(value['int8'], low)
  return (q.astype(jnp.float32) * value['scale']).astype(dtype)


class Embed(nn.Module):
  """Token embedding; `attend` reuses it as the output projection when tied. Stored
  [V, D], or [D, V] under TRANSPOSED_EMBEDDING where decoding put it
  (models/layouts.py)."""
  cfg: ModelConfig

  def setup(self):
    self.transposed = self.has_variable('params', TRANSPOSED_EMBEDDING)
    if self.transposed:
      self.embedding = self.param(TRANSPOSED_EMBEDDING, param_init(INIT_STD, ('embed', 'vocab')),
                                  (self.cfg.d_model, self.cfg.vocab_size), self.cfg.param_dtype)
      return
    self.embedding = _int8_param(
        self, 'embedding', param_init(INIT_STD, ('vocab', 'embed')),
        (self.cfg.vocab_size, self.cfg.d_model), self.cfg.param_dtype)

  def __call__(self, ids_BT: Array) -> Array:
    if self.transposed:  # columns [D, B, T]
      table_DV = jnp.asarray(self.embedding, self.cfg.dtype)
      return jnp.moveaxis(jnp.take(table_DV, ids_BT, axis=1), 0, -1)
    if is_int8(self.embedding):  # int8 rows times their scales
      rows_BTD = jnp.take(self.embedding['int8'], ids_BT, axis=0).astype(jnp.float32)
      return (rows_BTD * jnp.take(self.embedding['scale'], ids_BT, axis=0)).astype(self.cfg.dtype)
    table_VD = jnp.asarray(self.embedding, self.cfg.dtype)
    return jnp.take(table_VD, ids_BT, axis=0)

  def attend(self, x_BTD: Array) -> Array:
    if self.transposed:
      return jnp.einsum('BTD,DV->BTV', x_BTD, jnp.asarray(self.embedding, self.cfg.dtype))
    table_VD = _weight(self.embedding, x_BTD, self.cfg.dtype)
    return jnp.einsum('BTD,VD->BTV', x_BTD, table_VD)


# Decoding's layouts of the weights (models/layouts.py), which the modules read as given:
FUSED_QKV = 'qkv'  # self-attention's query, key and value kernels joined: [D, J, K]
TRANSPOSED_EMBEDDING = 'embedding_DV'  # a token embedding stored [D, V]
TRANSPOSED_KERNEL = 'kernel_transposed'  # a Dense kernel stored [outputs..., inputs...]


def sinusoidal_positions(positions_BT: Array, d_model: int) -> Array:
  """Fixed sin/cos position features of "Attention is all you need"; [B, T, D] float32."""
  half = d_model // 2
  inv_freq = jnp.exp(-math.log(10_000.0) * jnp.arange(half) / half)
  angles_BTH = positions_BT[..., None].astype(jnp.float32) * inv_freq
  return jnp.concatenate([jnp.sin(angles_BTH), jnp.cos(angles_BTH)], axis=-1)


def apply_rope(x_BTNK: Array, positions_BT: Array, theta: float) -> Array:
  """Rotary position embedding (Su et al.): rotates pairs (first half, second half) of K."""
  half = x_BTNK.shape[-1] // 2
  inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles_BTK = positions_BT[..., None].astype(jnp.float32) * inv_freq
  sin_BT1K = jnp.sin(angles_BTK)[:, :, None, :]
  cos_BT1K = jnp.cos(angles_BTK)[:, :, None, :]
  x1, x2 = jnp.split(x_BTNK.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos_BT1K - x2 * sin_BT1K,
                             x2 * cos_BT1K + x1 * sin_BT1K], axis=-1)
  return rotated.astype(x_BTNK.dtype)


def relative_position_buckets(relative_BTS: Array, bidirectional: bool, num_buckets: int,
                               max_distance: int) -> Array:
  """T5's buckets for key position minus query position: exact for small distances,
  logarithmic up to max_distance, one bucket beyond; a causal decoder only looks back."""
  if bidirectional:
    num_buckets //= 2
    offset_BTS = (relative_BTS > 0).astype(jnp.int32) * num_buckets
    distance_BTS = jnp.abs(relative_BTS)
  else:
    offset_BTS = jnp.zeros_like(relative_BTS)
    distance_BTS = jnp.maximum(-relative_BTS, 0)
  exact = num_buckets // 2
  log_ratio = jnp.log(jnp.maximum(distance_BTS, 1) / exact) / math.log(max_distance / exact)
  log_bucket_BTS = exact + (log_ratio * (num_buckets - exact)).astype(jnp.int32)
  log_bucket_BTS = jnp.minimum(log_bucket_BTS, num_buckets - 1)
  return offset_BTS + jnp.where(distance_BTS < exact, distance_BTS, log_bucket_BTS)


class RelativePositionBias(nn.Module):
  """T5 relative position bias: one learned scalar per (bucket, head), shared by all
  layers of a stack and added to the attention logits."""
  cfg: ModelConfig
  bidirectional: bool

  @nn.compact
  def __call__(self, q_positions_BT: Array, kv_positions_BS: Array) -> Array:
    table_RN = self.param(
        'relative_attention_bias',
        param_init(INIT_STD, ('relpos_buckets', 'heads')),
        (self.cfg.relative_buckets, self.cfg.num_heads), self.cfg.param_dtype)
    relative_BTS = kv_positions_BS[:, None, :] - q_positions_BT[:, :, None]
    buckets_BTS = relative_position_buckets(relative_BTS, self.bidirectional,
                                            self.cfg.relative_buckets,
                                            self.cfg.relative_max_distance)
    bias_BTSN = jnp.take(table_RN.astype(jnp.float32), buckets_BTS, axis=0)
    return jnp.transpose(bias_BTSN, (0, 3, 1, 2)).astype(self.cfg.dtype)


class Norm(nn.Module):
  """LayerNorm or RMSNorm with float32 statistics and a learned scale (and bias for LayerNorm)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD: Array) -> Array:
    cfg = self.cfg
    x = x_BTD.astype(jnp.float32)
    if cfg.norm == 'layernorm':
      x = x - jnp.mean(x, axis=-1, keepdims=True)
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + cfg.norm_eps)
    scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones, ('embed',)),
                       (cfg.d_model,), cfg.param_dtype)
    x = x * scale.astype(jnp.float32)
    if cfg.norm == 'layernorm':
      bias = self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros, ('embed',)),
                        (cfg.d_model,), cfg.param_dtype)
      x = x + bias.astype(jnp.float32)
    return x.astype(cfg.dtype)


class Dense(nn.Module):
  """x times a kernel over x's last `num_input_axes` axes, plus an optional bias. The
  kernel's axes are `names` (input axes first; output axes first where decoding stored
  it under TRANSPOSED_KERNEL, models/layouts.py) and the bias's the output axes, so each
  finds its mesh axis. (Flax's DenseGeneral initialises a flattened kernel, whose
  names cannot be checked against a mesh for kernels of more than two axes.)
  `lora_target` names the layer among LORA_TARGETS: a LoRA adapter attaches there when
  the config targets it (models/lora.py)."""
  cfg: ModelConfig
  features: tuple[int, ...]
  names: tuple[str, ...]
  stddev: float
  num_input_axes: int = 1
  lora_target: str = ''
  deterministic: bool = True  # the adapter's dropout
  bias: bool = True  # cfg.use_bias adds one unless False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg, n = self.cfg, self.num_input_axes
    if self.has_variable('params', TRANSPOSED_KERNEL):  # decoding's (models/layouts.py)
      kernel = _int8_param(self, TRANSPOSED_KERNEL,
                           param_init(self.stddev, self.names[n:] + self.names[:n]),
                           self.features + x.shape[-n:], cfg.param_dtype)
      y = _contract(x.astype(cfg.dtype), _weight(kernel, x, cfg.dtype), n,
                    inputs_from=len(self.features))
    else:
      kernel = _int8_param(self, 'kernel', param_init(self.stddev, self.names),
                           x.shape[-n:] + self.features, cfg.param_dtype)
      product = contract_inputs if _two_d_gradients(cfg) else _contract
      y = product(x.astype(cfg.dtype), _weight(kernel, x, cfg.dtype), n)
    if self.lora_target and lora.adapted(self, self.lora_target):
      y = y + lora.delta(self, x, n, self.names, self.features, self.deterministic)
    if cfg.use_bias and self.bias:
      bias = self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros, self.names[n:]),
                        self.features, cfg.param_dtype)
      y = y + bias.astype(cfg.dtype)
    return y


def _two_d_gradients(cfg: ModelConfig) -> bool:
  """Whether Dense takes its gradients from contract_inputs' 2-D products: on XLA:CPU,
  whose layouts they are for and where they were measured, and neither under remat (its
  policies name dot_general, which a custom VJP hides) nor with LoRA adapters (not
  measured with them)."""
  return jax.default_backend() == 'cpu' and cfg.remat == 'none' and not cfg.lora_rank


def _contract(x: Array, kernel: Array, n: int, inputs_from: int = 0) -> Array:
  """x [..., in...] times a kernel whose n input axes start at axis `inputs_from`: 0 for
  [in..., out...], the number of output axes for decoding's transposed [out..., in...]."""
  contract = (tuple(range(x.ndim - n, x.ndim)), tuple(range(inputs_from, inputs_from + n)))
  return jax.lax.dot_general(x, kernel, (contract, ((), ())))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def contract_inputs(x: Array, kernel: Array, n: int) -> Array:
  """x [..., in...] times kernel [in..., out...] over the n input axes: [..., out...].

  Its gradients are two 2-D products over the flattened tokens M and features I, O:
  dkernel [I, O] = x[M, I] contracted with dy[M, O] over M, and dx = dy kernel^T. They
  are autodiff's products, but from autodiff's layouts XLA:CPU writes the output's
  cotangent [M, O] transposed (as [O, M], element by element, at a fraction of memory
  speed) before the kernel's product: the MLP's activation backward, and attention's
  query, key and value cotangents, moved from attention's rows of heads straight to
  [heads K, B T]. This form writes nothing extra (benchmarks/RESULTS.md has the
  speed-ups on two CPUs). The cotangents come back in the primals' dtypes."""
  return _contract(x, kernel, n)


def _contract_forward(x, kernel, n):
  return _contract(x, kernel, n), (x, kernel)


def _contract_backward(n, residuals, dy):
  x, kernel = residuals
  fan_in = math.prod(kernel.shape[:n])
  x_MI = x.reshape(-1, fan_in)
  fan_out = math.prod(kernel.shape[n:])
  dy_MO = dy.reshape(x_MI.shape[0], fan_out)
  kernel_IO = kernel.reshape(fan_in, fan_out)
  dkernel_IO = jax.lax.dot_general(x_MI, dy_MO, (((0,), (0,)), ((), ())))
  dx_MI = jax.lax.dot_general(dy_MO, kernel_IO, (((1,), (1,)), ((), ())))
  return (dx_MI.reshape(x.shape).astype(x.dtype),
          dkernel_IO.reshape(kernel.shape).astype(kernel.dtype))


contract_inputs.defvjp(_contract_forward, _contract_backward)


def dense(cfg: ModelConfig, features, axis, names, stddev, name, lora_target: str = '',
          deterministic: bool = True) -> Dense:
  """A Dense over the input axes `axis` (-1, or (-2, -1)) onto `features`."""
  features = (features,) if isinstance(features, int) else tuple(features)
  return Dense(cfg, features, names, stddev, 1 if isinstance(axis, int) else len(axis),
               lora_target, deterministic, name=name)


@flax.struct.dataclass
class AttentionMask:
  """Which keys each query sees. XLA and cuDNN take the dense [B, 1, T, S] boolean;
  splash attention takes the segment ids and applies causality inside its kernel, so
  they travel along where known (not over a decode cache)."""
  dense_B1TS: Array
  q_segment_BT: Array | None = None
  kv_segment_BS: Array | None = None
  causal: bool = flax.struct.field(pytree_node=False, default=False)


def attention_mask(q_segment_BT: Array, kv_segment_BS: Array, causal: bool) -> AttentionMask:
  """A query sees a key only in its own document (equal segment ids) and, when causal,
  only at or before its own position. Padding (segment 0) sees padding, so no row is
  fully masked and no NaN reaches weight-0 positions."""
  mask_BTS = q_segment_BT[:, :, None] == kv_segment_BS[:, None, :]
  if causal:
    t, s = q_segment_BT.shape[1], kv_segment_BS.shape[1]
    mask_BTS &= jnp.tril(jnp.ones((t, s), dtype=bool))
  return AttentionMask(mask_BTS[:, None], q_segment_BT, kv_segment_BS, causal)


def dot_product_attention(q_BTNK: Array, k_BSGK: Array, v_BSGK: Array, mask: AttentionMask,
                          bias_BNTS: Array | None, implementation: str, scale: float) -> Array:
  """[B, T, N, K] attention outputs, softmax(scale q.k + bias + mask) v, by the configured
  implementation: splash where it applies (else XLA), `xla_attention`, or
  jax.nn.dot_product_attention's choice ('auto': cuDNN where it compiles) or cuDNN."""
  if implementation == 'splash':
    from models import splash  # the Pallas TPU modules load only when asked for
    if splash.applies(q_BTNK.shape[1], k_BSGK.shape[1], mask.q_segment_BT is not None,
                      bias_BNTS is not None):
      return splash.attention(q_BTNK, k_BSGK, v_BSGK, mask.q_segment_BT, mask.kv_segment_BS,
                              mask.causal, scale)
    implementation = 'xla'
  # float16 too: JAX's own float16 path asks for a dot algorithm that compiles on GPUs only.
  if implementation == 'xla' or (q_BTNK.dtype == jnp.float16 and implementation != 'cudnn'):
    return xla_attention(q_BTNK, k_BSGK, v_BSGK, mask, bias_BNTS, scale)
  return jax.nn.dot_product_attention(
      q_BTNK, k_BSGK, v_BSGK, bias=bias_BNTS, mask=mask.dense_B1TS, scale=scale,
      implementation=None if implementation == 'auto' else implementation)


def causal_query_blocks(length: int) -> int:
  """How many blocks of queries causal self-attention over `length` tokens splits into:
  the most of 8, 4, 2 that cut it into blocks of at least 64 queries; else 1."""
  return next((n for n in (8, 4, 2) if length % n == 0 and length // n >= 64), 1)


def xla_attention(q_BTNK: Array, k_BSGK: Array, v_BSGK: Array, mask: AttentionMask,
                  bias_BNTS: Array | None, scale: float) -> Array:
  """`grouped_attention` in XLA ops. Causal self-attention skips the keys wholly in a
  query block's future: queries [a, b) read keys [0, b) only, which saves (n - 1) / 2n
  of the scores' work for n blocks (37.5% at n = 4; benchmarks/RESULTS.md has the
  speed-up on a CPU)."""
  T, S = q_BTNK.shape[1], k_BSGK.shape[1]
  k_HSK, v_HSK = kv_rows(k_BSGK), kv_rows(v_BSGK)
  blocks = causal_query_blocks(T) if mask.causal and T == S else 1
  size = T // blocks
  out_BTNK = []
  for start in range(0, T, size):
    end = start + size if blocks > 1 else S
    out_BTNK.append(grouped_attention(
        q_BTNK[:, start:start + size], k_HSK[:, :end], v_HSK[:, :end],
        mask.dense_B1TS[:, :, start:start + size, :end],
        None if bias_BNTS is None else bias_BNTS[:, :, start:start + size, :end], scale))
  return out_BTNK[0] if blocks == 1 else jnp.concatenate(out_BTNK, axis=1)


def kv_rows(x_BSGK: Array) -> Array:
  """Keys or values [B, S, G, K] as `grouped_attention` reads them: H = B * G rows
  [H, S, K], row b * G + g holding kv head g of example b."""
  B, S, G, K = x_BSGK.shape
  return jnp.swapaxes(x_BSGK, 1, 2).reshape(B * G, S, K)


def grouped_attention(q_BTNK: Array, k_HSK: Array, v_HSK: Array, mask_B1TS: Array,
                      bias_BNTS: Array | None, scale: float) -> Array:
  """[B, T, N, K] attention outputs over keys and values of H = B * G rows (row b * G + g
  holds kv head g of example b; query head n reads kv head n // (N / G)): float32 scores
  and softmax, probabilities in the values' dtype times the values.

  This is the decode cache's layout: both products have the one batch axis H and
  contract their operands' natural axes, so XLA:CPU reads the cache where it lies and
  writes each step's keys into it in place. Over [B, S, G, K] it transposed the whole
  cache every step (60% of a batch-8 decode step), and over [B, G, S, K] at batch 1 it
  copied it (benchmarks/RESULTS.md)."""
  B, T, N, K = q_BTNK.shape
  H, S = k_HSK.shape[:2]
  G = H // B
  R = N // G  # query heads per kv head
  q_HQK = jnp.transpose(q_BTNK.reshape(B, T, G, R, K), (0, 2, 3, 1, 4)).reshape(H, R * T, K)
  scores_HQS = jnp.einsum('HQK,HSK->HQS', q_HQK, k_HSK, preferred_element_type=jnp.float32)
  scores_BNTS = scores_HQS.reshape(B, N, T, S) * jnp.float32(scale)
  if bias_BNTS is not None:
    scores_BNTS = scores_BNTS + bias_BNTS.astype(jnp.float32)
  scores_BNTS = jnp.where(mask_B1TS, scores_BNTS, -0.7 * jnp.finfo(jnp.float32).max)
  probs_HQS = jax.nn.softmax(scores_BNTS, axis=-1).astype(v_HSK.dtype).reshape(H, R * T, S)
  out_HQK = jnp.einsum('HQS,HSK->HQK', probs_HQS, v_HSK)
  return jnp.transpose(out_HQK.reshape(B, G, R, T, K), (0, 3, 1, 2, 4)).reshape(B, T, N, K)


def attention_scale(cfg: ModelConfig) -> float:
  """What q.k is multiplied by: 1/sqrt(head_dim) unless the model says otherwise (T5: 1)."""
  return cfg.attention_scale or cfg.head_dim ** -0.5


class Attention(nn.Module):
  """Multi-head attention with grouped-query heads: self-attention, or cross-attention
  to `kv_BSD` (an encoder's output) when `cross`."""
  cfg: ModelConfig
  use_rope: bool = False
  cross: bool = False
  deterministic: bool = True  # LoRA adapters' dropout

  @nn.compact
  def __call__(self, x_BTD: Array, mask: AttentionMask, positions_BT: Array | None = None,
               kv_BSD: Array | None = None, bias_BNTS: Array | None = None,
               cache_index: Array | None = None) -> Array:
    """In decode mode, causal self-attention writes this call's keys and values into a
    [B * G, S, K] cache at `cache_index` (an encoder's gets none), and the queries attend
    to the whole cache (`mask` has the cache's S: max_len when the prefill creates it,
    less where a decoding loop resized it, models/transformer.py `resize_cache`).
    Cross-attention projects the encoder output once, on the call that passes `kv_BSD`,
    and later calls (kv_BSD None) reuse the cached keys and values."""
    cfg = self.cfg
    N, G, K = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    std = INIT_STD
    projection = functools.partial(dense, cfg, deterministic=self.deterministic)
    fused = not self.cross and self.has_variable('params', FUSED_QKV)
    if fused:  # decoding's one product for all three (fuse_qkv)
      qkv_BTJK = projection((N + 2 * G, K), -1, ('embed', None, 'kv'), std, FUSED_QKV)(x_BTD)
      q_BTNK, k_BSGK, v_BSGK = jnp.split(qkv_BTJK, (N, N + G), axis=2)
    else:
      q_BTNK = projection((N, K), -1, ('embed', 'heads', 'kv'), std, 'query', 'q')(x_BTD)
    if self.use_rope:
      q_BTNK = apply_rope(q_BTNK, positions_BT, cfg.rope_theta)
    cross_cache = self.cross and cfg.decode
    if cross_cache and kv_BSD is None:  # a later decoding step
      k_HSK = self.get_variable('cache', 'cross_key')
      v_HSK = self.get_variable('cache', 'cross_value')
    else:
      if not fused:
        kv_BSD = kv_BSD if self.cross else x_BTD
        k_BSGK = projection((G, K), -1, ('embed', 'kv_heads', 'kv'), std, 'key', 'k')(kv_BSD)
        v_BSGK = projection((G, K), -1, ('embed', 'kv_heads', 'kv'), std, 'value', 'v')(kv_BSD)
      if self.use_rope:
        k_BSGK = apply_rope(k_BSGK, positions_BT, cfg.rope_theta)
      if not cross_cache and cache_index is None:  # training, scoring, an encoder
        out_BTNK = dot_product_attention(q_BTNK, k_BSGK, v_BSGK, mask, bias_BNTS,
                                         cfg.attention, attention_scale(cfg))
        return self._out(out_BTNK)
      # Decoding: caches hold H = B * G rows of [S, K] for grouped_attention.
      k_HSK, v_HSK = kv_rows(k_BSGK), kv_rows(v_BSGK)
      if cross_cache:
        self.put_variable('cache', 'cross_key', k_HSK)
        self.put_variable('cache', 'cross_value', v_HSK)
      else:  # a causal stack: this call's keys and values go to slots from cache_index on
        cache_shape = (k_HSK.shape[0], cfg.max_len, K)
        cached_k = self.variable('cache', 'cached_key', jnp.zeros, cache_shape, k_HSK.dtype)
        cached_v = self.variable('cache', 'cached_value', jnp.zeros, cache_shape, v_HSK.dtype)
        start = (0, cache_index, 0)
        cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k_HSK, start)
        cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v_HSK, start)
        k_HSK, v_HSK = cached_k.value, cached_v.value
    return self._out(grouped_attention(q_BTNK, k_HSK, v_HSK, mask.dense_B1TS, bias_BNTS,
                                       attention_scale(cfg)))

  def _out(self, out_BTNK: Array) -> Array:
    cfg = self.cfg
    out_std = INIT_STD / math.sqrt(2 * cfg.num_layers)
    return dense(cfg, cfg.d_model, (-2, -1), ('heads', 'kv', 'embed'), out_std, 'out', 'o',
                 self.deterministic)(out_BTNK)


ACTIVATION_FNS = {
    'gelu_tanh': functools.partial(nn.gelu, approximate=True),  # GPT-2's "gelu_new"
    'gelu': functools.partial(nn.gelu, approximate=False),  # the exact erf form (BERT)
    'relu': nn.relu,
    'silu': nn.silu,
}


class Mlp(nn.Module):
  """Position-wise MLP: down(act(x up)), or gated down(act(x gate) * (x up)) as in
  SwiGLU (silu: PaLM, Llama) and GeGLU (gelu_tanh: T5 v1.1)."""
  cfg: ModelConfig
  deterministic: bool = True  # LoRA adapters' dropout

  @nn.compact
  def __call__(self, x_BTD: Array) -> Array:
    cfg = self.cfg
    act = ACTIVATION_FNS[cfg.activation]
    up = functools.partial(dense, cfg, cfg.d_ff, -1, ('embed', 'mlp'), INIT_STD,
                           lora_target='mlp_in', deterministic=self.deterministic)
    if cfg.gated_mlp:
      h_BTF = act(up('gate')(x_BTD)) * up('up')(x_BTD)
    else:
      h_BTF = act(up('up')(x_BTD))
    out_std = INIT_STD / math.sqrt(2 * cfg.num_layers)
    return dense(cfg, cfg.d_model, -1, ('mlp', 'embed'), out_std, 'down', 'mlp_out',
                 self.deterministic)(h_BTF)


class Block(nn.Module):
  """Transformer block: self-attention, optional cross-attention, MLP, each a residual
  branch; pre-norm (x + f(norm(x)), GPT-2, T5, Llama) or post-norm (norm(x + f(x)),
  BERT) as `cfg.block_order` says.

  The same block serves every family: the caller's mask makes it causal (decoders)
  or bidirectional (encoders); `cross_attention` adds attention to an encoder's
  output (encoder-decoder).
  Returns (x, None) so that nn.scan can stack it.
  """
  cfg: ModelConfig
  deterministic: bool = True
  cross_attention: bool = False

  def _residual(self, name: str, branch, x_BTD: Array) -> Array:
    dropout = nn.Dropout(self.cfg.dropout, deterministic=self.deterministic)
    if self.cfg.block_order == 'post_norm':
      return Norm(self.cfg, name=f'post_{name}_norm')(x_BTD + dropout(branch(x_BTD)))
    return x_BTD + dropout(branch(Norm(self.cfg, name=f'pre_{name}_norm')(x_BTD)))

  @nn.compact
  def __call__(self, x_BTD: Array, self_mask: AttentionMask, positions_BT: Array,
               self_bias_BNTS: Array | None = None, encoded_BSD: Array | None = None,
               cross_mask: AttentionMask | None = None, cache_index: Array | None = None):
    cfg = self.cfg
    x_BTD = nn.with_logical_constraint(x_BTD, ('batch', 'length', 'embed'))
    self_attention = Attention(cfg, use_rope=cfg.position == 'rope',
                               deterministic=self.deterministic, name='self_attention')
    x_BTD = self._residual('self_attention', lambda h: self_attention(
        h, self_mask, positions_BT, bias_BNTS=self_bias_BNTS, cache_index=cache_index), x_BTD)
    if self.cross_attention:
      cross_attention = Attention(cfg, cross=True, deterministic=self.deterministic,
                                  name='cross_attention')
      x_BTD = self._residual('cross_attention',
                             lambda h: cross_attention(h, cross_mask, kv_BSD=encoded_BSD), x_BTD)
    x_BTD = self._residual('mlp', Mlp(cfg, self.deterministic, name='mlp'), x_BTD)
    return nn.with_logical_constraint(x_BTD, ('batch', 'length', 'embed')), None
