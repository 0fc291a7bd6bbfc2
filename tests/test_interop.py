"""Hugging Face checkpoints in and out (interop/): tiny random `transformers` models of
the four families (every parameter perturbed, so a dropped or misplaced tensor shows)
import to the same float32 logits with scanned and unrolled layers, export back to
what `transformers` loads to the same logits, and decode greedily token for token as
`generate` does; this project's own models export; files in every layout import the
same; what cannot convert fails with one message."""
import functools
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

import hf_fixtures  # noqa: E402 -- tests/, beside this file
import tasks  # noqa: E402
from configs import gpt_tiny  # noqa: E402
from inference.generate import generate  # noqa: E402
from inference.load import load_run  # noqa: E402
from inference.sampling import Sampling  # noqa: E402
from input_pipeline import tokenizer as tokenizer_lib  # noqa: E402
from interop import InteropError, cli, hf_config, weights  # noqa: E402
from models.config import ModelConfig  # noqa: E402
from train import checkpointing, loop, loss_scale, optimizer, run_config, sharding  # noqa: E402
from train import state as state_lib  # noqa: E402

TOLERANCE = 1e-4  # max |logit difference|, float32 both sides
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _gpt2(vocab):
  return transformers.GPT2LMHeadModel(transformers.GPT2Config(
      vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=vocab - 1,
      eos_token_id=vocab - 1))


def _llama(vocab):  # grouped-query heads, a head_dim of its own, untied
  return transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, head_dim=12, max_position_embeddings=64,
      rope_parameters={'rope_type': 'default', 'rope_theta': 500.0}, bos_token_id=1,
      eos_token_id=2, tie_word_embeddings=False))


def _bert(cls):
  return lambda vocab: cls(transformers.BertConfig(
      vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
      intermediate_size=48, max_position_embeddings=64, type_vocab_size=2))


def _t5(feed_forward_proj, tied):
  """v1.0: relu, tied with the output rescaled; v1.1: gated-gelu, a separate lm_head."""
  def build(vocab):
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=vocab, d_model=32, d_kv=6, d_ff=48, num_layers=2, num_decoder_layers=3,
        num_heads=4, relative_attention_num_buckets=12, relative_attention_max_distance=20,
        feed_forward_proj=feed_forward_proj, tie_word_embeddings=tied))
    if not tied:  # transformers 5 builds it tied; saved different, it loads untied
      model.lm_head.weight = torch.nn.Parameter(model.shared.weight.detach().clone())
    return model
  return build


# name -> (model builder, tokenizer directory writer, AutoModel class)
CHECKPOINTS = {
    'gpt2': (_gpt2, hf_fixtures.gpt2_tokenizer_dir, 'AutoModelForCausalLM'),
    'llama': (_llama, hf_fixtures.llama_tokenizer_dir, 'AutoModelForCausalLM'),
    'bert_pretraining': (_bert(transformers.BertForPreTraining), hf_fixtures.bert_tokenizer_dir,
                         'AutoModelForPreTraining'),
    'bert_masked_lm': (_bert(transformers.BertForMaskedLM), hf_fixtures.bert_tokenizer_dir,
                       'AutoModelForMaskedLM'),
    't5_v1_0': (_t5('relu', tied=True), hf_fixtures.t5_tokenizer_dir,
                'AutoModelForSeq2SeqLM'),
    't5_v1_1': (_t5('gated-gelu', tied=False), hf_fixtures.t5_tokenizer_dir,
                'AutoModelForSeq2SeqLM'),
}


