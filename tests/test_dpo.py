"""DPO (tasks/dpo.py): the loss is ln 2 where the policy is the reference, the loss and its
gradient match a NumPy reference, only the answers' tokens are scored (read in the context
of their prompt), a pair is sft's two rows side by side, and a few steps make the chosen
answers win."""
import logging
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tasks
from conftest import write_tiny_corpus
from configs import default
from input_pipeline.chat import ChatTemplate
from input_pipeline.tokenizer import SentencePieceTokenizer, train_tokenizer
from models import ModelConfig, normalize_metrics
from tasks.dpo import REFERENCE, preference_sums
from train.config_checks import ConfigError, validate

SEQ_LEN = 48
RECORDS = [
    {'prompt': 'Who sees the bread?', 'chosen': 'The cat sees the bread.',
     'rejected': 'A dog finds the gate.'},
    {'prompt': [{'role': 'system', 'content': 'Be brief.'},
                {'role': 'user', 'content': 'And the gate?'}],
     'chosen': 'water', 'rejected': 'my sister greets the river'},
]
ARCHS = ('decoder', 'encoder_decoder')


@pytest.fixture(scope='module')
def tokenizer(tmp_path_factory):
  root = tmp_path_factory.mktemp('dpo_tokenizer')
  corpus = write_tiny_corpus(root / 'corpus.jsonl')
  return SentencePieceTokenizer(train_tokenizer(list(open(corpus)), str(root / 'sp'), 400))


def _stack(examples, rows) -> dict:
  made = [examples.make_example(row, None) for row in rows]
  return {k: jnp.asarray(np.stack([m[k] for m in made])) for k in made[0]}


@pytest.fixture(scope='module')
def runs(tokenizer):
  """Per family: the task, its examples, a batch of RECORDS plus a padding row (as eval
  pads its last batch), initial parameters and the jitted pieces the tests share."""
  made = {}
  for arch in ARCHS:
    cfg = ModelConfig(arch=arch, vocab_size=512, num_layers=1, num_heads=2, num_kv_heads=2,
                      head_dim=16, d_model=32, d_ff=64, max_len=64)
    task = tasks.for_model(cfg, 'dpo', beta=0.5)
    examples = task.examples(tokenizer, SEQ_LEN)
    batch = _stack(examples, examples.rows(RECORDS))
    batch = {k: jnp.concatenate([v, jnp.zeros_like(v[:1])]) for k, v in batch.items()}
    params = nn.unbox(task.init(jax.random.key(0), task.example_batch(1, SEQ_LEN)))
    made[arch] = dict(
        task=task, examples=examples, batch=batch, params=params,
        logps=jax.jit(lambda p, b, task=task: task.answer_logps(p, b)),
        sums=jax.jit(lambda p, ref, b, task=task: task.loss(p, task.with_reference(ref, b),
                                                            None, False)[1]))
  return made


# --- the loss --------------------------------------------------------------------
@pytest.mark.parametrize('arch', ARCHS)
def test_with_the_policy_equal_to_the_reference_the_loss_is_ln2_per_pair(runs, arch):
  run = runs[arch]
  sums = run['sums'](run['params'], run['params'], run['batch'])
  assert float(sums['weight']) == 2.0  # the padding row is no pair
  means = normalize_metrics(sums)
  assert float(means['loss']) == pytest.approx(math.log(2), rel=1e-6)
  assert float(means['margin']) == float(means['reward_accuracy']) == 0.0
  # Another reference (a perturbed model) moves it off ln 2.
  other = jax.tree.map(lambda x: x * 1.1, run['params'])
  assert float(normalize_metrics(run['sums'](run['params'], other, run['batch']))['loss']) != (
      pytest.approx(math.log(2), rel=1e-3))


