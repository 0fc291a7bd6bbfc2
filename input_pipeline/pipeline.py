"""Batches of a task's examples: packed, sharded and checkpointable for training,
one pass for evaluation.

`load_corpus` reads the corpus, trains (or reuses) the sentencepiece tokenizer (or
uses the run's, e.g. an imported checkpoint's) and tokenizes each split once into a
memory-mapped token stream (documents, each ending in the tokenizer's EOS). A task's
`Examples` (tasks/) cut that stream into raw items, by default fixed windows, and turn
each into arrays; `build_data` shuffles, repeats and shards them into global batches
with grain. `pack_windows` is the packing several tasks
share: documents share a row, and segment ids (1, 2, ... per document, 0 for
padding) and positions restarting at each document keep attention inside them."""
import dataclasses
import os
import shutil
import time
from typing import Callable, Iterator

import grain
import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from input_pipeline import corpora, records, token_cache
from input_pipeline.tokenizer import (CONTROL_SYMBOLS, SENTENCEPIECE_FILE, Tokenizer,
                                      load_tokenizer, tokenizer_file, train_tokenizer)

Batch = dict[str, np.ndarray]
Example = dict[str, np.ndarray]


@dataclasses.dataclass
class Data:
  tokenizer: Tokenizer
  train_iter: grain.DatasetIterator  # infinite; get_state() / set_state() resume it exactly
  make_eval_iter: Callable[[], Iterator[Batch]]  # a fresh one-pass iterator
  train_tokens: int
  eval_records: list[dict] | None = None  # a record task's validation records (decoded evals)


def pack_windows(windows: np.ndarray, *, eos_id: int) -> Batch:
  """[B, T+1] token windows -> inputs, targets, segment_ids, positions, weights ([B, T])."""
  inputs = windows[:, :-1].astype(np.int32)
  targets = windows[:, 1:].astype(np.int32)
  # A token after an EOS starts a new document; the EOS belongs to the one it ends.
  starts = np.zeros_like(inputs, bool)
  starts[:, 1:] = inputs[:, :-1] == eos_id
  segment_ids = 1 + np.cumsum(starts, axis=1, dtype=np.int32)
  index = np.arange(inputs.shape[1], dtype=np.int32)
  starts[:, 0] = True
  last_start = np.maximum.accumulate(np.where(starts, index, 0), axis=1)
  return {'inputs': inputs, 'targets': targets, 'segment_ids': segment_ids,
          'positions': (index - last_start).astype(np.int32),
          'weights': np.ones(inputs.shape, np.float32)}


class _Windows:
  """Random access to window i (`length` tokens, consecutive windows overlapping by
  `overlap`) of a token memmap: a grain data source."""

  def __init__(self, tokens: np.ndarray, length: int, overlap: int = 0):
    self.tokens, self.length, self.stride = tokens, length, length - overlap

  def __len__(self) -> int:
    return (len(self.tokens) - self.length) // self.stride + 1

  def __getitem__(self, i: int) -> np.ndarray:
    start = int(i) * self.stride
    return np.asarray(self.tokens[start:start + self.length])


