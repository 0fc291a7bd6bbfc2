"""The per-op table of a traced compiled function (benchmarks/profile.py prints it).

The CPU runtime records one trace event per executed thunk, named by its HLO
instruction ('fusion.12', 'ynn_fusion.3', 'copy.4', 'while.1'); events of other names
(the runtime's own) are left out. An op's time is its self time: a while loop's event
encloses its body's, so the body's ops are subtracted from it. From the optimized HLO
(`compiled.as_text()`) each op gets:
  flops  2 x (result elements) x (contracted elements) of every dot (and convolution)
         it runs, those inside a fusion's computation included; other ops count 0
  bytes  its operands' and results' sizes, except what it moves in part: a buffer a
         dynamic-update-slice updates in place (a KV-cache write) counts the slice
         written, a table read only by gathers or dynamic slices (an embedding lookup)
         the slices read
  what   the fusion's kind and root op, its dots' shapes, and the JAX source op_name
and, over its time, achieved GFLOP/s and GB/s.
"""
import collections
import dataclasses
import glob
import gzip
import json
import math
import os
import re
import time

import jax

from benchmarks import Program

_DTYPE_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2, 'bf16': 2,
                's32': 4, 'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'c64': 8,
                'c128': 16, 's4': 0.5, 'u4': 0.5}
_ARRAY = re.compile(r'\b([a-z]+[0-9]*(?:e[0-9]m[0-9][a-z]*)?)\[([0-9,]*)\]')
_COMPUTATION = re.compile(r'^(?:ENTRY )?%(\S+) .*\{$')
_INSTRUCTION = re.compile(
    r'^\s*(ROOT )?%(\S+) = (.+?) ([a-z][a-z0-9\-_]*)\(([^)]*)\)(.*)$')


def _arrays(shape: str) -> list[tuple[str, list[int]]]:
  """(dtype, dims) of each array in an HLO shape (several for a tuple)."""
  return [(dtype, [int(d) for d in dims.split(',') if d])
          for dtype, dims in _ARRAY.findall(shape)]


def shape_bytes(shape: str) -> float:
  return sum(_DTYPE_BYTES.get(dtype, 0) * math.prod(dims) for dtype, dims in _arrays(shape))


@dataclasses.dataclass
class Instruction:
  """One HLO instruction as the optimized module's text states it."""
  name: str
  shape: str
  opcode: str
  operands: list[str]  # names of the instructions it reads
  arguments: str  # the text between its parentheses ('0' for parameter(0))
  attributes: str
  computation: str
  root: bool

  def attribute(self, key: str) -> str | None:
    found = re.search(rf'\b{key}=(%?[\w.\-]+|\{{[^}}]*\}})', self.attributes)
    return found.group(1).lstrip('%') if found else None

  @property
  def op_name(self) -> str:
    found = re.search(r'op_name="([^"]*)"', self.attributes)
    return found.group(1) if found else ''


