"""FLOPs and MFU accounting (train/flops.py), embedding sizes of the shipped configs, and
the start-up check of model dimensions against the mesh (config_checks.validate_against_mesh)."""
import dataclasses
import glob
import importlib
import math
import os
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import pytest

import tasks
from benchmarks import flops_accounting
from configs import default
from models import ModelConfig, lora
from scaling import estimate
from train import config_checks, flops
from train import frozen as frozen_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- peak FLOP/s -------------------------------------------------------------------------

def _peak(monkeypatch, device_kind: str, dtype=jnp.bfloat16) -> float:
  fake = types.SimpleNamespace(platform='gpu' if 'TPU' not in device_kind else 'tpu',
                               device_kind=device_kind)
  monkeypatch.setattr(jax, 'devices', lambda *args, **kwargs: [fake])
  return flops.peak_flops_per_device(dtype)


@pytest.mark.parametrize('kind,bf16', [
    ('NVIDIA L40S', 362e12), ('NVIDIA L40', 181e12), ('NVIDIA L4', 121e12),
    ('NVIDIA H100 PCIe', 756.5e12), ('NVIDIA H100 80GB HBM3', 989.5e12),
    ('NVIDIA A100-SXM4-80GB', 312e12), ('NVIDIA A10', 125e12),
])
def test_a_device_kind_gets_its_own_peak_not_one_whose_name_it_contains(monkeypatch, kind,
                                                                        bf16):
  # 'L4' is a substring of 'L40S' and 'L40', 'H100' of 'H100 PCIe'
  assert _peak(monkeypatch, kind) == bf16


def test_an_unknown_device_has_no_peak(monkeypatch):
  assert math.isnan(_peak(monkeypatch, 'NVIDIA L400X'))


@pytest.mark.parametrize('kind,bf16', [
    ('TPU v2', 45e12 / 2),  # chip of two cores, each a JAX device
    ('TPU v3', 123e12 / 2),
    ('TPU v4', 275e12),  # megacore: one JAX device per chip
    ('TPU v5p', 459e12), ('TPU v5', 459e12),
    ('TPU v5 lite', 197e12), ('TPU v6 lite', 918e12),
])
def test_tpu_peaks_are_per_jax_device(monkeypatch, kind, bf16):
  assert _peak(monkeypatch, kind) == bf16


@pytest.mark.parametrize('kind,fp32', [
    ('NVIDIA A100-SXM4-40GB', 156e12), ('NVIDIA H100 80GB HBM3', 494.5e12),
    ('NVIDIA H200', 494.5e12), ('NVIDIA L4', 60e12), ('NVIDIA A10', 62.5e12),
    ('NVIDIA L40S', 183e12), ('Tesla V100-SXM2-16GB', 15.7e12),  # V100: no TF32
])
def test_float32_peak_on_gpus_is_the_tf32_tensor_core_figure(monkeypatch, kind, fp32):
  assert _peak(monkeypatch, kind, jnp.float32) == fp32


# --- training FLOPs: attention width is num_heads x head_dim -------------------------------

WIDE_HEADS = ModelConfig(vocab_size=256, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32,
                         d_model=32, d_ff=64, max_len=32, position='learned')  # N K = 4 d_model


@pytest.mark.parametrize('arch', ['decoder', 'encoder', 'encoder_decoder'])
def test_attention_flops_use_num_heads_times_head_dim_not_d_model(arch):
  # an encoder-decoder with a decoder deeper than its encoder: each stack counts its own layers
  cfg = dataclasses.replace(WIDE_HEADS, arch=arch,
                            num_decoder_layers=3 if arch == 'encoder_decoder' else 0)
  task = tasks.for_model(cfg)
  # Counting reads the parameters' shapes only: none is materialised.
  params = nn.unbox(jax.eval_shape(task.init, jax.random.key(0), task.example_batch(1, 8)))
  batch, seq_len, width = 3, 16, cfg.num_heads * cfg.head_dim
  assert width != cfg.d_model
  counts = flops.matmul_param_counts(params, cfg.tie_embeddings)
  if arch == 'encoder_decoder':
    s, t = seq_len, task.scored_length(seq_len)
    # the decoder's cross-attention keys and values are projections of the S encoder outputs
    decoder_layers = cfg.num_decoder_layers
    assert counts['cross_kv'] == decoder_layers * 2 * cfg.d_model * cfg.num_kv_heads * cfg.head_dim
    expected = batch * (6 * ((counts['encoder'] + counts['cross_kv']) * s
                             + (counts['decoder'] + counts['other']) * t)
                        + 12 * width * (cfg.num_layers * s * s + decoder_layers * (t * t + t * s)))
  else:
    expected = batch * seq_len * (6 * sum(counts.values())
                                  + 12 * cfg.num_layers * seq_len * width)
  assert task.train_flops_per_step(params, batch, seq_len) == pytest.approx(expected)


