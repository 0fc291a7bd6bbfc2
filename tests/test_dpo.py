"""DPO (tasks/dpo.py): the loss is ln 2 where the policy is the reference (with the model's
dropout on, by default), the loss and its gradient match a NumPy reference (the optional sft
term too), only the final answers' tokens are scored (read in the context of their prompt,
earlier assistant turns included), both sides of a long pair read the same cut prompt, a
pair is sft's two rows side by side, its FLOPs are two sides and a reference forward, and a
few steps make the chosen answers win."""
import dataclasses
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
from tasks.dpo import REFERENCE, preference_objective, preference_sums
from train import flops
from train.config_checks import ConfigError, validate

SEQ_LEN = 48
RECORDS = [
    {'prompt': 'Who sees the bread?', 'chosen': 'The cat sees the bread.',
     'rejected': 'A dog finds the gate.'},
    {'prompt': [{'role': 'system', 'content': 'Be brief.'},
                {'role': 'user', 'content': 'And the gate?'}],
     'chosen': 'water', 'rejected': 'my sister greets the river'},
    {'prompt': [{'role': 'user', 'content': 'Bread?'},  # after an earlier answer
                {'role': 'assistant', 'content': 'Yes.'},
                {'role': 'user', 'content': 'And?'}],
     'chosen': 'water', 'rejected': 'No.'},
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
  assert float(sums['weight']) == len(RECORDS)  # the padding row is no pair
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


def test_the_sft_term_equals_a_numpy_reference():
  """dpo.sft_weight adds that times each pair's chosen answer's negative log-likelihood per
  token (RPO, Pang et al. 2024) to the loss it differentiates."""
  rng = np.random.default_rng(1)
  policy = rng.normal(-20, 8, (5, 2)).astype(np.float32)
  reference = rng.normal(-20, 8, (5, 2)).astype(np.float32)
  tokens = np.array([[4, 6], [9, 2], [1, 3], [7, 7], [0, 0]], np.float32)
  pairs = np.array([1, 1, 1, 1, 0], np.float32)
  beta, weight = 0.2, 0.7
  margin = beta * ((policy[:, 0] - reference[:, 0]) - (policy[:, 1] - reference[:, 1]))
  nll = -policy[:, 0].astype(np.float64) / np.maximum(tokens[:, 0], 1)
  expected = np.sum((np.logaddexp(0.0, -margin.astype(np.float64)) + weight * nll) * pairs)
  sigmoid = 1 / (1 + np.exp(margin.astype(np.float64)))
  expected_grad = np.stack([-beta * sigmoid - weight / np.maximum(tokens[:, 0], 1),
                            beta * sigmoid], axis=1) * pairs[:, None]

  @jax.jit
  def results(p):
    objective = lambda p, w: preference_objective(p, reference, tokens, pairs, beta, w)
    (value, sums), grad = jax.value_and_grad(objective, has_aux=True)(p, weight)
    return value, grad, sums['loss'], objective(p, 0.0)[0], preference_sums(
        p, reference, pairs, beta)[0]
  value, grad, logged, unweighted, dpo_loss = results(jnp.asarray(policy))
  assert float(value) == pytest.approx(expected, rel=1e-5)
  np.testing.assert_allclose(np.asarray(grad), expected_grad, rtol=1e-5, atol=1e-7)
  # The logged loss stays DPO's alone; weight 0 adds nothing.
  assert float(logged) == float(unweighted) == float(dpo_loss)


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
  rows = len(RECORDS) + 1  # and the padding row
  assert {k: v.shape for k, v in runs['decoder']['task'].train_batch(rows, SEQ_LEN).items()} == {
      **shapes, REFERENCE: (rows, 2)}


def test_a_multi_turn_prompt_scores_the_final_answer_only(runs, tokenizer):
  """Token counts and rewards of the pair with an earlier assistant turn, by hand: the
  log-probabilities of the final answer's tokens (and its <|end|>) after the whole prompt."""
  run, i = runs['decoder'], 2
  task, record = run['task'], RECORDS[i]
  template = ChatTemplate(tokenizer)
  prompt = template.prompt(record['prompt'])
  answers = [template.answer_ids(record[name]) for name in ('chosen', 'rejected')]
  rows = np.zeros((2, SEQ_LEN), np.int32)
  for side, answer in enumerate(answers):
    ids = prompt + answer
    rows[side, :len(ids) - 1] = ids[:-1]
  real = (rows > 0).astype(np.int32)
  batch = {'inputs': rows, 'segment_ids': real, 'positions': np.arange(SEQ_LEN) * real}
  logits = jax.jit(task.logits)
  policy = jax.tree.map(lambda x: x * 1.1, run['params'])

  def by_hand(params):
    log_probs = jax.nn.log_softmax(np.asarray(logits(params, batch), np.float64))
    return [sum(float(log_probs[side, len(prompt) - 1 + k, token])
                for k, token in enumerate(answer)) for side, answer in enumerate(answers)]
  rewards = 0.5 * (np.array(by_hand(policy)) - np.array(by_hand(run['params'])))  # beta 0.5
  policy_logps, tokens = run['logps'](policy, run['batch'])
  reference_logps, _ = run['logps'](run['params'], run['batch'])
  assert list(np.asarray(tokens)[i]) == [len(a) for a in answers]
  np.testing.assert_allclose(0.5 * np.asarray(policy_logps - reference_logps)[i], rewards,
                             rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('arch', ARCHS)
def test_both_sides_of_a_long_pair_read_the_same_prompt_and_keep_their_answers_start(
    runs, tokenizer, caplog, arch):
  seq_len = 16
  examples = runs[arch]['task'].examples(tokenizer, seq_len)
  template = ChatTemplate(tokenizer)
  long_prompt = {'prompt': 'the old king greets a small bird and the river ' * 4,
                 'chosen': 'water', 'rejected': 'No.'}
  long_answer = {'prompt': 'Hi?', 'chosen': 'a small bird carries the morning light ' * 6,
                 'rejected': 'No.'}
  records = [long_prompt, long_answer, {'prompt': 'Hi?', 'chosen': 'Yes.', 'rejected': 'No.'}]
  with caplog.at_level(logging.INFO):
    rows = examples.rows(records)
  logged = ' '.join(r.getMessage() for r in caplog.records)
  # The decoder's prompt keeps at least a quarter of the room, so 'Hi?' loses its start too.
  prompts_cut = 2 if arch == 'decoder' else 1
  assert (f'dpo: 2 of 3 pairs do not fit data.seq_len=16: {prompts_cut} lost the start of '
          'its prompt' in logged and '1 the end of an answer' in logged), logged
  for record, row in zip(records, rows):
    example = examples.make_example(row, None)
    prompt = template.prompt([{'role': 'user', 'content': record['prompt']}])
    read = []
    for side, name in enumerate(('chosen', 'rejected')):
      scored = list(example['targets'][side][example['weights'][side] > 0])
      answer = template.answer_ids(record[name])
      assert scored == answer[:len(scored)] and scored, (name, scored)  # its start, at least
      assert len(scored) == len(answer) or record is long_answer, name
      if arch == 'decoder':  # the inputs up to the first answer token's prediction
        read.append(list(example['inputs'][side][:np.argmax(example['weights'][side]) + 1]))
      else:
        read.append(list(example['encoder_inputs'][side][example['encoder_segment_ids'][side] > 0]))
    assert read[0] == read[1] == prompt[len(prompt) - len(read[0]):], record
    if record is long_prompt:
      assert len(read[0]) < len(prompt)
    elif record is long_answer and arch == 'decoder':
      assert len(read[0]) == (seq_len + 1) // 4 < len(prompt)
    else:
      assert len(read[0]) == len(prompt)


# --- dropout and FLOPs ---------------------------------------------------------------
def test_with_dropout_the_first_loss_is_ln2_unless_dropout_is_kept(runs):
  """The model's and the adapters' dropout (0.1 each) is off in the policy's log-probs by
  default (dpo.disable_dropout), as in the reference's: at step 0 the two are equal."""
  cfg = dataclasses.replace(runs['decoder']['task'].cfg, dropout=0.1, lora_rank=4,
                            lora_dropout=0.1, lora_targets=('q', 'v'))
  default_task, keeping = (tasks.for_model(cfg, 'dpo', beta=0.5, **kept)
                           for kept in ({}, {'disable_dropout': False}))
  params = nn.unbox(default_task.init(jax.random.key(0), default_task.example_batch(1, SEQ_LEN)))
  params = jax.tree_util.tree_map_with_path(  # adapters that change the output
      lambda path, x: x + 0.1 if path[-1].key == 'lora_b' else x, params)

  @jax.jit
  def first_losses(batch, key):  # as the train step computes them
    batch = default_task.with_reference(params, batch)
    return [normalize_metrics(task.loss(params, batch, key, True)[1])
            for task in (default_task, keeping)]
  off, on = first_losses(runs['decoder']['batch'], jax.random.key(3))
  assert float(off['margin']) == 0.0
  assert float(off['loss']) == pytest.approx(math.log(2), rel=1e-6)
  assert float(on['loss']) != pytest.approx(math.log(2), rel=1e-3)


@pytest.mark.parametrize('arch', ARCHS)
def test_flops_are_two_sides_and_a_reference_forward(runs, arch):
  """Against sft's step on the same sequences; LoRA's frozen kernels (no weight gradient)
  discount the policy's part only: the reference's forward pass has no backward."""
  run = runs[arch]
  dpo, params = run['task'], run['params']
  sft = tasks.for_model(dpo.cfg, 'sft')
  sides = sft.train_flops_per_step(params, 2 * 3, SEQ_LEN)  # 3 pairs: 6 sequences
  assert dpo.train_flops_per_step(params, 3, SEQ_LEN) == pytest.approx(sides * 4 / 3, rel=1e-9)
  frozen = {'decoder': params['decoder']}  # every one of its kernels sees SEQ_LEN tokens
  saved = 2 * 6 * SEQ_LEN * flops.matmul_param_count(frozen, dpo.cfg.tie_embeddings)
  assert saved > 0
  assert sft.train_flops_with_frozen(params, 6, SEQ_LEN, frozen) == pytest.approx(
      sides - saved, rel=1e-9)
  assert dpo.train_flops_with_frozen(params, 3, SEQ_LEN, frozen) == pytest.approx(
      sides - saved + sides / 3, rel=1e-9)


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
  config.dpo.beta, config.dpo.sft_weight = 0.1, -1.0
  with pytest.raises(ConfigError, match=r'dpo.sft_weight=-1.0 must be 0 \(off\) or positive'):
    validate(config)
  config.dpo.sft_weight, config.model.arch = 0.0, 'encoder'
  with pytest.raises(ConfigError, match="task='dpo' needs model.arch='decoder' or "
                                        "'encoder_decoder', not 'encoder'"):
    validate(config)
