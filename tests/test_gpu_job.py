"""The GPU job in windows (scripts/gpu_job.py), checked on CPU with --tiny."""

import importlib.util
import io
import json
import os
import random
import signal
import subprocess
import sys
import tarfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOB = os.path.join(ROOT, 'scripts', 'gpu_job.py')
_spec = importlib.util.spec_from_file_location('gpu_job', JOB)
gpu_job = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_job)
FULL_BLEU = {f'{s}/{b}': {'bleu_13a': 30.0} for s in ('dev', 'test', 'newstest2014')
             for b in ('greedy', 'beam4')}


def _run(*args, timeout=300):
  return subprocess.run([sys.executable, JOB, *args], capture_output=True, text=True,
                        timeout=timeout, cwd=ROOT)


def _job(tmp, *flags, runs='runs', out='out', timeout=300):
  start = time.time()
  proc = _run('--tiny', f'--out={tmp}/{out}', f'--runs={tmp}/{runs}',
              f'--results={tmp}/results', *flags, timeout=timeout)
  return proc, time.time() - start


def _members(tgz: str) -> dict[str, bytes]:
  with tarfile.open(tgz) as tar:
    return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def _plan_commands(stdout: str) -> dict[int, list[str]]:
  """Unit ids per command of window 1 in --plan's printout."""
  out, command = {}, None
  for line in stdout.splitlines():
    if line.startswith('window 1, command '):
      command = int(line.split()[3])
      out[command] = []
    elif command and line.startswith('  ') and line.split()[0].isdigit():
      out[command].append(line.split()[2])
    elif not line.strip() or line.startswith('then'):
      command = None
  return out


def test_a_fresh_window_plans_table1_table2_and_the_implementation_comparison(tmp_path):
  assert gpu_job.command_lengths(15) == [540, 150]
  proc = _run('--plan', '--budget=15', f'--results={tmp_path}')
  assert proc.returncode in (0, 2), proc.stderr  # 2: the carried folders are too big.
  commands = _plan_commands(proc.stdout)
  assert commands[1][:3] == ['smoke', 'core-s0', 'table2-main'], proc.stdout
  assert 'table2-impls' in commands[1] + commands[2]
  assert 'measured' not in proc.stdout and 'H100 estimate' in proc.stdout
  assert 'Table 1 core (mha, mqa, gqa2 x seeds 0, 1, 2): complete after window' in proc.stdout
  assert 'timeout_s=540' in proc.stdout and 'timeout_s=150' in proc.stdout
  assert 'carry=[".whl", ".data", ".peers"]' in proc.stdout


