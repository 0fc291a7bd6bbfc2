"""IsoFLOP sweeps: for each compute budget C, several model sizes N, each trained for
D = C / (6 N) tokens (Hoffmann et al. 2022, approach 2), then fitted (scaling/fit.py).

A sweep config (configs/sweeps/*.py) holds a full run config under `base` and the
sweep's own fields (budgets, size_factors, head_dim, aspect_ratio, max_loss_factor,
launch). Sizes are spread around the 20-tokens-per-parameter optimum of each budget
(planner.model_shape). N counts the parameters in matmuls (train/flops.py), so
6 N D is the training compute of the run up to attention.

Each run trains in DIR/runs/NAME through the ordinary loop, so an interrupted run
resumes from its checkpoint. A finished run appends one line to DIR/sweep.jsonl
(status 'done' or 'diverged'); runs already there are skipped on restart.
"""
import dataclasses
import json
import math
import os
import sys

import jax
import ml_collections
from absl import logging

from scaling import estimate, planner
from train import flops

RESULTS = 'sweep.jsonl'


@dataclasses.dataclass(frozen=True)
class SweepRun:
  name: str
  budget: float  # the IsoFLOP budget C this run belongs to
  shape: dict  # model.num_layers, d_model, num_heads, d_ff
  params: int  # N: parameters in matmuls
  steps: int

  def config(self, sweep: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The run's full config: the base with this size and step count."""
    config = ml_collections.ConfigDict(sweep.base.to_dict())
    config.model.update(**self.shape)
    train = config.train
    train.steps = self.steps
    train.warmup_steps = min(train.warmup_steps, max(1, self.steps // 10))
    train.eval_every = train.checkpoint_every = max(1, min(train.checkpoint_every, self.steps))
    train.log_every = max(1, min(train.log_every, self.steps))
    # Well above the loss of a uniform guess.
    train.max_loss = sweep.max_loss_factor * math.log(estimate.embedding_rows(config))
    return config


def plan_runs(sweep: ml_collections.ConfigDict) -> list[SweepRun]:
  """Every run of the sweep, smallest budget first; sizes repeated after rounding to a
  shape are dropped."""
  base = sweep.base
  vocab = estimate.embedding_rows(base)
  tokens_per_step = base.data.batch_size * base.data.seq_len
  matmul_params = {}  # by shape: budgets share sizes, and each count traces the model

  def count(shape: dict) -> int:
    key = tuple(sorted(shape.items()))
    if key not in matmul_params:
      config = ml_collections.ConfigDict(base.to_dict())
      config.model.update(**shape)
      task = estimate.model_task(config)
      matmul_params[key] = flops.matmul_param_count(estimate.abstract_params(task),
                                                    task.output_is_embedding())
    return matmul_params[key]

  runs = []
  for budget in sorted(sweep.budgets):
    optimum = planner.plan(budget, 'rule')['params']
    shapes = []
    for factor in sweep.size_factors:
      shape = planner.model_shape(optimum * factor, vocab, sweep.head_dim, sweep.aspect_ratio)
      shape.pop('params')
      if shape not in shapes:
        shapes.append(shape)
    for shape in shapes:
      n = count(shape)
      steps = max(1, round(budget / (6 * n * tokens_per_step)))
      name = f"C{budget:.3g}_L{shape['num_layers']}_D{shape['d_model']}".replace('+', '')
      runs.append(SweepRun(name, budget, shape, n, steps))
  names = [run.name for run in runs]
  if len(set(names)) != len(names):
    raise ValueError(f'Sweep runs share a name ({names}); make sweep.budgets distinct to 3 '
                     'significant digits.')
  return runs


def read_results(workdir: str) -> dict[str, dict]:
  """Finished runs by name, from DIR/sweep.jsonl."""
  path = os.path.join(workdir, RESULTS)
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return {row['run']: row for row in rows}


def _append(workdir: str, row: dict) -> None:
  if jax.process_index():  # a run over several hosts: process 0 writes for all
    return
  with open(os.path.join(workdir, RESULTS), 'a') as f:
    f.write(json.dumps(row) + '\n')


def run_one(sweep: ml_collections.ConfigDict, run: SweepRun, workdir: str) -> dict:
  """Trains (or resumes) one run and records its result."""
  from train import loop
  config = run.config(sweep)
  tokens_per_step = config.data.batch_size * config.data.seq_len
  row = {'run': run.name, 'flops': run.budget, 'params': run.params,
         'tokens': run.steps * tokens_per_step, 'steps': run.steps,
         'train_flops': 6.0 * run.params * run.steps * tokens_per_step, **run.shape}
  run_dir = os.path.join(workdir, 'runs', run.name)
  try:
    last = loop.train_and_evaluate(config, run_dir)
  except loop.TrainingDiverged as e:
    logging.warning('Run %s diverged: %s', run.name, e)
    row.update(status='diverged', reason=str(e))
  else:
    if last.get('step') != run.steps:  # stopped by a signal: resume later
      return {}
    if 'eval_loss' not in last:  # finished earlier, stopped before it was recorded
      last.update(loop.evaluate(config, run_dir))
    row.update(status='done', eval_loss=last['eval_loss'], loss=last.get('loss'),
               eval_bits_per_byte=last['eval_bits_per_byte'])
  _append(workdir, row)
  return row


def run_sweep(sweep: ml_collections.ConfigDict, workdir: str, only: str | None = None,
              command: str = 'python main.py --mode=sweep --config=CONFIG') -> list[dict]:
  """Runs the sweep's unfinished runs one after another, then writes the fits and plots.

  With launch='print' it prints instead one command per unfinished run for a cluster
  queue (`command` with --sweep_run=NAME: the sweep's own command line, overrides
  included); once they are done, the same sweep command writes the fits and plots.
  """
  os.makedirs(workdir, exist_ok=True)
  runs = plan_runs(sweep)
  if only is not None:
    if only not in {r.name for r in runs}:
      raise ValueError(f'--sweep_run={only} is not a run of this sweep; its runs: '
                       f"{', '.join(r.name for r in runs)}.")
    runs = [r for r in runs if r.name == only]
  finished = read_results(workdir)
  pending = [r for r in runs if r.name not in finished]
  logging.info('Sweep: %d runs, %d finished, %d to run.', len(runs), len(runs) - len(pending),
               len(pending))
  if sweep.launch == 'print' and only is None and pending:
    for run in pending:
      print(f'{command} --sweep_run={run.name}', flush=True)
    print(f'# when they are done, for the fits and plots: {command}', file=sys.stderr)
    return list(finished.values())
  for i, run in enumerate(pending):
    logging.info('Sweep run %d/%d: %s (N=%s, %d steps)', i + 1, len(pending), run.name,
                 f'{run.params:,}', run.steps)
    if not run_one(sweep, run, workdir):
      logging.warning('Sweep stopped; run the same command to resume.')
      return list(read_results(workdir).values())
  rows = list(read_results(workdir).values())
  if only is None and jax.process_index() == 0:
    from scaling import report
    summary = report.write_report(workdir, rows)
    logging.info('Sweep finished: %s', summary)
  return rows
