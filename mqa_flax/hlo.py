"""What a compiled program moves inside its loops, read from XLA's HLO text.

`loop_kernels` / `entry_kernels` list the kernels a compiled program
launches (in one while-loop step, or outside any loop), each with the bytes
it reads and writes: `mqa_flax.gpu_program` reports them for a GPU target.

`loop_traffic` finds, in every while-loop body, the ops that write an array
at least as large as a given size (one K/V cache leaf, say) and adds up their
bytes by what they compute. The decode benchmark uses it to show whether a
cache is updated in place and read as stored (only `dynamic-update-slice`
bytes) or copied every step (copy, transpose, gather, ... bytes).
"""

import collections
import dataclasses
import math
import re
from typing import Any

_HLO_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 'bf16': 2, 'f16': 2, 's16': 2,
              'f32': 4, 's32': 4, 'u32': 4, 'f64': 8, 's64': 8, 'u64': 8}
# Ops whose result costs no traffic of its own.
_NO_WRITE = {'parameter', 'get-tuple-element', 'tuple', 'bitcast', 'constant',
             'while', 'call', 'conditional', 'after-all', 'partition-id'}
# Kinds that copy data (an in-place dynamic-update-slice writes only its update).
COPY_KINDS = ('copy', 'transpose', 'gather', 'concatenate', 'slice',
              'dynamic-slice')


def _parse_hlo(hlo_text: str) -> dict[str, dict[str, tuple[str, str, str]]]:
  """computation -> op name -> (kind, result type, rest of the line)."""
  comps, current = {}, None
  for line in hlo_text.splitlines():
    # A computation opens with `%name (params...) -> type {` (ENTRY for main).
    head = re.match(r'(?:ENTRY )?%([\w.\-]+) .*\{$', line)
    # An op: `[ROOT ]%name = type kind(operands...), attributes`; the type may
    # be a tuple `(f32[8,4]{1,0}, s32[])`, hence the lazy `.+?` up to the
    # lower-case op kind that an opening parenthesis follows.
    op = re.match(r'\s*(ROOT )?%(\S+) = (.+?) ([a-z][\w\-]*)\((.*)$', line)
    if head:
      current = comps.setdefault(head.group(1), {})
    elif op and current is not None:
      root, name, typ, kind, rest = op.groups()
      current[name] = (kind, typ, rest)
      if root:
        current['ROOT'] = current[name]
  return comps


def _root_kinds(comps: dict, fused: str) -> list[str]:
  """What a fusion computes: its ROOT's op kind, per output of a tuple root."""
  ops = comps.get(fused, {})
  kind, _, rest = ops.get('ROOT', ('fusion', '', ''))
  # A tuple ROOT lists its elements as operands: `tuple(%a, %b)`.
  names = re.findall(r'%([\w.\-]+)', rest.split(')')[0]) if kind == 'tuple' else []
  roots = [ops[n] for n in names if n in ops] or [ops.get('ROOT', (kind, '', rest))]
  out = []
  for kind, _, rest in roots:
    while kind == 'bitcast':  # A bitcast only renames; look at what it renames.
      operand = re.match(r'[^%]*%([\w.\-]+)', rest)  # Its first operand.
      if not operand or operand.group(1) not in ops:
        break
      kind, _, rest = ops[operand.group(1)]
    out.append(kind)
  return out


def loop_traffic(hlo_text: str, min_bytes: int,
                 every_body: bool = False) -> dict[str, int] | list[dict[str, int]]:
  """Bytes written per iteration, by op kind, of arrays >= min_bytes in while loops.

  Reads compiled HLO text. For every while-loop body, every op whose result
  (or an element of a tuple result) has at least `min_bytes` bytes (one K/V
  cache leaf, say) counts under its kind; a fusion counts under what its
  ROOT computes (XLA names an in-place update `copy_dynamic-update-slice_fusion`
  and a layout change may be a `copy_bitcast_fusion`). Returns the body with
  the most bytes (or, with `every_body`, one dict per body, in the order
  the HLO defines them): with one step per iteration, bytes per step. A
  `dynamic-update-slice` is the in-place cache update (its operand buffer is
  reused, only the update is written); a custom call's result aliased to
  an operand (the Pallas attention's cache write) is in place too and
  counts nothing; COPY_KINDS are real copies.
  """
  comps = _parse_hlo(hlo_text)
  # A while op names its loop body as an attribute: `while(...), body=%name`.
  bodies = dict.fromkeys(re.findall(r'body=%([\w.\-]+)', hlo_text))
  best: dict[str, int] = {}
  every = []
  for body in bodies:
    per_kind = collections.Counter()
    for name, (kind, typ, rest) in comps.get(body, {}).items():
      if name == 'ROOT' or kind in _NO_WRITE:
        continue
      arrays = re.findall(r'(\w+)\[([\d,]*)\]', typ)  # `bf16[8,128,1,64]`s.
      kinds = [kind] * len(arrays)
      if kind == 'fusion':
        fused = re.search(r'calls=%([\w.\-]+)', rest)  # The fused computation.
        roots = _root_kinds(comps, fused.group(1)) if fused else []
        kinds = roots if len(roots) == len(arrays) else [
            roots[0] if roots else kind] * len(arrays)
      in_place = _aliased_results(rest) if kind == 'custom-call' else set()
      for i, ((dtype, dims), k) in enumerate(zip(arrays, kinds)):
        nbytes = _HLO_BYTES.get(dtype, 4) * math.prod(
            int(d) for d in dims.split(',') if d)
        if nbytes >= min_bytes and k not in _NO_WRITE and i not in in_place:
          per_kind[k] += nbytes
    every.append(dict(per_kind))
    if sum(per_kind.values()) > sum(best.values()):
      best = dict(per_kind)
  return every if every_body else best