class Module:
  """The instructions of an optimized HLO module, by name (unique in a module), each
  computation's instructions in order, and the entry computation's name."""

  def __init__(self, hlo_text: str):
    self.instructions: dict[str, Instruction] = {}
    self.computations: dict[str, list[Instruction]] = collections.defaultdict(list)
    self.entry = computation = ''
    for line in hlo_text.splitlines():
      header = _COMPUTATION.match(line)
      if header:
        computation = header.group(1)
        if line.startswith('ENTRY'):
          self.entry = computation
        continue
      found = _INSTRUCTION.match(line)
      if found and computation:
        root, name, shape, opcode, operands, attributes = found.groups()
        instruction = Instruction(name, shape, opcode, re.findall(r'%([\w.\-]+)', operands),
                                  operands, attributes, computation, bool(root))
        self.instructions[name] = instruction
        self.computations[computation].append(instruction)

  def root(self, computation: str) -> Instruction | None:
    return next((i for i in self.computations.get(computation, ()) if i.root), None)

  def dots(self, instruction: Instruction) -> list[Instruction]:
    """The dots and convolutions an instruction runs: itself, or those of the
    computation a fusion runs, recursively; not a loop's, a call's or a conditional's
    (their ops are timed as ops of their own: _CONTROL_FLOW) nor a reduction's."""
    if instruction.opcode in ('dot', 'convolution'):
      return [instruction]
    if instruction.opcode != 'fusion':
      return []
    return [d for i in self.computations.get(instruction.attribute('calls'), ())
            for d in self.dots(i)]

  def flops(self, instruction: Instruction) -> float:
    """2 x multiply-adds of the instruction's dots and convolutions."""
    total = 0.0
    for dot in self.dots(instruction):
      out = math.prod(_arrays(dot.shape)[0][1])
      if dot.opcode == 'dot':
        lhs = _arrays(self.instructions[dot.operands[0]].shape)[0][1]
        contracting = dot.attribute('lhs_contracting_dims') or '{}'
        per_output = math.prod(lhs[int(d)] for d in re.findall(r'\d+', contracting))
      else:  # convolution: a kernel's elements per output feature
        kernel = _arrays(self.instructions[dot.operands[1]].shape)[0][1]
        labels = re.search(r'dim_labels=\w+_(\w+)->', dot.attributes)
        out_features = kernel[labels.group(1).index('o')] if labels else 1
        per_output = math.prod(kernel) / out_features
      total += 2.0 * out * per_output
    return total

  def _fused_parameters(self, instruction: Instruction) -> dict[int, list[tuple]]:
    """Operand index -> [(user, position)] inside the op's computation: for a fusion, the
    users of each of its parameters; for any other op, the op itself at each operand."""
    if instruction.opcode != 'fusion':
      return {i: [(instruction, i)] for i in range(len(instruction.operands))}
    body = self.computations.get(instruction.attribute('calls') or '', [])
    number = {i.name: int(i.arguments) for i in body if i.opcode == 'parameter'}
    users = collections.defaultdict(list)
    for user in body:
      for position, name in enumerate(user.operands):
        if name in number:
          users[number[name]].append((user, position))
    return users

  def bytes(self, instruction: Instruction) -> float:
    """Operand + result bytes, except for operands the op moves in part: a table read
    only by gathers or dynamic slices counts the slices read; a buffer updated in place
    by a dynamic-update-slice that the op returns (a KV-cache write) counts the slice
    written, and that result is not counted whole."""
    outputs = [instruction]
    if instruction.opcode == 'fusion':
      root = self.root(instruction.attribute('calls') or '')
      outputs = ([self.instructions[o] for o in root.operands] if root and root.opcode == 'tuple'
                 else [root] if root else [])
    users_of = self._fused_parameters(instruction)
    total, seen = shape_bytes(instruction.shape), set()
    for index, name in enumerate(instruction.operands):
      if name in seen or name not in self.instructions:
        continue
      seen.add(name)
      users = users_of.get(index, [])
      if users and all(u.opcode in ('gather', 'dynamic-slice') and p == 0 for u, p in users):
        total += sum(shape_bytes(u.shape) for u, _ in users)
      elif (len(users) == 1 and users[0][1] == 0 and users[0][0].opcode == 'dynamic-update-slice'
            and any(out is users[0][0] for out in outputs)):
        update = users[0][0]
        written = shape_bytes(self.instructions[update.operands[1]].shape)
        total += written - shape_bytes(update.shape)
      else:
        total += shape_bytes(self.instructions[name].shape)
    return total

  def describe(self, instruction: Instruction) -> str:
    """The fusion's kind and root op (or the op), its dots' shapes, the source op_name."""
    parts = [instruction.opcode]
    if instruction.opcode == 'fusion':
      kind = re.search(r'"kind":"__(\w+?)_fusion"', instruction.attributes)
      root = self.root(instruction.attribute('calls') or '')
      parts = [f"{kind.group(1) if kind else instruction.attribute('kind') or ''} fusion"
               f"{' -> ' + root.opcode if root else ''}"]
    dots = self.dots(instruction)
    if dots:
      shapes = ['x'.join(_dims(self.instructions[o].shape) for o in d.operands[:2]
                         if o in self.instructions) for d in dots]
      parts.append(f"{len(dots)} dot{'s' if len(dots) > 1 else ''} " + ', '.join(shapes))
    names = dict.fromkeys(_short(d.op_name) for d in dots if d.op_name)
    if not names and instruction.op_name:
      names = {_short(instruction.op_name): None}
    if names:
      parts.append('; '.join(names))
    return ' | '.join(parts)


def _dims(shape: str) -> str:
  arrays = _arrays(shape)
  return '[' + ','.join(map(str, arrays[0][1])) + ']' if arrays else shape


def _short(op_name: str) -> str:
  """A JAX op_name without its outermost 'jit(f)/' (a 'transpose(jvp(...))' in it marks
  the backward pass)."""
  return re.sub(r'^jit\([^)]*\)/', '', op_name).replace("\\'", "'")


# --- the trace ------------------------------------------------------------------
_CONTROL_FLOW = ('while', 'conditional', 'call')  # their self time is the loop's overhead


def op_times(events: list[dict], names) -> dict[str, list]:
  """HLO op name -> [events, self microseconds]: each event of an op (named as one of
  `names`) less the events of ops nested in it on its thread (a loop's body)."""
  by_thread = collections.defaultdict(list)
  for event in events:
    if event.get('ph') == 'X' and event.get('name') in names:
      by_thread[event.get('pid'), event.get('tid')].append(event)
  times = collections.defaultdict(lambda: [0, 0.0])
  for thread in by_thread.values():
    thread.sort(key=lambda e: (e['ts'], -e['dur']))
    open_ops = []  # (end, name) of the enclosing ops, innermost last
    for event in thread:
      while open_ops and open_ops[-1][0] <= event['ts']:
        open_ops.pop()
      times[event['name']][0] += 1
      times[event['name']][1] += event['dur']
      if open_ops:
        times[open_ops[-1][1]][1] -= event['dur']
      open_ops.append((event['ts'] + event['dur'], event['name']))
  return dict(times)


