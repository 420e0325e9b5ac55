"""Collects run directories into the paper's Table 1 (quality), Table 2 (speed), plots.

Usage: python -m mqa_flax.report runs/mha-0 runs/mqa-0 runs/bench [--out results/x]

A run directory holds `config.json` (needs top-level "variant" and "seed", and
"model" with num_heads, num_kv_heads, head_dim, d_ff, local_window) and
optionally `summary.json` ("params_total"), `metrics.jsonl` (see
`mqa_flax.metrics`), `bleu.json` ({"<split>/<search>": {"bleu_13a", "bleu_intl",
"signature_13a", "checkpoint_step", ...}}) and `benchmark.jsonl` (one timed row
per line, carrying its own "variant"). A directory with only benchmark.jsonl is
a benchmark run. The output folder gets table1.md, table2.md, report.md and PNGs.

Runs are grouped by variant and architecture (h, K, d_k, d_ff, window), so a
`gqa` run with K=2 and one with K=4 stay apart; seeds within a group give
"mean ± std" (sample std), "(n=k)" marking cells that fewer runs reported.
"""

import argparse
import collections
import dataclasses
import json
import math
import os
from collections.abc import Sequence
from typing import Any

from matplotlib.figure import Figure
import numpy as np

from mqa_flax import metrics

DASH = '–'
# Known bleu.json keys first (the paper's columns); any other key follows.
BLEU_KEYS = ('dev/greedy', 'test/greedy', 'test/beam4')
KIND_ORDER = ('train', 'encoder', 'greedy', 'beam4')


class ReportError(ValueError):
  """A run directory that cannot be read."""


@dataclasses.dataclass
class Run:
  """The files of one run directory (missing ones are empty)."""
  path: str
  config: dict[str, Any] | None
  summary: dict[str, Any]
  metrics: list[dict[str, Any]]
  bleu: dict[str, dict[str, Any]]
  benchmark: list[dict[str, Any]]

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
    v = 'mha' if k == n else 'mqa' if k == 1 else f'gqa{k}'
    return v + ('_local' if self.model.get('local_window') else '')


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


def load_run(path: str) -> Run:
  """Reads a run directory, raising ReportError if it is not one."""
  if not os.path.isdir(path):
    raise ReportError(f'{path}: not a directory')
  file = lambda name: os.path.join(path, name)
  config = _load(file('config.json'))
  benchmark = _load(file('benchmark.jsonl'), jsonl=True)
  if config is None and benchmark is None:
    raise ReportError(f'{path}: has neither config.json nor benchmark.jsonl')
  return Run(path, config, _load(file('summary.json')) or {},
             _load(file('metrics.jsonl'), jsonl=True) or [],
             _load(file('bleu.json')) or {}, benchmark or [])


def series(run: Run, name: str) -> dict[int, float]:
  """Returns {step: value} of one metric; a later line wins (resumed runs)."""
  return {int(r['step']): float(r[name]) for r in run.metrics
          if r.get(name) is not None and math.isfinite(float(r[name]))}


def dev_ln_ppl(run: Run) -> tuple[float | None, bool]:
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


def mean_std(values: Sequence[float | None], digits: int, total: int) -> str:
  """Formats 'mean ± std' (sample std) of the present values, '(n=k)' if k < total."""
  v = [x for x in values if x is not None and math.isfinite(x)]
  if not v:
    return DASH
  text = f'{np.mean(v):.{digits}f}'
  if len(v) > 1:
    text += f' ± {np.std(v, ddof=1):.{digits}f}'
  if len(v) < total:
    text += f' (n={len(v)})'
  return text


def num(x: float | None) -> str:
  """Formats a measurement with three significant digits ('1.70', '46.0', '203')."""
  if x is None or not math.isfinite(x):
    return DASH
  return f'{x:.0f}' if abs(x) >= 99.95 else f'{x:#.3g}'


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  """Returns a GitHub markdown table."""
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  lines += ['| ' + ' | '.join(str(c) for c in r) + ' |' for r in rows]
  return '\n'.join(lines) + '\n'


