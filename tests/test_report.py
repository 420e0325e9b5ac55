"""Tests for mqa_flax.report (with results, tables, plots) on fake run directories."""

import json
import os
import subprocess
import sys

from matplotlib import image
from PIL import Image
import pytest

from mqa_flax import plots
from mqa_flax import report
from mqa_flax import results
from mqa_flax import tables

FIGURES = ('speed.png', 'decode_vs_batch.png', 'quality.png', 'training_curves.png')
MODEL = {'num_heads': 8, 'num_kv_heads': 8, 'head_dim': 128, 'd_ff': 4096,
         'local_window': 0}


def _write(path, name, obj):
  with open(os.path.join(path, name), 'w') as f:
    if name.endswith('.jsonl'):
      f.writelines(json.dumps(row) + '\n' for row in obj)
    else:
      json.dump(obj, f)


def _bleu(b13a, intl, step=200):
  return {'bleu_13a': b13a, 'bleu_intl': intl, 'bleu_13a_lc': b13a + 1,
          'signature_13a': 'nrefs:1|case:mixed|tok:13a', 'num_sentences': 3,
          'checkpoint_step': step}


def _quality_run(root, name, variant, seed, model, ppl, bleu, params=None, **config):
  path = root / name
  path.mkdir()
  _write(path, 'config.json', {'variant': variant, 'seed': seed, 'model': model,
                               **config})
  if params:
    _write(path, 'summary.json', {'params_total': params,
                                  'kv_cache_bytes_per_token': 1024})
  _write(path, 'metrics.jsonl', [
      {'step': 100, 'train/loss': 3.0, 'train/lr': 1e-3},
      {'step': 100, 'eval/loss': 2.0, 'eval/ln_ppl': ppl[0]},
      {'step': 200, 'train/loss': 2.5},
      {'step': 200, 'eval/ln_ppl': 9.9},  # Overwritten below after a resume.
      {'step': 200, 'eval/ln_ppl': ppl[1]},
      {'step': 300, 'eval/ln_ppl': ppl[2]},
  ])
  _write(path, 'bleu.json', bleu)
  return str(path)


def _bench_row(variant, kind, batch, us, cache=None, floor=None):
  return {'variant': variant, 'kind': kind, 'cache': cache, 'batch': batch,
          'src_len': 32, 'tgt_len': 32, 'us_per_token': us, 'compile_s': 1.5,
          'bytes_per_step': 2_500_000, 'achieved_gbps': 800.0,
          'floor_us_per_token': floor, 'fraction_of_floor': 0.5,
          'device': 'cpu', 'date': '2025-01-02', 'dtype': 'float32'}


@pytest.fixture
def runs(tmp_path):
  mha0 = _quality_run(
      tmp_path, 'mha-s0', 'mha', 0, MODEL, ppl=(1.8, 1.50, 1.2),
      bleu={'dev/greedy': _bleu(30.0, 31.0), 'test/greedy': _bleu(40.0, 41.0),
            'test/beam4': _bleu(41.0, 42.0),
            'newstest2014/beam4': _bleu(25.0, 26.0)},
      params=211_000_000)
  mha1 = _quality_run(
      tmp_path, 'mha-s1', 'mha', 1, MODEL, ppl=(1.9, 1.60, 1.3),
      bleu={'dev/greedy': _bleu(32.0, 33.0), 'test/greedy': _bleu(41.0, 42.0),
            'test/beam4': _bleu(42.0, 44.0)},
      params=211_000_000)
  # No eval at the BLEU checkpoint (step 250): falls back to the minimum.
  mqa = _quality_run(
      tmp_path, 'mqa-s0', 'mqa', 0, {**MODEL, 'num_kv_heads': 1},
      ppl=(1.9, 1.7, 1.65), bleu={'test/beam4': _bleu(39.5, 40.5, step=250)},
      seq_attention_impl='cudnn')
  _write(tmp_path / 'mqa-s0', 'launches.jsonl', [  # Started, then resumed.
      {'start_step': 0, 'seq_attention_check': {'median_gradient_gap': 0.0081}},
      {'start_step': 100, 'seq_attention_check': {'median_gradient_gap': 0.0112}}])
  bench = tmp_path / 'bench'
  bench.mkdir()
  _write(bench, 'benchmark.jsonl', _bench_rows())
  return [mha0, mha1, mqa, str(bench)]


