"""The evaluation harness (evals/): batched log-likelihoods equal hand sums of
log-softmax over plain forward passes (decoder, encoder-decoder with the token that closes
its targets) and a loop of masked passes (encoder pseudo-log-likelihood); a choice scores
the tokens it has after its context (a dummy-prefix tokenizer, Llama's); acc_norm divides
by the choice's bytes; few-shot prompts are deterministic and never show the scored
example; a memorised toy task scores 100%; rolling bits per byte of the validation split
(`--tasks=validation_split --rolling_overlap=1`) equals --mode=eval's; results never
overwrite a file the harness did not write; bad input fails in one line."""
import dataclasses
import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import input_pipeline
import tasks
from conftest import decoding_params, initial_params, tiny_config, write_tiny_corpus
from evals import bible, fewshot, harness, metrics, scoring
from evals.tasks import EvalTask, TaskError, from_examples, load, load_all
from input_pipeline import bible_tasks
from input_pipeline.tokenizer import SentencePieceTokenizer, train_tokenizer
from models import ModelConfig
from tasks.causal_lm import rolling_windows
from tasks.span_corruption import SpanCorruption
from train import checkpointing, loop, optimizer, run_config
from train import state as state_lib

CONTEXT = 32  # the scoring tests' context (tokens)


@pytest.fixture(scope='module')
def tokenizer(tmp_path_factory):
  root = tmp_path_factory.mktemp('evals_tokenizer')
  corpus = write_tiny_corpus(root / 'corpus.jsonl')
  return SentencePieceTokenizer(train_tokenizer([line for line in open(corpus)],
                                                str(root / 'sp'), 400))


def _cfg(arch: str, **changes) -> ModelConfig:
  return ModelConfig(**{**dict(arch=arch, vocab_size=512, num_layers=1, num_heads=2,
                                num_kv_heads=2, head_dim=16, d_model=32, d_ff=64, max_len=64),
                        **changes})


# Pairs of (context, continuation) ids: ordinary ids of the tokenizer, lengths across two
# buckets (16 and 32) so batches are padded to more than one shape.
_RNG = np.random.default_rng(0)
PAIRS = [(_RNG.integers(110, 400, c).tolist(), _RNG.integers(110, 400, n).tolist())
         for c, n in [(3, 1), (5, 4), (12, 2), (20, 6), (1, 3), (9, 9)]]


def _batched(task, params, tokenizer, batch_size=4):
  """log p(continuation | context) of each pair, through rows, buckets and batches."""
  rows, owner = [], []
  for p, (context, continuation) in enumerate(PAIRS):
    made = task.scoring_rows(tokenizer, context, continuation)
    rows += made
    owner += [p] * len(made)
  scores = scoring.loglikelihoods(task, params, rows, batch_size, CONTEXT)
  return np.bincount(owner, weights=scores, minlength=len(PAIRS))


@functools.lru_cache(maxsize=None)
def _forward(task):
  return jax.jit(lambda params, batch: jax.nn.log_softmax(
      task.logits(params, batch)[0].astype(jnp.float32)))


def _log_softmax(task, params, batch):
  """Log-probabilities [T, V] of one row: a plain forward pass, each array right-padded
  to CONTEXT (one compilation) with zeros, which the model masks (segment 0) or, on a
  causal side, never reads before the end of the row."""
  batch = {k: jnp.asarray([v + [0] * (CONTEXT - len(v))], jnp.int32) for k, v in batch.items()}
  return np.asarray(_forward(task)(params, batch))


# --- log-likelihoods by hand ----------------------------------------------------------
def test_decoder_loglikelihoods_equal_a_hand_sum_of_log_softmax(tokenizer):
  task, params = decoding_params(_cfg('decoder'))
  got = _batched(task, params, tokenizer)
  for (context, continuation), value in zip(PAIRS, got):
    ids = context + continuation
    log_p = _log_softmax(task, params, {'inputs': ids[:-1], 'segment_ids': [1] * CONTEXT,
                                        'positions': list(range(CONTEXT))})
    # Target t is ids[t + 1]: the continuation's tokens are targets len(context) - 1 onwards.
    want = sum(log_p[len(context) - 1 + k, token] for k, token in enumerate(continuation))
    np.testing.assert_allclose(value, want, rtol=1e-5, atol=1e-5)
  assert len(set(np.round(got, 3))) == len(PAIRS)  # the pairs score differently