def cache_copy_bytes(by_kind: dict[str, int]) -> int:
  """The COPY_KINDS part of `loop_traffic`'s result."""
  return sum(v for k, v in by_kind.items() if k in COPY_KINDS)


# ------------------------------------------------------------------ kernels

# Ops that launch nothing: they name, group or alias buffers (an async op's
# `-done` half waits for its `-start`).
_NO_KERNEL = {'parameter', 'get-tuple-element', 'tuple', 'bitcast', 'constant',
              'after-all', 'partition-id', 'opt-barrier', 'add-dependency',
              'copy-done', 'async-done', 'domain'}
# Ops whose kernels live in other computations: the kernels of those count.
_CALLS = {'while': r'(?:body|condition)=%([\w.\-]+)',
          'call': r'to_apply=%([\w.\-]+)',
          'async-start': r'calls=%([\w.\-]+)',
          'conditional': r'%([\w.\-]+)'}
_COMPUTES = ('gemm', 'reduction', 'attention', 'pallas')  # Kernel kinds that are no copy.
_READ_PART = {'slice', 'dynamic-slice', 'gather'}  # Read only their result.


@dataclasses.dataclass(frozen=True)
class Kernel:
  """One kernel launch: what it computes and the bytes it moves.

  `read`: the bytes of its distinct operands, where an operand that the
  kernel only slices (slice, dynamic-slice, gather) counts the slices' bytes
  and the buffer an in-place dynamic-update-slice updates counts nothing.
  `written`: the bytes of its results, an in-place update counting its
  update's bytes and a custom call's result aliased to an operand nothing
  (in place; how much of it the kernel writes is not in the HLO).
  `outputs`: (bytes written, updated in place) per result.
  `flops`: the multiply-adds of its dots, times 2 (GEMM fusions, library
  GEMMs, the Pallas output-GEMM and LayerNorm-GEMM kernels and cuDNN's
  fused attention; 0 for everything else, whose arithmetic is small beside
  its bytes).
  """

  name: str
  kind: str
  read: int
  written: int
  outputs: tuple[tuple[int, bool], ...]
  target: str = ''  # A custom call's target.
  flops: int = 0

  def copies(self, min_bytes: int) -> list[int]:
    """Bytes of each array of >= min_bytes it copies: writes other than in
    place, computing nothing (no GEMM, reduction or attention)."""
    if not min_bytes or self.kind in _COMPUTES:
      return []
    return [b for b, inplace in self.outputs if b >= min_bytes and not inplace]


def _nbytes(typ: str) -> list[int]:
  """Bytes of each array in an HLO type (`bf16[8,4]{1,0}` or a tuple of them)."""
  return [_HLO_BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(',') if d)
          for dtype, dims in re.findall(r'(\w+)\[([\d,]*)\]', typ)]


def _dims(typ: str) -> list[int]:
  """The dimensions of a one-array HLO type (`bf16[8,4]{1,0}` -> [8, 4])."""
  found = re.search(r'\[([\d,]*)\]', typ)
  return [int(d) for d in found.group(1).split(',') if d] if found else []


