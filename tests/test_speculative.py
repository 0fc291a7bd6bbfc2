"""Speculative decoding: greedy output is plain greedy's, the accept/reject rule keeps the
target's distribution, and the command line refuses what it cannot do exactly."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from inference import speculative
from inference.generate import generate
from inference.sampling import Sampling
from models import ModelConfig
import tasks

from conftest import decoding_params

TARGET = ModelConfig(vocab_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                     d_model=32, d_ff=64, max_len=72)
UNRELATED = dataclasses.replace(TARGET, num_layers=1, num_kv_heads=4)  # its own random weights
PROMPTS = [[5, 9, 20, 33], [7, 8], [100, 101, 102, 103, 104, 105]]
NEW = 61  # a multiple of neither K + 1 = 2 nor 4; the caches grow past 64 slots


@pytest.mark.parametrize('num_draft_tokens', [1, 3])
@pytest.mark.parametrize('draft_cfg', [UNRELATED, TARGET], ids=['unrelated', 'target'])
def test_greedy_output_is_plain_greedy_and_stops_at_eos(num_draft_tokens, draft_cfg):
  task, params = decoding_params(TARGET)
  draft_task, draft_params = decoding_params(draft_cfg)
  draft = speculative.Draft(draft_task, draft_params, num_draft_tokens)
  plain = generate(task, params, PROMPTS, NEW, eos_id=-1)
  stats = {}
  assert speculative.generate(task, params, draft, PROMPTS, NEW, eos_id=-1, stats=stats) == plain
  proposed = num_draft_tokens * stats['rounds']
  if draft_cfg == TARGET:
    assert stats['accepted'] == proposed
  else:
    assert stats['accepted'] < proposed / 2
  eos = plain[0][4]  # pretend row 0's 5th token ends documents
  cut = [row[:row.index(eos) + 1] if eos in row else row for row in plain]
  assert speculative.generate(task, params, draft, PROMPTS, NEW, eos_id=eos) == cut
  assert cut[0] != plain[0]  # row 0 stops at the EOS: the cut path is exercised


# p and q over 6 tokens: token 3 has q = 0 < p, token 5 has p = 0 < q.
P = np.array([0.35, 0.25, 0.2, 0.15, 0.05, 0.0], np.float32)
Q = np.array([0.1, 0.3, 0.3, 0.0, 0.1, 0.2], np.float32)
DRAWS = 200_000


def _matches(tokens, probs) -> bool:
  """The tokens' frequencies are within 5 standard errors of `probs` (0 where it is 0)."""
  freq = np.bincount(tokens, minlength=len(probs)) / len(tokens)
  return bool(np.all(np.abs(freq - probs) <= 5 * np.sqrt(probs * (1 - probs) / len(tokens))))


def test_accept_or_replace_emits_the_target_distribution():
  keys = jax.random.split(jax.random.key(0), 3)
  p_NV, q_NV = (jnp.broadcast_to(x, (DRAWS, len(P))) for x in (P, Q))
  proposed_N = speculative.draw(keys[0], q_NV)
  kept_N = speculative.accepts(p_NV, q_NV, proposed_N, jax.random.uniform(keys[1], (DRAWS,)))
  emitted = np.asarray(jnp.where(kept_N, proposed_N,
                                 speculative.draw(keys[2], speculative.residual(p_NV, q_NV))))
  assert _matches(emitted, P)
  assert not _matches(emitted, Q)  # the check can fail: the draft's own distribution does
  replaced_from_p = jnp.where(kept_N, proposed_N, speculative.draw(keys[2], p_NV))
  assert not _matches(np.asarray(replaced_from_p), P)  # and so does a wrong replacement


def test_a_round_emits_each_position_from_its_target_distribution():
  """verify() over K = 2 proposals: the first token emitted follows p[0], the second
  (after a kept proposal) p[1], the bonus (after two) p[2]."""
  p_TV = jnp.asarray([P, np.roll(P, 1), np.roll(P, 2)])
  q_KV = jnp.asarray([Q, np.roll(Q, 3)])

  def one_round(key):
    draft_key, verify_key = jax.random.split(key)
    draft_K = speculative.draw(draft_key, q_KV)
    kept, token = speculative.verify(p_TV, q_KV, draft_K, verify_key)
    return kept, jnp.where(jnp.arange(3) < kept, jnp.append(draft_K, 0), token)
  kept_N, emitted_NT = map(np.asarray, jax.jit(jax.vmap(one_round))(
      jax.random.split(jax.random.key(1), DRAWS)))
  assert _matches(emitted_NT[:, 0], p_TV[0])
  assert _matches(emitted_NT[kept_N >= 1, 1], p_TV[1])
  assert _matches(emitted_NT[kept_N == 2, 2], p_TV[2])
  assert 0 < np.mean(kept_N == 2) < np.mean(kept_N >= 1) < 1


