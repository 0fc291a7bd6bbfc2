"""Activation memory of a train step, read off the jaxpr of the loss's VJP.

`jax.vjp` returns a closure over the residuals: every value the backward pass needs
from the forward pass, under the model's remat policy. Counting them is exact for
what JAX asks for, but XLA keeps less: it fuses elementwise and layout ops into their
consumers, so an elementwise residual (a GELU's `0.5 * x`) is recomputed in the
backward fusion from the values it was computed from. Six things stop that:
- a value produced by a non-fusible op (a matmul, a reduction, a gather, a loop) must
  exist in memory; so must one that a non-fusible op reads (a matmul operand);
- XLA does not duplicate expensive ops (exp, tanh, divide...) into a second consumer,
  so their outputs are kept too;
- masks computed from the batch alone are computed once and shared by the forward and
  backward passes (constants are not: XLA folds a broadcast constant into its users);
- XLA does not duplicate an op that reads more than one array of its size (a gated
  MLP's `silu(g) = g * sigmoid(g)`) unless it can fuse it into all its consumers on
  every path, and a residual that the forward pass reads too fails that: its backward
  consumer also reads cotangents that come from it through matmuls. Such a residual
  is computed once and kept;
- XLA:CPU computes sums in YNNPACK fusions, which fuse no producer that something else
  reads too. The backward sums the gradient of a factor spread over a product (a norm's
  scale in `x_hat * scale`, summed over batch and length) from the other factor, so
  that residual is kept.
`residuals` counts those roots, and one more array beside a kept quotient such as
softmax's, x / broadcast(s), whose divisor s has `YNN_MIN_ELEMENTS` or more: XLA turns
it into x * broadcast(1 / s), and XLA:CPU computes its backward (the cotangent's
product, times broadcast(1 / s), summed back to s's shape and negated) in one YNNPACK
fusion, which reads broadcast(1 / s) written out at the quotient's size in the forward
pass. YNNPACK declines an op whose result and operands all have fewer elements (that
negation, at s's shape: softmax's [B, N, queries] in a small batch); then loop fusions
broadcast 1 / s as they read it, and only s is kept.

A jitted function (jax.nn.silu, jnp.where) is traced once, so every call of it is the
same jaxpr with the same variables; each inlined call gets variables of its own.

Residuals of scanned layers are outputs of the scan loop, stacked over layers, so
XLA keeps exactly what JAX traced; `Residuals.stacks` lists them per stack.

The peak (`peak_bytes`) is the larger of two moments of the backward pass: its start,
where all residuals are live beside the logits' float32 cotangent (with
model.logits_chunk, one chunk's recomputed logits and their cotangent), and, under remat,
the backward of the largest layer, which rematerialises that layer's residuals while
the other layers' saved values stay live.

Checked against XLA's compiled memory in tests/test_scaling.py (three families,
scanned under each remat policy, and unrolled): within 10%.
"""

import dataclasses

import numpy as np
from jax.extend import core as jax_core

# Elementwise and layout ops that XLA fuses into the ops that consume them (not
# transposes: XLA copies a matmul operand into the layout the matmul wants).
FUSIBLE = frozenset({
    'abs', 'add', 'and', 'broadcast_in_dim', 'ceil', 'clamp', 'concatenate', 'convert_element_type',
    'copy', 'copy_p', 'cos', 'div', 'dynamic_slice', 'eq', 'erf', 'erf_inv', 'exp', 'exp2',
    'expand_dims', 'expm1', 'floor', 'ge', 'gt', 'integer_pow', 'iota', 'is_finite', 'le', 'log',
    'log1p', 'logistic', 'lt', 'max', 'min', 'mul', 'ne', 'neg', 'nextafter', 'not', 'or', 'pad',
    'pow', 'reduce_precision', 'rem', 'reshape', 'round', 'rsqrt', 'select_n', 'sign', 'sin',
    'slice', 'split', 'sqrt', 'square', 'squeeze', 'stop_gradient', 'sub', 'tanh',
    'xor'})