def _perturb(model, seed: int):
  """N(0, 0.1) added to every parameter: norms leave 1, biases leave 0."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn(p.shape, generator=generator))
  return model.eval()


def _save(name: str, directory: str):
  build, tokenizer_dir, _ = CHECKPOINTS[name]
  tokenizer_dir(directory)
  vocab = len(transformers.AutoTokenizer.from_pretrained(directory))
  torch.manual_seed(0)
  model = _perturb(build(vocab), seed=sorted(CHECKPOINTS).index(name))
  model.save_pretrained(directory)
  return model


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory):
  """name -> (directory, the `transformers` model saved there)."""
  root = tmp_path_factory.mktemp('hf')
  return {name: (str(root / name), _save(name, str(root / name))) for name in CHECKPOINTS}


@pytest.fixture(scope='module')
def imported(checkpoints, tmp_path_factory):
  """(name, scan_layers) -> workdir, imported through the public entry point."""
  root = tmp_path_factory.mktemp('imported')
  workdirs = {}
  for name, (directory, _) in checkpoints.items():
    for scan in (True, False):
      workdir = str(root / f'{name}_{"scanned" if scan else "unrolled"}')
      result = cli.import_checkpoint(directory, workdir,
                                     [f'--config.model.scan_layers={str(scan).lower()}'])
      model = checkpoints[name][1]
      assert result['architecture'] == model.config.architectures[0]
      assert result['params'] == sum(p.numel() for p in model.parameters())
      workdirs[name, scan] = workdir
  return workdirs


@functools.lru_cache(maxsize=None)
def _load(workdir):
  """(task, params) of a workdir's latest checkpoint, read once (workdirs are written once)."""
  task, params, _ = load_run(run_config.saved_config(workdir, []), workdir)
  return task, params


# --- the same inputs on both sides ----------------------------------------------------
def _inputs(name: str, vocab: int):
  rng = np.random.default_rng(0)
  ids = rng.integers(0, vocab, (2, 12))
  if name.startswith('t5'):
    return {'input_ids': ids, 'decoder_input_ids': rng.integers(0, vocab, (2, 7))}
  if name.startswith('bert'):
    return {'input_ids': ids, 'token_type_ids': (np.arange(12) >= 5).astype(np.int64)[None]
            .repeat(2, 0)}
  return {'input_ids': ids}


def _stream(ids):
  b, t = ids.shape
  return (jnp.asarray(ids, jnp.int32), jnp.ones((b, t), jnp.int32),
          jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)))


def _project_logits(task, params, inputs) -> list[np.ndarray]:
  """[token logits] (and next-sentence logits for BERT pre-training) in float32, from
  one compiled forward pass (as decoding runs the model; faster than op by op)."""
  if 'decoder_input_ids' in inputs:
    (enc, enc_seg, enc_pos), (dec, dec_seg, dec_pos) = (
        _stream(inputs['input_ids']), _stream(inputs['decoder_input_ids']))
    batch = {'encoder_inputs': enc, 'encoder_segment_ids': enc_seg, 'encoder_positions': enc_pos,
             'decoder_inputs': dec, 'decoder_segment_ids': dec_seg, 'decoder_positions': dec_pos}
    return [np.asarray(jax.jit(task.logits)(params, batch))]
  ids, segments, positions = _stream(inputs['input_ids'])
  batch = {'inputs': ids, 'segment_ids': segments, 'positions': positions}
  if 'token_type_ids' not in inputs:
    return [np.asarray(jax.jit(task.logits)(params, batch))]
  batch['token_type_ids'] = jnp.asarray(inputs['token_type_ids'], jnp.int32)
  return [np.asarray(x) for x in jax.jit(task.apply)(params, batch) if x is not None]


def _hf_logits(model, inputs) -> list[np.ndarray]:
  with torch.no_grad():
    out = model(**{k: torch.as_tensor(v) for k, v in inputs.items()})
  if hasattr(out, 'seq_relationship_logits'):
    return [out.prediction_logits.numpy(), out.seq_relationship_logits.numpy()]
  return [out.logits.numpy()]


@functools.lru_cache(maxsize=None)
def _source_logits(model, name: str) -> list[np.ndarray]:
  """_hf_logits of a saved `transformers` model on its _inputs, computed once."""
  return _hf_logits(model, _inputs(name, model.config.vocab_size))


def _max_difference(a: list[np.ndarray], b: list[np.ndarray]) -> float:
  assert [x.shape for x in a] == [x.shape for x in b]
  return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))


