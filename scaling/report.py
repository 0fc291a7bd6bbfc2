"""A sweep's report: IsoFLOP and compute-optimal plots and a markdown summary.

`write_report` turns the sweep's run rows (see scaling/fit.py for the keys) into
isoflop.png, optimal.png, loss_vs_compute.png and summary.md in the sweep's
directory. It always writes all four: where a fit is not possible the plots show
the data alone and the summary says why, so a half-finished sweep still gets a
readable report.
"""

import math
import os

import matplotlib

matplotlib.use('Agg')  # files only; never needs a display
from matplotlib import pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from scaling import fit  # noqa: E402

FIGSIZE = (6, 4)  # inches, per panel
DPI = 120
# Hoffmann et al. (2022), table 2: the exponents of approach 2 (IsoFLOP profiles).
CHINCHILLA_ISOFLOP_EXPONENTS = dict(a=0.49, b=0.51)


def _num(x, spec: str = '.3g') -> str:
  """A table cell: a number, or a dash where there is none."""
  if x is None or (isinstance(x, float) and math.isnan(x)):
    return '—'
  return format(x, spec)


def _budget_colours(num: int):
  return plt.cm.viridis(np.linspace(0.0, 0.9, max(num, 1)))


# Plots.


def _plot_isoflop(iso: dict, path: str) -> None:
  """Loss against N at each budget, the fitted parabolas and their minima."""
  fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
  for budget, colour in zip(iso['budgets'], _budget_colours(len(iso['budgets']))):
    ax.scatter(budget['params'], budget['losses'], color=colour, s=18,
               label=f"C = {budget['flops']:.2g}")
    if budget['coeffs'] is not None:
      log_n = np.log10(budget['params'])
      x = np.linspace(log_n.min() - 0.1, log_n.max() + 0.1, 100)
      ax.plot(10**x, np.polyval(budget['coeffs'], x), color=colour, lw=1)
    if budget['N_opt'] is not None:
      ax.scatter([budget['N_opt']], [budget['L_opt']], color=colour, marker='*', s=120,
                 edgecolors='black', linewidths=0.5, zorder=3)
  ax.set(xlabel='parameters N', ylabel='final eval loss',
         title='IsoFLOP profiles (* = fitted minimum)')
  if iso['budgets']:
    ax.set_xscale('log')
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def _plot_optimal(iso: dict, parametric: dict | None, path: str) -> None:
  """N_opt(C) and D_opt(C): IsoFLOP minima, their power laws and the parametric law's."""
  fig, axes = plt.subplots(1, 2, figsize=(2 * FIGSIZE[0], FIGSIZE[1]), dpi=DPI)
  reliable = [b for b in iso['budgets'] if b['reliable']]
  flops = np.array([b['flops'] for b in iso['budgets']] or [1.0])  # none: nothing to draw
  c_grid = np.geomspace(flops.min() / 3, flops.max() * 3, 50)
  for ax, key, k_key, exp_key in ((axes[0], 'N_opt', 'k_N', 'a'), (axes[1], 'D_opt', 'k_D', 'b')):
    if reliable:
      ax.scatter([b['flops'] for b in reliable], [b[key] for b in reliable], color='C0',
                 label='IsoFLOP minima')
    if iso['reason'] is None:
      ax.plot(c_grid, iso[k_key] * c_grid**iso[exp_key], color='C0',
              label=f"IsoFLOP fit: {exp_key} = {iso[exp_key]:.3f}")
    else:
      ax.text(0.03, 0.97, 'no IsoFLOP power law:\nsee summary.md', transform=ax.transAxes,
              va='top', fontsize=8)
    if parametric is not None and math.isfinite(parametric['G']):
      optimum = dict(zip(('N_opt', 'D_opt'), fit.compute_optimal(parametric, c_grid)))
      ax.plot(c_grid, optimum[key], color='C1', ls='--',
              label=f"parametric: {exp_key} = {parametric[exp_key]:.3f}")
    ax.set(xlabel='compute C (FLOPs)', ylabel=key)
    if ax.has_data():  # a log axis with nothing on it cannot be drawn
      ax.set(xscale='log', yscale='log')
      ax.legend(fontsize=7)
  fig.suptitle('Compute-optimal parameters and tokens')
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def _plot_loss_vs_compute(runs: list[dict], parametric: dict | None, path: str) -> None:
  """Every finished run's loss against its budget, and the parametric law's frontier."""
  fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
  if runs:
    points = ax.scatter([r['flops'] for r in runs], [r['eval_loss'] for r in runs],
                        c=np.log10([float(r['params']) for r in runs]), cmap='viridis', s=18)
    fig.colorbar(points, ax=ax, label='log10 N')
  if runs and parametric is not None and math.isfinite(parametric['G']):
    flops = [r['flops'] for r in runs]
    c_grid = np.geomspace(min(flops) / 3, max(flops) * 3, 100)
    params, tokens = fit.compute_optimal(parametric, c_grid)
    ax.plot(c_grid, fit.predicted_loss(parametric, params, tokens), color='C1',
            label='parametric fit: L(N_opt(C), D_opt(C))')
    ax.legend(fontsize=7)
  ax.set(xlabel='compute C (FLOPs)', ylabel='final eval loss', title='Loss against compute')
  if runs:
    ax.set_xscale('log')
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


