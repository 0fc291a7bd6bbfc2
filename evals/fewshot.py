"""Few-shot prompts: K demonstrations, then the example's context.

Each example's demonstrations are drawn from the task's train split (from its other
examples where it has none) by a generator seeded with (seed, the example's index), never
the example itself nor a copy of its context. They depend on the task, the seed and the
example's place only, so every model is shown the same ones and results compare.

A demonstration is its context followed by its answer (the gold choice, or the target);
the demonstrations and the example's context are joined by DELIMITER, a blank line:

    <context 1><answer 1>\\n\\n<context 2><answer 2>\\n\\n<context>

A prompt longer than the model's room drops its first demonstrations, one at a time; with
none left, the context keeps its last tokens (and counts as truncated).
"""
import dataclasses

import numpy as np

from evals.tasks import EvalTask, TaskError
from input_pipeline.tokenizer import Tokenizer

DELIMITER = '\n\n'


@dataclasses.dataclass(frozen=True)
class Prompt:
  text: str
  ids: list[int]
  shots: int  # demonstrations it kept
  truncated: bool  # the context itself lost its first tokens


def demonstration(task: EvalTask, example: dict) -> str:
  answer = (example['choices'][example['gold']] if task.kind == 'multiple_choice'
            else example['target'])
  return example['context'] + answer


def check_shots(task: EvalTask, num_shots: int) -> None:
  """One line when the task cannot give `num_shots` demonstrations per example."""
  if num_shots < 0:
    raise TaskError(f'--num_shots={num_shots} must be 0 or more.')
  if not num_shots or task.kind == 'rolling':
    return
  available = len(task.train) if task.train else len(task.examples) - 1
  if num_shots > available:
    where = 'train examples' if task.train else 'other examples (it has no train split)'
    raise TaskError(f"--num_shots={num_shots} but task '{task.name}' has {available} {where} "
                    'to draw demonstrations from; lower --num_shots or add "split": "train" '
                    'lines.')


def draw(task: EvalTask, index: int, num_shots: int, seed: int) -> list[dict]:
  """The demonstrations of example `index`, in prompt order."""
  if not num_shots:
    return []
  pool = task.train or task.examples
  context = task.examples[index]['context']
  picked = []
  for j in np.random.default_rng([seed, index]).permutation(len(pool)):
    if (pool is task.examples and j == index) or pool[j]['context'] == context:
      continue
    picked.append(pool[j])
    if len(picked) == num_shots:
      return picked
  raise TaskError(f"Task '{task.name}' has only {len(picked)} demonstrations for example "
                  f'{index} (the others repeat its context); lower --num_shots.')


def build(task: EvalTask, index: int, num_shots: int, seed: int, tokenizer: Tokenizer,
          room: int) -> Prompt:
  """Example `index`'s prompt, at most `room` tokens."""
  demos = [demonstration(task, d) for d in draw(task, index, num_shots, seed)]
  context = task.examples[index]['context']
  for shots in range(len(demos), -1, -1):
    text = DELIMITER.join(demos[len(demos) - shots:] + [context])
    ids = tokenizer.encode(text)
    if len(ids) <= room:
      return Prompt(text, ids, shots, False)
  return Prompt(tokenizer.decode(ids[len(ids) - room:]), ids[len(ids) - room:], 0, True)