# --- import -----------------------------------------------------------------------------
@pytest.mark.parametrize('scan', [True, False], ids=['scanned', 'unrolled'])
@pytest.mark.parametrize('name', sorted(CHECKPOINTS))
def test_imported_logits_match_transformers(checkpoints, imported, name, scan):
  _, model = checkpoints[name]
  task, params = _load(imported[name, scan])
  assert task.cfg.scan_layers == scan
  assert ('layers' in params[('encoder' if name.startswith('bert') else 'decoder')]) == scan
  inputs = _inputs(name, model.config.vocab_size)
  difference = _max_difference(_project_logits(task, params, inputs), _source_logits(model, name))
  print(f'max |logit difference| {name} {"scanned" if scan else "unrolled"}: {difference:.2e}')
  assert difference <= TOLERANCE


def test_imported_config_is_a_normal_run_config(checkpoints, imported):
  config = run_config.saved_config(imported['bert_pretraining', True], [])
  assert config.task == 'masked_lm' and config.masked_lm.next_sentence
  assert config.model.arch == 'encoder' and config.model.block_order == 'post_norm'
  assert config.data.tokenizer.vocab_size == checkpoints['bert_pretraining'][1].config.vocab_size
  config = run_config.saved_config(imported['t5_v1_1', False], [])
  assert (config.model.num_layers, config.model.num_decoder_layers) == (2, 3)
  assert (config.model.relative_buckets, config.model.relative_max_distance) == (12, 20)
  assert not config.model.tie_embeddings and config.model.scan_layers is False


@pytest.mark.parametrize('name', ['gpt2', 'llama'])
def test_greedy_decoding_matches_transformers_generate(checkpoints, imported, name):
  _, model = checkpoints[name]
  task, params = _load(imported[name, True])
  eos = model.config.eos_token_id
  prompts = [[5, 17, 42, 8, 99], [7, 3, 250]]
  ours = generate(task, params, prompts, 10, Sampling(temperature=0.0), eos_id=eos)
  for prompt, tokens in zip(prompts, ours):
    with torch.no_grad():
      out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=10,
                           eos_token_id=eos, pad_token_id=eos)
    assert tokens == out[0, len(prompt):].tolist()


# --- export -----------------------------------------------------------------------------
@pytest.mark.parametrize('scan', [True, False], ids=['scanned', 'unrolled'])
@pytest.mark.parametrize('name', sorted(CHECKPOINTS))
def test_export_loads_in_transformers_to_the_same_logits(checkpoints, imported, tmp_path, name,
                                                         scan):
  _, model = checkpoints[name]
  out = str(tmp_path / 'exported')
  result = cli.export_checkpoint(imported[name, scan], out)
  assert result['architecture'] == model.config.architectures[0]
  reloaded = getattr(transformers, CHECKPOINTS[name][2]).from_pretrained(out).eval()
  assert type(reloaded) is type(model)
  inputs = _inputs(name, model.config.vocab_size)
  assert _max_difference(_hf_logits(reloaded, inputs), _source_logits(model, name)) <= 1e-5
  assert transformers.AutoTokenizer.from_pretrained(out) is not None


def _project_workdir(root, options: dict) -> str:
  """A gpt_tiny-shaped run of this project at step 1: random init, every parameter
  perturbed, the Llama test tokenizer."""
  config = gpt_tiny.get_config()
  config.model.update(num_layers=2, d_model=64, num_heads=4, d_ff=96, max_len=64, vocab_size=896,
                      **options)
  config.data.seq_len, config.data.tokenizer.vocab_size = 32, 800
  workdir = str(root)
  tokenizer_lib.import_tokenizer(hf_fixtures.llama_tokenizer_dir(str(root / 'hf')), workdir)
  cfg = hf_config.model_config(config)
  task = tasks.from_config(config, cfg)
  tx = optimizer.make_optimizer(config.train)
  state = state_lib.create_train_state(task, tx, sharding.make_mesh(config.mesh), 32,
                                       jax.random.key(0))
  rng = np.random.default_rng(1)
  state = state.replace(params=jax.tree.map(
      lambda x: x + 0.1 * rng.standard_normal(x.shape, np.float32), state.params))
  manager = checkpointing.make_manager(workdir, 1)
  checkpointing.save(manager, 1, state, None)
  checkpointing.finish(manager)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json())
  return workdir


