"""Documents tokenized once into a memory-mapped file of ids, each document ending in the
tokenizer's eos (and starting with its bos where it adds one, as Llama's does).

Files are keyed by what they depend on (corpus, split, tokenizer), written to a
temporary name and renamed into place, so a killed process never leaves half a file
and a later run reuses the finished one.
"""
import hashlib
import json
import os
import time

import numpy as np
from absl import logging

from input_pipeline.tokenizer import Tokenizer

_DOCS_PER_CHUNK = 4096  # bounds the memory of Python id lists while tokenizing


def cache_key(*parts) -> str:
  return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def _write_atomically(path: str, write):
  """Returns write(tmp_path)'s result once tmp_path has been renamed to `path`."""
  tmp = f'{path}.tmp{os.getpid()}'
  try:
    result = write(tmp)
    os.replace(tmp, path)
    return result
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _write_tokens(docs: list[str], tokenizer: Tokenizer, dtype, path: str) -> int:
  """Streams ids chunk by chunk to `path`; returns the number of tokens."""
  num_tokens = 0
  first = (tokenizer.bos_id,) if tokenizer.adds_bos else ()
  last = (tokenizer.eos_id,)
  with open(path, 'wb') as f:
    for start in range(0, len(docs), _DOCS_PER_CHUNK):
      ids = tokenizer.encode_batch(docs[start:start + _DOCS_PER_CHUNK])
      chunk = np.fromiter((i for doc in ids for i in (*first, *doc, *last)), dtype,
                          sum(len(first) + len(doc) + 1 for doc in ids))
      chunk.tofile(f)
      num_tokens += chunk.size
  return num_tokens


def tokenized(docs_fn, tokenizer: Tokenizer, cache_dir: str, key: str):
  """(read-only tokens memmap, meta dict) for the documents `docs_fn()` returns; calls it
  and tokenizes only when no file for `key` exists yet."""
  os.makedirs(cache_dir, exist_ok=True)
  bin_path = os.path.join(cache_dir, f'tokens-{key}.bin')
  meta_path = os.path.join(cache_dir, f'tokens-{key}.json')
  if os.path.exists(bin_path) and os.path.exists(meta_path):
    logging.info('Reusing token cache %s', bin_path)
  else:
    start = time.time()
    docs = docs_fn()
    dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32
    num_tokens = _write_atomically(bin_path, lambda p: _write_tokens(docs, tokenizer, dtype, p))
    meta = {'num_tokens': num_tokens, 'num_docs': len(docs), 'dtype': np.dtype(dtype).name,
            'num_bytes': sum(len(d.encode('utf-8')) for d in docs)}
    # The meta file is written last: its presence marks a complete token file.
    _write_atomically(meta_path, lambda p: _write_json(meta, p))
    logging.info('Tokenized %d documents into %d tokens in %.1fs: %s', len(docs), num_tokens,
                 time.time() - start, bin_path)
  with open(meta_path) as f:
    meta = json.load(f)
  tokens = np.memmap(bin_path, dtype=meta['dtype'], mode='r', shape=(meta['num_tokens'],))
  return tokens, meta


def _write_json(obj, path: str) -> None:
  with open(path, 'w') as f:
    json.dump(obj, f)
