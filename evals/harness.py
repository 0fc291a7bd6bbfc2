"""Runs evaluation tasks (evals/tasks.py) on a model and reports each metric with its
standard error and the number of examples; the per-example scores go to
DIR/eval/<task>.<K>shot.jsonl, after a header record of the settings that made them.
Results never overwrite a task's input, nor any file the harness did not write.

The model is the run's task (`lm` here, tasks/): it turns (context, continuation) ids
into rows it scores (a decoder's continuation log-likelihood, an encoder-decoder's
log-likelihood of the target and the token that closes it given the input, an encoder's
pseudo-log-likelihood), and decodes for generation tasks, stopping at its
`generation_stop_ids`. Nothing here asks which family it is. Every family, fine-tuned
(chat) runs included, reads the task's raw text; the chat template is never applied.

A pair is split into ids as lm-evaluation-harness splits it (`continuation_pair`): the
context's trailing whitespace moves onto the continuation, whose ids are those that
encoding the whole text adds after the context's, never the continuation encoded alone
(a sentencepiece tokenizer with a dummy prefix, Llama's, would start it with a '▁' that it
never has after text).

The context is as long as the model was trained on, min(data.seq_len, model.max_len),
unless --max_length says otherwise (`for_run`). Scoring runs on one process.
"""
import dataclasses
import functools
import json
import math
import os

import jax
import numpy as np

from evals import fewshot, metrics, scoring
from evals.progress import Progress
from evals.tasks import DEFAULT_UNTIL, VALIDATION_SPLIT, EvalTask, TaskError, load_all
from input_pipeline.tokenizer import Tokenizer
from tasks.base import Task


@dataclasses.dataclass(frozen=True)
class Settings:
  num_shots: int = 0
  limit: int = 0  # score the first `limit` examples of each task (0: all)
  batch_size: int = 32  # rows (or prompts) per compiled call
  seed: int = 1234  # draws the few-shot demonstrations
  # Context length. 0: the trained length, min(data.seq_len, model.max_len), once `for_run`
  # has read the run's config; evaluate() given 0 uses model.max_len.
  max_length: int = 0
  overlap: int = 0  # rolling: tokens consecutive windows share (0: half the context)
  beam_size: int = 0  # generation: 0 greedy, else beam search
  max_new_tokens: int = 0  # generation: 0 from the longest target (2x + 8, <= half the context)

  def check(self) -> None:
    for name in ('limit', 'seed', 'max_length', 'overlap', 'beam_size', 'max_new_tokens'):
      if getattr(self, name) < 0:
        raise TaskError(f'--{_FLAG.get(name, name)}={getattr(self, name)} must be 0 or more.')
    if self.batch_size < 1:
      raise TaskError(f'--eval_batch_size={self.batch_size} must be at least 1.')


_FLAG = {'seed': 'fewshot_seed', 'overlap': 'rolling_overlap', 'beam_size': 'eval_beam_size',
         'max_new_tokens': 'eval_max_new_tokens'}


def for_run(settings: Settings, config, lm: Task) -> Settings:
  """`settings` with the context the run trained (min(data.seq_len, model.max_len)) where
  --max_length is 0: positions past data.seq_len were never trained (a fine-tuned run's
  data.seq_len is its own, an imported one's its context up to 512)."""
  if settings.max_length:
    return settings
  return dataclasses.replace(settings, max_length=min(config.data.seq_len, lm.cfg.max_len))


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


def continuation_pair(tokenizer: Tokenizer, context: str,
                      continuation: str) -> tuple[list[int], list[int], bool]:
  """(context ids, continuation ids, whether they were split where the encodings agree):
  the context's trailing whitespace moved onto the continuation, whose ids are what
  encoding the whole text adds after the context's ids. Where the whole text's ids do not
  start with the context's (a token spans the boundary), the pair is split where the two
  encodings part: the ids scored are still the whole text's, and the continuation takes
  the context's last characters with it."""
  stripped = context.rstrip()
  continuation = context[len(stripped):] + continuation
  context_ids = tokenizer.encode(stripped)
  whole = tokenizer.encode(stripped + continuation)
  if whole[:len(context_ids)] == context_ids:
    return context_ids, whole[len(context_ids):], False
  agree = next((i for i, (a, b) in enumerate(zip(whole, context_ids)) if a != b), len(whole))
  return whole[:agree], whole[agree:], True


