"""Throughput and latency measurements, `python -m benchmarks.NAME`, one JSON line each."""
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from models.config import ModelConfig


class Program(NamedTuple):
  """A benchmark's compiled function, ready to run, so that benchmarks/profile.py traces
  exactly what the benchmark times: `run()` calls it once on the benchmark's arguments
  (a train step carries its donated state from call to call) and returns its outputs."""
  compiled: Any  # jax.stages.Compiled: its optimized HLO names the ops a trace shows
  run: Callable[[], Any]


def best_seconds(runs: dict[Any, Callable[[], Any]], repeats: int = 3,
                 warm_up: bool = True) -> tuple[dict, dict]:
  """({name: best seconds of `repeats` calls}, {name: outputs of a first, untimed call;
  empty without `warm_up`}), JAX results waited for. The repeats take turns, so load
  from other work on a shared machine falls on all alike."""
  outputs = {name: jax.block_until_ready(run()) for name, run in runs.items()} if warm_up else {}
  best = dict.fromkeys(runs, float('inf'))
  for _ in range(repeats):
    for name, run in runs.items():
      start = time.perf_counter()
      jax.block_until_ready(run())
      best[name] = min(best[name], time.perf_counter() - start)
  return best, outputs


def peer_config(num_layers: int, max_len: int, **changes) -> ModelConfig:
  """The decoding benchmarks' peer shape (vocab 8192, 6 heads of 64, d_model 384, d_ff
  1536, learned positions, layer norm, float32) with `num_layers` and `max_len`."""
  fields = dict(vocab_size=8192, num_layers=num_layers, num_heads=6, num_kv_heads=6,
                head_dim=64, d_model=384, d_ff=1536, max_len=max_len, position='learned',
                norm='layernorm', dtype=jnp.dtype(jnp.float32))
  return ModelConfig(**{**fields, **changes})
