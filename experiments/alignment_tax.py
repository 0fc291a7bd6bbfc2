"""The alignment tax of instruction tuning, measured on in-context learning.

Pre-trains a small decoder on the embedded Bible (configs/gpt_tiny.py at data.seq_len =
model.max_len = 256, so every position a 5-shot prompt uses was trained), evaluates it at
0, 1, 3 and 5 shots on the built-in multiple-choice tasks (bible_cloze, bible_book,
bible_genre), fine-tunes it on bible_instruct (configs/sft_tiny.py with init_from), evaluates
the tuned model on the same prompts, and writes a table and a plot of accuracy against shots,
before and after:

  python experiments/alignment_tax.py --workdir=runs/alignment_tax    # est. 40-50 min, 2 cores
  python experiments/alignment_tax.py --workdir=runs/smoke --smoke    # a minute: it runs
  python experiments/alignment_tax.py --workdir=runs/alignment_tax --report_only  # redraw

--base=DIR reuses a pre-trained decoder workdir instead of training one. Each stage resumes:
a rerun skips finished training and re-evaluates. Both models are evaluated at the base's
trained context (min(data.seq_len, model.max_len) of the base run; the tuned run trained on
shorter sequences but keeps the base's positions), so they see the same prompts. Outputs in
--workdir: base/ and sft/ (the runs, with eval/<task>.<K>shot.jsonl per-example scores),
alignment_tax.json (every metric with its standard error, the paired differences, the
baselines), alignment_tax.md (the table) and alignment_tax.png. --report_only re-reads the
per-example files (also the eval/<K>shot/<task>.jsonl of earlier versions) and rewrites the
three outputs without training or evaluating.

Both models answer the same prompts, so a difference is measured per example: its
standard error is the paired one, of the per-example differences after - before (sd / sqrt
n), and the difference is called within noise when it is at most twice that; with fewer
than two examples the standard error is undefined and no call is made. Beside uniform
chance, each task's majority baseline is reported: always answering the most frequent gold
position of the scored examples (for bible_genre, whose choices are the eight genres in a
fixed order, always the most common genre).
"""
import glob
import json
import os
import re
import subprocess
import sys

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TASKS = ('bible_cloze', 'bible_book', 'bible_genre')
METRICS = ('acc', 'acc_norm')

_WORKDIR = flags.DEFINE_string('workdir', 'runs/alignment_tax', 'Where the runs and results go.')
_BASE = flags.DEFINE_string('base', '', 'A pre-trained decoder workdir to reuse (default: '
                            'train one in WORKDIR/base); one trained at data.seq_len < 256 '
                            'never trained the positions that few-shot prompts reach.')
_SHOTS = flags.DEFINE_list('shots', ['0', '1', '3', '5'], 'Demonstrations per prompt.')
_LIMIT = flags.DEFINE_integer('limit', 200, 'Examples per task (0: all, about 700).')
_PRETRAIN_STEPS = flags.DEFINE_integer('pretrain_steps', 600, 'Pre-training steps.')
_SFT_STEPS = flags.DEFINE_integer('sft_steps', 400, 'Instruction-tuning steps.')
_SMOKE = flags.DEFINE_bool('smoke', False, 'A one-layer model, 20 + 10 steps, 16 examples and '
                           '0 and 1 shots: checks the pipeline end to end in minutes.')
_REPORT_ONLY = flags.DEFINE_bool('report_only', False, 'Rewrite the table, JSON and plot from '
                                 'the per-example files of a finished --workdir (every shot '
                                 'count both runs have for all tasks); trains and evaluates '
                                 'nothing.')

_SMOKE_MODEL = ['--config.model.num_layers=1', '--config.model.d_model=64',
                '--config.model.d_ff=176', '--config.model.num_heads=2',
                '--config.data.tokenizer.vocab_size=1024']


