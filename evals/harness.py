"""Runs evaluation tasks (evals/tasks.py) on a model and reports each metric with its
standard error and the number of examples; the per-example scores go to
DIR/eval/<task>.jsonl for inspection.

The model is the run's task (`lm` here, tasks/): it turns (context, continuation) pairs
into rows it scores (a decoder's continuation log-likelihood, an encoder-decoder's
log-likelihood of the target given the input, an encoder's pseudo-log-likelihood), and
decodes for generation tasks. Nothing here asks which family it is.
"""
import dataclasses
import json
import math
import os

import jax
import numpy as np

from evals import fewshot, metrics, scoring
from evals.progress import Progress
from evals.tasks import DEFAULT_UNTIL, EvalTask, TaskError, load_all
from input_pipeline.tokenizer import Tokenizer
from tasks.base import Task


@dataclasses.dataclass(frozen=True)
class Settings:
  num_shots: int = 0
  limit: int = 0  # score the first `limit` examples of each task (0: all)
  batch_size: int = 32  # rows (or prompts) per compiled call
  seed: int = 1234  # draws the few-shot demonstrations
  max_length: int = 0  # context length (0: the model's max_len)
  overlap: int = 0  # rolling: tokens consecutive windows share (0: half the context)
  beam_size: int = 0  # generation: 0 greedy, else beam search
  max_new_tokens: int = 0  # generation: 0 from the longest target (2x + 8, <= half the context)

  def check(self) -> None:
    for name in ('limit', 'max_length', 'overlap', 'beam_size', 'max_new_tokens'):
      if getattr(self, name) < 0:
        raise TaskError(f'--{_FLAG.get(name, name)}={getattr(self, name)} must be 0 or more.')
    if self.batch_size < 1:
      raise TaskError(f'--eval_batch_size={self.batch_size} must be at least 1.')


_FLAG = {'overlap': 'rolling_overlap', 'beam_size': 'eval_beam_size',
         'max_new_tokens': 'eval_max_new_tokens'}


def _length(lm: Task, settings: Settings) -> int:
  if settings.max_length > lm.cfg.max_len:
    raise TaskError(f'--max_length={settings.max_length} is longer than the model\'s context '
                    f'(model.max_len={lm.cfg.max_len}); lower it.')
  return settings.max_length or lm.cfg.max_len


def _fits(task: EvalTask, room: int, what: str, length: int) -> None:
  if room < 1:
    raise TaskError(f"Task '{task.name}': {what} leaves no room for a context in the model's "
                    f'{length} tokens; shorten it, or raise --max_length up to model.max_len.')


def _prompts(tokenizer: Tokenizer, task: EvalTask, rooms: list[int], settings: Settings):
  """The prompt of each example (as many as `rooms`), and how many demonstrations and
  contexts were cut to fit."""
  prompts = [fewshot.build(task, i, settings.num_shots, settings.seed, tokenizer, room)
             for i, room in enumerate(rooms)]
  cut = {'dropped_demonstrations': sum(settings.num_shots - p.shots for p in prompts),
         'truncated': sum(p.truncated for p in prompts)}
  return prompts, cut