# The fusible ops XLA will not duplicate into a second consumer: computed once, kept.
EXPENSIVE = frozenset({'div', 'erf', 'erf_inv', 'exp', 'expm1', 'log', 'log1p', 'logistic', 'pow',
                       'rem', 'rsqrt', 'sin', 'cos', 'sqrt', 'tanh'})
# The fewest elements XLA:CPU's YNNPACK fusions take an elementwise op with (in an operand
# or its result; xla/backends/cpu/ynn_support.cc, IsInstructionPreferredByYnn).
YNN_MIN_ELEMENTS = 4096
# Calls whose bodies are inlined; every other op with a sub-jaxpr (loops, kernels such
# as splash attention's pallas_call) stays opaque: XLA keeps what crosses its boundary.
CALLS = frozenset({'pjit', 'jit', 'closed_call', 'core_call', 'checkpoint', 'remat',
                   'custom_jvp_call', 'custom_vjp_call', 'custom_vjp_call_jaxpr'})


@dataclasses.dataclass(frozen=True)
class Residuals:
  """What one trace of a loss's VJP keeps, in bytes."""
  kept: int  # the roots XLA materialises (see the module docstring)
  stacks: tuple[tuple[int, ...], ...]  # per scanned stack, each stacked residual's bytes


def _nbytes(var) -> int:
  return int(np.prod(var.aval.shape)) * var.aval.dtype.itemsize


def _is_literal(var) -> bool:
  return isinstance(var, jax_core.Literal)


class _Var:
  """One call's own copy of a variable of an inlined body: a body traced once (a jitted
  function such as jax.nn.silu) is the same jaxpr, with the same variables, at every call."""
  __slots__ = ('aval',)

  def __init__(self, aval):
    self.aval = aval


def _inline(jaxpr, eqns: list, env: dict, fresh: bool = False) -> None:
  """Appends (primitive name, inputs, outputs) of `jaxpr` to `eqns`, with `CALLS`
  replaced by their bodies; `env` maps each variable of `jaxpr` to the one it stands
  for (a body's inputs to its call's arguments, with `fresh` its own outputs to new
  variables of this call)."""
  read = lambda v: v if _is_literal(v) else env.get(v, v)
  for eqn in jaxpr.eqns:
    body = None
    if eqn.primitive.name in CALLS:
      body = next((p.jaxpr if isinstance(p, jax_core.ClosedJaxpr) else p
                   for p in eqn.params.values()
                   if isinstance(p, (jax_core.ClosedJaxpr, jax_core.Jaxpr))), None)
    if body is None:
      if fresh:
        env.update({v: v if isinstance(v, jax_core.DropVar) else _Var(v.aval)
                    for v in eqn.outvars})
      eqns.append((eqn.primitive.name, [read(v) for v in eqn.invars],
                   [read(v) for v in eqn.outvars]))
      continue
    inner = dict(zip(body.invars, map(read, eqn.invars)))
    _inline(body, eqns, inner, fresh=True)
    env.update({outer: v if _is_literal(v) else inner.get(v, v)
                for outer, v in zip(eqn.outvars, body.outvars)})


def _broadcast(var, out, producer: dict) -> bool:
  """Whether operand `var` of an elementwise op with result `out` is a smaller array
  spread over out's shape (by the op itself, broadcast_in_dim or iota)."""
  if var.aval.size < out.aval.size:
    return True
  name, inputs = producer.get(var, (None, ()))
  return name in ('broadcast_in_dim', 'iota') and all(
      v.aval.size < var.aval.size for v in inputs if not _is_literal(v))