# Summary sections.


def _runs_section(rows: list[dict]) -> list[str]:
  lines = ['## Runs', '', '| run | budget C | N | D | D/N | loss | status |',
           '|---|---:|---:|---:|---:|---:|---|']
  for row in sorted(rows, key=lambda r: (r.get('flops') or 0, r.get('params') or 0)):
    params, tokens = row.get('params'), row.get('tokens')
    ratio = tokens / params if params and tokens else None
    lines.append(f"| {row.get('run', '—')} | {_num(row.get('flops'))} | {_num(params)} | "
                 f"{_num(tokens)} | {_num(ratio, '.1f')} | {_num(row.get('eval_loss'), '.4f')} | "
                 f"{row.get('status', 'done')} |")
  return lines


def _isoflop_section(iso: dict) -> list[str]:
  lines = ['## IsoFLOP profiles (approach 2 of Hoffmann et al. 2022)', '',
           'At each budget, a parabola of loss against log10 N; its minimum is N_opt(C), '
           'and D_opt = C / (6 N_opt).', '', '![IsoFLOP profiles](isoflop.png)', '']
  if iso['budgets']:
    lines += ['| budget C | sizes | N_opt | D_opt | D_opt/N_opt | L_opt | used | note |',
              '|---:|---:|---:|---:|---:|---:|---|---|']
    for b in iso['budgets']:
      ratio = b['D_opt'] / b['N_opt'] if b['N_opt'] else None
      lines.append(f"| {_num(b['flops'])} | {b['num_sizes']} | {_num(b['N_opt'])} | "
                   f"{_num(b['D_opt'])} | {_num(ratio, '.1f')} | {_num(b['L_opt'], '.4f')} | "
                   f"{'yes' if b['reliable'] else 'no'} | {b['note']} |")
    lines.append('')
  if iso['reason'] is None:
    lines.append(f"Power laws through the minima: N_opt = {iso['k_N']:.3g} C^{iso['a']:.3f}, "
                 f"D_opt = {iso['k_D']:.3g} C^{iso['b']:.3f} (a = {iso['a']:.3f}, "
                 f"b = {iso['b']:.3f}, a + b = {iso['a'] + iso['b']:.3f}).")
  else:
    lines.append(f"Power laws not fitted: {iso['reason']}.")
  return lines + ['', '![Compute-optimal N and D](optimal.png)']


