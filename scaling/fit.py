"""Chinchilla-style scaling-law fits: IsoFLOP profiles and the parametric loss.

Two of the three approaches of Hoffmann et al. (2022), "Training Compute-Optimal
Large Language Models":

- IsoFLOP profiles (their approach 2): at each compute budget C, a parabola of
  the final loss against log10 N; its minimum is the compute-optimal size
  N_opt(C). Power laws N_opt = k_N C^a and D_opt = k_D C^b through the minima
  give the scaling exponents.
- The parametric loss (their approach 3): L(N, D) = E + A / N^alpha + B / D^beta,
  fitted with a Huber loss on log L from a grid of starting points, as
  Besiroglu et al. (2024), "Chinchilla Scaling: A replication attempt", redid it.

A run row is a dict with at least 'flops' (the run's budget C), 'params' (N),
'tokens' (D) and 'eval_loss' (L). Rows whose 'status' is present and not 'done'
are ignored. Compute is C = 6 N D throughout.
"""

import itertools
import math

import numpy as np
from scipy import optimize, special
from threadpoolctl import threadpool_limits

# Hoffmann et al. (2022), approach 3, as published.
CHINCHILLA = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
# Besiroglu et al. (2024): approach 3 refitted to the data of Hoffmann et al.
BESIROGLU = dict(E=1.8172, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658)

MIN_SIZES_PER_BUDGET = 3  # a parabola has three coefficients
MIN_RELIABLE_BUDGETS = 2  # a power law has two
MIN_PARAMETRIC_RUNS = 5  # the parametric law has five parameters
BUDGET_RTOL = 1e-6  # runs whose 'flops' agree this closely share a budget
MAX_EXTRAPOLATION_DECADES = 1.0  # an IsoFLOP minimum further out is not trusted

# Starting points (a, b, e, alpha, beta) of the parametric fit: the grid of
# Hoffmann et al. (2022), appendix D.2, 6 * 6 * 5 * 5 * 5 = 4,500 points. They
# descend from every point; we evaluate the objective at all of them and descend
# from the NUM_DESCENTS best. On the synthetic sweeps of the tests the best start
# alone always reaches the best optimum, and about half of the 32 do, at 1/140 of
# the cost (a descent costs ~100 gradient steps).
NUM_DESCENTS = 32
START_GRID = np.array(list(itertools.product(
    np.arange(0.0, 26.0, 5.0), np.arange(0.0, 26.0, 5.0), np.arange(-1.0, 1.1, 0.5),
    np.arange(0.0, 2.1, 0.5), np.arange(0.0, 2.1, 0.5))))
_LAW_KEYS = ('E', 'A', 'B', 'alpha', 'beta')


def usable_runs(rows: list[dict]) -> list[dict]:
  """Finished runs with a finite, positive loss; an unfinished or diverged run
  says nothing about the law."""
  def usable(row):
    loss = row.get('eval_loss')
    return (row.get('status', 'done') == 'done' and loss is not None
            and math.isfinite(loss) and loss > 0)
  return [row for row in rows if usable(row)]


def predicted_loss(law: dict, params, tokens):
  """L(N, D) = E + A / N^alpha + B / D^beta; broadcasts over arrays of N and D."""
  params, tokens = np.asarray(params, float), np.asarray(tokens, float)
  return law['E'] + law['A'] / params**law['alpha'] + law['B'] / tokens**law['beta']


def optimal_size_law(law: dict) -> tuple[float, float, float]:
  """(G, a, b) with N_opt(C) = G (C/6)^a and D_opt(C) = (C/6)^b / G.

  Minimising L(N, C / 6N) over N gives alpha A N^-alpha = beta B D^-beta, hence
  a = beta / (alpha + beta), b = alpha / (alpha + beta) and
  G = (alpha A / (beta B))^(1 / (alpha + beta)). All three are nan when alpha or
  beta is not positive: the loss then does not fall with N or D, and no optimum exists.
  """
  alpha, beta = law['alpha'], law['beta']
  if not (alpha > 0 and beta > 0):
    return math.nan, math.nan, math.nan
  g = (alpha * law['A'] / (beta * law['B']))**(1 / (alpha + beta))
  return g, beta / (alpha + beta), alpha / (alpha + beta)


def compute_optimal(law: dict, flops: float) -> tuple[float, float]:
  """(N_opt, D_opt) that minimise the law's loss at C = 6 N D = flops; an array
  of budgets gives arrays."""
  g, a, _ = optimal_size_law(law)
  flops = np.asarray(flops, float)
  params = g * (flops / 6)**a
  return params, flops / (6 * params)


# IsoFLOP profiles (approach 2).