def _dot_flops(ops: dict, op: tuple) -> int:
  """2 x result elements x contracted elements of a `dot` op."""
  _, typ, rest = op
  lhs = ops.get(_operands(rest)[0])
  contracting = re.search(r'lhs_contracting_dims=\{([\d,]*)\}', rest)
  if lhs is None or contracting is None:
    return 0
  lhs_dims = _dims(lhs[1])
  k = math.prod(lhs_dims[int(d)] for d in contracting.group(1).split(',') if d)
  return 2 * math.prod(_dims(typ)) * k


def _custom_call_flops(ops: dict, typ: str, rest: str, kind: str) -> int:
  """A library GEMM's (its dot dimensions in the backend config; the first
  result is the product), a Pallas output-GEMM kernel's (`logits_*`:
  x [B, D] . table [V, D]ᵀ), a Pallas LayerNorm-GEMM's (`norm_gemm`:
  x [B, D] . w [D, N]), or cuDNN's fused attention's (q [B, T, N, H]
  and k [B, S, K, H], its first two operand shapes: every score computed,
  masked or not; forward QKᵀ and PV, 4·B·T·N·S·H; backward QKᵀ again and
  four more products, 10·B·T·N·S·H)."""
  shapes = [_dims(ops[o][1]) for o in _operands(rest) if o in ops]
  if kind == 'gemm':
    found = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', rest)
    if not (found and shapes):
      return 0
    k = math.prod(shapes[0][int(d.strip('" '))] for d in found.group(1).split(',') if d)
    return 2 * k * math.prod(_dims(typ))
  if kind == 'pallas' and re.search(r'name = "logits_', rest) and len(shapes) >= 2:
    (b, d), (v, _) = shapes[0], shapes[1]
    return 2 * b * v * d
  if kind == 'pallas' and re.search(r'name = "norm_gemm', rest) and len(shapes) >= 2:
    (b, d), (_, n) = shapes[0], shapes[1]
    return 2 * b * d * n
  if kind == 'attention' and 'fmha' in rest:  # Logical shapes, not the layouts'.
    constraints = _attr(rest, 'operand_layout_constraints')
    q, k = ([_dims(t) for t in re.findall(r'\w+\[[\d,]*\]', constraints)] + [[], []])[:2]
    if len(q) == 4 and len(k) == 4:
      return (10 if 'Backward' in rest else 4) * math.prod(q) * k[1]
  return 0


def _operands(rest: str) -> list[str]:
  """Operand names of an op (its first parenthesised list)."""
  return re.findall(r'%([\w.\-]+)', rest.split(')')[0])


def _unbitcast(ops: dict, op: tuple | None) -> tuple | None:
  """The op that a chain of bitcasts ending in `op` renames (`op` if none)."""
  while op and op[0] == 'bitcast' and _operands(op[2]):
    op = ops.get(_operands(op[2])[0])
  return op


def _users(ops: dict, name: str) -> list[tuple[str, tuple, int]]:
  """(user, op, operand position) of every use of `name`, seen through bitcasts."""
  out = []
  for user, op in ops.items():
    if user == 'ROOT':
      continue
    for i, operand in enumerate(_operands(op[2])):
      if operand == name:
        out += _users(ops, user) if op[0] == 'bitcast' else [(user, op, i)]
  return out


def _fusion_kind(ops: dict, roots: list[tuple], rest: str, name: str) -> str:
  """What a fusion computes, in a few words (gemm, reduction, update, ...)."""
  kinds = {op[0] for n, op in ops.items() if n != 'ROOT'}
  root_kinds = {op[0] for op in roots}
  sizes = [b for op in roots for b in _nbytes(op[1])]
  if 'dot' in kinds or 'gemm' in name or '__triton_gemm' in rest:
    return 'gemm'
  if root_kinds == {'dynamic-update-slice'}:
    return 'update'
  if 'reduce' in kinds:
    return 'reduction'
  if 'transpose' in kinds or root_kinds == {'copy'}:
    return 'transpose'
  for kind in ('gather', 'scatter', 'concatenate'):
    if kind in root_kinds:
      return kind
  if root_kinds <= _READ_PART:
    return 'slice'
  if root_kinds == {'convert'}:
    return 'convert'
  if all(b <= 8 for b in sizes):
    return 'scalar'
  return 'elementwise'