@pytest.mark.parametrize('arch,head_dim,d_model', [
    ('decoder', 64, 64), ('encoder_decoder', 64, 64), ('encoder_decoder', 32, 128)])
def test_forward_flops_agree_with_xla_cost_analysis_within_five_percent(arch, head_dim, d_model):
  # 4 heads of 64 on d_model 64: counting the attention matmuls with d_model instead of
  # N K misses a quarter of the forward FLOPs at this length. In the encoder-decoder, the
  # cross-attention key and value projections run over the S encoder outputs, not the
  # T (~S / 4) targets: counting them per target missed 9% of T5's forward FLOPs.
  config = default.get_config()
  config.model.update(arch=arch, num_layers=2, num_heads=4, head_dim=head_dim, d_model=d_model,
                      d_ff=4 * d_model, max_len=128, vocab_size=1024, position='learned',
                      scan_layers=False)  # XLA's cost analysis counts a loop body once
  config.data.update(seq_len=128, batch_size=2)
  config.train.steps = 10
  task = estimate.model_task(config, 'cpu')
  params = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), estimate.abstract_params(task))
  batch = task.train_batch(config.data.batch_size, config.data.seq_len)
  ours = task.forward_flops_per_step(params, config.data.batch_size, config.data.seq_len)
  analysis = jax.jit(task.logits).lower(params, batch).compile().cost_analysis()
  analysis = analysis[0] if isinstance(analysis, list) else analysis
  assert abs(ours / analysis['flops'] - 1) < 0.05, (ours, analysis['flops'])


# --- training FLOPs with a frozen base (LoRA) ------------------------------------------------

@pytest.mark.parametrize('case', [
    'decoder', 'decoder/q+k+v+o+mlp_in+mlp_out',
    # Nothing below the output head trains: the stack needs its forward pass only; counting
    # its input gradients and attention's backward doubled the step's FLOPs.
    'decoder/head/untied',
    'decoder/mlp_out',  # the first layer's attention: forward only
    'decoder/mlp_in',  # ... and its frozen down projection, above the adapter, does not
    'encoder_decoder/q+v', 'encoder_decoder/head/untied', 'encoder/q+v@masked_lm'])
def test_train_flops_with_a_frozen_base_agree_with_xla_cost_analysis(case):
  """The gradient of the loss over the trained part, as the train step takes it: XLA
  prunes the weight gradients of frozen kernels and every input gradient below the lowest
  trained parameter."""
  ours, xla = flops_accounting.step_flops(flops_accounting.case_config(case))
  assert abs(ours / xla - 1) < 0.06, (ours, xla)


@pytest.mark.parametrize('case,changes', [
    # Only the values train in the first layer: its attention's backward is dV alone (2 of
    # 8 FLOPs per query-key pair); counting all 8 was 9% over XLA's at this length.
    ('decoder/v', {}),
    # A relative bias table adds to every layer's scores: the first layer's attention needs
    # its score gradient only, and nothing below it an input gradient (10% over before).
    ('decoder/head/untied', dict(position='relative', train_in_full='relative_attention_bias')),
])
def test_train_flops_count_only_the_attention_gradients_a_long_sequence_needs(case, changes):
  config = flops_accounting.case_config(case, seq_len=512)
  if 'train_in_full' in changes:
    config.lora.train_in_full = changes.pop('train_in_full')
  config.model.update(changes)
  ours, xla = flops_accounting.step_flops(config)
  assert abs(ours / xla - 1) < 0.06, (ours, xla)


def test_the_token_heads_feed_no_sequence_head_but_the_final_norm_feeds_both():
  kernel = jax.ShapeDtypeStruct((4, 4), jnp.float32)
  params = {'head': {'final_norm': {'scale': jax.ShapeDtypeStruct((4,), jnp.float32)},
                     'transform': {'kernel': kernel}},
            'pooler': {'kernel': kernel}, 'next_sentence': {'kernel': kernel}}
  pooler = flops.forward_position(('pooler', 'kernel'))
  transform_trains = flops.Trained(params, {'head': {'final_norm': params['head']['final_norm']},
                                            'pooler': params['pooler']})
  assert not transform_trains.below(pooler)
  assert flops.Trained(params, {'pooler': params['pooler']}).below(pooler)  # the norm trains
  # A trained pooler feeds the next-sentence classifier above it, whatever token head trains.
  next_sentence = flops.forward_position(('next_sentence', 'kernel'))
  assert flops.Trained(params, {'head': {'final_norm': params['head']['final_norm']},
                                'next_sentence': params['next_sentence']}).below(next_sentence)