def _power_law(x, y) -> tuple[float, float]:
  """(k, exponent) of y = k x^exponent, by least squares in log10 space."""
  exponent, log10_k = np.polyfit(np.log10(x), np.log10(y), 1)
  return float(10**log10_k), float(exponent)


def _group_by_budget(runs: list[dict]) -> list[list[dict]]:
  """Runs that share a budget, in increasing budget; 'flops' may differ by rounding."""
  groups = []
  for run in sorted(runs, key=lambda r: r['flops']):
    if groups and math.isclose(run['flops'], groups[-1][0]['flops'], rel_tol=BUDGET_RTOL):
      groups[-1].append(run)
    else:
      groups.append([run])
  return groups


def _fit_budget(runs: list[dict]) -> dict:
  """The parabola loss(log10 N) at one budget and its minimum, or a note why not."""
  flops = float(runs[0]['flops'])
  log_n = np.log10([float(r['params']) for r in runs])
  loss = np.array([float(r['eval_loss']) for r in runs])
  sizes = len(np.unique(log_n))
  fit = dict(flops=flops, params=[float(r['params']) for r in runs], losses=loss.tolist(),
             num_sizes=sizes, coeffs=None, N_opt=None, D_opt=None, L_opt=None,
             reliable=False, note='')
  if sizes < MIN_SIZES_PER_BUDGET:
    fit['note'] = f'{sizes} distinct sizes; a parabola needs >= {MIN_SIZES_PER_BUDGET}'
    return fit
  coeffs = np.polyfit(log_n, loss, 2)  # [c2, c1, c0] of c2 x^2 + c1 x + c0
  fit['coeffs'] = [float(c) for c in coeffs]
  if coeffs[0] <= 0:
    fit['note'] = 'parabola opens downward: no minimum'
    return fit
  x_opt = -coeffs[1] / (2 * coeffs[0])
  fit.update(N_opt=float(10**x_opt), D_opt=flops / (6 * 10**x_opt),
             L_opt=float(np.polyval(coeffs, x_opt)))
  beyond = max(log_n.min() - x_opt, x_opt - log_n.max())
  if beyond > MAX_EXTRAPOLATION_DECADES:
    fit['note'] = f'minimum {beyond:.1f} decades outside the sampled sizes'
  else:
    fit['reliable'] = True
  return fit


def isoflop_fits(rows: list[dict]) -> dict:
  """IsoFLOP profiles and the power laws N_opt = k_N C^a, D_opt = k_D C^b.

  Returns 'budgets' (one dict per budget, in increasing C: flops, the params and
  losses fitted, num_sizes, coeffs [c2, c1, c0] of the parabola in log10 N, N_opt,
  D_opt, L_opt, reliable, note), 'a', 'b', 'k_N', 'k_D', and 'reason': None when
  the power laws were fitted, else why not (then the exponents are None).
  """
  budgets = [_fit_budget(group) for group in _group_by_budget(usable_runs(rows))]
  result = dict(budgets=budgets, a=None, b=None, k_N=None, k_D=None, reason=None)
  reliable = [fit for fit in budgets if fit['reliable']]
  if len(reliable) < MIN_RELIABLE_BUDGETS:
    result['reason'] = (
        f'{len(reliable)} budget(s) with a reliable IsoFLOP minimum (of {len(budgets)}); '
        f'the power laws need >= {MIN_RELIABLE_BUDGETS} budgets with '
        f'>= {MIN_SIZES_PER_BUDGET} model sizes each')
    return result
  flops = [fit['flops'] for fit in reliable]
  result['k_N'], result['a'] = _power_law(flops, [fit['N_opt'] for fit in reliable])
  result['k_D'], result['b'] = _power_law(flops, [fit['D_opt'] for fit in reliable])
  return result


# The parametric loss (approach 3).


def _logsumexp(x, axis):
  """Stable log(sum(exp(x))); scipy.special.logsumexp costs ~100 us a call, which
  dominated the thousands of objective calls of a fit."""
  peak = x.max(axis=axis, keepdims=True)
  return np.squeeze(peak, axis) + np.log(np.exp(x - peak).sum(axis=axis))


def _log_terms(theta, log_n, log_d):
  """Logs of the law's three terms, [..., 3, R], for parameters theta [..., 5].

  theta = (a, b, e, alpha, beta) with A = exp(a), B = exp(b), E = exp(e): the
  terms stay positive whatever the optimiser tries.
  """
  a, b, e, alpha, beta = np.moveaxis(np.asarray(theta)[..., None], -2, 0)  # each [..., 1]
  return np.stack([a - alpha * log_n, b - beta * log_d, e + np.zeros_like(log_n)], axis=-2)