def residuals(closed: jax_core.ClosedJaxpr, num_params: int, num_frozen: int = 0) -> Residuals:
  """Reads a ClosedJaxpr of (params, frozen params, batch) whose outputs are a VJP
  closure's residuals: its first `num_params` inputs are the differentiated parameters,
  the next `num_frozen` parameters it does not differentiate (LoRA's frozen base, whose
  gradients the backward never sums), the rest the batch."""
  eqns, env = [], {}
  _inline(closed.jaxpr, eqns, env)
  saved = [env.get(v, v) for v in closed.jaxpr.outvars if not _is_literal(v)]
  saved = {v for v in saved if not _is_literal(v)}
  producer, read_from_memory, read_by_forward = {}, set(), set()
  from_batch = set(closed.jaxpr.invars[num_params + num_frozen:])  # masks: computed once, shared
  from_params = set(closed.jaxpr.invars[:num_params])
  for name, inputs, outputs in eqns:
    arrays = [v for v in inputs if not _is_literal(v)]
    producer.update({v: (name, arrays) for v in outputs})
    if arrays and all(v in from_batch for v in arrays):  # not constants: XLA folds those
      from_batch.update(outputs)
    if any(v in from_params for v in arrays):
      from_params.update(outputs)
    if name not in FUSIBLE and not name.startswith('reduce_'):  # reductions fuse their inputs
      read_from_memory.update(arrays)
    elif name == 'mul' and any(v in from_params and _broadcast(v, outputs[0], producer)
                               for v in arrays):  # the backward sums dy * x for the factor
      read_from_memory.update(v for v in arrays if not _broadcast(v, outputs[0], producer))
    if not all(isinstance(v, jax_core.DropVar) for v in outputs):  # dead code reads nothing
      read_by_forward.update(arrays)

  def more_than_unary(var) -> bool:  # reads more than one array of its size
    operands = set(producer[var][1])
    return (sum(not _broadcast(v, var, producer) for v in operands) > 1
            and sum(v.aval.size for v in operands) > var.aval.size)

  roots, seen = set(), set()
  pending = list(saved)
  while pending:
    var = pending.pop()
    if var in seen or var not in producer:  # inputs: parameters, batch
      continue
    seen.add(var)
    name, inputs = producer[var]
    if (name in FUSIBLE and name not in EXPENSIVE and var not in read_from_memory
        and var not in from_batch
        and not (var in saved and var in read_by_forward and more_than_unary(var))):
      pending.extend(inputs)  # recomputed inside the backward's fusion
    else:
      roots.add(var)
  # XLA turns x / broadcast(s) into x * broadcast(1 / s) and keeps that broadcast, as
  # large as the quotient, beside a kept quotient (softmax probabilities) where the
  # backward is one YNNPACK fusion: s of YNN_MIN_ELEMENTS or more (module docstring).
  reciprocals = sum(_nbytes(v) for v in roots if producer[v][0] == 'div'
                    and len(producer[v][1]) == 2
                    and YNN_MIN_ELEMENTS <= producer[v][1][1].aval.size < v.aval.size)
  # A scan that stacks nothing (the loss over chunks of the sequence, model.logits_chunk)
  # is no layer stack.
  stacks = tuple(stack for stack in (
      tuple(_nbytes(v) for v in eqn.outvars[eqn.params['num_carry']:])
      for eqn in closed.jaxpr.eqns if eqn.primitive.name == 'scan') if stack)
  return Residuals(kept=sum(_nbytes(v) for v in roots) + reciprocals, stacks=stacks)


def peak_bytes(traced: Residuals, scanned: Residuals, scanned_plain: Residuals, num_layers: int,
               logits_bytes: int) -> int:
  """Peak activation bytes of one micro-batch's backward pass.

  traced: the run's own trace (its remat policy, scanned or unrolled layers);
  scanned, scanned_plain: traces with scanned layers under that policy and under
  'none', which give the per-layer figures; logits_bytes: what the loss's backward holds
  beside the residuals (the logits' float32 cotangent).
  """
  start = traced.kept + logits_bytes
  if scanned.stacks == scanned_plain.stacks:  # no remat: nothing is recomputed
    return start
  saved_by_layers = sum(map(sum, scanned.stacks))
  # The largest layer's backward: its rematerialised residuals, and the cotangent of
  # its largest activation.
  layer = max((sum(plain) - sum(kept)) / num_layers + max(plain) / num_layers
              for plain, kept in zip(scanned_plain.stacks, scanned.stacks))
  return int(max(start, saved_by_layers + layer))
