"""The GPU job in window-sized stages: Table 2 timings, then Table 1 runs.

  python3 scripts/gpu_job.py --out=OUT [--stages=smoke,table2,core,heads]
      [--deadline=540] [--parallel=6] [--tiny]
  python3 scripts/gpu_job.py --plan        # stages and estimated minutes

Stages, in the order they run (what comes first when time runs out):
  smoke   devices, versions and a 20-step tiny training (about 30 s)
  table2  `decode.py --mode=benchmark` at the paper's shape (configs/paper.py,
          random weights, bf16) in parts, most important first (mha, mqa,
          gqa2), with the Flax WMT example (.peers/) timed at the same shape
          on the same machine right after the first part
  core    Table 1 on Multi30k: mha, mqa, gqa2 x seeds 0 1 2
  heads   mha_h1, mha_h4 (seed 0)
  local   mha_local, mqa_local (seed 0); on Multi30k a 32-token window
          changes few target tokens, so these say little about quality
  report  `python -m mqa_flax.report` over everything finished

Each Table 1 run trains (`configs/multi30k.py:<variant>`), then one decode.py
process scores dev, test and newstest2014, greedy and beam 4, with the
parameters best on dev ln(PPL). Runs share the GPU `--parallel` at a time.
Every finished stage or run is packed into OUT at once (at most 8 files come
back from the device: env.txt, job.log, table2.tgz, table1.tgz, report.tgz),
so a command stopped at any point leaves everything finished so far.
`--deadline` seconds after the start, trainings are stopped (SIGTERM: they
checkpoint) and nothing new starts; rerunning the command on the same
machine skips finished stages and runs and resumes stopped trainings (the
workdirs live in --runs, default runs/gpu/). A persistent compilation cache
(runs/gpu/jax_cache, JAX_COMPILATION_CACHE_DIR) lets later runs, seeds and
processes reuse compiled programs.

Inputs, git-ignored and carried to the device: .data/ (multi30k/ and
wmt14_ende_eval/ from the shared data folder), .peers/ (the Flax WMT example
and its timing script) and .whl/ (scripts/fetch_wheels.sh; installed when the
image lacks ml_collections). `--tiny` runs every stage on a CPU in minutes
(`,tiny` configs on the generated numbers task, tiny benchmark shapes).
"""

import argparse
import contextlib
import datetime
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ('smoke', 'table2', 'core', 'heads', 'local', 'report')
RUN_STAGES = {'core': (('mha', 'mqa', 'gqa2'), (0, 1, 2)),
              'heads': (('mha_h1', 'mha_h4'), (0,)),
              'local': (('mha_local', 'mqa_local'), (0,))}
# Scored per run: dev, test and an extra test set (--tiny: the numbers test
# split again, under another name), greedy and beam 4.
EXTRA_TEST = {False: 'newstest2014=wmt14_ende_eval/newstest2014', True: 'extra=test'}
# Table 2 in parts, most important first; each appends to one benchmark.jsonl.
# The Flax WMT example runs right after the first part.
BENCH = (('--variants=mha,mqa,gqa2', '--bench_batch=1024', '--bench_kinds=encoder,greedy,beam4'),
         ('--variants=mha,mqa', '--bench_batch=1024', '--bench_kinds=greedy,beam4',
          '--bench_impls=xla/BKLH,pallas/BKLH,pallas/BLKH,cudnn/BLKH'),
         ('--variants=mha,mqa', '--bench_kinds=train'),
         ('--variants=mha_local,mqa_local', '--bench_batch=1024', '--bench_kinds=greedy,beam4'),
         ('--variants=mha,mqa', '--bench_batch=128,8', '--bench_kinds=encoder,greedy'))
TINY_BENCH = (('--variants=mha,mqa', '--bench_batch=8', '--bench_kinds=encoder,greedy,beam4',
               '--bench_beam_batch=4'),
              ('--variants=mha', '--bench_kinds=train', '--bench_train_shape=4,16'))
TINY_PEER = ('--batch=8,4', '--beam=1,4', '--src_len=8', '--tgt_len=8', '--d_model=64',
             '--d_ff=128', '--layers=2', '--vocab=512', '--train_shape=4,16')