@pytest.fixture(scope='module')
def llama_tokenizer(tmp_path_factory):
  """Llama 2's layout (tests/hf_fixtures.py): a dummy-prefix '▁' and bos in front."""
  pytest.importorskip('transformers')
  import hf_fixtures
  from input_pipeline.tokenizer import import_tokenizer
  root = tmp_path_factory.mktemp('llama_tokenizer')
  return import_tokenizer(hf_fixtures.llama_tokenizer_dir(root / 'hf', vocab_size=400),
                          str(root / 'run'))


def test_a_choice_scores_the_tokens_it_has_after_its_context_with_a_dummy_prefix(
    llama_tokenizer):
  """Encoded alone, ' 1 Kings' is ['▁', '▁', '1', ...] under Llama's tokenizer; after
  'Book:' it is ['▁', '1', ...]. A choice scores the tokens that encoding context + choice
  adds after the context's (after bos), and a context's trailing space moves onto the
  choice (as lm-evaluation-harness does)."""
  tok = llama_tokenizer
  assert tok.adds_bos and [tok.id_to_piece(i) for i in tok.encode(' 1 Kings')[:2]] == ['▁'] * 2
  task, params = decoding_params(_cfg('decoder', vocab_size=tok.vocab_size))
  examples = [{'context': 'Verse: In the beginning.\nBook:', 'choices': [' 1 Kings', ' Genesis'],
               'gold': 1},
              {'context': 'And God said: ', 'choices': ['Let there be light.', 'Amen.'],
               'gold': 0}]
  _, records = harness.multiple_choice(task, params, tok, from_examples('books', examples),
                                       harness.Settings(batch_size=4))
  for example, record in zip(examples, records):
    context = example['context'].rstrip()
    for choice, value in zip(example['choices'], record['loglikelihoods']):
      ids = [tok.bos_id] + tok.encode(example['context'] + choice)
      first = 1 + len(tok.encode(context))
      assert ids[:first] == [tok.bos_id] + tok.encode(context)  # the prefix property holds
      log_p = _log_softmax(task, params, {'inputs': ids[:-1], 'segment_ids': [1] * CONTEXT,
                                          'positions': list(range(CONTEXT))})
      want = sum(log_p[t - 1, ids[t]] for t in range(first, len(ids)))
      np.testing.assert_allclose(value, want, rtol=1e-5, atol=1e-5)


def test_a_pair_splits_where_encodings_agree_when_a_token_spans_the_boundary(tokenizer):
  """Trailing whitespace moves onto the continuation; where the whole text's ids do not
  start with the context's, the split falls where they part (the whole text's ids)."""
  context, continuation, parted = harness.continuation_pair(tokenizer, 'Q: a dog ', 'follows')
  assert (context, parted) == (tokenizer.encode('Q: a dog'), False)
  assert continuation == tokenizer.encode('Q: a dog follows')[len(context):]

  class Merging:  # 'ab' is one token, 'a' and 'b' others
    def encode(self, text):
      return [{'ab': 0, 'a': 1, 'b': 2}[p] for p in text.replace('ab', ' ab ').split()]

  assert harness.continuation_pair(Merging(), 'b a', 'b b') == ([2], [0, 2], True)


@pytest.mark.parametrize('name', ['span_corruption', 'sft'])
def test_encoder_decoder_loglikelihoods_equal_a_hand_sum_of_log_softmax(tokenizer, name):
  """Span corruption: the continuation is the span of a sentinel closing the context, then
  the eos that closes a last span in training; a fine-tuned (sft) encoder-decoder reads the
  context and writes the continuation and <|end|>, which closes its training answers. The
  closing token is scored too (T5's rank classification)."""
  task, params = decoding_params(_cfg('encoder_decoder', position='relative'))
  task = tasks.for_model(task.cfg, name)
  got = _batched(task, params, tokenizer)
  sentinel, eos, pad = tokenizer.sentinel_ids[0], tokenizer.eos_id, tokenizer.pad_id
  end = tokenizer.special_piece_id('<|end|>')
  for (context, continuation), value in zip(PAIRS, got):
    source, lead, closing = ((context + [sentinel, eos], [sentinel], eos)
                             if name == 'span_corruption' else (context + [eos], [], end))
    log_p = _log_softmax(task, params, {
        'encoder_inputs': source, 'encoder_segment_ids': [1] * len(source),
        'encoder_positions': list(range(len(source))),
        'decoder_inputs': [pad] + lead + continuation,
        'decoder_segment_ids': [1] * CONTEXT, 'decoder_positions': list(range(CONTEXT))})
    want = sum(log_p[len(lead) + k, token] for k, token in enumerate(continuation + [closing]))
    np.testing.assert_allclose(value, want, rtol=1e-5, atol=1e-5)


