"""Beam search: exact where it must be (width one is greedy, a wide enough beam is
exhaustive) and finished hypotheses ranked by the length-penalised score, apart from the
live beams they must not crowd out."""
import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from inference.beam import beam_search
from inference.generate import Decoding, generate
from models import ModelConfig

from conftest import decoding_params

TINY = ModelConfig(vocab_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                   d_model=32, d_ff=64, max_len=32)
PROMPTS = [[5, 9, 20, 33], [7, 8], [100, 101, 102, 103, 104, 105]]
ENCODER_DECODER = dict(arch='encoder_decoder', position='relative', activation='silu', gated_mlp=True)  # T5-like
EOS = 1


_params = decoding_params  # (task, params), one per config for the whole session


def _log_probs_after_each_first_token(task, params, cfg, prompt):
  """([V] log-probs of the first new token, [V, V] of the second after each first token)."""
  vocab = cfg.vocab_size
  # One compiled program (the batch is built in NumPy), not many single operations.
  log_probs = jax.jit(lambda p, b: jax.nn.log_softmax(task.logits(p, b).astype(jnp.float32)))
  positions = lambda ids: np.broadcast_to(np.arange(ids.shape[1], dtype=np.int32), ids.shape)
  if cfg.arch == 'decoder':
    ids = np.asarray([prompt + [t, 0] for t in range(vocab)], np.int32)
    batch = {'inputs': ids, 'segment_ids': np.ones_like(ids), 'positions': positions(ids)}
    offset = len(prompt) - 1
  else:
    decoder = np.asarray([[0, t] for t in range(vocab)], np.int32)
    encoder = np.asarray([prompt] * vocab, np.int32)
    batch = {'encoder_inputs': encoder, 'encoder_segment_ids': np.ones_like(encoder),
             'encoder_positions': positions(encoder), 'decoder_inputs': decoder,
             'decoder_segment_ids': np.ones_like(decoder), 'decoder_positions': positions(decoder)}
    offset = 0
  logp = np.asarray(log_probs(params, batch))
  return logp[0, offset], logp[:, offset + 1]  # every row shares the first step


@pytest.mark.parametrize('changes', [{}, ENCODER_DECODER])
def test_beam_search_is_greedy_at_width_one_and_exact_at_full_width(changes):
  cfg = dataclasses.replace(TINY, **changes)
  task, params = _params(cfg)
  greedy = generate(task, params, PROMPTS, 10, eos_id=-1)  # compiled as in test_generate.py
  assert beam_search(task, params, PROMPTS, 10, beam_size=1, eos_id=-1) == greedy
  # With one beam per vocabulary entry, two steps of beam search are exhaustive.
  prompt = PROMPTS[0]
  best = beam_search(task, params, [prompt], 2, beam_size=cfg.vocab_size, length_penalty=0.0,
                     eos_id=-1)[0]
  first, second = _log_probs_after_each_first_token(task, params, cfg, prompt)
  total = first[:, None] + second
  expected = list(np.unravel_index(int(np.argmax(total)), total.shape))
  assert best == [int(t) for t in expected]


# --- a stand-in model with odds set by hand -------------------------------------------
STEPS = []  # one entry per decoding step of a TableTask
START = 5  # a prompt-only token: the prompt is [START, START]


@dataclasses.dataclass(frozen=True)
class TableTask:
  """log p(next | previous, last) read from params['logp_VVV']. The key/value cache holds
  each row's last token, so a beam that does not take its parent's cache row reads the
  wrong odds. Prompts are token pairs (the first two indices of the table)."""
  cfg: ModelConfig

  def check_prompts(self, prompts, max_new_tokens):
    pass

  def start_decoding(self, params, ids_BP, real_BP):
    logp_VVV = params['logp_VVV']

    def step(cache, token_B, position_B):
      jax.debug.callback(lambda: STEPS.append(1))
      return logp_VVV[cache['last_B'], token_B], {'last_B': token_B}

    return Decoding(logp_VVV[ids_BP[:, -2], ids_BP[:, -1]], {'last_B': ids_BP[:, -1]},
                    jnp.zeros(ids_BP.shape[0], jnp.int32), step, ids_BP.shape[1])


def _bigram(rows: dict[int, dict[int, float]], vocab: int = 6):
  """(task, params) whose odds depend on the last token only: rows[t] gives some next
  tokens' probabilities after t; the rest of the mass is spread evenly over the others."""
  probs_VV = np.zeros((vocab, vocab))
  for last in range(vocab):
    given = rows.get(last, {})
    rest = [t for t in range(vocab) if t not in given]
    probs_VV[last, rest] = (1.0 - sum(given.values())) / len(rest)
    probs_VV[last, list(given)] = list(given.values())
  logp_VVV = np.broadcast_to(np.log(probs_VV), (vocab,) * 3).astype(np.float32)
  return TableTask(ModelConfig(vocab_size=vocab, scan_layers=False)), {'logp_VVV': logp_VVV}