# Plan estimates, measured on an H100 (2026-11-23, one process alone):
# configs/multi30k.py:mha in bf16 ran 29 steps/s; a run's fixed costs
# (vocabulary, tokenising, compiling, dev evaluations) took about 80 s.
STEP_S, STEPS_PER_EPOCH, RUN_FIXED_S, DECODE_S = 1 / 29, 63, 80, 90
# Table 2's parts took 125, 160 (the Flax example), 125 and 60 s there; the
# implementation comparison adds about 2 minutes.
STAGE_S = {'smoke': 40, 'table2': 600, 'report': 30}


def log(msg: str) -> None:
  line = f"{datetime.datetime.now(datetime.timezone.utc):%H:%M:%S} {msg}"
  print(line, flush=True)
  with open(os.path.join(ARGS.out, 'job.log'), 'a') as f:
    f.write(line + '\n')


def left() -> float:
  return DEADLINE - time.time()


def sh(cmd: list[str], logfile: str, timeout: float | None = None,
       procs: list | None = None) -> int:
  """Runs cmd (appending its output to logfile) until done or `timeout`."""
  with open(logfile, 'a') as out:
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                            env=ENV, start_new_session=True)
    if procs is not None:
      procs.append(proc)
    try:
      return proc.wait(timeout=None if timeout is None else max(timeout, 1))
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGTERM)  # Trainings checkpoint on SIGTERM.
      try:
        return proc.wait(timeout=60)
      except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait()


def pack(name: str, paths: list[str], exclude=('checkpoints', 'best', 'data',
                                                'spm.model', 'jax_cache')) -> None:
  """Writes OUT/name.tgz atomically from `paths` (relative to --runs)."""
  tmp = os.path.join(ARGS.out, f'.{name}.tgz')
  with tarfile.open(tmp, 'w:gz') as tar:
    for p in paths:
      full = os.path.join(ARGS.runs, p)
      if os.path.exists(full):
        tar.add(full, arcname=p, filter=lambda t: None if os.path.basename(
            t.name) in exclude else t)
  os.replace(tmp, os.path.join(ARGS.out, f'{name}.tgz'))


def python(*args: str) -> list[str]:
  return [sys.executable, *args]


def stage_smoke() -> bool:
  env_txt = os.path.join(ARGS.out, 'env.txt')
  code = ('import sys, jax, flax, optax, orbax.checkpoint as o; print("python", '
          'sys.version.split()[0], "jax", jax.__version__, "flax", flax.__version__, '
          '"optax", optax.__version__, "orbax", o.__version__, jax.devices())')
  sh(python('-c', code), env_txt, 60)
  with contextlib.suppress(OSError):
    sh(['nvidia-smi'], env_txt, 30)
  sh(['git', 'log', '-1', '--format=commit %H %s'], env_txt, 10)
  wd = os.path.join(ARGS.runs, 'smoke')
  shutil.rmtree(wd, ignore_errors=True)
  return sh(python('train.py', '--config=configs/multi30k.py:mha,tiny', f'--workdir={wd}',
                   '--config.num_train_steps=20'), os.path.join(ARGS.runs, 'smoke.log'),
            min(120, left())) == 0


def stage_table2() -> bool:
  """Benchmark parts in order; a rerun on the same machine skips finished parts."""
  out = os.path.join(ARGS.runs, 'table2')
  os.makedirs(out, exist_ok=True)
  done_file = os.path.join(out, 'parts_done.txt')
  done = open(done_file).read().split('\n') if os.path.exists(done_file) else []
  config = 'configs/paper.py:mha' + (',tiny' if ARGS.tiny else '')
  tiny = ('--bench_src_len=8', '--bench_tgt_len=8', '--bench_reps=2') if ARGS.tiny else ()
  ok = True
  for i, part in enumerate(TINY_BENCH if ARGS.tiny else BENCH):
    name = ' '.join(part)
    if name not in done:
      rc = sh(python('decode.py', '--mode=benchmark', f'--config={config}', f'--out={out}',
                     *part, *tiny, *ARGS.bench_args),
              os.path.join(out, 'benchmark.log'), left() - ARGS.pack_reserve)
      log(f'benchmark {name}: rc={rc}')
      if rc == 0:
        with open(done_file, 'a') as f:
          f.write(name + '\n')
      ok &= rc == 0
      pack('table2', ['table2'])
    if i == 0 and 'peer' not in done:
      if stage_peer(out):
        with open(done_file, 'a') as f:
          f.write('peer\n')
      else:
        ok = False
  return ok