@dataclasses.dataclass(frozen=True)
class _Bigram(SpanCorruption):
  """A span-corruption 'model' whose next-token logits are a table row of the decoder's
  input token: log-probabilities set by hand."""

  def logits(self, params, batch, train=False, dropout_rng=None):
    return params['table'][batch['decoder_inputs']]


def test_a_choice_that_is_a_token_prefix_of_another_no_longer_wins_by_construction(tokenizer):
  """Without the closing eos, log p(prefix) >= log p(prefix + more) under every model;
  scored with it, the longer choice wins under a model that goes on after the prefix and
  stops after the longer one. acc_norm divides by the choice's own bytes (the closing
  token has none)."""
  task = _Bigram(_cfg('encoder_decoder', position='relative'))
  choices = [' the', ' the old king']
  short, longer = (harness.continuation_pair(tokenizer, 'Who:', c)[1] for c in choices)
  assert longer[:len(short)] == short
  table = np.zeros((task.cfg.vocab_size, task.cfg.vocab_size), np.float32)
  for before, after in zip(longer, longer[1:] + [tokenizer.eos_id]):
    table[before, after] = 12.0  # goes on to the longer choice, then stops
  task_file = from_examples('prefix', [{'context': 'Who:', 'choices': choices, 'gold': 1}])
  _, (record,) = harness.multiple_choice(task, {'table': jnp.asarray(table)}, tokenizer,
                                         task_file, harness.Settings(batch_size=4))
  assert record['acc'] == 1.0
  per_byte = np.asarray(record['loglikelihoods']) / [len(c.encode()) for c in choices]
  assert record['pred_norm'] == int(np.argmax(per_byte))


def test_pseudo_loglikelihood_equals_a_loop_masking_one_token_at_a_time(tokenizer):
  task, params = decoding_params(_cfg('encoder', position='learned'))
  got = _batched(task, params, tokenizer, batch_size=8)  # 25 masked rows: several batches
  for (context, continuation), value in zip(PAIRS, got):
    ids = context + continuation
    want = 0.0
    for t in range(len(context), len(ids)):
      masked = ids[:t] + [tokenizer.mask_id] + ids[t + 1:]
      log_p = _log_softmax(task, params, {'inputs': masked, 'segment_ids': [1] * len(ids),
                                          'positions': list(range(len(ids))),
                                          'token_type_ids': [0] * len(ids)})
      want += log_p[t, ids[t]]
    np.testing.assert_allclose(value, want, rtol=1e-5, atol=1e-5)


def test_batches_are_padded_to_a_few_bucketed_shapes_with_zeros():
  rows = [{'inputs': np.arange(1, n + 1, dtype=np.int32)} for n in range(1, 49)]
  batches = [scoring.pad_batch(rows[i:i + 5], 8, 48) for i in range(0, 48, 5)]
  assert {b['inputs'].shape for b in batches} == {(8, 16), (8, 32), (8, 48)}  # 64 capped
  last = batches[-1]['inputs']  # rows of 46..48 tokens, then five empty rows
  assert not last[3:].any() and list(last[0, 44:]) == [45, 46, 0, 0]


def test_acc_norm_divides_by_utf8_bytes_not_characters():
  # '日本' is 2 characters and 6 bytes, 'abc' 3 and 3: per byte the first is likelier
  # (-1.0 vs -1.33), per character or in total the second.
  scores = metrics.choice_scores([-6.0, -4.0], ['日本', 'abc'], 0)
  assert (scores['pred'], scores['acc']) == (1, 0.0)
  assert (scores['pred_norm'], scores['acc_norm']) == (0, 1.0)


def test_paired_differences_majority_baselines_and_undefined_noise():
  """Both models answer the same prompts: the difference's standard error is that of the
  per-example differences (here far below the unpaired sqrt(se1^2 + se2^2)); with one
  example it is undefined, and no call is made."""
  before, after = [1, 0, 1, 0, 1, 1, 0, 0], [1, 0, 1, 1, 1, 1, 0, 0]
  diff, stderr = metrics.paired_difference(before, after)
  assert diff == 0.125 and stderr == pytest.approx(np.std([0] * 7 + [1], ddof=1) / 8 ** 0.5)
  unpaired = np.hypot(metrics.mean_and_stderr(before)[1], metrics.mean_and_stderr(after)[1])
  assert stderr < unpaired / 1.5
  assert metrics.within_noise(diff, stderr) is True
  assert metrics.within_noise(0.3, 0.1) is False
  assert metrics.within_noise(*metrics.paired_difference([0], [1])) is None
  assert metrics.majority_baseline([2, 0, 2, 1]) == (0.5, 2)


