"""BERT's masked-LM inputs and next-sentence pairs, in NumPy (one example at a time).

Of the ordinary tokens (ids >= NUM_SPECIAL, not padding) of a row, exactly
round(mask_rate * n) are chosen uniformly at random (whole words when word starts
are given); of the chosen, 80% become [MASK], 10% a random ordinary token and 10%
stay as they were. Only chosen positions are scored.
"""
import numpy as np

from input_pipeline.tokenizer import CLS_ID, MASK_ID, NUM_SPECIAL, PAD_ID, SEP_ID

Example = dict[str, np.ndarray]


def choose_positions(ids_T: np.ndarray, rng: np.random.Generator, mask_rate: float,
                     word_starts_T: np.ndarray | None = None) -> np.ndarray:
  """Boolean [T]: the positions to predict (whole words when `word_starts_T` is given)."""
  eligible_T = ids_T >= NUM_SPECIAL
  num_chosen = int(round(mask_rate * eligible_T.sum()))
  if word_starts_T is None:
    scores_T = np.where(eligible_T, rng.random(ids_T.shape), np.inf)
    chosen_T = np.zeros_like(eligible_T)
    chosen_T[np.argsort(scores_T, kind='stable')[:num_chosen]] = True
    return chosen_T
  # A word is a start token and the continuation tokens after it; choose words in a
  # random order until enough tokens are chosen.
  word_ids_T = np.cumsum(word_starts_T | ~eligible_T) * eligible_T  # 0: not eligible
  chosen_T = np.zeros_like(eligible_T)
  for word in rng.permutation(np.unique(word_ids_T[word_ids_T > 0])):
    if chosen_T.sum() >= num_chosen:
      break
    chosen_T |= word_ids_T == word
  return chosen_T


def mask_tokens(ids_T: np.ndarray, rng: np.random.Generator, vocab_size: int,
                mask_rate: float = 0.15, word_starts_T: np.ndarray | None = None) -> Example:
  """{'inputs': corrupted ids, 'targets': original ids, 'weights': 1.0 where chosen}."""
  chosen_T = choose_positions(ids_T, rng, mask_rate, word_starts_T)
  action_T = rng.random(ids_T.shape)
  random_T = rng.integers(NUM_SPECIAL, vocab_size, size=ids_T.shape)
  inputs_T = np.where(chosen_T & (action_T < 0.8), MASK_ID, ids_T)
  inputs_T = np.where(chosen_T & (action_T >= 0.8) & (action_T < 0.9), random_T, inputs_T)
  return {'inputs': inputs_T.astype(np.int32), 'targets': ids_T.astype(np.int32),
          'weights': chosen_T.astype(np.float32)}


def sentence_pair(documents: list[np.ndarray], rng: np.random.Generator, seq_len: int) -> Example:
  """`[CLS] A [SEP] B [SEP]` padded to seq_len; B follows A in its document (label 1)
  or comes from another document (label 0), each half of the time."""
  budget = seq_len - 3
  long_enough = [d for d in documents if len(d) >= 2]
  doc = long_enough[rng.integers(len(long_enough))]
  a_len = int(rng.integers(1, min(budget, len(doc)))) if min(budget, len(doc)) > 1 else 1
  a_len = min(a_len, budget - 1)
  a_start = int(rng.integers(0, len(doc) - a_len))  # leaves at least one token after A
  a_T = doc[a_start:a_start + a_len]
  is_next = bool(rng.random() < 0.5) or len(long_enough) == 1
  if is_next:
    b_T = doc[a_start + a_len:a_start + budget]
  else:
    others = [i for i in range(len(long_enough)) if long_enough[i] is not doc]
    other = long_enough[others[rng.integers(len(others))]]
    b_start = int(rng.integers(0, len(other) - 1))
    b_T = other[b_start:b_start + budget - a_len]
  ids_T = np.concatenate([[CLS_ID], a_T, [SEP_ID], b_T, [SEP_ID]]).astype(np.int32)
  length = len(ids_T)
  pad = seq_len - length
  token_type_T = np.concatenate([np.zeros(a_len + 2), np.ones(len(b_T) + 1), np.zeros(pad)])
  return {'inputs': np.pad(ids_T, (0, pad), constant_values=PAD_ID),
          'token_type_ids': token_type_T.astype(np.int32),
          'segment_ids': (np.arange(seq_len) < length).astype(np.int32),
          'positions': np.where(np.arange(seq_len) < length, np.arange(seq_len), 0).astype(np.int32),
          'nsp_labels': np.int32(is_next)}