def stage_peer(out: str) -> bool:
  """The Flax WMT example at the same shape, on the same machine, right after.

  Its JSON lines go to peer_flax_wmt.jsonl (which the report reads beside
  benchmark.jsonl), each with the command, our commit and the start time.
  """
  peer = os.path.join(ROOT, '.peers', 'flax_wmt_bench.py')
  if not os.path.exists(peer):
    log('no .peers/flax_wmt_bench.py: the Flax WMT example was not timed')
    return False
  cmd = python(peer, *(TINY_PEER if ARGS.tiny else ()))
  made = dict(command=' '.join(['python', os.path.relpath(peer, ROOT), *cmd[2:]]),
              git_commit=subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=ROOT, text=True,
                                        capture_output=True).stdout.strip() or None,
              date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'))
  with open(os.path.join(out, 'peer.log'), 'a') as err:
    try:
      proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True,
                            env=ENV, check=False,
                            timeout=max(left() - ARGS.pack_reserve, 1))
      rc, lines = proc.returncode, proc.stdout
    except subprocess.TimeoutExpired as e:
      rc, lines = 'timeout', e.output or ''
  if isinstance(lines, bytes):
    lines = lines.decode()
  with open(os.path.join(out, 'peer_flax_wmt.jsonl'), 'a') as jsonl:
    for line in lines.splitlines():
      if line.startswith('{'):  # The measurements; anything else stays out.
        with contextlib.suppress(ValueError):
          jsonl.write(json.dumps(dict(json.loads(line), **made)) + '\n')
  log(f'peer rc={rc}')
  pack('table2', ['table2'])
  return rc == 0


def read_bleu(wd: str) -> dict:
  with contextlib.suppress(OSError, ValueError):
    with open(os.path.join(wd, 'bleu.json')) as f:
      return json.load(f)
  return {}


def finished(wd: str) -> bool:
  scores = read_bleu(wd)
  names = ('dev', 'test', EXTRA_TEST[ARGS.tiny].partition('=')[0])
  return all(f'{n}/{s}' in scores for n in names for s in ('greedy', 'beam4'))


class Table1:
  """Trains and scores runs, `--parallel` at a time, packing each when done."""

  def __init__(self):
    self.lock = threading.Lock()
    self.procs = []

  def names(self) -> list[str]:
    return sorted(os.path.basename(p) for p in glob.glob(
        os.path.join(ARGS.runs, 'm30k-*')))

  def one(self, variant: str, seed: int) -> None:
    name = f'm30k-{variant}-s{seed}'
    wd = os.path.join(ARGS.runs, name)
    os.makedirs(wd, exist_ok=True)
    config = f"configs/multi30k.py:{variant}{',tiny' if ARGS.tiny else ''}"
    flags = [f'--config.seed={seed}', *ARGS.train_args]
    if not ARGS.tiny:
      flags.append('--config.data.data_dir=.data')
    rc = sh(python('train.py', f'--config={config}', f'--workdir={wd}', *flags),
            os.path.join(wd, 'train.log'), left() - ARGS.pack_reserve, self.procs)
    if rc != 0 or not self._trained(wd):
      log(f'{name}: training stopped (rc={rc}); rerun the job to resume it')
      return
    if left() < ARGS.decode_reserve:
      log(f'{name}: trained, but too little time left to score it')
      return
    rc = sh(python('decode.py', f'--workdir={wd}', '--mode=bleu', '--split=dev,test',
                   '--beam_size=1,4', f'--test_sets={EXTRA_TEST[ARGS.tiny]}'),
            os.path.join(wd, 'decode.log'), left() - ARGS.pack_reserve, self.procs)
    log(f"{name}: decode rc={rc}; " + ', '.join(
        f"{k} {v['bleu_13a']:.2f}" for k, v in sorted(read_bleu(wd).items())))
    with self.lock:
      pack('table1', self.names())

  @staticmethod
  def _trained(wd: str) -> bool:
    with contextlib.suppress(OSError, ValueError):
      with open(os.path.join(wd, 'config.json')) as f:
        total = json.load(f)['num_train_steps']
      return any(int(os.path.basename(p)) >= total for p in glob.glob(
          os.path.join(wd, 'checkpoints', '[0-9]*')))
    return False

  def run(self, runs: list[tuple[str, int]]) -> None:
    todo = [r for r in runs if not finished(os.path.join(
        ARGS.runs, f'm30k-{r[0]}-s{r[1]}'))]
    log(f'{len(runs) - len(todo)} of {len(runs)} runs already finished')
    threads = []
    for variant, seed in todo:
      while sum(t.is_alive() for t in threads) >= ARGS.parallel:
        time.sleep(1)
      if left() < ARGS.pack_reserve + 20:  # Too short to train anything.
        log(f'no time to start {variant} seed {seed}')
        break
      threads.append(threading.Thread(target=self.one, args=(variant, seed)))
      threads[-1].start()
    for t in threads:
      t.join()
    pack('table1', self.names())


