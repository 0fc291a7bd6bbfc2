"""Throughput and latency measurements, `python -m benchmarks.NAME`, one JSON line each."""
from typing import Any, Callable, NamedTuple


class Program(NamedTuple):
  """A benchmark's compiled function, ready to run, so that benchmarks/profile.py traces
  exactly what the benchmark times: `run()` calls it once on the benchmark's arguments
  (a train step carries its donated state from call to call) and returns its outputs."""
  compiled: Any  # jax.stages.Compiled: its optimized HLO names the ops a trace shows
  run: Callable[[], Any]