PROJECT_MODELS = {  # options -> the architecture they export as
    'LlamaForCausalLM': dict(position='rope', norm='rmsnorm', activation='silu', gated_mlp=True,
                             num_kv_heads=2, tie_embeddings=False, use_bias=False),
    'GPT2LMHeadModel': dict(position='learned', norm='layernorm', activation='gelu_tanh',
                            gated_mlp=False, tie_embeddings=True, use_bias=False),
}


@pytest.mark.parametrize('architecture', sorted(PROJECT_MODELS))
def test_project_model_exports(tmp_path, architecture):
  workdir = _project_workdir(tmp_path / 'run', PROJECT_MODELS[architecture])
  out = str(tmp_path / 'exported')
  assert cli.export_checkpoint(workdir, out)['architecture'] == architecture
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  assert reloaded.config.architectures == [architecture]
  task, params = _load(workdir)
  inputs = _inputs('decoder', 800)
  difference = _max_difference(_project_logits(task, params, inputs),
                               _hf_logits(reloaded, inputs))
  print(f'max |logit difference| project model as {architecture}: {difference:.2e}')
  assert difference <= TOLERANCE


def test_export_names_the_options_that_prevent_it():
  cfg = ModelConfig(arch='decoder', position='rope', norm='layernorm', gated_mlp=True)
  with pytest.raises(InteropError) as error:
    hf_config.export_family(cfg)
  message = str(error.value)
  assert "as GPT2LMHeadModel: model.position='rope'" in message
  assert "as LlamaForCausalLM: model.norm='layernorm'" in message
  assert hf_config.export_family(ModelConfig(arch='encoder', position='learned',
                                             norm='layernorm', block_order='post_norm',
                                             embed_norm=True, final_norm=False,
                                             mlm_transform=True, num_heads=4, num_kv_heads=4,
                                             head_dim=32, d_model=128))[0] == 'BertForMaskedLM'


def test_export_refuses_a_non_empty_directory(imported, tmp_path):
  (tmp_path / 'keep.txt').write_text('mine')
  with pytest.raises(InteropError, match='not an empty directory'):
    cli.export_checkpoint(imported['gpt2', True], str(tmp_path))
  assert (tmp_path / 'keep.txt').read_text() == 'mine'


# --- file layouts -------------------------------------------------------------------
def _copy_tokenizer(source: str, directory: str) -> None:
  os.makedirs(directory)
  for name in os.listdir(source):
    if 'safetensors' not in name and name != 'config.json':
      shutil.copy(os.path.join(source, name), directory)


def _params(workdir):
  return jax.tree.map(np.asarray, _load(workdir)[1])


def test_old_pytorch_bin_imports_identically(checkpoints, imported, tmp_path):
  """GPT-2 as the hub's first checkpoints hold it: pytorch_model.bin of the bare model's
  names ('h.0...'), causal-mask buffers and a tied lm_head copy."""
  source, model = checkpoints['gpt2']
  directory = str(tmp_path / 'bin')
  _copy_tokenizer(source, directory)
  model.config.save_pretrained(directory)
  state = {k.removeprefix('transformer.'): v for k, v in model.state_dict().items()}
  state['h.0.attn.bias'] = torch.tril(torch.ones(1, 1, 64, 64))
  torch.save(state, os.path.join(directory, 'pytorch_model.bin'))
  assert 'lm_head.weight' in state
  cli.import_checkpoint(directory, str(tmp_path / 'run'))
  jax.tree.map(np.testing.assert_array_equal, _params(str(tmp_path / 'run')),
               _params(imported['gpt2', True]))