def attention_type(model: dict[str, Any]) -> str:
  """Describes the attention, e.g. 'multi-query h=8 K=1, local window 32'."""
  n, k = model.get('num_heads'), model.get('num_kv_heads')
  kind = 'multi-head' if k == n else 'multi-query' if k == 1 else 'grouped-query'
  text = f'{kind} h={n} K={k}'
  if model.get('local_window'):
    text += f', local window {model["local_window"]}'
  if model.get('kv_heads_scope', 'all') != 'all':
    text += f' (K in {model["kv_heads_scope"]} only)'
  return text


def group_runs(runs: Sequence[Run]) -> dict[str, list[Run]]:
  """Groups quality runs by variant and architecture, in order of first appearance."""
  arch = ('num_heads', 'num_kv_heads', 'head_dim', 'd_ff', 'local_window')
  groups = collections.defaultdict(list)
  for r in runs:
    groups[(r.variant, tuple(r.model.get(a) for a in arch))].append(r)
  names = collections.Counter(v for v, _ in groups)
  label = lambda v, a: v if names[v] == 1 else (
      f'{v} (h={a[0]} K={a[1]} d_k={a[2]} d_ff={a[3]} window={a[4]})')
  return {label(v, a): g for (v, a), g in groups.items()}


def bleu_keys(runs: Sequence[Run]) -> list[str]:
  """Returns the bleu.json keys found, the paper's columns first."""
  found = {k for r in runs for k in r.bleu}
  return [k for k in BLEU_KEYS if k in found] + sorted(found - set(BLEU_KEYS))


def bleu_label(key: str) -> str:
  """Turns a bleu.json key into a column name: 'test/beam4' -> 'test BLEU beam-4'."""
  split, _, search = key.partition('/')
  return f'{split} BLEU {search.replace("beam", "beam-")}'


def bleu_cells(runs: Sequence[Run], keys: Sequence[str], field: str) -> list[str]:
  """Returns 'mean ± std' of one bleu.json field over runs, per key."""
  return [mean_std([r.bleu.get(k, {}).get(field) for r in runs], 2, len(runs))
          for k in keys]


def table1(groups: dict[str, list[Run]]) -> str:
  """Returns Table 1 (quality) as markdown: 13a BLEU, then intl BLEU."""
  runs = [r for g in groups.values() for r in g]
  keys = bleu_keys(runs)
  rows, rows_intl, fallback = [], [], False
  for label, g in groups.items():
    m, n = g[0].model, len(g)
    params = [r.summary.get('params_total') for r in g]
    params = [p / 1e6 for p in params if p is not None]
    ppl = [dev_ln_ppl(r) for r in g]
    ppl_cell = mean_std([v for v, _ in ppl], 3, n)
    if any(v is not None and not exact for v, exact in ppl):
      ppl_cell, fallback = ppl_cell + '*', True
    head = [label, attention_type(m), m.get('num_heads', DASH),
            m.get('num_kv_heads', DASH), m.get('head_dim', DASH),
            m.get('d_ff', DASH), f'{params[0]:.1f}' if params else DASH, n]
    rows.append(head + [ppl_cell] + bleu_cells(g, keys, 'bleu_13a'))
    rows_intl.append([label, n] + bleu_cells(g, keys, 'bleu_intl'))
  header = ['variant', 'attention', 'h', 'K', 'd_k', 'd_ff', 'params (M)', 'n',
            'dev ln(PPL)'] + [bleu_label(k) for k in keys]
  sigs = sorted({e['signature_13a'] for r in runs for e in r.bleu.values()
                 if e.get('signature_13a')})
  text = ('## Table 1: quality\n\n' + md_table(header, rows) +
          '\nBLEU: sacrebleu corpus BLEU, 13a tokenization, cased. dev ln(PPL): '
          'eval/ln_ppl per target token at the step of the checkpoint that '
          'bleu.json was decoded from.\n')
  if fallback:
    text += ('\n\\* No eval at that step (or no bleu.json) in at least one run: '
             'the minimum dev ln(PPL) over that run is used.\n')
  if sigs:
    text += '\nSignature: ' + '; '.join(f'`{s}`' for s in sigs) + '\n'
  if keys:
    text += ('\n### BLEU, intl tokenization\n\n' +
             md_table(['variant', 'n'] + [bleu_label(k) for k in keys], rows_intl))
  return text


