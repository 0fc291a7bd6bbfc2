"""Int8 weights: per-output-channel scales, and decoding that never holds a float copy
of the whole model (XLA's compiled memory of the jitted decode loop)."""
import dataclasses

import flax.linen as nn
import jax
import numpy as np
import pytest

from inference.generate import decode_tokens, prepare
from inference.quantize import dequantize, quantize_int8
from inference.sampling import Sampling
from models import ModelConfig
import tasks

TINY = ModelConfig(vocab_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                   d_model=32, d_ff=64, max_len=32)
# Weights (17 MB in float32) large beside the key/value cache and the activations.
WIDE = ModelConfig(vocab_size=4096, num_layers=4, num_heads=4, num_kv_heads=4, head_dim=64,
                   d_model=256, d_ff=1024, max_len=32)
PROMPTS = [[5, 9, 20, 33], [7, 8]]


def _params(cfg):
  task = tasks.for_model(cfg)
  # Larger weights than at initialisation, so greedy continuations vary from step to step.
  init = jax.jit(lambda key, batch: jax.tree.map(lambda x: x * 8.0 if x.ndim > 1 else x,
                                                 nn.unbox(task.init(key, batch))))
  return task, init(jax.random.key(0), task.example_batch(1, 8))


def _scales(params) -> dict[str, tuple[int, ...]]:
  """'path/to/kernel' -> shape of its int8 scale."""
  flat = jax.tree_util.tree_flatten_with_path(jax.eval_shape(quantize_int8, params))[0]
  return {'/'.join(p.key for p in path[:-1]): x.shape for path, x in flat
          if path[-1].key == 'scale'}


@pytest.mark.parametrize('scan_layers', [True, False])
def test_each_scale_covers_its_kernels_input_axes(scan_layers):
  """One scale per output channel: attention's out kernel [N, K, D] reduces heads and
  head_dim (not only heads, which left [K, D] scales: 4 / N extra bytes per weight), the
  others their first axis, an embedding each row; a scanned stack keeps its layer axis."""
  cfg = dataclasses.replace(TINY, scan_layers=scan_layers, activation='silu', gated_mlp=True)
  _, params = _params(cfg)
  L, N, G, K, D, F, V = (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                         cfg.d_model, cfg.d_ff, cfg.vocab_size)
  scales = _scales(params)
  layer = 'decoder/layers' if scan_layers else 'decoder/layer_1'
  lead = (L,) if scan_layers else ()
  assert scales[f'{layer}/self_attention/out/kernel'] == lead + (1, 1, D)
  assert scales[f'{layer}/self_attention/query/kernel'] == lead + (1, N, K)
  assert scales[f'{layer}/self_attention/key/kernel'] == lead + (1, G, K)
  assert scales[f'{layer}/mlp/gate/kernel'] == lead + (1, F)
  assert scales[f'{layer}/mlp/down/kernel'] == lead + (1, D)
  assert scales['token_embed/embedding'] == (V, 1)
  # Every weight is within half a step of its int8 value.
  quantized = jax.device_get(jax.jit(quantize_int8)(params))  # checked in NumPy
  for w, q in zip(jax.device_get(jax.tree.leaves(params)), jax.tree.leaves(
      quantized, is_leaf=lambda x: isinstance(x, dict) and 'int8' in x)):
    if isinstance(q, dict):
      assert np.all(np.abs(w - q['int8'].astype(np.float32) * q['scale'])
                    <= 0.5001 * q['scale'])


def _compiled(task, params, ids, real):
  """(the decode loop compiled for these weights, its peak bytes: arguments + outputs +
  temporaries, from XLA's memory analysis of the compiled program)."""
  compiled = decode_tokens.lower(params, ids, real, jax.random.key(0), task=task,
                                 max_new_tokens=8, sampling=Sampling(temperature=0.0),
                                 eos_id=-1).compile()
  m = compiled.memory_analysis()
  return compiled, (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                    - m.alias_size_in_bytes)


@pytest.mark.parametrize('changes', [
    {}, dict(tie_embeddings=False),
    dict(arch='encoder_decoder', position='relative', activation='silu', gated_mlp=True, num_layers=2)])
def test_int8_decoding_peaks_below_float32_and_decodes_the_same(changes):
  """Int8 weights (the tied output projection's too) stay int8 inside the decode loop:
  each matrix is dequantized where it is used, so the compiled program's peak (weights,
  cache, temporaries) is well below float32's, not above it (a float copy of every
  weight beside the int8 ones, whether made before the loop or hoisted out of it by
  XLA). And the tokens are those of float32 decoding with the weights that int8
  represents."""
  model, params = _params(dataclasses.replace(WIDE, **changes))
  task, float_params, ids, real = prepare(model, params, PROMPTS, 8, 'none')
  int8_params = prepare(model, params, PROMPTS, 8, 'int8')[1]
  assert set(int8_params['token_embed']['embedding']) == {'int8', 'scale'}  # still [V, D]
  float32, float32_peak = _compiled(task, float_params, ids, real)
  int8, int8_peak = _compiled(task, int8_params, ids, real)
  float32_weights = sum(x.nbytes for x in jax.tree.leaves(float_params))
  # Float32 holds its weights and little else; int8 its weights (a quarter) and one
  # dequantized matrix at a time (an untied output head: that one for the whole loop).
  assert float32_peak < 1.2 * float32_weights
  assert int8_peak < 0.8 * float32_peak, (int8_peak, float32_peak)
  key = jax.random.key(0)
  tokens = np.asarray(int8(int8_params, ids, real, key))
  assert len({int(t) for t in tokens.ravel()}) > 2  # not a degenerate repetition
  represented = jax.jit(dequantize)(int8_params)  # float, the table [V, D] as int8's
  np.testing.assert_array_equal(
      tokens, np.asarray(_compiled(task, represented, ids, real)[0](represented, ids, real, key)))


def test_quantizing_a_decoding_layout_says_to_quantize_the_model_layout():
  """A [D, F] or [D, V] weight would get its scales over the wrong axis."""
  from models.layouts import transpose_down, transpose_embedding
  _, params = _params(dataclasses.replace(TINY, scan_layers=False))
  for layout in (transpose_down, transpose_embedding):
    with pytest.raises(ValueError, match='model_layout'):
      quantize_int8(layout(params))
