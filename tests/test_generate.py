"""Generation: the key/value cache matches full forward passes; sampling filters hold."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from inference.generate import generate, prepare
from inference.quantize import quantize_int8
from inference.sampling import Sampling, filter_logits, sample
from models import ModelConfig
from models.layers import FUSED_QKV, TRANSPOSED_EMBEDDING, TRANSPOSED_KERNEL
from models.layouts import (fuse_qkv, split_qkv, transpose_down, transpose_embedding,
                            untranspose_down, untranspose_embedding)
import tasks

from conftest import decoding_params

TINY = ModelConfig(vocab_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                   d_model=32, d_ff=64, max_len=32)
PROMPTS = [[5, 9, 20, 33], [7, 8], [100, 101, 102, 103, 104, 105]]
ENCODER_DECODER = dict(arch='encoder_decoder', position='relative', activation='silu', gated_mlp=True)  # T5-like


_params = decoding_params  # (task, params), one per config for the whole session


@functools.lru_cache(maxsize=None)
def _logits(task):
  """task.logits, jitted once per task (every prompt's reference run shares it)."""
  return jax.jit(task.logits)


def _greedy_without_cache(task, params, prompt, steps, length=32):
  """Re-runs the whole (right-padded, so one compiled shape) sequence for every token;
  causality makes the padding invisible to the positions read."""
  logits = _logits(task)
  sequence = list(prompt)
  for _ in range(steps):
    ids = jnp.asarray([sequence + [0] * (length - len(sequence))], jnp.int32)
    batch = {'inputs': ids, 'segment_ids': jnp.ones_like(ids), 'positions': jnp.arange(length)[None]}
    sequence.append(int(jnp.argmax(logits(params, batch)[0, len(sequence) - 1])))
  return sequence[len(prompt):]


def _greedy_encoder_decoder_without_cache(task, params, prompt, steps, length=32):
  """The encoder reads the right-padded prompt; the decoder re-runs its whole sequence
  (starting from pad, as in training) for every token."""
  logits = _logits(task)
  real = (jnp.arange(length) < len(prompt)).astype(jnp.int32)[None]
  encoder = {'encoder_inputs': jnp.asarray([prompt + [0] * (length - len(prompt))], jnp.int32),
             'encoder_segment_ids': real, 'encoder_positions': jnp.arange(length)[None] * real}
  sequence = [0]
  for _ in range(steps):
    ids = jnp.asarray([sequence + [0] * (length - len(sequence))], jnp.int32)
    batch = {**encoder, 'decoder_inputs': ids, 'decoder_segment_ids': jnp.ones_like(ids),
             'decoder_positions': jnp.arange(length)[None]}
    sequence.append(int(jnp.argmax(logits(params, batch)[0, len(sequence) - 1])))
  return sequence[1:]


@pytest.mark.parametrize('changes', [
    {}, dict(scan_layers=False, position='learned', num_kv_heads=4), dict(position='relative'),
    ENCODER_DECODER, dict(arch='encoder_decoder', position='rope', scan_layers=False)])
def test_cached_greedy_equals_rerunning_the_full_sequence(changes):
  cfg = dataclasses.replace(TINY, **changes)
  task, params = _params(cfg)
  cached = generate(task, params, PROMPTS, 10, eos_id=-1)
  reference = (_greedy_encoder_decoder_without_cache if cfg.arch == 'encoder_decoder'
               else _greedy_without_cache)
  expected = [reference(task, params, p, 10) for p in PROMPTS]
  assert cached == expected
  assert any(len(set(row)) > 2 for row in expected)  # not a degenerate repetition


@pytest.mark.parametrize('changes', [dict(position='relative'), ENCODER_DECODER])
def test_a_cache_grown_in_steps_decodes_as_one_of_full_length(changes, monkeypatch):
  """Loops over caches of 8, then 16, then 16 + 1 slots (the decoder's prompts fill 6
  of them; the encoder-decoder's start token 1) give the tokens of the reference."""
  from inference import generate as generate_lib
  assert generate_lib.cache_lengths(6, 17, shortest=4) == [8, 16, 17]
  assert generate_lib.cache_lengths(100, 101) == [101]
  lengths, calls = generate_lib.cache_lengths, []
  def short_lengths(filled, total):
    calls.append((filled, total))
    return lengths(filled, total, shortest=4)
  monkeypatch.setattr(generate_lib, 'cache_lengths', short_lengths)
  cfg = dataclasses.replace(TINY, **changes)
  task, params = _params(cfg)
  cached = generate(task, params, PROMPTS, 11, eos_id=-1)
  reference = (_greedy_encoder_decoder_without_cache if cfg.arch == 'encoder_decoder'
               else _greedy_without_cache)
  assert calls  # traced anew with the short lengths, not taken from the jit cache
  assert cached == [reference(task, params, p, 11) for p in PROMPTS]


def _paths(params) -> list[str]:
  return ['/'.join(p.key for p in path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]


def _same_model(task, laid_out, params, undone, seed: int) -> None:
  """The weights in a decoding layout give the model layout's logits on random tokens,
  and `undone` (that layout undone) gives back `params` exactly."""
  tokens = jax.random.randint(jax.random.key(seed), (2, 16), 2, task.cfg.vocab_size)
  batch = {name: tokens if name.endswith('inputs') else x
           for name, x in task.example_batch(2, 16).items()}
  np.testing.assert_allclose(_logits(task)(laid_out, batch), _logits(task)(params, batch),
                             rtol=1e-5, atol=1e-5)
  assert jax.tree.all(jax.tree.map(jnp.array_equal, undone, params))


@pytest.mark.parametrize('changes', [
    dict(use_bias=True, position='rope'), dict(ENCODER_DECODER, use_bias=True),
    dict(position='learned', num_kv_heads=4)])
@pytest.mark.parametrize('int8', [False, True])
def test_fused_qkv_computes_what_the_three_projections_do(changes, int8):
  """Decoding joins each self-attention's query, key and value (grouped-query heads,
  biases, int8 values and scales alike); cross-attention keeps its own. The model then
  computes the same logits from the joined tree."""
  cfg = dataclasses.replace(TINY, scan_layers=False, **changes)
  task, params = _params(cfg)
  params = quantize_int8(params) if int8 else params
  fused = fuse_qkv(params)
  paths = _paths(fused)
  layers = cfg.num_layers * (2 if cfg.arch == 'encoder_decoder' else 1)
  assert len({p.rsplit(f'/{FUSED_QKV}/', 1)[0] for p in paths if f'/{FUSED_QKV}/' in p}) == layers
  assert not any('self_attention/query' in p or 'self_attention/key' in p for p in paths)
  assert any('cross_attention/key' in p for p in paths) == (cfg.arch == 'encoder_decoder')
  _same_model(task, fused, params, split_qkv(fused, cfg), seed=1)


@pytest.mark.parametrize('changes, joins', [
    (dict(lora_rank=2, lora_targets=('q', 'v')), False),
    (dict(lora_rank=2, lora_targets=('k',)), False),
    (dict(lora_rank=2, lora_targets=('o',)), True), (dict(scan_layers=True), False)])
def test_fused_qkv_leaves_adapted_and_scanned_projections_alone(changes, joins):
  """An adapter on any of query, key or value, or a scanned stack, keeps the three apart;
  one on the output projection does not."""
  cfg = dataclasses.replace(TINY, **{'scan_layers': False, **changes})
  task, params = decoding_params(cfg)
  # Adapters that change the output (lora_b starts at zero).
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: (jax.random.normal(jax.random.key(len(path)), x.shape) * 0.5
                       if path[-1].key == 'lora_b' else x), params)
  fused = fuse_qkv(params)
  assert (_paths(fused) != _paths(params)) == joins
  if joins:
    batch = {**task.example_batch(2, 16), 'inputs': jnp.arange(32).reshape(2, 16) + 3}
    unadapted = jax.tree.map(lambda x: x, params)
    unadapted['decoder']['layer_0']['self_attention']['out']['lora_b'] *= 0
    assert not np.allclose(_logits(task)(unadapted, batch), _logits(task)(params, batch),
                           atol=1e-3)  # the adapter counts
    np.testing.assert_allclose(_logits(task)(fused, batch), _logits(task)(params, batch),
                               rtol=1e-4, atol=1e-4)


def test_fused_qkv_keeps_kernels_split_over_devices_or_traced_apart():
  """A kernel whose shards lie on two devices, or one inside jit (where nothing says
  where it lies), is not joined; one copied whole to each device is."""
  from models.layouts import _on_one_device
  def kernel(devices, replicated):
    sharding = type('Sharding', (), {'device_set': set(range(devices)),
                                     'is_fully_replicated': replicated})
    return type('Kernel', (), {'ndim': 3, 'sharding': sharding()})()
  assert not _on_one_device(kernel(2, replicated=False))
  assert _on_one_device(kernel(2, replicated=True)) and _on_one_device(kernel(1, False))
  assert _on_one_device(np.zeros(3)) and _on_one_device(jnp.zeros(3))
  split = {'self_attention': {name: {'kernel': kernel(2, False)}
                              for name in ('query', 'key', 'value')}}
  assert fuse_qkv(split) == split
  params = _params(dataclasses.replace(TINY, scan_layers=False))[1]
  assert _paths(jax.jit(fuse_qkv)(params)) == _paths(params)
  assert _paths(fuse_qkv(params)) != _paths(params)


def test_int8_joined_and_transposed_kernels_stay_int8_while_decoding():
  from inference.quantize import for_decoding
  from models.layers import is_int8
  quantized = quantize_int8(_params(dataclasses.replace(TINY, scan_layers=False))[1])
  layer = for_decoding(transpose_down(fuse_qkv(quantized)))['decoder']['layer_0']
  assert is_int8(layer['self_attention'][FUSED_QKV]['kernel'])
  assert is_int8(layer['mlp']['down'][TRANSPOSED_KERNEL])


def test_layouts_leave_weights_split_over_devices_alone():
  """A down kernel or an embedding whose shards lie on two devices keeps its layout."""
  def array(shape):
    sharding = type('Sharding', (), {'device_set': {0, 1}, 'is_fully_replicated': False})
    return type('Array', (), {'ndim': len(shape), 'shape': shape, 'sharding': sharding()})()
  split = {'mlp': {'down': {'kernel': array((8, 4))}},
           'token_embed': {'embedding': array((16, 4))}}
  assert transpose_down(split) == split and transpose_embedding(split) == split


def test_prepare_keeps_the_model_layout_off_a_cpu(monkeypatch):
  """The layouts were measured on XLA:CPU; elsewhere the weights stay as the model lays
  them out (their copies would take accelerator memory)."""
  from inference import generate as generate_lib
  task, params = _params(dataclasses.replace(TINY, scan_layers=False))
  monkeypatch.setattr(generate_lib, 'lays_out_for_speed', lambda: False)
  assert _paths(prepare(task, params, PROMPTS[:1], 10, 'none')[1]) == _paths(params)
  monkeypatch.setattr(generate_lib, 'lays_out_for_speed', lambda: True)
  assert _paths(prepare(task, params, PROMPTS[:1], 10, 'none')[1]) != _paths(params)


@pytest.mark.parametrize('changes', [{}, ENCODER_DECODER])
def test_one_row_per_step_decodes_with_the_joined_kernels(changes):
  """prepare joins query, key and value and transposes the MLP's output projection for
  one row per step (one prompt by default; a scanned stack once unrolled), not for
  several; one prompt then decodes as the full-sequence reference."""
  cfg = dataclasses.replace(TINY, **changes)
  task, params = _params(cfg)
  def joined(prompts, **kwargs):
    paths = _paths(prepare(task, params, prompts, 10, 'none', **kwargs)[1])
    fused = any(f'/{FUSED_QKV}/' in p for p in paths)
    assert fused == any(p.endswith(f'/down/{TRANSPOSED_KERNEL}') for p in paths)
    return fused
  assert joined(PROMPTS[:1])
  assert not joined(PROMPTS) and not joined(PROMPTS[:1], rows=4) and joined(PROMPTS, rows=1)
  reference = (_greedy_encoder_decoder_without_cache if cfg.arch == 'encoder_decoder'
               else _greedy_without_cache)
  for prompt in PROMPTS[::2]:
    assert generate(task, params, [prompt], 10, eos_id=-1) == [reference(task, params, prompt, 10)]


def test_each_decoding_path_joins_for_the_rows_its_steps_decode(monkeypatch):
  """One row per step joins query, key and value: plain decoding of one prompt and a
  speculative draft; beams and a speculative target's K + 1 tokens do not."""
  from inference import beam, generate as generate_lib, speculative
  joins = []
  monkeypatch.setattr(generate_lib, 'fuse_qkv', lambda params: joins.append(1) or params)
  task, params = _params(dataclasses.replace(TINY, scan_layers=False))
  def count(run):
    joins.clear()
    run()
    return len(joins)
  assert count(lambda: generate(task, params, PROMPTS[:1], 2, eos_id=-1)) == 1
  assert count(lambda: generate(task, params, PROMPTS, 2, eos_id=-1)) == 0
  assert count(lambda: beam.beam_search(task, params, PROMPTS[:1], 2, beam_size=2)) == 0
  draft = speculative.Draft(task, params, 2)
  # One prompt: the target checks K + 1 = 3 rows a call (apart), the draft one (joined).
  assert count(lambda: speculative.generate(task, params, draft, PROMPTS[:1], 2)) == 1


@pytest.mark.parametrize('changes', [
    {}, ENCODER_DECODER, dict(position='learned', tied_output_scale=True)])
def test_transposed_embedding_computes_what_the_model_layout_does(changes):
  """Decoding stores a tied embedding [D, V]: the model computes the same logits from it
  (its lookups and its output projection), and untranspose_embedding gives back the
  [V, D] table exactly. An int8 embedding, and one inside jit, stay [V, D]."""
  cfg = dataclasses.replace(TINY, scan_layers=False, **changes)
  task, params = _params(cfg)
  transposed = transpose_embedding(params)
  assert 'token_embed/' + TRANSPOSED_EMBEDDING in _paths(transposed)
  assert not any(p.endswith('token_embed/embedding') for p in _paths(transposed))
  assert transposed['token_embed'][TRANSPOSED_EMBEDDING].shape == (cfg.d_model, cfg.vocab_size)
  _same_model(task, transposed, params, untranspose_embedding(transposed), seed=2)
  int8 = quantize_int8(params)
  assert _paths(transpose_embedding(int8)) == _paths(int8)
  assert _paths(jax.jit(transpose_embedding)(params)) == _paths(params)


@pytest.mark.parametrize('changes', [
    dict(use_bias=True), ENCODER_DECODER, dict(lora_rank=2, lora_targets=('mlp_out',)),
    dict(lora_rank=2, lora_targets=('mlp_in',))])
@pytest.mark.parametrize('int8', [False, True])
def test_transposed_down_computes_what_the_model_layout_does(changes, int8):
  """One-row decoding stores each MLP's output projection [D, F] (biases, gated MLPs,
  int8 values and scales alike): the same logits, and untranspose_down gives back the
  model's layout exactly. A LoRA-adapted one stays [F, D]; so does one inside jit."""
  cfg = dataclasses.replace(TINY, scan_layers=False, **changes)
  task, params = _params(cfg)
  params = quantize_int8(params) if int8 else params
  transposed = transpose_down(params)
  adapted = 'mlp_out' in cfg.lora_targets and cfg.lora_rank > 0
  layers = cfg.num_layers * (2 if cfg.arch == 'encoder_decoder' else 1)
  downs = [p for p in _paths(transposed) if f'/down/{TRANSPOSED_KERNEL}' in p]
  assert len({p.split('/down/')[0] for p in downs}) == (0 if adapted else layers)
  _same_model(task, transposed, params, untranspose_down(transposed), seed=3)
  assert _paths(jax.jit(transpose_down)(params)) == _paths(params)


@pytest.mark.parametrize('tied', [True, False])
def test_prepare_transposes_a_tied_embedding_for_any_batch(tied):
  """prepare transposes the embedding that is also the output projection, for one prompt
  or several; an untied one (only looked up) stays. Either decodes as the reference."""
  cfg = dataclasses.replace(TINY, tie_embeddings=tied)
  task, params = _params(cfg)
  for prompts in (PROMPTS[:1], PROMPTS):
    prepared = prepare(task, params, prompts, 10, 'none')[1]
    assert ('token_embed/' + TRANSPOSED_EMBEDDING in _paths(prepared)) == tied
  assert generate(task, params, PROMPTS, 10, eos_id=-1) == [
      _greedy_without_cache(task, params, p, 10) for p in PROMPTS]


def test_rows_stop_at_their_own_eos():
  cfg = TINY
  _, params = _params(cfg)
  free = generate(tasks.for_model(cfg), params, PROMPTS, 10, eos_id=-1)
  eos = free[0][3]  # pretend row 0's 4th token is EOS
  out = generate(tasks.for_model(cfg), params, PROMPTS, 10, eos_id=eos)
  for row_free, row in zip(free, out):
    cut = row_free.index(eos) + 1 if eos in row_free else len(row_free)
    assert row == row_free[:cut]
  assert len(out[0]) <= 4


def test_repetition_penalty_lowers_seen_tokens_only():
  from inference.sampling import penalize_repeats
  logits = jnp.array([[2.0, -2.0, 2.0, -2.0]])
  seen = jnp.array([[True, True, False, False]])
  np.testing.assert_allclose(penalize_repeats(logits, seen, 2.0), [[1.0, -4.0, 2.0, -2.0]])


def test_top_k_and_top_p_never_sample_outside_their_sets():
  logits = jax.random.normal(jax.random.key(0), (4, 50)) * 3
  probs = np.asarray(jax.nn.softmax(logits, axis=-1))
  for i in range(200):
    key = jax.random.key(i)
    top_k = np.asarray(sample(logits, key, Sampling(temperature=1.0, top_k=5)))
    top_p = np.asarray(sample(logits, key, Sampling(temperature=1.0, top_p=0.6)))
    for row in range(4):
      assert top_k[row] in np.argsort(-probs[row])[:5]
      order = np.argsort(-probs[row])
      nucleus = order[:np.searchsorted(np.cumsum(probs[row][order]), 0.6) + 1]
      assert top_p[row] in nucleus
  kept = np.asarray(filter_logits(logits, 5, 1.0) > jnp.finfo(jnp.float32).min).sum(-1)
  np.testing.assert_array_equal(kept, 5)


def test_temperature_to_zero_is_greedy_and_seeds_reproduce():
  cfg = TINY
  _, params = _params(cfg)
  task = tasks.for_model(cfg)
  greedy = generate(task, params, PROMPTS, 8, Sampling(temperature=0.0), eos_id=-1)
  cold = generate(task, params, PROMPTS, 8, Sampling(temperature=1e-4), seed=3, eos_id=-1)
  assert cold == greedy
  hot = lambda seed: generate(task, params, PROMPTS, 8, Sampling(temperature=2.0, top_k=50),
                              seed=seed, eos_id=-1)
  assert hot(1) == hot(1)
  assert hot(1) != hot(2)


@pytest.mark.parametrize('prompts, kwargs, message', [
    ([[5] * 30], {}, 'is 30 tokens and --max_new_tokens=8'),
    ([[]], {}, 'empty'),
    ([[5]], dict(sampling=Sampling(top_p=0.0)), 'top_p'),
    ([[5]], dict(sampling=Sampling(top_p=1.5)), 'top_p'),
    ([[5]], dict(sampling=Sampling(temperature=-1.0)), 'temperature'),
])
def test_bad_requests_say_what_to_change(prompts, kwargs, message):
  with pytest.raises(ValueError, match=message):
    generate(tasks.for_model(TINY), None, prompts, 8, **kwargs)


def test_sampling_from_a_workdir_without_checkpoint_says_to_train(tmp_path):
  from configs import default
  from inference.load import load_run
  with pytest.raises(FileNotFoundError, match='train first'):
    load_run(default.get_config(), str(tmp_path))


def test_int8_weights_take_a_quarter_of_the_memory_and_decode():
  from inference.quantize import quantize_int8, weight_bytes
  _, params = _params(TINY)
  assert weight_bytes(jax.jit(quantize_int8)(params)) < 0.35 * weight_bytes(params)
  out = generate(tasks.for_model(TINY), params, PROMPTS, 6, eos_id=-1, quantize='int8')
  assert [len(row) for row in out] == [6, 6, 6]


def test_spans_fill_their_sentinels_and_a_prompt_without_mask_is_continued():
  from inference.fill_mask import fill_spans, span_prompt
  from input_pipeline.tokenizer import EOS_ID, SENTINEL_IDS

  class Letters:  # a tokenizer of single letters: 'a' is 200, 'b' 201, ...
    eos_id, sentinel_ids = EOS_ID, SENTINEL_IDS
    encode = staticmethod(lambda text: [200 + ord(c) - ord('a') for c in text])
    decode = staticmethod(lambda ids: ''.join(chr(ord('a') + i - 200) for i in ids))

  s0, s1 = SENTINEL_IDS[:2]
  assert span_prompt(Letters, 'ab[MASK]c[MASK]') == [200, 201, s0, 202, s1, EOS_ID]
  assert span_prompt(Letters, 'ab') == [200, 201, s0, EOS_ID]
  prompt = span_prompt(Letters, 'ab[MASK]c[MASK]d')
  assert fill_spans(Letters, prompt, [s0, 210, 211, s1, 212, EOS_ID, 213]) == 'abklcmd'
  assert fill_spans(Letters, prompt, [s0, 210, EOS_ID]) == 'abkcd'  # the second span left empty