def _no_tokens(task: EvalTask, index: int, choice: str) -> TaskError:
  return TaskError(f"Task '{task.name}' example {index}: the choice {choice!r} is no tokens "
                   "for this run's tokenizer (its normalizer drops it), so it would score "
                   'log-likelihood 0 and always win; change the choice.')


def multiple_choice(lm: Task, params, tokenizer: Tokenizer, task: EvalTask,
                    settings: Settings) -> tuple[dict, list[dict]]:
  """acc and acc_norm: every choice of every example scored as the context's continuation."""
  length = _length(lm, settings)
  examples = task.examples[:settings.limit or None]
  rooms = []
  for i, example in enumerate(examples):  # sized on the example's own context
    lengths = []
    for choice in example['choices']:
      lengths.append(len(continuation_pair(tokenizer, example['context'], choice)[1]))
      if not lengths[-1]:
        raise _no_tokens(task, i, choice)
    rooms.append(min(lm.context_room(tokenizer, n, length) for n in lengths))
    _fits(task, rooms[-1], f'example {i} (a choice of {max(lengths)} tokens)', length)
  prompts, cut = _prompts(tokenizer, task, rooms, settings)
  rows, pair_of_row, pairs, split_inside = [], [], 0, 0
  for i, (prompt, example) in enumerate(zip(prompts, examples)):
    cut_here = False
    for choice in example['choices']:
      context, continuation, parted = continuation_pair(tokenizer, prompt.text, choice)
      if not continuation:
        raise _no_tokens(task, i, choice)
      room = lm.context_room(tokenizer, len(continuation), length)
      _fits(task, room, f'example {i} (a choice of {len(continuation)} tokens)', length)
      if len(context) > room:  # the few-shot prompt moved the boundary: keep its end
        context, cut_here = context[len(context) - room:], True
      split_inside += parted
      made = lm.scoring_rows(tokenizer, context, continuation)
      rows += made
      pair_of_row += [pairs] * len(made)
      pairs += 1
    cut['truncated'] += cut_here and not prompt.truncated
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
             'examples': len(records), **cut, 'split_inside_a_token': split_inside}
  return results, records


