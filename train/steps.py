"""The pure train and eval steps, jitted once with explicit shardings.

Both are family-agnostic: the task's `loss` returns a scalar to differentiate
plus metric sums; steps add sums and divide by the summed 'weight' (scored
tokens) once, so gradient accumulation over k micro-batches equals one batch k
times larger. A per-example term (BERT's next-sentence loss) is normalised by the
whole step's totals, which the task's `normalizers` computes from the batch up front.

A float16 run's state carries a loss scale (a ScaledTrainState, train/loss_scale.py):
the step differentiates the loss per token position times the scale, unscales the
summed float32 gradients, and when any of them is NaN/inf keeps the old parameters
and optimizer state (bit for bit) and halves the scale. `state.step` still advances
(it counts batches: data position, dropout keys, checkpoints); the optimizer's own
count, which drives the learning-rate schedule and Adam's bias correction, counts
applied updates only, so each skip delays the schedule by one step. Other dtypes
(a plain TrainState) trace exactly the step they always did.
"""
import functools
import os

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from models import normalize_metrics
from train import loss_scale as loss_scale_lib, sharding
from train import frozen as frozen_lib
from train.frozen import Frozen
from train.state import TrainState


def _split_micro_batches(batch, num_micro: int):
  """[B, ...] -> [num_micro, B / num_micro, ...]; micro-batch i takes rows i, i+k, ...

  so each data-parallel device keeps an equal share of every micro-batch.
  """
  def split(x):
    x = x.reshape((x.shape[0] // num_micro, num_micro) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)
  return jax.tree.map(split, batch)


def _global_norm(tree) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def _with_frozen(task, frozen: Frozen | None):
  """(trainable params -> the model's params, batch -> the batch with the reference
  model's terms); each micro-batch gets its own, so the reference's forward pass is as
  large as a micro-batch's."""
  if frozen is None:
    return (lambda p: p), (lambda b: b)
  with_reference = lambda b: b
  if task.uses_reference:
    with_reference = lambda b: jax.lax.stop_gradient(task.with_reference(frozen.reference, b))
  return (lambda p: frozen_lib.combine(frozen.params, p)), with_reference


def train_step(state: TrainState, batch, frozen: Frozen | None = None, *, task,
               tx: optax.GradientTransformation, schedule, grad_accum: int,
               dropout_key: jax.Array, offloaded_opt_state=None):
  """One optimizer update. Returns (new_state, metrics) with per-token means.

  frozen: parameters the step uses but does not train (train/frozen.py): LoRA's base,
  joined to state.params (the adapters) for the loss, and DPO's reference model.
  offloaded_opt_state: (device, host) shardings of an optimizer state kept in host
  memory; it is brought to the devices for the update and sent back after it.
  """
  step_key = jax.random.fold_in(dropout_key, state.step)
  model_params, with_reference = _with_frozen(task, frozen)
  totals = task.normalizers(batch)  # the whole step's, before any split
  scaler = getattr(state, 'loss_scale', None)  # a ScaledTrainState's (float16)
  if scaler is None:
    objective = lambda p, mb, key: task.loss(model_params(p), with_reference(mb), key, True,
                                             **totals)
  else:  # the loss per token position of the whole step (every task marks them in
    positions = batch['weights'].size  # 'weights'), times the scale

    def objective(p, mb, key):
      value, sums = task.loss(model_params(p), with_reference(mb), key, True, **totals)
      return value * (scaler.scale / positions), sums
  grad_fn = jax.grad(objective, has_aux=True)

  if grad_accum == 1:
    grads, sums = grad_fn(state.params, batch, step_key)
  else:
    micro_batches = _split_micro_batches(batch, grad_accum)

    def accumulate(carry, inputs):
      index, micro_batch = inputs
      grads, sums = grad_fn(state.params, micro_batch, jax.random.fold_in(step_key, index))
      return jax.tree.map(jnp.add, carry, (grads, sums)), None

    zero_grads = jax.tree.map(jnp.zeros_like, state.params)
    _, zero_sums = jax.eval_shape(grad_fn, state.params,
                                  jax.tree.map(lambda x: x[0], micro_batches), step_key)
    zero_sums = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero_sums)
    (grads, sums), _ = jax.lax.scan(accumulate, (zero_grads, zero_sums),
                                    (jnp.arange(grad_accum), micro_batches))

  if scaler is not None:  # back to the gradient of the summed loss, in float32
    grads = jax.tree.map(lambda g: g * (positions / scaler.scale), grads)
  num_tokens = jnp.maximum(sums['weight'], 1.0)
  grads = jax.tree.map(lambda g: g / num_tokens, grads)
  old_opt_state = opt_state = state.opt_state
  if offloaded_opt_state is not None:
    old_opt_state = opt_state = jax.device_put(opt_state, offloaded_opt_state[0])
  updates, opt_state = tx.update(grads, opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = normalize_metrics(sums)
  metrics.update(tokens=sums['weight'], grad_norm=_global_norm(grads))
  if scaler is None:
    metrics['lr'] = schedule(state.step)
  else:
    finite = loss_scale_lib.all_finite(grads)
    params = loss_scale_lib.select(finite, params, state.params)
    opt_state = loss_scale_lib.select(finite, opt_state, old_opt_state)
    scaler = scaler.update(finite)
    metrics.update(lr=schedule(state.step - state.loss_scale.skipped_steps),
                   loss_scale=state.loss_scale.scale, skipped=(~finite).astype(jnp.float32),
                   skipped_steps=scaler.skipped_steps)
  if offloaded_opt_state is not None:
    opt_state = jax.device_put(opt_state, offloaded_opt_state[1])
  state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  return (state if scaler is None else state.replace(loss_scale=scaler)), metrics


def eval_step(params, batch, bytes_per_token, frozen: Frozen | None = None, *, task):
  """Metric sums of one validation batch (no dropout), with the UTF-8 bytes its
  scored tokens decode to, for bits per byte. params: the trainable part (state.params)."""
  model_params, with_reference = _with_frozen(task, frozen)
  batch = with_reference(batch)
  _, sums = task.loss(model_params(params), batch, None, False)
  sums['bytes'] = jnp.sum(bytes_per_token[batch['targets']] * batch['weights'])
  return sums


def _traced_with_rules(fn, mesh: Mesh):
  """Runs `fn` under the mesh and logical-axis rules so activation constraints apply."""
  @functools.wraps(fn)
  def wrapped(*args):
    with sharding.mesh_context(mesh):
      return fn(*args)
  return wrapped


YNN_FUSION_TYPE = 'xla_cpu_experimental_ynn_fusion_type'
TRAIN_STEP_YNN_FUSIONS = 'LIBRARY_FUSION_TYPE_REDUCE'  # YNNPACK fuses reductions only


@functools.cache
def train_compiler_options() -> dict[str, str] | None:
  """XLA options for the train step: on XLA:CPU, YNNPACK fusions only where a reduction
  is the root. Most of the step's products (the [B T]-row matmuls and their gradients,
  one operand of each gradient product transposed) then run as XLA's plain dots, which
  trained every family faster than its YNNPACK dot fusions on an Intel Xeon, and the
  peer config as fast on an AMD Zen 5 (benchmarks/RESULTS.md, measured with jaxlib
  0.10.2, whose defaults fuse dots: another jaxlib's may differ, and `python -m
  benchmarks.train_step --compare=xla_defaults` checks).
  None elsewhere, where XLA_FLAGS already sets the fusion types (the user's choice
  stands), or where this jaxlib does not know the option or the value."""
  if jax.default_backend() != 'cpu' or YNN_FUSION_TYPE in os.environ.get('XLA_FLAGS', ''):
    return None
  options = {YNN_FUSION_TYPE: TRAIN_STEP_YNN_FUSIONS}
  try:
    jax.jit(jnp.negative, compiler_options=options).lower(jnp.zeros(())).compile()
  except Exception:  # an older jaxlib: "No such compile option", or not a valid value
    return None
  return options


def jit_train_step(task, tx, schedule, grad_accum: int, dropout_key, mesh: Mesh,
                   state_shardings, frozen_shardings=None, xla_default_options: bool = False):
  """step(state, batch) -> (state, metrics); step(state, batch, frozen) when the run has
  frozen parameters (`frozen_shardings`, a Frozen of shardings). Compiled with
  `train_compiler_options` unless xla_default_options (benchmarks compare the two). Where
  those options are set (XLA:CPU), call it at top level: JAX refuses a jit with compiler
  options inside another trace (jax.grad, make_jaxpr; `step.trace` gives its jaxpr)."""
  offloaded = None
  host_opt_state = state_shardings.opt_state
  if any(s.memory_kind == 'pinned_host' for s in jax.tree.leaves(host_opt_state)):
    offloaded = (jax.tree.map(lambda s: s.with_memory_kind('device'), host_opt_state),
                 host_opt_state)
  step = functools.partial(train_step, task=task, tx=tx, schedule=schedule,
                           grad_accum=grad_accum, dropout_key=dropout_key,
                           offloaded_opt_state=offloaded)
  in_shardings = (state_shardings, sharding.batch_sharding(mesh))
  if frozen_shardings is not None:
    in_shardings += (frozen_shardings,)
  return jax.jit(_traced_with_rules(step, mesh), in_shardings=in_shardings,
                 out_shardings=(state_shardings, sharding.replicated(mesh)),
                 donate_argnums=0,
                 compiler_options=None if xla_default_options else train_compiler_options())


def jit_eval_step(task, mesh: Mesh, param_shardings, frozen_shardings=None):
  """step(params, batch, bytes_per_token[, frozen]) -> metric sums."""
  step = functools.partial(eval_step, task=task)
  in_shardings = (param_shardings, sharding.batch_sharding(mesh), sharding.replicated(mesh))
  if frozen_shardings is not None:
    in_shardings += (frozen_shardings,)
  return jax.jit(_traced_with_rules(step, mesh), in_shardings=in_shardings,
                 out_shardings=sharding.replicated(mesh))
