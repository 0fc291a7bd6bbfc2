"""End to end (slow tier): every fine-tuning task trains from the command line on JSONL
records, and a run killed with SIGKILL resumes to the uninterrupted run's parameters
and losses, bit for bit."""
import json
import random
import re
import sys

import pytest

from test_faults import _assert_trees_equal, _rows, _run_until, _saved_params

STEPS = 12
_SUBJECTS = ['the cat', 'a dog', 'the old king', 'my sister']
_VERBS = ['sees', 'follows', 'finds', 'greets']
_OBJECTS = ['the bread', 'a stone', 'the gate', 'water']


def _sentences(n: int, seed: int):
  rng = random.Random(seed)
  return [(rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS)) for _ in range(n)]


def _records(kind: str, n: int, seed: int) -> list[dict]:
  rows = []
  for subject, verb, obj in _sentences(n, seed):
    if kind == 'sft':
      rows.append({'prompt': f'What does {subject} do?', 'response': f'{subject} {verb} {obj}.'})
    elif kind == 'dpo':  # the true sentence over one with the next verb
      wrong = _VERBS[(_VERBS.index(verb) + 1) % len(_VERBS)]
      rows.append({'prompt': f'What does {subject} do?', 'chosen': f'{subject} {verb} {obj}.',
                   'rejected': f'{subject} {wrong} {obj}.'})
    elif kind == 'seq2seq':
      rows.append({'input': f'{subject} {verb} {obj}', 'target': f'{obj} {verb} {subject}'})
    else:
      rows.append({'text': f'{subject} {verb} {obj}.', 'label': subject})
  return rows


def _write(path, rows):
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  return str(path)


def _command(task, arch, train, evaluate, workdir, cache, **changes):
  overrides = {
      'task': task, 'model.arch': arch, 'data.corpus': train, 'data.eval_corpus': evaluate,
      'data.cache_dir': cache, 'data.seq_len': 32, 'data.batch_size': 4,
      'data.tokenizer.vocab_size': 420, 'model.num_layers': 2, 'model.num_heads': 2,
      'model.d_model': 32, 'model.d_ff': 64, 'model.max_len': 64, 'model.dropout': 0.1,
      'train.steps': STEPS, 'train.warmup_steps': 2, 'train.log_every': 1,
      'train.eval_every': 6, 'train.eval_steps': 2, 'train.eval_decode_examples': 4,
      'train.checkpoint_every': 3, 'train.keep_checkpoints': 2,
  }
  if arch == 'encoder':
    overrides['model.num_token_types'] = 2
  overrides.update(changes)
  return ([sys.executable, 'main.py', '--config=configs/default.py', f'--workdir={workdir}']
          + [f'--config.{k}={v}' for k, v in overrides.items()])


@pytest.mark.slow
@pytest.mark.parametrize('task, arch, lora', [
    ('sft', 'decoder', False), ('sft', 'encoder_decoder', False), ('seq2seq', 'decoder', False),
    ('seq2seq', 'encoder_decoder', False), ('classification', 'encoder', False),
    ('classification', 'decoder', False), ('dpo', 'decoder', False),
    ('dpo', 'encoder_decoder', False), ('sft', 'decoder', True), ('dpo', 'decoder', True)])
def test_a_fine_tuning_run_killed_with_sigkill_resumes_bit_for_bit(tmp_path, task, arch, lora):
  """lora: adapters (with dropout) on a frozen base, which each start reads again."""
  train = _write(tmp_path / 'train.jsonl', _records(task, 200, 0))
  evaluate = _write(tmp_path / 'eval.jsonl', _records(task, 12, 1))
  cache = str(tmp_path / 'cache')
  changes = {}
  if lora:
    changes.update({'lora.rank': 4, 'lora.dropout': 0.1, 'lora.train_in_full': 'embedding',
                    'train.lr': 3e-3})
  if task == 'dpo' or lora:  # the start (and reference): a short sft run of the same model
    source = str(tmp_path / 'sft')
    _run_until(_command('sft', arch, _write(tmp_path / 'sft.jsonl', _records('sft', 200, 0)),
                        _write(tmp_path / 'sft_eval.jsonl', _records('sft', 12, 1)), source,
                        cache, **{'train.steps': 3}))
    changes['init_from'] = source
  straight = str(tmp_path / 'straight')
  _run_until(_command(task, arch, train, evaluate, straight, cache, **changes))
  killed = str(tmp_path / 'killed')
  command = _command(task, arch, train, evaluate, killed, cache, **changes)
  _, was_killed = _run_until(command, lambda line: f'step 8/{STEPS} |' in line)
  assert was_killed
  lines, _ = _run_until(command)
  restored = re.search(r'Restored checkpoint at step (\d+)\.', ''.join(lines))
  assert restored and int(restored[1]) in (3, 6), ''.join(lines)[-2000:]
  step_a, params_a = _saved_params(straight)
  step_b, params_b = _saved_params(killed)
  assert step_a == step_b == STEPS
  _assert_trees_equal(params_a, params_b)
  last = lambda workdir: [r for r in _rows(workdir) if r['step'] == STEPS][-1]
  assert last(straight)['loss'] == last(killed)['loss']
  assert last(straight)['eval_loss'] == last(killed)['eval_loss']
  if task == 'seq2seq':
    assert 'eval_chrf' in last(straight) and 'eval_bleu' in last(straight)
  if task == 'classification':
    assert 'eval_macro_f1' in last(straight)
  if task == 'dpo':
    assert last(straight)['eval_reward_accuracy'] == last(killed)['eval_reward_accuracy']
