"""Where metrics go: metrics.jsonl, TensorBoard event files and the console (process 0 only)."""
import json
import math
import os
import time

import jax
from absl import logging


class MetricsWriter:
  """Appends one JSON object per logged step and mirrors scalars to TensorBoard."""

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    if not self.enabled:
      return
    from tensorboardX import SummaryWriter  # imported here: only process 0 writes events
    self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')
    self._tb = SummaryWriter(logdir=os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    record = {'step': int(step), **{k: float(v) for k, v in scalars.items()}}
    self._jsonl.write(json.dumps(record) + '\n')
    self._jsonl.flush()
    for name, value in scalars.items():
      self._tb.add_scalar(name, float(value), int(step))
    self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


def format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return '?'
  seconds = int(seconds)
  return f'{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'


class Throughput:
  """Tokens/s and ETA over the steps since the last report (compile time excluded)."""

  def __init__(self, start_step: int, total_steps: int):
    self.total_steps = total_steps
    self._last_step, self._last_time = start_step, None

  def exclude(self, seconds: float) -> None:
    """Leaves time spent outside training steps (evaluation) out of the rate."""
    if self._last_time is not None:
      self._last_time += seconds

  def update(self, step: int, tokens_per_step: int) -> tuple[float, float]:
    now = time.perf_counter()
    if self._last_time is None or step <= self._last_step:  # no timed steps yet
      self._last_step, self._last_time = step, now
      return float('nan'), float('nan')
    seconds_per_step = (now - self._last_time) / max(1, step - self._last_step)
    self._last_step, self._last_time = step, now
    return tokens_per_step / seconds_per_step, seconds_per_step * (self.total_steps - step)


def log_line(step: int, total: int, metrics: dict[str, float], eta_s: float) -> None:
  parts = [f'step {step}/{total}']
  for key, fmt in (('loss', '.4f'), ('eval_loss', '.4f'), ('eval_bits_per_byte', '.4f'),
                   ('lr', '.2e'), ('grad_norm', '.3f'), ('loss_scale', 'g'),
                   ('skipped_steps', '.0f'), ('eval_chrf', '.1f'), ('eval_bleu', '.1f'),
                   ('eval_macro_f1', '.3f'), ('eval_reward_accuracy', '.3f'),
                   ('eval_margin', '.3f'), ('tokens_per_s', ',.0f'), ('mfu', '.1%')):
    if key in metrics and math.isfinite(metrics[key]):
      parts.append(f'{key} {format(metrics[key], fmt)}')
  parts.append(f'eta {format_duration(eta_s)}')
  logging.info(' | '.join(parts))
