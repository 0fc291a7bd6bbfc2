"""Task metrics and their standard errors.

A mean over examples (acc, exact_match) has the standard error of the mean, sample
standard deviation / sqrt(n), as lm-evaluation-harness reports. A ratio of sums over
documents (bits per byte: nats over bytes) has the delta method's. chrF is a corpus
statistic, not a mean: its standard error is half the width of sacrebleu's 95% bootstrap
interval divided by 1.96. Two models scored on the same examples compare by the paired
standard error of their per-example differences.
"""
import math

import numpy as np
import sacrebleu

CHRF_BOOTSTRAP = 1000  # resamples for chrF's standard error (sacrebleu's fixed seed)


def mean_and_stderr(values) -> tuple[float, float]:
  values = np.asarray(values, np.float64)
  if len(values) < 2:
    return float(np.mean(values)) if len(values) else float('nan'), float('nan')
  return float(np.mean(values)), float(np.std(values, ddof=1) / math.sqrt(len(values)))


def paired_difference(before, after) -> tuple[float, float]:
  """Mean of after - before over the same examples, in order, and its standard error: the
  paired one, which counts how the two scores of an example go together (the same prompt
  is easy or hard for both models); sqrt(se_before^2 + se_after^2) ignores that."""
  before, after = np.asarray(before, np.float64), np.asarray(after, np.float64)
  if before.shape != after.shape:
    raise ValueError(f'Paired scores need the same examples: {len(before)} before, '
                     f'{len(after)} after.')
  return mean_and_stderr(after - before)


def within_noise(difference: float, stderr: float, z: float = 2.0) -> bool | None:
  """Whether |difference| is at most z standard errors; None where the standard error is
  undefined (NaN: fewer than two examples), which says nothing either way."""
  if math.isnan(stderr) or math.isnan(difference):
    return None
  return abs(difference) <= z * stderr


def majority_baseline(golds) -> tuple[float, int]:
  """(accuracy, choice index) of always answering the most frequent gold position of these
  examples: the best constant answer, which knows their labels' frequencies, so at least
  what a model that learnt only the label distribution (from other examples) scores."""
  counts = np.bincount(np.asarray(golds, np.int64))
  return float(counts.max() / counts.sum()), int(counts.argmax())


def ratio_and_stderr(numerators, denominators) -> tuple[float, float]:
  """Σx / Σy over units (documents) and its delta-method standard error."""
  x, y = np.asarray(numerators, np.float64), np.asarray(denominators, np.float64)
  ratio = float(x.sum() / y.sum())
  n = len(x)
  if n < 2:
    return ratio, float('nan')
  residual = x - ratio * y
  return ratio, float(math.sqrt(n / (n - 1) * np.sum(residual ** 2)) / y.sum())


def choice_scores(loglikelihoods, choices: list[str], gold: int) -> dict:
  """One multiple-choice example: the picks by log-likelihood and by log-likelihood per
  UTF-8 byte of the choice, and whether each is the gold one."""
  ll = np.asarray(loglikelihoods, np.float64)
  per_byte = ll / np.asarray([len(c.encode('utf-8')) for c in choices], np.float64)
  pred, pred_norm = int(np.argmax(ll)), int(np.argmax(per_byte))
  return {'pred': pred, 'pred_norm': pred_norm, 'acc': float(pred == gold),
          'acc_norm': float(pred_norm == gold)}


def chrf(outputs: list[str], references: list[str]) -> tuple[float, float]:
  """Corpus chrF (0-100) and its bootstrap standard error."""
  if len(outputs) < 2:
    return float(sacrebleu.metrics.CHRF().corpus_score(outputs, [references]).score), float('nan')
  score = sacrebleu.metrics.CHRF().corpus_score(outputs, [references], n_bootstrap=CHRF_BOOTSTRAP)
  # The bootstrap's interval has no public accessor; sacrebleu prints it as 'μ ± _ci'.
  return float(score.score), float(score._ci) / 1.96


def sentence_chrf(output: str, reference: str) -> float:
  return float(sacrebleu.metrics.CHRF().sentence_score(output, [reference]).score)


def with_stderr(name: str, mean_stderr: tuple[float, float]) -> dict[str, float]:
  return {name: mean_stderr[0], f'{name}_stderr': mean_stderr[1]}
