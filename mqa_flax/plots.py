"""The report's figures: speed against floors, speed against batch, quality, curves.

Each function returns a matplotlib `Figure`, or None when the data holds
nothing to draw; it draws only what the rows it is given hold. Floors are
computed (`mqa_flax.costs` over the bandwidth and throughput the benchmark
measured), never measured, and are labelled so. The artists carry `gid`s
("measured: mha", "memory floor: mha", ...) so that tests can read back what
was drawn.
"""

import collections
from collections.abc import Sequence
from typing import Any

from matplotlib import ticker
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
import numpy as np

from mqa_flax.results import PEER_VARIANT, RunFiles, dev_ln_ppl, series
from mqa_flax.tables import DASH, impl_label, num

DECODER_KINDS = {'greedy': 'greedy', 'beam4': 'beam 4'}
MEMORY_FLOOR = 'memory floor (computed)'
COMPUTE_FLOOR = 'compute floor (computed)'
# Shazeer (2019), Table 1, WMT14 EN-DE: dev ln(PPL) and newstest2014 BLEU
# with beam 4 (None: not reported), by our variant names. Reference marks
# only: another task, data and model size than any run here.
PAPER_TABLE1 = {
    'mha': (1.424, 28.4), 'mqa': (1.439, 28.5),
    'mha_local': (1.427, 28.3), 'mqa_local': (1.437, 28.2),
    'mha_h1': (1.518, None), 'mha_h2': (1.480, None),
    'mha_h4': (1.488, None), 'mha_h8_dk16': (1.513, None),
}
PAPER_LABEL = "paper's WMT14 EN-DE number (not comparable)"
# Data sources whose runs get no paper marks: nothing like WMT14.
NO_PAPER_MARKS = ('numbers',)


def _drawn_gids(ax, prefix: str) -> list[str]:
  """The gids of the artists of `ax` that start with `prefix`."""
  return [a.get_gid() for a in ax.get_children() if (a.get_gid() or '').startswith(prefix)]


def _caption(fig: Figure, records: Sequence[dict[str, Any]], note: str = '') -> None:
  """Writes the devices and code commits of `records` (and `note`) under the axes."""
  values = lambda key: sorted({str(r[key]) for r in records if r.get(key)})
  text = (f"Device: {', '.join(values('device')) or DASH}. "
          f"Code: {', '.join(c[:7] for c in values('git_commit')) or DASH}.")
  fig.text(0.01, 0.01, (note + ' ' if note else '') + text, fontsize=7,
           va='bottom', wrap=True)


def _log_y(ax, low: float, high: float) -> None:
  """A log y axis from `low` to `high` with plain tick labels (1, 2, 5, 10, ...)."""
  ax.set_yscale('log')
  ax.set_ylim(low, high)
  ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
  ax.yaxis.set_major_formatter(ticker.FormatStrFormatter('%g'))
  ax.yaxis.set_minor_formatter(ticker.NullFormatter())


def _family(variant: str) -> str:
  """Colour of a variant's bars: by its attention kind."""
  if variant == PEER_VARIANT:
    return 'C7'
  return {'mha': 'C0', 'mqa': 'C1', 'gqa': 'C2'}.get(variant[:3], 'C4')