# --- few-shot prompts -----------------------------------------------------------------
def _toy_task(train: bool = True) -> EvalTask:
  lines = [{'context': f'Q{i}:', 'choices': [f' a{i}', f' b{i}'], 'gold': i % 2}
           for i in range(12)]
  lines += [{'context': f'T{i}:', 'choices': [f' x{i}', f' y{i}'], 'gold': 0, 'split': 'train'}
            for i in range(20) if train]
  # A train line that repeats an eval example's context must never be its demonstration.
  lines += [{'context': 'Q3:', 'choices': [' a3', ' b3'], 'gold': 1, 'split': 'train'}] * train
  return from_examples('toy', lines)


def test_few_shot_prompts_are_deterministic_and_never_show_the_scored_example(tokenizer):
  for task in (_toy_task(train=True), _toy_task(train=False)):
    prompts = [fewshot.build(task, i, 3, 7, tokenizer, 1000).text
               for i in range(len(task.examples))]
    assert prompts == [fewshot.build(task, i, 3, 7, tokenizer, 1000).text
                       for i in range(len(task.examples))]
    assert prompts != [fewshot.build(task, i, 3, 8, tokenizer, 1000).text
                       for i in range(len(task.examples))]
    for example, prompt in zip(task.examples, prompts):
      *demos, context = prompt.split(fewshot.DELIMITER)
      assert context == example['context'] and len(demos) == 3
      assert not any(d.startswith(example['context']) for d in demos)
      pool = task.train or task.examples
      assert all(d in [fewshot.demonstration(task, e) for e in pool] for d in demos)


def test_prompts_longer_than_the_room_drop_demonstrations_first_then_cut_the_context(
    tokenizer):
  task = _toy_task()
  full = fewshot.build(task, 0, 3, 0, tokenizer, 1000)
  room = len(tokenizer.encode(full.text.split(fewshot.DELIMITER, 1)[1]))  # all but the first
  fitted = fewshot.build(task, 0, 3, 0, tokenizer, room)
  assert fitted.shots == 2 and not fitted.truncated
  assert fitted.text == full.text.split(fewshot.DELIMITER, 1)[1]  # the first one went
  tiny = fewshot.build(task, 0, 3, 0, tokenizer, 1)
  assert (tiny.shots, tiny.truncated, len(tiny.ids)) == (0, True, 1)
  assert tiny.ids == tokenizer.encode(task.examples[0]['context'])[-1:]


# --- end to end: a memorised toy task -----------------------------------------------
TOY_CONTEXTS = ['the cat sees', 'a dog follows', 'the old king remembers', 'my sister carries']
TOY_ANSWERS = [' the bread.', ' a stone.', ' the morning light.', ' water.']


def _memorised(tokenizer):
  """A decoder trained on the four 'context answer' lines until it knows them."""
  task = tasks.for_model(_cfg('decoder'))
  params = initial_params(task.cfg)
  rows = [task.scoring_rows(tokenizer, tokenizer.encode(c), tokenizer.encode(a + '\n'))[0]
          for c, a in zip(TOY_CONTEXTS, TOY_ANSWERS)]
  batch = scoring.pad_batch(rows, len(rows), CONTEXT)
  batch['weights'] = (batch['segment_ids'] > 0).astype(np.float32)  # every token
  tx = optax.adam(1e-2)

  @jax.jit
  def step(params, opt_state):
    grads = jax.grad(lambda p: -jnp.sum(task.loglikelihoods(p, batch)))(params)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state

  opt_state = tx.init(params)
  for _ in range(120):
    params, opt_state = step(params, opt_state)
  return task, params


def test_a_model_that_memorised_a_toy_task_scores_100_percent(tokenizer, tmp_path):
  choice = from_examples('toy_choice', [
      {'context': c, 'choices': TOY_ANSWERS, 'gold': i} for i, c in enumerate(TOY_CONTEXTS)])
  generate = from_examples('toy_generate', [
      {'context': c, 'target': a, 'until': ['\n']} for c, a in zip(TOY_CONTEXTS, TOY_ANSWERS)])
  task, params = _memorised(tokenizer)
  results = harness.evaluate(task, params, tokenizer, [choice, generate],
                             harness.Settings(batch_size=8),
                             out_dir=str(tmp_path))
  assert results['toy_choice']['acc'] == results['toy_choice']['acc_norm'] == 1.0
  assert results['toy_choice']['examples'] == 4 and results['toy_choice']['acc_stderr'] == 0.0
  assert results['toy_generate']['exact_match'] == 1.0
  assert results['toy_generate']['chrf'] == pytest.approx(100.0)
  header, *records = [json.loads(line) for line in open(tmp_path / 'toy_choice.0shot.jsonl')]
  assert header == {'header': True, 'task': 'toy_choice', 'kind': 'multiple_choice',
                    'step': None, 'num_shots': 0, 'seed': 1234, 'limit': 0, 'max_length': 64,
                    'batch_size': 8}
  assert [r['gold'] for r in records] == [0, 1, 2, 3] and all(r['acc'] for r in records)
  assert [len(r['loglikelihoods']) for r in records] == [4] * 4


