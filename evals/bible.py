"""Built-in evaluation tasks from the embedded Bible. Examples come from the held-out
chapters every fine-tuning task holds out (input_pipeline/bible_tasks.py: web_bible's
pre-training eval split, less verses whose text also occurs in a training chapter), and
few-shot demonstrations from the training chapters.

  bible_cloze  multiple choice: a verse, then the true next verse of its chapter among four
               (it and three other verses of the same book and split, all different texts).
               A choice follows the verse after '\\n', as verses follow each other in
               web_bible's chapter documents.
  bible_book   multiple choice: 'Verse: <text>\\nBook:', then ' <book>' among four (the true
               book and three others of the 66).
  bible_genre  multiple choice: 'Verse: <text>\\nGenre:', then ' <genre>' among the eight
               genres of the books (Law, History, ... Apocalyptic).
  bible_en_ja  generation: 'English: <text>\\nJapanese:' continued until '\\n' and compared
               with ' <the Kougo verse>': exact match and chrF.

Distractors and the gold choice's place come from generators of fixed seeds, and the
examples are listed in a fixed random order, so --limit=N takes a sample across the Bible.
"""
import functools

import numpy as np

from evals.tasks import EvalTask
from input_pipeline import bible_tasks

BUILT_IN = ('bible_cloze', 'bible_book', 'bible_genre', 'bible_en_ja')
_SEED = 16
_DISTRACTORS = 3


def _draw_others(rng: np.random.Generator, pool: list[str], exclude: set[str],
                 count: int) -> list[str] | None:
  """`count` different texts of `pool` outside `exclude`, or None if it has too few."""
  picked = []
  for j in rng.permutation(len(pool)):
    if pool[j] not in exclude and pool[j] not in picked:
      picked.append(pool[j])
      if len(picked) == count:
        return picked
  return None


def _with_gold_placed(rng: np.random.Generator, context: str, gold: str, others: list[str],
                      ref: str) -> dict:
  """A multiple-choice example with the gold choice at a random place among the others."""
  place = int(rng.integers(len(others) + 1))
  choices = others[:place] + [gold] + others[place:]
  return {'context': context, 'choices': choices, 'gold': place, 'id': ref}


def _cloze(verses: list[dict], rng: np.random.Generator) -> list[dict]:
  by_book: dict[str, list[str]] = {}
  for v in verses:
    by_book.setdefault(v['book'], []).append(v['text'])
  examples = []
  for v, after in zip(verses, verses[1:]):
    if (after['book'], after['chapter'], after['verse']) != (v['book'], v['chapter'],
                                                             v['verse'] + 1):
      continue  # the next verse is not in this split (or starts another chapter)
    others = _draw_others(rng, by_book[v['book']], {v['text'], after['text']}, _DISTRACTORS)
    if others:
      examples.append(_with_gold_placed(rng, v['text'], '\n' + after['text'],
                                        ['\n' + t for t in others], v['ref']))
  return examples


def _book(verses: list[dict], rng: np.random.Generator, books: list[str]) -> list[dict]:
  return [_with_gold_placed(rng, f"Verse: {v['text']}\nBook:", ' ' + v['book'],
                            [' ' + b for b in _draw_others(rng, books, {v['book']},
                                                           _DISTRACTORS)], v['ref'])
          for v in verses]


def _genre(verses: list[dict], genres: list[str]) -> list[dict]:
  return [{'context': f"Verse: {v['text']}\nGenre:", 'choices': [' ' + g for g in genres],
           'gold': genres.index(v['label']), 'id': v['ref']} for v in verses]


def _en_ja(pairs: list[dict]) -> list[dict]:
  return [{'context': f"English: {p['input']}\nJapanese:", 'target': ' ' + p['target'],
           'until': ['\n'], 'id': p['ref']} for p in pairs]


@functools.lru_cache(maxsize=None)
def load(name: str) -> EvalTask:
  """Built-in task `name` (one of BUILT_IN), made once per process."""
  if name not in BUILT_IN:
    raise ValueError(f"'{name}' is not a built-in evaluation task; use one of {BUILT_IN}.")
  source = bible_tasks.splits('bible_en_ja' if name == 'bible_en_ja' else 'bible_genre')
  every = source['train'] + source['eval']
  books = list(dict.fromkeys(r['book'] for r in every))
  genres = list(dict.fromkeys(r['label'] for r in every if 'label' in r))
  made = {}
  for s, split in enumerate(bible_tasks.SPLITS):
    rng = np.random.default_rng([_SEED, BUILT_IN.index(name), s])
    if name == 'bible_cloze':
      made[split] = _cloze(source[split], rng)
    elif name == 'bible_book':
      made[split] = _book(source[split], rng, books)
    elif name == 'bible_genre':
      made[split] = _genre(source[split], genres)
    else:
      made[split] = _en_ja(source[split])
  order = np.random.default_rng([_SEED, BUILT_IN.index(name)]).permutation(len(made['eval']))
  kind = 'generation' if name == 'bible_en_ja' else 'multiple_choice'
  return EvalTask(name, kind, tuple(made['eval'][i] for i in order), tuple(made['train']))
