"""A progress bar with an ETA on stderr: redrawn in place on a terminal, a log line every
ten seconds otherwise (and nothing on processes other than the first)."""
import sys
import time

import jax

_LOG_EVERY_S = 10.0


def _clock(seconds: float) -> str:
  if seconds != seconds:  # nan: no rate yet
    return '?'
  minutes, seconds = divmod(int(seconds), 60)
  return f'{minutes // 60}:{minutes % 60:02d}:{seconds:02d}'


class Progress:
  """`update(n)` after each n of `total` units are done; `close()` ends the line."""

  def __init__(self, label: str, total: int, unit: str = 'rows', stream=None):
    self.label, self.total, self.unit = label, total, unit
    self.stream = stream or sys.stderr
    self.done, self.start, self.last_log = 0, time.perf_counter(), float('-inf')
    self.enabled = jax.process_index() == 0 and total > 0
    self.tty = self.enabled and self.stream.isatty()

  def update(self, n: int) -> None:
    self.done += n
    if not self.enabled:
      return
    elapsed = time.perf_counter() - self.start
    eta = elapsed / self.done * (self.total - self.done) if self.done else float('nan')
    width = 24
    filled = int(width * self.done / self.total)
    line = (f'{self.label}: [{"#" * filled}{"." * (width - filled)}] {self.done}/{self.total} '
            f'{self.unit}, {_clock(elapsed)} elapsed, ETA {_clock(eta)}')
    if self.tty:
      print('\r' + line, end='', file=self.stream, flush=True)
    elif elapsed - self.last_log >= _LOG_EVERY_S or self.done >= self.total:
      print(line, file=self.stream, flush=True)
      self.last_log = elapsed

  def close(self) -> None:
    if self.tty:
      print(file=self.stream, flush=True)