# --- rolling log-likelihood and the validation pass ----------------------------------
@pytest.fixture(scope='module')
def workdir(tiny_corpus, tmp_path_factory):
  """(config, workdir) of a tiny decoder run with one checkpoint (random parameters),
  written as train_and_evaluate writes it, without compiling a train step."""
  config = tiny_config(tiny_corpus, str(tmp_path_factory.getbasetemp() / 'data_cache'))
  config.train.eval_steps = 1000  # the whole validation split
  workdir = str(tmp_path_factory.mktemp('evals_run') / 'run')
  run = loop.Run(config, workdir)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(run.resolved_config.to_json(indent=2))
  state = state_lib.create_train_state(run.task, optimizer.make_optimizer(config.train),
                                       run.mesh, config.data.seq_len, jax.random.key(3))
  manager = checkpointing.make_manager(workdir, keep=1)
  checkpointing.save(manager, 1, state, run.data.train_iter.get_state())
  checkpointing.finish(manager)
  return config, workdir


def test_rolling_bits_per_byte_of_the_validation_split_equals_mode_eval(workdir):
  """`--tasks=validation_split --rolling_overlap=1 --eval_batch_size=8`: the context
  defaults to data.seq_len, and the task is the validation token stream cut as the eval
  pass cuts it (whole windows of seq_len + 1 tokens sharing one, packed at eos; at most
  train.eval_steps batches), so it scores the eval pass's own rows: the same
  log-probabilities over the same bytes as --mode=eval."""
  config, path = workdir
  expected = loop.evaluate(config, path)['eval_bits_per_byte']
  results = harness.run(run_config.saved_config(path, []), path, ['validation_split'],
                        harness.Settings(overlap=1, batch_size=8))
  got = results['tasks']['validation_split']
  seq_len = config.data.seq_len
  stream = input_pipeline.load_corpus(config, path).splits['eval']
  assert results['max_length'] == seq_len and got['overlap'] == 1
  assert got['tokens'] == (len(stream) - 1) // seq_len * seq_len  # the tail is dropped
  np.testing.assert_allclose(got['bits_per_byte'], expected, rtol=2e-6)
  # At most train.eval_steps batches of data.batch_size windows, as the eval pass reads.
  one_batch = run_config.saved_config(path, ['--config.train.eval_steps=1'])
  (document,) = harness._validation_split(one_batch, path).examples
  assert len(document['tokens']) == 1 + config.data.batch_size * seq_len


def test_rolling_windows_score_every_token_once_with_at_least_overlap_context():
  tokens = np.arange(100, 171)  # 71 tokens: targets 1..70
  for length, overlap in [(16, 1), (16, 5), (16, 16), (80, 8)]:
    rows = rolling_windows(tokens, length, overlap, eos_id=1)
    scored = np.concatenate([r[w > 0] for r, w in zip(rows['targets'], rows['weights'])])
    np.testing.assert_array_equal(scored, tokens[1:])
    for w, weights in enumerate(rows['weights'][1:], 1):
      assert np.argmax(weights > 0) >= overlap - 1  # each scored token sees `overlap` before it


def test_the_command_evaluates_a_workdir_and_writes_per_example_scores(workdir, tmp_path):
  config, path = workdir
  task_file = tmp_path / 'colors.jsonl'
  lines = [{'context': f'Sentence {i}:', 'choices': [' the cat', ' a dog', ' water'],
            'gold': i % 3, 'id': f'c{i}'} for i in range(5)]
  lines += [{'context': 'Example:', 'choices': [' a', ' b'], 'gold': 0, 'split': 'train'}]
  task_file.write_text('\n'.join(json.dumps(line) for line in lines))
  text_file = tmp_path / 'notes.txt'
  text_file.write_text('The cat sees the bread. A dog follows the gate.')
  results = harness.run(run_config.saved_config(path, []), path,
                        [str(task_file), str(text_file)], harness.Settings(num_shots=1, limit=4))
  assert results['step'] == 1 and results['num_shots'] == 1
  colors, notes = results['tasks']['colors'], results['tasks']['notes']
  assert colors['examples'] == 4 and colors['shots'] == 1
  assert set(colors) >= {'acc', 'acc_stderr', 'acc_norm', 'acc_norm_stderr'}
  assert notes['examples'] == 1 and notes['bits_per_byte'] > 0 and notes['perplexity'] > 1
  assert notes['bytes'] == len(text_file.read_text().encode())
  header, *records = [json.loads(line)
                      for line in open(os.path.join(path, 'eval', 'colors.1shot.jsonl'))]
  assert header == {'header': True, 'task': 'colors', 'kind': 'multiple_choice', 'step': 1,
                    'num_shots': 1, 'seed': 1234, 'limit': 4, 'max_length': 32,
                    'batch_size': 32}
  assert [r['id'] for r in records] == ['c0', 'c1', 'c2', 'c3']
  assert all(r['prompt'].startswith('Example: a' + fewshot.DELIMITER) for r in records)
  header, record = [json.loads(line)
                    for line in open(os.path.join(path, 'eval', 'notes.0shot.jsonl'))]
  assert header['overlap'] == 16 and record['bytes'] == notes['bytes']