def segments_and_positions(ids_T: np.ndarray, *, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
  packed = pack_windows(np.concatenate([ids_T, [0]])[None], eos_id=eos_id)
  return packed['segment_ids'][0], packed['positions'][0]


class Examples:
  """How one task turns a split into examples (tasks/ subclass it).

  A split is a token stream (a memory-mapped array) for pre-training tasks, or a list of
  records for the record tasks (`RecordExamples`). `source(split)` is a random-access
  grain source of raw items (by default windows of `raw_length` tokens, consecutive ones
  sharing `window_overlap`); `make_example(item, rng)` turns one into a dict of arrays
  (rng: a per-example generator, different every epoch, so masks and spans change
  between epochs and resume exactly).
  """

  def __init__(self, seq_len: int, raw_length: int, window_overlap: int = 0):
    self.seq_len, self.raw_length, self.window_overlap = seq_len, raw_length, window_overlap

  def num_examples(self, split) -> int:
    return max(0, len(_Windows(split, self.raw_length, self.window_overlap)))

  def source(self, split):
    return _Windows(split, self.raw_length, self.window_overlap)

  def make_example(self, item, rng: np.random.Generator) -> Example:
    raise NotImplementedError

  def too_few(self, name: str, split, needed: int) -> str:
    """The message when `split` holds fewer than `needed` examples."""
    return (f'The {name} split has {len(split):,} tokens, too few for {needed} example(s) of '
            f'data.seq_len={self.seq_len}; lower data.seq_len (or data.batch_size) or use a '
            'larger corpus.')

  def token_count(self, split) -> int:
    """Tokens the split feeds training (for the start-up log)."""
    return len(split)


class RecordExamples(Examples):
  """Examples made from records (fine-tuning tasks): `rows(records)` tokenizes the
  records and groups them into rows once (a row is one example: one record, or several
  packed); `make_example(row, rng)` builds its arrays. Rows are memoised per split."""

  def __init__(self, seq_len: int):
    super().__init__(seq_len, raw_length=seq_len)
    self._made: list[tuple[list, list]] = []  # (split, its rows): the split held, so ids stay unique

  def rows(self, records: list[dict]) -> list:
    raise NotImplementedError

  def source(self, split):
    for made, rows in self._made:
      if made is split:
        return rows
    self._made.append((split, self.rows(split)))
    return self._made[-1][1]

  def num_examples(self, split) -> int:
    return len(self.source(split))

  def too_few(self, name: str, split, needed: int) -> str:
    return (f'The {name} split has {len(split):,} records, which make {self.num_examples(split)} '
            f'example(s) of data.seq_len={self.seq_len}; {needed} are needed: lower '
            'data.batch_size or add records.')

  def row_tokens(self, row) -> int:
    """Real (non-padding) input tokens of a row."""
    raise NotImplementedError

  def token_count(self, split) -> int:
    return sum(self.row_tokens(row) for row in self.source(split))


def _check_enough(name: str, split, examples: Examples, needed: int) -> None:
  if examples.num_examples(split) < needed:
    raise ValueError(examples.too_few(name, split, needed))


def _shuffle_seed(seed: int) -> int:
  """grain reshuffles epoch e with seed + e, so seeds s and s+1 would share epoch orders
  one epoch apart; hashing the seed keeps different runs' orders unrelated."""
  return int(np.random.SeedSequence(seed).generate_state(1)[0])


class _RowsOfProcess:
  """Process i's rows of every global batch of an endless example stream: rows
  [i b, (i + 1) b) of global batch n are stream elements (n P + i) b + r. Every
  process shuffles the same stream, so a global batch holds the same examples
  whatever the number of processes (a run on 2 hosts matches a run on 1)."""

  def __init__(self, stream, local_batch: int, shard_index: int, shard_count: int):
    self.stream, self.local_batch = stream, local_batch
    self.shard_index, self.shard_count = shard_index, shard_count

  def __len__(self) -> int:
    return len(self.stream) // self.shard_count

  def __getitem__(self, j: int):
    batch, row = divmod(j, self.local_batch)
    return self.stream[(batch * self.shard_count + self.shard_index) * self.local_batch + row]


def train_iterator(examples: Examples, tokens: np.ndarray, local_batch: int, seed: int,
                   shard_index: int, shard_count: int) -> grain.DatasetIterator:
  """Shuffled (differently each epoch, same for the same seed), repeated, and this
  process's rows of each global batch."""
  stream = (grain.MapDataset.source(examples.source(tokens))
            .shuffle(seed=_shuffle_seed(seed)).repeat()
            .random_map(examples.make_example, seed=seed))
  dataset = (grain.MapDataset.source(_RowsOfProcess(stream, local_batch, shard_index, shard_count))
             .batch(local_batch, drop_remainder=True))
  # Two reader threads suffice for memmap slices and leave the cores to XLA.
  return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=8)))