def test_the_encoder_reaches_the_decoder_through_cross_attention_only():
  """LoRA on the MLPs' output projections: the first trained parameters sit after the first
  layers' attention, in the encoder and the decoder alike (too little work, at this size,
  for the comparison with XLA to see these rules)."""
  task, params, frozen = _params_and_frozen(flops_accounting.case_config(
      'encoder_decoder/mlp_out'))
  trained = flops.Trained(params, frozen)
  position = lambda *names: flops.forward_position(('decoder', 'layer_0') + names)
  assert not trained.below(position('self_attention', 'query'))
  assert not trained.below(position('cross_attention', 'query'))
  assert trained.below(position('cross_attention', 'core'))  # keys from the trained encoder
  assert trained.below(position('mlp', 'up'))
  # the cross-attention keys and values multiply the encoder's output: input gradients
  products = [('decoder', 'cross_attention', 1, 1, 1)]
  assert flops.attention_train_flops(1, products, trained) == 4 + 2 * 3  # dV, dP, dK
  key = params['decoder']['layer_0']['cross_attention']['key']
  tokens = dict.fromkeys(('encoder', 'decoder', 'cross_kv', 'sequence', 'other'), 1)
  assert flops.matmul_train_flops({'decoder': {'layer_0': {'cross_attention': {'key': key}}}},
                                  tokens, False, trained) == (2 + 2) * key['kernel'].size


def test_a_parameter_of_an_unknown_module_has_no_place_to_be_guessed():
  with pytest.raises(ValueError, match='does not know where the forward pass uses '
                                       'decoder/layer_0/adapter_bank/kernel'):
    flops.forward_position(('decoder', 'layer_0', 'adapter_bank', 'kernel'))


def _params_and_frozen(config):
  task = estimate.model_task(config, 'cpu')
  params = estimate.abstract_params(task)
  return task, params, frozen_lib.split(params, estimate.frozen_paths(task, params))[1]


def test_scanned_layers_count_as_the_unrolled_ones_layer_by_layer():
  """A scanned stack's parameter serves every layer: each of its slices is counted at its
  own layer, as the unrolled stack's (XLA's cost analysis counts a scan's body once)."""
  counted = []
  for scan_layers in (False, True):
    config = flops_accounting.case_config('decoder/mlp_out')
    config.model.update(scan_layers=scan_layers, num_layers=3)
    task, params, frozen = _params_and_frozen(config)
    trained = flops.Trained(params, frozen)  # the first trained: layer 0's down adapter
    assert not trained.below(flops.forward_position(('decoder', 'layer_0', 'mlp', 'down')))
    assert trained.below(flops.forward_position(('decoder', 'layer_1', 'self_attention', 'key')))
    counted.append(task.train_flops_with_frozen(params, 2, 128, frozen))
  assert counted[0] == pytest.approx(counted[1], rel=1e-12)


def test_a_masked_lm_counts_its_next_sentence_head_once_per_sequence():
  config = flops_accounting.case_config('encoder@masked_lm')
  task = estimate.model_task(config, 'cpu')
  config.masked_lm.next_sentence = False
  plain = estimate.model_task(config, 'cpu')
  params, plain_params = (estimate.abstract_params(t) for t in (task, plain))
  d = config.model.d_model
  counts = flops.matmul_param_counts(params, task.output_is_embedding())
  assert counts['sequence'] == d * d + d * 2  # pooler, classifier
  assert (task.train_flops_per_step(params, 3, 128)
          - plain.train_flops_per_step(plain_params, 3, 128)) == pytest.approx(3 * 6 * (d * d + 2 * d))


def test_dpo_with_lora_runs_its_reference_without_the_adapters():
  task, params, frozen = _params_and_frozen(flops_accounting.case_config('decoder/q+v@dpo'))
  side = task.side_task(task.cfg)
  reference = task.train_flops_with_frozen(params, 3, 64, frozen) - side.train_flops_with_frozen(
      params, 6, 64, frozen)
  base = lora.base(params)
  assert flops.matmul_param_count(base, True) < flops.matmul_param_count(params, True)
  assert reference == pytest.approx(side.forward_flops_per_step(base, 6, 64), rel=1e-12)


# --- shipped configs: the embedding follows the tokenizer ---------------------------------