def stage_report() -> bool:
  dirs = [os.path.join(ARGS.runs, n) for n in Table1().names()
          if finished(os.path.join(ARGS.runs, n))]
  if os.path.exists(os.path.join(ARGS.runs, 'table2', 'benchmark.jsonl')):
    dirs.append(os.path.join(ARGS.runs, 'table2'))
  if not dirs:
    return False
  rc = sh(python('-m', 'mqa_flax.report', *dirs, '--out', os.path.join(ARGS.runs, 'report')),
          os.path.join(ARGS.runs, 'report.log'), left())
  pack('report', ['report', 'report.log'])
  return rc == 0


def plan() -> None:
  """Prints the stages with estimated durations (see the constants above)."""
  run_s = lambda: RUN_FIXED_S + ARGS.epochs * STEPS_PER_EPOCH * STEP_S + DECODE_S
  print(f'{"stage":8} {"est. min":>8}  {"runs in (--deadline)":22} what')
  total = 0.0
  for stage in STAGES:
    if stage in RUN_STAGES:
      variants, seeds = RUN_STAGES[stage]
      n = len(variants) * len(seeds)
      waves = -(-n // ARGS.parallel)
      # Sharing the GPU, a run's steps slow down by up to the runs sharing it.
      slow = min(n, ARGS.parallel) ** 0.5
      sec = waves * (RUN_FIXED_S + DECODE_S + ARGS.epochs * STEPS_PER_EPOCH * STEP_S * slow)
      what = (f'{n} runs ({",".join(variants)} x seeds {",".join(map(str, seeds))}), '
              f'{ARGS.epochs} epochs = {ARGS.epochs * STEPS_PER_EPOCH} steps each, '
              f'{min(n, ARGS.parallel)} at a time; one run alone ~{run_s() / 60:.1f} min')
    else:
      sec, what = STAGE_S[stage], {
          'smoke': 'versions, devices, 20 tiny steps',
          'table2': 'benchmark in 5 parts (compiles dominate), Flax example after the first',
          'report': 'tables and plots'}[stage]
    start, total = total, total + sec
    commands = f'command {int(start // ARGS.deadline) + 1}'
    if int((total - 1) // ARGS.deadline) > int(start // ARGS.deadline):
      commands += f'-{int((total - 1) // ARGS.deadline) + 1} (resumed)'
    print(f'{stage:8} {sec / 60:8.1f}  {commands:22} {what}')
  print(f'estimates: {1 / STEP_S:.0f} steps/s alone on an H100, {STEPS_PER_EPOCH} '
        f'steps per Multi30k epoch, {RUN_FIXED_S} s fixed and {DECODE_S} s of '
        'scoring per run; each command stops its work at --deadline')


def setup() -> None:
  global ENV
  ENV = dict(os.environ, PYTHONUNBUFFERED='1')
  ENV.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(ARGS.runs, 'jax_cache'))
  if ARGS.parallel > 1 and not ARGS.tiny:  # Runs share the GPU's memory.
    ENV['XLA_PYTHON_CLIENT_MEM_FRACTION'] = f'{0.9 / ARGS.parallel:.2f}'
  wheels = sorted(glob.glob(os.path.join(ROOT, '.whl', '*.whl')))
  try:
    import ml_collections  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    if not wheels:
      sys.exit('ml_collections is missing and .whl/ is empty: run scripts/fetch_wheels.sh')
    site = '/tmp/mqa_flax_site'
    subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '--no-index',
                    '--no-deps', '--no-compile', '--upgrade', '--target', site, *wheels],
                   check=True)
    ENV['PYTHONPATH'] = os.pathsep.join(filter(None, [site, ENV.get('PYTHONPATH')]))
  if ARGS.tiny:
    ENV.setdefault('JAX_PLATFORMS', 'cpu')


