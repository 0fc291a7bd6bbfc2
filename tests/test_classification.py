"""The classification task (tasks/classification.py) for an encoder and a decoder: framing
and truncation, the head on [CLS] / the last real token, learning a separable toy set,
macro-F1 and the majority baseline, the label set read from the training records and
saved, accounting, and --mode=predict (end to end in the slow tier)."""
import dataclasses
import functools
import json
import os
import random
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tasks
from configs import default
from inference import predict as predict_cli
from input_pipeline.pipeline import eval_batches
from input_pipeline.tokenizer import SpecialIds, Tokenizer
from models import ModelConfig, normalize_metrics
from scaling import estimate
from tasks.classification import label_order
from train import config_checks, flops, run_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ = 16
WORDS = ('the', 'a', 'river', 'king', 'stone', 'bird', 'sees', 'finds', 'light', 'gate', 'old',
         'small', 'good', 'bad', 'water', 'bread')
IDS = SpecialIds(pad=0, eos=1, unk=2, mask=3, cls=4, sep=5)


class WordTokenizer(Tokenizer):
  """One id per word of WORDS (after the six special ids)."""
  vocab_size = 6 + len(WORDS)
  special = IDS
  bytes_per_token = np.ones(6 + len(WORDS), np.int32)

  def encode(self, text):
    return [6 + WORDS.index(w) for w in text.split()]


TOKENIZER = WordTokenizer()
ENCODER = ModelConfig(arch='encoder', vocab_size=32, num_layers=2, num_heads=2, num_kv_heads=2,
                      head_dim=16, d_model=32, d_ff=64, max_len=SEQ, position='learned',
                      num_token_types=2, nsp_head=True, num_labels=2, scan_layers=False)
DECODER = dataclasses.replace(ENCODER, arch='decoder', position='rope', num_token_types=0,
                              nsp_head=False)


def _toy_records(count: int, seed: int, labels=('bad', 'good')) -> list[dict]:
  """Filler words with one keyword ('good' or 'bad') at a random place: the label."""
  rng = random.Random(seed)
  filler = [w for w in WORDS if w not in ('good', 'bad')]
  records = []
  for _ in range(count):
    keyword = rng.choice(('good', 'bad'))
    words = [rng.choice(filler) for _ in range(rng.randint(2, 9))]
    words.insert(rng.randint(0, len(words)), keyword)
    records.append({'text': ' '.join(words), 'label': labels[keyword == 'good']})
  return records


def _task(cfg: ModelConfig, labels=('bad', 'good'), counts=()):
  return tasks.for_model(dataclasses.replace(cfg, num_labels=len(labels)), 'classification',
                         labels=tuple(labels), label_counts=tuple(counts), seq_len=SEQ)


def _params(task, seed: int = 0):
  return nn.unbox(jax.jit(task.init)(jax.random.key(seed), task.example_batch(1, SEQ)))


@functools.lru_cache(maxsize=None)
def _model(cfg: ModelConfig, labels=('bad', 'good')):
  """(task, params, jitted logits, jitted eval loss) of a model, made once per session."""
  task = _task(cfg, labels)
  return (task, _params(task), jax.jit(task.logits),
          jax.jit(lambda params, batch: task.loss(params, batch, None, False)))


def _batch(task, records) -> dict:
  examples = task.examples(TOKENIZER, SEQ)
  rows = examples.source(records)
  return {k: jnp.asarray(v) for k, v in next(eval_batches(examples, records, len(rows), 0, 1)).items()}


# --- framing ----------------------------------------------------------------------------

def test_an_encoder_row_is_cls_text_sep_pair_sep_with_token_types():
  task = _task(ENCODER)
  examples = task.examples(TOKENIZER, SEQ)
  record = {'text': 'the river', 'text_pair': 'a king', 'label': 'good'}
  example = examples.make_example(examples.source([record])[0], None)
  river, king = 6 + WORDS.index('river'), 6 + WORDS.index('king')
  assert example['inputs'][:7].tolist() == [4, 6, river, 5, 7, king, 5]
  assert example['token_type_ids'][:7].tolist() == [0, 0, 0, 0, 1, 1, 1]
  assert example['segment_ids'].tolist() == [1] * 7 + [0] * (SEQ - 7)
  assert int(example['targets']) == 1 and float(example['weights']) == 1.0
  assert examples.row_tokens(examples.source([record])[0]) == 7