def _shipped_configs():
  for path in sorted(glob.glob(os.path.join(ROOT, 'configs', '**', '*.py'), recursive=True)):
    name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, '.')
    module = importlib.import_module(name)
    if hasattr(module, 'get_config'):
      yield name


@pytest.mark.parametrize('name', list(_shipped_configs()))
def test_shipped_configs_have_no_dead_embedding_rows(name):
  config = importlib.import_module(name).get_config()
  if 'model' not in config and 'base' in config:  # a sweep: every run is its base config
    config = config.base
  pieces = config.data.tokenizer.vocab_size
  rows = estimate.embedding_rows(config)
  assert pieces <= rows < pieces + 128, (
      f'{name}: {rows} embedding rows for a {pieces}-piece tokenizer; set model.vocab_size=0')


# --- model dimensions against the mesh ----------------------------------------------------

def _mesh(data=1, fsdp=1, tensor=1) -> dict:
  return {'data': data, 'fsdp': fsdp, 'tensor': tensor}


def _config(**model) -> ml_collections.ConfigDict:
  config = default.get_config()
  config.model.update(num_layers=2, num_heads=4, d_model=64, d_ff=128, max_len=32)
  config.model.update(model)
  config.data.update(seq_len=32, batch_size=8)
  config.data.tokenizer.vocab_size = 4096
  return config


def test_a_config_that_fits_the_mesh_passes():
  config_checks.validate_against_mesh(_config(num_kv_heads=2), _mesh(data=2, fsdp=2, tensor=2))
  # dimensions on unsharded axes may be anything
  config_checks.validate_against_mesh(_config(num_heads=3, d_ff=99, head_dim=16), _mesh(data=8))


@pytest.mark.parametrize('model,mesh,message', [
    (dict(num_heads=3, head_dim=16), _mesh(tensor=2),
     "model.num_heads=3 is not divisible by mesh.tensor=2, which shards its 'heads' axis; "
     'make model.num_heads a multiple of 2'),
    (dict(num_heads=8, num_kv_heads=2), _mesh(tensor=4),
     "model.num_kv_heads=2 is not divisible by mesh.tensor=4, which shards its 'kv_heads' axis"),
    (dict(num_heads=8, d_ff=100), _mesh(tensor=8),
     "model.d_ff=100 is not divisible by mesh.tensor=8, which shards its 'mlp' axis"),
    (dict(d_model=66, head_dim=16), _mesh(data=2, fsdp=4),
     "model.d_model=66 is not divisible by mesh.fsdp=4, which shards its 'embed' axis"),
    (dict(vocab_size=4098), _mesh(tensor=4),
     "model.vocab_size=4098 is not divisible by mesh.tensor=4, which shards its 'vocab' axis; "
     'make model.vocab_size a multiple of 4'),
    # the tokenizer's 4096 pieces pad to 4096 rows: fine for powers of two, not for 3
    (dict(num_heads=6, d_ff=96, d_model=96), _mesh(tensor=3),
     "model.vocab_size=0 sizes the embedding from the tokenizer's 4096 pieces, padded to 4096 "
     r"rows, which is not divisible by mesh.tensor=3 .*set model.vocab_size=4224"),
])
def test_model_dimensions_not_divisible_by_their_mesh_axes_name_field_and_axis(model, mesh,
                                                                              message):
  config = _config(**model)
  config_checks.validate(config)  # a valid config on one device
  with pytest.raises(config_checks.ConfigError, match=message):
    config_checks.validate_against_mesh(config, mesh)


def test_padded_vocabulary_fits_any_power_of_two_tensor_axis_up_to_128():
  config = _config(num_heads=128, head_dim=2, d_ff=128, d_model=128)
  config.data.tokenizer.vocab_size = 4097  # pads to 4224 = 33 x 128
  for tensor in (2, 4, 8, 16, 32, 64, 128):
    config_checks.validate_against_mesh(config, _mesh(tensor=tensor))


def test_a_run_checks_the_model_against_its_mesh_before_reading_data(monkeypatch, tmp_path):
  from train import loop
  config = _config(num_heads=3, head_dim=16)
  monkeypatch.setattr(loop.sharding, 'make_mesh', lambda mesh_config: types.SimpleNamespace(
      shape=_mesh(tensor=2), size=2))
  def no_data(*args, **kwargs):
    raise AssertionError('read data before checking the config against the mesh')
  monkeypatch.setattr(loop.input_pipeline, 'load_corpus', no_data)
  with pytest.raises(config_checks.ConfigError, match='model.num_heads=3 .* mesh.tensor=2'):
    loop.Run(config, str(tmp_path / 'run'))
