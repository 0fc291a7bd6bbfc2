"""Input pipeline: corpora, tokenizer, token cache, packed batches, iterator state, errors."""
import json
import os

import numpy as np
import pytest

import input_pipeline
from input_pipeline import corpora, pipeline, token_cache
from input_pipeline import tokenizer as tokenizer_lib
from tasks.causal_lm import CausalExamples

from conftest import tiny_config, write_tiny_corpus

EOS = tokenizer_lib.EOS_ID
VOCAB = 512  # 110 special ids + 256 byte pieces + '\n' + the corpus's characters fit


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  return write_tiny_corpus(tmp_path_factory.mktemp('corpus') / 'tiny.jsonl')


@pytest.fixture(scope='module')
def tokenizer(corpus, tmp_path_factory):
  prefix = str(tmp_path_factory.mktemp('tokenizer') / 'tok')
  return tokenizer_lib.SentencePieceTokenizer(
      tokenizer_lib.train_tokenizer(corpora.load_documents(corpus), prefix, VOCAB))


def _config(corpus, tmp_path, **data):
  config = tiny_config(corpus, str(tmp_path / 'data_cache'))
  config.data.update(data)
  return config


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


# Tokenizer.

def _build_data(config, workdir: str) -> pipeline.Data:
  """A causal LM run's data, as train/loop.py builds it."""
  corpus = pipeline.load_corpus(config, workdir)
  return pipeline.build_data(config, corpus, CausalExamples(config.data.seq_len, eos_id=EOS))


def test_round_trip_of_non_ascii_text_never_seen_in_training(tokenizer):
  text = ' Café, Straße!  Ça va?\n\n\t中文 🙂 naïve — "quoted" 42\n'
  ids = tokenizer.encode(text)
  assert tokenizer.decode(ids) == text
  assert int(tokenizer.bytes_per_token[ids].sum()) == len(text.encode('utf-8'))
  assert tokenizer.encode_batch([text, 'the cat']) == [ids, tokenizer.encode('the cat')]
  assert len(tokenizer.encode('\n')) == 1  # a newline is one piece of its own


def test_special_ids_are_fixed_and_never_produced_from_text(tokenizer):
  pieces = [tokenizer.id_to_piece(i) for i in range(tokenizer_lib.NUM_SPECIAL)]
  assert pieces[:6] == ['<pad>', '</s>', '<unk>', '[MASK]', '[CLS]', '[SEP]']
  assert (tokenizer_lib.PAD_ID, tokenizer_lib.EOS_ID, tokenizer_lib.UNK_ID) == (0, 1, 2)
  assert (tokenizer_lib.MASK_ID, tokenizer_lib.CLS_ID, tokenizer_lib.SEP_ID) == (3, 4, 5)
  assert tokenizer_lib.SENTINEL_IDS == tuple(range(6, 106)) and tokenizer_lib.NUM_SPECIAL == 110
  assert pieces[tokenizer_lib.sentinel_id(0)] == '<extra_id_0>'
  assert pieces[tokenizer_lib.sentinel_id(99)] == '<extra_id_99>'
  assert pieces[106:] == ['<|system|>', '<|user|>', '<|assistant|>', '<|end|>']
  assert [tokenizer.special_piece_id(p) for p in pieces[106:]] == [106, 107, 108, 109]
  # The tokenizer reads the same table from its model file.
  assert (tokenizer.pad_id, tokenizer.eos_id, tokenizer.unk_id, tokenizer.bos_id) == (0, 1, 2, None)
  assert (tokenizer.mask_id, tokenizer.cls_id, tokenizer.sep_id) == (3, 4, 5)
  assert tokenizer.sentinel_ids == tokenizer_lib.SENTINEL_IDS
  assert tokenizer.special == tokenizer_lib.TRAINED_SPECIAL_IDS and not tokenizer.adds_bos
  assert tokenizer.special_ids == tuple(range(110))
  assert (tokenizer.special_mask == (np.arange(VOCAB) < 110)).all()
  assert (tokenizer.bytes_per_token[:tokenizer_lib.NUM_SPECIAL] == 0).all()
  text = 'a [MASK] b [CLS] [SEP] <extra_id_0> </s> <pad> <unk> <|user|> <|end|>'
  ids = tokenizer.encode(text)
  assert min(ids) >= tokenizer_lib.NUM_SPECIAL
  assert tokenizer.decode(ids) == text
  assert tokenizer.decode([tokenizer_lib.PAD_ID] + ids + [VOCAB + 5]) == text