def pick(rows: Sequence[dict[str, Any]], kind: str,
         like: dict[str, Any] | None = None) -> dict[str, Any] | None:
  """Returns the headline row of one kind: largest batch, then its fastest cache mode.

  With `like`, rows at that row's batch and source length are preferred.
  """
  rows = [r for r in rows if r.get('kind') == kind
          and r.get('us_per_token') is not None]
  if like is not None:
    same = [r for r in rows if (r.get('batch'), r.get('src_len'))
            == (like.get('batch'), like.get('src_len'))]
    rows = same or rows
  if not rows:
    return None
  batch = max(r.get('batch') or 0 for r in rows)
  return min((r for r in rows if (r.get('batch') or 0) == batch),
             key=lambda r: r['us_per_token'])


def detail_row(r: dict[str, Any], with_impl: bool = False) -> list[str]:
  """Formats one benchmark row for the table of every row."""
  ids = ('variant', 'kind', 'cache', 'batch', 'src_len', 'tgt_len', 'dtype')
  b, f = r.get('bytes_per_step'), r.get('fraction_of_floor')
  cells = [DASH if r.get(k) is None else str(r[k]) for k in ids]
  if with_impl and r.get('kind') not in ('train', 'encoder'):
    cells[2] += f' {impl_label(r)}'
  return (cells +
          [num(r.get('us_per_token')), num(r.get('compile_s')),
           DASH if b is None else f'{b / 1e6:.1f}', num(r.get('achieved_gbps')),
           num(r.get('floor_us_per_token')), DASH if f is None else f'{f:.2f}'])


def impl_label(r: dict[str, Any]) -> str:
  """'attention_impl/cache_layout' of a benchmark row (old rows: xla/BLKH)."""
  return f"{r.get('attention_impl') or 'xla'}/{r.get('cache_layout') or 'BLKH'}"


def table2(bench: Sequence[dict[str, Any]]) -> str:
  """Returns Table 2 (speed) and the table of every benchmark row as markdown.

  With decoder rows of several implementations (attention_impl/cache_layout),
  each variant gets one line per implementation, labelled with it.
  """
  by_variant = collections.defaultdict(list)
  for r in bench:
    by_variant[r.get('variant', DASH)].append(r)
  decoders = [r for r in bench if r.get('kind') not in ('train', 'encoder')
              and r.get('us_per_token') is not None]
  labels = list(dict.fromkeys(impl_label(r) for r in decoders))
  many = len(labels) > 1
  us = lambda r: num(r['us_per_token']) if r else DASH
  rows = []
  for variant, rs in by_variant.items():
    train = pick(rs, 'train')
    for label in labels if many else [None]:
      mine = [r for r in rs if label is None or impl_label(r) == label
              or r.get('kind') in ('train', 'encoder')]
      cells, batches = [], [train['batch'] if train else DASH]
      for kind in ('greedy', 'beam4'):
        dec = pick(mine, kind)
        enc = pick(mine, 'encoder', like=dec)
        cells.append(f'{us(enc)} + {us(dec)}' if dec or enc else DASH)
        batches.append(dec['batch'] if dec else DASH)
      rows.append([f'{variant} ({label})' if many else variant, us(train)]
                  + cells + [' / '.join(str(b) for b in batches)])
  header = ['variant', 'training step (µs/token)', 'greedy enc + dec (µs/token)',
            'beam-4 enc + dec (µs/token)', 'batch (train / greedy / beam-4)']
  order = {v: i for i, v in enumerate(by_variant)}
  detail = sorted(bench, key=lambda r: (
      order[r.get('variant', DASH)],
      KIND_ORDER.index(r['kind']) if r.get('kind') in KIND_ORDER else 9,
      str(r.get('cache')), r.get('batch') or 0, r.get('src_len') or 0,
      r.get('tgt_len') or 0))
  detail_rows = [detail_row(r, many) for r in detail
                 if r.get('us_per_token') is not None]
  devices = sorted({str(r['device']) for r in bench if r.get('device')})
  dates = sorted({str(r['date']) for r in bench if r.get('date')})
  return (
      '## Table 2: speed\n\n' + md_table(header, rows) +
      '\nPer variant and kind, the row with the largest batch and, of its '
      'cache modes, the fastest; the encoder is timed at the same batch and '
      'source length where measured. Decoding is µs per output token.\n\n'
      f'Device: {", ".join(devices) or DASH}. Date: {", ".join(dates) or DASH}.\n'
      '\n### Every benchmark row\n\n' +
      md_table(['variant', 'kind', 'cache', 'batch', 'S', 'T', 'dtype',
                'µs/token', 'compile (s)', 'MB/step', 'GB/s',
                'floor (µs/token)', 'fraction of floor'], detail_rows))


