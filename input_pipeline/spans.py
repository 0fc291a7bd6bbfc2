"""T5 span corruption in NumPy: noise spans become sentinels in the encoder input, and
the target lists each sentinel followed by the tokens it replaced.

    raw:     a b c d e f g h i j
    inputs:  a b <extra_id_0> e f g <extra_id_1> j EOS
    targets: <extra_id_0> c d <extra_id_1> h i EOS

Sentinel and EOS ids are the tokenizer's (`SpecialIds`).
"""
import numpy as np

from input_pipeline.tokenizer import SpecialIds

# T5's 100 sentinels (<extra_id_0..99>) bound the spans of an example. The bound is fixed,
# not the tokenizer's count, because example lengths depend on it and a task sizes its
# decoder without a tokenizer; span corruption needs a tokenizer with this many.
MAX_SPANS = 100


def _counts(num_tokens: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
  """(noise tokens, noise spans) for a sequence of num_tokens raw tokens."""
  num_noise = min(max(int(round(num_tokens * noise_density)), 1), num_tokens - 1)
  # Each noise span follows a kept span, so there are at most as many as kept tokens.
  num_spans = min(max(int(round(num_noise / mean_span_length)), 1), num_noise,
                  num_tokens - num_noise, MAX_SPANS)
  return num_noise, num_spans


def corrupted_lengths(num_tokens: int, noise_density: float,
                      mean_span_length: float) -> tuple[int, int]:
  """(encoder input length, target length) after corrupting num_tokens raw tokens."""
  num_noise, num_spans = _counts(num_tokens, noise_density, mean_span_length)
  return num_tokens - num_noise + num_spans + 1, num_noise + num_spans + 1


def raw_length_for(inputs_length: int, noise_density: float,
                   mean_span_length: float) -> tuple[int, int]:
  """(raw tokens per example, target length): the most raw tokens whose corrupted
  input still fits inputs_length, so packed inputs fill it (to within a token or two,
  where one more raw token would add a span and overflow)."""
  num_tokens = inputs_length
  while num_tokens > 2 and corrupted_lengths(num_tokens, noise_density,
                                             mean_span_length)[0] > inputs_length:
    num_tokens -= 1  # one-token spans: a sentinel per noise token, plus EOS
  while corrupted_lengths(num_tokens + 1, noise_density, mean_span_length)[0] <= inputs_length:
    num_tokens += 1
  return num_tokens, corrupted_lengths(num_tokens, noise_density, mean_span_length)[1]


def _random_partition(total: int, parts: int, rng: np.random.Generator) -> np.ndarray:
  """`parts` positive integers adding up to `total`, uniformly among such partitions."""
  cuts = np.sort(rng.choice(np.arange(1, total), size=parts - 1, replace=False))
  return np.diff(np.concatenate([[0], cuts, [total]]))


def corrupt_spans(tokens_N: np.ndarray, rng: np.random.Generator, noise_density: float = 0.15,
                  mean_span_length: float = 3.0, *,
                  special: SpecialIds) -> tuple[np.ndarray, np.ndarray]:
  """(encoder inputs, targets) for one sequence; spans alternate kept / noise, kept first."""
  num_noise, num_spans = _counts(len(tokens_N), noise_density, mean_span_length)
  noise_lengths = _random_partition(num_noise, num_spans, rng)
  kept_lengths = _random_partition(len(tokens_N) - num_noise, num_spans, rng)
  inputs, targets, start = [], [], 0
  for span, (kept, noise) in enumerate(zip(kept_lengths, noise_lengths)):
    inputs.append(tokens_N[start:start + kept])
    inputs.append([special.sentinels[span]])
    targets.append([special.sentinels[span]])
    targets.append(tokens_N[start + kept:start + kept + noise])
    start += kept + noise
  inputs.append([special.eos])
  targets.append([special.eos])
  return (np.concatenate(inputs).astype(np.int32), np.concatenate(targets).astype(np.int32))


def reconstruct(inputs: np.ndarray, targets: np.ndarray, *, special: SpecialIds) -> np.ndarray:
  """The raw tokens back from (inputs, targets): each sentinel replaced by its span."""
  sentinels = set(special.sentinels)
  spans, current = {}, None
  for token in targets[:-1]:
    if token in sentinels:
      current = spans.setdefault(int(token), [])
    else:
      current.append(int(token))
  out = []
  for token in inputs[:-1]:
    out.extend(spans[int(token)] if token in sentinels else [int(token)])
  return np.asarray(out, np.int32)
