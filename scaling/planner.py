"""Compute-optimal model size and data for a FLOP budget, and a model shape for a size.

With C = 6 N D (training FLOPs of N parameters on D tokens):
  * the rule of thumb of Hoffmann et al. (2022): D = 20 N, so N = sqrt(C / 120);
  * a fitted law L(N, D) = E + A / N^alpha + B / D^beta: minimising L along C = 6 N D
    gives N = G (C / 6)^(beta / (alpha + beta)) (scaling/fit.py: compute_optimal).
"""
import math

from scaling import fit

LAWS = {'chinchilla': fit.CHINCHILLA, 'besiroglu': fit.BESIROGLU}
DEFAULT_TOKENS_PER_PARAM = 20.0


def plan(flops: float, law: str = 'rule', tokens_per_param: float = DEFAULT_TOKENS_PER_PARAM,
         vocab_size: int = 32_000) -> dict:
  """Compute-optimal parameters and tokens for `flops`, and a model shape of that size.

  law: 'rule' (D = tokens_per_param x N), 'chinchilla' or 'besiroglu' (built-in fitted
  laws), or a dict with E, A, B, alpha, beta (e.g. from a sweep's fit).
  """
  if not flops > 0:
    raise ValueError(f'--flops={flops} must be a positive number of FLOPs, e.g. 1e18.')
  if isinstance(law, str) and law not in ('rule', *LAWS):
    raise ValueError(f"--law={law} is not one of rule, {', '.join(LAWS)}.")
  result = {'flops': flops, 'law': law if isinstance(law, str) else 'fitted'}
  if law == 'rule':
    params = math.sqrt(flops / (6.0 * tokens_per_param))
    tokens = tokens_per_param * params
  else:
    constants = LAWS[law] if isinstance(law, str) else law
    params, tokens = fit.compute_optimal(constants, flops)
    result['predicted_loss'] = float(fit.predicted_loss(constants, params, tokens))
  result.update(params=params, tokens=tokens, tokens_per_param=tokens / params,
                pf_days=flops / (1e15 * 86_400))
  result['shape'] = model_shape(params, vocab_size)
  return result


def model_shape(params: float, vocab_size: int = 32_000, head_dim: int = 64,
                aspect_ratio: float = 64.0) -> dict:
  """A GPT shape close to `params` parameters in matmuls: 12 L d^2 for L blocks of width
  d (d_ff = 4 d) plus the tied embedding V d; d is a multiple of head_dim. It trades
  size error against d / L far from `aspect_ratio` (deep and narrow, as in Kaplan et
  al.'s flat optimum around 50-100): the cost is |log size ratio| + 0.5 |log aspect ratio|."""
  candidates = []
  for layers in range(1, 257):
    # The width that fits the target at this depth, rounded to whole heads.
    d = (-vocab_size + math.sqrt(vocab_size ** 2 + 48 * layers * params)) / (24 * layers)
    for d_model in {max(1, math.floor(d / head_dim)) * head_dim,
                    max(1, math.ceil(d / head_dim)) * head_dim}:
      count = 12 * layers * d_model ** 2 + vocab_size * d_model
      size_error = abs(math.log(count / params))
      shape_error = abs(math.log(d_model / layers / aspect_ratio))
      candidates.append((size_error + 0.5 * shape_error, layers, d_model, count))
  _, layers, d_model, count = min(candidates)
  return {'num_layers': layers, 'd_model': d_model, 'num_heads': d_model // head_dim,
          'd_ff': 4 * d_model, 'params': count}
