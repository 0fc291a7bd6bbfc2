"""Faulty corpus files: each reads as input_pipeline/corpora.py's docstring says, or fails
with one line naming the file (and the line number, for .jsonl); reading never changes a
file (bytes and mtimes are compared before and after every read)."""
import contextlib
import json
import logging
import os
import tracemalloc

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from input_pipeline import corpora

_OLD_MTIME_NS = 1_600_000_000_123_456_789  # set on every file, so a rewrite cannot go unseen


def _write(path, data) -> str:
  if isinstance(data, pa.Table):
    pq.write_table(data, path)
  else:
    path.write_bytes(data.encode() if isinstance(data, str) else data)
  os.utime(path, ns=(_OLD_MTIME_NS, _OLD_MTIME_NS))
  return str(path)


def _snapshot(directory) -> dict:
  return {str(p): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(directory.rglob('*'))
          if p.is_file()}


@contextlib.contextmanager
def _untouched(directory):
  """Asserts that what runs inside changes, adds and removes no file under `directory`."""
  before = _snapshot(directory)
  yield
  assert _snapshot(directory) == before, 'reading the corpus changed its files'


def _fails_on_one_line(spec: str, *parts: str, text_field: str = 'text') -> str:
  with pytest.raises(ValueError) as error:
    corpora.load_documents(spec, text_field)
  message = str(error.value)
  assert '\n' not in message, message
  for part in parts:
    assert part in message, (part, message)
  return message


def _warnings(caplog) -> list[str]:
  return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_non_utf8_bytes_read_as_replacement_characters_and_a_warning_names_the_file(
    tmp_path, caplog):
  txt = _write(tmp_path / 'latin1.txt', b'caf\xe9 au lait\n\xff\xfe end')
  jsonl = _write(tmp_path / 'mixed.jsonl',
                 b'{"text": "fine"}\n{"text": "na\xefve"}\n{"text": "lone \\udc80 escape"}\n')
  good = _write(tmp_path / 'good.txt', 'caf\u00e9 is fine \U0001f600')
  with _untouched(tmp_path), caplog.at_level(logging.WARNING):
    assert corpora.load_documents(txt) == ['caf\ufffd au lait\n\ufffd\ufffd end']
    assert _warnings(caplog) == [f'{txt}: 3 character(s) are not valid UTF-8; they read as '
                                 'U+FFFD. Re-encode the file as UTF-8 to keep them.']
    caplog.clear()
    docs = corpora.load_documents(jsonl)
    assert docs == ['fine', 'na\ufffdve', 'lone \ufffd escape']
    [warning] = _warnings(caplog)
    assert warning.startswith(f'{jsonl}: 2 character(s) on 2 line(s) (2, 3) are not valid UTF-8')
    caplog.clear()
    assert corpora.load_documents(good) == ['caf\u00e9 is fine \U0001f600']
    assert _warnings(caplog) == []  # valid UTF-8, astral characters included, is left alone
  for doc in docs:
    doc.encode('utf-8')  # the tokenizer can encode every document (lone surrogates cannot)


def test_empty_files_contribute_nothing_and_an_empty_corpus_fails_naming_it(tmp_path):
  _write(tmp_path / 'empty.txt', b'')
  _write(tmp_path / 'empty.jsonl', b'')
  _write(tmp_path / 'empty.parquet', b'')  # 0 bytes: not even a parquet footer
  _write(tmp_path / 'blank.txt', ' \n\t\n')
  _write(tmp_path / 'blank.jsonl', '\n  \n{"text": "   "}\n{"text": null}\n')
  _write(tmp_path / 'no_rows.parquet', pa.table({'text': pa.array([], pa.string())}))
  with _untouched(tmp_path):
    _fails_on_one_line(str(tmp_path), f"corpus '{tmp_path}' is empty",
                       'its 6 file(s) have no non-blank documents', 'data.corpus')
    _fails_on_one_line(str(tmp_path / 'empty.parquet'), f"corpus '{tmp_path}/empty.parquet'",
                       'is empty')
    _fails_on_one_line(str(tmp_path / '*.jsonl'), f"corpus '{tmp_path}/*.jsonl' is empty")
  _write(tmp_path / 'text.txt', 'the only document')
  with _untouched(tmp_path):
    assert corpora.load_documents(str(tmp_path)) == ['the only document']