def test_plan_skips_what_results_hold_and_uses_measured_times(tmp_path):
  for v in ('mha', 'mqa', 'gqa2'):
    run = tmp_path / 'table1' / 'h200' / f'{v}-s0'
    run.mkdir(parents=True)
    (run / 'bleu.json').write_text(json.dumps(FULL_BLEU))
  (tmp_path / 'table1' / 'h200' / 'mha-s1').mkdir()  # Not scored: still to do.
  (tmp_path / 'table2' / 'h200').mkdir(parents=True)
  (tmp_path / 'table2' / 'h200' / 'benchmark.jsonl').write_text(
      json.dumps({'variant': 'mha', 'job_part': 'main'}) + '\n')
  rows = [dict(item='smoke', device_kind='h200', seconds=12, ok=True),
          dict(item='table2/impls', device_kind='h200', seconds=70, ok=True),
          dict(item='table2/impls', device_kind='h100', seconds=999, ok=True)]
  rows += [dict(item=f'table1/{v}-s0', device_kind='h200', ok=True, step_s=0.05,
                side_by_side=3, steps_run=2520, train_s=200, decode_s=60) for v in 'abc']
  (tmp_path / 'gpu_times.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
  proc = _run('--plan', f'--results={tmp_path}')
  commands = _plan_commands(proc.stdout)
  assert commands[1][:2] == ['smoke', 'table2-impls'], proc.stdout
  assert 'core-s1' in commands[1][2], proc.stdout  # With core-s2 if both fit.
  lines = {line.split()[2]: line for line in proc.stdout.splitlines()
           if line.startswith('  ') and line.split()[0].isdigit()}
  assert lines['smoke'].split()[1] == '12' and 'measured on h200' in lines['smoke']
  assert lines['table2-impls'].split()[1] == '70'
  assert 'step_s measured on h200' in lines[commands[1][2]]
  # Another kind of device has measured nothing: H100 estimates, nothing skipped.
  proc = _run('--plan', f'--results={tmp_path}', '--device=b200')
  assert _plan_commands(proc.stdout)[1][:2] == ['smoke', 'core-s0']


def test_consecutive_table1_units_train_side_by_side_while_they_fit():
  units = [u for u in gpu_job.UNITS if u.id in ('core-s1', 'core-s2', 'uptrain', 'heads')]
  per_run = lambda u: 100.0 * len(u.names)
  unit, seconds = gpu_job.choose(units, 600, per_run)
  assert unit.id == 'core-s1+core-s2' and seconds == 600
  unit, _ = gpu_job.choose(units, 599, per_run)
  assert unit.id == 'core-s1'
  unit, _ = gpu_job.choose(units, 250, lambda u: 300 if u.kind == 'table1' else 200)
  assert unit.id == 'uptrain'  # What fits next, further down the list.
  assert gpu_job.choose(units, 100, per_run) is None


def _tgz(path, files: dict[str, bytes]) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with tarfile.open(path, 'w:gz') as tar:
    for name, data in files.items():
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


def test_collect_adds_new_lines_and_files_and_keeps_finished_runs(tmp_path):
  results, run = tmp_path / 'results', 'table1/h200/mha-s0/'
  first = {run + 'bleu.json': json.dumps(FULL_BLEU).encode(), run + 'config.json': b'{"a": 1}',
           'table2/h200/benchmark.jsonl': b'{"r": 1}\n{"r": 2}\n',
           'gpu_times.jsonl': b'{"t": 1}\n', 'windows/w1/job-c1.log': b'line 1\n'}
  _tgz(f'{tmp_path}/c1/results.tgz', first)
  for _ in range(2):  # Collecting twice changes nothing.
    proc = _run(f'--collect={tmp_path}/c1', f'--results={results}')
    assert proc.returncode == 0, proc.stderr
    for name, data in first.items():
      assert (results / name).read_bytes() == data
  second = dict(first)
  second[run + 'config.json'] = b'{"a": 2}'  # The same run again: results/ keeps its own.
  second['table2/h200/benchmark.jsonl'] = b'{"r": 2}\n{"r": 3}\n'
  second['windows/w1/job-c1.log'] = b'line 1\nline 2\n'
  _tgz(f'{tmp_path}/c2/results.tgz', second)
  proc = _run(f'--collect={tmp_path}/c2', f'--results={results}')
  assert proc.returncode == 0 and '1 kept' in proc.stdout, proc.stdout
  assert (results / run / 'config.json').read_bytes() == b'{"a": 1}'
  assert (results / 'table2/h200/benchmark.jsonl').read_text().splitlines() == [
      '{"r": 1}', '{"r": 2}', '{"r": 3}']
  assert (results / 'windows/w1/job-c1.log').read_text() == 'line 1\nline 2\n'
  proc = _run(f'--collect={tmp_path}/nothing', f'--results={results}')
  assert proc.returncode == 2 and proc.stderr.count('\n') == 1, proc.stderr


def test_carry_check_fails_over_the_limit(tmp_path, capsys):
  (tmp_path / '.data').mkdir()
  (tmp_path / '.data' / 'x.gz').write_bytes(b'0' * 3 * gpu_job.MIB)
  assert gpu_job.carry_sizes(str(tmp_path))['.data'] == 3.0
  assert gpu_job.carry_sizes(str(tmp_path))['.whl'] is None
  assert gpu_job.print_carry(str(tmp_path), limit_mib=4)
  assert not gpu_job.print_carry(str(tmp_path), limit_mib=2)
  assert 'OVER THE LIMIT' in capsys.readouterr().out


def test_deadline_stops_training_then_command_2_resumes_and_scores(tmp_path):
  # A training far longer than the deadline: stopped (it checkpoints), logs packed.
  proc, seconds = _job(tmp_path, '--units=core-s0', '--variants=mha', '--deadline=60',
                       '--train_args=--config.num_train_steps=100000')
  assert proc.returncode == 1, proc.stdout + proc.stderr
  assert seconds < 60 + 10, proc.stdout
  assert 'training stopped' in proc.stdout
  assert not any(n.startswith('table1/') for n in _members(f'{tmp_path}/out/results.tgz'))
  logs = _members(f'{tmp_path}/out/logs.tgz')
  assert 'work/mha-s0/train.log' in logs and not any('checkpoints' in n for n in logs)
  # Command 2 on the same machine resumes that training, then scores it.
  proc, _ = _job(tmp_path, '--units=core-s0', '--variants=mha', '--command=2',
                 '--deadline=200', '--train_args=--config.num_train_steps=30', out='out2')
  assert proc.returncode == 0, proc.stdout + proc.stderr
  with open(f'{tmp_path}/runs/work/mha-s0/train.log') as f:
    assert 'resumed from step' in f.read()
  files = _members(f'{tmp_path}/out2/results.tgz')
  assert json.loads(files['table1/cpu-tiny/mha-s0/bleu.json'])['test/beam4']
  assert {'config.json', 'best.json', 'metrics.jsonl', 'launches.jsonl', 'train.log'} <= {
      n.split('/')[-1] for n in files if n.startswith('table1/cpu-tiny/mha-s0/')}
  times = [json.loads(line) for line in files['gpu_times.jsonl'].decode().splitlines()]
  assert [(t['item'], t['command'], t['resumed']) for t in times] == [
      ('table1/mha-s0', 2, True)]
  assert any(n.endswith('/job-c1.log') for n in files)
  assert any(n.endswith('/job-c2.log') for n in files)


def test_a_command_killed_at_any_moment_keeps_what_finished_and_a_fresh_machine_goes_on(
    tmp_path):
  flags = ('--units=table2-train,table2-batches', '--bench_args=--variants=mha')
  moment, sig = random.uniform(1, 40), random.choice([signal.SIGKILL, signal.SIGTERM])
  print(f'stopping the first command after {moment:.1f} s with {sig.name}')
  proc = subprocess.Popen(
      [sys.executable, JOB, '--tiny', f'--out={tmp_path}/out', f'--runs={tmp_path}/runs',
       f'--results={tmp_path}/results', *flags], cwd=ROOT, start_new_session=True,
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  time.sleep(moment)
  if proc.poll() is None:
    os.killpg(proc.pid, sig)  # The job and every process it started.
  proc.communicate(timeout=120)
  done = []
  if os.path.exists(f'{tmp_path}/out/job.log'):
    with open(f'{tmp_path}/out/job.log') as f:
      done = [line.split()[2].split('/')[1].rstrip(':') for line in f if ' done table2/' in line]
  if done or os.path.exists(f'{tmp_path}/out/results.tgz'):
    files = _members(f'{tmp_path}/out/results.tgz')  # Whole, whenever it was stopped.
    rows = files.get('table2/cpu-tiny/benchmark.jsonl', b'').decode().splitlines()
    assert set(done) <= {json.loads(r)['job_part'] for r in rows}
    assert _run(f'--collect={tmp_path}/out', f'--results={tmp_path}/results').returncode == 0
  # A fresh machine: only results/ tells what is done.
  proc, _ = _job(tmp_path, *flags, runs='fresh', out='out2')
  assert proc.returncode == 0, proc.stdout + proc.stderr
  started = [p for p in ('train', 'batches') if f'table2-{p}: start' in proc.stdout]
  assert sorted(started + done) == ['batches', 'train'], proc.stdout
  assert _run(f'--collect={tmp_path}/out2', f'--results={tmp_path}/results').returncode == 0
  proc, _ = _job(tmp_path, *flags, runs='fresh2', out='out3')
  assert proc.returncode == 0 and ': start ' not in proc.stdout, proc.stdout
  assert 'not done: nothing' in proc.stdout


def test_user_errors_are_one_line_and_exit_2(tmp_path):
  for args in (['--plan', '--units=core-s9'], ['--tiny'], ['--collect', str(tmp_path)],
               ['--out', str(tmp_path), '--command=3']):
    proc = _run(*args)
    assert proc.returncode == 2 and proc.stderr.startswith('error: '), (args, proc.stderr)
    assert proc.stderr.count('\n') == 1, proc.stderr


def test_device_kinds_name_results_folders():
  assert gpu_job.device_kind('NVIDIA H200', False) == 'h200'
  assert gpu_job.device_kind('NVIDIA H100 80GB HBM3', False) == 'h100'
  assert gpu_job.device_kind('TPU v5 lite', False) == 'tpu-v5-lite'
  assert gpu_job.device_kind('NVIDIA H200', True) == 'cpu-tiny'


def test_smoke_picks_the_seq_attention_table1_trains_with(tmp_path):
  # On the CPU cuDNN's attention cannot run: the smoke test says so, trains
  # with XLA's instead, and the machine remembers it. A machine that ran
  # cuDNN's passes it to Table 1's train.py; where train.py refuses it before
  # the first step (here: no GPU), the run trains with XLA's, and so does
  # the machine from then on.
  proc, _ = _job(tmp_path, '--units=smoke', '--deadline=200')
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert 'smoke with seq_attention_impl=cudnn: FAILED' in proc.stdout
  assert 'smoke with seq_attention_impl=xla: ok' in proc.stdout
  with open(f'{tmp_path}/runs/machine.json') as f:
    machine = json.load(f)
  assert machine['smoke'] and machine['seq_attention_impl'] == 'xla'
  files = _members(f'{tmp_path}/out/results.tgz')
  smoke = json.loads(files['gpu_times.jsonl'].decode().splitlines()[0])
  assert (smoke['item'], smoke['ok'], smoke['seq_attention_impl']) == ('smoke', True, 'xla')
  machine['seq_attention_impl'] = 'cudnn'
  with open(f'{tmp_path}/runs/machine.json', 'w') as f:
    json.dump(machine, f)
  proc, _ = _job(tmp_path, '--units=core-s0', '--variants=mha', '--deadline=100',
                 out='out2')
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert 'seq_attention_impl=cudnn: mha-s0 refused it' in proc.stdout
  with open(f'{tmp_path}/runs/work/mha-s0/train.log') as f:
    assert "seq_attention_impl='cudnn' needs" in f.read()
  with open(f'{tmp_path}/runs/work/mha-s0/config.json') as f:
    assert json.load(f)['seq_attention_impl'] == 'xla'
  with open(f'{tmp_path}/runs/machine.json') as f:
    assert json.load(f)['seq_attention_impl'] == 'xla'
  assert 'done table1/mha-s0' in proc.stdout