def _parametric_section(parametric: dict | None, failure: str) -> list[str]:
  lines = ['## Parametric fit (approach 3)', '']
  if parametric is None:
    return lines + [f'Not fitted: {failure}', '', '![Loss against compute](loss_vs_compute.png)']
  intervals = parametric['intervals']
  lines += [f"L(N, D) = E + A / N^alpha + B / D^beta, fitted to {parametric['num_runs']} runs "
            f"by minimising a Huber loss (delta = {parametric['delta']:g}) of log-loss "
            f"residuals with L-BFGS-B from the {fit.NUM_DESCENTS} best of the "
            f"{len(fit.START_GRID):,} starting points of Hoffmann et al.; objective "
            f"{parametric['objective']:.3g}. "
            'N_opt(C) = G (C/6)^a with a = beta / (alpha + beta), b = alpha / (alpha + beta).',
            '', '| parameter | value | 5% | 95% |', '|---|---:|---:|---:|']
  for key in ('E', 'A', 'B', 'alpha', 'beta', 'a', 'b', 'G'):
    low, high = intervals[key] if intervals else (None, None)
    lines.append(f'| {key} | {_num(parametric[key], ".4g")} | {_num(low, ".4g")} | '
                 f'{_num(high, ".4g")} |')
  lines.append('')
  if intervals:
    lines.append(f"Intervals: 5th and 95th percentiles over {parametric['bootstrap']} refits "
                 'on runs resampled with replacement.')
  else:
    lines.append('No bootstrap intervals (bootstrap=0).')
  if not math.isfinite(parametric['G']):
    lines.append('alpha or beta is not positive: this fit has no compute-optimal frontier.')
  return lines + ['', '![Loss against compute](loss_vs_compute.png)']


def _reference_section(parametric: dict | None) -> list[str]:
  """Published laws next to ours, so a reader sees at once how far the sweep is off."""
  laws = [('Hoffmann et al. 2022, approach 3', fit.CHINCHILLA),
          ('Besiroglu et al. 2024, refit', fit.BESIROGLU)]
  if parametric is not None:
    laws.append(('this sweep, parametric fit', parametric))
  lines = ['## Published laws for comparison', '',
           '| law | E | A | B | alpha | beta | a | b |', '|---|---:|---:|---:|---:|---:|---:|---:|']
  for name, law in laws:
    _, a, b = fit.optimal_size_law(law)
    lines.append(f"| {name} | {law['E']:.4g} | {law['A']:.4g} | {law['B']:.4g} | "
                 f"{law['alpha']:.3f} | {law['beta']:.3f} | {_num(a, '.3f')} | {_num(b, '.3f')} |")
  ref = CHINCHILLA_ISOFLOP_EXPONENTS
  return lines + ['', f"Hoffmann et al. 2022 report a = {ref['a']}, b = {ref['b']} from their "
                  'IsoFLOP profiles (approach 2), the method of the IsoFLOP section above.']


def write_report(sweep_dir: str, rows: list[dict], bootstrap: int = 100) -> str:
  """Writes the plots and summary.md of a sweep into sweep_dir; returns summary.md's path.

  rows: one dict per run with 'run' (a name), 'flops', 'params', 'tokens',
  'eval_loss' and optionally 'status'; unfinished runs appear in the table only.
  """
  os.makedirs(sweep_dir, exist_ok=True)
  iso = fit.isoflop_fits(rows)
  try:
    parametric, failure = fit.fit_parametric(rows, bootstrap=bootstrap), ''
  except ValueError as error:
    parametric, failure = None, str(error)
  _plot_isoflop(iso, os.path.join(sweep_dir, 'isoflop.png'))
  _plot_optimal(iso, parametric, os.path.join(sweep_dir, 'optimal.png'))
  _plot_loss_vs_compute(fit.usable_runs(rows), parametric,
                        os.path.join(sweep_dir, 'loss_vs_compute.png'))
  lines = [f'# Scaling sweep: {os.path.basename(os.path.abspath(sweep_dir))}', '',
           'N: parameters, D: training tokens, C: the compute budget in FLOPs (C = 6 N D), '
           'loss: final validation loss in nats per token.', '']
  for section in (_runs_section(rows), _isoflop_section(iso),
                  _parametric_section(parametric, failure), _reference_section(parametric)):
    lines += section + ['']
  path = os.path.join(sweep_dir, 'summary.md')
  with open(path, 'w') as f:
    f.write('\n'.join(lines))
  return path