def plot_bleu(groups: dict[str, list[Run]], path: str) -> bool:
  """Plots test BLEU per variant (seeds as points, mean as a bar); False if no data."""
  keys = [k for k in bleu_keys([r for g in groups.values() for r in g])
          if k.startswith('test/')]
  if not keys:
    return False
  fig = Figure(figsize=(max(5, 1.2 * len(groups) + 2), 4))
  ax = fig.subplots()
  width, all_values = 0.8 / len(keys), []
  for j, key in enumerate(keys):
    color = f'C{j}'
    for i, g in enumerate(groups.values()):
      v = [r.bleu[key]['bleu_13a'] for r in g
           if r.bleu.get(key, {}).get('bleu_13a') is not None]
      all_values += v
      if not v:
        continue
      x = i - 0.4 + width * (j + 0.5)
      ax.bar(x, np.mean(v), width * 0.9, color=color, alpha=0.35,
             label=bleu_label(key))
      ax.scatter([x] * len(v), v, color=color, s=16, zorder=3)
  ax.set_xticks(range(len(groups)), list(groups), rotation=30, ha='right')
  ax.set_ylabel('BLEU (13a, cased)')
  ax.set_title('Test BLEU per variant (bars: mean, points: seeds)')
  ax.set_ylim(min(all_values) - 2, max(all_values) + 1)
  handles, labels = ax.get_legend_handles_labels()
  unique = dict(zip(labels, handles))  # One entry per key, not per bar.
  ax.legend(unique.values(), unique.keys())
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  return True


def plot_decode(bench: Sequence[dict[str, Any]], path: str) -> bool:
  """Plots greedy decoder µs/token against batch with its memory floor (dashed)
  and compute floor (dotted); False if no data."""
  curves = collections.defaultdict(dict)
  greedy = [r for r in bench if r.get('kind') == 'greedy'
            and r.get('us_per_token') and r.get('batch')]
  many = len({impl_label(r) for r in greedy}) > 1
  for r in greedy:  # One curve per variant and cache mode (and implementation).
    cache = f"{r.get('cache') or DASH} {impl_label(r)}" if many else r.get('cache')
    key = (r.get('variant'), cache)
    old = curves[key].get(r['batch'])
    if old is None or r['us_per_token'] < old['us_per_token']:
      curves[key][r['batch']] = r
  if not curves:
    return False
  fig = Figure(figsize=(6.5, 4.5))
  ax = fig.subplots()
  # Color per variant, marker per cache mode.
  colors = {v: f'C{i}' for i, v in enumerate(dict.fromkeys(v for v, _ in curves))}
  caches = dict.fromkeys(c for _, c in curves)
  markers = {c: 'os^Dv'[i % 5] for i, c in enumerate(caches)}
  for (variant, cache), pts in curves.items():
    b = sorted(pts)
    label = variant + (f' ({cache})' if cache else '')
    ax.plot(b, [pts[x]['us_per_token'] for x in b], '-', marker=markers[cache],
            color=colors[variant], label=label)
    floor = [(x, pts[x]['floor_us_per_token']) for x in b
             if pts[x].get('floor_us_per_token')]
    if floor:
      ax.plot(*zip(*floor), '--', color=colors[variant], alpha=0.6)
    compute = [(x, pts[x]['compute_floor_us_per_token']) for x in b
               if pts[x].get('compute_floor_us_per_token')]
    if compute:
      ax.plot(*zip(*compute), ':', color=colors[variant], alpha=0.6)
  ax.set_xscale('log')
  ax.set_yscale('log')
  ax.set_xlabel('batch (sequences)')
  ax.set_ylabel('decoder µs per output token')
  ax.set_title('Greedy decoding (dashed: memory floor, dotted: compute floor)')
  ax.legend(fontsize='small')
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  return True