def _train(args: list[str], workdir: str, steps: int) -> None:
  """Runs main.py (it resumes, so a finished run only re-reads its data)."""
  from train import checkpointing
  if os.path.isdir(os.path.join(workdir, 'checkpoints')):
    manager = checkpointing.make_manager(workdir, 1)
    done = (manager.latest_step() or 0) >= steps
    manager.close()
    if done:
      print(f'{workdir}: already trained to step {steps}', file=sys.stderr)
      return
  command = [sys.executable, 'main.py', f'--workdir={workdir}', *args,
             f'--config.train.steps={steps}']
  print(' '.join(command), file=sys.stderr, flush=True)
  subprocess.run(command, cwd=ROOT, check=True)


def _pretrain(workdir: str, steps: int, smoke: bool) -> None:
  every = max(1, min(100, steps))
  _train(['--config=configs/gpt_tiny.py', '--config.data.seq_len=256',
          '--config.data.batch_size=8', f'--config.train.eval_every={every}',
          f'--config.train.checkpoint_every={every}',
          f'--config.train.log_every={min(25, every)}',
          f'--config.train.warmup_steps={min(60, max(1, steps // 10))}']
         + (_SMOKE_MODEL + ['--config.train.eval_steps=2'] if smoke else []), workdir, steps)


def _finetune(workdir: str, base: str, steps: int, smoke: bool) -> None:
  every = max(1, min(100, steps))
  _train(['--config=configs/sft_tiny.py', f'--config.init_from={os.path.abspath(base)}',
          f'--config.train.eval_every={every}', f'--config.train.checkpoint_every={every}',
          f'--config.train.log_every={min(25, every)}',
          f'--config.train.warmup_steps={min(20, max(1, steps // 10))}']
         + (['--config.train.eval_steps=2'] if smoke else []), workdir, steps)


def _trained_length(workdir: str) -> int:
  """The context a run trained: min(data.seq_len, model.max_len)."""
  with open(os.path.join(workdir, 'config.json')) as f:
    config = json.load(f)
  return min(config['data']['seq_len'], config['model']['max_len'])


def _evaluate(workdir: str, shots: list[int], limit: int, max_length: int) -> None:
  """Scores the run's latest checkpoint (one model load for all shots) into
  workdir/eval/<task>.<K>shot.jsonl."""
  from evals import harness
  from evals.tasks import load_all
  from inference.load import load_run
  from train import checkpointing, run_config
  config = run_config.saved_config(workdir, [])
  lm, params, tokenizer = load_run(config, workdir)
  manager = checkpointing.make_manager(workdir, 1)
  step = manager.latest_step()
  manager.close()
  eval_tasks = load_all(list(TASKS))
  for k in shots:
    settings = harness.Settings(num_shots=k, limit=limit, max_length=max_length)
    results = harness.evaluate(lm, params, tokenizer, eval_tasks, settings,
                               os.path.join(workdir, 'eval'), step)
    print(json.dumps({'workdir': workdir, 'num_shots': k, 'tasks': results}),
          file=sys.stderr, flush=True)


def _records_path(workdir: str, task: str, k: int) -> str | None:
  """A run's per-example file of `task` at k shots: eval/<task>.<K>shot.jsonl, or the
  eval/<K>shot/<task>.jsonl of earlier versions; None if neither exists."""
  for path in (os.path.join(workdir, 'eval', f'{task}.{k}shot.jsonl'),
               os.path.join(workdir, 'eval', f'{k}shot', f'{task}.jsonl')):
    if os.path.isfile(path):
      return path
  return None


def _shots_found(workdir: str) -> set[int]:
  """The shot counts for which the run has per-example files of every task."""
  names = [os.path.basename(p) for p in glob.glob(os.path.join(workdir, 'eval', '*'))]
  found = {int(m[1]) for name in names
           if (m := re.search(r'(?:^|\.)(\d+)shot(?:\.jsonl)?$', name))}
  return {k for k in found if all(_records_path(workdir, t, k) for t in TASKS)}


