"""The evaluation harness (evals/): batched log-likelihoods equal hand sums of
log-softmax over plain forward passes (decoder, encoder-decoder) and a loop of masked
passes (encoder pseudo-log-likelihood); acc_norm divides by bytes; few-shot prompts are
deterministic and never show the scored example; a memorised toy task scores 100%;
rolling bits per byte of the validation split equals --mode=eval's; bad input fails in
one line."""
import functools
import json
import math
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
  return ModelConfig(arch=arch, vocab_size=512, num_layers=1, num_heads=2, num_kv_heads=2,
                     head_dim=16, d_model=32, d_ff=64, max_len=64, **changes)


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


@pytest.mark.parametrize('name', ['span_corruption', 'sft'])
def test_encoder_decoder_loglikelihoods_equal_a_hand_sum_of_log_softmax(tokenizer, name):
  """Span corruption: the continuation is the span of a sentinel closing the context; a
  fine-tuned (sft) encoder-decoder reads the context and writes the continuation."""
  task, params = decoding_params(_cfg('encoder_decoder', position='relative'))
  task = tasks.for_model(task.cfg, name)
  got = _batched(task, params, tokenizer)
  sentinel, eos, pad = tokenizer.sentinel_ids[0], tokenizer.eos_id, tokenizer.pad_id
  for (context, continuation), value in zip(PAIRS, got):
    source, lead = ((context + [sentinel, eos], [sentinel]) if name == 'span_corruption'
                    else (context + [eos], []))
    decoder_inputs = [pad] + lead + continuation[:-1]
    log_p = _log_softmax(task, params, {
        'encoder_inputs': source, 'encoder_segment_ids': [1] * len(source),
        'encoder_positions': list(range(len(source))), 'decoder_inputs': decoder_inputs,
        'decoder_segment_ids': [1] * CONTEXT, 'decoder_positions': list(range(CONTEXT))})
    want = sum(log_p[len(lead) + k, token] for k, token in enumerate(continuation))
    np.testing.assert_allclose(value, want, rtol=1e-5, atol=1e-5)


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
  records = [json.loads(line) for line in open(tmp_path / 'toy_choice.jsonl')]
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
  """With overlap 1, rolling windows over the validation token stream are the eval pass's
  own rows (CausalExamples: windows of seq_len + 1 tokens sharing one, packed at eos);
  cut to whole windows (the eval pass drops the tail), the two sum the same log-
  probabilities over the same bytes."""
  config, path = workdir
  expected = loop.evaluate(config, path)['eval_bits_per_byte']
  from inference.load import load_run
  lm, params, tokenizer = load_run(run_config.saved_config(path, []), path)
  stream = input_pipeline.load_corpus(config, path).splits['eval']
  length = config.data.seq_len
  windows = (len(stream) - 1) // length
  rows = rolling_windows(np.asarray(stream[:1 + windows * length]), length, 1,
                         eos_id=tokenizer.eos_id)
  rows = [{k: v[w] for k, v in rows.items()} for w in range(windows)]
  scores = scoring.loglikelihoods(lm, params, rows, 8, length)
  scored_bytes = sum(np.sum(tokenizer.bytes_per_token[r['targets']] * r['weights'])
                     for r in rows)
  assert sum(np.sum(r['weights']) for r in rows) == windows * length
  np.testing.assert_allclose(-scores.sum() / scored_bytes / math.log(2), expected, rtol=2e-6)


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
  records = [json.loads(line) for line in open(os.path.join(path, 'eval', 'colors.jsonl'))]
  assert [r['id'] for r in records] == ['c0', 'c1', 'c2', 'c3']
  assert all(r['prompt'].startswith('Example: a' + fewshot.DELIMITER) for r in records)


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
def test_bad_tasks_and_settings_fail_in_one_line(tmp_path, tokenizer):
  with pytest.raises(TaskError, match='Unknown task'):
    load_all(['no_such_task'])
  bad = tmp_path / 'bad.jsonl'
  bad.write_text('{"context": "a", "choices": [" b", " c"], "gold": 0}\n{"context": oops}\n')
  with pytest.raises(TaskError, match=r'bad.jsonl:2: not valid JSON'):
    load(str(bad))
  bad.write_text('{"context": "a", "choices": [" b", " c"], "gold": 2}\n')
  with pytest.raises(TaskError, match=r'bad.jsonl:1: "gold" must be the index'):
    load(str(bad))
  bad.write_text('{"context": "a", "choices": [" b", " c"], "gold": 0}\n{"text": "x"}\n')
  with pytest.raises(TaskError, match='one file holds one kind'):
    load(str(bad))
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
