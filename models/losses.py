"""Loss math shared by the tasks: token cross-entropy as metric *sums* (never means),
so micro-batches, eval batches and hosts add up exactly; the step divides by the
summed 'weight' (number of scored tokens) once.
"""
import jax
import jax.numpy as jnp

Array = jax.Array
Batch = dict[str, Array]


def cross_entropy_sums(logits_BTV: Array, targets_BT: Array, weights_BT: Array,
                       z_loss: float = 0.0) -> tuple[Array, dict[str, Array]]:
  """Token cross-entropy in float32, with an optional z-loss on log Z.

  Returns (objective_sum, metrics) where objective_sum = Σ w·(nll + z_loss·logZ²)
  and metrics hold 'loss' (Σ w·nll), 'z_loss', 'correct' and 'weight' sums.
  """
  logits_BTV = logits_BTV.astype(jnp.float32)
  log_z_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
  nll_BT = log_z_BT - target_logit_BT
  z_BT = z_loss * jnp.square(log_z_BT)
  correct_BT = (first_argmax(logits_BTV) == targets_BT).astype(jnp.float32)
  metrics = {
      'loss': jnp.sum(nll_BT * weights_BT),
      'z_loss': jnp.sum(z_BT * weights_BT),
      'correct': jnp.sum(correct_BT * weights_BT),
      'weight': jnp.sum(weights_BT),
  }
  return metrics['loss'] + metrics['z_loss'], metrics


def first_argmax(x: Array) -> Array:
  """jnp.argmax over the last axis (int32, the first index of the largest value) as two
  plain reductions: the largest value, then the least of index + V·gap, where
  gap = min(1, ceil(max - x)) is 0 at the largest values and 1 elsewhere (a backend that
  flushes subnormal numbers, as XLA:CPU does, reads values less than float32's least
  normal number apart as equal). -inf is fine where the largest value is finite; a row
  holding a NaN, or whose largest value is +inf, gives 0 (XLA's NaN to int), where
  argmax gives the first such index. XLA:CPU runs argmax's (value, index) reduction
  unvectorized: over the peer config's [4096, 8192] logits it took 78 ms where this
  takes about 5 (benchmarks/RESULTS.md). Decoding keeps jnp.argmax: over [8, 8192] the
  two ran alike in a decode step. Floats wider than 32 bits, integers, booleans and rows
  past 2^24 values (float32 indexes exactly below that) take jnp.argmax."""
  V = x.shape[-1]
  exact = jnp.issubdtype(x.dtype, jnp.floating) and jnp.finfo(x.dtype).bits <= 32
  if V > 2 ** 24 or not exact:
    return jnp.argmax(x, axis=-1).astype(jnp.int32)
  x = jax.lax.stop_gradient(x.astype(jnp.float32))
  max_x = jnp.max(x, axis=-1, keepdims=True)
  index = jax.lax.broadcasted_iota(jnp.float32, x.shape, x.ndim - 1)
  gap = jnp.minimum(1.0, jnp.ceil(max_x - x))
  return jnp.min(index + V * gap, axis=-1).astype(jnp.int32)


def balanced_chunk(length: int, chunk: int) -> int:
  """The chunk `chunked_cross_entropy_sums` uses for a sequence of `length`: as many
  chunks as `chunk` positions need, each as long as they must be to cover it, so padding
  adds less than one position per chunk (a chunk of 256 over a 114-token T5 decoder
  sequence is one chunk of 114, not 256)."""
  num_chunks = -(-length // min(chunk, length))
  return -(-length // num_chunks)


def chunked_cross_entropy_sums(logits_fn, h_BTD: Array, targets_BT: Array, weights_BT: Array,
                               chunk: int, z_loss: float = 0.0
                               ) -> tuple[Array, dict[str, Array]]:
  """`cross_entropy_sums` of logits_fn(h_BTD, c) over at most `chunk` sequence positions
  at a time (equal chunks, `balanced_chunk`; c: the chunk's index, e.g. for a dropout
  key), so the [B, T, V] logits never exist whole: each chunk's logits are recomputed in
  the backward pass (jax.checkpoint), which keeps only the hidden states. A sequence that
  is not a whole number of chunks is padded with positions of weight 0 (fewer than one
  per chunk). The batch axis stays where it is, so its sharding does too; head parameters
  that a mesh shards (fsdp, tensor) are gathered, and their gradients reduced, once per
  chunk. Same sums and gradients as the whole sequence at once, up to float summation
  order."""
  B, T, D = h_BTD.shape
  chunk = balanced_chunk(T, chunk)
  num_chunks = -(-T // chunk)
  pad = num_chunks * chunk - T

  def chunks(x_BT):  # [B, T, ...] -> [num_chunks, B, chunk, ...]
    x_BT = jnp.pad(x_BT, [(0, 0), (0, pad)] + [(0, 0)] * (x_BT.ndim - 2))
    return jnp.swapaxes(x_BT.reshape(B, num_chunks, chunk, *x_BT.shape[2:]), 0, 1)

  @jax.checkpoint
  def chunk_sums(h_BcD, targets_Bc, weights_Bc, c):
    return cross_entropy_sums(logits_fn(h_BcD, c), targets_Bc, weights_Bc, z_loss)

  def add_chunk(total, xs):
    return jax.tree.map(jnp.add, total, chunk_sums(*xs)), None

  xs = (chunks(h_BTD), chunks(targets_BT), chunks(weights_BT), jnp.arange(num_chunks))
  zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype),
                       jax.eval_shape(chunk_sums, *jax.tree.map(lambda x: x[0], xs)))
  total, _ = jax.lax.scan(add_chunk, zeros, xs)
  return total


def normalize_metrics(sums: dict[str, Array]) -> dict[str, Array]:
  """Means of metric sums. A sum named 'P_x' is divided by its group's count 'P_count'
  where one exists (e.g. BERT's per-example 'nsp_*' metrics over the summed example
  weights, so padding rows count 0); every other sum by the token 'weight'. The counts
  themselves are dropped."""
  tokens = jnp.maximum(sums['weight'], 1.0)
  counts = {k[:-len('_count')]: jnp.maximum(v, 1.0) for k, v in sums.items()
            if k.endswith('_count')}
  def count_of(name):
    return next((c for group, c in counts.items() if name.startswith(group + '_')), tokens)
  return {k: v / count_of(k) for k, v in sums.items()
          if k != 'weight' and not k.endswith('_count')}


def example_batch(batch_size: int, seq_len: int) -> Batch:
  """A decoder batch of the right shapes and dtypes, for initialisation and shape inference."""
  ids = jnp.zeros((batch_size, seq_len), jnp.int32)
  return {'inputs': ids, 'targets': ids, 'segment_ids': ids + 1,
          'positions': jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), ids.shape),
          'weights': jnp.ones((batch_size, seq_len), jnp.float32)}