def test_sampling_gives_valid_tokens_and_a_seed_reproduces_them():
  task, params = decoding_params(TARGET)
  draft = speculative.Draft(*decoding_params(UNRELATED), 3)
  sampling = Sampling(temperature=1.0, top_k=20, top_p=0.9)
  run = lambda seed: speculative.generate(task, params, draft, PROMPTS, NEW, sampling, seed,
                                          eos_id=-1)
  first = run(1)
  assert [len(row) for row in first] == [NEW] * len(PROMPTS)
  assert all(0 <= t < TARGET.vocab_size for row in first for t in row)
  assert run(1) == first and run(2) != first
  stats = {}  # a draft equal to the target: p = q at every position, every proposal kept
  same = speculative.Draft(task, params, 3)
  speculative.generate(task, params, same, PROMPTS, NEW, sampling, 1, eos_id=-1, stats=stats)
  assert stats['accepted'] == 3 * stats['rounds']


@pytest.mark.parametrize('draft_changes, prompts, message', [
    (dict(vocab_size=256), PROMPTS, 'draft model has 256 vocabulary entries and the target 128'),
    ({}, [[5] * 11], r"needs 73 positions .* target model's context is 72"),
    (dict(max_len=64), [[5] * 3], r"needs 65 positions .* draft model's context is 64"),
])
def test_models_that_cannot_speculate_say_what_to_change(draft_changes, prompts, message):
  draft_task = tasks.for_model(dataclasses.replace(TARGET, **draft_changes))
  with pytest.raises(ValueError, match=message):
    speculative.check_models(tasks.for_model(TARGET), draft_task, prompts, NEW, 2)


def _fake_run(directory, vocab_size: int, tokenizer: bytes, arch: str = 'decoder') -> str:
  """A workdir as far as the draft's checks read it: config.json and a tokenizer file."""
  config = default.get_config()
  config.model.update(vocab_size=vocab_size, arch=arch)
  directory.mkdir()
  (directory / 'config.json').write_text(config.to_json())
  (directory / 'tokenizer.model').write_bytes(tokenizer)
  return str(directory)


@pytest.mark.parametrize('target_arch, draft, extra_flags, message', [
    ('decoder', (4096, b'other pieces'), {},
     r'differs in tokenizer.model\).*copy .*tokenizer.model into'),
    ('decoder', (8192, b'pieces'), {}, 'differs in model.vocab_size: 8192, not 4096'),
    ('decoder', (4096, b'pieces'), dict(repetition_penalty=1.3),
     r'--repetition_penalty=1.3 cannot be combined with speculative decoding'),
    ('encoder_decoder', (4096, b'pieces'), {},
     "continues prompts; this run's task 'span_corruption' does not"),
], ids=['tokenizer', 'vocab_size', 'repetition_penalty', 'task_not_continuing_prompts'])
def test_the_command_line_refuses_what_cannot_speculate(
    tmp_path, target_arch, draft, extra_flags, message):
  """Before either run is loaded: the workdirs hold no checkpoint."""
  from absl import flags
  from absl.testing import flagsaver
  from inference import cli
  from train import run_config
  target = _fake_run(tmp_path / 'target', 4096, b'pieces', target_arch)
  draft_workdir = _fake_run(tmp_path / 'draft', *draft)
  parsed = flags.FLAGS.is_parsed()
  flags.FLAGS.mark_as_parsed()
  try:
    with flagsaver.flagsaver(draft_workdir=draft_workdir, prompt='x', **extra_flags):
      with pytest.raises(ValueError, match=message):
        cli.sample(run_config.saved_config(target, []), target)
  finally:
    if not parsed:
      flags.FLAGS.unparse_flags()