def main() -> int:
  global ARGS, DEADLINE
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--out', help='output folder (the device tool\'s $OUT)')
  p.add_argument('--stages', default=','.join(STAGES[:-2] + STAGES[-1:]),
                 help=f'comma list from {",".join(STAGES)}')
  p.add_argument('--deadline', type=float, default=540,
                 help='seconds this command may run; work stops in time to pack')
  p.add_argument('--parallel', type=int, default=6, help='Table 1 runs sharing the GPU')
  p.add_argument('--runs', default=os.path.join(ROOT, 'runs', 'gpu'), help='workdirs')
  p.add_argument('--epochs', type=float, default=40, help='plan: epochs per run')
  p.add_argument('--train_args', default='', help='extra train.py flags (space-separated)')
  p.add_argument('--bench_args', default='', help='extra benchmark flags')
  p.add_argument('--decode_reserve', type=float, default=120,
                 help='seconds a trained run needs to be scored')
  p.add_argument('--pack_reserve', type=float, default=20, help='seconds kept for packing')
  p.add_argument('--variants', default='', help='only these variants of the run stages')
  p.add_argument('--seeds', default='', help='seeds of the run stages (default: each '
                 "stage's own)")
  p.add_argument('--tiny', action='store_true', help='tiny configs: a CPU check')
  p.add_argument('--plan', action='store_true', help='print the plan and exit')
  ARGS = p.parse_args()
  ARGS.train_args, ARGS.bench_args = ARGS.train_args.split(), ARGS.bench_args.split()
  ARGS.variants = [v for v in ARGS.variants.split(',') if v]
  ARGS.seeds = [int(x) for x in ARGS.seeds.split(',') if x]
  if ARGS.plan:
    plan()
    return 0
  if not ARGS.out:
    p.error('--out is required')
  stages = ARGS.stages.split(',')
  if set(stages) - set(STAGES):
    p.error(f'--stages={ARGS.stages}: expected names from {",".join(STAGES)}')
  DEADLINE = time.time() + ARGS.deadline
  os.makedirs(ARGS.out, exist_ok=True)
  os.makedirs(ARGS.runs, exist_ok=True)
  setup()
  done_file = os.path.join(ARGS.runs, 'stages_done.txt')
  done = set(open(done_file).read().split()) if os.path.exists(done_file) else set()
  ok = True
  todo = [s for s in sorted(stages, key=STAGES.index) if s not in done]
  for stage in sorted(set(stages) - set(todo), key=STAGES.index):
    log(f'{stage}: done in an earlier command, skipped')
  while todo:
    # Consecutive Table 1 stages share one queue (in order), so the GPU stays full.
    group = [todo.pop(0)]
    while group[0] in RUN_STAGES and todo and todo[0] in RUN_STAGES:
      group.append(todo.pop(0))
    if left() < ARGS.pack_reserve + 20:
      log(f'{",".join(group)}: no time left; rerun the command to continue')
      ok = False
      continue
    log(f'{",".join(group)}: start ({left():.0f} s left)')
    if group[0] in RUN_STAGES:
      queue = [(s, v, seed) for s in group for v in RUN_STAGES[s][0]
               for seed in (ARGS.seeds or RUN_STAGES[s][1])
               if not ARGS.variants or v in ARGS.variants]
      Table1().run([(v, seed) for _, v, seed in queue])
      results = {s: all(finished(os.path.join(ARGS.runs, f'm30k-{v}-s{seed}'))
                        for t, v, seed in queue if t == s) for s in group}
    else:
      results = {group[0]: globals()[f'stage_{group[0]}']()}
    for stage, success in results.items():
      log(f'{stage}: {"done" if success else "NOT finished"} ({left():.0f} s left)')
      ok &= success
      if success and stage in ('smoke', 'table2'):  # Runs are checked one by one.
        with open(done_file, 'a') as f:
          f.write(stage + '\n')
  return 0 if ok else 1


if __name__ == '__main__':
  sys.exit(main())