def _fusion(comps: dict, ops: dict, name: str, op: tuple) -> Kernel:
  """A fusion's kernel: its kind and its bytes, read as `Kernel` says."""
  _, typ, rest = op
  called = re.search(r'calls=%([\w.\-]+)', rest)
  fused = comps.get(called.group(1), {}) if called else {}
  root = fused.get('ROOT')
  if root is None:  # No fused computation to read: whole results.
    outs = _nbytes(typ)
    return Kernel(name, 'fusion', 0, sum(outs), tuple((b, False) for b in outs))
  # One root per result: a tuple ROOT lists them as its operands.
  roots = ([_unbitcast(fused, fused.get(n)) for n in _operands(root[2])]
           if root[0] == 'tuple' else [_unbitcast(fused, root)])
  outputs = []
  for r in roots:
    if r[0] == 'dynamic-update-slice':  # In place: writes only its update.
      outputs.append((sum(_nbytes(fused[_operands(r[2])[1]][1])), True))
    else:
      outputs += [(b, False) for b in _nbytes(r[1])]
  params = {int(re.match(r'(\d+)', r).group(1)): n for n, (k, _, r) in fused.items()
            if k == 'parameter' and n != 'ROOT'}
  read = 0
  operands = _operands(rest)
  for operand in dict.fromkeys(operands):  # An operand passed twice is read once.
    full = sum(_nbytes(ops[operand][1])) if operand in ops else 0
    param = params.get(operands.index(operand))
    if param is None:
      read += full
      continue
    part = 0
    for _, user_op, pos in _users(fused, param):
      if (user_op[0] == 'dynamic-update-slice' and pos == 0 and
          any(user_op is r for r in roots)):
        continue  # The buffer updated in place (a result; else read whole).
      part += sum(_nbytes(user_op[1])) if user_op[0] in _READ_PART and pos == 0 else full
    read += min(full, part)
  flops = sum(_dot_flops(fused, o) for n, o in fused.items()
              if o[0] == 'dot' and n != 'ROOT')
  return Kernel(name, _fusion_kind(fused, roots, rest, name), read,
                sum(b for b, _ in outputs), tuple(outputs), flops=flops)


def _kernel(comps: dict, ops: dict, name: str, op: tuple) -> Kernel:
  """The kernel one op launches."""
  kind, typ, rest = op
  if kind == 'fusion':
    return _fusion(comps, ops, name, op)
  operands = list(dict.fromkeys(_operands(rest)))
  sizes = [sum(_nbytes(ops[o][1])) for o in operands if o in ops]
  outs = _nbytes(typ)
  target = ''
  if kind == 'custom-call':
    target = re.search(r'custom_call_target="([^"]*)"', rest).group(1)
    if len(outs) > 1 and re.match(r'\(.*[su]8\[\d+\]\{?0?\}?\)$', typ.strip()):
      outs = outs[:-1]  # The library's scratch workspace.
    kind = ('gemm' if 'gemm' in target or 'matmul' in target.lower() else
            'attention' if 'fmha' in target or 'cudnn' in target else
            'pallas' if 'triton' in target else 'custom-call')
  if kind == 'dynamic-update-slice':  # In place: reads and writes the update.
    update = sizes[1] if len(sizes) > 1 else 0
    return Kernel(name, 'update', update, update, ((update, True),))
  if kind == 'copy-start':
    kind, outs = 'copy', outs[:1]
  flops = _custom_call_flops(ops, typ, rest, kind) if target else 0
  # A custom call's result aliased to an operand is updated in place (the
  # Pallas attention writing a cache row): the HLO does not say how much of
  # it the kernel writes, and it counts nothing written. A library GEMM's is
  # the addend it accumulates into (beta = 1): it writes all of it.
  aliased = _aliased_results(rest)
  outputs = tuple((0 if i in aliased and kind != 'gemm' else b, i in aliased)
                  for i, b in enumerate(outs))
  return Kernel(name, kind, sum(sizes), sum(b for b, _ in outputs), outputs,
                target, flops)


def _aliased_results(rest: str) -> set[int]:
  """Which results of a custom call alias one of its operands (written in
  place), from its `output_to_operand_aliasing={{1}: (1, {}), ...}`."""
  return {int(i or 0) for i in re.findall(
      r'\{(\d*)\}:\s*\(\d+', _attr(rest, 'output_to_operand_aliasing'))}


def _attr(rest: str, name: str) -> str:
  """The text of an op's attribute `name={...}` (braces balanced), or ''."""
  start = rest.find(name + '={')
  if start < 0:
    return ''
  depth, i = 0, start + len(name) + 1
  for j in range(i, len(rest)):
    depth += {'{': 1, '}': -1}.get(rest[j], 0)
    if not depth:
      return rest[i:j + 1]
  return rest[i:]