def plot_curves(runs: Sequence[Run], path: str) -> bool:
  """Plots train/loss and eval/ln_ppl against step for every run; False if no data."""
  names = ('train/loss', 'eval/ln_ppl')
  data = [(r.name, [series(r, n) for n in names]) for r in runs]
  data = [(name, s) for name, s in data if any(s)]
  if not data:
    return False
  fig = Figure(figsize=(11, 4))
  axes = fig.subplots(1, 2)
  for name, curves in data:
    for ax, curve in zip(axes, curves):
      if curve:
        steps = sorted(curve)
        ax.plot(steps, [curve[s] for s in steps], label=name, lw=1)
  for ax, n in zip(axes, names):
    ax.set_xlabel('step')
    ax.set_title(n)
    if ax.lines:
      ax.legend(fontsize='small')
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  return True


def main(argv: Sequence[str] | None = None) -> str:
  """Writes the report for the given run directories and returns the output folder."""
  parser = argparse.ArgumentParser(
      prog='python -m mqa_flax.report', description=__doc__.splitlines()[0])
  parser.add_argument('runs', nargs='+', help='run directories (workdirs)')
  parser.add_argument('--out', default='results/report', help='output folder')
  args = parser.parse_args(argv)
  runs = [load_run(p) for p in args.runs]
  quality = [r for r in runs if r.config is not None]
  groups = group_runs(quality)
  bench = [row for r in runs for row in r.benchmark]
  os.makedirs(args.out, exist_ok=True)

  t1 = table1(groups) if groups else '## Table 1: quality\n\nNo run with config.json.\n'
  t2 = table2(bench) if bench else '## Table 2: speed\n\nNo benchmark.jsonl rows.\n'
  plots = {
      'bleu_by_variant.png':
          (lambda p: plot_bleu(groups, p), 'no test BLEU in bleu.json'),
      'decode_vs_batch.png':
          (lambda p: plot_decode(bench, p), 'no greedy benchmark rows'),
      'training_curves.png':
          (lambda p: plot_curves(quality, p), 'no train/loss or eval/ln_ppl'),
  }
  figures = []
  for fname, (plot, why) in plots.items():
    path = os.path.join(args.out, fname)
    if plot(path):
      figures.append(f'![{fname}]({fname})\n')
    else:
      if os.path.exists(path):  # Stale plot from an earlier report.
        os.remove(path)
      figures.append(f'{fname}: skipped ({why}).\n')
  run_rows = [[f'`{r.path}`', r.variant if r.config else 'benchmark only',
               (r.config or {}).get('seed', DASH), len(r.metrics),
               ', '.join(r.bleu) or DASH, len(r.benchmark)] for r in runs]
  report = ('# MQA / GQA report\n\n' + t1 + '\n' + t2 + '\n## Plots\n\n' +
            '\n'.join(figures) + '\n## Runs\n\n' +
            md_table(['path', 'variant', 'seed', 'metric lines', 'bleu.json keys',
                      'benchmark rows'], run_rows))
  for fname, text in (('table1.md', t1), ('table2.md', t2), ('report.md', report)):
    with open(os.path.join(args.out, fname), 'w') as f:
      f.write(text)
  print(args.out)
  return args.out


if __name__ == '__main__':
  try:
    main()
  except ReportError as e:
    raise SystemExit(f'error: {e}') from None
