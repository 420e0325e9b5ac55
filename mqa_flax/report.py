"""The report of a set of runs: the paper's Table 1 and Table 2 as markdown, plots.

  python -m mqa_flax.report runs/mha-0 runs/mqa-0 runs/bench [--out=results/x]

Reads run directories (`mqa_flax.results`) and writes table1.md, table2.md,
report.md and PNGs. Runs are grouped by variant and architecture (h, K, d_k,
d_ff, window), so a `gqa` run with K=2 and one with K=4 stay apart; seeds
within a group give "mean ± std" (sample std), "(n=k)" marking cells that
fewer runs reported.
"""

import datetime
import os
import sys
from collections.abc import Sequence

from absl import app
from absl import flags

from mqa_flax import errors
from mqa_flax import files
from mqa_flax import metrics
from mqa_flax import plots
from mqa_flax import tables
from mqa_flax.results import RunFiles, group_runs, load_run


def write_report(paths: Sequence[str], out: str, command: str | None = None) -> str:
  """Writes table1.md, table2.md, report.md and the plots of the run
  directories `paths` into `out`; returns `out`. A table or plot without data
  is not written (an earlier report's is removed). The tables name the
  devices, dates, commits and commands of their numbers; report.md and each
  plot (PNG metadata) also name `command`, the code's commit and the date."""
  runs = [load_run(p) for p in paths]
  quality = [r for r in runs if r.config is not None]
  groups = group_runs(quality)
  bench = [row for r in runs for row in r.benchmark]
  os.makedirs(out, exist_ok=True)
  made = (f'Written {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC '
          f'by code at {metrics.git_commit() or tables.DASH}'
          + (f' with `{command}`' if command else '') + '.')
  sources = tables.provenance(
      bench + [x for r in quality for x in r.launches + list(r.bleu.values())])
  t1 = tables.table1(groups) if groups else None
  t2 = tables.table2(bench) if bench else None
  figures_to_draw = {
      'speed.png': (plots.plot_speed(bench), 'no greedy or beam-4 benchmark rows'),
      'decode_vs_batch.png': (plots.plot_decode(bench),
                              'no decoder row measured at two or more batches'),
      'quality.png': (plots.plot_quality(groups),
                      'no test/beam4 BLEU in bleu.json and no eval/ln_ppl'),
      'training_curves.png': (plots.plot_curves(quality), 'no train/loss or eval/ln_ppl'),
  }
  figures = []
  for fname, (fig, why) in figures_to_draw.items():
    path = os.path.join(out, fname)
    if fig is None:
      _remove_stale(path)
      figures.append(f'{fname}: skipped ({why}).\n')
    else:
      with files.atomic_write(path, 'wb') as f:
        fig.savefig(f, format='png', dpi=120,
                    metadata={'Description': made + '\n' + sources})
      figures.append(f'![{fname}]({fname})\n')
  run_rows = [[f'`{r.path}`', r.variant if r.config else 'benchmark only',
               (r.config or {}).get('seed', tables.DASH),
               _seq_attention(r) if r.config else tables.DASH,
               len(r.metrics), ', '.join(r.bleu) or tables.DASH, len(r.benchmark)]
              for r in runs]
  report = ('# MQA / GQA report\n\n' + made + '\n\n' +
            (t1 or '## Table 1: quality\n\nNo run with config.json.\n') + '\n' +
            (t2 or '## Table 2: speed\n\nNo benchmark.jsonl rows.\n') +
            '\n## Plots\n\n' + '\n'.join(figures) + '\n## Runs\n\n' +
            tables.md_table(['path', 'variant', 'seed', 'trained with attention',
                             'metric lines', 'bleu.json keys', 'benchmark rows'], run_rows))
  for fname, text in (('table1.md', t1), ('table2.md', t2), ('report.md', report)):
    path = os.path.join(out, fname)
    if text is None:
      _remove_stale(path)
      continue
    files.write_text(path, text)
  return out