def _computation_kernels(comps: dict, comp: str) -> list[Kernel]:
  """Kernels of a computation in schedule order, called computations inlined."""
  ops = comps.get(comp, {})
  out = []
  for name, op in ops.items():
    kind, _, rest = op
    if name == 'ROOT' or kind in _NO_KERNEL:
      continue
    if kind in _CALLS:
      attrs = rest.split(')', 1)[1] if kind == 'conditional' else rest
      if kind == 'conditional':
        attrs = ' '.join(re.findall(r'(?:branch_computations=\{[^}]*\}|'
                                    r'(?:true|false)_computation=%[\w.\-]+)', attrs))
      for called in re.findall(_CALLS[kind], attrs):
        out += _computation_kernels(comps, called)
      continue
    out.append(_kernel(comps, ops, name, op))
  return out


def loop_kernels(hlo_text: str) -> list[list[Kernel]]:
  """The kernels of one iteration of each while loop: its body and condition."""
  comps = _parse_hlo(hlo_text)
  loops = re.findall(r'condition=%([\w.\-]+), body=%([\w.\-]+)', hlo_text)
  loops += [(c, b) for b, c in re.findall(r'body=%([\w.\-]+), condition=%([\w.\-]+)',
                                          hlo_text)]
  return [_computation_kernels(comps, body) + _computation_kernels(comps, cond)
          for cond, body in dict.fromkeys(loops)]


def entry_kernels(hlo_text: str) -> list[Kernel]:
  """The kernels of the entry computation that run once per call, outside loops."""
  comps = _parse_hlo(hlo_text)
  entry = re.search(r'^ENTRY %([\w.\-]+)', hlo_text, re.M).group(1)
  ops = comps.get(entry, {})
  return [_kernel(comps, ops, n, op) for n, op in ops.items()
          if n != 'ROOT' and op[0] not in _NO_KERNEL and op[0] not in _CALLS]


def beam_reorder_arrays(num_decoder_layers: int, beam_size: int, cache_mode: str,
                        beam_cache: str = 'reorder') -> int:
  """Cache-sized arrays beam search's own reorder writes per step: the padded
  reorder gathers every self K/V leaf whole, the growing one updates their
  first positions in place, the 'pointers' cache moves none
  (`step_counts` does not count these as copies)."""
  whole = beam_size > 1 and cache_mode == 'padded' and beam_cache == 'reorder'
  return 2 * num_decoder_layers if whole else 0


def step_counts(hlo_text: str, leaf_bytes: int, floor: float | None = None,
                reorder_arrays: int = 0, steps_per_loop: int = 1) -> dict[str, Any]:
  """One step's kernels, bytes and cache-sized copies, from compiled HLO text.

  The step is the while-loop body (plus its condition) that moves the most
  bytes, divided by the `steps_per_loop` decode steps it runs (beam
  search's loop of two steps: `decoding.steps_per_loop`); a program
  without a loop (encoder, train step) is its entry computation. A cache
  copy is an array at least as large as one cache leaf (`leaf_bytes`) that
  a kernel computing nothing writes other than in place (`Kernel.copies`);
  the first `reorder_arrays` of them per step are the beam reorder's own
  (it writes every self K/V leaf once), not counted. `kernels` lists the
  whole loop body.
  """
  loops = loop_kernels(hlo_text)
  entry = entry_kernels(hlo_text)
  step = max(loops, key=lambda k: sum(x.read + x.written for x in k)) if loops else entry
  n = steps_per_loop if loops else 1

  def per_step(x):  # Whole when the loop's count divides.
    return x // n if x % n == 0 else x / n

  moved = sum(k.read + k.written for k in step)
  by_kind: dict[str, int] = {}
  for k in step:
    by_kind[k.kind] = by_kind.get(k.kind, 0) + 1
  copies = [b for k in step for b in k.copies(leaf_bytes)]
  entry_copies = [b for k in entry for b in k.copies(leaf_bytes)]
  own = reorder_arrays * n
  return dict(
      loops=len(loops),
      steps_per_loop=n,
      kernels_per_step=per_step(len(step)),
      kernels_by_kind={kind: per_step(c) for kind, c in
                       sorted(by_kind.items(), key=lambda kv: -kv[1])},
      bytes_read_per_step=per_step(sum(k.read for k in step)),
      bytes_written_per_step=per_step(sum(k.written for k in step)),
      bytes_moved_per_step=per_step(moved),
      floor_bytes_per_step=floor,
      bytes_over_floor=moved / n / floor if floor else None,
      cache_copies_per_step=per_step(max(0, len(copies) - own)),
      cache_copy_bytes_per_step=per_step(max(0, sum(copies) - own * leaf_bytes)),
      cache_copies_per_call=len(entry_copies),
      custom_calls=sorted({k.target for k in step + entry if k.target}),
      kernels=[dataclasses.asdict(k) for k in step],
  )