def test_the_context_defaults_to_the_length_the_run_trained(tiny_corpus, tmp_path):
  lm = tasks.for_model(_cfg('decoder'))  # model.max_len 64
  config = tiny_config(tiny_corpus, str(tmp_path))
  for seq_len, flag, length in [(16, 0, 16), (128, 0, 64), (16, 48, 48)]:
    config.data.seq_len = seq_len
    assert harness.for_run(harness.Settings(max_length=flag), config, lm).max_length == length


def test_results_never_overwrite_an_input_or_a_file_the_harness_did_not_write(tokenizer,
                                                                             tmp_path):
  out = tmp_path / 'eval'
  out.mkdir()
  task_file = out / 'colors.jsonl'  # a user's task file inside DIR/eval
  task_file.write_text(json.dumps({'context': 'a', 'choices': [' b', ' c'], 'gold': 0}))
  task, settings = load(str(task_file)), harness.Settings(num_shots=0)
  results = out / 'colors.0shot.jsonl'
  assert harness.output_path(str(out), task, settings) == str(results)
  harness.check_outputs([task], settings, str(out))  # beside it: fine
  results.symlink_to(task_file)
  with pytest.raises(TaskError, match='would overwrite the input file'):
    harness.check_outputs([task], settings, str(out))
  results.unlink()
  results.write_text('my notes\n')
  with pytest.raises(TaskError, match='is not results the harness wrote'):
    harness.evaluate(tasks.for_model(_cfg('decoder')), None, tokenizer, [task], settings,
                     str(out))
  assert results.read_text() == 'my notes\n' and task_file.read_text().startswith('{')


def test_generation_stops_where_the_runs_training_answers_stop(tokenizer, monkeypatch):
  """A chat-tuned run (sft, dpo; a decoder's seq2seq) ends answers with <|end|>, T5's
  families with eos; the harness decodes to the first stop id and cuts the text at any."""
  end, eos = tokenizer.special_piece_id('<|end|>'), tokenizer.eos_id
  decoder, encoder_decoder = _cfg('decoder'), _cfg('encoder_decoder', position='relative')
  stops = lambda cfg, name: tasks.for_model(cfg, name).generation_stop_ids(tokenizer)
  for cfg in (decoder, encoder_decoder):
    assert stops(cfg, 'auto') == (eos,)
    assert stops(cfg, 'sft') == stops(cfg, 'dpo') == (end, eos)
  assert stops(decoder, 'seq2seq') == (end, eos) and stops(encoder_decoder, 'seq2seq') == (eos,)
  seen = []

  def generate(lm, params, tokenizer, prompts, max_new_tokens, beam_size, batch_size, stop_ids,
               progress=None):
    seen.append(stop_ids)
    return [tokenizer.encode(' the bread.') + [end]] * len(prompts)

  monkeypatch.setattr(scoring, 'generate', generate)
  task = from_examples('answers', [{'context': 'the cat sees', 'target': ' the bread.'},
                                   {'context': 'a dog follows', 'target': ' water' * 12}])
  results, records = harness.generation(tasks.for_model(decoder, 'sft'), None, tokenizer, task,
                                        harness.Settings(max_new_tokens=8))
  assert seen == [(end, eos)] and [r['output'] for r in records] == [' the bread.'] * 2
  assert results['exact_match'] == 0.5 and results['targets_over_max_new_tokens'] == 1


