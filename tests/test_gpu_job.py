"""The staged GPU job (scripts/gpu_job.py), checked on CPU with --tiny."""

import os
import re
import subprocess
import sys
import tarfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOB = os.path.join(ROOT, 'scripts', 'gpu_job.py')


def _job(tmp_path, *flags, timeout=300):
  start = time.time()
  out = subprocess.run(
      [sys.executable, JOB, '--tiny', f'--out={tmp_path}/out', f'--runs={tmp_path}/runs',
       '--stages=core', '--variants=mha', '--seeds=0', *flags],
      capture_output=True, text=True, timeout=timeout, cwd=ROOT)
  return out, time.time() - start


def test_plan_lists_every_stage_with_minutes():
  out = subprocess.run([sys.executable, JOB, '--plan'], capture_output=True, text=True,
                       check=True)
  rows = {m[0]: float(m[1]) for m in re.findall(r'^(\w+)\s+([\d.]+)\s', out.stdout, re.M)}
  assert list(rows) == ['smoke', 'table2', 'core', 'heads', 'local', 'report']
  assert all(0 < minutes for minutes in rows.values())
  assert 'command' in out.stdout  # Which 9-minute command each stage falls in.


def test_deadline_stops_training_then_rerun_resumes_and_then_skips(tmp_path):
  # A training far longer than the deadline: stopped (it checkpoints), packed.
  out, seconds = _job(tmp_path, '--deadline=40', '--pack_reserve=15',
                      '--train_args=--config.num_train_steps=100000')
  assert out.returncode == 1, out.stdout + out.stderr
  assert seconds < 40 + 15, out.stdout
  assert 'training stopped' in out.stdout
  with tarfile.open(f'{tmp_path}/out/table1.tgz') as tar:
    names = tar.getnames()
  assert 'm30k-mha-s0/train.log' in names and 'm30k-mha-s0/bleu.json' not in names
  assert not any('checkpoints' in n for n in names)
  # The rerun on the same machine resumes that training, then scores it.
  out, _ = _job(tmp_path, '--deadline=240', '--train_args=--config.num_train_steps=30')
  assert out.returncode == 0, out.stdout + out.stderr
  assert '0 of 1 runs already finished' in out.stdout
  with open(f'{tmp_path}/runs/m30k-mha-s0/train.log') as f:
    assert 'resumed from step' in f.read()
  with tarfile.open(f'{tmp_path}/out/table1.tgz') as tar:
    assert 'm30k-mha-s0/bleu.json' in tar.getnames()
  # A third command finds it finished and does nothing.
  out, _ = _job(tmp_path, '--deadline=240')
  assert out.returncode == 0 and '1 of 1 runs already finished' in out.stdout