def test_sharded_safetensors_import_identically(checkpoints, imported, tmp_path):
  source, model = checkpoints['llama']
  directory = str(tmp_path / 'sharded')
  _copy_tokenizer(source, directory)
  model.save_pretrained(directory, max_shard_size='40KB')
  assert os.path.exists(os.path.join(directory, weights.SAFETENSORS_INDEX))
  cli.import_checkpoint(directory, str(tmp_path / 'run'))
  jax.tree.map(np.testing.assert_array_equal, _params(str(tmp_path / 'run')),
               _params(imported['llama', True]))


def test_pytorch_bin_without_torch_says_what_to_install(tmp_path, monkeypatch):
  torch.save({'w': torch.zeros(2)}, tmp_path / 'pytorch_model.bin')
  monkeypatch.setitem(sys.modules, 'torch', None)
  with pytest.raises(InteropError, match='pip install torch'):
    weights.read_tensors(str(tmp_path))


# --- refusals -----------------------------------------------------------------------
def _edited(source: str, directory, **changes) -> str:
  """A copy of `source` whose config.json has `changes`."""
  shutil.copytree(source, directory)
  with open(os.path.join(source, 'config.json')) as f:
    hf = json.load(f)
  with open(os.path.join(directory, 'config.json'), 'w') as f:
    json.dump({**hf, **changes}, f)
  return str(directory)


REFUSED = {  # checkpoint, config.json change -> the message's start
    'architecture': ('gpt2', dict(architectures=['GPT2ForSequenceClassification']),
                     "has architectures ['GPT2ForSequenceClassification']; import supports "
                     'GPT2LMHeadModel, LlamaForCausalLM, BertForPreTraining, BertForMaskedLM, '
                     'T5ForConditionalGeneration.'),
    'rope_scaling': ('llama', dict(rope_parameters={'rope_type': 'linear', 'factor': 2.0,
                                                    'rope_theta': 500.0}),
                     "config.json has RoPE scaling 'linear'"),
    'attention_bias': ('llama', dict(attention_bias=True), 'config.json has attention_bias=true'),
    'feed_forward_proj': ('t5_v1_1', dict(feed_forward_proj='gated-silu'),
                          "config.json has feed_forward_proj='gated-silu'"),
    'inverse_layer_idx': ('gpt2', dict(scale_attn_by_inverse_layer_idx=True),
                          'config.json has scale_attn_by_inverse_layer_idx=true'),
    'relative_key': ('bert_masked_lm', dict(position_embedding_type='relative_key'),
                     "config.json has position_embedding_type='relative_key'"),
    'wrong_shape': ('gpt2', dict(n_inner=40), 'tensor transformer.h.0.mlp.c_fc.weight has shape'),
}


@pytest.mark.parametrize('case', sorted(REFUSED))
def test_unsupported_checkpoints_are_refused_in_one_line(checkpoints, tmp_path, case):
  name, changes, message = REFUSED[case]
  directory = _edited(checkpoints[name][0], tmp_path / 'src', **changes)
  with pytest.raises(InteropError) as error:
    cli.import_checkpoint(directory, str(tmp_path / 'run'))
  assert message in str(error.value) and '\n' not in str(error.value)
  assert not os.path.exists(tmp_path / 'run' / 'config.json')


def test_tensors_missing_or_left_over_are_named():
  layout = weights.Layout((weights.table('a', 'x/a', (2, 3)),), ())
  with pytest.raises(InteropError, match='lacks tensors its config.json implies: a;'):
    weights.to_params(layout, {}, True, 'src')
  with pytest.raises(InteropError, match='does not use: b;'):
    weights.to_params(layout, {'a': np.zeros((2, 3)), 'b': np.zeros(1)}, True, 'src')


def test_import_never_writes_into_a_used_workdir(checkpoints, tmp_path):
  (tmp_path / 'config.json').write_text('{"mine": 1}')
  with pytest.raises(InteropError, match='already has config.json'):
    cli.import_checkpoint(checkpoints['gpt2'][0], str(tmp_path))
  assert (tmp_path / 'config.json').read_text() == '{"mine": 1}'


