"""The alignment tax of instruction tuning, measured on in-context learning.

Pre-trains a small decoder on the embedded Bible (configs/gpt_tiny.py at data.seq_len =
model.max_len = 256, so every position a 5-shot prompt uses was trained), evaluates it at
0, 1, 3 and 5 shots on the built-in multiple-choice tasks (bible_cloze, bible_book,
bible_genre), fine-tunes it on bible_instruct (configs/sft_tiny.py with init_from), evaluates
the tuned model on the same prompts, and writes a table and a plot of accuracy against shots,
before and after:

  python experiments/alignment_tax.py --workdir=runs/alignment_tax    # est. 40-50 min, 2 cores
  python experiments/alignment_tax.py --workdir=runs/smoke --smoke    # a minute: it runs

--base=DIR reuses a pre-trained decoder workdir instead of training one. Each stage resumes:
a rerun skips finished training and re-evaluates. Outputs in --workdir: base/ and sft/ (the
runs, with eval/<K>shot/<task>.jsonl per-example scores), alignment_tax.json (every metric
with its standard error), alignment_tax.md (the table) and alignment_tax.png.

A difference is called within noise when it is smaller than twice its standard error
(sqrt(se_before^2 + se_after^2); the two models answer the same prompts, so this is
conservative).
"""
import json
import math
import os
import subprocess
import sys

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TASKS = ('bible_cloze', 'bible_book', 'bible_genre')
CHANCE = {'bible_cloze': 0.25, 'bible_book': 0.25, 'bible_genre': 0.125}

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


def _evaluate(workdir: str, shots: list[int], limit: int) -> dict:
  """{shots: {task: metrics}} of the run's latest checkpoint; one model load for all."""
  from evals import harness
  from evals.tasks import load_all
  from inference.load import load_run
  from train import run_config
  lm, params, tokenizer = load_run(run_config.saved_config(workdir, []), workdir)
  eval_tasks = load_all(list(TASKS))
  results = {}
  for k in shots:
    settings = harness.Settings(num_shots=k, limit=limit)
    results[k] = harness.evaluate(lm, params, tokenizer, eval_tasks, settings,
                                  os.path.join(workdir, 'eval', f'{k}shot'))
    print(json.dumps({'workdir': workdir, 'num_shots': k, 'tasks': results[k]}),
          file=sys.stderr, flush=True)
  return results


def _difference(before: dict, after: dict, metric: str) -> tuple[float, float, bool]:
  diff = after[metric] - before[metric]
  stderr = math.sqrt(before[f'{metric}_stderr'] ** 2 + after[f'{metric}_stderr'] ** 2)
  return diff, stderr, abs(diff) <= 2 * stderr


def _table(before: dict, after: dict, shots: list[int]) -> str:
  lines = ['| task | metric | shots (mean kept) | pre-trained | instruction-tuned | '
           'after - before | |', '|---|---|---|---|---|---|---|']
  for task in TASKS:
    for metric in ('acc', 'acc_norm'):
      for k in shots:
        b, a = before[k][task], after[k][task]
        diff, stderr, noise = _difference(b, a, metric)
        kept = k - b['dropped_demonstrations'] / b['examples']
        lines.append(
            f'| {task} | {metric} | {k} ({kept:.1f}) | '
            f'{b[metric]:.3f} ± {b[metric + "_stderr"]:.3f} | '
            f'{a[metric]:.3f} ± {a[metric + "_stderr"]:.3f} | {diff:+.3f} ± {stderr:.3f} | '
            f'{"within noise" if noise else "beyond 2 standard errors"} |')
  n = before[shots[0]][TASKS[0]]['examples']
  lines += ['', f'{n} examples per task (held-out chapters), the same prompts for both models; '
            f'chance: {", ".join(f"{t} {c:.3f}" for t, c in CHANCE.items())}. A prompt longer '
            'than the 256-token context drops its first demonstrations: "mean kept" is the '
            'average number left. ± is one standard error.']
  return '\n'.join(lines) + '\n'


def _plot(before: dict, after: dict, shots: list[int], path: str) -> None:
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
    ax.axhline(CHANCE[task], color='gray', linestyle=':', label='chance')
    ax.set(title=task, xlabel='shots', xticks=shots)
  axes[0].set_ylabel('accuracy (± 1 standard error)')
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv):
  del argv
  smoke = _SMOKE.value
  shots = [0, 1] if smoke else [int(k) for k in _SHOTS.value]
  limit = 16 if smoke else _LIMIT.value
  pretrain_steps, sft_steps = (20, 10) if smoke else (_PRETRAIN_STEPS.value, _SFT_STEPS.value)
  root = os.path.abspath(_WORKDIR.value)
  base = os.path.abspath(_BASE.value) if _BASE.value else os.path.join(root, 'base')
  sft = os.path.join(root, 'sft')
  if not _BASE.value:
    _pretrain(base, pretrain_steps, smoke)
  before = _evaluate(base, shots, limit)
  _finetune(sft, base, sft_steps, smoke)
  after = _evaluate(sft, shots, limit)
  with open(os.path.join(root, 'alignment_tax.json'), 'w') as f:
    json.dump({'base': base, 'sft': sft, 'limit': limit,
               'before': before, 'after': after}, f, indent=1)
  table = _table(before, after, shots)
  with open(os.path.join(root, 'alignment_tax.md'), 'w') as f:
    f.write(table)
  _plot(before, after, shots, os.path.join(root, 'alignment_tax.png'))
  print(table)


if __name__ == '__main__':
  app.run(main)
