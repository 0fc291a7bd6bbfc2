"""Packed, sharded, checkpointable batches for training and one-pass batches for evaluation.

The token stream (documents, each ending in EOS) is cut into windows of seq_len+1
tokens; window i gives inputs = w[:-1], targets = w[1:]. Several documents share
a window; segment ids (1, 2, ... per document in a row, 0 for padding) and
positions restarting at each document let attention stay inside documents.
"""
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

from input_pipeline import corpora, token_cache
from input_pipeline.tokenizer import EOS_ID, Tokenizer, train_tokenizer

Batch = dict[str, np.ndarray]


@dataclasses.dataclass
class Data:
  tokenizer: Tokenizer
  train_iter: grain.DatasetIterator  # infinite; get_state() / set_state() resume it exactly
  make_eval_iter: Callable[[], Iterator[Batch]]  # a fresh one-pass iterator
  train_tokens: int


def pack_windows(windows: np.ndarray) -> Batch:
  """[B, T+1] token windows -> inputs, targets, segment_ids, positions, weights ([B, T])."""
  inputs = windows[:, :-1].astype(np.int32)
  targets = windows[:, 1:].astype(np.int32)
  # A token after an EOS starts a new document; the EOS belongs to the one it ends.
  starts = np.zeros_like(inputs, bool)
  starts[:, 1:] = inputs[:, :-1] == EOS_ID
  segment_ids = 1 + np.cumsum(starts, axis=1, dtype=np.int32)
  index = np.arange(inputs.shape[1], dtype=np.int32)
  starts[:, 0] = True
  last_start = np.maximum.accumulate(np.where(starts, index, 0), axis=1)
  return {'inputs': inputs, 'targets': targets, 'segment_ids': segment_ids,
          'positions': (index - last_start).astype(np.int32),
          'weights': np.ones(inputs.shape, np.float32)}


class _Windows:
  """Random access to window i of a token memmap (a grain data source)."""

  def __init__(self, tokens: np.ndarray, seq_len: int):
    self.tokens, self.seq_len = tokens, seq_len

  def __len__(self) -> int:
    return (len(self.tokens) - 1) // self.seq_len

  def __getitem__(self, i: int) -> np.ndarray:
    start = int(i) * self.seq_len
    return np.asarray(self.tokens[start:start + self.seq_len + 1])


def _check_enough_tokens(split: str, tokens: np.ndarray, seq_len: int, min_windows: int) -> None:
  if (len(tokens) - 1) // seq_len < min_windows:
    raise ValueError(f'The {split} split has {len(tokens):,} tokens, fewer than {min_windows} '
                     f'window(s) of data.seq_len={seq_len}; lower data.seq_len (or '
                     'data.batch_size) or use a larger corpus.')


def train_iterator(tokens: np.ndarray, seq_len: int, local_batch: int, seed: int,
                   shard_index: int, shard_count: int) -> grain.DatasetIterator:
  """Shuffled (differently each epoch, same for the same seed), repeated, this process's shard."""
  windows = _Windows(tokens, seq_len)
  dataset = (grain.MapDataset.source(windows)[shard_index::shard_count]
             .shuffle(seed=seed).repeat()
             .batch(local_batch, drop_remainder=True, batch_fn=np.stack)
             .map(pack_windows))
  # Two reader threads suffice for memmap slices and leave the cores to XLA.
  return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=8)))


def eval_batches(tokens: np.ndarray, seq_len: int, local_batch: int, shard_index: int,
                 shard_count: int) -> Iterator[Batch]:
  """Every validation window once, in order; the last batch is padded with weight-0 rows."""
  windows = _Windows(tokens, seq_len)
  indices = np.arange(len(windows))
  # Every process runs the same number of batches, so the global batch stays whole.
  per_process = -(-len(indices) // shard_count)
  mine = indices[shard_index::shard_count]
  for start in range(0, per_process, local_batch):
    rows = [windows[i] for i in mine[start:start + local_batch]]
    batch = pack_windows(np.stack(rows)) if rows else None
    padding = local_batch - len(rows)
    if padding:
      pad = {k: np.zeros((padding, seq_len), v.dtype) for k, v in
             pack_windows(np.zeros((1, seq_len + 1), np.int32)).items()}
      batch = pad if batch is None else {k: np.concatenate([batch[k], pad[k]]) for k in batch}
    yield batch


def _cache_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  if config.data.cache_dir:
    return config.data.cache_dir
  return os.path.join(os.path.dirname(os.path.abspath(workdir)), 'data_cache')


def _tokenizer(config, workdir: str, cache_dir: str, corpus_id: str, train_docs) -> Tokenizer:
  """The workdir's tokenizer, else one from the cache, else one trained on the train split."""
  path = os.path.join(workdir, 'tokenizer.model')
  if not os.path.exists(path):
    t = config.data.tokenizer
    key = token_cache.cache_key(corpus_id, t.type, t.vocab_size, t.byte_fallback,
                                t.max_train_bytes)
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
    shutil.copyfile(prefix + '.model', path)
  return Tokenizer(path)


def build_data(config: ml_collections.ConfigDict, workdir: str) -> Data:
  """Tokenizer, train iterator and eval batches for a run; builds caches once."""
  d = config.data
  if d.batch_size % jax.process_count():
    raise ValueError(f'data.batch_size={d.batch_size} is not divisible by the '
                     f'{jax.process_count()} processes; change data.batch_size.')
  local_batch = d.batch_size // jax.process_count()
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

  train_id = corpora.corpus_fingerprint(d.corpus)
  eval_id = corpora.corpus_fingerprint(d.eval_corpus) if d.eval_corpus else None
  split_id = (train_id, eval_id, None if eval_id else d.eval_fraction)
  tokenizer = _tokenizer(config, workdir, cache_dir, split_id, lambda: splits()['train'])
  tokens = {}
  for split in ('train', 'eval'):
    key = token_cache.cache_key(split_id, split, tokenizer.fingerprint)
    tokens[split], _ = token_cache.tokenized(lambda: splits()[split], tokenizer, cache_dir, key)
  _check_enough_tokens('train', tokens['train'], d.seq_len, d.batch_size)
  _check_enough_tokens('eval', tokens['eval'], d.seq_len, 1)

  shard = (jax.process_index(), jax.process_count())
  return Data(
      tokenizer=tokenizer,
      train_iter=train_iterator(tokens['train'], d.seq_len, local_batch, config.seed, *shard),
      make_eval_iter=lambda: eval_batches(tokens['eval'], d.seq_len, local_batch, *shard),
      train_tokens=len(tokens['train']))