@pytest.mark.parametrize('kind', ['txt', 'jsonl'])
def test_a_50_mb_single_line_is_one_document_without_blowing_up_memory(tmp_path, kind):
  text = 'a ' * 25_000_000  # 50 MB, one line
  path = tmp_path / f'long.{kind}'
  if kind == 'txt':
    _write(path, text)
  else:
    _write(path, json.dumps({'text': text}) + '\n')
  del text
  with _untouched(tmp_path):
    tracemalloc.start()
    try:
      docs = corpora.load_documents(str(path))
      _, peak = tracemalloc.get_traced_memory()
    finally:
      tracemalloc.stop()
  assert len(docs) == 1 and len(docs[0]) == 50_000_000
  assert docs[0][:4] == 'a a ' and docs[0][-2:] == 'a '
  # The file's bytes and the decoded text, a few times over at most; never a copy per line
  # or per character.
  assert peak < 4 * 50_000_000, f'peak {peak / 1e6:.0f} MB reading a 50 MB file'


@pytest.mark.parametrize('line, message', [
    ('not json', 'is not valid JSON'),
    ('{"text": "cut short', 'is not valid JSON'),  # a writer killed mid-record
    ('{"body": "elsewhere"}', "has no 'text' field; set data.text_field"),
    ('["a", "list"]', "has no 'text' field"),
    ('"a bare string"', "has no 'text' field"),
    ('{"text": 3}', "'text' is a JSON int, not a string"),
    ('{"text": ["x", "y"]}', "'text' is a JSON list, not a string"),
    ('{"text": {"nested": "x"}}', "'text' is a JSON dict, not a string"),
])
def test_a_bad_jsonl_line_fails_naming_the_file_and_line(tmp_path, line, message):
  # Line 4 is bad: a blank line and a null text before it are skipped, yet counted.
  path = _write(tmp_path / 'records.jsonl', f'{{"text": "one"}}\n\n{{"text": null}}\n{line}\n'
                                           '{"text": "five"}\n')
  with _untouched(tmp_path):
    _fails_on_one_line(path, f'{path}:4', message)
  _write(tmp_path / 'records.jsonl', '{"text": "one"}\n\n{"text": null}\n{"text": "four"}\r\n')
  with _untouched(tmp_path):
    assert corpora.load_documents(path) == ['one', 'four']


def test_a_bad_parquet_file_fails_naming_the_file(tmp_path):
  no_text = _write(tmp_path / 'no_text.parquet', pa.table({'body': ['a', 'b'], 'id': [1, 2]}))
  numbers = _write(tmp_path / 'numbers.parquet', pa.table({'text': [1, 2]}))
  raw = _write(tmp_path / 'raw.parquet', pa.table({'text': pa.array([b'x'], pa.binary())}))
  garbage = _write(tmp_path / 'garbage.parquet', b'this is not a parquet file at all')
  pq.write_table(pa.table({'text': ['x' * 1000] * 100}), tmp_path / 'full.parquet')
  truncated = _write(tmp_path / 'truncated.parquet',
                     (tmp_path / 'full.parquet').read_bytes()[:2000])
  (tmp_path / 'full.parquet').unlink()
  with _untouched(tmp_path):
    _fails_on_one_line(no_text, no_text, "has no column 'text'", "columns: ['body', 'id']",
                       'set data.text_field')
    assert corpora.load_documents(no_text, 'body') == ['a', 'b']
    _fails_on_one_line(numbers, numbers, "column 'text' holds int64, not strings")
    _fails_on_one_line(raw, raw, "column 'text' holds binary, not strings")
    _fails_on_one_line(garbage, garbage, 'is not a readable parquet file')
    _fails_on_one_line(truncated, truncated, 'is not a readable parquet file')
    # In a directory, the first bad file stops the read and is the one named.
    _fails_on_one_line(str(tmp_path), garbage)
