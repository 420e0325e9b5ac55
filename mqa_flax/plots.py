"""The report's plots: test BLEU per variant, decoder time against batch, curves."""

import collections
from collections.abc import Sequence
from typing import Any

from matplotlib.figure import Figure
import numpy as np

from mqa_flax.results import RunFiles, series
from mqa_flax.tables import DASH, bleu_keys, bleu_label, impl_label


def plot_bleu(groups: dict[str, list[RunFiles]]) -> Figure | None:
  """Plots test BLEU per variant (seeds as points, mean as a bar); None if no data."""
  keys = [k for k in bleu_keys([r for g in groups.values() for r in g])
          if k.startswith('test/')]
  if not keys:
    return None
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
  return fig


def plot_decode(bench: Sequence[dict[str, Any]]) -> Figure | None:
  """Plots greedy decoder µs/token against batch with its memory floor (dashed)
  and compute floor (dotted); None if no data."""
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
    return None
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
  return fig


def plot_curves(runs: Sequence[RunFiles]) -> Figure | None:
  """Plots train/loss and eval/ln_ppl against step for every run; None if no data."""
  names = ('train/loss', 'eval/ln_ppl')
  data = [(r.name, [series(r, n) for n in names]) for r in runs]
  data = [(name, s) for name, s in data if any(s)]
  if not data:
    return None
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
  return fig