def _read_records(workdir: str, shots: list[int]) -> dict[int, dict[str, list[dict]]]:
  """{shots: {task: per-example records}}, without the header record."""
  records = {}
  for k in shots:
    records[k] = {}
    for task in TASKS:
      path = _records_path(workdir, task, k)
      if path is None:
        raise FileNotFoundError(f'{workdir} has no per-example scores of {task} at {k} shots '
                                f'(eval/{task}.{k}shot.jsonl); evaluate it first (run without '
                                '--report_only).')
      with open(path, encoding='utf-8') as f:
        lines = [json.loads(line) for line in f if line.strip()]
      records[k][task] = [r for r in lines if not r.get('header')]
  return records


def _summary(records: dict[int, dict[str, list[dict]]]) -> dict[int, dict[str, dict]]:
  """The harness's metrics of each task at each shot count, from its records."""
  from evals import metrics
  summary = {}
  for k, by_task in records.items():
    summary[k] = {}
    for task, rows in by_task.items():
      made = {'examples': len(rows), 'shots': k,
              'dropped_demonstrations': sum(k - r['shots'] for r in rows)}
      for metric in METRICS:
        made.update(metrics.with_stderr(metric, metrics.mean_and_stderr(
            [r[metric] for r in rows])))
      summary[k][task] = made
  return summary


def _differences(before: dict, after: dict) -> dict[str, dict[str, dict[int, dict]]]:
  """{task: {metric: {shots: after - before, its paired standard error, the call}}}."""
  from evals import metrics
  made = {}
  for task in TASKS:
    made[task] = {}
    for metric in METRICS:
      made[task][metric] = {}
      for k in before:
        b, a = before[k][task], after[k][task]
        if [r.get('id', r['index']) for r in b] != [r.get('id', r['index']) for r in a]:
          raise ValueError(f'{task} at {k} shots: the two runs scored different examples; '
                           'evaluate both with the same --limit.')
        diff, stderr = metrics.paired_difference([r[metric] for r in b], [r[metric] for r in a])
        noise = metrics.within_noise(diff, stderr)
        call = ('standard error undefined' if noise is None
                else 'within noise' if noise else 'beyond 2 standard errors')
        made[task][metric][k] = {'difference': diff, 'stderr': stderr, 'call': call}
  return made


def _baselines(records: dict[int, dict[str, list[dict]]]) -> dict[str, dict]:
  """Per task: uniform chance (the mean of 1 / choices) and the majority baseline (always
  the most frequent gold position), from the scored examples."""
  from evals import metrics
  made = {}
  for task in TASKS:
    rows = next(iter(records.values()))[task]
    majority, place = metrics.majority_baseline([r['gold'] for r in rows])
    choices = {r['choices'][place].strip() for r in rows if place < len(r['choices'])}
    made[task] = {'chance': sum(1 / len(r['choices']) for r in rows) / len(rows),
                  'majority': majority, 'majority_choice': place,
                  **({'majority_answer': choices.pop()} if len(choices) == 1 else {})}
  return made


def _table(before: dict, after: dict, differences: dict, baselines: dict,
           shots: list[int], length: int | None) -> str:
  lines = ['| task | metric | shots (mean kept) | pre-trained | instruction-tuned | '
           'after - before (paired) | |', '|---|---|---|---|---|---|---|']
  for task in TASKS:
    for metric in METRICS:
      for k in shots:
        b, a, d = before[k][task], after[k][task], differences[task][metric][k]
        kept = k - b['dropped_demonstrations'] / b['examples']
        lines.append(
            f'| {task} | {metric} | {k} ({kept:.1f}) | '
            f'{b[metric]:.3f} ± {b[metric + "_stderr"]:.3f} | '
            f'{a[metric]:.3f} ± {a[metric + "_stderr"]:.3f} | '
            f'{d["difference"]:+.3f} ± {d["stderr"]:.3f} | {d["call"]} |')
  n = before[shots[0]][TASKS[0]]['examples']
  always = lambda v: (f'"{v["majority_answer"]}"' if 'majority_answer' in v
                      else f'choice {v["majority_choice"]}')
  base = '; '.join(f'{t} {v["chance"]:.3f} / {v["majority"]:.3f} (always {always(v)})'
                   for t, v in baselines.items())
  context = f'the {length}-token context' if length else 'the context'
  lines += ['', f'{n} examples per task (held-out chapters), the same prompts for both models. '
            f'Baselines, uniform chance / majority (always the most frequent gold answer): '
            f'{base}. A prompt longer than {context} drops its first demonstrations: "mean '
            'kept" is the average number left. ± is one standard error; the difference\'s is '
            'the paired one (of per-example differences), within noise when the difference is '
            'at most twice it.']
  return '\n'.join(lines) + '\n'