def test_beam_search_batches_are_padded_to_a_few_widths_and_prepared_once(tokenizer,
                                                                          monkeypatch):
  from inference import beam, generate as generate_lib
  prepare, search, prepared, widths = generate_lib.prepare, beam.search, [], []
  monkeypatch.setattr(generate_lib, 'prepare',
                      lambda *args, **kwargs: prepared.append(1) or prepare(*args, **kwargs))
  monkeypatch.setattr(beam, 'search',
                      lambda task, params, ids, *args: widths.append(ids.shape) or search(
                          task, params, ids, *args))
  task, params = decoding_params(_cfg('decoder'))
  prompts = [list(range(110, 110 + n)) for n in (3, 5, 9, 4, 12)]
  new = scoring.generate(task, params, tokenizer, prompts, 4, 2, 2, (tokenizer.eos_id,))
  assert len(prepared) == 1 and set(widths) == {(2, 16)}  # two prompts a chunk, one bucket
  decoder = task.decoding_task(tokenizer)
  for start in range(0, len(prompts), 2):  # each chunk searched alone, padded to its longest
    chunk = prompts[start:start + 2]
    assert new[start:start + 2] == beam.beam_search(decoder, params, chunk, 4, 2,
                                                    eos_id=tokenizer.eos_id)


def test_greedy_batches_of_one_row_decode_with_joined_kernels(tokenizer, monkeypatch):
  """Evaluation decodes chunks padded to its batch: one row per step joins query, key
  and value (inference/generate.py prepare), a batch of two does not."""
  from inference import generate as generate_lib
  joins = []
  monkeypatch.setattr(generate_lib, 'fuse_qkv', lambda params: joins.append(1) or params)
  task, params = decoding_params(_cfg('decoder'))
  prompts = [list(range(110, 110 + n)) for n in (3, 5, 9)]
  for batch_size, expected in [(1, 1), (2, 0)]:
    joins.clear()
    scoring.generate(task, params, tokenizer, prompts, 2, 0, batch_size, (tokenizer.eos_id,))
    assert len(joins) == expected


# --- built-in tasks -------------------------------------------------------------------
def test_built_ins_score_held_out_chapters_and_show_training_chapters():
  held_out = bible_tasks.held_out_chapters()
  chapter = lambda ref: (ref.rsplit(' ', 1)[0], int(ref.rsplit(' ', 1)[1].split(':')[0]))
  for name, choices in [('bible_cloze', 4), ('bible_book', 4), ('bible_genre', 8)]:
    task = bible.load(name)
    assert task.kind == 'multiple_choice' and len(task.examples) > 600
    assert all(chapter(e['id']) in held_out for e in task.examples)
    assert not any(chapter(e['id']) in held_out for e in task.train[::50])
    assert all(len(e['choices']) == choices == len(set(e['choices'])) for e in task.examples)
    golds = np.bincount([e['gold'] for e in task.examples], minlength=choices)
    assert name == 'bible_genre' or golds.min() > 0.15 * len(task.examples)  # gold moves
  verses = {(v['ref']): v['text'] for v in bible_tasks.splits('bible_genre')['eval']}
  example = bible.load('bible_cloze').examples[0]
  book, place = example['id'].rsplit(' ', 1)
  next_ref = f"{book} {place.split(':')[0]}:{int(place.split(':')[1]) + 1}"
  assert example['context'] == verses[example['id']]
  assert example['choices'][example['gold']] == '\n' + verses[next_ref]
  assert load('bible_en_ja').kind == 'generation'


