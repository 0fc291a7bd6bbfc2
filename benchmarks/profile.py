"""Where a benchmark's time goes, op by op: a jax.profiler trace of its compiled function
and a table of the ops that ran, sorted by time.

python -m benchmarks.profile --bench=train_step|decode [--steps=3] [--out=DIR] [--top=25]
    [--by=op|what] [the benchmark's own flags: --config=... for train_step;
    --batch=8 --new_tokens=... for decode]

Runs one warm-up call and then `steps` calls of what the benchmark times (train_step: one
optimizer step; decode: one whole generation, prefill and every token) under
`jax.profiler.start_trace(DIR, create_perfetto_trace=True)`. DIR (default: a new
temporary directory) then holds the trace (plugins/profile/*/perfetto_trace.json.gz, for
ui.perfetto.dev) and profile.jsonl, the table as one JSON object per op: op (the HLO
instruction), count, total_ms (self time), share, flops and bytes per call, gflop_per_s,
gb_per_s, what (benchmarks/op_table.py says how each is derived).

XLA:CPU's plain dots (most of a train step's products, train/steps.py
`train_compiler_options`) run on Eigen's threads, which the trace does not attribute to
their op: their rows show launch times only (GFLOP/s beyond the machine's), so op time
falls short of wall time. Fused ops, YNNPACK fusions included, show their whole time.
"""
import os
import tempfile

from absl import app, flags

from benchmarks import decode, op_table, train_step
from train import runtime

_BENCH = flags.DEFINE_enum('bench', 'train_step', ['train_step', 'decode'],
                           'The benchmark whose compiled function to profile.')
# allow_override: benchmarks/train_step.py, imported above, has its own --steps.
_STEPS = flags.DEFINE_integer('steps', 3, 'Profiled calls (after one warm-up call).',
                              allow_override=True)
_OUT = flags.DEFINE_string('out', '', 'Directory for the trace and profile.jsonl; '
                           'empty: a new temporary directory.')
_TOP = flags.DEFINE_integer('top', 25, 'Rows of the table printed (profile.jsonl has all).')
_BY = flags.DEFINE_enum('by', 'op', ['op', 'what'],
                        "op: a row per HLO op; what: ops of one description (the same source "
                        "op in each of a decode's loops) merged into one row.")

PROGRAMS = {'train_step': train_step.program_from_flags, 'decode': decode.program_from_flags}


def main(argv):
  del argv
  directory = _OUT.value or tempfile.mkdtemp(prefix='profile_')
  os.makedirs(directory, exist_ok=True)
  rows, totals = op_table.profile(PROGRAMS[_BENCH.value](), _STEPS.value, directory)
  if _BY.value == 'what':
    rows = op_table.rows_by_what(rows)
  print(op_table.format_table(rows[:_TOP.value], totals), flush=True)
  print(f"table: {os.path.join(directory, 'profile.jsonl')}", flush=True)


if __name__ == '__main__':
  runtime.reexec_with_huge_pages()
  app.run(main)