def speed_rows(bench: Sequence[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
  """The rows the speed figure draws for one decoder kind: at the largest
  batch our rows of that kind have (with their lengths and device), the
  fastest cache mode of each variant and implementation, and the Flax WMT
  example's row if it was timed at that shape on that device."""
  timed = [r for r in bench if r.get('kind') == kind and r.get('us_per_token')]
  ours = [r for r in timed if r.get('variant') != PEER_VARIANT]
  if not ours:
    return []
  shape = lambda r: tuple(r.get(k) for k in ('batch', 'src_len', 'tgt_len', 'device'))
  top = shape(max(ours, key=lambda r: r.get('batch') or 0))
  best = {}
  for r in timed:
    if shape(r) == top:
      key = (r.get('variant'), impl_label(r) if r.get('variant') != PEER_VARIANT else '')
      if key not in best or r['us_per_token'] < best[key]['us_per_token']:
        best[key] = r
  return list(best.values())


def _speed_label(r: dict[str, Any], many_impls: bool) -> str:
  """A bar's name: variant, cache mode and (with several) implementation."""
  if r.get('variant') == PEER_VARIANT:
    return 'Flax WMT\nexample (mha)'
  parts = [r.get('cache') or '', impl_label(r) if many_impls else '']
  return '\n'.join([r['variant']] + [p for p in parts if p])


def _ratio(rows: Sequence[dict[str, Any]]) -> str:
  """'MHA / MQA = 2.2x' of the fastest mha and mqa rows, '' without both."""
  best = lambda v: min((r['us_per_token'] for r in rows if r.get('variant') == v),
                       default=None)
  mha, mqa = best('mha'), best('mqa')
  return f'MHA / MQA = {num(mha / mqa)}x' if mha and mqa else ''


def plot_speed(bench: Sequence[dict[str, Any]]) -> Figure | None:
  """Plots each decoder kind's µs per output token per variant and
  implementation (bars, measured) beside its memory and compute floors
  (computed), with the Flax WMT example where timed; None without decoder rows."""
  panels = {k: speed_rows(bench, k) for k in DECODER_KINDS}
  panels = {k: rows for k, rows in panels.items() if rows}
  if not panels:
    return None
  width = max(len(rows) for rows in panels.values())
  fig = Figure(figsize=(max(7.0, 1.1 * width * len(panels) + 1.5), 5.2))
  axes = np.atleast_1d(fig.subplots(1, len(panels)))
  drawn = []
  for ax, (kind, rows) in zip(axes, panels.items()):
    drawn += rows
    many = len({impl_label(r) for r in rows if r.get('variant') != PEER_VARIANT}) > 1
    x = np.arange(len(rows))
    us = [r['us_per_token'] for r in rows]
    bars = ax.bar(x, us, 0.7, color=[_family(r['variant']) for r in rows], alpha=0.8)
    for bar, r, u in zip(bars, rows, us):
      bar.set_gid(f"measured: {_speed_label(r, many)}")
      ax.annotate(num(u), (bar.get_x() + bar.get_width() / 2, u), ha='center',
                  va='bottom', fontsize=7, xytext=(0, 2), textcoords='offset points')
    for field, style, color, label in (
        ('floor_us_per_token', '--', 'black', MEMORY_FLOOR),
        ('compute_floor_us_per_token', ':', 'red', COMPUTE_FLOOR)):
      at = [(i, r[field]) for i, r in enumerate(rows) if r.get(field)]
      if at:
        i, y = zip(*at)
        lines = ax.hlines(y, np.array(i) - 0.42, np.array(i) + 0.42, colors=color,
                          linestyles=style, linewidth=2, label=label)
        lines.set_gid(label)
    ax.set_xticks(x, [_speed_label(r, many) for r in rows], fontsize=7)
    shown = us + [r[f] for r in rows for f in ('floor_us_per_token',
                                                'compute_floor_us_per_token') if r.get(f)]
    _log_y(ax, min(shown) / 2, max(shown) * 8)  # Room above for the legend.
    ax.set_ylabel('decoder µs per output token (log)')
    r0 = rows[0]
    ratio = _ratio(rows)
    ax.set_title(f"{DECODER_KINDS[kind]}: batch {r0.get('batch')}, "
                 f"S = {r0.get('src_len')}, T = {r0.get('tgt_len')}, {r0.get('dtype')}"
                 + (f'\n{ratio}' if ratio else ''), fontsize=10)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7, loc='upper left')
  devices = ', '.join(sorted({str(r.get('device')) for r in drawn}))
  fig.suptitle(f'Decoder µs per output token, measured (bars) against computed '
               f'floors, on {devices}')
  peer = any(r.get('variant') == PEER_VARIANT for r in drawn)
  _caption(fig, drawn, 'Memory floor: bytes per step / measured copy bandwidth; '
           'compute floor: FLOPs / measured matmul throughput'
           + ('; none for the Flax example' if peer else '')
           + '. Each bar: its fastest cache mode.')
  fig.tight_layout(rect=(0, 0.05, 1, 1))
  return fig


def batch_curves(bench: Sequence[dict[str, Any]], kind: str) -> dict[str, dict[int, dict]]:
  """{name: {batch: row}} of one decoder kind, per variant, cache mode and
  (with several) implementation, keeping only curves measured at two or more
  batches at one set of lengths and device."""
  rows = [r for r in bench if r.get('kind') == kind and r.get('us_per_token')
          and r.get('batch') and r.get('variant') != PEER_VARIANT]
  many = len({impl_label(r) for r in rows}) > 1
  curves = collections.defaultdict(dict)
  for r in rows:
    name = ' '.join(x for x in (r['variant'], r.get('cache') or '',
                                impl_label(r) if many else '') if x)
    name += f" (S={r.get('src_len')}, T={r.get('tgt_len')}, {r.get('device')})"
    old = curves[name].get(r['batch'])
    if old is None or r['us_per_token'] < old['us_per_token']:
      curves[name][r['batch']] = r
  return {n: c for n, c in curves.items() if len(c) >= 2}


def plot_decode(bench: Sequence[dict[str, Any]]) -> Figure | None:
  """Plots decoder µs per output token against batch (solid, measured) with
  each curve's memory floor (dashed) and compute floor (dotted), both
  computed; only curves measured at two or more batches; None if none is."""
  panels = {k: batch_curves(bench, k) for k in DECODER_KINDS}
  panels = {k: c for k, c in panels.items() if c}
  if not panels:
    return None
  fig = Figure(figsize=(6.5 * len(panels), 5))
  axes = np.atleast_1d(fig.subplots(1, len(panels)))
  drawn = []
  for ax, (kind, curves) in zip(axes, panels.items()):
    # A colour per variant, a marker per cache mode.
    rows = [next(iter(pts.values())) for pts in curves.values()]
    variants = dict.fromkeys(r['variant'] for r in rows)
    colors = {v: f'C{i % 10}' for i, v in enumerate(variants)}
    caches = dict.fromkeys(r.get('cache') for r in rows)
    markers = {c: 'osD^v'[i % 5] for i, c in enumerate(caches)}
    for (name, pts), r in zip(curves.items(), rows):
      b = sorted(pts)
      drawn += pts.values()
      color = colors[r['variant']]
      line, = ax.plot(b, [pts[x]['us_per_token'] for x in b], '-',
                      marker=markers[r.get('cache')], color=color, label=name.split(' (')[0])
      line.set_gid(f'measured: {name}')
      for field, style, what in (('floor_us_per_token', '--', MEMORY_FLOOR),
                                 ('compute_floor_us_per_token', ':', COMPUTE_FLOOR)):
        at = [(x, pts[x][field]) for x in b if pts[x].get(field)]
        if at:
          floor, = ax.plot(*zip(*at), style, color=color, alpha=0.7)
          floor.set_gid(f'{what}: {name}')
    ax.set_xscale('log', base=2)
    ax.xaxis.set_major_formatter(ticker.FormatStrFormatter('%g'))
    ys = [l.get_ydata() for l in ax.lines]
    _log_y(ax, min(map(min, ys)) / 1.5, max(map(max, ys)) * 1.5)
    ax.set_xlabel('batch (sentences)')
    ax.set_ylabel('decoder µs per output token (log)')
    r0 = next(iter(next(iter(curves.values())).values()))
    ax.set_title(f"{DECODER_KINDS[kind]}, S = {r0.get('src_len')}, "
                 f"T = {r0.get('tgt_len')}", fontsize=10)
    handles = ax.get_legend_handles_labels()[0] + [
        Line2D([], [], color='gray', ls=ls, label=what)
        for ls, what in (('-', 'measured'), ('--', MEMORY_FLOOR), (':', COMPUTE_FLOOR))
        if what == 'measured' or _drawn_gids(ax, what)]
    ax.legend(handles=handles, fontsize=7)
  devices = ', '.join(sorted({str(r.get('device')) for r in drawn}))
  fig.suptitle(f'Decoder µs per output token against batch, on {devices}')
  _caption(fig, drawn, 'Floors: bytes or FLOPs per token over the copy bandwidth '
           'and matmul throughput measured with each row.')
  fig.tight_layout(rect=(0, 0.04, 1, 1))
  return fig


def _paper_marks(groups: dict[str, list[RunFiles]]) -> bool:
  """Whether the runs' data is translation that the paper's numbers can sit beside."""
  sources = {(r.config or {}).get('data', {}).get('source') for g in groups.values()
             for r in g}
  return not sources & set(NO_PAPER_MARKS)


def plot_quality(groups: dict[str, list[RunFiles]]) -> Figure | None:
  """Plots test BLEU (beam 4) and dev ln(PPL) per variant: a bar for the mean
  over seeds, a point per seed, the spread (sample std) as an error bar and
  n above; the paper's numbers as marks where it has them. None without data."""
  bleu = lambda r: r.bleu.get('test/beam4', {}).get('bleu_13a')
  metrics = (('test BLEU, beam 4 (13a, cased)', bleu, 1),
             ('dev ln(PPL)', lambda r: dev_ln_ppl(r)[0], 0))
  values = {title: {name: [v for v in map(get, g) if v is not None]
                    for name, g in groups.items()}
            for title, get, _ in metrics}
  panels = [(t, i) for t, _, i in metrics if any(values[t].values())]
  if not panels:
    return None
  marks = _paper_marks(groups)
  fig = Figure(figsize=(max(8.0, 1.3 * len(groups) * len(panels) + 2), 4.8))
  axes = np.atleast_1d(fig.subplots(1, len(panels)))
  for ax, (title, paper_index) in zip(axes, panels):
    names = [n for n, v in values[title].items() if v]
    for x, name in enumerate(names):
      v = values[title][name]
      color = _family(name)
      bar = ax.bar(x, np.mean(v), 0.6, color=color, alpha=0.4)[0]
      bar.set_gid(f'mean: {name}')
      if len(v) > 1:
        spread = ax.errorbar(x, np.mean(v), np.std(v, ddof=1), color='black', capsize=4)
        spread.lines[2][0].set_gid(f'std: {name}')
      seeds = ax.scatter([x] * len(v), v, color=color, s=18, zorder=3)
      seeds.set_gid(f'seeds: {name}')
      ax.annotate(f'{num(float(np.mean(v)))}\nn={len(v)}', (x, max(v)), ha='center',
                  va='bottom', fontsize=7, xytext=(0, 3), textcoords='offset points')
      paper = PAPER_TABLE1.get(name.split(' ')[0], (None, None))[paper_index]
      if marks and paper is not None:
        mark = ax.scatter([x + 0.38], [paper], marker='D', facecolors='none',
                          edgecolors='black', s=30, zorder=3, label=PAPER_LABEL)
        mark.set_gid(f'paper: {name}')
    ax.set_xticks(range(len(names)), names, rotation=30, ha='right', fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.set_ylim(0, 1.2 * max(y for a in ax.collections for _, y in a.get_offsets()))
    handles, labels = ax.get_legend_handles_labels()
    if handles:
      ax.legend(handles[:1], labels[:1], fontsize=7, loc='lower right', framealpha=0.95)
  spread = any(len(v) > 1 for per_name in values.values() for v in per_name.values())
  fig.suptitle('Quality per variant: bars the mean over seeds, points the seeds'
               + (', error bars their std' if spread else '; one seed each (n=1)'))
  note = '' if marks else 'No paper marks: a generated task, nothing like WMT14.'
  _caption(fig, [x for g in groups.values() for r in g
                 for x in r.launches + list(r.bleu.values())], note)
  fig.tight_layout(rect=(0, 0.05, 1, 1))
  return fig


def plot_curves(runs: Sequence[RunFiles]) -> Figure | None:
  """Plots train/loss and eval/ln_ppl against step for every run; None if no data."""
  names = ('train/loss', 'eval/ln_ppl')
  data = [(r.name, [series(r, n) for n in names]) for r in runs]
  data = [(name, s) for name, s in data if any(s)]
  if not data:
    return None
  fig = Figure(figsize=(11, 4.3))
  axes = fig.subplots(1, 2)
  for name, curves in data:
    for ax, curve in zip(axes, curves):
      if curve:
        steps = sorted(curve)
        line, = ax.plot(steps, [curve[s] for s in steps], label=name, lw=1)
        line.set_gid(name)
  for ax, title in zip(axes, ('training loss (train/loss)', 'dev ln(PPL) (eval/ln_ppl)')):
    ax.set_xlabel('step')
    ax.set_title(title, fontsize=10)
    if ax.lines:
      ax.legend(fontsize='small')
  fig.suptitle('Training curves: loss and dev ln(PPL) against step, per run')
  _caption(fig, [x for r in runs for x in r.launches])
  fig.tight_layout(rect=(0, 0.05, 1, 1))
  return fig