def test_too_large_vocabulary_says_to_lower_it(tmp_path):
  with pytest.raises(ValueError, match='lower data.tokenizer.vocab_size to at most'):
    tokenizer_lib.train_tokenizer(['a tiny corpus'], str(tmp_path / 'tok'), 5000)


# Corpora.

def test_built_in_corpus_loads_from_the_installed_package():
  docs = corpora.load_documents('web_bible')
  assert len(docs) > 1000
  assert sum(len(d.encode()) for d in docs) > 3_000_000
  assert not any('{' in d for d in docs)
  assert corpora.corpus_fingerprint('web_bible') == corpora.corpus_fingerprint('web_bible')


def test_txt_jsonl_parquet_directories_and_globs(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  (tmp_path / 'a.txt').write_text('first document\n\nsame document')
  (tmp_path / 'b.jsonl').write_text('{"text": "second"}\n\n{"text": "third"}\n')
  pq.write_table(pa.table({'body': ['fourth', None, 'fifth']}), tmp_path / 'c.parquet')
  assert corpora.load_documents(str(tmp_path / '*.txt')) == ['first document\n\nsame document']
  assert corpora.load_documents(str(tmp_path / 'b.jsonl')) == ['second', 'third']
  assert corpora.load_documents(str(tmp_path / 'c.parquet'), 'body') == ['fourth', 'fifth']
  assert len(corpora.load_documents(str(tmp_path / '*.jsonl'))) == 2
  with pytest.raises(ValueError, match="has no column 'text'"):
    corpora.load_documents(str(tmp_path / 'c.parquet'))
  (tmp_path / 'c.parquet').unlink()
  assert len(corpora.load_documents(str(tmp_path))) == 3  # a directory: every file in it


@pytest.mark.parametrize('files, spec, message', [
    ({}, 'missing/*.txt', 'matches no files; point data.corpus'),
    ({'empty.txt': ' \n\n', 'blank.jsonl': '{"text": "  "}\n'}, '*', 'is empty'),
    ({'data.csv': 'a,b'}, 'data.csv', 'not a supported corpus file'),
    ({'bad.jsonl': '{"text": "ok"}\nnot json\n'}, 'bad.jsonl', r'bad.jsonl:2 is not valid JSON'),
    ({'other.jsonl': '{"body": "x"}\n'}, 'other.jsonl', 'set data.text_field'),
])
def test_corpus_errors_say_what_to_change(tmp_path, files, spec, message):
  for name, text in files.items():
    (tmp_path / name).write_text(text)
  with pytest.raises(ValueError, match=message):
    corpora.load_documents(str(tmp_path / spec))


def test_split_is_fixed_and_never_leaves_a_side_empty():
  docs = [f'doc {i}' for i in range(100)]
  train, evaluation = corpora.split_documents(docs, 0.1)
  assert evaluation == [f'doc {i}' for i in range(9, 100, 10)]
  assert sorted(train + evaluation) == sorted(docs)
  assert corpora.split_documents(docs[:2], 0.02) == (['doc 0'], ['doc 1'])
  with pytest.raises(ValueError, match='data.eval_fraction=0'):
    corpora.split_documents(docs, 0)


# Token cache.

def test_token_cache_is_reused_and_rebuilt_when_the_corpus_changes(tokenizer, tmp_path):
  corpus = tmp_path / 'corpus.txt'
  corpus.write_text('hello world é')
  reads = []

  def cached():
    def load():
      reads.append(1)
      return corpora.load_documents(str(corpus))
    key = token_cache.cache_key(corpora.corpus_fingerprint(str(corpus)), tokenizer.fingerprint)
    return token_cache.tokenized(load, tokenizer, str(tmp_path / 'cache'), key)

  tokens, meta = cached()
  assert list(tokens) == tokenizer.encode('hello world é') + [EOS]
  assert tokens.dtype == np.uint16 and not tokens.flags.writeable
  assert meta == {'num_tokens': len(tokens), 'num_docs': 1, 'dtype': 'uint16', 'num_bytes': 14}
  tokens_file = next((tmp_path / 'cache').glob('*.bin'))
  stat = tokens_file.stat()
  cached()
  assert len(reads) == 1 and tokens_file.stat().st_mtime_ns == stat.st_mtime_ns  # reused
  corpus.write_text('hello there, world')
  tokens, _ = cached()
  assert len(reads) == 2
  assert list(tokens) == tokenizer.encode('hello there, world') + [EOS]
  assert not list((tmp_path / 'cache').glob('*.tmp*'))


def test_build_data_reads_the_corpus_only_when_a_cache_misses(corpus, tmp_path, monkeypatch):
  loads = []
  load_documents = corpora.load_documents
  monkeypatch.setattr(corpora, 'load_documents', lambda *a: loads.append(a) or load_documents(*a))
  config = _config(corpus, tmp_path)
  first = _build_data(config, str(tmp_path / 'run1'))
  assert len(loads) == 1 and os.path.exists(tmp_path / 'run1' / 'tokenizer.model')
  second = _build_data(config, str(tmp_path / 'run2'))  # cached tokenizer and tokens
  assert len(loads) == 1 and second.tokenizer.fingerprint == first.tokenizer.fingerprint
  assert second.train_tokens == first.train_tokens
  config.data.eval_fraction = 0.2  # another split: new tokenizer and token files
  _build_data(config, str(tmp_path / 'run3'))
  assert len(loads) == 2


# Batches.

def test_train_batches_are_packed_windows_of_the_token_stream(corpus, tmp_path):
  config = _config(corpus, tmp_path)
  data = _build_data(config, str(tmp_path / 'run'))
  train_docs, _ = corpora.split_documents(corpora.load_documents(corpus), 0.1)
  stream = np.concatenate([ids + [EOS] for ids in data.tokenizer.encode_batch(train_docs)])
  assert data.train_tokens == len(stream)
  seq_len = config.data.seq_len
  dtypes = {'inputs': np.int32, 'targets': np.int32, 'segment_ids': np.int32,
            'positions': np.int32, 'weights': np.float32}
  for batch in _take(data.train_iter, 3):
    assert {k: v.dtype for k, v in batch.items()} == dtypes
    assert all(v.shape == (config.data.batch_size, seq_len) for v in batch.values())
    assert (batch['weights'] == 1).all()
    for inputs, targets, segments, positions in zip(
        batch['inputs'], batch['targets'], batch['segment_ids'], batch['positions']):
      start = np.flatnonzero(stream[:len(stream) - seq_len] == inputs[0])
      assert any((stream[s:s + seq_len + 1] == np.append(inputs, targets[-1])).all()
                 for s in start if s % seq_len == 0)
      np.testing.assert_array_equal(inputs[1:], targets[:-1])
      after_eos = inputs[:-1] == EOS
      np.testing.assert_array_equal(segments, np.cumsum(np.append(1, after_eos)))
      expected_positions = [0]
      for restart in after_eos:
        expected_positions.append(0 if restart else expected_positions[-1] + 1)
      np.testing.assert_array_equal(positions, expected_positions)


def test_packing_starts_a_document_after_each_eos():
  batch = input_pipeline.pack_windows(np.array([[7, 8, EOS, 9, 10, 11, EOS, 12, 13]]), eos_id=EOS)
  np.testing.assert_array_equal(batch['inputs'], [[7, 8, EOS, 9, 10, 11, EOS, 12]])
  np.testing.assert_array_equal(batch['targets'], [[8, EOS, 9, 10, 11, EOS, 12, 13]])
  np.testing.assert_array_equal(batch['segment_ids'], [[1, 1, 1, 2, 2, 2, 2, 3]])
  np.testing.assert_array_equal(batch['positions'], [[0, 1, 2, 0, 1, 2, 3, 0]])


def test_train_iterator_resumes_exactly_and_follows_the_seed(corpus, tmp_path):
  config = _config(corpus, tmp_path)
  workdir = str(tmp_path / 'run')
  data = _build_data(config, workdir)
  batches_per_epoch = (data.train_tokens - 1) // config.data.seq_len // config.data.batch_size
  first = _take(data.train_iter, batches_per_epoch + 2)  # resume across an epoch boundary
  state = json.loads(json.dumps(data.train_iter.get_state()))
  expected = _take(data.train_iter, 4)

  resumed = _build_data(config, workdir).train_iter
  resumed.set_state(state)
  _assert_same_batches(_take(resumed, 4), expected)

  _assert_same_batches(_take(_build_data(config, workdir).train_iter, 2), first[:2])
  config.seed = 1
  other = next(_build_data(config, workdir).train_iter)
  assert not np.array_equal(other['inputs'], first[0]['inputs'])


def test_every_epoch_sees_every_window_once_in_its_own_order(tokenizer):
  task = CausalExamples(8, eos_id=EOS)
  tokens = np.arange(8 * 12 + 1, dtype=np.uint16) + tokenizer_lib.NUM_SPECIAL
  batches = _take(pipeline.train_iterator(task, tokens, 2, 0, 0, 1), 3 * 6)  # 3 epochs
  starts = np.concatenate([b['inputs'][:, 0] for b in batches]).reshape(3, 12)
  for epoch in starts:
    assert sorted(epoch) == list(tokens[:96:8])
  assert len({tuple(epoch) for epoch in starts}) == 3


def test_eval_pass_sees_every_validation_window_once(corpus, tmp_path):
  config = _config(corpus, tmp_path, batch_size=6)
  data = _build_data(config, str(tmp_path / 'run'))
  _, eval_docs = corpora.split_documents(corpora.load_documents(corpus), 0.1)
  stream = np.concatenate([ids + [EOS] for ids in data.tokenizer.encode_batch(eval_docs)])
  seq_len = config.data.seq_len
  num_windows = (len(stream) - 1) // seq_len
  assert num_windows % 6  # so that the last batch is padded
  for _ in range(2):  # each call is a fresh pass
    batches = list(data.make_eval_iter())
    assert len(batches) == -(-num_windows // 6)
    assert all(b['inputs'].shape == (6, seq_len) for b in batches)
    assert sum(b['weights'].sum() for b in batches) == num_windows * seq_len
    real = np.concatenate([b['inputs'][b['weights'][:, 0] > 0] for b in batches])
    np.testing.assert_array_equal(real, stream[:num_windows * seq_len].reshape(-1, seq_len))


def test_processes_read_disjoint_shards_that_make_up_the_same_global_batches(tokenizer):
  task = CausalExamples(8, eos_id=EOS)
  tokens = np.arange(8 * 11 + 1, dtype=np.uint16) + tokenizer_lib.NUM_SPECIAL
  evals = [list(pipeline.eval_batches(task, tokens, 2, shard, 3)) for shard in range(3)]
  assert len({len(batches) for batches in evals}) == 1
  firsts = [b['inputs'][b['weights'][:, 0] > 0, 0] for batches in evals for b in batches]
  assert sorted(np.concatenate(firsts)) == list(tokens[:88:8])
  # Each of 2 processes reads its half of every global batch of 4: together, the very
  # batches one process reads alone.
  halves = [_take(pipeline.train_iterator(task, tokens, 2, 0, shard, 2), 5) for shard in range(2)]
  alone = _take(pipeline.train_iterator(task, tokens, 4, 0, 0, 1), 5)
  for i, (first, second, whole) in enumerate(zip(*halves, alone)):
    if i < 2:  # within the first epoch of 11 windows
      assert set(first['inputs'][:, 0]).isdisjoint(second['inputs'][:, 0])
    np.testing.assert_array_equal(np.concatenate([first['inputs'], second['inputs']]),
                                  whole['inputs'])


def test_separate_eval_corpus(corpus, tmp_path):
  (tmp_path / 'eval.txt').write_text('the river greets the gate. ' * 40)
  config = _config(corpus, tmp_path, eval_corpus=str(tmp_path / 'eval.txt'))
  data = _build_data(config, str(tmp_path / 'run'))
  batch = next(data.make_eval_iter())
  assert data.tokenizer.decode(batch['inputs'][0]).startswith('the river greets the gate.')


# Errors a user can cause.

def test_batch_size_not_divisible_by_processes(corpus, tmp_path, monkeypatch):
  monkeypatch.setattr(pipeline.jax, 'process_count', lambda: 3)
  with pytest.raises(ValueError, match='data.batch_size=8 is not divisible by the 3 processes'):
    _build_data(_config(corpus, tmp_path), str(tmp_path / 'run'))


def test_split_shorter_than_one_window(corpus, tmp_path):
  (tmp_path / 'eval.txt').write_text('a stone')
  config = _config(corpus, tmp_path, eval_corpus=str(tmp_path / 'eval.txt'))
  with pytest.raises(ValueError, match=r'eval split has \d+ tokens.*lower data.seq_len'):
    _build_data(config, str(tmp_path / 'run'))


def test_unigram_tokenizer_round_trips(tmp_path):
  docs = corpora.load_documents(write_tiny_corpus(tmp_path / 'c.jsonl'))
  path = tokenizer_lib.train_tokenizer(docs, str(tmp_path / 'uni'), 400, model_type='unigram')
  tokenizer = tokenizer_lib.SentencePieceTokenizer(path)
  text = 'the café dog — 中文'
  assert tokenizer.decode(tokenizer.encode(text)) == text