def _seq_attention(r: RunFiles) -> str:
  """The attention over whole sequences that trained the run (config.json's;
  runs from before the choice existed used 'xla'), with the largest median
  gradient gap from 'xla' that its starts measured (launches.jsonl)."""
  impl = r.config.get('seq_attention_impl', 'xla')
  if impl == 'xla':
    return impl
  gaps = [x['seq_attention_check']['median_gradient_gap'] for x in r.launches
          if x.get('seq_attention_check')]
  return f'{impl}, gradients within {max(gaps):.3f} of xla' if gaps else f'{impl}, unchecked'


def _remove_stale(path: str) -> None:
  """Removes an earlier report's file that this report has no data for."""
  if os.path.exists(path):
    os.remove(path)


def write_benchmark(rows: Sequence[dict], out_dir: str) -> str:
  """Writes `out_dir`/table2.md and TensorBoard scalars of benchmark rows.

  Returns the markdown: `tables.table2` of these rows, the device
  measurements, each row's compute floor and in-loop traffic, and errors.
  (The rows themselves go to benchmark.jsonl as they are measured.)
  """
  os.makedirs(out_dir, exist_ok=True)
  good = [r for r in rows if r.get('us_per_token') is not None]
  failed = [r for r in rows if r.get('error')]
  devices = dict.fromkeys(
      f"{r['device']} ({r['dtype']}): copy {r['device_gbps']:.0f} GB/s, "
      f"matmul {tables.num(r['device_tflops'])} TFLOP/s" for r in good)
  copies = lambda r: (tables.DASH if r.get('loop_cache_copy_bytes_per_step') is None
                      else f"{r['loop_cache_copy_bytes_per_step'] / 1e6:.3g}")
  kinds = lambda r: ', '.join(f'{k} {v / 1e6:.3g}' for k, v in sorted(
      (r.get('loop_bytes_by_kind') or {}).items())) or tables.DASH
  floors = [[r['variant'], r['kind'], r['cache'] or tables.DASH,
             tables.impl_label(r), r['batch'],
             tables.num(r['flops_per_token'] / 1e6),
             tables.num(r['compute_floor_us_per_token']),
             f"{r['fraction_of_compute_floor']:.3f}", copies(r), kinds(r)]
            for r in good]
  text = (tables.table2(rows) + '\nMeasured: ' + '; '.join(devices) +
          '. Memory floor: bytes per token / copy bandwidth (decoding only). '
          'Compute floor: FLOPs per token / matmul throughput.\n\n'
          '### Compute floor and in-loop traffic\n\n' + tables.md_table(
              ['variant', 'kind', 'cache', 'impl', 'batch', 'MFLOP/token',
               'compute floor (µs/token)', 'fraction of compute floor',
               'cache copied per step (MB)',
               'cache-sized writes per step by op (MB)'], floors))
  if failed:
    text += '\n### Errors\n\n' + tables.md_table(
        ['variant', 'kind', 'cache', 'impl', 'error'],
        [[r.get('variant'), r['kind'], r['cache'] or tables.DASH,
          tables.impl_label(r), r['error'].splitlines()[0][:200]]
         for r in failed])
  files.write_text(os.path.join(out_dir, 'table2.md'), text)
  many = len({tables.impl_label(r) for r in good}) > 1
  writer = metrics.MetricWriter(out_dir)
  writer.write_scalars(0, {
      f"benchmark/{r['variant']}/{r['kind']}"
      f"{'_' + r['cache'] if r['cache'] else ''}"
      f"{'_' + tables.impl_label(r).replace('/', '_') if many else ''}"
      "_us_per_token": r['us_per_token'] for r in good})
  writer.close()
  return text


def main(argv: Sequence[str]) -> None:
  if len(argv) < 2:
    raise app.UsageError('give one or more run directories')
  command = 'python -m mqa_flax.report ' + ' '.join(sys.argv[1:])
  print(write_report(argv[1:], flags.FLAGS.out, command))


if __name__ == '__main__':
  # Defined here, so that importing this module defines no flag.
  flags.DEFINE_string('out', 'results/report', 'Output folder.')
  errors.run(main, positional_args=True)
