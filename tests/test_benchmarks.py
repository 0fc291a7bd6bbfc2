"""The benchmarks' own arithmetic: the PyTorch reference is our model (same loss and
gradients from the same weights), the profile's per-op table finds the ops that ran with
their times and a dot's FLOPs from its shapes, and a decode step's bytes follow the
roofline formula. (Timings live in the benchmarks, never here.)"""
import collections
import dataclasses
import json
import math
import os
import subprocess

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tasks
from benchmarks import Program, matvec, op_table, roofline
from configs import bench_cpu
from models import ModelConfig
from models.layers import TRANSPOSED_EMBEDDING, TRANSPOSED_KERNEL
from models import layouts
from models.layouts import fuse_qkv, transpose_down, transpose_embedding

from conftest import decoding_params


def _tiny(**model):
  """bench_cpu's model, tiny: 2 layers, d_model 64, vocab 256, seq 16."""
  config = bench_cpu.get_config()
  config.model.update(num_layers=2, num_heads=4, d_model=64, d_ff=128, max_len=16,
                      vocab_size=256, **model)
  config.data.update(seq_len=16, batch_size=3)
  cfg = tasks.model_config(config, 256, jnp.float32)
  return config, cfg, tasks.from_config(config, cfg)


@pytest.mark.parametrize('model', [{}, dict(use_bias=True, norm_eps=1e-5, scan_layers=True)],
                         ids=['bench_cpu', 'biases_scanned'])
def test_torch_reference_computes_our_loss_and_gradients(model):
  torch = pytest.importorskip('torch')
  from benchmarks import torch_reference
  _, cfg, task = _tiny(**model)
  rng = np.random.default_rng(0)
  params = nn.unbox(task.init(jax.random.key(0), task.example_batch(1, 16)))
  # Perturbed, so norms' scales and biases (zeros and ones at init) matter too.
  params = jax.tree.map(lambda x: x + 0.05 * rng.standard_normal(x.shape, np.float32), params)
  batch = dict(task.example_batch(3, 16))
  batch['inputs'], batch['targets'] = (jnp.asarray(rng.integers(0, 256, (3, 16)), jnp.int32)
                                       for _ in range(2))

  def mean_loss(p):
    _, sums = task.loss(p, batch, None, False)
    return sums['loss'] / sums['weight']
  loss, grads = jax.value_and_grad(mean_loss)(params)

  reference = torch_reference.load_params(torch_reference.GPT(cfg), params)
  as_torch = lambda x: torch.from_numpy(np.asarray(x, np.int64))
  torch_loss = reference(as_torch(batch['inputs']), as_torch(batch['targets']))
  torch_loss.backward()
  assert abs(torch_loss.item() - float(loss)) <= 1e-4
  layer_0 = (grads['decoder']['layers'] if cfg.scan_layers else grads['decoder']['layer_0'])
  up = np.asarray(layer_0['mlp']['up']['kernel'])
  up = up[0] if cfg.scan_layers else up
  torch_up = reference.transformer.h[0].mlp.c_fc.weight.grad.numpy().T
  np.testing.assert_allclose(torch_up, up, atol=1e-6, rtol=1e-4)
  # The tied embedding: its gradient sums the lookup's and the output projection's.
  np.testing.assert_allclose(reference.transformer.wte.weight.grad.numpy(),
                             np.asarray(grads['token_embed']['embedding']), atol=1e-6, rtol=1e-4)