def test_a_decoder_row_is_text_separator_pair_eos():
  task = _task(DECODER)
  examples = task.examples(TOKENIZER, SEQ)
  example = examples.make_example(
      examples.source([{'text': 'the', 'text_pair': 'a', 'label': 'bad'}])[0], None)
  assert example['inputs'][:5].tolist() == [6, 5, 7, 1, 0]
  assert 'token_type_ids' not in example and int(example['targets']) == 0


def test_long_texts_are_cut_to_seq_len_the_longer_first_and_logged(caplog):
  examples = _task(ENCODER).examples(TOKENIZER, SEQ)
  long, short = ' '.join(['the'] * 30), 'a a'
  caplog.set_level('INFO')
  (ids, types, cut), = examples.encode([{'text': long, 'text_pair': short}])
  assert cut and len(ids) == SEQ and ids.tolist().count(7) == 2  # the pair kept whole
  assert ids.tolist()[-1] == 5 and types.tolist().count(1) == 3
  (ids, _, _), = examples.encode([{'text': long, 'text_pair': long}])
  assert len(ids) == SEQ
  decoder = _task(DECODER).examples(TOKENIZER, SEQ)
  rows = decoder.rows([{'text': long, 'label': 'good'}, {'text': 'a', 'label': 'bad'}])
  assert len(rows[0][0]) == SEQ and rows[0][0][-1] == 1  # still ends in eos
  assert '1 of 2 records are longer than data.seq_len=16' in caplog.text


def test_the_padding_rows_of_the_last_eval_batch_weigh_nothing():
  task, params, _, loss = _model(ENCODER)
  examples = task.examples(TOKENIZER, SEQ)
  records = _toy_records(5, 0)
  batch = next(eval_batches(examples, records, 8, 0, 1))
  assert batch['weights'].tolist() == [1] * 5 + [0] * 3 and batch['targets'].shape == (8,)
  _, sums = loss(params, batch)
  assert float(sums['weight']) == 5
  assert sum(float(sums[f'class_{i}_true']) for i in range(2)) == 5
  assert np.isfinite(float(sums['loss']))


# --- the head reads [CLS] / the last real token -----------------------------------------

@pytest.mark.parametrize('cfg', [ENCODER, DECODER, dataclasses.replace(ENCODER, nsp_head=False)],
                         ids=['encoder', 'decoder', 'encoder_without_pooler'])
def test_tokens_after_the_last_real_one_do_not_change_the_logits(cfg):
  task, params, logits_fn, _ = _model(cfg)
  batch = _batch(task, [{'text': 'the old king finds water', 'label': 'good'}])
  length = int(batch['segment_ids'][0].sum())
  logits = logits_fn(params, batch)
  changed = dict(batch, inputs=batch['inputs'].at[0, length:].set(9))
  np.testing.assert_array_equal(logits_fn(params, changed), logits)
  if 'token_type_ids' in batch:
    changed = dict(batch, token_type_ids=batch['token_type_ids'].at[0, length:].set(1))
    np.testing.assert_array_equal(logits_fn(params, changed), logits)
  # the last real token itself does count
  last = dict(batch, inputs=batch['inputs'].at[0, length - 1].set(9))
  assert not np.allclose(logits_fn(params, last), logits)


def test_the_decoder_head_reads_each_rows_own_last_token():
  task, params, logits_fn, _ = _model(DECODER)
  records = [{'text': 'the king', 'label': 'good'}, {'text': 'a small old bird', 'label': 'bad'}]
  together = logits_fn(params, _batch(task, records))
  for i, record in enumerate(records):
    pair = _batch(task, [record, records[1 - i]])  # the same shapes: no new compilation
    np.testing.assert_allclose(logits_fn(params, pair)[0], together[i],
                               rtol=1e-5, atol=1e-5)