def multiple_choice(lm: Task, params, tokenizer: Tokenizer, task: EvalTask,
                    settings: Settings) -> tuple[dict, list[dict]]:
  """acc and acc_norm: every choice of every example scored as the context's continuation."""
  length = _length(lm, settings)
  examples = task.examples[:settings.limit or None]
  choice_ids = [[tokenizer.encode(c) for c in e['choices']] for e in examples]
  rooms = []
  for i, ids in enumerate(choice_ids):
    rooms.append(min(lm.context_room(tokenizer, len(c), length) for c in ids))
    _fits(task, rooms[-1], f'example {i} (a choice of {max(map(len, ids))} tokens)', length)
  prompts, cut = _prompts(tokenizer, task, rooms, settings)
  rows, pair_of_row, pairs = [], [], 0
  for prompt, ids in zip(prompts, choice_ids):
    for choice in ids:
      made = lm.scoring_rows(tokenizer, prompt.ids, choice)
      rows += made
      pair_of_row += [pairs] * len(made)
      pairs += 1
  progress = Progress(task.name, len(rows))
  scores_R = scoring.loglikelihoods(lm, params, rows, settings.batch_size, length, progress)
  progress.close()
  pair_scores = np.bincount(pair_of_row, weights=scores_R, minlength=pairs)
  records, first = [], 0
  for i, (example, prompt) in enumerate(zip(examples, prompts)):
    n = len(example['choices'])
    lls = pair_scores[first:first + n]
    first += n
    records.append({'index': i, **({'id': example['id']} if 'id' in example else {}),
                    'prompt': prompt.text, 'shots': prompt.shots, 'choices': example['choices'],
                    'gold': example['gold'], 'loglikelihoods': lls.tolist(),
                    **metrics.choice_scores(lls, example['choices'], example['gold'])})
  results = {**metrics.with_stderr('acc', metrics.mean_and_stderr([r['acc'] for r in records])),
             **metrics.with_stderr('acc_norm',
                                   metrics.mean_and_stderr([r['acc_norm'] for r in records])),
             'examples': len(records), **cut}
  return results, records


