"""BERT's masked LM and next-sentence prediction (issue 12): padding rows, gradient
accumulation, the cost of drawing a pair, whole-word masking's count, fill-mask prompts."""
import functools
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from input_pipeline import masking
from input_pipeline.pipeline import eval_batches
from input_pipeline.tokenizer import (CLS_ID, EOS_ID, MASK_ID, NUM_SPECIAL, PAD_ID, SEP_ID,
                                      TRAINED_SPECIAL_IDS as IDS, Tokenizer)
from models import ModelConfig
import tasks
from tasks.masked_lm import MaskedExamples
from train import steps
from train.state import TrainState

VOCAB = 256  # > NUM_SPECIAL (106): ordinary ids are 106..255
SEQ = 16


def _task_and_params(next_sentence: bool = True):
  """A one-layer BERT (with the next-sentence head when `next_sentence`) and its params,
  made once per value (however the argument is spelt)."""
  return _made_task_and_params(next_sentence)


@functools.lru_cache
def _made_task_and_params(next_sentence: bool):
  cfg = ModelConfig(arch='encoder', vocab_size=VOCAB, num_layers=1, num_heads=2,
                    num_kv_heads=2, head_dim=8, d_model=16, d_ff=32, max_len=32,
                    position='learned', num_token_types=2, nsp_head=next_sentence)
  task = tasks.for_model(cfg)
  return task, nn.unbox(jax.jit(task.init)(jax.random.key(0), task.example_batch(1, SEQ)))


def _token_stream(num_docs: int, seed: int = 0, low: int = 5, high: int = 40) -> np.ndarray:
  """Documents of ordinary tokens, each ending in EOS."""
  rng = np.random.default_rng(seed)
  docs = [np.append(rng.integers(NUM_SPECIAL, VOCAB, int(rng.integers(low, high))), EOS_ID)
          for _ in range(num_docs)]
  return np.concatenate(docs).astype(np.int32)


# --- 2. NSP metrics weigh padding rows 0 ---------------------------------------------
def test_nsp_metrics_ignore_the_zero_rows_that_pad_the_last_eval_batch():
  task, params = _task_and_params()
  examples = MaskedExamples(SEQ, VOCAB, 0.15, None, next_sentence=True, special=IDS)
  tokens = _token_stream(8)
  assert len(examples.source(tokens)) % 4 != 0  # the last batch of 4 is padded
  last = [jax.tree.map(jnp.asarray, b) for b in eval_batches(examples, tokens, 4, 0, 1)][-1]
  real = int(len(examples.source(tokens)) % 4)
  sums = jax.jit(lambda p, b: task.loss(p, b, None, False)[1])
  padded, only_real = sums(params, last), sums(params, jax.tree.map(lambda x: x[:real], last))
  assert float(padded['nsp_count']) == real  # not the batch size, 4
  np.testing.assert_allclose(float(padded['nsp_loss']), float(only_real['nsp_loss']), rtol=1e-6)
  assert float(padded['nsp_correct']) == float(only_real['nsp_correct'])
  np.testing.assert_array_equal(np.asarray(last['nsp_weights']), [1.0] * real + [0.0] * (4 - real))