def _huber_objective(theta, log_n, log_d, log_loss, delta):
  """Sum over runs of Huber_delta(log L_pred - log L), and its gradient in theta.

  log L_pred = logsumexp of the three log terms, so the residual is a log ratio
  and a run at high loss weighs as much as one at low loss, as in Hoffmann et al.
  """
  terms = _log_terms(theta, log_n, log_d)  # [3, R]
  log_pred = _logsumexp(terms, axis=0)  # [R]
  residual = log_pred - log_loss
  # d huber / d residual is the residual clipped to [-delta, delta]; d log_pred /
  # d term is the softmax of the terms.
  slope_3r = np.clip(residual, -delta, delta) * np.exp(terms - log_pred)
  grad = np.array([slope_3r[0].sum(), slope_3r[1].sum(), slope_3r[2].sum(),
                   -(slope_3r[0] * log_n).sum(), -(slope_3r[1] * log_d).sum()])
  return special.huber(delta, residual).sum(), grad


def _grid_objective(grid, log_n, log_d, log_loss, delta):
  """The objective at every row of grid [G, 5] at once: [G]."""
  residual = _logsumexp(_log_terms(grid, log_n, log_d), axis=-2) - log_loss
  return special.huber(delta, residual).sum(axis=-1)


def _minimise(start, data, delta):
  """One L-BFGS-B descent to tight tolerances. scipy's defaults measure progress
  against max(|f|, 1), and f here (residuals of order delta) is far below 1: with
  them 99 of 100 descents on a test sweep stopped short of the optimum."""
  return optimize.minimize(_huber_objective, start, args=(*data, delta), jac=True,
                           method='L-BFGS-B',
                           options=dict(ftol=1e-14, gtol=1e-12, maxiter=2000))


def _law_of(theta) -> dict:
  a, b, e, alpha, beta = (float(t) for t in theta)
  return dict(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=alpha, beta=beta)


def _with_exponents(law: dict) -> dict:
  g, a, b = optimal_size_law(law)
  return dict(law, G=g, a=a, b=b)


def _bootstrap_intervals(theta, data, delta, samples, seed) -> dict:
  """5% / 95% percentiles of each parameter over refits on runs resampled with
  replacement; each refit starts from the full-data optimum."""
  rng = np.random.default_rng(seed)
  num_runs = len(data[0])
  fits = []
  for _ in range(samples):
    idx = rng.integers(0, num_runs, num_runs)
    refit = _minimise(theta, tuple(x[idx] for x in data), delta)
    fits.append(_with_exponents(_law_of(refit.x)))
  return {key: (float(np.percentile([f[key] for f in fits], 5)),
                float(np.percentile([f[key] for f in fits], 95)))
          for key in (*_LAW_KEYS, 'a', 'b', 'G')}


def fit_parametric(rows: list[dict], delta: float = 1e-3, bootstrap: int = 0,
                   seed: int = 0) -> dict:
  """Fits L(N, D) = E + A / N^alpha + B / D^beta to the runs (approach 3).

  Minimises the Huber loss of log-loss residuals with L-BFGS-B from the best
  NUM_DESCENTS points of the grid of Hoffmann et al. and keeps the best optimum
  (deterministic: ties go to the earlier start). The result holds E, A, B,
  alpha, beta (so it is itself a law for `predicted_loss` / `compute_optimal`),
  the derived G, a, b of `optimal_size_law`, 'objective', 'num_runs', 'delta',
  'bootstrap' and 'intervals': {name: (5%, 95%)} over `bootstrap` refits on runs
  resampled with replacement, or None.
  """
  runs = usable_runs(rows)
  if len(runs) < MIN_PARAMETRIC_RUNS:
    raise ValueError(f'fit_parametric needs >= {MIN_PARAMETRIC_RUNS} finished runs with a '
                     f'finite eval_loss to fit 5 parameters; got {len(runs)}. Run more '
                     'sizes or budgets.')
  data = tuple(np.log([float(r[key]) for r in runs]) for key in ('params', 'tokens', 'eval_loss'))
  screen = _grid_objective(START_GRID, *data, delta)
  starts = START_GRID[np.argsort(screen, kind='stable')[:NUM_DESCENTS]]
  # L-BFGS-B calls BLAS on vectors of 5; OpenBLAS threads then spend their time
  # waiting on each other, 10-40x slower on a machine whose cores are busy.
  with threadpool_limits(limits=1, user_api='blas'):
    best = min((_minimise(start, data, delta) for start in starts), key=lambda r: r.fun)
    intervals = (_bootstrap_intervals(best.x, data, delta, bootstrap, seed)
                 if bootstrap > 0 else None)
  result = _with_exponents(_law_of(best.x))
  result.update(objective=float(best.fun), num_runs=len(runs), delta=delta, bootstrap=bootstrap,
                intervals=intervals)
  return result