def test_a_float16_import_restores_as_the_run_that_trains_it(checkpoints, tmp_path):
  """A float16 run's state carries a loss scale: the import saves that state, so the
  training loop's restore (abstract state with the scale) reads it."""
  workdir = str(tmp_path / 'run')
  cli.import_checkpoint(checkpoints['gpt2'][0], workdir, ['--config.dtype=float16'])
  config = run_config.saved_config(workdir, [])
  assert config.dtype == 'float16'
  cfg = tasks.model_config(config, config.model.vocab_size, jnp.float16)
  task, tx = tasks.from_config(config, cfg), optimizer.make_optimizer(config.train)
  scaler = loss_scale.from_config(config, jnp.float16)
  abstract, _ = state_lib.state_shardings(task, tx, sharding.make_mesh(config.mesh),
                                          config.data.seq_len, loss_scale=scaler)
  manager = checkpointing.make_manager(workdir, config.train.keep_checkpoints)
  state, data_state = checkpointing.restore_latest(manager, abstract)
  assert isinstance(state, state_lib.ScaledTrainState) and data_state is None
  assert float(state.loss_scale.scale) == config.train.loss_scale_init
  checkpointing.finish(manager)


def test_an_override_that_changes_the_model_is_refused(checkpoints, tmp_path):
  with pytest.raises(InteropError, match='drop the --config.model.norm_eps override'):
    cli.import_checkpoint(checkpoints['gpt2'][0], str(tmp_path / 'run'),
                          ['--config.model.norm_eps=0.1'])


def test_hub_names_resolve_through_the_cache_and_fail_clearly_offline(checkpoints, tmp_path,
                                                                      monkeypatch):
  hub = pytest.importorskip('huggingface_hub')
  monkeypatch.setattr(hub.constants, 'HF_HUB_OFFLINE', True)
  monkeypatch.setattr(hub.constants, 'HF_HUB_CACHE', str(tmp_path))
  snapshot = tmp_path / 'models--tiny--gpt2' / 'snapshots' / 'abc123'
  shutil.copytree(checkpoints['gpt2'][0], snapshot)
  (tmp_path / 'models--tiny--gpt2' / 'refs').mkdir()
  (tmp_path / 'models--tiny--gpt2' / 'refs' / 'main').write_text('abc123')
  assert os.path.samefile(cli.resolve_source('hf:tiny/gpt2'), snapshot)
  with pytest.raises(InteropError, match='Could not get tiny/absent from the Hugging Face hub'):
    cli.resolve_source('hf:tiny/absent')


# --- the command line ---------------------------------------------------------------
@pytest.mark.slow
def test_cli_import_then_sample_and_eval(checkpoints, tiny_corpus, tmp_path):
  workdir = str(tmp_path / 'run')

  def main(*args):
    done = subprocess.run([sys.executable, 'main.py', f'--workdir={workdir}', *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout
  imported = json.loads(main('--mode=import', f'--from={checkpoints["gpt2"][0]}', '--json'))
  assert imported['architecture'] == 'GPT2LMHeadModel' and imported['step'] == 0
  assert main('--mode=sample', '--prompt=In the beginning', '--greedy',
              '--max_new_tokens=5').startswith('In the beginning')
  evaluated = json.loads(main('--mode=eval', '--json', '--config=configs/default.py',
                              f'--config.data.corpus={tiny_corpus}', '--config.data.seq_len=32',
                              '--config.data.batch_size=2', '--config.train.eval_steps=2',
                              '--config.data.eval_fraction=0.2'))
  assert evaluated['step'] == 0 and np.isfinite(evaluated['eval_loss'])


@pytest.mark.slow
def test_training_continues_from_an_imported_workdir(checkpoints, tiny_corpus, tmp_path):
  workdir = str(tmp_path / 'run')
  cli.import_checkpoint(checkpoints['gpt2'][0], workdir)
  config = run_config.saved_config(workdir, [])
  config.data.update(corpus=tiny_corpus, seq_len=32, batch_size=4)
  config.train.update(steps=2, warmup_steps=1, log_every=1, eval_every=2, eval_steps=1,
                      checkpoint_every=2)
  assert loop.train_and_evaluate(config, workdir)['step'] == 2