# --- 3. gradient accumulation equals one batch, NSP included -------------------------
def _nsp_batch(seed: int, batch_size: int = 8):
  rng = np.random.default_rng(seed)
  weights = np.zeros((batch_size, SEQ), np.float32)
  for row in range(batch_size):  # row r scores r + 1 tokens: micro-batches differ
    weights[row, rng.choice(SEQ, row + 1, replace=False)] = 1.0
  nsp_weights = np.ones(batch_size, np.float32)
  nsp_weights[6] = 0.0  # a padding row
  ids_BT, targets_BT = rng.integers(NUM_SPECIAL, VOCAB, (2, batch_size, SEQ)).astype(np.int32)
  rows = lambda row_T: np.repeat(row_T.astype(np.int32)[None], batch_size, 0)
  return {'inputs': ids_BT, 'targets': targets_BT, 'weights': weights,
          'segment_ids': rows(np.ones(SEQ)), 'positions': rows(np.arange(SEQ)),
          'token_type_ids': rows(np.arange(SEQ) >= SEQ // 2),  # segments A and B
          'nsp_labels': rng.integers(0, 2, batch_size).astype(np.int32), 'nsp_weights': nsp_weights}


def _gradients_and_metrics(task, params, batch, grad_accum: int):
  """One train step under plain SGD with learning rate 1: gradients = params - new params."""
  tx = optax.sgd(1.0)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  step = jax.jit(functools.partial(steps.train_step, task=task, tx=tx, schedule=lambda s: 1.0,
                                   grad_accum=grad_accum, dropout_key=jax.random.key(1)))
  new_state, metrics = step(state, batch)
  grads = jax.tree.map(lambda a, b: a - b, params, new_state.params)
  return jax.device_get(grads), {k: float(v) for k, v in jax.device_get(metrics).items()}


def test_nsp_gradient_accumulation_over_unequal_micro_batches_equals_one_large_batch():
  task, params = _task_and_params()
  batch = _nsp_batch(0)
  # micro-batch i of 4 takes rows i, i + 4: 6, 8, 10, 12 scored tokens, 2, 2, 1, 2 NSP rows
  grads_1, metrics_1 = _gradients_and_metrics(task, params, batch, 1)
  grads_4, metrics_4 = _gradients_and_metrics(task, params, batch, 4)
  for name in ('loss', 'correct', 'nsp_loss', 'nsp_correct', 'grad_norm', 'tokens'):
    np.testing.assert_allclose(metrics_4[name], metrics_1[name], rtol=1e-5, err_msg=name)
  for a, b in zip(jax.tree.leaves(grads_1), jax.tree.leaves(grads_4)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-7)


# --- 4. drawing a sentence pair costs the same whatever the number of documents -------
def _calls_to_make_one_example(num_docs: int, seed: int) -> int:
  """Python and C function calls made while drawing one example (a count, not a time)."""
  examples = MaskedExamples(32, VOCAB, 0.15, None, next_sentence=True, special=IDS)
  item = examples.source(_token_stream(num_docs))[0]
  rng = np.random.default_rng(seed)
  calls = 0

  def count(frame, event, arg):
    nonlocal calls
    calls += event in ('call', 'c_call')

  sys.setprofile(count)
  try:
    examples.make_example(item, rng)
  finally:
    sys.setprofile(None)
  return calls


def test_a_sentence_pair_costs_the_same_for_20_or_4000_documents():
  for seed in range(3):
    few, many = _calls_to_make_one_example(20, seed), _calls_to_make_one_example(4000, seed)
    assert many <= few + 20, (few, many)  # the old per-example scan made >= 4000 more


def test_sentence_pair_reads_at_most_two_documents_of_the_index():
  reads = []

  class Counting(masking.Documents):
    def __getitem__(self, i):
      reads.append(i)
      return super().__getitem__(i)

  tokens = _token_stream(3000)
  ends = np.flatnonzero(tokens == EOS_ID)
  documents = Counting(tokens, np.concatenate([[0], ends[:-1] + 1]), ends)
  rng = np.random.default_rng(0)
  for _ in range(50):
    reads.clear()
    masking.sentence_pair(documents, rng, 32, special=IDS)
    assert 1 <= len(reads) <= 2


def _old_sentence_pair(documents, rng, seq_len):
  """The pair drawn before the index existed (HEAD 21aaee0), as the reference distribution."""
  budget = seq_len - 3
  long_enough = [d for d in documents if len(d) >= 2]
  doc = long_enough[rng.integers(len(long_enough))]
  a_len = int(rng.integers(1, min(budget, len(doc)))) if min(budget, len(doc)) > 1 else 1
  a_len = min(a_len, budget - 1)
  a_start = int(rng.integers(0, len(doc) - a_len))
  a_T = doc[a_start:a_start + a_len]
  is_next = bool(rng.random() < 0.5) or len(long_enough) == 1
  if is_next:
    b_T = doc[a_start + a_len:a_start + budget]
  else:
    others = [i for i in range(len(long_enough)) if long_enough[i] is not doc]
    other = long_enough[others[rng.integers(len(others))]]
    b_start = int(rng.integers(0, len(other) - 1))
    b_T = other[b_start:b_start + budget - a_len]
  return np.concatenate([[CLS_ID], a_T, [SEP_ID], b_T, [SEP_ID]]), is_next


def test_the_index_draws_exactly_the_pairs_the_document_list_drew():
  tokens = _token_stream(60, low=0, high=30)  # includes documents of 0 and 1 tokens
  ends = np.flatnonzero(tokens == EOS_ID)
  starts = np.concatenate([[0], ends[:-1] + 1])
  as_list = [tokens[a:b] for a, b in zip(starts, ends) if b > a]
  index = masking.Documents(tokens, starts, ends)
  new_rng, old_rng = np.random.default_rng(5), np.random.default_rng(5)
  for _ in range(300):
    example = masking.sentence_pair(index, new_rng, 32, special=IDS)
    ids, is_next = _old_sentence_pair(as_list, old_rng, 32)
    length = int(example['segment_ids'].sum())
    np.testing.assert_array_equal(example['inputs'][:length], ids)
    assert (example['inputs'][length:] == PAD_ID).all() and bool(example['nsp_labels']) == is_next


# --- 10. whole-word masking: exactly the target, never more ---------------------------
def _row(word_lengths):
  starts = np.concatenate([[True] + [False] * (n - 1) for n in word_lengths]).astype(bool)
  ids = np.arange(len(starts)) % (VOCAB - NUM_SPECIAL) + NUM_SPECIAL
  return ids, starts


def _check_whole_words(chosen, word):
  for w in np.unique(word[chosen]):
    assert w > 0 and chosen[word == w].all()


@pytest.mark.parametrize('lengths, rate, expected', [
    ([4, 4, 4, 4, 1, 1, 1, 1], 0.25, 5),  # the old loop took 4 + 4 = 8 whenever 4, 4 came first
    ([2, 2, 2, 2, 2, 2, 2, 3, 3], 0.25, 5),  # only 2 + 3 makes 5: 2 + 2 must not be kept
    ([2] * 10, 0.15, 2),  # 3 cannot be made of whole words: the largest total below it
])
def test_whole_word_masking_reaches_but_never_exceeds_the_rate(lengths, rate, expected):
  ids, starts = _row(lengths)
  rng = np.random.default_rng(0)
  for _ in range(100):
    chosen = masking.choose_positions(ids, rng, rate, starts, special=IDS)
    assert chosen.sum() == expected
    _check_whole_words(chosen, np.cumsum(starts))


def test_whole_word_masking_on_random_rows_hits_the_best_reachable_count():
  rng = np.random.default_rng(1)
  for _ in range(200):
    ids = rng.integers(NUM_SPECIAL, VOCAB, size=48)
    ids[rng.random(48) < 0.1] = PAD_ID  # not eligible
    starts = rng.random(48) < 0.35
    chosen = masking.choose_positions(ids, rng, 0.15, starts, special=IDS)
    eligible = ids >= NUM_SPECIAL
    target = int(round(0.15 * eligible.sum()))
    word = np.cumsum(starts | ~eligible) * eligible  # a word: a start and what follows it
    sums = {0}
    for w in np.unique(word[word > 0]):
      sums |= {s + int((word == w).sum()) for s in sums}
    assert chosen.sum() == max(s for s in sums if s <= target)
    assert not (chosen & ~eligible).any()
    _check_whole_words(chosen, word)


# --- 10. fill-mask prompts look like training's segments ------------------------------
class _CharTokenizer(Tokenizer):
  """One id per character; shows control ids in its output, so a frame left in shows."""
  chars = 'abcdefghijklmnopqrstuvwxyz .'
  vocab_size = VOCAB
  special = IDS

  def encode(self, text):
    return [NUM_SPECIAL + self.chars.index(c) for c in text]

  def decode(self, ids):
    names = {CLS_ID: '[CLS]', SEP_ID: '[SEP]', MASK_ID: '[MASK]'}
    return ''.join(names.get(i, '?') if i < NUM_SPECIAL else
                   self.chars[(i - NUM_SPECIAL) % len(self.chars)] for i in ids)


class _Recording:
  """The task, recording the batches fill-mask runs through it."""

  def __init__(self, task):
    self.task, self.batches = task, []
    self._logits = jax.jit(task.logits)

  def __getattr__(self, name):
    return getattr(self.task, name)

  def logits(self, params, batch):
    self.batches.append(batch)
    return self._logits(params, batch)


@pytest.mark.parametrize('next_sentence', [True, False])
def test_fill_mask_prompts_are_framed_as_training_framed_a_segment(next_sentence):
  from inference.fill_mask import fill_masks
  task, params = _task_and_params(next_sentence)
  examples = MaskedExamples(SEQ, VOCAB, 0.15, None, next_sentence, special=IDS)
  trained = examples.make_example(examples.source(_token_stream(20))[0],
                                  np.random.default_rng(0))['targets']
  recording, tokenizer = _Recording(task), _CharTokenizer()
  [filled] = fill_masks(recording, params, tokenizer, ['the cat [MASK] bread.'], task.cfg.max_len)
  inputs = np.asarray(recording.batches[0]['inputs'][0])
  text = tokenizer.encode('the cat ') + [MASK_ID] + tokenizer.encode(' bread.')
  if next_sentence:  # training: [CLS] A [SEP] B [SEP]
    assert trained[0] == CLS_ID and SEP_ID in trained
    np.testing.assert_array_equal(inputs, [CLS_ID] + text + [SEP_ID])
  else:  # training: raw windows of the token stream, no [CLS]
    assert CLS_ID not in trained and SEP_ID not in trained
    np.testing.assert_array_equal(inputs, text)
  np.testing.assert_array_equal(recording.batches[0]['positions'][0], np.arange(len(inputs)))
  assert not np.asarray(recording.batches[0]['token_type_ids']).any()  # segment A
  best = int(np.argmax(np.asarray(recording.logits(params, recording.batches[0])[0])[
      list(inputs).index(MASK_ID), :VOCAB]))
  # the model's word in place of [MASK], and no [CLS] / [SEP] left in the text
  assert filled == 'the cat ' + tokenizer.decode([best]) + ' bread.', filled