# --- learning -----------------------------------------------------------------------------

@pytest.mark.parametrize('cfg', [ENCODER, DECODER], ids=['encoder', 'decoder'])
def test_a_tiny_model_learns_a_keyword_label_to_full_eval_accuracy(cfg):
  task, params, _, loss = _model(cfg)
  # 256 records: with 64, reaching all 40 held-out labels in 40 steps hung on float noise
  # (a learning rate 10% off, or another summation order, left one or two wrong).
  train = _batch(task, _toy_records(256, 1))
  held_out = _batch(task, _toy_records(40, 2))
  tx = optax.adam(3e-3)

  @jax.jit
  def step(params, opt_state):
    grads, _ = jax.grad(lambda p: task.loss(p, train, None, False), has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  opt_state = tx.init(params)
  for _ in range(40):
    params, opt_state = step(params, opt_state)
  means = normalize_metrics(jax.device_get(loss(params, held_out)[1]))
  assert float(means['correct']) == 1.0
  assert task.eval_metrics({k: float(v) for k, v in means.items()})['eval_macro_f1'] == 1.0


def test_dropout_draws_from_the_dropout_key_in_training():
  task = _task(dataclasses.replace(ENCODER, dropout=0.5))
  _, params, _, _ = _model(ENCODER)
  batch = _batch(task, _toy_records(4, 0))
  loss = jax.jit(lambda key: task.loss(params, batch, key, True))
  (a, sums), (b, _) = loss(jax.random.key(1)), loss(jax.random.key(2))
  assert float(a) != float(b) and 'class_0_tp' not in sums


# --- metrics ------------------------------------------------------------------------------

def test_macro_f1_and_majority_baseline_match_a_hand_computation():
  # 3 labels; training counts make label 2 the majority
  task = _task(ENCODER, labels=('a', 'bb', 'ccc'), counts=(5, 1, 9))
  predicted = [0, 0, 1, 2, 2, 1, 0, 2]
  true = [0, 1, 1, 2, 0, 1, 0, 0]
  weights = [1, 1, 1, 1, 1, 1, 1, 0]  # the last row pads the batch
  logits = jax.nn.one_hot(jnp.asarray(predicted), 3) * 5.0
  sums = task.class_sums(logits, jnp.asarray(true), jnp.asarray(weights, jnp.float32))
  sums['weight'] = jnp.sum(jnp.asarray(weights, jnp.float32))
  sums['loss'] = jnp.float32(7.0)
  means = {k: float(v) for k, v in normalize_metrics(sums).items()}
  results = task.eval_metrics(means)
  # the 7 real rows: label 0: tp 2, predicted 3, true 3 -> F1 2/3; label 1: tp 2, predicted
  # 2, true 3 -> 4/5; label 2: tp 1, predicted 2, true 1 -> 2/3
  assert results['eval_macro_f1'] == pytest.approx((2 / 3 + 4 / 5 + 2 / 3) / 3)
  assert results['eval_majority_baseline'] == pytest.approx(1 / 7)  # one real row of label 2
  label_bytes = (1 + 1 + 2 + 2 + 2 + 3 + 1) / 7  # the true labels' lengths
  assert results['eval_bits_per_byte'] == pytest.approx(1.0 / label_bytes / np.log(2))
  try:
    from sklearn.metrics import f1_score
  except ImportError:
    return
  assert results['eval_macro_f1'] == pytest.approx(
      f1_score(true[:7], predicted[:7], average='macro'))


def test_a_label_never_true_nor_predicted_is_left_out_of_macro_f1():
  task = _task(ENCODER, labels=('a', 'b', 'c'))
  logits = jax.nn.one_hot(jnp.asarray([0, 1]), 3)
  sums = task.class_sums(logits, jnp.asarray([0, 0]), jnp.ones(2))
  sums['weight'], sums['loss'] = jnp.float32(2), jnp.float32(1)
  means = {k: float(v) for k, v in normalize_metrics(sums).items()}
  assert task.eval_metrics(means)['eval_macro_f1'] == pytest.approx((2 / 3 + 0) / 2)


# --- the label set ------------------------------------------------------------------------

def _classification_config(labels=None):
  config = default.get_config()
  config.task = 'classification'
  if labels is not None:
    config.classification.labels = labels
  return config


def test_labels_are_read_from_training_records_sorted_counted_and_saved(tmp_path):
  config = _classification_config()
  splits = {'train': [{'text': 'x', 'label': 10}, {'text': 'y', 'label': 2},
                      {'text': 'z', 'label': 10}],
            'eval': [{'text': 'w', 'label': 2}]}
  tasks.task_class(config).settle_config(config, splits)
  assert list(config.classification.labels) == [2, 10]
  assert list(config.classification.label_counts) == [1, 2]
  (tmp_path / 'config.json').write_text(config.to_json())
  saved = run_config.saved_config(str(tmp_path), [])
  assert list(saved.classification.labels) == [2, 10]  # integers stay integers
  assert tasks.model_config(saved, 256, jnp.float32).num_labels == 2
  task = tasks.from_config(saved, tasks.model_config(saved, 256, jnp.float32))
  assert task.labels == (2, 10) and task.majority_index() == 1
  # a second settle (resume, --mode=eval) keeps what was saved
  tasks.task_class(saved).settle_config(saved, splits)
  assert list(saved.classification.labels) == [2, 10]


def test_an_eval_label_the_training_records_lack_fails_naming_label_and_record():
  config = _classification_config()
  splits = {'train': [{'text': 'x', 'label': 'pos'}, {'text': 'y', 'label': 'neg'}],
            'eval': [{'text': 'w', 'label': 'neg'},
                     {'text': 'v', 'label': 'neutral', 'ref': 'Ruth 1:2'}]}
  with pytest.raises(ValueError, match=r"eval record 2 \(Ruth 1:2\) has label 'neutral', "
                                       'which no training record has'):
    tasks.task_class(config).settle_config(config, splits)


def test_configured_labels_keep_their_order_and_must_cover_the_training_labels():
  config = _classification_config(['pos', 'neg'])
  splits = {'train': [{'text': 'x', 'label': 'neg'}], 'eval': [{'text': 'w', 'label': 'pos'}]}
  tasks.task_class(config).settle_config(config, splits)
  assert list(config.classification.labels) == ['pos', 'neg']
  assert list(config.classification.label_counts) == [0, 1]
  config = _classification_config(['pos', 'neg'])
  with pytest.raises(ValueError, match="train record 1 \\('x'\\) has label 'meh', which "
                                       'classification.labels does not list'):
    tasks.task_class(config).settle_config(
        config, {'train': [{'text': 'x', 'label': 'meh'}], 'eval': []})


def test_one_training_label_is_not_a_classifier():
  config = _classification_config()
  with pytest.raises(ValueError, match='need at least two|needs at least two'):
    tasks.task_class(config).settle_config(
        config, {'train': [{'text': 'x', 'label': 'a'}], 'eval': []})


@pytest.mark.parametrize('field, value, message', [
    ('labels', ['a', 'b', 'a'], "lists 'a' twice"),
    ('labels', ['a'], 'needs at least two'),
    ('label_counts', [1, 2, 3], 'has 3 entries for 2'),
])
def test_bad_classification_fields_fail_at_start_up(field, value, message):
  config = _classification_config(['a', 'b'])
  config.classification[field] = value
  with pytest.raises(config_checks.ConfigError, match=message):
    config_checks.validate(config)


def test_labels_sort_integers_before_strings():
  assert sorted(['b', 3, 'a', 1], key=label_order) == [1, 3, 'a', 'b']


# --- accounting ---------------------------------------------------------------------------

@pytest.mark.parametrize('cfg', [
    ENCODER, dataclasses.replace(ENCODER, nsp_head=False),
    dataclasses.replace(ENCODER, norm='layernorm', use_bias=True, block_order='post_norm',
                        embed_norm=True, final_norm=False, mlm_transform=True, output_bias=True),
    DECODER, dataclasses.replace(DECODER, tie_embeddings=False, output_bias=True)],
    ids=['encoder', 'encoder_without_pooler', 'bert', 'decoder', 'decoder_untied'])
def test_parameter_count_equals_the_initialised_model_head_included(cfg):
  task = _task(cfg, labels=('a', 'b', 'c'))
  params = estimate.abstract_params(task)
  assert sum(task.param_counts().values()) == sum(
      int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  assert params['classifier']['dense']['kernel'].shape == (cfg.d_model, 3)
  assert 'lm_head' not in params.get('head', {}) and 'next_sentence' not in params


@pytest.mark.parametrize('cfg', [ENCODER, DECODER], ids=['encoder', 'decoder'])
def test_forward_flops_agree_with_xla_cost_analysis(cfg):
  task = _task(dataclasses.replace(cfg, d_model=128, head_dim=64, d_ff=512, max_len=64))
  params = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), estimate.abstract_params(task))
  batch = task.train_batch(2, 64)
  ours = task.forward_flops_per_step(params, 2, 64)
  analysis = jax.jit(task.logits).lower(params, batch).compile().cost_analysis()
  analysis = analysis[0] if isinstance(analysis, list) else analysis
  assert abs(ours / analysis['flops'] - 1) < 0.05, (ours, analysis['flops'])


