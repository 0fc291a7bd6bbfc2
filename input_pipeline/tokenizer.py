"""A sentencepiece tokenizer with fixed special ids.

Ids (the same for every model this project trains):
  0 pad, 1 eos (ends every document), 2 unk,
  3 [MASK], 4 [CLS], 5 [SEP]          (masked LM, next-sentence prediction)
  6..105 <extra_id_0>..<extra_id_99>  (T5 span-corruption sentinels)
then ordinary pieces. The special pieces are sentencepiece control symbols, so no
text ever encodes to them, even text containing the literal string "[MASK]".
There is no bos and no dummy-prefix space, so decode(encode(text)) == text and the
bytes of the pieces add up to the bytes of the text (bits per byte is exact); byte
fallback (on by default) covers characters never seen in training.
"""
import hashlib
import os
import random
import re

import numpy as np
import sentencepiece as spm

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
MASK_ID, CLS_ID, SEP_ID = 3, 4, 5
NUM_SENTINELS = 100
SENTINEL_IDS = tuple(range(6, 6 + NUM_SENTINELS))
NUM_SPECIAL = 6 + NUM_SENTINELS
CONTROL_SYMBOLS = ['[MASK]', '[CLS]', '[SEP]'] + [f'<extra_id_{i}>' for i in range(NUM_SENTINELS)]


def sentinel_id(i: int) -> int:
  return SENTINEL_IDS[i]


def train_tokenizer(texts: list[str], model_prefix: str, vocab_size: int, model_type: str = 'bpe',
                    byte_fallback: bool = True, max_train_bytes: int = 20_000_000) -> str:
  """Trains on lines of `texts` (sampled deterministically up to max_train_bytes);
  returns the path of the .model file."""
  lines = [line for text in texts for line in text.split('\n') if line.strip()]
  random.Random(0).shuffle(lines)
  sample, size = [], 0
  for line in lines:
    if size >= max_train_bytes:
      break
    sample.append(line)
    size += len(line.encode())
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sample), model_prefix=model_prefix, vocab_size=vocab_size,
        model_type=model_type, byte_fallback=byte_fallback, character_coverage=0.9995,
        normalization_rule_name='identity', remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        split_digits=True, allow_whitespace_only_pieces=True,
        pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
        control_symbols=CONTROL_SYMBOLS, user_defined_symbols=['\n'],
        max_sentence_length=1 << 16, num_threads=os.cpu_count() or 1, minloglevel=2)
  except RuntimeError as e:
    if 'Vocabulary size is smaller' in str(e):
      raise ValueError(f'data.tokenizer.vocab_size={vocab_size} is too small to hold the special '
                       'ids, the 256 byte pieces and the characters of this corpus; raise '
                       'data.tokenizer.vocab_size.') from e
    if 'Vocabulary size too high' in str(e):
      bound = re.search(r'<= (\d+)', str(e))
      raise ValueError(f'data.tokenizer.vocab_size={vocab_size} is too large for this corpus; '
                       'lower data.tokenizer.vocab_size'
                       + (f' to at most {bound[1]}.' if bound else '.')) from e
    raise
  return model_prefix + '.model'


class Tokenizer:
  """Encodes text to ids and back; knows how many UTF-8 bytes each id stands for."""

  def __init__(self, model_path: str):
    self.model_path = model_path
    self._sp = spm.SentencePieceProcessor(model_file=model_path)
    self.vocab_size = self._sp.get_piece_size()
    with open(model_path, 'rb') as f:
      self.fingerprint = hashlib.sha256(f.read()).hexdigest()[:16]
    self.bytes_per_token = self._bytes_per_token()
    self.word_starts = np.array([self._starts_word(i) for i in range(self.vocab_size)])

  def _bytes_per_token(self) -> np.ndarray:
    counts = np.zeros(self.vocab_size, np.int32)
    for i in range(self.vocab_size):
      if self._sp.is_control(i) or self._sp.is_unknown(i):
        continue
      if self._sp.is_byte(i):
        counts[i] = 1
      else:
        counts[i] = len(self._sp.id_to_piece(i).replace('\u2581', ' ').encode('utf-8'))
    return counts

  def _starts_word(self, i: int) -> bool:
    """Pieces that begin a word: after a space or a newline, or special ones; byte pieces
    continue whatever came before (they spell out one character)."""
    if self._sp.is_byte(i):
      return False
    piece = self._sp.id_to_piece(i)
    return self._sp.is_control(i) or piece.startswith('\u2581') or piece == '\n'

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    return self._sp.encode(texts, num_threads=os.cpu_count() or 1)

  def decode(self, ids) -> str:
    return self._sp.decode([int(i) for i in ids if 0 < int(i) < self.vocab_size])

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(i)
