"""Packed, sharded, checkpointable batches for training and one-pass batches for evaluation.

The token stream (documents, each ending in EOS) is cut into windows of seq_len+1
tokens; window i gives inputs = w[:-1], targets = w[1:]. Several documents share
a window; segment ids (1, 2, ... per document in a row, 0 for padding) and
positions restarting at each document let attention stay inside documents.
"""
import dataclasses
import functools
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

from input_pipeline import corpora, masking, spans, token_cache
from input_pipeline.tokenizer import EOS_ID, PAD_ID, Tokenizer, train_tokenizer

Batch = dict[str, np.ndarray]
Example = dict[str, np.ndarray]


@dataclasses.dataclass
class Data:
  tokenizer: Tokenizer
  task: 'Task'
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
  """Random access to window i (`length` tokens, consecutive windows overlapping by
  `overlap`) of a token memmap: a grain data source."""

  def __init__(self, tokens: np.ndarray, length: int, overlap: int = 0):
    self.tokens, self.length, self.stride = tokens, length, length - overlap

  def __len__(self) -> int:
    return (len(self.tokens) - self.length) // self.stride + 1

  def __getitem__(self, i: int) -> np.ndarray:
    start = int(i) * self.stride
    return np.asarray(self.tokens[start:start + self.length])


def _segments_and_positions(ids_T: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  packed = pack_windows(np.concatenate([ids_T, [0]])[None])
  return packed['segment_ids'][0], packed['positions'][0]


@dataclasses.dataclass(frozen=True)
class Task:
  """How one objective turns the token stream into examples.

  `source(tokens)` is a random-access grain source of raw items; `make_example(item,
  rng)` turns one into a dict of arrays (rng: a per-example generator, different every
  epoch, so masks and spans change between epochs and resume exactly).
  """
  objective: str
  seq_len: int
  vocab_size: int
  mask_rate: float = 0.15
  word_starts: np.ndarray | None = None  # [vocab] bool, for whole-word masking
  next_sentence: bool = False
  noise_density: float = 0.15
  mean_span_length: float = 3.0

  @functools.cached_property
  def _span_lengths(self) -> tuple[int, int]:
    """(raw tokens, target length) of span corruption: a search, so done once."""
    return spans.raw_length_for(self.seq_len, self.noise_density, self.mean_span_length)

  @property
  def raw_length(self) -> int:
    if self.objective == 'causal_lm':
      return self.seq_len + 1
    if self.objective == 'span_corruption':
      return self._span_lengths[0]
    return self.seq_len

  @property
  def window_overlap(self) -> int:
    """Causal LM windows share one token: the last target of one is the first input of the next."""
    return 1 if self.objective == 'causal_lm' else 0

  def num_windows(self, tokens: np.ndarray) -> int:
    return max(0, len(_Windows(tokens, self.raw_length, self.window_overlap)))

  @property
  def targets_length(self) -> int:
    if self.objective == 'span_corruption':
      return self._span_lengths[1]
    return self.seq_len

  def source(self, tokens: np.ndarray):
    if self.next_sentence:
      ends = np.flatnonzero(np.asarray(tokens) == EOS_ID)
      starts = np.concatenate([[0], ends[:-1] + 1])
      documents = [tokens[a:b] for a, b in zip(starts, ends) if b > a]
      return _SentencePairs(documents, max(1, len(tokens) // self.seq_len))
    return _Windows(tokens, self.raw_length, self.window_overlap)

  def make_example(self, item, rng: np.random.Generator) -> Example:
    if self.objective == 'causal_lm':
      return {k: v[0] for k, v in pack_windows(item[None]).items()}
    if self.objective == 'masked_lm':
      return self._masked_example(item, rng)
    return self._span_example(item, rng)

  def _masked_example(self, item, rng) -> Example:
    if self.next_sentence:
      example = masking.sentence_pair(item, rng, self.seq_len)
    else:
      segment_ids, positions = _segments_and_positions(item)
      example = {'inputs': item.astype(np.int32), 'segment_ids': segment_ids,
                 'positions': positions, 'token_type_ids': np.zeros(self.seq_len, np.int32)}
    ids = example['inputs']
    starts = None if self.word_starts is None else self.word_starts[ids]
    example.update(masking.mask_tokens(ids, rng, self.vocab_size, self.mask_rate, starts))
    return example

  def _span_example(self, item, rng) -> Example:
    inputs, targets = spans.corrupt_spans(item.astype(np.int32), rng, self.noise_density,
                                          self.mean_span_length)
    pad = lambda x, n: np.pad(x, (0, n - len(x)))
    real = lambda x, n: (np.arange(n) < len(x)).astype(np.int32)
    t = self.targets_length
    decoder_inputs = np.concatenate([[PAD_ID], targets[:-1]])  # T5 starts decoding from pad
    return {'encoder_inputs': pad(inputs, self.seq_len),
            'encoder_segment_ids': real(inputs, self.seq_len),
            'encoder_positions': np.arange(self.seq_len, dtype=np.int32) * real(inputs, self.seq_len),
            'decoder_inputs': pad(decoder_inputs, t).astype(np.int32),
            'decoder_segment_ids': real(targets, t),
            'decoder_positions': np.arange(t, dtype=np.int32) * real(targets, t),
            'targets': pad(targets, t), 'weights': real(targets, t).astype(np.float32)}


class _SentencePairs:
  """`count` next-sentence examples per epoch; item i is the list of documents (the
  pair itself is drawn by the per-example rng)."""

  def __init__(self, documents: list[np.ndarray], count: int):
    self.documents, self.count = documents, count

  def __len__(self) -> int:
    return self.count

  def __getitem__(self, i: int) -> list[np.ndarray]:
    return self.documents


def _check_enough_tokens(split: str, tokens: np.ndarray, task: Task, min_windows: int) -> None:
  if task.num_windows(tokens) < min_windows:
    raise ValueError(f'The {split} split has {len(tokens):,} tokens, too few for {min_windows} '
                     f'example(s) of data.seq_len={task.seq_len}; lower data.seq_len (or '
                     'data.batch_size) or use a larger corpus.')


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


def train_iterator(task: Task, tokens: np.ndarray, local_batch: int, seed: int,
                   shard_index: int, shard_count: int) -> grain.DatasetIterator:
  """Shuffled (differently each epoch, same for the same seed), repeated, and this
  process's rows of each global batch."""
  stream = (grain.MapDataset.source(task.source(tokens))
            .shuffle(seed=_shuffle_seed(seed)).repeat()
            .random_map(task.make_example, seed=seed))
  dataset = (grain.MapDataset.source(_RowsOfProcess(stream, local_batch, shard_index, shard_count))
             .batch(local_batch, drop_remainder=True))
  # Two reader threads suffice for memmap slices and leave the cores to XLA.
  return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=8)))