def _plot(before: dict, after: dict, baselines: dict, shots: list[int], path: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt
  fig, axes = plt.subplots(1, len(TASKS), figsize=(4 * len(TASKS), 3.4), sharey=True)
  for ax, task in zip(axes, TASKS):
    for results, label, color in ((before, 'pre-trained', 'tab:blue'),
                                  (after, 'instruction-tuned', 'tab:orange')):
      ax.errorbar(shots, [results[k][task]['acc'] for k in shots],
                  yerr=[results[k][task]['acc_stderr'] for k in shots], marker='o',
                  capsize=3, label=label, color=color)
    ax.axhline(baselines[task]['chance'], color='gray', linestyle=':', label='chance')
    ax.axhline(baselines[task]['majority'], color='gray', linestyle='--',
               label='majority answer')
    ax.set(title=task, xlabel='shots', xticks=shots)
  axes[0].set_ylabel('accuracy (± 1 standard error)')
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def report(root: str, base: str, sft: str, shots: list[int], length: int | None) -> str:
  """Reads both runs' per-example files and writes alignment_tax.json, .md and .png into
  `root`; returns the table."""
  records = {'before': _read_records(base, shots), 'after': _read_records(sft, shots)}
  before, after = _summary(records['before']), _summary(records['after'])
  differences = _differences(records['before'], records['after'])
  baselines = _baselines(records['before'])
  with open(os.path.join(root, 'alignment_tax.json'), 'w') as f:
    json.dump({'base': base, 'sft': sft, 'limit': before[shots[0]][TASKS[0]]['examples'],
               'max_length': length, 'before': before, 'after': after,
               'differences': differences, 'baselines': baselines}, f, indent=1)
  table = _table(before, after, differences, baselines, shots, length)
  with open(os.path.join(root, 'alignment_tax.md'), 'w') as f:
    f.write(table)
  _plot(before, after, baselines, shots, os.path.join(root, 'alignment_tax.png'))
  return table


def main(argv):
  del argv
  smoke = _SMOKE.value
  shots = [0, 1] if smoke else [int(k) for k in _SHOTS.value]
  limit = 16 if smoke else _LIMIT.value
  pretrain_steps, sft_steps = (20, 10) if smoke else (_PRETRAIN_STEPS.value, _SFT_STEPS.value)
  root = os.path.abspath(_WORKDIR.value)
  base = os.path.abspath(_BASE.value) if _BASE.value else os.path.join(root, 'base')
  sft = os.path.join(root, 'sft')
  if _REPORT_ONLY.value:
    shots = sorted(_shots_found(base) & _shots_found(sft))
    if not shots:
      raise SystemExit(f'No shot count has per-example scores of {", ".join(TASKS)} in both '
                       f'{base}/eval and {sft}/eval; run without --report_only first.')
    length = _trained_length(base) if os.path.isfile(os.path.join(base, 'config.json')) else None
    print(report(root, base, sft, shots, length))
    return
  if not _BASE.value:
    _pretrain(base, pretrain_steps, smoke)
  length = _trained_length(base)
  _evaluate(base, shots, limit, length)
  _finetune(sft, base, sft_steps, smoke)
  _evaluate(sft, shots, limit, length)
  print(report(root, base, sft, shots, length))


if __name__ == '__main__':
  app.run(main)