def eval_batches(examples: Examples, tokens: np.ndarray, local_batch: int, shard_index: int,
                 shard_count: int, seed: int = 0) -> Iterator[Batch]:
  """Every validation example once, in order, with fixed masks / spans; the last batch is
  padded with weight-0 rows. Every process yields the same number of batches."""
  source = examples.source(tokens)
  made = grain.MapDataset.source(source).random_map(examples.make_example, seed=seed)
  per_process = -(-len(source) // shard_count)
  mine = range(shard_index, len(source), shard_count)
  for start in range(0, per_process, local_batch):
    rows = [made[i] for i in mine[start:start + local_batch]]
    template = rows[0] if rows else made[0]
    rows += [{k: np.zeros_like(v) for k, v in template.items()}] * (local_batch - len(rows))
    yield {k: np.stack([row[k] for row in rows]) for k in template}


def _cache_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  if config.data.cache_dir:
    return config.data.cache_dir
  return os.path.join(os.path.dirname(os.path.abspath(workdir)), 'data_cache')


def _tokenizer(config, workdir: str, cache_dir: str, train_id: list, train_docs) -> Tokenizer:
  """The workdir's tokenizer (trained or imported), else one from the cache, else one
  trained on the train split. With several processes, process 0 makes it and the others
  read its file."""
  path = os.path.join(workdir, SENTENCEPIECE_FILE)
  if tokenizer_file(workdir):
    logging.info('Using the run\'s tokenizer %s', tokenizer_file(workdir))
  elif jax.process_index() == 0:
    t = config.data.tokenizer
    key = token_cache.cache_key(train_id, t.type, t.vocab_size, t.byte_fallback,
                                t.max_train_bytes, CONTROL_SYMBOLS)
    prefix = os.path.join(cache_dir, f'tokenizer-{key}')
    if not os.path.exists(prefix + '.model'):
      start = time.time()
      os.makedirs(cache_dir, exist_ok=True)
      tmp_prefix = f'{prefix}.tmp{os.getpid()}'
      train_tokenizer(train_docs(), tmp_prefix, t.vocab_size, t.type, t.byte_fallback,
                      t.max_train_bytes)
      os.replace(tmp_prefix + '.model', prefix + '.model')
      os.remove(tmp_prefix + '.vocab')
      logging.info('Trained a %d-piece %s tokenizer in %.1fs.', t.vocab_size, t.type,
                   time.time() - start)
    else:
      logging.info('Reusing the cached tokenizer %s.model', prefix)
    os.makedirs(workdir, exist_ok=True)
    shutil.copyfile(prefix + '.model', f'{path}.tmp{os.getpid()}')
    os.replace(f'{path}.tmp{os.getpid()}', path)  # a killed copy never leaves a broken tokenizer
  if jax.process_count() > 1:  # every process passes here exactly once
    multihost_utils.sync_global_devices('tokenizer.model written')
  return load_tokenizer(workdir)


@dataclasses.dataclass
class Corpus:
  """A run's tokenizer and its splits ('train', 'eval'): memory-mapped token streams, or
  lists of records (`records` True) for a fine-tuning task."""
  tokenizer: Tokenizer
  splits: dict[str, np.ndarray | list[dict]]
  records: bool = False


def local_batch_size(config: ml_collections.ConfigDict) -> int:
  """This process's rows of each global batch."""
  batch_size = config.data.batch_size
  if batch_size % jax.process_count():
    raise ValueError(f'data.batch_size={batch_size} is not divisible by the '
                     f'{jax.process_count()} processes; change data.batch_size.')
  return batch_size // jax.process_count()


def load_records(config: ml_collections.ConfigDict, workdir: str, kind: str) -> Corpus:
  """The run's tokenizer and its record splits of `kind` (input_pipeline/records.py); a
  tokenizer trained here learns from every string of the training records."""
  local_batch_size(config)  # fail before any work
  d = config.data
  splits = records.record_splits(d.corpus, d.eval_corpus, d.eval_fraction, kind)
  source_id = [records.corpus_fingerprint(d.corpus), kind, d.eval_fraction,
               records.corpus_fingerprint(d.eval_corpus) if d.eval_corpus else '']
  texts = lambda: ['\n'.join(records.record_texts(r)) for r in splits['train']]
  tokenizer = _tokenizer(config, workdir, _cache_dir(config, workdir), source_id, texts)
  return Corpus(tokenizer, splits, records=True)


def load_corpus(config: ml_collections.ConfigDict, workdir: str,
                record_kind: str | None = None) -> Corpus:
  """The run's tokenizer and tokenized splits; builds the caches once (a cache hit
  reads no corpus file). A record task (`record_kind`) gets its records instead."""
  if record_kind:
    return load_records(config, workdir, record_kind)
  local_batch_size(config)  # fail before any work
  d = config.data
  cache_dir = _cache_dir(config, workdir)
  documents = {}  # read the corpus at most once, and only when a cache misses

  def splits():
    if not documents:
      docs = corpora.load_documents(d.corpus, d.text_field)
      if d.eval_corpus:
        documents['train'] = docs
        documents['eval'] = corpora.load_documents(d.eval_corpus, d.text_field)
      else:
        documents['train'], documents['eval'] = corpora.split_documents(docs, d.eval_fraction)
    return documents

  # What each split's text depends on; fingerprints read no file, so a cache hit is cheap.
  train_id = corpora.corpus_fingerprint(d.corpus)
  if d.eval_corpus:
    split_ids = {'train': [train_id], 'eval': [corpora.corpus_fingerprint(d.eval_corpus)]}
  else:
    split_ids = {split: [train_id, d.eval_fraction] for split in ('train', 'eval')}
  tokenizer = _tokenizer(config, workdir, cache_dir, split_ids['train'],
                         lambda: splits()['train'])
  tokens = {}
  for split in ('train', 'eval'):
    key = token_cache.cache_key(split_ids[split], split, tokenizer.fingerprint)
    tokens[split], _ = token_cache.tokenized(lambda: splits()[split], tokenizer, cache_dir, key)
  return Corpus(tokenizer, tokens)


def build_data(config: ml_collections.ConfigDict, corpus: Corpus, examples: Examples) -> Data:
  """The train iterator and eval batches of a task's `examples` over a corpus."""
  d = config.data
  local_batch = local_batch_size(config)
  splits = corpus.splits
  _check_enough('train', splits['train'], examples, d.batch_size)
  _check_enough('eval', splits['eval'], examples, 1)
  shard = (jax.process_index(), jax.process_count())
  return Data(
      tokenizer=corpus.tokenizer,
      train_iter=train_iterator(examples, splits['train'], local_batch, config.seed, *shard),
      make_eval_iter=lambda: eval_batches(examples, splits['eval'], local_batch, *shard),
      train_tokens=examples.token_count(splits['train']),
      eval_records=corpus.splits['eval'] if corpus.records else None)
