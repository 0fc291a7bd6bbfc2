"""Evaluation tasks: the JSONL schema, and loading a task by name or path.

A task is a JSONL file, one example (a JSON object) per line, all of one kind:

  multiple choice  {"context": str, "choices": [str, ...], "gold": int}
      Each choice is scored by its log-likelihood as the continuation of the context,
      appended exactly as written (start it with the space or newline that separates it
      from the context). Choices are different, and none is blank. Metrics: acc (the most
      likely choice is the gold one) and acc_norm (the same with log-likelihood per UTF-8
      byte of the choice).
  generation       {"context": str, "target": str[, "until": [str, ...]]}
      The model continues the context (greedy, or beam search) and its text is cut at the
      first stop string ("until"; default ["\\n\\n"], the few-shot delimiter). Metrics:
      exact_match (after stripping whitespace) and chrF (sacrebleu, 0-100).
  rolling          {"text": str}
      Each text is one document, scored token by token in overlapping windows. Metrics:
      bits_per_byte and perplexity (per token, over all documents).

Any line may add "split": "train" (a demonstration for few-shot prompts, never scored; the
default is "eval") and an "id" (copied to the per-example output). A task without train
lines draws its demonstrations from its other examples. The kind follows from "choices"
(multiple choice), else "target" (generation), else "text" (rolling); other fields are
metadata and ignored (a "text" beside "context" and "choices", say), so a line with both
"choices" and "target" is the only ambiguous one.

`--tasks` also takes built-in names (evals/bible.py), `validation_split` (the run's own
validation token stream, scored as one stream: evals/harness.py) and text files (any path,
directory or glob that is not a .jsonl file): a rolling task with one document per file,
named after the path.
"""
import dataclasses
import json
import os
import re
from typing import Callable

from input_pipeline import corpora

KINDS = ('multiple_choice', 'generation', 'rolling')
DEFAULT_UNTIL = ('\n\n',)  # the few-shot delimiter (evals/fewshot.py)
VALIDATION_SPLIT = 'validation_split'  # --tasks entry: the run's validation token stream
# The field that makes an example of each kind, in the order they are looked for.
_KEY_FIELD = {'choices': 'multiple_choice', 'target': 'generation', 'text': 'rolling'}
_SCHEMA = ('{"context", "choices", "gold"} (multiple choice), {"context", "target"'
           '[, "until"]} (generation) or {"text"} (rolling)')


class TaskError(ValueError):
  """A task name or file that cannot be evaluated, with what to change."""


@dataclasses.dataclass(frozen=True)
class EvalTask:
  name: str
  kind: str  # one of KINDS
  examples: tuple[dict, ...]  # scored, in order (--limit takes the first ones)
  train: tuple[dict, ...] = ()  # demonstrations; empty: drawn from the other examples
  sources: tuple[str, ...] = ()  # the files it was read from (results never overwrite them)


def _problem(kind: str, example: dict) -> str | None:
  """What is wrong with one example of `kind`, or None."""
  if example.get('split', 'eval') not in ('train', 'eval'):
    return f'"split" is {example["split"]!r}; use "train" or "eval"'
  if kind == 'rolling':
    text = example.get('text')
    return None if isinstance(text, str) and text else '"text" must be a non-empty string'
  if not isinstance(example.get('context'), str):
    return '"context" must be a string'
  if kind == 'generation':
    until = example.get('until', list(DEFAULT_UNTIL))
    if not isinstance(example.get('target'), str):
      return '"target" must be a string'
    if not (isinstance(until, list) and all(isinstance(u, str) and u for u in until)):
      return '"until" must be a list of non-empty strings'
    return None
  choices, gold = example.get('choices'), example.get('gold')
  if not (isinstance(choices, list) and len(choices) >= 2
          and all(isinstance(c, str) and c.strip() for c in choices)):
    # A blank choice scores (nearly) nothing, so it would (nearly) always win.
    return '"choices" must be a list of at least two strings that are not blank'
  if len(set(choices)) < len(choices):
    repeated = next(c for c in choices if choices.count(c) > 1)
    return f'"choices" lists {repeated!r} twice; list each choice once'
  if not (isinstance(gold, int) and not isinstance(gold, bool) and 0 <= gold < len(choices)):
    return f'"gold" must be the index of the right choice, an integer in [0, {len(choices)})'
  return None