def generation(lm: Task, params, tokenizer: Tokenizer, task: EvalTask,
               settings: Settings) -> tuple[dict, list[dict]]:
  """exact_match and chrF of what the model writes after each context."""
  length = _length(lm, settings)
  examples = task.examples[:settings.limit or None]
  target_lengths = [len(continuation_pair(tokenizer, e['context'], e['target'])[1])
                    for e in examples]
  max_new = settings.max_new_tokens or min(2 * max(target_lengths) + 8, length // 2)
  room = lm.context_room(tokenizer, max_new + 1, length)
  _fits(task, room, f'generating {max_new} tokens', length)
  prompts, cut = _prompts(tokenizer, task, [room] * len(examples), settings)
  prompt_ids = [lm.generation_prompt(tokenizer, p.ids) for p in prompts]
  stops = lm.generation_stop_ids(tokenizer)
  progress = Progress(task.name, len(prompt_ids), 'prompts')
  new_ids = scoring.generate(lm, params, tokenizer, prompt_ids, max_new, settings.beam_size,
                             settings.batch_size, stops, progress)
  progress.close()
  records = []
  for i, (example, prompt, ids, new) in enumerate(zip(examples, prompts, prompt_ids, new_ids)):
    output = lm.generated_text(tokenizer, ids, [t for t in new if t not in stops])
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
  # A target of more tokens than the model may write can never match exactly.
  results = {**metrics.with_stderr('exact_match', exact), **metrics.with_stderr('chrf', chrf),
             'examples': len(records), 'max_new_tokens': max_new,
             'targets_over_max_new_tokens': sum(n > max_new for n in target_lengths), **cut}
  return results, records


def _rolling_units(lm: Task, tokenizer: Tokenizer, task: EvalTask, length: int, overlap: int):
  """(record fields, rows) of each unit a rolling task scores: a text document, or a
  window of a token stream (the validation split, one stream: `stream_rows`)."""
  for d, document in enumerate(task.examples):
    named = {'id': document['id']} if 'id' in document else {}
    if 'tokens' in document:
      for w, row in enumerate(lm.stream_rows(tokenizer, document['tokens'], length, overlap)):
        yield {**named, 'window': w}, [row]
    else:
      yield named, lm.rolling_rows(tokenizer, tokenizer.encode(document['text']), length,
                                   overlap)


def rolling(lm: Task, params, tokenizer: Tokenizer, task: EvalTask,
            settings: Settings) -> tuple[dict, list[dict]]:
  """Bits per byte and perplexity of each document, every token scored once in windows of
  the context that share `overlap` tokens (tasks/causal_lm.py `rolling_windows`). The
  standard errors treat documents (a stream's windows) as the independent units."""
  length = _length(lm, settings)
  overlap = settings.overlap or max(1, length // 2)
  if overlap > length:
    raise TaskError(f'--rolling_overlap={overlap} is longer than the {length}-token windows; '
                    'lower it.')
  rows, unit_of_row, units = [], [], []
  for fields, made in _rolling_units(lm, tokenizer, task, length, overlap):
    if settings.limit and len(units) == settings.limit:
      break
    rows += made
    unit_of_row += [len(units)] * len(made)
    units.append(fields)
  progress = Progress(task.name, len(rows), 'windows')
  scores_R = scoring.loglikelihoods(lm, params, rows, settings.batch_size, length, progress)
  progress.close()
  bytes_per_token = np.asarray(tokenizer.bytes_per_token, np.float64)
  tokens_R = [float(np.sum(r['weights'])) for r in rows]
  bytes_R = [float(np.sum(bytes_per_token[r['targets']] * r['weights'])) for r in rows]
  count = len(units)
  nats_U = -np.bincount(unit_of_row, weights=scores_R, minlength=count)
  tokens_U = np.bincount(unit_of_row, weights=tokens_R, minlength=count)
  bytes_U = np.bincount(unit_of_row, weights=bytes_R, minlength=count)
  bits, bits_stderr = metrics.ratio_and_stderr(nats_U / math.log(2), bytes_U)
  nats_per_token, nats_stderr = metrics.ratio_and_stderr(nats_U, tokens_U)
  perplexity = math.exp(min(nats_per_token, 50.0))
  records = [{'index': u, **fields, 'loglikelihood': -float(nats_U[u]),
              'tokens': int(tokens_U[u]), 'bytes': int(bytes_U[u]),
              'bits_per_byte': float(nats_U[u] / math.log(2) / max(bytes_U[u], 1.0))}
             for u, fields in enumerate(units)]
  results = {'bits_per_byte': bits, 'bits_per_byte_stderr': bits_stderr,
             'perplexity': perplexity, 'perplexity_stderr': perplexity * nats_stderr,
             'examples': count, 'tokens': int(tokens_U.sum()), 'bytes': int(bytes_U.sum()),
             'overlap': overlap}
  return results, records


_RUNNERS = {'multiple_choice': multiple_choice, 'generation': generation, 'rolling': rolling}


def output_path(out_dir: str, task: EvalTask, settings: Settings) -> str:
  """out_dir/<task>.<K>shot.jsonl: K the demonstrations shown (0 for a rolling task)."""
  shots = 0 if task.kind == 'rolling' else settings.num_shots
  return os.path.join(out_dir, f'{task.name}.{shots}shot.jsonl')


def _written_by_harness(path: str, task: EvalTask) -> bool:
  """Whether `path` starts with the header record `evaluate` writes for `task`."""
  try:
    with open(path, encoding='utf-8') as f:
      header = json.loads(f.readline())
  except (OSError, ValueError):
    return False
  return isinstance(header, dict) and header.get('header') is True and (
      header.get('task') == task.name)


def check_outputs(eval_tasks: list[EvalTask], settings: Settings, out_dir: str) -> None:
  """Refuses (one line) to write results over a task's input, or over any file that is
  not the harness's own earlier results for that task (it replaces those)."""
  inputs = {os.path.realpath(path) for task in eval_tasks for path in task.sources}
  for task in eval_tasks:
    path = output_path(out_dir, task, settings)
    if os.path.realpath(path) in inputs:
      raise TaskError(f"Task '{task.name}': its results would overwrite the input file {path}; "
                      f'move the task file out of {out_dir}.')
    if os.path.lexists(path) and not _written_by_harness(path, task):
      raise TaskError(f'{path} exists and is not results the harness wrote; move it (results '
                      'never overwrite other files).')


def _write(path: str, header: dict, records: list[dict]) -> None:
  """The header record, then the records, replacing `path` whole."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  partial = f'{path}.tmp{os.getpid()}'
  with open(partial, 'w', encoding='utf-8') as f:
    f.writelines(json.dumps(r, ensure_ascii=False) + '\n' for r in [header, *records])
  os.replace(partial, path)


def evaluate(lm: Task, params, tokenizer: Tokenizer, eval_tasks: list[EvalTask],
             settings: Settings, out_dir: str | None = None,
             step: int | None = None) -> dict[str, dict]:
  """{task name: its metrics}; with `out_dir`, each task's per-example scores are written
  to `output_path` after a header record of the settings (and the checkpoint's `step`)."""
  settings.check()
  for task in eval_tasks:  # fail before any scoring
    fewshot.check_shots(task, settings.num_shots)
  if out_dir:
    check_outputs(eval_tasks, settings, out_dir)
  results = {}
  for task in eval_tasks:
    results[task.name], records = _RUNNERS[task.kind](lm, params, tokenizer, task, settings)
    if task.kind != 'rolling':
      results[task.name]['shots'] = settings.num_shots
    if out_dir and jax.process_index() == 0:
      made = results[task.name]
      header = {'header': True, 'task': task.name, 'kind': task.kind, 'step': step,
                'num_shots': made.get('shots', 0), 'seed': settings.seed,
                'limit': settings.limit, 'max_length': _length(lm, settings),
                'batch_size': settings.batch_size}
      if task.kind == 'generation':
        header.update(beam_size=settings.beam_size, max_new_tokens=made['max_new_tokens'])
      if task.kind == 'rolling':
        header.update(overlap=made['overlap'])
      _write(output_path(out_dir, task, settings), header, records)
  return results


def _validation_split(config, workdir: str) -> EvalTask:
  """The tokens the eval pass scores, one rolling stream: the run's validation split as
  its token cache holds it (documents, each ending in eos), cut as the eval pass cuts it
  to whole windows of data.seq_len + 1 tokens sharing one, at most train.eval_steps
  batches of them. With --rolling_overlap=1 and the trained length these are the eval
  pass's own windows."""
  import input_pipeline
  import tasks
  if tasks.task_class(config).record_kind:
    raise TaskError(f"{VALIDATION_SPLIT}: this run's task '{config.task}' trains on records, "
                    'not a token stream; its validation loss is --mode=eval without --tasks.')
  d = config.data
  stream = input_pipeline.load_corpus(config, workdir).splits['eval']
  windows = min((len(stream) - 1) // d.seq_len, config.train.eval_steps * d.batch_size)
  if windows < 1:
    raise TaskError(f'{VALIDATION_SPLIT}: the validation split has {len(stream)} tokens, less '
                    f'than one window of data.seq_len + 1 = {d.seq_len + 1}.')
  return EvalTask(VALIDATION_SPLIT, 'rolling',
                  ({'tokens': np.asarray(stream[:1 + windows * d.seq_len]),
                    'id': VALIDATION_SPLIT},))


def run(config, workdir: str, specs: list[str], settings: Settings) -> dict:
  """`--mode=eval --tasks=...`: the latest checkpoint of `workdir` on each task."""
  from inference.load import load_run
  from train import checkpointing
  if jax.process_count() > 1:
    raise TaskError(f'--mode=eval --tasks scores on one process, not {jax.process_count()}; '
                    'run it as a single process (no --num_processes).')
  settings.check()
  eval_tasks = load_all(specs, functools.partial(_validation_split, config, workdir))
  for task in eval_tasks:
    fewshot.check_shots(task, settings.num_shots)
  out_dir = os.path.join(workdir, 'eval')
  check_outputs(eval_tasks, settings, out_dir)
  lm, params, tokenizer = load_run(config, workdir)
  settings = for_run(settings, config, lm)
  manager = checkpointing.make_manager(workdir, config.train.keep_checkpoints)
  step = manager.latest_step()
  manager.close()
  results = evaluate(lm, params, tokenizer, eval_tasks, settings, out_dir, step)
  # A standard error of one example is undefined: null in JSON (NaN is not JSON).
  results = {name: {k: None if isinstance(v, float) and math.isnan(v) else v
                    for k, v in values.items()} for name, values in results.items()}
  return {'step': step, 'num_shots': settings.num_shots,
          'max_length': _length(lm, settings), 'tasks': results}
