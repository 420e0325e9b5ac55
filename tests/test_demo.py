"""The README's first command, end to end in its reduced (tiny) mode."""

import json
import os
import subprocess
import sys
import types

from mqa_flax import metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_end_to_end_tiny(tmp_path):
  out = subprocess.run(
      [sys.executable, '-m', 'mqa_flax.demo', '--tiny', f'--out={tmp_path}',
       '--bench_batches=2,4', '--bench_len=8'],
      cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS=''),
      capture_output=True, text=True, timeout=400)
  assert out.returncode == 0, out.stderr[-3000:]
  table = [line for line in out.stdout.splitlines() if line.startswith('| m')]
  assert [line.split('|')[1].strip() for line in table] == ['mha', 'mqa']
  assert f'report: {tmp_path}/report/report.md' in out.stdout
  for variant in ('mha', 'mqa'):
    bleu = json.load(open(tmp_path / variant / 'bleu.json'))
    assert set(bleu) == {'test/greedy', 'test/beam4'}
    rows = [json.loads(x) for x in open(tmp_path / variant / 'benchmark.jsonl')]
    assert [(r['variant'], r['kind'], r['batch']) for r in rows] == [
        (variant, 'greedy', 2), (variant, 'greedy', 4)]
    # The command as typed, not the path of demo.py on this machine.
    assert rows[0]['command'] == (f'python -m mqa_flax.demo --tiny --out={tmp_path} '
                                  '--bench_batches=2,4 --bench_len=8')
    assert any(f.startswith('events.out.tfevents') for f in os.listdir(tmp_path / variant))
  report = (tmp_path / 'report' / 'report.md').read_text()
  assert 'mha' in report and 'mqa' in report
  for figure in ('speed.png', 'decode_vs_batch.png', 'quality.png', 'training_curves.png'):
    assert f'![{figure}]({figure})' in report
  assert 'with `python -m mqa_flax.demo --tiny' in report
  assert 'libtpu' not in out.stderr  # No alarming lines on a normal start.
  # MQA's cache is a quarter of MHA's (K=1 vs K=4 at the same head size).
  kv = {line.split('|')[1].strip(): int(line.split('|')[8].replace(',', ''))
        for line in table}
  assert kv['mqa'] * 4 == kv['mha']


def test_command_is_named_as_typed_never_by_an_absolute_path(monkeypatch, tmp_path):
  main = types.ModuleType('__main__')  # A script run by path has no __spec__.
  main.__spec__ = None
  monkeypatch.setitem(sys.modules, '__main__', main)
  monkeypatch.chdir(ROOT)
  monkeypatch.setattr(sys, 'argv', [os.path.join(ROOT, 'decode.py'), '--mode=bleu'])
  assert metrics.command() == 'python decode.py --mode=bleu'
  monkeypatch.chdir(tmp_path)  # The script lies outside the working directory.
  assert metrics.command() == 'python decode.py --mode=bleu'
  main.__spec__ = types.SimpleNamespace(name='mqa_flax.demo')  # python -m
  monkeypatch.setattr(sys, 'argv', [os.path.join(ROOT, 'mqa_flax', 'demo.py'), '--out=x'])
  assert metrics.command() == 'python -m mqa_flax.demo --out=x'