def _score(logp_VVV, prompt, sequence, length_penalty):
  """The GNMT-penalised log-probability of `sequence` after `prompt` (its length counts EOS)."""
  history, total = list(prompt[-2:]), 0.0
  for token in sequence:
    total += float(logp_VVV[history[-2], history[-1], token])
    history.append(token)
  return total / ((5.0 + len(sequence)) / 6.0) ** length_penalty


def test_a_long_answer_with_the_best_penalised_score_beats_short_early_eos_ones():
  # After START: EOS is likeliest, and 0, 3 and 4 are each a step from EOS; the long
  # answer 2 3 EOS starts least likely but is then near-certain.
  task, params = _bigram({START: {EOS: 0.3, 0: 0.18, 3: 0.18, 4: 0.18, 2: 0.15},
                          0: {EOS: 0.98}, 2: {3: 0.98}, 3: {EOS: 0.98}, 4: {EOS: 0.98}})
  prompt, long, short = [START, START], [2, 3, EOS], [EOS]
  score = lambda sequence, alpha: _score(params['logp_VVV'], prompt, sequence, alpha)
  assert score(short, 0.0) > score(long, 0.0) and score(long, 2.0) > score(short, 2.0)
  assert beam_search(task, params, [prompt], 6, beam_size=4, length_penalty=0.0) == [short]
  # The four short finished answers must not take the four beams the long one needs.
  STEPS.clear()
  assert beam_search(task, params, [prompt], 6, beam_size=4, length_penalty=2.0) == [long]
  # Once nothing live can beat the worst of four finished answers, the search stops.
  assert len(STEPS) < 6


def test_a_finished_hypothesis_does_not_block_the_live_beam():
  # One beam: EOS comes first, but 2 EOS is better once penalised. A finished hypothesis
  # that kept its beam (extending by free padding) would end the search at once.
  task, params = _bigram({START: {EOS: 0.5, 2: 0.45}, 2: {EOS: 0.99}})
  prompt = [START, START]
  assert beam_search(task, params, [prompt], 4, beam_size=1, length_penalty=2.0) == [[2, EOS]]
  assert beam_search(task, params, [prompt], 4, beam_size=1, length_penalty=0.0) == [[EOS]]


def test_hypotheses_cut_off_at_max_new_tokens_compete_with_finished_ones():
  # A rare EOS finishes at once; the likely continuation is still live at the cut-off.
  task, params = _bigram({START: {EOS: 0.01, 2: 0.9}, 2: {3: 0.9, EOS: 0.02}})
  prompt = [START, START]
  assert beam_search(task, params, [prompt], 1, beam_size=4, length_penalty=0.6,
                     eos_id=EOS) == [[2]]
  assert beam_search(task, params, [prompt], 2, beam_size=4, length_penalty=0.6,
                     eos_id=EOS) == [[2, 3]]


@pytest.mark.parametrize('length_penalty', [0.6, 2.0])
def test_a_wide_enough_beam_finds_the_best_penalised_sequence_of_all(length_penalty):
  vocab, max_new_tokens = 5, 4
  task = TableTask(ModelConfig(vocab_size=vocab, scan_layers=False))
  prompts = [[0, 2], [3, 4], [4, 0]]
  # One beam per token is exhaustive for two steps only. This width keeps every live
  # prefix (4 ** 3 before the last step) and takes every candidate of a step
  # (4 ** 3 * 5 = 2 * width), so nothing is pruned and the search is exhaustive.
  width = (vocab - 1) ** (max_new_tokens - 1) * vocab // 2
  # Every sequence that ends at EOS within max_new_tokens, and every one cut off there
  # without an EOS (those compete too, penalised at max_new_tokens).
  others = [t for t in range(vocab) if t != EOS]
  sequences = [list(body) + [EOS] for n in range(max_new_tokens)
               for body in itertools.product(others, repeat=n)]
  sequences += [list(body) for body in itertools.product(others, repeat=max_new_tokens)]
  lengths = []
  for seed in range(6):
    # Peaked odds, so some long sequences are likely enough for the penalty to prefer.
    logits_VVV = 4.0 * np.random.default_rng(seed).normal(size=(vocab,) * 3)
    logp_VVV = np.asarray(jax.nn.log_softmax(logits_VVV), np.float32)
    out = beam_search(task, {'logp_VVV': logp_VVV}, prompts, max_new_tokens,
                      beam_size=width, length_penalty=length_penalty)
    for prompt, best in zip(prompts, out):
      scores = sorted((_score(logp_VVV, prompt, s, length_penalty), s) for s in sequences)
      assert scores[-1][0] - scores[-2][0] > 1e-4  # no near-tie for float32 sums to break
      assert best == scores[-1][1], (seed, prompt)
      lengths.append(len(best))
  assert max(lengths) == max_new_tokens and min(lengths) == 1  # the penalty had a say