def _row(op: str, count: int, us: float, total_us: float, flops: float, size: float | None,
         what: str) -> dict:
  """A table row; flops and bytes are per execution."""
  seconds = max(us, 1e-3) / 1e6
  return {'op': op, 'count': count, 'total_ms': us / 1e3, 'share': us / total_us,
          'flops': flops, 'bytes': size,
          'gflop_per_s': flops * count / seconds / 1e9 if flops else None,
          'gb_per_s': size * count / seconds / 1e9 if size else None, 'what': what}


def op_rows(module: Module, times: dict[str, list]) -> list[dict]:
  """The table: one row per op, most time first."""
  total_us = sum(us for _, us in times.values()) or 1.0
  rows = []
  for name, (count, us) in sorted(times.items(), key=lambda item: -item[1][1]):
    instruction = module.instructions[name]
    size = None if instruction.opcode in _CONTROL_FLOW else module.bytes(instruction)
    rows.append(_row(name, count, us, total_us, module.flops(instruction), size,
                     module.describe(instruction)))
  return rows


def rows_by_what(rows: list[dict]) -> list[dict]:
  """The table with the ops of one description merged into one row (the same source op
  in each of a decode's loops, or in every layer where the op_name does not say which);
  'op' lists them, flops and bytes are means per execution."""
  groups = collections.defaultdict(list)
  for row in rows:
    groups[row['what']].append(row)
  total_us = sum(row['total_ms'] for row in rows) * 1e3 or 1.0
  merged = []
  for what, group in groups.items():
    count = sum(r['count'] for r in group)
    sizes = [r['bytes'] for r in group if r['bytes'] is not None]
    merged.append(_row(
        ','.join(r['op'] for r in group), count, sum(r['total_ms'] for r in group) * 1e3,
        total_us, sum(r['flops'] * r['count'] for r in group) / count,
        sum(r['bytes'] * r['count'] for r in group) / count if sizes else None, what))
  return sorted(merged, key=lambda row: -row['total_ms'])


def profile(program: Program, steps: int, directory: str) -> tuple[list[dict], dict]:
  """(table rows, totals) of `steps` calls of the program traced into `directory`
  after one warm-up call; the table also goes to DIRECTORY/profile.jsonl."""
  jax.block_until_ready(program.run())
  pattern = os.path.join(directory, 'plugins', 'profile', '*', 'perfetto_trace.json.gz')
  before = set(glob.glob(pattern))
  jax.profiler.start_trace(directory, create_perfetto_trace=True)
  start = time.perf_counter()
  for _ in range(steps):
    jax.block_until_ready(program.run())
  wall_s = time.perf_counter() - start
  jax.profiler.stop_trace()
  trace = max(set(glob.glob(pattern)) - before, key=os.path.getmtime)
  with gzip.open(trace) as f:
    events = json.load(f)['traceEvents']
  module = Module(program.compiled.as_text())
  rows = op_rows(module, op_times(events, module.instructions))
  op_s = sum(row['total_ms'] for row in rows) / 1e3
  totals = {'steps': steps, 'wall_s': wall_s, 'wall_s_per_step': wall_s / steps,
            'op_s': op_s, 'op_share_of_wall': op_s / wall_s, 'ops': len(rows),
            'flops': sum(r['flops'] * r['count'] for r in rows),
            'trace': trace}
  with open(os.path.join(directory, 'profile.jsonl'), 'w') as f:
    for row in rows:
      f.write(json.dumps(row) + '\n')
  return rows, totals


def _number(value, digits: int = 1) -> str:
  return '-' if value is None else f'{value:.{digits}f}'


def format_table(rows: list[dict], totals: dict) -> str:
  lines = [f"{'op':<34} {'count':>6} {'total ms':>9} {'share':>6} {'GFLOP/s':>8} "
           f"{'GB/s':>7}  what"]
  for row in rows:
    lines.append(f"{row['op'][:34]:<34} {row['count']:>6} {row['total_ms']:>9.1f} "
                 f"{row['share']:>6.1%} {_number(row['gflop_per_s']):>8} "
                 f"{_number(row['gb_per_s']):>7}  {row['what'][:150]}")
  lines.append(
      f"{totals['steps']} calls: {totals['wall_s']:.3f} s wall ({totals['wall_s_per_step']:.3f} "
      f"s per call), ops {totals['op_s']:.3f} s ({totals['op_share_of_wall']:.0%} of wall, "
      f"{totals['ops']} ops; more than 100% where ops ran side by side), "
      f"{totals['flops'] / max(totals['op_s'], 1e-9) / 1e9:.1f} GFLOP/s of dots over op time; "
      f"trace: {totals['trace']}")
  return '\n'.join(lines)
