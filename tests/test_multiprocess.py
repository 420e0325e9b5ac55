"""Several processes for real: two train.py processes on localhost.

Each process has 2 fake CPU devices and the processes talk through gloo, as
hosts of a cluster would through their network (scripts/
launch_local_multiprocess.sh starts them). The reference is one process with
4 devices fed the same global batches, so the two runs must agree to float32
round-off. Data sharding is also checked on its own, without processes.
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import demo
from conftest import make_examples
from mqa_flax import data
from mqa_flax import errors
from mqa_flax import state as state_lib
from mqa_flax import train_lib
from mqa_flax.config import ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, 'scripts', 'launch_local_multiprocess.sh')
STEPS = 12
OVERRIDES = {'num_train_steps': STEPS, 'log_every': 1, 'eval_every': 0,
             'checkpoint_every': 0}
FLAGS = ['--config=configs/demo.py:mha,tiny'] + [
    f'--config.{k}={v}' for k, v in OVERRIDES.items()]
FOUR_DEVICES = '--xla_force_host_platform_device_count=4'
EXIT_STOPPED = getattr(errors, 'EXIT_STOPPED', getattr(train_lib, 'EXIT_STOPPED', 0))

# One process with 4 devices, each batch the rows processes 0 and 1 of 2 would
# feed (in that order, as the global array puts them).
REFERENCE = r'''
import os, sys
import numpy as np
from absl import flags
from ml_collections import config_flags
from mqa_flax import data, train_lib

Shard = data.PackedBatches

class TwoShards:
  def __init__(self, examples, batch_size, max_len, seed, process_index, process_count):
    assert (process_index, process_count) == (0, 1)
    self.parts = [Shard(examples, batch_size, max_len, seed, p, 2)
                  for p in (0, 1)]
  def steps_per_epoch(self):
    return max(p.steps_per_epoch() for p in self.parts)
  def get_state(self):
    return self.parts[0].get_state()
  def __iter__(self):
    return self
  def __next__(self):
    a, b = (next(p) for p in self.parts)
    return {k: np.concatenate([a[k], b[k]]) for k in a}

data.PackedBatches = TwoShards
config = config_flags.DEFINE_config_file('config', lock_config=True)
workdir = flags.DEFINE_string('workdir', None, '')
flags.FLAGS(sys.argv)
os.makedirs(workdir.value, exist_ok=True)
train_lib.train_and_evaluate(config.value, workdir.value)
'''


def _env(**extra) -> dict[str, str]:
  # Compiled programs are cached on disk: reruns and resumes skip compiling.
  cache = os.path.join(tempfile.gettempdir(), f'mqa_flax_test_jax_cache_{os.getuid()}')
  env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS='', JAX_PLATFORMS='cpu',
             PYTHON=sys.executable, JAX_COMPILATION_CACHE_DIR=cache,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  for k in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID'):
    env.pop(k, None)
  env.update(extra)
  return env


def _launch(workdir, log_dir, **env) -> subprocess.Popen:
  return subprocess.Popen(
      ['bash', LAUNCH, '2', *FLAGS, f'--workdir={workdir}'], cwd=ROOT,
      env=_env(LOG_DIR=str(log_dir), **env), stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float) -> str:
  try:
    out, _ = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    out, _ = proc.communicate()
    pytest.fail(f'launcher still running after {timeout}s:\n{out[-3000:]}')
  return out


def _wait_for_steps(workdir, n: int, proc: subprocess.Popen, timeout: float = 90) -> None:
  """Waits until process 0 has logged `n` steps."""
  path = os.path.join(workdir, 'metrics.jsonl')
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(path):
      with open(path) as f:
        if sum(1 for _ in f) >= n:
          return
    time.sleep(0.1)
  pytest.fail(f'no step {n} logged in {workdir}; launcher: {_finish(proc, 5)[-3000:]}')


def _exit_codes(out: str) -> list[int]:
  return [int(line.rsplit(' ', 1)[1]) for line in out.splitlines()
          if line.startswith('process ') and ' exited with status ' in line]


def _losses(workdir) -> dict[int, float]:
  out = {}
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      row = json.loads(line)
      out[row['step']] = row['train/loss']  # A resumed run's later line wins.
  return out


def _config():
  config = demo.get_config('mha,tiny')
  for k, v in OVERRIDES.items():
    config[k] = v
  return config


def _final_state(workdir):
  config = _config()
  cfg = ModelConfig.from_config(config.model, config.data.vocab_size)
  _, abstract = state_lib.abstract_state(cfg, state_lib.make_optimizer(config.opt, STEPS))
  manager = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), 'checkpoints'))
  try:
    return manager.restore(STEPS, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))['state']
  finally:
    manager.close()


@pytest.mark.parametrize('process_count', [2, 3])
def test_each_example_is_seen_once_per_epoch_across_processes(process_count):
  # Example i's source starts with the unique id i + 1; lengths vary, so that
  # packing differs between the shares.
  n = 101
  examples = make_examples([[i + 1] + [1] * (i % 5) for i in range(n)],
                           [[2] * (1 + i % 3) for i in range(n)])
  seen = []
  for p in range(process_count):
    batches = data.PackedBatches(examples, 2 * process_count, 16, 0, p, process_count)
    share = batches.epoch_order(0)
    stream = []
    while len(stream) < len(share):
      b = next(batches)
      starts = (b['inputs_position'] == 0) & (b['inputs_segmentation'] > 0)
      stream += list(b['inputs'][starts] - 1)
    # Rows fill in stream order: the share's pairs come first, in order.
    np.testing.assert_array_equal(stream[:len(share)], share)
    seen += list(share)
  np.testing.assert_array_equal(np.sort(seen), np.arange(n))


def test_two_processes_match_one_stop_together_and_resume_exactly(tmp_path):
  # 1. The reference: one process, 4 devices.
  ref = tmp_path / 'ref'
  start = time.time()
  out = subprocess.run([sys.executable, '-c', REFERENCE, *FLAGS, f'--workdir={ref}'],
                       cwd=ROOT, env=_env(XLA_FLAGS=FOUR_DEVICES),
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-3000:]
  ref_time = time.time() - start

  # 2. Two processes; SIGTERM to process 1 alone stops both at one step.
  run, logs = tmp_path / 'run', tmp_path / 'logs'
  start = time.time()
  proc = _launch(run, logs)
  _wait_for_steps(run, 3, proc)
  os.kill(int((logs / 'process_1.pid').read_text()), signal.SIGTERM)
  out = _finish(proc, 120)
  assert _exit_codes(out) == [EXIT_STOPPED] * 2, out[-3000:]
  stops = [[line for line in (logs / f'process_{p}.log').read_text().splitlines()
            if 'stopped by signal 15 at step' in line] for p in (0, 1)]
  assert all(stops), out[-3000:]
  stop_step = [int(s[-1].split(' at step ')[1].split(';')[0]) for s in stops]
  assert stop_step[0] == stop_step[1] < STEPS
  assert [d for d in os.listdir(run / 'checkpoints') if d.isdigit()] == [str(stop_step[0])]

  # 3. The rerun resumes from that checkpoint and ends as the reference does.
  out = _finish(_launch(run, logs), 120)
  assert _exit_codes(out) == [0, 0], out[-3000:]
  assert f'resumed from step {stop_step[0]}' in (logs / 'process_1.log').read_text()
  mp_time = time.time() - start
  print(f'reference run {ref_time:.1f}s; two-process run, stop and resume {mp_time:.1f}s')
  want, got = _losses(ref), _losses(run)
  assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([got[s] for s in want], list(want.values()), rtol=1e-5)
  ref_state, mp_state = _final_state(ref), _final_state(run)
  for a, b in zip(*(jax.tree.leaves(s.params) for s in (ref_state, mp_state))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
  assert int(mp_state.step) == STEPS

  # 4. One process cannot resume the two processes' checkpoint: it says why.
  out = subprocess.run([sys.executable, 'train.py', *FLAGS, f'--workdir={run}'],
                       cwd=ROOT, env=_env(XLA_FLAGS=FOUR_DEVICES),
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == errors.EXIT_USER_ERROR, out.stderr[-3000:]
  assert 'written by 2 process(es) and this run has 1' in out.stderr.splitlines()[-1]


def test_a_killed_process_makes_the_other_exit_instead_of_hanging(tmp_path):
  run, logs = tmp_path / 'run', tmp_path / 'logs'
  proc = _launch(run, logs, JAX_HEARTBEAT_TIMEOUT_SECONDS='5')
  deadline = time.time() + 60  # Killed once the job has formed; no need to train.
  while time.time() < deadline and 'training ' not in _read(logs / 'process_1.log'):
    time.sleep(0.1)
  os.kill(int((logs / 'process_1.pid').read_text()), signal.SIGKILL)
  killed = time.time()
  out = _finish(proc, 90)
  waited = time.time() - killed
  codes = _exit_codes(out)
  assert codes[1] == -signal.SIGKILL or codes[1] == 128 + signal.SIGKILL, out[-3000:]
  assert codes[0] not in (0, EXIT_STOPPED), out[-3000:]
  assert waited < 45, f'process 0 took {waited:.0f}s to notice'
  assert 'another task died' in (logs / 'process_0.log').read_text()


def _read(path) -> str:
  return path.read_text() if path.exists() else ''


def test_decode_refuses_several_processes(tmp_path):
  out = subprocess.run([sys.executable, 'decode.py', f'--workdir={tmp_path}', '--mode=bleu'],
                       cwd=ROOT, env=_env(JAX_NUM_PROCESSES='2'), capture_output=True,
                       text=True, timeout=60)
  assert out.returncode == errors.EXIT_USER_ERROR, out.stderr[-3000:]
  assert out.stderr.splitlines()[-1] == (
      "error: decode.py runs in one process, not 2: unset JAX_NUM_PROCESSES and run "
      "it once (one process uses all of its host's devices)")