def test_loss_and_gradient_equal_a_numpy_reference():
  rng = np.random.default_rng(0)
  policy = rng.normal(-20, 8, (6, 2)).astype(np.float32)
  reference = rng.normal(-20, 8, (6, 2)).astype(np.float32)
  pairs = np.array([1, 1, 1, 1, 1, 0], np.float32)
  beta = 0.3
  margin = beta * ((policy[:, 0] - reference[:, 0]) - (policy[:, 1] - reference[:, 1]))
  expected_loss = np.sum(np.logaddexp(0.0, -margin.astype(np.float64)) * pairs)
  weight = 1 / (1 + np.exp(margin.astype(np.float64)))  # sigmoid(-margin)
  expected_grad = np.stack([-beta * weight, beta * weight], axis=1) * pairs[:, None]
  loss, grad = jax.value_and_grad(lambda p: preference_sums(p, reference, pairs, beta)[0])(
      jnp.asarray(policy))
  assert float(loss) == pytest.approx(expected_loss, rel=1e-5)
  np.testing.assert_allclose(np.asarray(grad), expected_grad, rtol=1e-5, atol=1e-7)
  # Far from the reference it stays finite: -log sigmoid(-60) = 60.
  far, _ = preference_sums(jnp.array([[-100.0, 20.0]]), jnp.zeros((1, 2)), jnp.ones(1), 0.5)
  assert float(far) == pytest.approx(60.0)


def test_metrics_on_a_hand_built_case(runs):
  beta = 0.5
  reference = np.zeros((4, 2), np.float32)
  # Rewards: (+1, -1) right; (-0.5, +0.5) wrong; (1.5, 1.5) a tie, not right; a padding row.
  policy = np.array([[2, -2], [-1, 1], [3, 3], [50, -50]], np.float32)
  pairs = np.array([1, 1, 1, 0], np.float32)
  _, sums = preference_sums(policy, reference, pairs, beta)
  expected = {'loss': math.log1p(math.exp(-2)) + math.log1p(math.exp(1)) + math.log(2),
              'reward_accuracy': 1.0, 'chosen_reward': 2.0, 'rejected_reward': 1.0,
              'margin': 1.0, 'chosen_likelier': 1.0, 'weight': 3.0}
  assert {k: float(v) for k, v in sums.items()} == pytest.approx(expected)
  totals = {**{k: float(v) for k, v in sums.items()}, 'bytes': 99.0,
            'chosen_token_logp': -12.0, 'chosen_token_count': 6.0,
            'rejected_token_logp': -30.0, 'rejected_token_count': 10.0}
  assert runs['decoder']['task'].eval_results(totals) == pytest.approx({
      'eval_loss': expected['loss'] / 3, 'eval_reward_accuracy': 1 / 3,
      'eval_chosen_reward': 2 / 3, 'eval_rejected_reward': 1 / 3, 'eval_margin': 1 / 3,
      'eval_chosen_likelier': 1 / 3,
      'eval_chosen_token_logp': -2.0, 'eval_rejected_token_logp': -3.0, 'eval_pairs': 3.0})


# --- what is scored ----------------------------------------------------------------
@pytest.mark.parametrize('arch', ARCHS)
def test_only_answer_tokens_are_scored_in_the_context_of_the_prompt(runs, tokenizer, arch):
  run = runs[arch]
  task, batch, params, logps = run['task'], run['batch'], run['params'], run['logps']
  template = ChatTemplate(tokenizer)
  weights = np.asarray(batch['weights'])
  for i, record in enumerate(RECORDS):  # weight 1 exactly on each answer and its <|end|>
    for side, name in enumerate(('chosen', 'rejected')):
      scored = np.asarray(batch['targets'])[i, side][weights[i, side] > 0]
      assert list(scored) == template.answer_ids(record[name]), (i, name)
  # The sums are the answer positions' log-probabilities of the model's own logits.
  flat = {k: v.reshape((-1,) + v.shape[2:]) for k, v in batch.items()}
  logits = np.asarray(task.logits(params, flat), np.float64)
  log_probs = logits - np.log(np.sum(np.exp(logits), -1, keepdims=True))
  target_logp = np.take_along_axis(log_probs, np.asarray(flat['targets'])[..., None], -1)[..., 0]
  expected = np.sum(target_logp * np.asarray(flat['weights']), -1).reshape(-1, 2)
  base, tokens = logps(params, batch)
  np.testing.assert_allclose(np.asarray(base), expected, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(tokens), weights.sum(-1))

  def bumped(key, side, position):
    value = (batch[key][0, side, position] + 7) % 400
    return np.asarray(logps(params, batch | {key: batch[key].at[0, side, position].set(value)})[0])
  answer = int(np.flatnonzero(weights[0, 1])[0])
  changed = bumped('targets', 1, answer)
  assert changed[0, 1] != base[0, 1]
  np.testing.assert_array_equal(np.delete(changed.ravel(), 1), np.delete(np.asarray(base).ravel(), 1))
  # A prompt token is read (the answer's probabilities depend on it) but never scored.
  prompt_input = 'inputs' if arch == 'decoder' else 'encoder_inputs'
  assert bumped(prompt_input, 0, 3)[0, 0] != base[0, 0]
  if arch == 'decoder':
    prompt = int(np.flatnonzero(weights[0, 0] == 0)[2])
    np.testing.assert_array_equal(bumped('targets', 0, prompt), np.asarray(base))


