"""Speculative decoding against plain greedy decoding at batch 1: one JSON line.

python -m benchmarks.speculative --json --target_workdir=T --draft_workdir=D \
    --num_draft_tokens=2,4 [--new_tokens=128]

With trained runs (same tokenizer) the prompt is --prompt's first --prompt_len tokens.
Without them: random weights of the peer shape (vocab 8192, d_model 384, 6 heads,
d_ff 1536), a target of 8 layers and a draft of 2, and a random prompt; random models
rarely agree, so their acceptance rate is low and speculation only costs time there.
Every loop is timed over the whole generation (prefill included, compilation not, best
of 3, the loops taking turns), with no EOS so both write exactly --new_tokens tokens. For each K:
tokens_per_s and speed_up over plain greedy; acceptance_rate, the share of proposed
draft tokens kept; tokens_per_target_call, tokens per verifying call of the target
(1 + kept per round, the prefill not counted); identical, whether the tokens equal plain
greedy's (they should, up to float rounding on near-tied logits). draft_tokens_per_s is
plain greedy with the draft alone, for its cost relative to the target's.

Where the time goes, each from loops of one kind of call alone (prefill subtracted):
draft_step_cost, a draft step in target steps; per K, target_call_steps, a check of K + 1
tokens in target steps (about 1 where reading the weights once serves every row, as
expected on a GPU; more where a multi-row product costs more than a one-row one, as on
XLA:CPU), and calls_only_speed_up, what a round would give if it cost only its K draft
steps and one check: tokens_per_target_call / (K draft_step_cost + target_call_steps).
Its gap to speed_up is the loop's own cost (cache rewinds, verification, the draft's
catch-up step) and, as speed_up counts them, the two models' prefills.
"""
import json

import flax.linen as nn
import jax
import numpy as np
from absl import app, flags

import tasks
from benchmarks import best_seconds, peer_config
from benchmarks.call_costs import prefill, target_calls
from inference.generate import decode_tokens, prepare
from inference.sampling import Sampling
from inference.speculative import check_models, speculative_tokens
from train import runtime

_TARGET_WORKDIR = flags.DEFINE_string('target_workdir', None, 'A trained decoder run (default: '
                                      'random weights of the peer shape, 8 layers).')
_DRAFT_WORKDIR = flags.DEFINE_string('draft_workdir', None, 'A smaller run with the same '
                                     'tokenizer (default: random weights, 2 layers).')
_NUM_DRAFT_TOKENS = flags.DEFINE_list('num_draft_tokens', ['2', '4'], 'Values of K to time.')
_NEW_TOKENS = flags.DEFINE_integer('new_tokens', 128, 'Tokens generated.')
_PROMPT_LEN = flags.DEFINE_integer('prompt_len', 32, 'Prompt tokens.')
_PROMPT = flags.DEFINE_string(
    'prompt', 'In the beginning, God created the heavens and the earth. The earth was formless '
    "and empty. Darkness was on the surface of the deep and God's Spirit was hovering over the "
    'surface of the waters.', "Trained runs: the text whose first prompt_len tokens are the "
    'prompt.')
_JSON = flags.DEFINE_bool('json', False, 'Print only the JSON line.', allow_override=True)


def _random_models(max_len: int):
  """(target, draft) (task, params) pairs of the peer shape, 8 and 2 layers."""
  models = []
  for seed, layers in enumerate((8, 2)):
    task = tasks.for_model(peer_config(layers, max_len))
    models.append((task, nn.unbox(task.init(jax.random.key(seed), task.example_batch(1, 8)))))
  prompt = np.random.default_rng(0).integers(200, 8192, _PROMPT_LEN.value).tolist()
  return models, prompt


def _trained_models():
  """(target, draft) (task, params) pairs of the two runs, and the prompt's tokens."""
  from inference.load import load_run
  from train import run_config
  loaded = [load_run(run_config.saved_config(workdir, []), workdir)
            for workdir in (_TARGET_WORKDIR.value, _DRAFT_WORKDIR.value)]
  models = [(task, params) for task, params, _ in loaded]
  prompt = loaded[0][2].encode(_PROMPT.value)[:_PROMPT_LEN.value]
  if len(prompt) < _PROMPT_LEN.value:
    raise ValueError(f'--prompt is {len(prompt)} tokens; give a text of at least '
                     f'--prompt_len={_PROMPT_LEN.value}.')
  return models, prompt