def eval_batches(task: Task, tokens: np.ndarray, local_batch: int, shard_index: int,
                 shard_count: int, seed: int = 0) -> Iterator[Batch]:
  """Every validation example once, in order, with fixed masks / spans; the last batch is
  padded with weight-0 rows. Every process yields the same number of batches."""
  source = task.source(tokens)
  examples = grain.MapDataset.source(source).random_map(task.make_example, seed=seed)
  per_process = -(-len(source) // shard_count)
  mine = range(shard_index, len(source), shard_count)
  for start in range(0, per_process, local_batch):
    rows = [examples[i] for i in mine[start:start + local_batch]]
    template = rows[0] if rows else examples[0]
    rows += [{k: np.zeros_like(v) for k, v in template.items()}] * (local_batch - len(rows))
    yield {k: np.stack([row[k] for row in rows]) for k in template}


def _cache_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  if config.data.cache_dir:
    return config.data.cache_dir
  return os.path.join(os.path.dirname(os.path.abspath(workdir)), 'data_cache')


def _tokenizer(config, workdir: str, cache_dir: str, train_id: list, train_docs) -> Tokenizer:
  """The workdir's tokenizer, else one from the cache, else one trained on the train split.
  With several processes, process 0 makes it and the others read its file."""
  path = os.path.join(workdir, 'tokenizer.model')
  if os.path.exists(path):
    logging.info('Using the run\'s tokenizer %s', path)
  elif jax.process_index() == 0:
    t = config.data.tokenizer
    key = token_cache.cache_key(train_id, t.type, t.vocab_size, t.byte_fallback,
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
    else:
      logging.info('Reusing the cached tokenizer %s.model', prefix)
    os.makedirs(workdir, exist_ok=True)
    shutil.copyfile(prefix + '.model', f'{path}.tmp{os.getpid()}')
    os.replace(f'{path}.tmp{os.getpid()}', path)  # a killed copy never leaves a broken tokenizer
  if jax.process_count() > 1:  # every process passes here exactly once
    multihost_utils.sync_global_devices('tokenizer.model written')
  return Tokenizer(path)


def build_data(config: ml_collections.ConfigDict, workdir: str,
               objective: str = 'causal_lm') -> Data:
  """Tokenizer, train iterator and eval batches of `objective` ('causal_lm' |
  'masked_lm' | 'span_corruption') for a run; builds caches once."""
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
  task = make_task(config, tokenizer, objective)
  _check_enough_tokens('train', tokens['train'], task, d.batch_size)
  _check_enough_tokens('eval', tokens['eval'], task, 1)

  shard = (jax.process_index(), jax.process_count())
  return Data(
      tokenizer=tokenizer, task=task,
      train_iter=train_iterator(task, tokens['train'], local_batch, config.seed, *shard),
      make_eval_iter=lambda: eval_batches(task, tokens['eval'], local_batch, *shard),
      train_tokens=len(tokens['train']))


def make_task(config: ml_collections.ConfigDict, tokenizer: Tokenizer, objective: str) -> Task:
  m, s = config.masked_lm, config.span_corruption
  return Task(objective=objective,
              seq_len=config.data.seq_len, vocab_size=tokenizer.vocab_size,
              mask_rate=m.mask_rate, next_sentence=m.next_sentence,
              word_starts=tokenizer.word_starts if m.whole_word else None,
              noise_density=s.noise_density, mean_span_length=s.mean_span_length)