def _bench_rows():
  """mha and mqa (4x faster) rows of every kind; greedy at batches 1, 8, 64."""
  rows = []
  for v, scale in (('mha', 4.0), ('mqa', 1.0)):
    rows += [_bench_row(v, 'train', 128, 0.4),
             _bench_row(v, 'encoder', 64, 1.7),
             _bench_row(v, 'encoder', 16, 2.0),
             _bench_row(v, 'beam4', 16, 50.0 * scale, 'padded', floor=10.0 * scale),
             _bench_row(v, 'beam4', 16, 60.0 * scale, 'growing')]
    for b in (1, 8, 64):
      for cache, slow in (('padded', 1.0), ('growing', 1.5)):
        rows.append(_bench_row(v, 'greedy', b, slow * scale * 300 / b, cache,
                               floor=scale * 100 / b))
  return rows


def _table_row(text, first_cell):
  for line in text.splitlines():
    cells = [c.strip() for c in line.strip('|').split('|')]
    if cells[0] == first_cell:
      return cells
  raise AssertionError(f'no row {first_cell!r} in:\n{text}')


def test_report_tables_and_plots(runs, tmp_path):
  out = str(tmp_path / 'out')
  assert report.write_report(runs, out) == out

  t1 = open(os.path.join(out, 'table1.md')).read()
  header = _table_row(t1, 'variant')
  assert header[header.index('dev ln(PPL)'):] == [
      'dev ln(PPL)', 'dev BLEU greedy', 'test BLEU greedy', 'test BLEU beam-4',
      'newstest2014 BLEU beam-4']
  mha = dict(zip(header, _table_row(t1, 'mha')))
  assert mha['attention'] == 'multi-head h=8 K=8'
  assert (mha['h'], mha['K'], mha['d_k'], mha['d_ff']) == ('8', '8', '128', '4096')
  assert mha['params (M)'] == '211.0'
  assert mha['n'] == '2'
  assert mha['dev ln(PPL)'] == '1.550 ± 0.071'  # At checkpoint step 200.
  assert mha['dev BLEU greedy'] == '31.00 ± 1.41'
  assert mha['test BLEU greedy'] == '40.50 ± 0.71'
  assert mha['test BLEU beam-4'] == '41.50 ± 0.71'
  assert mha['newstest2014 BLEU beam-4'] == '25.00 (n=1)'
  mqa = dict(zip(header, _table_row(t1, 'mqa')))
  assert mqa['attention'] == 'multi-query h=8 K=1'
  assert mqa['params (M)'] == '–'
  assert mqa['dev ln(PPL)'] == '1.650*'
  assert mqa['test BLEU beam-4'] == '39.50'
  assert mqa['test BLEU greedy'] == '–'
  intl = t1[t1.index('intl'):]
  assert _table_row(intl, 'mha')[2:5] == [
      '32.00 ± 1.41', '41.50 ± 0.71', '43.00 ± 1.41']

  t2 = open(os.path.join(out, 'table2.md')).read()
  # Largest batch, fastest cache mode; encoder at the same batch.
  batches = '128 / 64 / 16'
  assert _table_row(t2, 'mha')[1:] == ['0.400', '1.70 + 18.8', '2.00 + 200', batches]
  assert _table_row(t2, 'mqa')[1:] == ['0.400', '1.70 + 4.69', '2.00 + 50.0', batches]
  assert 'Device: cpu. Date: 2025-01-02.' in t2
  detail = t2[t2.index('Every benchmark row'):]
  assert len([l for l in detail.splitlines() if l.startswith('| m')]) == 2 * 11

  md = open(os.path.join(out, 'report.md')).read()
  assert t1 in md and t2 in md
  runs_table = md[md.index('## Runs'):]
  assert _table_row(runs_table, 'path')[3] == 'trained with attention'
  # config.json without the choice (runs from before it): 'xla'.
  # cuDNN's: the largest gradient gap its starts measured against 'xla'.
  assert [_table_row(runs_table, f'`{r}`')[3] for r in runs[:3]] == [
      'xla', 'xla', 'cudnn, gradients within 0.011 of xla']
  for name in FIGURES:
    assert f'![{name}]({name})' in md
    path = os.path.join(out, name)
    with open(path, 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'
    assert os.path.getsize(path) > 1000
    assert image.imread(path).ndim == 3


def test_report_skips_plots_without_data(tmp_path):
  run = tmp_path / 'mha_local-s0'
  run.mkdir()
  _write(run, 'config.json', {'seed': 0, 'model': {**MODEL, 'local_window': 32}})
  out = str(tmp_path / 'out')
  os.makedirs(out)
  for stale in ('table2.md', 'decode_vs_batch.png'):  # An earlier report's.
    open(os.path.join(out, stale), 'w').close()
  report.write_report([str(run)], out)
  assert not os.path.exists(os.path.join(out, 'table2.md'))
  assert os.path.exists(os.path.join(out, 'table1.md'))
  md = open(os.path.join(out, 'report.md')).read()
  row = _table_row(md, 'mha_local')  # Variant derived from the model.
  assert row[1] == 'multi-head h=8 K=8, local window 32'
  assert row[8:] == ['–']
  assert 'No benchmark.jsonl rows.' in md
  for name in FIGURES:
    assert f'{name}: skipped' in md
    assert not os.path.exists(os.path.join(out, name))


def test_bad_run_directories(tmp_path):
  with pytest.raises(results.ReportError, match='not a directory'):
    report.write_report([str(tmp_path / 'missing')], str(tmp_path / 'out'))
  with pytest.raises(results.ReportError, match='neither config.json nor benchmark'):
    report.write_report([str(tmp_path)], str(tmp_path / 'out'))


def test_cli_prints_one_line_error(tmp_path):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run(
      [sys.executable, '-m', 'mqa_flax.report', str(tmp_path / 'missing'),
       '--out', str(tmp_path / 'out')],
      cwd=root, capture_output=True, text=True, check=False)
  assert proc.returncode == 2
  assert proc.stderr.strip() == f'error: {tmp_path / "missing"}: not a directory'


def test_table2_labels_each_implementation_when_several_appear():
  rows = [_bench_row('mqa', 'train', 128, 0.4)]
  for impl, layout, us in (('xla', 'BLKH', 9.0), ('xla', 'BKLH', 6.0),
                           ('pallas', 'BKLH', None)):
    rows.append(dict(_bench_row('mqa', 'greedy', 64, us, 'padded'),
                     attention_impl=impl, cache_layout=layout))
  rows[-1]['error'] = 'ModuleNotFoundError: pallas_attention'  # A failed row.
  # A variant has lines for the implementations it has rows of only.
  rows += [_bench_row('mha', 'train', 128, 0.8),
           dict(_bench_row('mha', 'greedy', 64, 12.0, 'padded'),
                attention_impl='xla', cache_layout='BKLH')]
  text = tables.table2(rows)
  assert _table_row(text, 'mqa (xla/BLKH)')[2].endswith('9.00')
  assert _table_row(text, 'mqa (xla/BKLH)')[2].endswith('6.00')
  assert _table_row(text, 'mha (xla/BKLH)')[1:3] == ['0.800', '– + 12.0']
  assert '| mha (xla/BLKH)' not in text
  assert 'pallas' not in text  # Error rows have no time to show.
  assert 'xla/BKLH' not in tables.table2(rows[:2])  # One implementation: as before.


def test_report_names_the_command_commit_device_and_date(tmp_path):
  run = tmp_path / 'bench'
  run.mkdir()
  _write(str(run), 'benchmark.jsonl', [dict(
      _bench_row('mqa', 'greedy', 64, 2.0, 'padded'), git_commit='abc123',
      command='python decode.py --mode=benchmark', date='2026-01-02')])
  made = dict(device='H100', git_commit='def456')
  trained = _quality_run(
      tmp_path, 'mqa-s0', 'mqa', 0, {**MODEL, 'num_kv_heads': 1}, ppl=(2, 1.5, 1),
      bleu={'test/beam4': dict(_bleu(30.0, 31.0), command='decode.py --mode=bleu',
                               date='2026-01-03T10:00:00+00:00', **made)})
  _write(trained, 'launches.jsonl', [  # Started, then resumed.
      dict(command='train.py --workdir=a', date='2026-01-01T09:00:00+00:00', **made),
      dict(command='train.py --workdir=a', date='2026-01-02T09:00:00+00:00', **made)])
  out = report.write_report([str(run), trained], str(tmp_path / 'out'),
                            command='python -m x')
  md = open(os.path.join(out, 'report.md')).read()
  assert 'Code: abc123.' in md and 'Date: 2026-01-02.' in md
  assert 'Command: `python decode.py --mode=benchmark`' in md
  assert 'with `python -m x`' in md
  t1 = open(os.path.join(out, 'table1.md')).read()
  assert ('Device: H100. Date: 2026-01-01T09:00:00+00:00 to 2026-01-03T10:00:00+00:00. '
          'Code: def456.') in t1
  assert t1.count('Command: `train.py --workdir=a`') == 1
  assert 'Command: `decode.py --mode=bleu`' in t1
  with Image.open(os.path.join(out, 'speed.png')) as png:
    about = png.info['Description']
  assert 'with `python -m x`' in about and 'Code: abc123, def456.' in about
  assert 'Command: `train.py --workdir=a`' in about


def test_flax_example_beside_our_rows_gives_ratios_at_the_same_shape(tmp_path):
  run = tmp_path / 'table2'
  run.mkdir()
  _write(str(run), 'benchmark.jsonl', [
      _bench_row('mha', 'greedy', 64, 2.0, 'padded'),
      _bench_row('mha', 'greedy', 64, 1.6, 'growing'),  # Our fastest at that shape.
      _bench_row('mqa', 'greedy', 64, 0.5, 'padded'),
      _bench_row('mqa', 'greedy', 8, 0.1, 'padded'),  # No peer row at batch 8.
      _bench_row('mha', 'train', 128, 4.0)])
  made = dict(device='cpu', command='python .peers/flax_wmt_bench.py', git_commit='p1',
              date='2025-01-03')
  _write(str(run), results.PEER_FILE, [
      dict(made, peer='flax-examples-wmt', batch=64, beam=1, src_len=32, tgt_len=32,
           enc_us_per_token=0.5, dec_us_per_token=8.0),
      dict(made, peer='flax-examples-wmt', train_rows=128, train_len=32,
           train_us_per_output_token=3.0)])
  t2 = tables.table2(results.load_run(str(run)).benchmark)
  assert _table_row(t2, results.PEER_VARIANT)[1:] == [
      '3.00', '0.500 + 8.00', '0.500 + –', '128 / 64 / –']  # Encoder only.
  assert ('greedy at batch 64: mha 5.00x, mqa 16.0x; train at batch 128: mha 0.750x.'
          in t2)
  assert 'Command: `python .peers/flax_wmt_bench.py`' in t2 and 'Code: p1.' in t2
  # On another device there is no ratio to give.
  other = [dict(r, device='gpu') if r['variant'] == results.PEER_VARIANT else r
           for r in results.load_run(str(run)).benchmark]
  assert 'Flax WMT example / ours' not in tables.table2(other)


def _drawn(ax, prefix):
  """{gid: artist} of the artists of `ax` whose gid starts with `prefix`."""
  return {a.get_gid(): a for a in ax.get_children()
          if (a.get_gid() or '').startswith(prefix)}


def _axis(fig, title_start):
  (ax,) = [ax for ax in fig.axes if ax.get_title().startswith(title_start)]
  return ax


def _bar_heights(ax):
  return {gid.split(': ', 1)[1].split('\n')[0]: bar.get_height()
          for gid, bar in _drawn(ax, 'measured').items()}


def _hline_heights(ax, label):
  lines = _drawn(ax, label)
  return sorted(s[0][1] for c in lines.values() for s in c.get_segments())


def test_speed_figure_draws_every_row_beside_its_floors():
  rows = _bench_rows()
  rows[3]['compute_floor_us_per_token'] = 2.0  # mha beam4 padded.
  rows.append(dict(_bench_row(results.PEER_VARIANT, 'greedy', 64, 90.0), cache=None))
  fig = plots.plot_speed(rows)
  assert 'on cpu' in fig.get_suptitle()
  greedy = _axis(fig, 'greedy: batch 64, S = 32, T = 32')
  assert 'MHA / MQA = 4.00x' in greedy.get_title()
  # One bar per variant at the largest batch, its fastest cache mode; the
  # Flax example beside them, without floors.
  assert len(greedy.patches) == 3
  assert _bar_heights(greedy) == pytest.approx(
      {'mha': 18.75, 'mqa': 4.6875, 'Flax WMT': 90.0})
  assert _hline_heights(greedy, plots.MEMORY_FLOOR) == pytest.approx([100 / 64, 400 / 64])
  assert not _drawn(greedy, plots.COMPUTE_FLOOR)  # No row has one.
  beam = _axis(fig, 'beam 4: batch 16')
  assert _bar_heights(beam) == pytest.approx({'mha': 200.0, 'mqa': 50.0})
  assert _hline_heights(beam, plots.MEMORY_FLOOR) == pytest.approx([10.0, 40.0])
  assert _hline_heights(beam, plots.COMPUTE_FLOOR) == pytest.approx([2.0])
  assert plots.plot_speed([r for r in rows if r['kind'] == 'train']) is None


def test_decode_vs_batch_draws_only_curves_of_two_or_more_batches():
  rows = [r for r in _bench_rows() if r['kind'] == 'greedy' and r['cache'] == 'padded']
  rows.append(_bench_row('gqa2', 'greedy', 64, 3.0, 'padded', floor=1.0))  # One batch.
  fig = plots.plot_decode(rows)
  (ax,) = fig.axes
  measured = _drawn(ax, 'measured')
  assert sorted(measured) == ['measured: mha padded (S=32, T=32, cpu)',
                              'measured: mqa padded (S=32, T=32, cpu)']
  mha = measured['measured: mha padded (S=32, T=32, cpu)']
  assert list(mha.get_xdata()) == [1, 8, 64]
  assert list(mha.get_ydata()) == pytest.approx([1200, 150, 18.75])
  floors = _drawn(ax, plots.MEMORY_FLOOR)
  assert len(floors) == 2
  assert list(floors[f'{plots.MEMORY_FLOOR}: mha padded (S=32, T=32, cpu)']
              .get_ydata()) == pytest.approx([400, 50, 6.25])
  assert not _drawn(ax, plots.COMPUTE_FLOOR)
  legend = [t.get_text() for t in ax.get_legend().get_texts()]
  assert plots.MEMORY_FLOOR in legend and plots.COMPUTE_FLOOR not in legend
  assert plots.plot_decode([r for r in rows if r['batch'] == 64]) is None


def test_quality_figure_has_a_bar_per_variant_its_seeds_and_the_papers_marks(runs):
  groups = results.group_runs([results.load_run(p) for p in runs[:3]])
  fig = plots.plot_quality(groups)
  bleu, ppl = _axis(fig, 'test BLEU'), _axis(fig, 'dev ln(PPL)')
  for ax, means, seeds in ((bleu, {'mha': 41.5, 'mqa': 39.5}, {'mha': 2, 'mqa': 1}),
                           (ppl, {'mha': 1.55, 'mqa': 1.65}, {'mha': 2, 'mqa': 1})):
    bars = _drawn(ax, 'mean: ')
    assert len(ax.patches) == len(bars) == len(groups)
    assert {g[6:]: b.get_height() for g, b in bars.items()} == pytest.approx(means)
    assert {g[7:]: len(a.get_offsets()) for g, a in _drawn(ax, 'seeds: ').items()} == seeds
    assert sorted(t.get_text().split('\n')[1] for t in ax.texts) == ['n=1', 'n=2']
    assert list(_drawn(ax, 'std: ')) == ['std: mha']  # Only mha has two seeds.
  assert fig.get_suptitle().endswith('error bars their std')
  one_seed = plots.plot_quality({'mqa': groups['mqa']})
  assert one_seed.get_suptitle().endswith('one seed each (n=1)')
  marks = {g: a.get_offsets()[0][1] for g, a in _drawn(ppl, 'paper: ').items()}
  assert marks == pytest.approx({'paper: mha': 1.424, 'paper: mqa': 1.439})
  assert len(_drawn(bleu, 'paper: ')) == 2
  for r in groups['mha'] + groups['mqa']:  # A generated task: no paper marks.
    r.config['data'] = {'source': 'numbers'}
  assert not _drawn(plots.plot_quality(groups).axes[1], 'paper: ')