def main(argv):
  del argv
  if bool(_TARGET_WORKDIR.value) != bool(_DRAFT_WORKDIR.value):
    raise app.UsageError('Give both --target_workdir and --draft_workdir, or neither.')
  draft_counts = [int(k) for k in _NUM_DRAFT_TOKENS.value]
  new = _NEW_TOKENS.value
  if new <= max(draft_counts):
    raise app.UsageError(f'--new_tokens={new} must exceed the largest --num_draft_tokens '
                         f'({max(draft_counts)}): one check is K + 1 tokens.')
  if _TARGET_WORKDIR.value:
    ((task, params), (draft_task, draft_params)), prompt = _trained_models()
  else:
    ((task, params), (draft_task, draft_params)), prompt = _random_models(
        _PROMPT_LEN.value + new + max(draft_counts))
  check_models(task, draft_task, [prompt], new, max(draft_counts))
  # As generate() and speculative.generate() prepare them: one row per step for plain
  # greedy and the draft, several for the target's checks.
  _, plain_params, _, _ = prepare(task, params, [prompt], new, 'none')
  task, params, ids, real = prepare(task, params, [prompt], new, 'none',
                                    rows=max(draft_counts) + 1)
  draft_task, draft_params, _, _ = prepare(draft_task, draft_params, [prompt], new, 'none')
  greedy = Sampling(temperature=0.0)
  key = jax.random.key(0)
  runs = {'plain': lambda: decode_tokens(plain_params, ids, real, key, task=task,
                                         max_new_tokens=new, sampling=greedy, eos_id=-1),
          'draft': lambda: decode_tokens(draft_params, ids, real, key, task=draft_task,
                                         max_new_tokens=new, sampling=greedy, eos_id=-1),
          'prefill': lambda: prefill(plain_params, ids, real, task=task),
          'target_prefill': lambda: prefill(params, ids, real, task=task),  # checks' layout
          'draft_prefill': lambda: prefill(draft_params, ids, real, task=draft_task)}
  for k in draft_counts:
    runs[k] = lambda k=k: speculative_tokens(
        params, draft_params, ids, real, key, -1, task=task, draft_task=draft_task,
        max_new_tokens=new, num_draft_tokens=k, sampling=greedy)
    runs['calls', k] = lambda k=k: target_calls(params, ids, real, task=task,
                                               tokens_per_call=k + 1, calls=new // (k + 1))[0]
  seconds, outputs = best_seconds(runs)
  step_s = (seconds['plain'] - seconds['prefill']) / new
  draft_step_cost = (seconds['draft'] - seconds['draft_prefill']) / new / step_s
  results = []
  for k in draft_counts:
    tokens, counts = outputs[k]
    rounds, accepted = int(counts['rounds']), int(counts['accepted'])
    call_steps = (seconds['calls', k] - seconds['target_prefill']) / (new // (k + 1)) / step_s
    per_call = 1 + accepted / rounds
    results.append({'num_draft_tokens': k, 'tokens_per_s': new / seconds[k],
                    'speed_up': seconds['plain'] / seconds[k],
                    'acceptance_rate': accepted / (k * rounds),
                    'tokens_per_target_call': per_call, 'target_call_steps': call_steps,
                    'calls_only_speed_up': per_call / (k * draft_step_cost + call_steps),
                    'identical': bool(np.array_equal(tokens, outputs['plain']))})
  result = {'benchmark': 'speculative', 'backend': jax.default_backend(),
            'device': jax.devices()[0].device_kind,
            'target': _TARGET_WORKDIR.value or 'random, 8 layers',
            'draft': _DRAFT_WORKDIR.value or 'random, 2 layers',
            'target_layers': task.cfg.num_layers, 'draft_layers': draft_task.cfg.num_layers,
            'batch': 1, 'prompt_len': len(prompt), 'new_tokens': new,
            'plain_tokens_per_s': new / seconds['plain'],
            'draft_tokens_per_s': new / seconds['draft'], 'draft_step_cost': draft_step_cost,
            'speculative': results}
  print(json.dumps(result), flush=True)


if __name__ == '__main__':
  runtime.reexec_with_huge_pages()
  app.run(main)
