"""Input pipeline: tokenizer, corpora, token cache, packing, iterator state."""
import json
import os

import numpy as np
import pytest

import input_pipeline
from input_pipeline import corpora, token_cache, tokenizer as tokenizer_lib
from input_pipeline.pipeline import eval_batches, pack_windows, train_iterator

from conftest import write_tiny_corpus


@pytest.fixture(scope='module')
def tokenizer(tmp_path_factory):
  docs = corpora.load_documents(write_tiny_corpus(tmp_path_factory.mktemp('c') / 'c.jsonl'))
  path = tokenizer_lib.train_tokenizer(docs, str(tmp_path_factory.mktemp('t') / 'tok'), 512)
  return tokenizer_lib.Tokenizer(path)


def test_round_trip_of_unseen_non_ascii_text(tokenizer):
  text = 'Grüße, señor!  Ça va?\n\t中文 ß 🙂 naïve — "quotes"\n'
  ids = tokenizer.encode(text)
  assert tokenizer.decode(ids) == text
  assert int(tokenizer.bytes_per_token[ids].sum()) == len(text.encode('utf-8'))


def test_special_ids_are_fixed_and_never_produced_from_text(tokenizer):
  pieces = [tokenizer.id_to_piece(i) for i in range(tokenizer_lib.NUM_SPECIAL)]
  assert pieces[:6] == ['<pad>', '</s>', '<unk>', '[MASK]', '[CLS]', '[SEP]']
  assert pieces[tokenizer_lib.sentinel_id(0)] == '<extra_id_0>'
  assert pieces[tokenizer_lib.sentinel_id(99)] == '<extra_id_99>'
  ids = tokenizer.encode('a [MASK] b [CLS] <extra_id_0> </s> <pad>')
  assert min(ids) >= tokenizer_lib.NUM_SPECIAL


def test_built_in_corpus_loads_from_the_installed_package():
  docs = corpora.load_documents('web_bible')
  assert len(docs) > 1000
  assert sum(len(d.encode()) for d in docs) > 3_000_000
  assert not any('{' in d for d in docs)
  train, evaluation = corpora.split_documents(docs, 0.02)
  assert len(train) + len(evaluation) == len(docs) and 10 < len(evaluation) < 50


def test_txt_jsonl_and_parquet_files_and_globs(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  (tmp_path / 'a.txt').write_text('first document')
  (tmp_path / 'b.jsonl').write_text('{"text": "second"}\n\n{"text": "third"}\n')
  pq.write_table(pa.table({'body': ['fourth', None, 'fifth']}), tmp_path / 'c.parquet')
  assert corpora.load_documents(str(tmp_path / '*.txt')) == ['first document']
  assert corpora.load_documents(str(tmp_path / 'b.jsonl')) == ['second', 'third']
  assert corpora.load_documents(str(tmp_path / 'c.parquet'), 'body') == ['fourth', 'fifth']
  with pytest.raises(ValueError, match="has no column 'text'"):
    corpora.load_documents(str(tmp_path / 'c.parquet'))
  with pytest.raises(ValueError, match='matches no files'):
    corpora.load_documents(str(tmp_path / '*.csv'))


def test_token_cache_is_reused_and_rebuilt_when_the_corpus_changes(tokenizer, tmp_path):
  corpus = tmp_path / 'corpus.txt'
  corpus.write_text('hello world')
  calls = []

  def load():
    calls.append(1)
    return corpora.load_documents(str(corpus))

  def cached():
    key = token_cache.cache_key(corpora.corpus_fingerprint(str(corpus)), tokenizer.fingerprint)
    return token_cache.tokenized(load, tokenizer, str(tmp_path / 'cache'), key)

  tokens, meta = cached()
  assert list(tokens) == tokenizer.encode('hello world') + [input_pipeline.EOS_ID]
  assert meta['num_bytes'] == 11
  cached()
  assert len(calls) == 1  # reused: the corpus was not read again
  corpus.write_text('hello there, world')
  tokens, _ = cached()
  assert len(calls) == 2
  assert list(tokens) == tokenizer.encode('hello there, world') + [input_pipeline.EOS_ID]


def test_packed_windows_restart_positions_and_segments_after_eos():
  eos = input_pipeline.EOS_ID
  window = np.array([[7, 8, eos, 9, 10, 11, eos, 12, 13]])
  batch = pack_windows(window)
  np.testing.assert_array_equal(batch['inputs'], [[7, 8, eos, 9, 10, 11, eos, 12]])
  np.testing.assert_array_equal(batch['targets'], [[8, eos, 9, 10, 11, eos, 12, 13]])
  np.testing.assert_array_equal(batch['segment_ids'], [[1, 1, 1, 2, 2, 2, 2, 3]])
  np.testing.assert_array_equal(batch['positions'], [[0, 1, 2, 0, 1, 2, 3, 0]])
  assert batch['inputs'].dtype == np.int32 and batch['weights'].dtype == np.float32


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_train_iterator_resumes_exactly_from_its_state():
  tokens = np.arange(2000, dtype=np.uint16) % 500 + 10
  iterator = train_iterator(tokens, seq_len=16, local_batch=4, seed=0, shard_index=0,
                            shard_count=1)
  _take(iterator, 40)  # past one epoch of 124 windows / 4 = 31 batches
  state = json.loads(json.dumps(iterator.get_state()))
  expected = _take(iterator, 5)
  resumed = train_iterator(tokens, 16, 4, 0, 0, 1)
  resumed.set_state(state)
  for a, b in zip(_take(resumed, 5), expected):
    np.testing.assert_array_equal(a['inputs'], b['inputs'])

  first = lambda seed: next(train_iterator(tokens, 16, 4, seed, 0, 1))['inputs']
  np.testing.assert_array_equal(first(0), first(0))
  assert not np.array_equal(first(0), first(1))
  epoch = np.concatenate([b['inputs'][:, 0] for b in _take(train_iterator(tokens, 16, 4, 0, 0, 1),
                                                           62)])
  assert not np.array_equal(epoch[:124], epoch[124:])  # each epoch has its own order


def test_process_shards_are_disjoint_and_cover_the_windows():
  tokens = np.arange(16 * 8 + 1, dtype=np.uint16)
  seen = [np.concatenate([b['inputs'][:, 0] for b in _take(train_iterator(tokens, 16, 2, 0, i, 2),
                                                           2)]) for i in range(2)]
  assert set(seen[0]).isdisjoint(seen[1])
  assert sorted(np.concatenate(seen)) == list(range(0, 128, 16))


def test_eval_pass_sees_every_window_once_with_padding():
  tokens = np.arange(16 * 10 + 1, dtype=np.uint16) + 10
  batches = list(eval_batches(tokens, seq_len=16, local_batch=4, shard_index=0, shard_count=1))
  assert len(batches) == 3 and all(b['inputs'].shape == (4, 16) for b in batches)
  assert sum(b['weights'].sum() for b in batches) == 10 * 16
  firsts = np.concatenate([b['inputs'][b['weights'][:, 0] > 0, 0] for b in batches])
  np.testing.assert_array_equal(firsts, np.arange(10) * 16 + 10)