def from_examples(name: str, lines: list[dict], where: str = '') -> EvalTask:
  """The task of parsed examples (`where`: the file, for messages), checked one by one."""
  if not lines:
    raise TaskError(f'Task {name!r} has no examples; add JSON lines to {where or "it"}.')
  kind = None
  for number, example in enumerate(lines, 1):
    at = f'{where}:{number}' if where else f'{name} example {number}'
    if not isinstance(example, dict):
      raise TaskError(f'{at}: an example must be a JSON object: {_SCHEMA}.')
    if 'choices' in example and 'target' in example:
      raise TaskError(f'{at}: an example with both "choices" and "target" is ambiguous; use '
                      f'{_SCHEMA}.')
    this_kind = next((k for field, k in _KEY_FIELD.items() if field in example), None)
    if this_kind is None:
      raise TaskError(f'{at}: cannot tell the kind of example from its fields '
                      f'{sorted(example)}; use {_SCHEMA}.')
    if kind not in (None, this_kind):
      raise TaskError(f'{at}: a {this_kind} example in a {kind} task; one file holds one kind.')
    kind = this_kind
    if problem := _problem(kind, example):
      raise TaskError(f'{at}: {problem}.')
  train = tuple(e for e in lines if e.get('split') == 'train')
  examples = tuple(e for e in lines if e.get('split', 'eval') == 'eval')
  if not examples:
    raise TaskError(f'Task {name!r} has only "split": "train" lines; add examples to score.')
  return EvalTask(name, kind, examples, train)


def _name(path: str) -> str:
  base = os.path.basename(path.rstrip('/'))
  base = re.sub(r'\.\w+$', '', base)
  return re.sub(r'[^\w.-]+', '_', base).strip('_') or 'texts'


def _read_jsonl(path: str) -> EvalTask:
  lines = []
  with open(path, encoding='utf-8') as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        lines.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise TaskError(f'{path}:{number}: not valid JSON ({e.msg}); each line must be one '
                        f'example, {_SCHEMA}.') from None
  return dataclasses.replace(from_examples(_name(path), lines, path), sources=(path,))


def _read_texts(spec: str, paths: list[str]) -> EvalTask:
  docs = []
  for path in paths:
    try:
      with open(path, encoding='utf-8') as f:
        text = f.read()
    except UnicodeDecodeError:
      raise TaskError(f'{path} is not UTF-8 text; point --tasks at text files.') from None
    if text.strip():
      docs.append({'text': text, 'id': path})
  if not docs:
    raise TaskError(f'The text files of {spec!r} are empty; point --tasks at files with text.')
  return EvalTask(_name(spec), 'rolling', tuple(docs), sources=tuple(paths))


def load(spec: str, validation: Callable[[], EvalTask] | None = None) -> EvalTask:
  """The task a --tasks entry names: a built-in, the run's validation split (made by
  `validation`, which only a run can give), a JSONL file, or .txt files."""
  from evals import bible  # the built-ins read the embedded Bible only when asked for
  if spec in bible.BUILT_IN:
    return bible.load(spec)
  if spec == VALIDATION_SPLIT:
    if validation is None:
      raise TaskError(f'{VALIDATION_SPLIT} is a run\'s own validation split; evaluate it with '
                      '--mode=eval --workdir=DIR.')
    return validation()
  if spec.endswith('.jsonl'):
    if not os.path.isfile(spec):
      raise TaskError(f'Task file {spec} does not exist; check the path given to --tasks.')
    return _read_jsonl(spec)
  if texts := corpora.matching_files(spec):
    return _read_texts(spec, texts)
  raise TaskError(f'Unknown task {spec!r}: use a built-in ({", ".join(bible.BUILT_IN)}), '
                  f'{VALIDATION_SPLIT}, a JSONL file of examples (README, "Evaluation") or text '
                  'files (a path, directory or glob).')


def load_all(specs: list[str],
             validation: Callable[[], EvalTask] | None = None) -> list[EvalTask]:
  """The tasks of --tasks, each once."""
  loaded = [load(spec, validation) for spec in specs]
  names = [t.name for t in loaded]
  if repeated := sorted({n for n in names if names.count(n) > 1}):
    raise TaskError(f'--tasks names {", ".join(repeated)} more than once (tasks are named '
                    'after their files); list each task once.')
  return loaded