def test_a_pair_is_sfts_two_rows_side_by_side(runs, tokenizer):
  sft = tasks.for_model(runs['decoder']['task'].cfg, 'sft').examples(tokenizer, SEQ_LEN)
  record = RECORDS[1]
  example = runs['decoder']['examples'].make_example(
      runs['decoder']['examples'].rows([record])[0], None)
  for side, name in enumerate(('chosen', 'rejected')):
    row, cut = sft.single_row({'messages': record['prompt'] + [
        {'role': 'assistant', 'content': record[name]}]})
    assert not cut
    for key, value in sft.make_example(row, None).items():
      np.testing.assert_array_equal(example[key][side], value, err_msg=key)
  shapes = {k: v.shape for k, v in runs['decoder']['batch'].items()}
  assert {k: v.shape for k, v in runs['decoder']['task'].train_batch(3, SEQ_LEN).items()} == {
      **shapes, REFERENCE: (3, 2)}


@pytest.mark.parametrize('arch', ARCHS)
def test_a_long_prompt_loses_its_start_and_is_counted(runs, tokenizer, caplog, arch):
  examples = runs[arch]['task'].examples(tokenizer, 16)
  long = {'prompt': 'the old king greets a small bird and the river ' * 4, 'chosen': 'water',
          'rejected': 'a stone'}
  with caplog.at_level(logging.INFO):
    rows = examples.rows([long, {'prompt': 'Hi?', 'chosen': 'Yes.', 'rejected': 'No.'}])
  assert any('1 of 2 records are longer than data.seq_len=16 and lost tokens at the start of '
             'the prompt' in r.getMessage() for r in caplog.records)
  example = examples.make_example(rows[0], None)
  template = ChatTemplate(tokenizer)
  for side, name in enumerate(('chosen', 'rejected')):  # the answers survive whole
    scored = example['targets'][side][example['weights'][side] > 0]
    assert list(scored) == template.answer_ids(long[name])


# --- training -----------------------------------------------------------------------
def test_a_few_steps_make_the_chosen_answers_win(runs):
  run = runs['decoder']
  task, reference = run['task'], run['params']
  batch = task.with_reference(reference, run['batch'])
  tx = optax.adam(1e-2)

  @jax.jit
  def step(params, opt_state):
    grads, sums = jax.grad(lambda p: task.loss(p, batch, None, False), has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, normalize_metrics(sums)

  params, opt_state = reference, tx.init(reference)
  first = None
  for _ in range(15):
    params, opt_state, means = step(params, opt_state)
    first = first or means
  _, _, last = step(params, opt_state)
  assert float(first['loss']) == pytest.approx(math.log(2), rel=1e-6)
  assert float(last['loss']) < 0.5 * math.log(2)
  assert float(last['reward_accuracy']) == 1.0 and float(last['margin']) > 0
  assert float(last['chosen_reward']) > 0 > float(last['rejected_reward'])


# --- the config ---------------------------------------------------------------------
def test_config_problems_are_one_line():
  config = default.get_config()
  config.task = 'dpo'
  with pytest.raises(ConfigError, match=r"task='dpo' measures the model against a frozen "
                                        r'reference.*set --config.init_from'):
    validate(config)
  config.init_from = 'runs/sft_tiny'
  validate(config)
  config.dpo.beta = 0.0
  with pytest.raises(ConfigError, match=r'dpo.beta=0.0 must be positive'):
    validate(config)
  config.dpo.beta, config.model.arch = 0.1, 'encoder'
  with pytest.raises(ConfigError, match="task='dpo' needs model.arch='decoder' or "
                                        "'encoder_decoder', not 'encoder'"):
    validate(config)
