"""Measured time of each kernel of a compiled decode loop, from a profiler trace.

`profile` runs a compiled function once under `jax.profiler.trace` and reads
the trace's XPlane with `jax.profiler.ProfileData` (no TensorFlow): every
device event (a GPU kernel; on a CPU, each executed thunk) with the HLO
instruction it ran. `per_step` puts those times beside the kernels that
`hlo.step_counts` reads from the same compiled program, so that each kernel's
bytes (predicted on any machine by `mqa_flax.gpu_program`) meet its measured
time: the bandwidth each kernel reaches, the time by kind of kernel, and how
much of a step's wall time no kernel runs (launch gaps).

An event names its instruction by an `hlo_op` stat, or by `hlo_op=NAME` in
a string stat (XLA's kernel annotations), or else by its own name (a GPU
kernel's name is its instruction's, '.' written '_'). Events of another
module (`hlo_module`) are left out; events that match no instruction of
the loop are reported by name, so that a trace laid out otherwise still
says what it holds.
"""

import collections
import glob
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import jax

_HLO_OP = re.compile(r'hlo_op=([\w.\-]+)')
_HLO_MODULE = re.compile(r'hlo_module=([\w.\-]+)')
TOP = 12  # Kernels listed per row, the longest first.


def _stat(stats: dict, key: str, pattern: re.Pattern) -> str | None:
  if isinstance(stats.get(key), str):
    return stats[key]
  for value in stats.values():
    if isinstance(value, str) and (m := pattern.search(value)):
      return m.group(1)
  return None


def device_events(trace_dir: str, module: str | None = None
                  ) -> list[tuple[str | None, str, float]]:
  """(HLO op or None, event name, duration µs) of every device event in the
  trace written under `trace_dir`: events of device planes ('/device:...'),
  or where there are none (a CPU backend) of the host's with an HLO op;
  with `module`, those of other HLO modules are left out."""
  paths = glob.glob(os.path.join(trace_dir, '**', '*.xplane.pb'), recursive=True)
  if not paths:
    raise ValueError(f'no *.xplane.pb under {trace_dir}')
  planes = [p for path in paths
            for p in jax.profiler.ProfileData.from_file(path).planes]
  device = [p for p in planes if p.name.startswith('/device:')]
  out = []
  for plane in device or planes:
    for line in plane.lines:
      for event in line.events:
        stats = dict(event.stats)
        op = _stat(stats, 'hlo_op', _HLO_OP)
        if not device and op is None:
          continue  # Host-side events of a CPU trace: Python, dispatch.
        event_module = _stat(stats, 'hlo_module', _HLO_MODULE)
        if module and event_module and event_module != module:
          continue
        out.append((op, event.name, event.duration_ns / 1e3))
  return out


def module_name(hlo_text: str) -> str:
  """The HLO module's name, from the first line of its text."""
  return hlo_text.split(',', 1)[0].removeprefix('HloModule ').strip()


def profile(compiled: Callable, args: Sequence[Any], module: str | None = None
            ) -> list[tuple[str | None, str, float]]:
  """`device_events` of one call of `compiled(*args)`, of its own module
  (`module`, or read from the compiled text)."""
  module = module or module_name(compiled.as_text())
  jax.block_until_ready(args)  # Nothing else runs in the trace.
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      jax.block_until_ready(compiled(*args))
    return device_events(trace_dir, module)


def per_step(events: Sequence[tuple[str | None, str, float]],
             kernels: Sequence[dict], steps: int, steps_per_loop: int,
             wall_s: float) -> dict:
  """Per decode step: each loop kernel's measured µs beside its bytes.

  Args:
    events: `profile`'s events of one call that ran `steps` decode steps.
    kernels: the loop body's kernels as `hlo.step_counts` lists them (name,
      kind, read, written), whose loop ran the steps.
    steps: decode steps of the call.
    steps_per_loop: decode steps per run of the loop body (beam search's
      loop runs two: `decoding.steps_per_loop`).
    wall_s: the call's measured wall time (the row's median).

  Returns:
    A dict: `kernel_us_per_step` (the loop's kernels, summed),
    `wall_us_per_step`, `busy_fraction` (the first over the second: below 1,
    steps where no loop kernel runs, such as launch gaps), `us_by_kind`,
    `kernels` (the TOP longest: name, kind, µs per step, MB moved per run,
    GB/s while it runs),
    `other_us_per_call` (events of instructions outside the loop), and
    `unmatched` (the events that match no instruction, by name, the longest
    first: µs and runs per call).
  """
  by_name = {k['name']: k for k in kernels}
  by_kernel_name = {k['name'].replace('.', '_'): k for k in kernels}
  spent: dict[str, float] = collections.Counter()
  other, unmatched, runs = 0.0, collections.Counter(), collections.Counter()
  for op, name, us in events:
    kernel = by_name.get(op) if op else by_kernel_name.get(name)
    if kernel:
      spent[kernel['name']] += us
    elif op:
      other += us
    else:
      unmatched[name] += us
      runs[name] += 1
  kernel_us = sum(spent.values()) / steps
  wall_us = wall_s / steps * 1e6
  by_kind = collections.Counter()
  for name, us in spent.items():
    by_kind[by_name[name]['kind']] += us / steps
  top = []
  for name, us in sorted(spent.items(), key=lambda kv: -kv[1])[:TOP]:
    moved = by_name[name]['read'] + by_name[name]['written']
    per_run = us / (steps / steps_per_loop)
    top.append(dict(name=name, kind=by_name[name]['kind'], us=round(us / steps, 2),
                    mb=round(moved / 1e6, 2),
                    gbps=round(moved / per_run / 1e3, 1) if per_run else None))
  return dict(
      kernel_us_per_step=round(kernel_us, 2), wall_us_per_step=round(wall_us, 2),
      busy_fraction=round(kernel_us / wall_us, 3) if wall_us else None,
      us_by_kind={k: round(v, 2) for k, v in by_kind.most_common()},
      kernels=top, other_us_per_call=round(other, 1),
      unmatched=[dict(name=n[:120], us=round(us, 1), runs=runs[n])
                 for n, us in unmatched.most_common(TOP)])
