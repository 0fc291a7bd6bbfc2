"""Property-based tests (hypothesis) of the input pipeline's invariants and of config
overrides: packing (pipeline.pack_windows), masked-LM masking (masking.py), span
corruption (spans.py) and --config.a.b=VALUE overrides of a saved run (run_config.py).

Every test runs a fixed, derandomized set of examples (no example database), so CI is
deterministic; a failure prints the smallest example hypothesis found.
"""
import json
import math

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from configs import default
from input_pipeline import masking, spans
from input_pipeline.pipeline import pack_windows
from tasks.causal_lm import CausalExamples
from input_pipeline.tokenizer import EOS_ID, MASK_ID, NUM_SPECIAL, SENTINEL_IDS
from input_pipeline.tokenizer import TRAINED_SPECIAL_IDS as IDS
from train import run_config

PROPERTY = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                    report_multiple_bugs=False)
seeds = st.integers(0, 2**32 - 1)


# Packing: pack_windows over windows of an EOS-separated token stream.

@st.composite
def token_streams(draw):
  """(stream, seq_len): documents of 0-12 ordinary tokens, each ended by EOS, repeated
  until the stream holds at least one window of seq_len + 1 tokens."""
  docs = draw(st.lists(st.lists(st.integers(2, 60), max_size=12), min_size=1, max_size=10))
  seq_len = draw(st.integers(1, 24))
  stream = [token for doc in docs for token in doc + [EOS_ID]]
  stream *= math.ceil((seq_len + 1) / len(stream))
  return np.asarray(stream, np.int32), seq_len


@PROPERTY
@given(token_streams())
def test_packing_keeps_documents_apart_and_loses_no_token(stream_and_seq_len):
  stream, T = stream_and_seq_len
  windows = CausalExamples(T, eos_id=EOS_ID).source(stream)  # the causal LM's windows
  windows_BW = np.stack([windows[i] for i in range(len(windows))])
  packed = pack_windows(windows_BW, eos_id=EOS_ID)
  inputs, targets = packed['inputs'], packed['targets']
  B = len(windows_BW)
  assert inputs.shape == targets.shape == packed['segment_ids'].shape == (B, T)
  assert (packed['weights'] == 1).all()
  # Inputs and targets are the window, shifted by one; together the rows cover the stream
  # (all but a tail shorter than one window) with no token lost or repeated.
  np.testing.assert_array_equal(np.concatenate([inputs[:, :1], targets], axis=1), windows_BW)
  np.testing.assert_array_equal(inputs.reshape(-1), stream[:B * T])
  np.testing.assert_array_equal(targets.reshape(-1), stream[1:B * T + 1])
  assert len(stream) - 1 - B * T < T
  # Which document each stream token belongs to (an EOS ends, so belongs to, its document),
  # and its offset in that document.
  doc_of = np.concatenate([[0], np.cumsum(stream == EOS_ID)[:-1]])
  doc_start = np.concatenate([[0], np.flatnonzero(stream == EOS_ID) + 1])[doc_of]
  offset_in_doc = np.arange(len(stream)) - doc_start
  for b in range(B):
    window = slice(b * T, b * T + T)
    segment_ids, positions = packed['segment_ids'][b], packed['positions'][b]
    # One segment id per document, 1, 2, ... in the row: tokens of two documents never
    # share one, and the id changes exactly after each EOS.
    np.testing.assert_array_equal(segment_ids, doc_of[window] - doc_of[b * T] + 1)
    np.testing.assert_array_equal(np.diff(segment_ids), inputs[b, :-1] == EOS_ID)
    # Positions restart at 0 at each document start (and at the row's start).
    np.testing.assert_array_equal(positions, np.minimum(offset_in_doc[window], np.arange(T)))


# Masked LM: masking.choose_positions / mask_tokens.

@st.composite
def masking_rows(draw, max_len=96):
  """(ids, vocab_size): a row of ordinary tokens mixed with special ids (pad, EOS, ...)."""
  vocab_size = draw(st.integers(NUM_SPECIAL + 1, 3000))
  n = draw(st.integers(1, max_len))
  rng = np.random.default_rng(draw(seeds))
  ids = rng.integers(NUM_SPECIAL, vocab_size, size=n)
  special = rng.random(n) < draw(st.sampled_from([0.0, 0.1, 0.5, 1.0]))
  ids[special] = rng.integers(0, NUM_SPECIAL, size=special.sum())
  return ids.astype(np.int32), vocab_size


mask_rates = st.floats(0.01, 0.99)


