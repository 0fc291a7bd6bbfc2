"""Batched scoring and generation for evaluation tasks.

Rows (a task's `scoring_rows` or `rolling_rows`: unpadded numpy arrays by name) of many
examples, all choices of several examples, go through one compiled call per batch. A batch
takes `batch_size` rows, longest first (the largest batch runs first, so running out of
memory shows at once), and pads each array to a bucket of its length: a power of two from
16, capped at the context. Short batches are filled with empty rows. Every batch has one
of a few shapes, so a task compiles a few times, not once per example; padding is
segment 0 and weight 0, so it changes no score.

Generation decodes `batch_size` prompts at a time, left-padded to a bucket of their length,
greedily or by beam search (inference/beam.py), over weights prepared once for every
batch; a short batch is filled with copies of its first prompt (dropped). Each shape
compiles once per bucket, not once per batch. Decoding stops at the task's first stop id;
the text ends at the first of any (`Task.generation_stop_ids`).
"""
import functools

import jax
import numpy as np

from evals.progress import Progress
from inference import beam, generate as generate_lib
from inference.generate import Request
from inference.sampling import Sampling
from input_pipeline.tokenizer import Tokenizer
from tasks.base import Task

MIN_BUCKET = 16


def bucket(length: int, cap: int) -> int:
  """The padded length of `length`: the next power of two from MIN_BUCKET, at most `cap`
  (and never less than `length`)."""
  padded = MIN_BUCKET
  while padded < length:
    padded *= 2
  return max(length, min(padded, cap))


def pad_batch(rows: list[dict], batch_size: int, cap: int) -> dict[str, np.ndarray]:
  """[batch_size, bucket] arrays of `rows`, zeros after each row and after the last row."""
  batch = {}
  for key, first in rows[0].items():
    array = np.zeros((batch_size, bucket(max(len(r[key]) for r in rows), cap)), first.dtype)
    for i, row in enumerate(rows):
      array[i, :len(row[key])] = row[key]
    batch[key] = array
  return batch


@functools.partial(jax.jit, static_argnames='lm')
def _loglikelihoods(params, batch, *, lm: Task):
  return lm.loglikelihoods(params, batch)


def loglikelihoods(lm: Task, params, rows: list[dict], batch_size: int, cap: int,
                   progress: Progress | None = None) -> np.ndarray:
  """Each row's Σ weights · log p(target) (float64 [R]), in batches of `batch_size`."""
  order = sorted(range(len(rows)), key=lambda i: -max(len(v) for v in rows[i].values()))
  scores_R = np.zeros(len(rows))
  for start in range(0, len(rows), batch_size):
    chosen = order[start:start + batch_size]
    batch = pad_batch([rows[i] for i in chosen], batch_size, cap)
    scores_R[chosen] = np.asarray(_loglikelihoods(params, batch, lm=lm))[:len(chosen)]
    if progress:
      progress.update(len(chosen))
  return scores_R


def _right_aligned(prompts: list[list[int]], width: int, pad_id: int):
  """(ids [B, width], real [B, width]): each prompt at the right end of its row."""
  ids = np.full((len(prompts), width), pad_id, np.int32)
  real = np.zeros((len(prompts), width), np.int32)
  for row, prompt in enumerate(prompts):
    ids[row, width - len(prompt):], real[row, width - len(prompt):] = prompt, 1
  return ids, real


def _until_stop(row, stop_ids) -> list[int]:
  """The ids of `row` up to its first stop id (kept), or all of them."""
  ends = np.flatnonzero(np.isin(row, stop_ids))
  return (row[:ends[0] + 1] if len(ends) else row).tolist()


def generate(lm: Task, params, tokenizer: Tokenizer, prompts: list[list[int]],
             max_new_tokens: int, beam_size: int, batch_size: int,
             stop_ids: tuple[int, ...], progress: Progress | None = None) -> list[list[int]]:
  """New ids after each prompt (greedy, or beam search with `beam_size` beams), ending at
  the first of `stop_ids` (kept; decoding stops at stop_ids[0]) or after max_new_tokens."""
  decoder = lm.decoding_task(tokenizer)
  stop_ids = tuple(int(i) for i in stop_ids)
  cap = lm.cfg.max_len - max_new_tokens  # the longest prompt a decoder can continue
  if beam_size:
    beam.check_beam_size(beam_size)
  # prepare() checks every prompt and unrolls scanned layers once for all batches.
  decoder, params, _, _ = generate_lib.prepare(decoder, params, prompts, max_new_tokens, 'none',
                                               rows=batch_size * max(beam_size, 1))
  outputs = []
  for start in range(0, len(prompts), batch_size):
    chunk = prompts[start:start + batch_size]
    filled = chunk + [chunk[0]] * (batch_size - len(chunk))  # dropped below
    width = bucket(max(len(p) for p in chunk), cap)
    ids, real = _right_aligned(filled, width, tokenizer.pad_id)
    if beam_size:
      new = beam.search(decoder, params, ids, real, max_new_tokens, beam_size,
                        Request.length_penalty, stop_ids[0])
    else:
      new = np.asarray(generate_lib.decode_tokens(
          params, ids, real, jax.random.key(0), task=decoder, max_new_tokens=max_new_tokens,
          sampling=Sampling(temperature=0.0), eos_id=stop_ids[0]))
    outputs += [_until_stop(np.asarray(row, np.int64), stop_ids) for row in new[:len(chunk)]]
    if progress:
      progress.update(len(chunk))
  return outputs
