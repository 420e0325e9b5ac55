"""Run directories as the report reads them: config, metrics, BLEU, benchmark rows.

A run directory holds `config.json` (needs top-level "variant" and "seed", and
"model" with num_heads, num_kv_heads, head_dim, d_ff, local_window) and
optionally `summary.json` ("params_total"), `metrics.jsonl` (see
`mqa_flax.metrics`), `bleu.json` ({"<split>/<search>": {"bleu_13a", "bleu_intl",
"signature_13a", "checkpoint_step", "command", "git_commit", "device", "date",
...}}), `launches.jsonl` (what trained it: "command", "git_commit", "device",
"date" per start or resume) and `benchmark.jsonl` (one timed row per line,
carrying its own "variant" and the same four fields). A directory with only
benchmark.jsonl is a benchmark run; `peer_flax_wmt.jsonl` beside it holds the
Flax WMT example timed on the same machine (`.peers/flax_wmt_bench.py`'s lines),
read as benchmark rows of the variant `PEER_VARIANT`.
"""

import collections
import dataclasses
import json
import math
import os
from collections.abc import Sequence
from typing import Any

from mqa_flax import metrics
from mqa_flax.errors import UserError

PEER_FILE = 'peer_flax_wmt.jsonl'
PEER_VARIANT = 'Flax WMT example (mha)'
ATTENTION_NAMES = {'mha': 'multi-head', 'mqa': 'multi-query', 'gqa': 'grouped-query'}


def attention_kind(num_heads: int | None, num_kv_heads: int | None) -> str:
  """'mha' (K == N), 'mqa' (K == 1) or 'gqa' (between)."""
  return ('mha' if num_kv_heads == num_heads else 'mqa' if num_kv_heads == 1
          else 'gqa')


class ReportError(UserError):
  """A run directory that cannot be read."""


@dataclasses.dataclass
class RunFiles:
  """The files of one run directory (missing ones are empty)."""
  path: str
  config: dict[str, Any] | None
  summary: dict[str, Any]
  metrics: list[dict[str, Any]]
  bleu: dict[str, dict[str, Any]]
  benchmark: list[dict[str, Any]]
  launches: list[dict[str, Any]]

  @property
  def name(self) -> str:
    """The directory's base name."""
    return os.path.basename(os.path.normpath(self.path))

  @property
  def model(self) -> dict[str, Any]:
    """The config's "model" section."""
    return (self.config or {}).get('model', {})

  @property
  def variant(self) -> str:
    """The config's "variant", or one derived from K and the window."""
    if 'variant' in (self.config or {}):
      return self.config['variant']
    n, k = self.model.get('num_heads'), self.model.get('num_kv_heads')
    kind = attention_kind(n, k)
    return (kind + (str(k) if kind == 'gqa' else '') +
            ('_local' if self.model.get('local_window') else ''))


def _load(path: str, jsonl: bool = False) -> Any:
  """Reads a JSON or JSON-lines file, None if it is absent."""
  if not os.path.isfile(path):
    return None
  try:
    if jsonl:
      return metrics.read_jsonl(path)
    with open(path) as f:
      return json.load(f)
  except ValueError as e:  # JSONDecodeError is a ValueError.
    raise ReportError(f'{path}: {e}') from None


def peer_rows(lines: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """The Flax WMT example's timing lines as benchmark rows (kinds train,
  encoder, greedy, beam4), keeping their device, date, command and commit."""
  rows = []
  for line in lines:
    made = {k: line.get(k) for k in ('device', 'date', 'command', 'git_commit')}
    row = lambda kind, batch, src, tgt, us: dict(
        made, variant=PEER_VARIANT, kind=kind, cache=None, batch=batch,
        src_len=src, tgt_len=tgt, us_per_token=us)
    if 'train_us_per_output_token' in line:
      rows.append(row('train', line['train_rows'], line['train_len'], line['train_len'],
                      line['train_us_per_output_token']))
    elif 'dec_us_per_token' in line:
      shape = (line['batch'], line['src_len'], line['tgt_len'])
      rows.append(row('encoder', *shape, line['enc_us_per_token']))
      rows.append(row('greedy' if line['beam'] == 1 else f"beam{line['beam']}", *shape,
                      line['dec_us_per_token']))
  return rows


def load_run(path: str) -> RunFiles:
  """Reads a run directory, raising ReportError if it is not one."""
  if not os.path.isdir(path):
    raise ReportError(f'{path}: not a directory')
  file = lambda name: os.path.join(path, name)
  config = _load(file('config.json'))
  benchmark = _load(file('benchmark.jsonl'), jsonl=True)
  if benchmark is not None:
    benchmark += peer_rows(_load(file(PEER_FILE), jsonl=True) or [])
  if config is None and benchmark is None:
    raise ReportError(f'{path}: has neither config.json nor benchmark.jsonl')
  return RunFiles(path, config, _load(file('summary.json')) or {},
             _load(file('metrics.jsonl'), jsonl=True) or [],
             _load(file('bleu.json')) or {}, benchmark or [],
             _load(file(metrics.LAUNCHES_FILE), jsonl=True) or [])


def series(run: RunFiles, name: str) -> dict[int, float]:
  """Returns {step: value} of one metric; a later line wins (resumed runs)."""
  return {int(r['step']): float(r[name]) for r in run.metrics
          if r.get(name) is not None and math.isfinite(float(r[name]))}


def dev_ln_ppl(run: RunFiles) -> tuple[float | None, bool]:
  """Returns dev ln(PPL) at the BLEU checkpoint's step, and whether that step was found.

  Falls back to the minimum over the run when bleu.json names no checkpoint or
  metrics.jsonl has no eval at that step.
  """
  values = series(run, 'eval/ln_ppl')
  if not values:
    return None, False
  keys = [k for k in ('test/beam4', 'test/greedy', 'dev/greedy') if k in run.bleu]
  for entry in [run.bleu[k] for k in keys] + list(run.bleu.values()):
    step = entry.get('checkpoint_step')
    if step is not None and int(step) in values:
      return values[int(step)], True
  return min(values.values()), False


def group_runs(runs: Sequence[RunFiles]) -> dict[str, list[RunFiles]]:
  """Groups quality runs by variant and architecture, in order of first appearance."""
  arch = ('num_heads', 'num_kv_heads', 'head_dim', 'd_ff', 'local_window')
  groups = collections.defaultdict(list)
  for r in runs:
    groups[(r.variant, tuple(r.model.get(a) for a in arch))].append(r)
  names = collections.Counter(v for v, _ in groups)
  label = lambda v, a: v if names[v] == 1 else (
      f'{v} (h={a[0]} K={a[1]} d_k={a[2]} d_ff={a[3]} window={a[4]})')
  return {label(v, a): g for (v, a), g in groups.items()}