@PROPERTY
@given(masking_rows(), mask_rates, seeds)
def test_mask_count_is_round_of_rate_times_ordinary_tokens(row, mask_rate, seed):
  ids, _ = row
  chosen = masking.choose_positions(ids, np.random.default_rng(seed), mask_rate, special=IDS)
  ordinary = ids >= NUM_SPECIAL
  assert chosen.sum() == round(mask_rate * ordinary.sum())
  assert not chosen[~ordinary].any()


def _words(ids: np.ndarray, starts: np.ndarray) -> list[np.ndarray]:
  """The whole words of a row: a word begins at an ordinary token that starts a word or
  follows a special token, and runs over the ordinary continuation tokens after it.
  Continuation tokens at the row's start (a word cut by the window) belong to no word."""
  words, current = [], None
  for t, (ordinary, start) in enumerate(zip(ids >= NUM_SPECIAL, starts)):
    if not ordinary:
      current = None
    elif start or (t > 0 and ids[t - 1] < NUM_SPECIAL):
      current = [t]
      words.append(current)
    elif current is not None:
      current.append(t)
  return [np.asarray(w) for w in words]


@PROPERTY
@given(masking_rows(max_len=48), mask_rates, seeds, st.floats(0.1, 0.9))
def test_whole_word_masking_takes_whole_words_up_to_the_count(row, mask_rate, seed, p_start):
  ids, _ = row
  rng = np.random.default_rng(seed)
  starts = rng.random(len(ids)) < p_start
  chosen = masking.choose_positions(ids, rng, mask_rate, starts, special=IDS)
  target = round(mask_rate * (ids >= NUM_SPECIAL).sum())
  words = _words(ids, starts)
  in_a_word = np.zeros(len(ids), bool)
  for word in words:
    assert chosen[word].all() or not chosen[word].any(), 'part of a word was chosen'
    in_a_word[word] = True
  assert not chosen[~in_a_word].any()  # never a special token, never a cut word
  # Never more than the count; exactly the count whenever some set of whole words makes
  # it, else the largest total below it that whole words can make.
  totals = {0}
  for word in words:
    totals |= {s + len(word) for s in totals if s + len(word) <= target}
  assert chosen.sum() == max(totals)


@PROPERTY
@given(masking_rows(), mask_rates, seeds, st.booleans())
def test_masking_changes_only_chosen_positions_and_never_to_a_special_id(
    row, mask_rate, seed, whole_word):
  ids, vocab_size = row
  rng = np.random.default_rng(seed)
  starts = rng.random(len(ids)) < 0.5 if whole_word else None
  out = masking.mask_tokens(ids, rng, vocab_size, mask_rate, starts, special=IDS)
  inputs, weights = out['inputs'], out['weights']
  chosen = weights == 1
  assert inputs.dtype == out['targets'].dtype == np.int32 and weights.dtype == np.float32
  np.testing.assert_array_equal(out['targets'], ids)
  assert set(np.unique(weights)) <= {0.0, 1.0}  # chosen positions weigh 1, the others 0
  np.testing.assert_array_equal(inputs[~chosen], ids[~chosen])
  assert not chosen[ids < NUM_SPECIAL].any()
  if not whole_word:
    assert chosen.sum() == round(mask_rate * (ids >= NUM_SPECIAL).sum())
  # A chosen token becomes [MASK], a random ordinary token, or stays: never another special id.
  changed = inputs[chosen]
  assert ((changed == MASK_ID) | ((changed >= NUM_SPECIAL) & (changed < vocab_size))).all()


@pytest.mark.parametrize('mask_rate, special_share', [(0.15, 0.1), (0.4, 0.0), (0.05, 0.3)])
def test_mask_random_keep_split_is_80_10_10_over_many_draws(mask_rate, special_share):
  vocab_size = 30_000  # a random replacement draws the original token 1 time in ~30,000
  rng = np.random.default_rng(1234)
  counts = {'mask': 0, 'random': 0, 'kept': 0}
  replacements = []
  for _ in range(1000):
    ids = rng.integers(NUM_SPECIAL, vocab_size, size=128)
    ids[rng.random(128) < special_share] = EOS_ID
    out = masking.mask_tokens(ids, rng, vocab_size, mask_rate, special=IDS)
    chosen = out['weights'] == 1
    new, old = out['inputs'][chosen], ids[chosen]
    counts['mask'] += (new == MASK_ID).sum()
    counts['kept'] += (new == old).sum()
    is_random = (new != MASK_ID) & (new != old)
    counts['random'] += is_random.sum()
    replacements.append(new[is_random])
  total = sum(counts.values())
  assert total > 4000
  # Loose bounds: more than 5 standard deviations at these counts.
  assert abs(counts['mask'] / total - 0.8) < 0.05, counts
  assert abs(counts['random'] / total - 0.1) < 0.035, counts
  assert abs(counts['kept'] / total - 0.1) < 0.035, counts
  replacements = np.concatenate(replacements)
  assert replacements.min() >= NUM_SPECIAL and replacements.max() < vocab_size
  # Uniform over the ordinary ids: their mean is near the middle of the range.
  middle = (NUM_SPECIAL + vocab_size - 1) / 2
  assert abs(replacements.mean() - middle) < 0.1 * middle


