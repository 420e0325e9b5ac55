"""What a compiled program moves inside its loops, read from XLA's HLO text.

`loop_traffic` finds, in every while-loop body, the ops that write an array
at least as large as a given size (one K/V cache leaf, say) and adds up their
bytes by what they compute. The decode benchmark uses it to show whether a
cache is updated in place and read as stored (only `dynamic-update-slice`
bytes) or copied every step (copy, transpose, gather, ... bytes).
"""

import collections
import math
import re

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
  reused, only the update is written); COPY_KINDS are real copies.
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
      for (dtype, dims), k in zip(arrays, kinds):
        nbytes = _HLO_BYTES.get(dtype, 4) * math.prod(
            int(d) for d in dims.split(',') if d)
        if nbytes >= min_bytes and k not in _NO_WRITE:
          per_kind[k] += nbytes
    every.append(dict(per_kind))
    if sum(per_kind.values()) > sum(best.values()):
      best = dict(per_kind)
  return every if every_body else best


def cache_copy_bytes(by_kind: dict[str, int]) -> int:
  """The COPY_KINDS part of `loop_traffic`'s result."""
  return sum(v for k, v in by_kind.items() if k in COPY_KINDS)