# --- bad input: one line saying what to change -----------------------------------------
def test_bad_tasks_and_settings_fail_in_one_line(tmp_path, tokenizer, monkeypatch):
  with pytest.raises(TaskError, match='Unknown task'):
    load_all(['no_such_task'])
  bad = tmp_path / 'bad.jsonl'
  for lines, message in [
      ('{"context": "a", "choices": [" b", " c"], "gold": 0}\n{"context": oops}\n',
       r'bad.jsonl:2: not valid JSON'),
      ('{"context": "a", "choices": [" b", " c"], "gold": 2}\n',
       r'bad.jsonl:1: "gold" must be the index'),
      ('{"context": "a", "choices": [" b", " c"], "gold": 0}\n{"text": "x"}\n',
       'one file holds one kind'),
      ('{"context": "a", "choices": [" b", " \\n"], "gold": 0}\n', 'strings that are not blank'),
      ('{"context": "a", "choices": [" b", " c", " b"], "gold": 0}\n', "lists ' b' twice"),
      ('{"context": "a", "choices": [" b", " c"], "gold": 0, "target": " b"}\n',
       'both "choices" and "target" is ambiguous'),
      # An extra "text" is metadata: the kinds are clear.
      ('{"context": "a", "choices": [" b", " c"], "gold": 0, "text": "a note"}\n'
       '{"context": "a", "target": " b", "text": "a note"}\n',
       r'bad.jsonl:2: a generation example in a multiple_choice')]:
    bad.write_text(lines)
    with pytest.raises(TaskError, match=message):
      load(str(bad))

  class Dropping:  # a normalizer that drops zero-width spaces
    encode = lambda self, text: tokenizer.encode(text.replace('\u200b', ''))

  unseen = from_examples('unseen', [{'context': 'a', 'choices': [' b', '\u200b'], 'gold': 0}])
  with pytest.raises(TaskError, match=r"example 0: the choice '\\u200b' is no tokens"):
    harness.multiple_choice(tasks.for_model(_cfg('decoder')), None, Dropping(), unseen,
                            harness.Settings())
  with pytest.raises(TaskError, match='--fewshot_seed=-1 must be 0 or more'):
    harness.Settings(seed=-1).check()
  with monkeypatch.context() as patch:
    patch.setattr(jax, 'process_count', lambda: 2)
    with pytest.raises(TaskError, match='scores on one process, not 2'):
      harness.run(None, str(tmp_path), ['bible_genre'], harness.Settings())
  fewshot.check_shots(_toy_task(), 21)
  with pytest.raises(TaskError, match='--num_shots=22 but task .toy. has 21 train examples'):
    fewshot.check_shots(_toy_task(), 22)
  with pytest.raises(TaskError, match='--num_shots=12 but task .toy. has 11 other examples'):
    fewshot.check_shots(_toy_task(train=False), 12)
  classifier = tasks.for_model(_cfg('encoder', num_labels=3), 'classification')
  with pytest.raises(ValueError, match="'classification' run cannot score text"):
    harness.evaluate(classifier, None, tokenizer, [_toy_task()], harness.Settings())
  encoder = tasks.for_model(_cfg('encoder'))
  texts = from_examples('texts', [{'text': 'the cat'}])
  with pytest.raises(ValueError, match='Rolling log-likelihood .* needs a decoder'):
    harness.evaluate(encoder, None, tokenizer, [texts], harness.Settings())


# --- the command line and the experiment (slow tier) ----------------------------------
@pytest.mark.slow
def test_mode_eval_with_tasks_prints_one_json_line_and_without_them_the_validation_loss(
    workdir, tmp_path):
  _, path = workdir
  task_file = tmp_path / 'pairs.jsonl'
  task_file.write_text('\n'.join(json.dumps({'context': f'Pair {i}:', 'target': ' a dog.'})
                                 for i in range(3)))
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  command = [sys.executable, 'main.py', '--mode=eval', f'--workdir={path}', '--json']
  out = subprocess.run(command + [f'--tasks={task_file}', '--num_shots=1'], cwd=root,
                       capture_output=True, text=True, check=True).stdout
  assert len(out.splitlines()) == 1
  pairs = json.loads(out)['tasks']['pairs']
  assert pairs['examples'] == 3 and pairs['shots'] == 1 and 'chrf_stderr' in pairs
  out = subprocess.run(command, cwd=root, capture_output=True, text=True, check=True).stdout
  assert 'eval_bits_per_byte' in json.loads(out)


@pytest.mark.slow
def test_the_alignment_tax_experiment_runs_end_to_end_at_smoke_scale(tmp_path):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  subprocess.run([sys.executable, 'experiments/alignment_tax.py', f'--workdir={tmp_path}',
                  '--smoke'], cwd=root, capture_output=True, text=True, check=True)
  results = json.load(open(tmp_path / 'alignment_tax.json'))
  for stage in ('before', 'after'):
    assert set(results[stage]) == {'0', '1'}
    assert set(results[stage]['1']) == {'bible_cloze', 'bible_book', 'bible_genre'}
  table = (tmp_path / 'alignment_tax.md').read_text()
  assert table.count('| bible_') == 3 * 2 * 2  # tasks x metrics x shots
  assert (tmp_path / 'alignment_tax.png').stat().st_size > 10_000
  assert set(results['baselines']['bible_genre']) >= {'chance', 'majority'}
  assert results['differences']['bible_book']['acc']['1']['call'] in (
      'within noise', 'beyond 2 standard errors')
  # --report_only redraws all three from the per-example files, evaluating nothing.
  for name in ('alignment_tax.md', 'alignment_tax.json', 'alignment_tax.png'):
    (tmp_path / name).unlink()
  subprocess.run([sys.executable, 'experiments/alignment_tax.py', f'--workdir={tmp_path}',
                  '--report_only'], cwd=root, capture_output=True, text=True, check=True)
  assert (tmp_path / 'alignment_tax.md').read_text() == table
  assert json.load(open(tmp_path / 'alignment_tax.json')) == results
  assert (tmp_path / 'alignment_tax.png').stat().st_size > 10_000