def generation(lm: Task, params, tokenizer: Tokenizer, task: EvalTask,
               settings: Settings) -> tuple[dict, list[dict]]:
  """exact_match and chrF of what the model writes after each context."""
  length = _length(lm, settings)
  examples = task.examples[:settings.limit or None]
  longest = max(len(tokenizer.encode(e['target'])) for e in examples)
  max_new = settings.max_new_tokens or min(2 * longest + 8, length // 2)
  room = lm.context_room(tokenizer, max_new + 1, length)
  _fits(task, room, f'generating {max_new} tokens', length)
  prompts, cut = _prompts(tokenizer, task, [room] * len(examples), settings)
  prompt_ids = [lm.generation_prompt(tokenizer, p.ids) for p in prompts]
  progress = Progress(task.name, len(prompt_ids), 'prompts')
  new_ids = scoring.generate(lm, params, tokenizer, prompt_ids, max_new, settings.beam_size,
                             settings.batch_size, progress)
  progress.close()
  records = []
  for i, (example, prompt, ids, new) in enumerate(zip(examples, prompts, prompt_ids, new_ids)):
    output = lm.generated_text(tokenizer, ids, new)
    for stop in example.get('until', DEFAULT_UNTIL):
      output = output.split(stop)[0]
    records.append({'index': i, **({'id': example['id']} if 'id' in example else {}),
                    'prompt': prompt.text, 'shots': prompt.shots, 'target': example['target'],
                    'output': output,
                    'exact_match': float(output.strip() == example['target'].strip()),
                    'chrf': metrics.sentence_chrf(output.strip(), example['target'].strip())})
  exact = metrics.mean_and_stderr([r['exact_match'] for r in records])
  chrf = metrics.chrf([r['output'].strip() for r in records],
                      [r['target'].strip() for r in records])
  results = {**metrics.with_stderr('exact_match', exact), **metrics.with_stderr('chrf', chrf),
             'examples': len(records), 'max_new_tokens': max_new, **cut}
  return results, records


def rolling(lm: Task, params, tokenizer: Tokenizer, task: EvalTask,
            settings: Settings) -> tuple[dict, list[dict]]:
  """Bits per byte and perplexity of each document, every token scored once in windows of
  the context that share `overlap` tokens (tasks/causal_lm.py `rolling_windows`)."""
  length = _length(lm, settings)
  overlap = settings.overlap or max(1, length // 2)
  if overlap > length:
    raise TaskError(f'--rolling_overlap={overlap} is longer than the {length}-token windows; '
                    'lower it.')
  documents = task.examples[:settings.limit or None]
  rows, doc_of_row = [], []
  for d, document in enumerate(documents):
    made = lm.rolling_rows(tokenizer, tokenizer.encode(document['text']), length, overlap)
    rows += made
    doc_of_row += [d] * len(made)
  progress = Progress(task.name, len(rows), 'windows')
  scores_R = scoring.loglikelihoods(lm, params, rows, settings.batch_size, length, progress)
  progress.close()
  bytes_per_token = np.asarray(tokenizer.bytes_per_token, np.float64)
  tokens_R = [float(np.sum(r['weights'])) for r in rows]
  bytes_R = [float(np.sum(bytes_per_token[r['targets']] * r['weights'])) for r in rows]
  count = len(documents)
  nats_D = -np.bincount(doc_of_row, weights=scores_R, minlength=count)
  tokens_D = np.bincount(doc_of_row, weights=tokens_R, minlength=count)
  bytes_D = np.bincount(doc_of_row, weights=bytes_R, minlength=count)
  bits, bits_stderr = metrics.ratio_and_stderr(nats_D / math.log(2), bytes_D)
  nats_per_token, nats_stderr = metrics.ratio_and_stderr(nats_D, tokens_D)
  perplexity = math.exp(min(nats_per_token, 50.0))
  records = [{'index': d, **({'id': doc['id']} if 'id' in doc else {}),
              'loglikelihood': -float(nats_D[d]), 'tokens': int(tokens_D[d]),
              'bytes': int(bytes_D[d]),
              'bits_per_byte': float(nats_D[d] / math.log(2) / max(bytes_D[d], 1.0))}
             for d, doc in enumerate(documents)]
  results = {'bits_per_byte': bits, 'bits_per_byte_stderr': bits_stderr,
             'perplexity': perplexity, 'perplexity_stderr': perplexity * nats_stderr,
             'examples': count, 'tokens': int(tokens_D.sum()), 'bytes': int(bytes_D.sum()),
             'overlap': overlap}
  return results, records


_RUNNERS = {'multiple_choice': multiple_choice, 'generation': generation, 'rolling': rolling}


def evaluate(lm: Task, params, tokenizer: Tokenizer, eval_tasks: list[EvalTask],
             settings: Settings, out_dir: str | None = None) -> dict[str, dict]:
  """{task name: its metrics}; with `out_dir`, each task's per-example scores are written
  to out_dir/<task>.jsonl."""
  settings.check()
  for task in eval_tasks:  # fail before any scoring
    fewshot.check_shots(task, settings.num_shots)
  results = {}
  for task in eval_tasks:
    results[task.name], records = _RUNNERS[task.kind](lm, params, tokenizer, task, settings)
    if task.kind != 'rolling':
      results[task.name]['shots'] = settings.num_shots
    if out_dir and jax.process_index() == 0:
      os.makedirs(out_dir, exist_ok=True)
      with open(os.path.join(out_dir, f'{task.name}.jsonl'), 'w') as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + '\n' for r in records)
  return results


def run(config, workdir: str, specs: list[str], settings: Settings) -> dict:
  """`--mode=eval --tasks=...`: the latest checkpoint of `workdir` on each task."""
  from inference.load import load_run
  from train import checkpointing
  settings.check()
  eval_tasks = load_all(specs)
  for task in eval_tasks:
    fewshot.check_shots(task, settings.num_shots)
  lm, params, tokenizer = load_run(config, workdir)
  manager = checkpointing.make_manager(workdir, config.train.keep_checkpoints)
  step = manager.latest_step()
  manager.close()
  results = evaluate(lm, params, tokenizer, eval_tasks, settings,
                     os.path.join(workdir, 'eval'))
  # A standard error of one example is undefined: null in JSON (NaN is not JSON).
  results = {name: {k: None if isinstance(v, float) and math.isnan(v) else v
                    for k, v in values.items()} for name, values in results.items()}
  return {'step': step, 'num_shots': settings.num_shots, 'tasks': results}