def test_the_torch_child_process_runs_without_huge_pages(monkeypatch):
  """PyTorch is timed in a process whose malloc asks for no huge pages (the user's other
  tunables kept), and a child that prints nothing is an error, not a parse failure."""
  pytest.importorskip('torch')
  import subprocess
  from benchmarks import torch_reference
  runs = []
  def run(args, env, **kwargs):
    runs.append(env)
    stdout = '{"ok": 1}' if len(runs) == 1 else ''  # the second child prints nothing
    return subprocess.CompletedProcess(args, 0, stdout=stdout, stderr='')
  monkeypatch.setattr(subprocess, 'run', run)
  monkeypatch.setenv('GLIBC_TUNABLES', 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1')
  assert torch_reference.in_own_process({'kind': 'train'}) == {'ok': 1}
  assert runs[0]['GLIBC_TUNABLES'] == 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=0'
  with pytest.raises(RuntimeError, match='PyTorch reference failed'):
    torch_reference.in_own_process({'kind': 'train'})


def test_torch_reference_in_its_own_process_trains_the_model_it_was_given():
  """The child process (4 KB pages) starts from the parent's weights: its first loss is
  the loss of those weights on the batch."""
  torch = pytest.importorskip('torch')
  from benchmarks import torch_reference
  config, cfg, task = _tiny()
  params = nn.unbox(task.init(jax.random.key(1), task.example_batch(1, 16)))
  reference = torch_reference.load_params(torch_reference.GPT(cfg), params)
  rng = np.random.default_rng(1)
  inputs, targets = (rng.integers(0, 256, (3, 16)) for _ in range(2))
  with torch.no_grad():
    expected = reference(torch.from_numpy(inputs), torch.from_numpy(targets)).item()
  result = torch_reference.measure_in_own_process(reference, config.train, inputs, targets, 1)
  assert result['tokens_per_s'] > 0
  assert abs(result['first_loss'] - expected) <= 1e-5


def test_torch_reference_refuses_what_it_cannot_build():
  pytest.importorskip('torch')
  from benchmarks import torch_reference
  with pytest.raises(ValueError, match="model.position='rope'"):
    torch_reference.GPT(ModelConfig(position='rope', norm='layernorm'))
  gpt2_like = dict(position='learned', norm='layernorm')
  with pytest.raises(ValueError, match="model.activation='relu'"):
    torch_reference.GPT(ModelConfig(activation='relu', **gpt2_like))
  with pytest.raises(ValueError, match='dtype bfloat16'):
    torch_reference.GPT(ModelConfig(activation='gelu_tanh', dtype=jnp.bfloat16, **gpt2_like))


def _looped(x_MN, w_NN):
  """A matmul inside a loop that writes one row of a cache per step, as decoding does."""
  def body(i, carry):
    y_MN, cache_SMN = carry
    y_MN = jnp.tanh(y_MN @ w_NN)
    return y_MN, jax.lax.dynamic_update_slice(cache_SMN, y_MN[None], (i, 0, 0))
  return jax.lax.fori_loop(0, 3, body, (x_MN, jnp.zeros((4,) + x_MN.shape)))


def test_profile_table_times_the_ops_that_ran_and_counts_dot_flops(tmp_path):
  M, N = 32, 64
  x, w = jnp.ones((M, N)), jnp.full((N, N), 0.01)
  compiled = jax.jit(_looped).lower(x, w).compile()
  rows, totals = op_table.profile(Program(compiled, lambda: compiled(x, w)), 2, str(tmp_path))

  module = op_table.Module(compiled.as_text())
  assert rows and all(row['op'] in module.instructions for row in rows)
  assert all(row['count'] > 0 and row['total_ms'] >= 0 for row in rows)
  assert sum(row['total_ms'] for row in rows) > 0
  assert abs(sum(row['share'] for row in rows) - 1) < 1e-6
  assert totals['steps'] == 2 and totals['wall_s'] > 0
  # The matmul (a dot, or a fusion holding it) ran 3 times per call, 2 calls.
  dots = [row for row in rows if row['flops']]
  assert len(dots) == 1 and dots[0]['count'] == 6
  assert dots[0]['flops'] == 2 * M * N * N
  assert dots[0]['gflop_per_s'] > 0 and 'dot' in dots[0]['what']
  # The cache row is written in place: its op moves a row, not the [4, M, N] cache.
  cache_bytes = 4 * M * N * 4
  writes = [row for row in rows if 'dynamic-update-slice' in row['what']]
  assert writes and all(row['bytes'] < cache_bytes for row in writes)
  merged = op_table.rows_by_what(rows)
  assert sum(row['count'] for row in merged) == sum(row['count'] for row in rows)
  assert [row['flops'] for row in merged if row['flops']] == [2 * M * N * N]
  lines = (tmp_path / 'profile.jsonl').read_text().splitlines()
  assert len(lines) == len(rows)
  assert 'GFLOP/s' in op_table.format_table(rows, totals)


def test_module_counts_batched_dot_flops_from_shapes():
  def f(q_BTK, k_BSK):
    return jnp.einsum('BTK,BSK->BTS', q_BTK, k_BSK)
  B, T, S, K = 2, 3, 5, 7
  compiled = jax.jit(f).lower(jnp.ones((B, T, K)), jnp.ones((B, S, K))).compile()
  module = op_table.Module(compiled.as_text())
  entry = module.computations[module.entry]
  assert sum(module.flops(i) for i in entry) == 2 * B * T * S * K


def test_decode_bytes_per_step_is_weights_plus_the_mean_filled_cache():
  cfg = ModelConfig(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, d_model=32)
  params = {'a': jnp.zeros((10, 3), jnp.float32), 'b': jnp.zeros((5,), jnp.int8)}
  batch, prompt, new = 3, 4, 6
  kv_per_slot = 2 * 2 * 2 * 8 * 4  # layers x (k, v) x kv_heads x head_dim x float32
  expected = 10 * 3 * 4 + 5 + batch * kv_per_slot * (prompt + (new + 1) / 2)
  assert roofline.decode_bytes_per_step(cfg, params, batch, prompt, new) == expected
  # An encoder-decoder: without the encoder and the decoder's cross-attention key and value
  # kernels (the first step caches their products); with the cached encoder keys/values.
  t5 = dataclasses.replace(cfg, arch='encoder_decoder')
  params = {'encoder': {'w': jnp.zeros((7,), jnp.float32)},
            'decoder': {'layer_0': {'cross_attention': {'key': {'kernel': jnp.zeros((9,))},
                                                        'query': {'kernel': jnp.zeros((2,))}}}}}
  expected = 2 * 4 + batch * kv_per_slot * (1 + (new + 1) / 2 + prompt)
  assert roofline.decode_bytes_per_step(t5, params, batch, prompt, new) == expected


def test_a_step_reads_its_whole_grown_cache():
  """A 32-token prompt and 100 new tokens: caches of 64, 128 and 132 slots; the steps
  writing slots 32-63 read 64, those writing 64-127 read 128, the last four 132."""
  cfg = ModelConfig()
  expected = (32 * 64 + 64 * 128 + 4 * 132) / 100
  assert roofline.mean_cache_slots(cfg, 32, 100, grown_cache=True) == expected
  t5 = dataclasses.replace(cfg, arch='encoder_decoder')  # from one start token, + the prompt
  expected = (63 * 64 + 37 * 101) / 100 + 32
  assert roofline.mean_cache_slots(t5, 32, 100, grown_cache=True) == expected


def test_matvec_reads_every_matrix_of_the_chain_in_either_layout():
  from absl import app
  assert matvec.parse_shape('384x1536') == (384, 1536, False)
  assert matvec.parse_shape('384x8192t') == (384, 8192, True)
  with pytest.raises(app.UsageError, match="'384by8' is not IxO"):
    matvec.parse_shape('384by8')
  for transposed in (False, True):
    # One product per matrix, each reading its matrix as it lies: no copy, no transpose.
    chain, matrices = matvec.matvec_chain(2, 256, 128, transposed, megabytes=1)
    hlo = chain.lower(matrices, jnp.ones((2, 256))).compile().as_text()
    assert len(matrices) == 8 and hlo.count(' dot(') == 8  # 1 MB of 128 kB matrices
    assert 'copy(' not in hlo and 'transpose(' not in hlo
    rate = matvec.matvec_bytes_per_s(2, 256, 128, transposed, megabytes=1,
                                     window_seconds=0.01)
    assert rate > 0


@pytest.mark.parametrize('arch, fields', [
    ('decoder', dict(num_kv_heads=2, gated_mlp=True)),
    ('encoder_decoder', dict(tie_embeddings=False)),
])
@pytest.mark.parametrize('chosen', [(), ('qkv', 'down'), ('embedding',),
                                    ('qkv', 'down', 'embedding')])
def test_matvec_decode_matrices_are_the_kernels_a_decode_step_reads(arch, fields, chosen):
  """Every matrix the step multiplies, once, as (inputs, outputs, stored transposed), in
  the layouts of the params given: a decoder's kernels (self-attention's query, key and
  value joined or not; the MLP's output projection [F, D] or [D, F]) and tied table ([V,
  D] or [D, V]); an encoder-decoder's decoder kernels and head, without the
  cross-attention's key and value kernels (their products are cached) and the encoder."""
  cfg = ModelConfig(arch=arch, vocab_size=64, num_layers=2, num_heads=4, head_dim=8,
                    d_model=32, d_ff=48, max_len=16, scan_layers=False,
                    **{'num_kv_heads': 4, **fields})
  task = tasks.for_model(cfg)
  params = nn.unbox(task.init(jax.random.key(0), task.example_batch(1, 8)))
  for change, name in ((fuse_qkv, 'qkv'), (transpose_down, 'down'),
                       (transpose_embedding, 'embedding')):  # as `prepare`: a tied one only
    if name in chosen and (name != 'embedding' or cfg.tie_embeddings):
      params = change(params)
  expected = collections.Counter()
  for path, x in jax.tree_util.tree_leaves_with_path(params):
    names = [getattr(p, 'key', '') for p in path]
    if names[0].startswith('encoder') or (
        'cross_attention' in names and ('key' in names or 'value' in names)):
      continue
    if names[-1] == 'kernel':  # attention's output [N, K, D]; the rest [D, ...]
      inputs = math.prod(x.shape[:-1]) if names[-2] == 'out' else x.shape[0]
      expected[inputs, x.size // inputs, False] += 1
    elif names[-1] == TRANSPOSED_KERNEL:  # [D, F]
      expected[x.shape[1], x.shape[0], True] += 1
    elif names[-1] == 'embedding' and cfg.tie_embeddings:  # [V, D]
      expected[x.shape[1], x.shape[0], True] += 1
    elif names[-1] == TRANSPOSED_EMBEDDING:  # [D, V]
      expected[x.shape[0], x.shape[1], False] += 1
  assert sum(expected.values()) > 4
  matrices = matvec.decode_matrices(cfg, params)
  assert {(i, o, t): n for i, o, t, n in matrices} == dict(expected)


def test_layouts_toggle_one_way_and_export_in_the_model_layout():
  """What the decode benchmark's --compare=NAME times: `prepare`'s params with that one
  layout the other way (each way round; an error where there is no other way), and
  models/layouts.py `model_layout` (what --compare=hf exports) undoes every layout
  `prepare` chose, exactly. (benchmarks/decode.py itself is not imported: its flags
  would clash with inference/cli.py's in a test process.)"""
  from inference.generate import prepare
  from inference.quantize import quantize_int8
  cfg = ModelConfig(vocab_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                    d_model=32, d_ff=48, max_len=16, scan_layers=False)
  task = tasks.for_model(cfg)
  params = nn.unbox(task.init(jax.random.key(0), task.example_batch(1, 8)))
  for prompts in ([[3, 4]], [[3, 4], [5, 6]]):
    prepared = prepare(task, params, prompts, 4, 'none')[1]
    assert jax.tree.all(jax.tree.map(jnp.array_equal, layouts.model_layout(prepared, cfg), params))
    int8 = prepare(task, params, prompts, 4, 'int8')[1]
    assert jax.tree.all(jax.tree.map(jnp.array_equal, layouts.model_layout(int8, cfg),
                                     quantize_int8(params)))
    with pytest.raises(ValueError, match='one embedding layout only'):  # int8 stays [V, D]
      layouts.other_way('embedding', int8, cfg)
    chosen = {name: layouts.has_param(prepared, layout.marker)
              for name, layout in layouts.LAYOUTS.items()}
    assert chosen == {'qkv': len(prompts) == 1, 'down': len(prompts) == 1, 'embedding': True}
    for name in layouts.LAYOUTS:
      other = layouts.other_way(name, prepared, cfg)
      assert {n: layouts.has_param(other, layout.marker)
              for n, layout in layouts.LAYOUTS.items()} == {**chosen, name: not chosen[name]}


def test_target_calls_feed_each_call_at_the_positions_after_the_last():
  """benchmarks/speculative.py times the target's checks alone with target_calls: one
  token per call is greedy decoding, and three per call (one call spanning the cache's
  growth at 64 slots) write the keys and values a full prefill of everything fed writes,
  and end at its greedy token."""
  from benchmarks.call_costs import target_calls
  from inference.generate import generate, left_pad, prepare, start_decoding
  task, params = decoding_params(ModelConfig(vocab_size=128, num_layers=2, num_heads=4,
                                             num_kv_heads=2, head_dim=8, d_model=32, d_ff=64,
                                             max_len=72, position='learned'))
  prompt, calls = [5, 9, 20, 33, 40], 21  # the call after slot 61 writes slots 62, 63, 64
  unrolled, one_row, ids, real = prepare(task, params, [prompt], calls, 'none')
  tokens, _ = target_calls(one_row, ids, real, task=unrolled, tokens_per_call=1, calls=calls)
  assert tokens.tolist() == generate(task, params, [prompt], calls + 1, eos_id=-1)[0]
  three_rows = prepare(task, params, [prompt], 3 * calls, 'none', rows=3)[1]
  tokens, cache = target_calls(three_rows, ids, real, task=unrolled, tokens_per_call=3,
                               calls=calls)
  fed = prompt + [token for token in tokens.tolist()[:-1] for _ in range(3)]
  logits_BV, full_cache = jax.jit(lambda ids, real: start_decoding(
      unrolled, one_row, ids, real)[:2])(*map(jnp.asarray, left_pad([fed])))
  assert int(jnp.argmax(logits_BV[0])) == tokens.tolist()[-1]
  assert jax.tree.structure(cache) == jax.tree.structure(full_cache)
  compared = 0
  for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(cache),
                               jax.tree_util.tree_leaves(full_cache)):
    if path[-1].key in ('cached_key', 'cached_value'):  # [B*G, S, K]: slots on axis -2
      assert got.shape[-2] == len(fed)  # grown from 64 slots to exactly what was written
      # Float32 written by two orders of work (a call at a time, one prefill): 1.6e-5
      # apart relative to values near 6.5 on an AMD Zen 5.
      np.testing.assert_allclose(got[..., :len(fed), :], want[..., :len(fed), :],
                                 rtol=1e-4, atol=1e-4)
      compared += 1
  assert compared == 4  # keys and values of both layers


# --- scripts/gpu_benchmarks.sh ------------------------------------------------------------

FAKE_PYTHON = '''#!/usr/bin/env bash
# Stands in for python: a benchmark prints its module's name as its JSON line, training
# leaves the tokenizer the draft copies; `-c` (the script's JSON check) is the real one.
case $1 in
  -m) echo "{\\"bench\\": \\"$2\\"}" ;;
  -c) exec python3 "$@" ;;
  main.py) workdir=${3#--workdir=}; mkdir -p "$workdir" && touch "$workdir/tokenizer.model" ;;
esac
'''


def _gpu_benchmarks(tmp_path, *args):
  fake = tmp_path / 'python'
  fake.write_text(FAKE_PYTHON)
  fake.chmod(0o755)
  script = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'scripts',
                        'gpu_benchmarks.sh')
  return subprocess.run(['bash', script, *args], env=dict(os.environ, PYTHON=str(fake)),
                        capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize('parts,benchmarks', [
    ((), ['train_step', 'train_step', 'decode', 'decode', 'speculative']),
    (('decode',), ['decode', 'decode']),
    (('speculative', 'train'), ['train_step', 'train_step', 'speculative'])])
def test_gpu_benchmarks_run_the_parts_asked_for_and_keep_a_previous_result(tmp_path, parts,
                                                                          benchmarks):
  out = tmp_path / 'out'
  done = _gpu_benchmarks(tmp_path, str(out), *parts)
  assert done.returncode == 0, done.stdout + done.stderr
  lines = (out / 'results.jsonl').read_text().splitlines()
  assert [json.loads(line)['bench'] for line in lines] == [f'benchmarks.{b}' for b in benchmarks]
  again = _gpu_benchmarks(tmp_path, str(out), *parts)
  assert again.returncode == 1 and 'exists' in again.stderr
  assert (out / 'results.jsonl').read_text().splitlines() == lines


def test_gpu_benchmarks_refuse_an_unknown_part_before_writing(tmp_path):
  done = _gpu_benchmarks(tmp_path, str(tmp_path / 'out'), 'decoding')
  assert done.returncode == 1
  assert "unknown PART 'decoding': give train, decode or speculative" in done.stderr
  assert not (tmp_path / 'out').exists()


def test_the_train_step_benchmark_times_xla_defaults_in_turns(monkeypatch):
  """--compare=xla_defaults: both steps run, in turns of one untimed step and one timed,
  which goes first alternating, and the line names the options ours used; where the step
  would compile with XLA's defaults anyway, one clear refusal."""
  from benchmarks import Program, train_step
  from train import steps
  config = _tiny()[0]
  calls, names = [], iter(['ours', 'defaults'])  # stepping() builds ours first
  real_stepping, real_timed = train_step.stepping, train_step._timed

  def logged_stepping(*args):
    program, name = real_stepping(*args), next(names)
    def run():
      calls.append(name)
      return program.run()
    return Program(program.compiled, run)

  def logged_timed(program):
    calls.append('timed')
    return real_timed(program)
  monkeypatch.setattr(train_step, 'stepping', logged_stepping)
  monkeypatch.setattr(train_step, '_timed', logged_timed)
  result = train_step.measure(config, num_steps=2, compare='xla_defaults')
  turn = lambda name: [name, 'timed', name]
  assert calls == (['ours', 'defaults']  # warm-ups
                   + turn('defaults') + turn('ours')  # turn 0: XLA's defaults first
                   + turn('ours') + turn('defaults'))
  monkeypatch.setattr(train_step, 'stepping', real_stepping)
  monkeypatch.setattr(train_step, '_timed', real_timed)
  assert result['compiler_options'] == steps.train_compiler_options() is not None
  assert result['xla_defaults_tokens_per_s'] > 0
  assert result['speedup_vs_xla_defaults'] > 0 and result['speedup_vs_xla_defaults_median'] > 0
  monkeypatch.setattr(steps, 'train_compiler_options', lambda: None)
  with pytest.raises(ValueError, match='nothing to compare'):
    train_step.measure(config, num_steps=2, compare='xla_defaults')
