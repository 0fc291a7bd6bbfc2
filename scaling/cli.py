"""`--mode=estimate` and `--mode=plan`: their flags and what they print."""
import json

from absl import app, flags

_COMPILE = flags.DEFINE_bool('compile', True, 'estimate: also compile the train step on one '
                             "device and show XLA's memory analysis beside the estimate.")
_FLOPS = flags.DEFINE_float('flops', None, 'plan: the training compute budget in FLOPs, e.g. 1e18.')
_LAW = flags.DEFINE_enum('law', 'rule', ['rule', 'chinchilla', 'besiroglu'],
                         'plan: D = 20 N (rule), or the minimum of a fitted L(N, D).')
_TOKENS_PER_PARAM = flags.DEFINE_float('tokens_per_param', 20.0, 'plan: D / N for --law=rule.')
_VOCAB = flags.DEFINE_integer('vocab_size', 32_000, 'plan: vocabulary of the proposed shape.')


def estimate(config, as_json: bool) -> None:
  """Parameters, FLOPs, compute and memory of a config; XLA's figure beside it."""
  from scaling import estimate as estimate_lib
  result = estimate_lib.estimate(config)
  if _COMPILE.value:
    result['compiled'] = estimate_lib.compiled_memory(config)
  print(json.dumps(result) if as_json else estimate_lib.report(result), flush=True)


def plan(as_json: bool) -> None:
  """Compute-optimal parameters and tokens for --flops."""
  from scaling import planner
  if _FLOPS.value is None:
    raise app.UsageError('--flops is required for --mode=plan, e.g. --flops=1e18.')
  result = planner.plan(_FLOPS.value, _LAW.value, _TOKENS_PER_PARAM.value, _VOCAB.value)
  if as_json:
    print(json.dumps(result), flush=True)
    return
  shape = result['shape']
  loss = f", predicted loss {result['predicted_loss']:.3f}" if 'predicted_loss' in result else ''
  print(f"{result['flops']:.3g} FLOPs ({result['pf_days']:.3g} PF-days), law={result['law']}: "
        f"{result['params']:.3g} parameters on {result['tokens']:.3g} tokens "
        f"({result['tokens_per_param']:.1f} tokens/parameter){loss}\n"
        f"a shape of that size: num_layers={shape['num_layers']} d_model={shape['d_model']} "
        f"num_heads={shape['num_heads']} d_ff={shape['d_ff']} ({shape['params']:.3g} parameters "
        f"with a {_VOCAB.value}-token vocabulary)", flush=True)
