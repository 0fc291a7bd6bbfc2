"""Shared fixtures: a tiny corpus and a tiny decoder config that train in seconds."""
import functools
import gc
import os
import random
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Compiling, not running, is most of the time of these tests (tiny models, hundreds of
# programs). XLA's CPU code generation at -O0 with the older loop emitters compiles about
# five times faster; the HLO passes before it (fusion, scheduling, buffer assignment) still
# run, so compiled memory figures stay as they were (within 0.2%). Set before JAX starts;
# flags given in XLA_FLAGS come after these and win.
_FAST_COMPILE = '--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false'
os.environ['XLA_FLAGS'] = f"{_FAST_COMPILE} {os.environ.get('XLA_FLAGS', '')}".strip()

from configs import default  # noqa: E402

# Tracing makes millions of short-lived Python objects; with the default thresholds the
# cyclic garbage collector ran often and, with torch and transformers imported, each full
# collection walked every module's objects (22 s of the fast tier's CPU time; 5 s now).
# Collect less often, and leave what collection imported out of every later walk.
gc.set_threshold(20_000, 20, 20)


def pytest_collection_finish(session):
  gc.collect()
  gc.freeze()


def pytest_unconfigure(config):
  """After this, pytest collects garbage five times over (to report exceptions raised in
  finalizers, still captured here): collected here until nothing is left and what
  survives frozen, those five walk nothing instead of the whole session's objects."""
  for _ in range(5):
    if not gc.collect():
      break
  gc.freeze()


@pytest.fixture(autouse=True)
def decoding_layouts_on_any_backend(monkeypatch):
  """`prepare` lays weights out for speed on a CPU only (inference/generate.py); the tests
  check those layouts' numerics, which hold on any backend, so they are on wherever the
  tests run (the CPU rule has its own test)."""
  from inference import generate
  monkeypatch.setattr(generate, 'lays_out_for_speed', lambda: True)


_SUBJECTS = ['the cat', 'a dog', 'the old king', 'my sister', 'the river', 'a small bird']
_VERBS = ['sees', 'follows', 'remembers', 'carries', 'finds', 'greets']
_OBJECTS = ['the bread', 'a stone', 'the morning light', 'its shadow', 'the gate', 'water']


def write_tiny_corpus(path, num_docs: int = 120, seed: int = 0) -> str:
  """Documents of simple, learnable sentences; the loss of a tiny model falls fast on them."""
  rng = random.Random(seed)
  docs = []
  for _ in range(num_docs):
    sentences = [f'{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}.'
                 for _ in range(rng.randint(3, 8))]
    docs.append(' '.join(sentences).capitalize())
  path.write_text('\n'.join('{"text": "%s"}' % d for d in docs))
  return str(path)


@pytest.fixture(scope='session')
def tiny_corpus(tmp_path_factory):
  return write_tiny_corpus(tmp_path_factory.mktemp('corpus') / 'tiny.jsonl')


def tiny_config(corpus: str, cache_dir: str):
  config = default.get_config()
  config.model.update(num_layers=2, num_heads=2, d_model=32, d_ff=64, max_len=32)
  config.data.update(corpus=corpus, seq_len=32, batch_size=8, cache_dir=cache_dir,
                     eval_fraction=0.1)
  config.data.tokenizer.vocab_size = 512
  config.train.update(steps=80, lr=1e-2, warmup_steps=5, log_every=20, eval_every=40,
                      eval_steps=4, checkpoint_every=10, keep_checkpoints=2)
  return config


@pytest.fixture
def config(tiny_corpus, tmp_path_factory):
  return tiny_config(tiny_corpus, str(tmp_path_factory.getbasetemp() / 'data_cache'))


@functools.lru_cache(maxsize=None)
def initial_params(cfg):
  """Parameters of a model of `cfg` at initialisation (key 0), made once per session (the
  weights do not depend on the example batch's length or contents)."""
  import flax.linen as nn
  import jax
  import tasks
  task = tasks.for_model(cfg)
  return nn.unbox(jax.jit(task.init)(jax.random.key(0), task.example_batch(1, 16)))


@functools.lru_cache(maxsize=None)
def decoding_params(cfg):
  """(task, params) of a model of `cfg` for decoding tests, made once per session: weights
  8x larger than at initialisation, so greedy continuations vary from step to step."""
  import flax.linen as nn
  import jax
  import tasks
  task = tasks.for_model(cfg)
  init = jax.jit(lambda key, batch: jax.tree.map(lambda x: x * 8.0 if x.ndim > 1 else x,
                                                 nn.unbox(task.init(key, batch))))
  return task, init(jax.random.key(0), task.example_batch(1, 16))