def test_the_shipped_config_builds_before_any_label_is_known():
  # --mode=estimate reads no data: the head has a placeholder size until labels are read
  from configs import classify_tiny
  task = estimate.model_task(classify_tiny.get_config(), 'cpu')
  assert task.cfg.num_labels == 2 and task.cfg.nsp_head and task.name == 'classification'
  params = estimate.abstract_params(task)
  assert sum(task.param_counts().values()) == sum(
      int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  # The embedding is a lookup here, tied or not: the estimate's matmul count leaves it out.
  config = classify_tiny.get_config()
  config.model.tie_embeddings = True
  embedding = params['token_embed']['embedding'].size
  assert estimate.estimate(config)['matmul_params'] == flops.matmul_param_count(
      params, tie_embeddings=True) - embedding


# --- predict ------------------------------------------------------------------------------

def test_predict_keeps_integer_labels_and_matches_full_length_padding():
  task, params, logits_fn, _ = _model(DECODER)
  task = dataclasses.replace(task, labels=(0, 7))
  records = _toy_records(5, 4, labels=(0, 7))
  records[1] = {'text': ' '.join(['the'] * 40)}  # no label; cut to seq_len
  results = task.predict(params, TOKENIZER, records, batch_size=2)
  full = jax.nn.softmax(logits_fn(params, _batch(task, [dict(r, label=0) for r in records])))
  for record, result, p in zip(records, results, np.asarray(full)):
    assert {k: result[k] for k in record} == record
    assert result['predicted'] in (0, 7) and isinstance(result['predicted'], int)
    assert list(result['probabilities']) == ['0', '7']
    np.testing.assert_allclose(list(result['probabilities'].values()), p, atol=1e-5)
    assert result['predicted'] == (0, 7)[int(np.argmax(p))]


def test_predict_reads_unlabelled_records_and_never_overwrites(tmp_path):
  source = tmp_path / 'in.jsonl'
  source.write_text('{"text": "a b"}\n\n{"text": "c", "label": 3, "id": 9}\n')
  assert predict_cli.read_records(str(source)) == [{'text': 'a b'},
                                                  {'text': 'c', 'label': 3, 'id': 9}]
  assert predict_cli.output_path(str(tmp_path / 'run'), str(source), None) == str(
      tmp_path / 'run' / 'predictions' / 'in.jsonl')
  assert predict_cli.output_path('run', str(source), '-') is None
  with pytest.raises(ValueError, match='is the input'):
    predict_cli.output_path('run', str(source), str(source))
  (tmp_path / 'taken.jsonl').write_text('')
  with pytest.raises(ValueError, match='already exists'):
    predict_cli.output_path('run', str(source), str(tmp_path / 'taken.jsonl'))
  source.write_text('{"text": "a"}\n{"label": 1}\n')
  with pytest.raises(ValueError, match='in.jsonl:2'):
    predict_cli.read_records(str(source))


def test_a_classification_run_generates_no_text():
  with pytest.raises(ValueError, match='--mode=predict'):
    _task(DECODER).complete(None, TOKENIZER, ['x'], None)


# --- end to end ---------------------------------------------------------------------------

def _write_jsonl(path, records):
  path.write_text(''.join(json.dumps(r) + '\n' for r in records))
  return str(path)


def _sentences(count: int, seed: int, labels) -> list[dict]:
  """Real-word sentences; the label is whether 'good' or 'bad' occurs (int or str labels)."""
  rng = random.Random(seed)
  subjects = ['the cat', 'a dog', 'the old king', 'my sister', 'the river', 'a small bird']
  verbs = ['sees', 'follows', 'remembers', 'carries', 'finds', 'greets']
  objects = ['the bread', 'a stone', 'the morning light', 'its shadow', 'the gate', 'water']
  records = []
  for _ in range(count):
    good = rng.random() < 0.5
    words = f'{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}'.split()
    words.insert(rng.randint(0, len(words)), 'good' if good else 'bad')
    records.append({'text': ' '.join(words) + '.', 'label': labels[good]})
  return records


def _main(*args, cwd):
  result = subprocess.run([sys.executable, os.path.join(ROOT, 'main.py'), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


@pytest.mark.slow
@pytest.mark.parametrize('arch, labels', [('encoder', ('negative', 'positive')),
                                          ('decoder', (0, 1))])
def test_train_eval_and_predict_end_to_end(tmp_path, arch, labels):
  train = _write_jsonl(tmp_path / 'train.jsonl', _sentences(400, 0, labels))
  held_out = _sentences(60, 1, labels)
  evals = _write_jsonl(tmp_path / 'eval.jsonl', held_out)
  workdir = str(tmp_path / 'run')
  overrides = [f'--config.data.corpus={train}', f'--config.data.eval_corpus={evals}',
               f'--config.data.cache_dir={tmp_path / "cache"}', '--config.data.seq_len=32',
               '--config.data.batch_size=16', '--config.data.tokenizer.vocab_size=512',
               '--config.model.num_layers=2', '--config.model.d_model=64',
               '--config.model.d_ff=128', '--config.model.max_len=32',
               '--config.model.dropout=0.0', '--config.train.steps=80',
               '--config.train.lr=3e-3', '--config.train.warmup_steps=10',
               '--config.train.eval_every=80', '--config.train.checkpoint_every=80',
               '--config.train.log_every=20', '--config.train.eval_steps=10']
  if arch == 'decoder':
    overrides += ['--config.model.arch=decoder', '--config.model.position=rope',
                  '--config.model.norm=rmsnorm', '--config.model.num_token_types=0']
  _main('--config=configs/classify_tiny.py', f'--workdir={workdir}', *overrides, cwd=ROOT)
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['classification']['labels'] == list(labels)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    last = [json.loads(line) for line in f][-1]
  assert last['eval_accuracy'] >= 0.9, last
  assert {'eval_macro_f1', 'eval_majority_baseline', 'eval_bits_per_byte'} <= set(last)
  _main('--mode=predict', f'--workdir={workdir}', f'--input={evals}', cwd=ROOT)
  with open(os.path.join(workdir, 'predictions', 'eval.jsonl')) as f:
    predictions = [json.loads(line) for line in f]
  assert [p['text'] for p in predictions] == [r['text'] for r in held_out]
  assert all(type(p['predicted']) is type(labels[0]) for p in predictions)
  accuracy = np.mean([p['predicted'] == p['label'] for p in predictions])
  assert accuracy == pytest.approx(last['eval_accuracy'], abs=1e-6)
  # a second predict never overwrites the first
  result = subprocess.run([sys.executable, 'main.py', '--mode=predict', f'--workdir={workdir}',
                           f'--input={evals}'], cwd=ROOT, capture_output=True, text=True)
  assert result.returncode != 0 and 'already exists' in result.stderr
