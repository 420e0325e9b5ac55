"""The README's first command, end to end in its reduced (tiny) mode."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_end_to_end_tiny(tmp_path):
  out = subprocess.run(
      [sys.executable, '-m', 'mqa_flax.demo', '--tiny', f'--out={tmp_path}',
       '--bench_shape=4,8,8'],
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
    assert rows[0]['variant'] == variant and rows[0]['kind'] == 'greedy'
    assert any(f.startswith('events.out.tfevents') for f in os.listdir(tmp_path / variant))
  report = (tmp_path / 'report' / 'report.md').read_text()
  assert 'mha' in report and 'mqa' in report
  assert (tmp_path / 'report' / 'training_curves.png').stat().st_size > 0
  # MQA's cache is a quarter of MHA's (K=1 vs K=4 at the same head size).
  kv = {line.split('|')[1].strip(): int(line.split('|')[8].replace(',', ''))
        for line in table}
  assert kv['mqa'] * 4 == kv['mha']
