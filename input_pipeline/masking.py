"""BERT's masked-LM inputs and next-sentence pairs, in NumPy (one example at a time).

Of the ordinary tokens of a row (not the tokenizer's special ids: padding, EOS, ...),
exactly round(mask_rate * n) are chosen uniformly at random (whole words when word
starts are given, never more than that count: as many as whole words can make); of the
chosen, 80% become [MASK], 10% a random ordinary token and 10% stay as they were. Only
chosen positions are scored. Special ids come from the tokenizer (`SpecialIds`).
"""
import numpy as np

from input_pipeline.tokenizer import SpecialIds

Example = dict[str, np.ndarray]


def choose_positions(ids_T: np.ndarray, rng: np.random.Generator, mask_rate: float,
                     word_starts_T: np.ndarray | None = None, *,
                     special: SpecialIds) -> np.ndarray:
  """Boolean [T]: the positions to predict (whole words when `word_starts_T` is given)."""
  eligible_T = ~special.is_special(ids_T)
  num_chosen = int(round(mask_rate * eligible_T.sum()))
  if word_starts_T is None:
    scores_T = np.where(eligible_T, rng.random(ids_T.shape), np.inf)
    chosen_T = np.zeros_like(eligible_T)
    chosen_T[np.argsort(scores_T, kind='stable')[:num_chosen]] = True
    return chosen_T
  # A word is a start token and the continuation tokens after it. Words are taken in a
  # random order, each one if the count it leaves can still be made exactly from the
  # words after it, so the chosen tokens total num_chosen whenever some set of whole
  # words does (else the largest total below it) and never overshoot.
  word_ids_T = np.cumsum(word_starts_T | ~eligible_T) * eligible_T  # 0: not eligible
  words_W = rng.permutation(np.unique(word_ids_T[word_ids_T > 0]))
  lengths_W = np.bincount(word_ids_T, minlength=word_ids_T.max() + 1)[words_W]
  # Bit s of reachable[i]: some subset of words_W[i:] has s tokens (s <= num_chosen).
  limit = (1 << (num_chosen + 1)) - 1
  reachable = [1] * (len(words_W) + 1)
  for i in range(len(words_W) - 1, -1, -1):
    reachable[i] = (reachable[i + 1] | reachable[i + 1] << int(lengths_W[i])) & limit
  remaining = reachable[0].bit_length() - 1  # num_chosen, or the largest total below it
  taken = []
  for i, (word, length) in enumerate(zip(words_W, lengths_W)):
    if remaining == 0:
      break
    if length <= remaining and reachable[i + 1] >> int(remaining - length) & 1:
      taken.append(word)
      remaining -= int(length)
  return np.isin(word_ids_T, taken) & eligible_T


def mask_tokens(ids_T: np.ndarray, rng: np.random.Generator, vocab_size: int,
                mask_rate: float = 0.15, word_starts_T: np.ndarray | None = None, *,
                special: SpecialIds) -> Example:
  """{'inputs': corrupted ids, 'targets': original ids, 'weights': 1.0 where chosen}."""
  chosen_T = choose_positions(ids_T, rng, mask_rate, word_starts_T, special=special)
  action_T = rng.random(ids_T.shape)
  random_T = special.ordinary(rng.integers(0, special.num_ordinary(vocab_size),
                                           size=ids_T.shape))
  inputs_T = np.where(chosen_T & (action_T < 0.8), special.mask, ids_T)
  inputs_T = np.where(chosen_T & (action_T >= 0.8) & (action_T < 0.9), random_T, inputs_T)
  return {'inputs': inputs_T.astype(np.int32), 'targets': ids_T.astype(np.int32),
          'weights': chosen_T.astype(np.float32)}


class Documents:
  """Random access to the documents of at least two tokens in a token array: document i
  is tokens[starts[i]:ends[i]]. Built once (O(documents)); reading one is O(1)."""

  def __init__(self, tokens: np.ndarray, starts: np.ndarray, ends: np.ndarray):
    long_enough = ends - starts >= 2
    self.tokens = tokens
    self.starts = np.asarray(starts[long_enough], np.int64)
    self.ends = np.asarray(ends[long_enough], np.int64)
    if not len(self.starts):
      raise ValueError('Next-sentence pairs need a document of at least 2 tokens; this split '
                       'has none. Use a larger corpus or set masked_lm.next_sentence=False.')

  @classmethod
  def from_list(cls, documents: list[np.ndarray]) -> 'Documents':
    """The index of a list of documents (tests and small corpora)."""
    lengths = np.array([len(d) for d in documents], np.int64)
    ends = np.cumsum(lengths)
    tokens = np.concatenate(documents) if documents else np.zeros(0, np.int32)
    return cls(tokens, ends - lengths, ends)

  def __len__(self) -> int:
    return len(self.starts)

  def __getitem__(self, i: int) -> np.ndarray:
    return np.asarray(self.tokens[self.starts[i]:self.ends[i]])


def sentence_pair(documents: Documents, rng: np.random.Generator, seq_len: int, *,
                  special: SpecialIds) -> Example:
  """`[CLS] A [SEP] B [SEP]` padded to seq_len; B follows A in its document (label 1)
  or comes from another document (label 0), each half of the time. Reads at most two
  documents of the index (documents under 2 tokens are never drawn). 'nsp_weights' is 1 (a padding row of zeros weighs 0)."""
  budget = seq_len - 3
  count = len(documents)
  index = int(rng.integers(count))
  doc = documents[index]
  a_len = int(rng.integers(1, min(budget, len(doc)))) if min(budget, len(doc)) > 1 else 1
  a_len = min(a_len, budget - 1)
  a_start = int(rng.integers(0, len(doc) - a_len))  # leaves at least one token after A
  a_T = doc[a_start:a_start + a_len]
  is_next = bool(rng.random() < 0.5) or count == 1
  if is_next:
    b_T = doc[a_start + a_len:a_start + budget]
  else:  # uniform over the other documents
    other_index = int(rng.integers(count - 1))
    other = documents[other_index + (other_index >= index)]
    b_start = int(rng.integers(0, len(other) - 1))
    b_T = other[b_start:b_start + budget - a_len]
  cls, sep = special.cls, special.sep
  ids_T = np.concatenate([[cls], a_T, [sep], b_T, [sep]]).astype(np.int32)
  length = len(ids_T)
  pad = seq_len - length
  token_type_T = np.concatenate([np.zeros(a_len + 2), np.ones(len(b_T) + 1), np.zeros(pad)])
  return {'inputs': np.pad(ids_T, (0, pad), constant_values=special.pad),
          'token_type_ids': token_type_T.astype(np.int32),
          'segment_ids': (np.arange(seq_len) < length).astype(np.int32),
          'positions': np.where(np.arange(seq_len) < length, np.arange(seq_len), 0).astype(np.int32),
          'nsp_labels': np.int32(is_next), 'nsp_weights': np.float32(1.0)}


def prompt_frame(next_sentence: bool,
                 special: SpecialIds) -> tuple[list[int], list[int]]:
  """The ids training puts before and after a segment's text, for fill-mask prompts:
  `[CLS] ... [SEP]` in next-sentence pairs (segment A); nothing in plain windows (raw
  token-stream windows, no [CLS])."""
  return ([special.cls], [special.sep]) if next_sentence else ([], [])
