"""models/losses.py first_argmax: jnp.argmax's answer (the first index of the largest
value) from two plain reductions, ties and -inf included; the token loss's 'correct'
sum counts by it."""

import jax
import jax.numpy as jnp
import numpy as np

from models import losses


def _rows_with_ties(rng) -> np.ndarray:
  """[6, 40] float32: random rows, then rows whose largest value repeats (first at index
  0, in the middle, last), one constant row (a zero-initialised head's logits), and one
  with -inf beside its largest value."""
  x = rng.normal(size=(6, 40)).astype(np.float32) * 5
  x[1, [3, 17, 39]] = x[1].max() + 1.0
  x[2, [0, 5]] = x[2].max() + 2.0
  x[3, [38, 39]] = x[3].max() + 0.5
  x[4] = 0.0
  x[5, :7] = -np.inf
  return x


def test_first_argmax_equals_jnp_argmax_on_random_values_ties_and_minus_inf():
  rng = np.random.default_rng(0)
  x = _rows_with_ties(rng)
  got = jax.jit(losses.first_argmax)(x)
  assert got.dtype == jnp.int32
  np.testing.assert_array_equal(got, np.argmax(x, axis=-1))
  np.testing.assert_array_equal(got[1:5], [3, 0, 38, 0])
  # Near-equal values: the largest wins by one float32 step, at magnitudes from 1e-30
  # to 1e30; bfloat16 and float16 logits; leading batch axes.
  for scale in (1e-30, 1e-3, 1.0, 1e30):
    y = np.full((2, 3, 50), scale, np.float32)
    y[..., 20] = np.nextafter(np.float32(scale), np.float32(np.inf))
    y[1, 2, 30] = y[1, 2, 20]
    np.testing.assert_array_equal(losses.first_argmax(y), np.argmax(y, axis=-1))
  for dtype in (jnp.bfloat16, jnp.float16):
    z = jnp.asarray(rng.normal(size=(4, 9, 33)), dtype)
    np.testing.assert_array_equal(losses.first_argmax(z), jnp.argmax(z, axis=-1))
  # A row whose largest value is +inf, or that holds a NaN: 0, as the docstring says.
  bad = np.array([[1.0, np.inf, 3.0, np.inf], [1.0, 2.0, np.nan, 3.0]], np.float32)
  np.testing.assert_array_equal(losses.first_argmax(bad), [0, 0])
  # Differences below float32's least normal number: argmax's answer where the backend
  # keeps subnormals; where it flushes them (XLA:CPU) both read the values as equal.
  sub = np.array([[0.0, 1e-45, 0.0], [1e-39, 2e-39, 0.0]], np.float32)
  np.testing.assert_array_equal(losses.first_argmax(sub), jnp.argmax(sub, axis=-1))
  # Integers float32 cannot hold exactly are not cast: 2^24 + 1 beats 2^24.
  ints = np.array([[2 ** 24, 2 ** 24 + 1, 0]], np.int32)
  np.testing.assert_array_equal(losses.first_argmax(ints), [1])


def test_first_argmax_past_what_float32_indexes_exactly_is_argmax():
  x = np.zeros((1, 2 ** 24 + 2), np.float32)
  x[0, -1] = 1.0  # at index 2^24 + 1, which float32 would read as 2^24
  assert int(losses.first_argmax(x)[0]) == 2 ** 24 + 1


def test_cross_entropy_counts_correct_tokens_as_argmax_does():
  """'correct' against a count by jnp.argmax, with tied rows whose target is the first
  largest (counted) or a later one (not counted), and weights."""
  rng = np.random.default_rng(2)
  logits = _rows_with_ties(rng)[None]  # [1, 6, 40]
  targets = np.array([[int(np.argmax(logits[0, 0])), 17, 0, 39, 0, 11]], np.int32)
  weights = np.array([[1.0, 1.0, 2.0, 1.0, 1.0, 0.0]], np.float32)
  _, sums = losses.cross_entropy_sums(jnp.asarray(logits), targets, weights)
  expected = np.sum((np.argmax(logits, -1) == targets) * weights)
  assert float(sums['correct']) == expected == 1.0 + 2.0 + 1.0
