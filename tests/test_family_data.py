"""Masked-LM masking, next-sentence pairs and T5 span corruption."""
import numpy as np
import pytest

from input_pipeline import masking, spans
from input_pipeline.tokenizer import CLS_ID, EOS_ID, MASK_ID, NUM_SPECIAL, PAD_ID, SENTINEL_IDS, SEP_ID
from input_pipeline.tokenizer import TRAINED_SPECIAL_IDS as IDS

VOCAB = 1000


def test_masking_statistics_match_bert():
  rng = np.random.default_rng(0)
  rows = 2000
  ids = rng.integers(NUM_SPECIAL, VOCAB, size=(rows, 128))
  ids[:, ::16] = EOS_ID  # special tokens are never chosen
  ids[:, -8:] = PAD_ID
  chosen = masked = replaced = kept = 0
  for row in ids:
    out = masking.mask_tokens(row, rng, VOCAB, 0.15, special=IDS)
    picked = out['weights'] > 0
    assert not picked[row < NUM_SPECIAL].any()
    np.testing.assert_array_equal(out['targets'], row)
    np.testing.assert_array_equal(out['inputs'][~picked], row[~picked])
    chosen += picked.sum()
    masked += (out['inputs'][picked] == MASK_ID).sum()
    kept += (out['inputs'][picked] == row[picked]).sum()
    replaced += ((out['inputs'][picked] != row[picked]) & (out['inputs'][picked] != MASK_ID)).sum()
  eligible = (ids >= NUM_SPECIAL).sum()
  assert abs(chosen / eligible - 0.15) < 0.01
  assert abs(masked / chosen - 0.8) < 0.01
  assert abs(replaced / chosen - 0.1) < 0.01
  assert abs(kept / chosen - 0.1) < 0.011  # a random replacement can draw the same token


def test_whole_word_masking_chooses_entire_words():
  rng = np.random.default_rng(1)
  for _ in range(200):
    ids = rng.integers(NUM_SPECIAL, VOCAB, size=64)
    starts = rng.random(64) < 0.4
    starts[0] = True
    out = masking.mask_tokens(ids, rng, VOCAB, 0.15, word_starts_T=starts, special=IDS)
    picked = out['weights'] > 0
    word = np.cumsum(starts)
    for w in np.unique(word[picked]):
      assert picked[word == w].all()  # never part of a word
    assert picked.sum() >= round(0.15 * 64)


def test_sentence_pairs_have_the_bert_layout_and_half_are_true_next():
  rng = np.random.default_rng(2)
  documents = masking.Documents.from_list(
      [np.arange(1000 * d, 1000 * d + 300) + NUM_SPECIAL for d in range(5)])
  labels = []
  for _ in range(400):
    ex = masking.sentence_pair(documents, rng, 32, special=IDS)
    ids, types, length = ex['inputs'], ex['token_type_ids'], int(ex['segment_ids'].sum())
    seps = np.flatnonzero(ids == SEP_ID)
    assert ids[0] == CLS_ID and len(seps) == 2 and seps[1] == length - 1
    assert (ids[length:] == PAD_ID).all() and (types[seps[0] + 1:length] == 1).all()
    a, b = ids[1:seps[0]], ids[seps[0] + 1:seps[1]]
    follows = b[0] == a[-1] + 1
    assert follows == bool(ex['nsp_labels'])
    labels.append(int(ex['nsp_labels']))
  assert 0.4 < np.mean(labels) < 0.6


def test_span_corruption_round_trips_and_has_the_configured_statistics():
  rng = np.random.default_rng(3)
  spans_count = span_tokens = total = 0
  for _ in range(500):
    tokens = rng.integers(NUM_SPECIAL, VOCAB, size=int(rng.integers(50, 200)))
    inputs, targets = spans.corrupt_spans(tokens, rng, 0.15, 3.0, special=IDS)
    np.testing.assert_array_equal(spans.reconstruct(inputs, targets, special=IDS), tokens)
    assert inputs[-1] == EOS_ID and targets[-1] == EOS_ID
    sentinels = np.isin(targets, SENTINEL_IDS)
    spans_count += sentinels.sum()
    span_tokens += len(targets) - 1 - sentinels.sum()
    total += len(tokens)
    assert not np.isin(tokens, SENTINEL_IDS).any()
  assert abs(span_tokens / total - 0.15) < 0.015
  assert abs(span_tokens / spans_count - 3.0) < 0.3


@pytest.mark.parametrize('inputs_length', [32, 128, 512])
def test_raw_length_fills_the_encoder_input(inputs_length):
  raw, targets_length = spans.raw_length_for(inputs_length, 0.15, 3.0)
  inputs, targets = spans.corrupt_spans(np.arange(raw) + NUM_SPECIAL, np.random.default_rng(0),
                                        special=IDS)
  assert inputs_length - 2 <= len(inputs) <= inputs_length
  assert len(targets) == targets_length