# Span corruption (T5): spans.corrupt_spans, reconstruct, corrupted_lengths, raw_length_for.

def _raw_tokens(n: int, seed: int) -> np.ndarray:
  """Ordinary tokens with document-ending EOSs among them, as in a window of the stream."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(NUM_SPECIAL, 5000, size=n)
  tokens[rng.random(n) < 0.05] = EOS_ID
  return tokens.astype(np.int32)


def _uncorrupt(inputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
  """The raw tokens from (inputs, targets), written here independently of spans.py: the
  k-th kept span is what precedes sentinel k in the inputs, the k-th noise span what
  follows sentinel k in the targets."""
  is_sentinel = lambda x: np.isin(x, SENTINEL_IDS)
  kept = np.split(inputs[:-1], np.flatnonzero(is_sentinel(inputs[:-1])))
  noise = np.split(targets[:-1], np.flatnonzero(is_sentinel(targets[:-1])))
  # kept: [span0, <s0> span1, <s1> span2, ...]; noise: [[], <s0> noise0, <s1> noise1, ...]
  pieces = [kept[0]]
  for k in range(1, len(noise)):
    assert noise[k][0] == kept[k][0] == SENTINEL_IDS[k - 1], 'sentinels out of order'
    pieces += [noise[k][1:], kept[k][1:]]
  return np.concatenate(pieces)


noise_densities = st.floats(0.01, 0.99)  # the config allows (0, 1)
mean_span_lengths = st.floats(1.0, 10.0)  # the config allows >= 1


@PROPERTY
@given(st.integers(2, 600), noise_densities, mean_span_lengths, seeds)
def test_span_corruption_round_trips_to_the_raw_tokens(n, noise_density, mean_span_length, seed):
  input_length, target_length = spans.corrupted_lengths(n, noise_density, mean_span_length)
  num_spans = (input_length + target_length - n - 2) // 2
  num_noise = target_length - 1 - num_spans
  tokens = _raw_tokens(n, seed)
  inputs, targets = spans.corrupt_spans(tokens, np.random.default_rng(seed), noise_density,
                                        mean_span_length, special=IDS)
  assert (len(inputs), len(targets)) == (input_length, target_length)
  assert inputs[-1] == targets[-1] == EOS_ID
  assert 1 <= num_spans <= len(SENTINEL_IDS) and 1 <= num_noise < n
  # Spans alternate kept / noise, kept first, none empty: no two sentinels touch.
  for seq in (inputs, np.concatenate([targets, [EOS_ID]])):
    s = np.isin(seq, SENTINEL_IDS)
    assert not (s[:-1] & s[1:]).any()
  assert not np.isin(inputs[0], SENTINEL_IDS) and targets[0] == SENTINEL_IDS[0]
  np.testing.assert_array_equal(_uncorrupt(inputs, targets), tokens)
  np.testing.assert_array_equal(spans.reconstruct(inputs, targets, special=IDS), tokens)


@PROPERTY
@given(st.integers(2, 600), noise_densities, mean_span_lengths, seeds)
@example(n=10, noise_density=0.6, mean_span_length=1.0, seed=0)
def test_span_corruption_accepts_every_allowed_setting(n, noise_density, mean_span_length, seed):
  inputs, targets = spans.corrupt_spans(_raw_tokens(n, seed), np.random.default_rng(seed),
                                        noise_density, mean_span_length, special=IDS)
  np.testing.assert_array_equal(_uncorrupt(inputs, targets), _raw_tokens(n, seed))


@PROPERTY
@given(st.integers(4, 1024), noise_densities, mean_span_lengths)
@example(seq_len=128, noise_density=0.15, mean_span_length=1.0)
def test_raw_length_is_the_most_raw_tokens_whose_corrupted_input_fits(
    seq_len, noise_density, mean_span_length):
  raw, target_length = spans.raw_length_for(seq_len, noise_density, mean_span_length)
  input_length, length = spans.corrupted_lengths(raw, noise_density, mean_span_length)
  assert length == target_length
  assert input_length <= seq_len, f'{raw} raw tokens corrupt to {input_length} > {seq_len}'
  assert spans.corrupted_lengths(raw + 1, noise_density, mean_span_length)[0] > seq_len


# Config overrides of a saved run: run_config.saved_config.

def _fields(config, prefix=''):
  for name, value in config.items():
    yield prefix + name, value
    if hasattr(value, 'items'):
      yield from _fields(value, f'{prefix}{name}.')


_FIELDS = dict(_fields(default.get_config()))
_BOOLS = sorted(f for f, v in _FIELDS.items() if isinstance(v, bool))
_INTS = sorted(f for f, v in _FIELDS.items() if isinstance(v, int) and not isinstance(v, bool))
_FLOATS = sorted(f for f, v in _FIELDS.items() if isinstance(v, float))
_GROUPS = sorted(f for f, v in _FIELDS.items() if hasattr(v, 'items'))


# Override values: what a user might type, near misses of numbers and booleans included
# ('1_0', ' 7', '1e3', '٣' (an Arabic-Indic digit), 'nan', 'tru').
override_texts = st.text(alphabet='0123456789 .-+_eEnaitfrusyNI\t٣x', max_size=8)


def _parses(kind, text: str) -> bool:
  try:
    kind(text)
    return True
  except ValueError:
    return False


@pytest.fixture(scope='module')
def saved_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('saved_run')
  (workdir / 'config.json').write_text(json.dumps({'train': {'steps': 7}}))
  return str(workdir)


def _fails_naming(workdir: str, field: str, value: str) -> str:
  with pytest.raises(ValueError) as error:
    run_config.saved_config(workdir, [f'--config.{field}={value}'])
  message = str(error.value)
  assert f'--config.{field}' in message, message
  assert '\n' not in message, message
  return message


@pytest.mark.parametrize('field, value', [
    ('train.steps', 'abc'), ('train.steps', '1.5'), ('train.steps', ''), ('seed', '1e3'),
    ('model.scan_layers', 'maybe'), ('model.scan_layers', 'yes'), ('train.lr', 'fast'),
    ('data.tokenizer.vocab_size', '4k'), ('model', 'abc'), ('data.tokenizer', 'bpe'),
])
def test_an_override_of_the_wrong_type_fails_naming_the_field(saved_run, field, value):
  _fails_naming(saved_run, field, value)


@PROPERTY
@given(st.data())
def test_any_unparseable_override_fails_naming_the_field(saved_run, data):
  kind = data.draw(st.sampled_from(['int', 'float', 'bool', 'group']))
  if kind == 'int':
    field = data.draw(st.sampled_from(_INTS))
    value = data.draw(override_texts.filter(lambda s: not _parses(int, s)))
  elif kind == 'float':
    field = data.draw(st.sampled_from(_FLOATS))
    value = data.draw(override_texts.filter(lambda s: not _parses(float, s)))
  elif kind == 'bool':
    field = data.draw(st.sampled_from(_BOOLS))
    value = data.draw(override_texts.filter(lambda s: s.lower() not in ('true', 'false', '1', '0')))
  else:
    field, value = data.draw(st.sampled_from(_GROUPS)), data.draw(override_texts)
  _fails_naming(saved_run, field, value)


@PROPERTY
@given(st.data())
def test_a_well_typed_override_is_applied_and_the_rest_kept(saved_run, data):
  kind = data.draw(st.sampled_from(['int', 'float', 'bool']))
  if kind == 'int':
    field, value = data.draw(st.sampled_from(_INTS)), data.draw(st.integers(-10**12, 10**12))
    text = str(value)
  elif kind == 'float':
    field = data.draw(st.sampled_from(_FLOATS))
    value = data.draw(st.floats(allow_nan=False))
    text = repr(value)
  else:
    field = data.draw(st.sampled_from(_BOOLS))
    text = data.draw(st.sampled_from(['true', 'True', 'FALSE', 'false', '1', '0']))
    value = text.lower() in ('true', '1')
  config = run_config.saved_config(saved_run, [f'--config.{field}={text}', '--json'])
  node = config
  for name in field.split('.'):
    node = node[name]
  assert node == value and type(node) is type(_FIELDS[field])
  if field != 'train.steps':
    assert config.train.steps == 7  # the saved run's own value
