"""Documents tokenized once into a memory-mapped file of ids, each document ending in EOS.

Files are keyed by what they depend on (corpus, split, tokenizer), written to a
temporary name and renamed into place, so a killed process never leaves half a file.
"""
import hashlib
import json
import os
import time

import numpy as np
from absl import logging

from input_pipeline.tokenizer import EOS_ID, Tokenizer


def cache_key(*parts) -> str:
  return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def _write_atomically(path: str, write) -> None:
  tmp = f'{path}.tmp{os.getpid()}'
  write(tmp)
  os.replace(tmp, path)


def tokenized(docs_fn, tokenizer: Tokenizer, cache_dir: str, key: str):
  """(tokens memmap, meta dict) for the documents that `docs_fn()` returns; tokenizes
  and writes only when no file for `key` exists yet."""
  os.makedirs(cache_dir, exist_ok=True)
  bin_path = os.path.join(cache_dir, f'tokens-{key}.bin')
  meta_path = os.path.join(cache_dir, f'tokens-{key}.json')
  if not (os.path.exists(bin_path) and os.path.exists(meta_path)):
    start = time.time()
    docs = docs_fn()
    dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32
    ids = tokenizer.encode_batch(docs)
    lengths = np.fromiter((len(d) + 1 for d in ids), np.int64, len(ids))
    tokens = np.empty(int(lengths.sum()), dtype)
    ends = np.cumsum(lengths)
    for doc_ids, end, length in zip(ids, ends, lengths):
      tokens[end - length:end - 1] = doc_ids
      tokens[end - 1] = EOS_ID
    meta = {'num_tokens': int(tokens.size), 'num_docs': len(docs), 'dtype': np.dtype(dtype).name,
            'num_bytes': sum(len(d.encode('utf-8')) for d in docs)}
    _write_atomically(bin_path, lambda p: tokens.tofile(p))
    _write_atomically(meta_path, lambda p: open(p, 'w').write(json.dumps(meta)))
    logging.info('Tokenized %d documents into %d tokens in %.1fs: %s', len(docs),
                 tokens.size, time.time() - start, bin_path)
  with open(meta_path) as f:
    meta = json.load(f)
  return np.memmap(bin_path, dtype=meta['dtype'], mode='r', shape=(meta['num_tokens'],)), meta
