"""The GPU job in 15-minute windows: Table 1 first, results that add up.

A window is `--budget` minutes (15) of device time on a fresh machine: its
start (1-2 minutes), two commands and the time around them. Per window:

  python3 scripts/gpu_job.py --out=$OUT              # command 1 (at most 540 s)
  python3 scripts/gpu_job.py --out=$OUT --command=2  # command 2 (150 s), same machine
  python3 scripts/gpu_job.py --collect=DIR           # here: DIR/results.tgz into results/
  python3 scripts/gpu_job.py --plan                  # what the next window delivers
  python3 scripts/gpu_job.py --check_carry           # sizes of .whl/ .data/ .peers/

Work comes in units (UNITS), most valuable first: Table 1 seed 0 (mha, mqa,
gqa2 trained side by side on the one GPU, then each scored on dev, test2016
and newstest2014, greedy and beam 4, with its parameters best on dev), Table 2
on the current code, the implementation comparison, then seeds 1 and 2,
uptraining, the reduced-head and local rows, the Flax WMT example and Table
2's other rows. A command runs, in that order, the first unit whose
estimated time fits what is left of it; consecutive Table 1 units train side
by side when together they fit.

Results add up. The job skips what `results/` (the repository's, as sent)
and this machine's own staging folder already hold for this kind of device:

  results/table1/<kind>/<run>/   config.json metrics.jsonl launches.jsonl
                                 best.json bleu.json summary.json train.log
                                 decode.log (uptrain.json for uptrained runs)
  results/table2/<kind>/         benchmark.jsonl, peer_flax_wmt.jsonl (every
                                 row names its device and its `job_part`)
  results/gpu_times.jsonl        how long each unit took, per device and window
  results/windows/<window>/      env.txt and each command's job log

Each finished run or part is staged under --runs (runs/gpu/results/) and at
once packed, atomically, into $OUT/results.tgz; $OUT also gets job.log,
env.txt and logs.tgz (the workdirs' logs, finished or not). A command
stopped at any point so leaves everything finished so far. `--collect` merges a
results.tgz into results/ (new files, new JSON lines; a finished run already
there is kept). Command 2 continues on the same machine: a training stopped
at command 1's end (SIGTERM: it checkpoints) resumes from its workdir; on a
fresh machine work continues from results/ alone.

Estimates: results/gpu_times.jsonl once the device has measured times; until
then the H100's (H100 below) and guesses, and `--plan` says which. `--tiny`
runs every unit on a CPU in minutes (`,tiny` configs, the generated numbers
task, tiny benchmark shapes) with its own device kind, `cpu-tiny`.
"""

import argparse
import dataclasses
import datetime
import glob
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 1 << 20
CARRY = ('.whl', '.data', '.peers')  # Git-ignored inputs the device needs.
CARRY_LIMIT_MIB = 64  # The device tool's limit: working tree and carried paths.
# A window: a fresh machine's start, commands of at most COMMAND_MAX_S with
# BETWEEN_S for transfers and collecting between them, IDLE_S after the last.
START_S, BETWEEN_S, IDLE_S, COMMAND_MAX_S = 120, 60, 30, 540
MARGIN_S = 15  # The job ends this long before its command's limit.
CORE = ('mha', 'mqa', 'gqa2')
# Table 1 trains with the first of these that the smoke test ran on the machine.
SEQ_IMPLS = ('cudnn', 'xla')
SEQ_FLAG = '--config.seq_attention_impl={}'  # train.py's flag for one of them.
CUDNN_FLAG = SEQ_FLAG.format('cudnn')
UPTRAIN_SOURCE, UPTRAIN_KV, UPTRAIN_FRACTION = 'mha-s0', {'mqa': 1, 'gqa2': 2}, 0.05
# Scored per run: dev, test2016 and newstest2014 (--tiny: the numbers test
# split again, under another name), greedy and beam 4.
EXTRA_TEST = {False: 'newstest2014=wmt14_ende_eval/newstest2014', True: 'extra=test'}
RUN_FILES = ('config.json', 'metrics.jsonl', 'launches.jsonl', 'bleu.json', 'summary.json',
             'train.log', 'decode.log', 'uptrain.json')
LOG_SKIP = ('checkpoints', 'checkpoints_damaged', 'best', 'data', 'hyps', 'spm.model',
            'train.lock', 'jax_cache', 'results')


def side_by_side(one: Callable[[str], None], names: Sequence[str],
                 results: dict[str, bool]) -> bool:
  """Runs `one(name)` for every name at once, in threads; whether all of them
  recorded success in `results`."""
  threads = [threading.Thread(target=one, args=(n,)) for n in names]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  return all(results.get(n, False) for n in names)


@dataclasses.dataclass(frozen=True)
class Unit:
  """What a command starts as one piece: it makes the results `names`."""
  id: str
  kind: str  # smoke, table1, uptrain, table2, peer
  names: tuple[str, ...]  # Run names (table1, uptrain) or Table 2 parts.


def _runs(seed: int, variants=CORE) -> tuple[str, ...]:
  return tuple(f'{v}-s{seed}' for v in variants)


UNITS = (
    Unit('smoke', 'smoke', ('smoke',)),
    Unit('core-s0', 'table1', _runs(0)),
    Unit('table2-main', 'table2', ('main',)),
    Unit('table2-impls', 'table2', ('impls',)),
    Unit('core-s1', 'table1', _runs(1)),
    Unit('core-s2', 'table1', _runs(2)),
    Unit('uptrain', 'uptrain', tuple(f'{UPTRAIN_SOURCE}-to-{v}' for v in UPTRAIN_KV)),
    Unit('heads', 'table1', _runs(0, ('mha_h1', 'mha_h4'))),
    Unit('local', 'table1', _runs(0, ('mha_local', 'mqa_local'))),
    Unit('peer', 'peer', ('peer',)),
    Unit('table2-train', 'table2', ('train',)),
    Unit('table2-local', 'table2', ('local',)),
    Unit('table2-batches', 'table2', ('batches',)),
    Unit('table2-pallas', 'table2', ('pallas',)),
    Unit('table2-beam', 'table2', ('beam',)),
    Unit('table2-seq', 'table2', ('seq',)),
    Unit('table2-gemm', 'table2', ('gemm',)),
    Unit('table2-norm', 'table2', ('norm',)),
)
# Table 2 parts: `decode.py --mode=benchmark` flags at the paper's shape
# (configs/paper.py, random weights, bf16; beam 4 at 256 sentences).
BENCH = {
    'main': ('--variants=mha,mqa,gqa2', '--bench_batch=1024',
             '--bench_kinds=encoder,greedy,beam4'),
    'impls': ('--variants=mha,mqa', '--bench_batch=1024', '--bench_kinds=greedy',
              '--bench_impls=xla/BKLH,xla_reduce/BKLH,cudnn/BLKH,xla/BLKH',
              '--bench_profile'),
    'pallas': ('--variants=mha,mqa,gqa2', '--bench_batch=1024', '--bench_kinds=greedy',
               '--bench_impls=xla_reduce/BKLH,xla_reduce/BKLH/pallas,pallas/BKLH/pallas',
               '--bench_profile'),
    'beam': ('--variants=mha,mqa,gqa2', '--bench_kinds=beam4', '--bench_cache_modes=padded',
             '--bench_impls=xla/BKLH,xla_reduce/BKLH,pallas/BKLH,pallas/BKLH/pallas',
             '--bench_beam_caches=reorder,pointers', '--bench_profile'),
    'train': ('--variants=mha,mqa,gqa2', '--bench_kinds=train'),
    'seq': ('--variants=mha,mqa', '--bench_kinds=encoder,train', '--bench_batch=1024',
            '--bench_seq_impls=cudnn'),
    'gemm': ('--variants=mha,mqa,gqa2', '--bench_batch=1024', '--bench_kinds=greedy,beam4',
             '--bench_cache_modes=padded', '--bench_impls=pallas/BKLH/pallas',
             '--bench_beam_caches=pointers', '--bench_gemm_impls=cublas', '--bench_profile'),
    'norm': ('--variants=mha,mqa,gqa2', '--bench_batch=1024', '--bench_kinds=greedy,beam4',
             '--bench_cache_modes=padded', '--bench_impls=pallas/BKLH/pallas',
             '--bench_beam_caches=pointers', '--bench_gemm_impls=cublas',
             '--bench_norm_impls=pallas', '--bench_profile'),
    'local': ('--variants=mha_local,mqa_local', '--bench_batch=1024',
              '--bench_kinds=greedy,beam4'),
    'batches': ('--variants=mha,mqa,gqa2', '--bench_batch=128,8',
                '--bench_kinds=encoder,greedy'),
}
TINY_BENCH = {'--bench_batch=1024': '--bench_batch=8', '--bench_batch=128,8': '--bench_batch=4,2'}
TINY_BENCH_FLAGS = ('--bench_src_len=8', '--bench_tgt_len=8', '--bench_reps=2',
                    '--bench_beam_batch=4', '--bench_train_shape=4,16')
TINY_PEER = ('--batch=8,4', '--beam=1,4', '--src_len=8', '--tgt_len=8', '--d_model=64',
             '--d_ff=128', '--layers=2', '--vocab=512', '--train_shape=4,16')
# Steps of a Table 1 run: configs/multi30k.py's recipe, 40 epochs of 63 steps.
STEPS = {False: 2520, True: 20}
# Estimates until the device has times of its own. Measured on an H100
# (2026-11-23, one process alone): configs/multi30k.py:mha in bf16 ran 29
# steps/s, a run's fixed costs (vocabulary, tokenising, compiling, dev
# evaluations) took about 80 s; Table 2's parts took 125 s (main), 160 s (the
# Flax example) and 125 s (train); the implementation comparison about 120 s.
# Guesses: scoring a run, converting, the smoke test, the local, batch and
# Pallas parts (the comparison's four pairs then had pallas/BKLH where
# xla_reduce/BKLH is now: about 15 s a row, so 135 s for the Pallas part's
# nine), and for the parts that profile (--bench_profile) about 1.5 s more
# per padded decoder row: impls 120 + 12, pallas 135 + 14; the beam part's
# 24 beam-4 rows (four impls, both beam caches) about 15 s each, 360 + 36;
# the seq part (mha's and mqa's training step and encoder with cuDNN's
# attention) two training rows of about 42 s (the train part's 125 s of
# three) and two encoder rows, about 100 s; the GEMM part's six decoder rows
# (cuBLAS's GEMMs) about 15 s each, 90 + 9, and the norm part's six (the same
# rows, LayerNorms folded) as long.
H100 = dict(step_s=1 / 29, fixed_s=80, decode_s=90, convert_s=20, smoke=30, main=125,
            impls=132, peer=160, train=125, local=90, batches=90, pallas=149, beam=396,
            seq=100, gemm=99, norm=99)
H100_GUESSED = {'decode_s', 'convert_s', 'smoke', 'local', 'batches', 'pallas', 'impls',
                'beam', 'seq', 'gemm', 'norm'}
TINY = dict(step_s=0.06, fixed_s=20, decode_s=20, convert_s=10, smoke=30, main=50,
            impls=40, peer=30, train=15, local=30, batches=25, pallas=15, beam=85, seq=15,
            gemm=15, norm=15)


class JobError(Exception):
  """A user error: one line, exit code 2."""


# ---------------------------------------------------------------- estimates


class Estimates:
  """Seconds per unit on a device kind, from its measured times or fallbacks.

  Runs side by side share the GPU: each of n runs is taken to step sqrt(n)
  times slower than alone (an assumption; measured step times of n runs side
  by side give the rate alone through the same rule).
  """

  def __init__(self, rows: list[dict], kind: str, tiny: bool):
    self.v = dict(TINY if tiny else H100)
    fallback = 'tiny guess' if tiny else 'H100 estimate'
    self.src = {k: 'guess' if (k in H100_GUESSED and not tiny) else fallback for k in self.v}
    mine = [r for r in rows if r.get('device_kind') == kind and r.get('ok')]
    for key in ('smoke', 'main', 'impls', 'peer', 'train', 'local', 'batches',
                'pallas', 'beam', 'seq', 'gemm', 'norm'):
      item = 'smoke' if key == 'smoke' else f'table2/{key}'
      self._measured(key, [r['seconds'] for r in mine if r.get('item') == item], kind)
    runs = [r for r in mine if r.get('step_s') and r.get('steps_run')]
    self._measured('step_s', [r['step_s'] / math.sqrt(r['side_by_side']) for r in runs], kind)
    self._measured('fixed_s', [max(r['train_s'] - r['steps_run'] * r['step_s'], 0)
                               for r in runs], kind)
    self._measured('decode_s', [r['decode_s'] for r in mine if r.get('decode_s')], kind)
    self._measured('convert_s', [r['convert_s'] for r in mine if r.get('convert_s')], kind)

  def _measured(self, key: str, values: list[float], kind: str) -> None:
    if values:
      self.v[key], self.src[key] = statistics.median(values), f'measured on {kind}'

  def table1(self, remaining: list[int]) -> float:
    """Runs side by side, with `remaining` steps each, then scored."""
    train = max(remaining) * self.v['step_s'] * math.sqrt(len(remaining))
    return (self.v['fixed_s'] + train if max(remaining) else 0) + self.v['decode_s']

  def uptrain(self, steps: int, source_ready: bool) -> float:
    """The source trained (unless ready), converted, fine-tuned side by side, scored."""
    source = 0 if source_ready else self.v['fixed_s'] + steps * self.v['step_s']
    return source + self.v['convert_s'] + self.table1([max(1, round(
        UPTRAIN_FRACTION * steps))] * len(UPTRAIN_KV))

  def source(self, kind: str) -> str:
    """Where a Table 1 or uptrain unit's estimate comes from."""
    keys = {'table1': ('step_s', 'fixed_s', 'decode_s'),
            'uptrain': ('step_s', 'fixed_s', 'convert_s', 'decode_s')}.get(kind)
    if keys:
      return ', '.join(f'{k} {self.src[k]}' for k in keys)
    return ''

  def part_source(self, part: str) -> str:
    """Where a Table 2 part's (or the smoke test's) estimate comes from."""
    return self.src[part]


def choose(todo: list[Unit], left: float, estimate) -> tuple[Unit, float] | None:
  """The first unit of `todo` whose estimate fits `left` seconds; consecutive
  Table 1 units after it join it, side by side, while together they fit."""
  for i, unit in enumerate(todo):
    seconds = estimate(unit)
    if seconds > left:
      continue
    if unit.kind == 'table1':
      for nxt in todo[i + 1:]:
        if nxt.kind != 'table1':
          break
        merged = Unit(f'{unit.id}+{nxt.id}', 'table1', unit.names + nxt.names)
        together = estimate(merged)
        if together > left:
          break
        unit, seconds = merged, together
    return unit, seconds
  return None


def command_lengths(budget_min: float) -> list[int]:
  """Seconds of each command that a window of `budget_min` minutes holds."""
  left, out = budget_min * 60 - START_S - IDLE_S, []
  while left >= 60:
    out.append(int(min(COMMAND_MAX_S, left)))
    left -= out[-1] + BETWEEN_S
  return out


# ---------------------------------------------------------------- results/


def read_jsonl(path: str) -> list[dict]:
  """The JSON lines of `path` (none if absent); a line cut short is skipped."""
  rows = []
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        try:
          rows.append(json.loads(line))
        except ValueError:
          pass
  return rows


def scored(run_dir: str, tiny: bool) -> bool:
  """Whether bleu.json holds every split and search a Table 1 run is scored on."""
  try:
    with open(os.path.join(run_dir, 'bleu.json')) as f:
      bleu = json.load(f)
  except (OSError, ValueError):
    return False
  names = ('dev', 'test', EXTRA_TEST[tiny].partition('=')[0])
  return all(f'{n}/{s}' in bleu for n in names for s in ('greedy', 'beam4'))


def finished(roots: list[str], kind: str, tiny: bool) -> set[str]:
  """Run names and Table 2 parts that any of the results folders `roots` holds."""
  done = set()
  for root in roots:
    t1 = os.path.join(root, 'table1', kind)
    if os.path.isdir(t1):
      done |= {n for n in os.listdir(t1) if scored(os.path.join(t1, n), tiny)}
    for name in ('benchmark.jsonl', 'peer_flax_wmt.jsonl'):
      done |= {r['job_part'] for r in read_jsonl(os.path.join(root, 'table2', kind, name))
               if r.get('job_part')}
  return done


def todo_units(done: set[str], wanted: list[str], variants: list[str]) -> list[Unit]:
  """UNITS less what is done, restricted to --units and --variants."""
  out = []
  for u in UNITS:
    if u.kind == 'smoke' or (wanted and u.id not in wanted):
      continue
    names = tuple(n for n in u.names if n not in done and (
        not variants or u.kind not in ('table1', 'uptrain') or
        n.rpartition('-s')[0] in variants or n.rpartition('-to-')[2] in variants))
    if names:
      out.append(dataclasses.replace(u, names=names))
  return out


# ---------------------------------------------------------------- the plan


def plan(args) -> int:
  """Prints what the next windows deliver given results/, the carry and the commands."""
  kind = args.device or ('cpu-tiny' if args.tiny else 'h200')
  est = Estimates(read_jsonl(os.path.join(args.results, 'gpu_times.jsonl')), kind, args.tiny)
  done = finished([args.results], kind, args.tiny)
  lengths = command_lengths(args.budget)
  steps = args.steps or STEPS[args.tiny]
  print(f'Window plan for {kind}: {args.budget:g} min of device time = a fresh machine\'s '
        f'start (~{START_S} s), commands of ' + ', '.join(f'{s} s' for s in lengths) +
        f' ({BETWEEN_S} s between them), {IDLE_S} s idle after.')
  print(f'{args.results} holds for {kind}: ' + (', '.join(sorted(done)) or 'nothing') + '.')
  peers = os.path.exists(os.path.join(ROOT, '.peers', 'flax_wmt_bench.py'))
  windows = []
  for _ in range(8):
    trained, rows = set(), []
    for c, length in enumerate(lengths):
      left, at = length - MARGIN_S, 0.0
      if c == 0:
        rows.append((c, at, UNITS[0], est.v['smoke'], est.src['smoke']))
        at += est.v['smoke']
      while True:
        todo = [u for u in todo_units(done, args.units, args.variants)
                if u.kind != 'peer' or peers]

        def estimate(u):
          if u.kind == 'table1':
            return est.table1([steps] * len(u.names))
          if u.kind == 'uptrain':
            return est.uptrain(steps, UPTRAIN_SOURCE in trained)
          return est.v[u.names[0]]
        pick = choose(todo, left - at, estimate)
        if pick is None:
          break
        unit, seconds = pick
        source = (est.source(unit.kind) if unit.kind in ('table1', 'uptrain')
                  else est.part_source(unit.names[0]))
        rows.append((c, at, unit, seconds, source))
        at += seconds
        done |= set(unit.names)
        trained |= set(unit.names) | ({UPTRAIN_SOURCE} if unit.kind == 'uptrain' else set())
    if len(rows) == 1:
      break
    windows.append(rows)
  if not windows:
    print(f'\nNothing left that a window runs: {args.results} holds every unit for {kind}.')
  for w, rows in enumerate(windows, 1):
    if w == 1:
      for c, length in enumerate(lengths):
        print(f'\nwindow 1, command {c + 1} ({length} s; the job stops at {length - MARGIN_S} s)')
        print(f'  {"at s":>5} {"est. s":>6}  {"unit":22} what  [estimate from]')
        for cc, at, unit, seconds, source in rows:
          if cc == c:
            print(f'  {at:5.0f} {seconds:6.0f}  {unit.id:22} {describe(unit, steps)}  [{source}]')
        if not any(cc == c for cc, *_ in rows):
          print('  nothing left that fits')
    else:
      print(f'window {w}: ' + '; '.join(
          f'{u.id} ({len(u.names)} side by side)' if u.kind == 'table1' else u.id
          for _, _, u, _, _ in rows[1:]))
    if w == 1 and len(windows) > 1:
      print('\nthen, by the same estimates:')
  core, had = {n for s in range(3) for n in _runs(s)}, finished([args.results], kind, args.tiny)
  when = next((w for w in range(1, len(windows) + 1)
               if core <= finished_by(windows[:w]) | had), None)
  left_over = [u.id for u in todo_units(done, args.units, args.variants)]
  print(f'\nTable 1 core (mha, mqa, gqa2 x seeds 0, 1, 2): ' +
        ('already in results/' if core <= had else f'complete after window {when}' if when
         else 'not complete in 8 windows') +
        (f'; never fits a window: {", ".join(left_over)}' if left_over else '') +
        ('' if peers else '; no .peers/: the Flax WMT example is left out') + '.')
  print(f'Steps per Table 1 run: {steps}' + ('' if args.steps or args.tiny else
        ' (configs/multi30k.py: 40 epochs of 63 steps)') + '.')
  ok = print_carry()
  print('\nThe window, with the device tool (start command 2 within 30 s of command 1\'s '
        'reply, while the machine is warm):')
  for c, length in enumerate(lengths, 1):
    cmd = 'python3 scripts/gpu_job.py --out=$OUT' + (f' --command={c}' if c > 1 else '')
    print(f'  run(command="{cmd}", carry={json.dumps(list(CARRY))}, timeout_s={length})')
    print('  python3 scripts/gpu_job.py --collect=<files_at of that reply>')
  print('  give_back(), then commit results/')
  return 0 if ok else 2


def finished_by(windows) -> set[str]:
  """Results that the planned `windows` make."""
  return {n for rows in windows for _, _, u, _, _ in rows for n in u.names}


def describe(unit: Unit, steps: int) -> str:
  """One line on what a unit does, for the plan."""
  if unit.kind == 'smoke':
    return 'versions, devices, 20 tiny steps'
  if unit.kind == 'table1':
    return f'Table 1: {", ".join(unit.names)} side by side, {steps} steps, scored'
  if unit.kind == 'uptrain':
    return (f'{UPTRAIN_SOURCE} to {"/".join(UPTRAIN_KV)}, {UPTRAIN_FRACTION:.0%} of its '
            'steps, scored (trains its source first on a fresh machine)')
  if unit.kind == 'peer':
    return 'the Flax WMT example at the paper\'s shape'
  return 'Table 2: ' + ' '.join(f.lstrip('-') for f in BENCH[unit.names[0]])


def carry_sizes(root: str) -> dict[str, float]:
  """MiB of each carried folder (None if missing) and of the working tree."""
  def size(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path)
               for f in fs if not os.path.islink(os.path.join(d, f))) / MIB
  out = {c: size(os.path.join(root, c)) if os.path.isdir(os.path.join(root, c)) else None
         for c in CARRY}
  files = subprocess.run(['git', 'ls-files', '-z', '-co', '--exclude-standard'], cwd=root,
                         capture_output=True, text=True).stdout.split('\0')
  out['working tree'] = sum(os.path.getsize(os.path.join(root, f)) for f in files
                            if f and os.path.isfile(os.path.join(root, f))) / MIB
  return out


def print_carry(root: str = ROOT, limit_mib: float = CARRY_LIMIT_MIB) -> bool:
  """Prints what travels to the device; False if over the limit."""
  sizes = carry_sizes(root)
  total = sum(v or 0 for v in sizes.values())
  print(f'\nWhat travels (limit {limit_mib:g} MiB): ' + ', '.join(
      f'{k} ' + ('MISSING (bash scripts/fetch_wheels.sh)' if v is None else f'{v:.1f} MiB')
      for k, v in sizes.items()) + f'; total {total:.1f} MiB' +
      (': OVER THE LIMIT' if total > limit_mib else ': fits'))
  return total <= limit_mib


# ---------------------------------------------------------------- collect


def collect(src: str, results: str) -> int:
  """Merges `src`/results.tgz (one command's files) into `results`."""
  tgz = os.path.join(src, 'results.tgz')
  if not os.path.isfile(tgz):
    raise JobError(f'{tgz} not found: --collect takes the folder holding a window\'s files')
  counts = {'added': 0, 'grown': 0, 'unchanged': 0, 'kept': 0}
  with tempfile.TemporaryDirectory() as tmp:
    try:
      with tarfile.open(tgz) as tar:
        tar.extractall(tmp, members=[m for m in tar.getmembers() if m.isfile()],
                       filter='data')
    except (tarfile.TarError, OSError) as e:
      raise JobError(f'{tgz}: {e}') from None
    for d, _, files in sorted(os.walk(tmp)):
      for f in sorted(files):
        rel = os.path.relpath(os.path.join(d, f), tmp)
        counts[merge_file(os.path.join(tmp, rel), os.path.join(results, rel), results,
                          rel)] += 1
  logs = os.path.join(src, 'logs.tgz')
  if os.path.isfile(logs):
    dest = os.path.join(os.path.dirname(os.path.abspath(results)), 'runs', 'collected',
                        time.strftime('%Y%m%d-%H%M%S'))
    with tarfile.open(logs) as tar:
      tar.extractall(dest, members=[m for m in tar.getmembers() if m.isfile()],
                     filter='data')
    print(f'the workdirs\' logs: {dest}')
  print(f'collected {tgz} into {results}: ' + ', '.join(f'{v} {k}' for k, v in counts.items()))
  return 0


def merge_file(new: str, old: str, results: str, rel: str) -> str:
  """One file into results/: added, grown (JSON lines or a log that grew),
  unchanged, or kept (a finished run already there, or a differing file)."""
  with open(new, 'rb') as f:
    data = f.read()
  parts = rel.split(os.sep)
  if parts[0] == 'table1' and len(parts) == 4 and os.path.exists(old):
    run = os.path.join(results, *parts[:3])
    if scored(run, parts[1].endswith('-tiny')):  # A finished run stays as it is.
      return 'unchanged' if _read(old) == data else 'kept'
  if not os.path.exists(old):
    _write(old, data)
    return 'added'
  have = _read(old)
  if have == data:
    return 'unchanged'
  if rel.endswith('.jsonl'):
    lines = set(have.splitlines())
    extra = [line for line in data.splitlines() if line.strip() and line not in lines]
    if extra:
      _write(old, have.rstrip(b'\n') + b'\n' + b'\n'.join(extra) + b'\n' if have.strip()
             else b'\n'.join(extra) + b'\n')
      return 'grown'
    return 'unchanged'
  if data.startswith(have):  # A log that grew.
    _write(old, data)
    return 'grown'
  print(f'kept {old}: the window\'s copy differs')
  return 'kept'


def _read(path: str) -> bytes:
  with open(path, 'rb') as f:
    return f.read()


def _write(path: str, data: bytes) -> None:
  """Replaces `path` with `data` atomically. Not `mqa_flax.files`: the job
  imports nothing of the package, which may need wheels it installs first."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + '.tmp'
  with open(tmp, 'wb') as f:
    f.write(data)
  os.replace(tmp, path)


# ---------------------------------------------------------------- the job


class Job:
  """One command on the device: units in order until its deadline."""

  def __init__(self, args):
    self.args, self.tiny = args, args.tiny
    os.chdir(ROOT)
    self.start = time.time()
    lengths = command_lengths(args.budget)
    if args.deadline is None and args.command > len(lengths):
      raise JobError(f'--command={args.command}: a {args.budget:g}-minute window holds '
                     f'{len(lengths)} command(s)')
    self.end = self.start + (args.deadline if args.deadline is not None
                             else lengths[args.command - 1] - MARGIN_S)
    self.stop_lead = 8 if self.tiny else 25  # Trainings need this to checkpoint.
    # Paths under the repository stay relative: they appear in the runs' commands.
    rel = lambda p: os.path.relpath(p, ROOT) if os.path.abspath(p).startswith(ROOT + os.sep) else p
    self.out, self.runs = args.out, rel(args.runs)
    self.stage = os.path.join(self.runs, 'results')
    self.work = os.path.join(self.runs, 'work')
    self.lock, self.children = threading.RLock(), set()
    self.failed: set[str] = set()
    self.commit = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=ROOT, text=True,
                                 capture_output=True).stdout.strip() or None
    for d in (self.out, self.stage, self.work):
      os.makedirs(d, exist_ok=True)
    self.env = dict(os.environ, PYTHONUNBUFFERED='1', JAX_COMPILATION_CACHE_DIR=os.path.join(
        self.runs, 'jax_cache'))
    if self.tiny:
      self.env['JAX_PLATFORMS'] = 'cpu'

  # -- plumbing

  def left(self) -> float:
    """Seconds until this command's job must end."""
    return self.end - time.time()

  def log(self, msg: str) -> None:
    """A timestamped line on stdout and in $OUT/job.log."""
    line = f'{datetime.datetime.now(datetime.timezone.utc):%H:%M:%S} {msg}'
    with self.lock:
      print(line, flush=True)
      with open(os.path.join(self.out, 'job.log'), 'a') as f:
        f.write(line + '\n')

  def sh(self, cmd: list[str], logfile: str, stop_at: float | None = None,
         env: dict | None = None) -> int:
    """Runs cmd, its output appended to logfile; SIGTERM at `stop_at` (default
    3 s before the job's end), SIGKILL at the end."""
    with open(logfile, 'a') as out:
      proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                              env=env or self.env)
    with self.lock:
      self.children.add(proc)
    try:
      for at, sig in ((min(stop_at or self.end - 3, self.end), signal.SIGTERM),
                      (self.end, signal.SIGKILL)):
        try:
          return proc.wait(timeout=max(at - time.time(), 0.1))
        except subprocess.TimeoutExpired:
          proc.send_signal(sig)
      return proc.wait()
    finally:
      with self.lock:
        self.children.discard(proc)

  def on_sigterm(self, *_) -> None:
    """Stops everything now: trainings checkpoint, nothing new starts."""
    self.end = time.time()
    with self.lock:
      for proc in self.children:
        proc.send_signal(signal.SIGTERM)

  def python(self, *args: str) -> list[str]:
    """A command line run by this job's Python."""
    return [sys.executable, *args]

  def pack(self) -> None:
    """$OUT/results.tgz (everything staged) and logs.tgz, each written atomically."""
    with self.lock:
      job_log = os.path.join(self.out, 'job.log')
      if os.path.exists(job_log):
        dest = os.path.join(self.stage, 'windows', self.window, f'job-c{self.n}.log')
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copy(job_log, dest)
      self._tgz('results.tgz', self.stage, lambda name: True)
      self._tgz('logs.tgz', self.runs, lambda name: not (
          set(name.split('/')) & set(LOG_SKIP) or name.split('/')[-1].startswith('events.')))

  def _tgz(self, name: str, root: str, keep) -> None:
    tmp = os.path.join(self.out, f'.{name}.tmp')
    with tarfile.open(tmp, 'w:gz') as tar:
      for d, dirs, files in os.walk(root):
        dirs.sort()
        for f in sorted(files):
          rel = os.path.relpath(os.path.join(d, f), root)
          if keep(rel.replace(os.sep, '/')) and not f.endswith('.tmp'):
            tar.add(os.path.join(d, f), arcname=rel)
    os.replace(tmp, os.path.join(self.out, name))

  def record(self, item: str, seconds: float, ok: bool, **fields) -> None:
    """One line of gpu_times.jsonl: how long `item` took on this device."""
    row = dict(item=item, device_kind=self.kind, device=self.machine['device'],
               window=self.window, command=self.n, seconds=round(seconds, 1), ok=ok,
               date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
               git_commit=self.commit, **fields)
    with self.lock:
      with open(os.path.join(self.stage, 'gpu_times.jsonl'), 'a') as f:
        f.write(json.dumps(row) + '\n')

  # -- the machine

  def setup(self) -> None:
    """Wheels the image lacks; this machine's window id, device and command count."""
    try:
      # The job itself runs without them; its subprocesses need them.
      import ml_collections  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
      import tensorboardX  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    except ImportError:
      wheels = sorted(glob.glob(os.path.join(ROOT, '.whl', '*.whl')))
      if not wheels:
        raise JobError('ml_collections or tensorboardX is missing and .whl/ is empty: '
                       'run bash scripts/fetch_wheels.sh') from None
      site = '/tmp/mqa_flax_site'
      subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '--no-index',
                      '--no-deps', '--no-compile', '--upgrade', '--target', site, *wheels],
                     check=True)
      self.env['PYTHONPATH'] = os.pathsep.join(filter(None, [site, self.env.get('PYTHONPATH')]))
    path = os.path.join(self.runs, 'machine.json')
    try:
      with open(path) as f:
        self.machine = json.load(f)
    except (OSError, ValueError):
      self.machine = {'window': time.strftime('%Y%m%d-%H%M%S', time.gmtime()), 'commands': 0}
    if 'device' not in self.machine:
      code = 'import jax; print(jax.devices()[0].device_kind)'
      proc = subprocess.run(self.python('-c', code), cwd=ROOT, env=self.env, text=True,
                            capture_output=True, timeout=max(self.left(), 1))
      if proc.returncode:
        raise RuntimeError(f'jax found no device: {proc.stderr[-2000:]}')
      self.machine['device'] = proc.stdout.strip().splitlines()[-1]
    self.machine['commands'] += 1
    self.save_machine()
    self.window, self.n = self.machine['window'], self.machine['commands']
    self.kind = device_kind(self.machine['device'], self.tiny)
    self.est = Estimates(read_jsonl(os.path.join(self.args.results, 'gpu_times.jsonl')) +
                         read_jsonl(os.path.join(self.stage, 'gpu_times.jsonl')),
                         self.kind, self.tiny)

  def smoke(self) -> bool:
    """env.txt (versions, devices, nvidia-smi, commit) and a 20-step tiny
    training, with cuDNN's attention over whole sequences (head_dim 8, as
    cuDNN needs); where that fails, with XLA's. Training with cuDNN first
    compares its gradients with XLA's and stops where they differ
    (`train_lib.Trainer.check_seq_attention`). Table 1 then trains with the
    one that ran (`seq_attention_impl` in machine.json and each run's
    config.json; each run checks again at its own shape)."""
    t0 = time.time()
    env_txt = os.path.join(self.out, 'env.txt')
    code = ('import sys, jax, flax, optax, orbax.checkpoint as o; print("python", '
            'sys.version.split()[0], "jax", jax.__version__, "flax", flax.__version__, '
            '"optax", optax.__version__, "orbax", o.__version__, jax.devices())')
    self.sh(self.python('-c', code), env_txt)
    if shutil.which('nvidia-smi'):
      self.sh(['nvidia-smi'], env_txt)
    with open(env_txt, 'a') as f:
      f.write(f'commit {self.commit}\n')
    dest = os.path.join(self.stage, 'windows', self.window)
    os.makedirs(dest, exist_ok=True)
    shutil.copy(env_txt, dest)
    ok = False
    for impl in SEQ_IMPLS:
      wd = os.path.join(self.work, f'smoke-{impl}')
      shutil.rmtree(wd, ignore_errors=True)
      ok = self.sh(self.python('train.py', '--config=configs/multi30k.py:mha,tiny',
                               f'--workdir={wd}', '--config.num_train_steps=20',
                               '--config.model.head_dim=8',
                               SEQ_FLAG.format(impl)),
                   os.path.join(self.runs, 'smoke.log')) == 0
      self.log(f'smoke with seq_attention_impl={impl}: {"ok" if ok else "FAILED"}')
      if ok:
        self.machine['seq_attention_impl'] = impl
        break
    self.record('smoke', time.time() - t0, ok,
                seq_attention_impl=self.machine.get('seq_attention_impl'))
    self.machine['smoke'] = ok
    self.save_machine()
    self.pack()
    self.log(f'smoke: {"ok" if ok else "FAILED"} on {self.machine["device"]} '
             f'({time.time() - t0:.0f} s)')
    return ok

  def run(self) -> int:
    """The units, most valuable first, each when its estimate fits the time left."""
    signal.signal(signal.SIGTERM, self.on_sigterm)
    self.setup()
    self.log(f'window {self.window} command {self.n} on {self.machine["device"]} '
             f'({self.kind}): {self.left():.0f} s')
    self.pack()
    if not self.machine.get('smoke') and (not self.args.units or 'smoke' in self.args.units):
      if self.left() < self.est.v['smoke'] or not self.smoke():
        return 1
    while self.left() > 0:
      done = finished([self.args.results, self.stage], self.kind, self.tiny)
      todo = [u for u in todo_units(done, self.args.units, self.args.variants)
              if u.id not in self.failed and self.possible(u)]
      pick = choose(todo, self.left(), self.estimate)
      if pick is None:
        break
      unit, seconds = pick
      self.log(f'{unit.id}: start {", ".join(unit.names)} (estimate {seconds:.0f} s, '
               f'{self.left():.0f} s left)')
      runner = {'table1': self.table1, 'uptrain': self.uptrain, 'table2': self.table2,
                'peer': self.peer}[unit.kind]
      if not runner(unit):
        self.failed |= set(unit.id.split('+'))
    done = finished([self.args.results, self.stage], self.kind, self.tiny)
    rest = todo_units(done, self.args.units, self.args.variants)
    self.log(f'end of command {self.n} ({self.left():.0f} s left); not done: ' +
             (', '.join(u.id for u in rest) or 'nothing'))
    self.pack()
    return 1 if self.failed else 0

  def possible(self, unit: Unit) -> bool:
    """Whether this machine has the unit's inputs (.peers/, .data/)."""
    if unit.kind == 'peer':
      return os.path.exists(os.path.join(ROOT, '.peers', 'flax_wmt_bench.py'))
    if unit.kind in ('table1', 'uptrain') and not self.tiny:
      return os.path.isdir(os.path.join(ROOT, '.data', 'multi30k'))
    return True

  def estimate(self, unit: Unit) -> float:
    """Seconds the unit needs here, counting work done on this machine already."""
    if unit.kind == 'table1':
      return self.est.table1([self.remaining(n) for n in unit.names])
    if unit.kind == 'uptrain':
      return self.est.uptrain(self.steps(), self.trained(os.path.join(
          self.work, UPTRAIN_SOURCE)))
    return self.est.v[unit.names[0]]

  # -- Table 1

  def steps(self) -> int:
    """Steps per Table 1 run, for the estimates."""
    return self.args.steps or STEPS[self.tiny]

  def remaining(self, name: str) -> int:
    """Steps a run still has to train on this machine."""
    wd = os.path.join(self.work, name)
    return 0 if self.trained(wd) else max(self.steps() - latest_step(wd), 0)

  @staticmethod
  def trained(wd: str) -> bool:
    """Whether `wd` holds a checkpoint at its last step and best parameters."""
    try:
      with open(os.path.join(wd, 'config.json')) as f:
        total = json.load(f)['num_train_steps']
    except (OSError, ValueError, KeyError):
      return False
    return latest_step(wd) >= total and os.path.exists(os.path.join(wd, 'best', 'best.json'))

  def train_flags(self, variant: str, seed: int) -> list[str]:
    """train.py flags of a Table 1 run."""
    flags = [f"--config=configs/multi30k.py:{variant}{',tiny' if self.tiny else ''}",
             f'--config.seed={seed}', self.seq_flag()]
    if not self.tiny:
      flags.append('--config.data.data_dir=.data')
    if self.args.steps:  # A window's own length: config.json records it.
      flags += ['--config.num_epochs=0', f'--config.num_train_steps={self.args.steps}']
    return flags

  def seq_flag(self) -> str:
    """The attention over whole sequences Table 1 trains with on this machine."""
    return SEQ_FLAG.format(self.machine.get('seq_attention_impl', 'xla'))

  def use_xla_attention(self, why: str) -> None:
    """Table 1 trains with XLA's attention on this machine from now on."""
    with self.lock:
      self.machine['seq_attention_impl'] = 'xla'
      self.save_machine()
    self.log(f'seq_attention_impl=cudnn: {why}; training with xla on this machine')

  def save_machine(self) -> None:
    """runs/machine.json: what this machine has run and chosen, for its next command."""
    with open(os.path.join(self.runs, 'machine.json'), 'w') as f:
      json.dump(self.machine, f)

  def side_by_side_env(self, n: int) -> dict:
    """The environment of one of n processes sharing the GPU."""
    env = dict(self.env)
    if n > 1 and not self.tiny:  # The runs share the GPU's memory.
      env['XLA_PYTHON_CLIENT_MEM_FRACTION'] = f'{0.9 / n:.2f}'
    return env

  def train(self, wd: str, flags: list[str], env: dict) -> tuple[bool, float]:
    """Trains (or resumes) in `wd`; (trained, seconds).

    A run with cuDNN's attention that train.py refuses before its first step
    (a user error, such as cuDNN's gradients differing from XLA's) trains
    with XLA's instead, and so does everything after it on this machine."""
    t0 = time.time()
    if not self.trained(wd):
      os.makedirs(wd, exist_ok=True)
      before = latest_step(wd)

      def run(flags):
        return self.sh(self.python('train.py', f'--workdir={wd}', *flags),
                       os.path.join(wd, 'train.log'), self.end - self.stop_lead, env)

      rc = run(flags)
      if rc == 2 and CUDNN_FLAG in flags and latest_step(wd) == before:
        self.use_xla_attention(f'{os.path.basename(wd)} refused it (train.log)')
        rc = run([self.seq_flag() if f == CUDNN_FLAG else f for f in flags])
      if not self.trained(wd):
        self.log(f'{os.path.basename(wd)}: training stopped (rc={rc}) at step '
                 f'{latest_step(wd)}; command 2 on this machine resumes it')
        return False, time.time() - t0
    return True, time.time() - t0

  def score(self, name: str, wd: str, env: dict) -> tuple[bool, float]:
    """decode.py --mode=bleu on every split, greedy and beam 4; (scored, seconds)."""
    t0 = time.time()
    rc = self.sh(self.python('decode.py', f'--workdir={wd}', '--mode=bleu', '--split=dev,test',
                             '--beam_size=1,4', f'--test_sets={EXTRA_TEST[self.tiny]}'),
                 os.path.join(wd, 'decode.log'), env=env)
    if not scored(wd, self.tiny):
      self.log(f'{name}: scoring stopped or failed (rc={rc})')
      return False, time.time() - t0
    return True, time.time() - t0

  def finish_run(self, name: str, wd: str, t0: float, **fields) -> None:
    """Stages a scored run, records its times, packs and says so."""
    dest = os.path.join(self.stage, 'table1', self.kind, name)
    os.makedirs(dest, exist_ok=True)
    for f in RUN_FILES:
      if os.path.exists(os.path.join(wd, f)):
        shutil.copy(os.path.join(wd, f), dest)
    shutil.copy(os.path.join(wd, 'best', 'best.json'), dest)
    step_times = [r['train/step_time'] for r in read_jsonl(os.path.join(wd, 'metrics.jsonl'))
                  if r.get('train/step_time')]
    self.record(f'table1/{name}', time.time() - t0, True,
                step_s=statistics.median(step_times) if step_times else None, **fields)
    self.pack()
    with open(os.path.join(wd, 'bleu.json')) as f:
      bleu = json.load(f)
    self.log(f'done table1/{name}: ' + ', '.join(
        f"{k} {v['bleu_13a']:.2f}" for k, v in sorted(bleu.items())))

  def table1(self, unit: Unit) -> bool:
    """Trains the unit's runs side by side, scoring each as its training ends."""
    env = self.side_by_side_env(len(unit.names))
    results = {}

    def one(name: str) -> None:
      t0, wd = time.time(), os.path.join(self.work, name)
      variant, _, seed = name.rpartition('-s')
      before = latest_step(wd)
      ok, train_s = self.train(wd, self.train_flags(variant, int(seed)) + self.args.train_args,
                               env)
      if ok:
        ok, decode_s = self.score(name, wd, env)
      if ok:
        with open(os.path.join(wd, 'config.json')) as f:
          total = json.load(f)['num_train_steps']
        self.finish_run(name, wd, t0, train_s=round(train_s, 1), decode_s=round(decode_s, 1),
                        steps=total, steps_run=total - before, resumed=before > 0,
                        side_by_side=len(unit.names))
      results[name] = ok
    return side_by_side(one, unit.names, results)

  def uptrain(self, unit: Unit) -> bool:
    """MHA seed 0 (trained here first if this machine lacks it) converted to
    MQA and GQA-2, each fine-tuned for 5% of its steps, side by side, and scored."""
    src = os.path.join(self.work, UPTRAIN_SOURCE)
    retrained = not self.trained(src)
    variant, _, seed = UPTRAIN_SOURCE.rpartition('-s')
    ok, source_s = self.train(src, self.train_flags(variant, int(seed)) + self.args.train_args,
                              self.env)
    if not ok:
      return False
    with open(os.path.join(src, 'config.json')) as f:
      total = json.load(f)['num_train_steps']
    with open(os.path.join(src, 'best', 'best.json')) as f:
      best = json.load(f)
    steps = max(1, round(UPTRAIN_FRACTION * total))
    env = self.side_by_side_env(len(unit.names))
    results = {}

    def one(name: str) -> None:
      t0, wd = time.time(), os.path.join(self.work, name)
      target = name.rpartition('-to-')[2]
      k = UPTRAIN_KV[target]
      convert_s = 0.0
      if not os.path.exists(os.path.join(wd, 'converted.ok')):
        shutil.rmtree(wd, ignore_errors=True)
        rc = self.sh(self.python('-m', 'mqa_flax.convert', f'--from={src}', f'--to={wd}',
                                 f'--num_kv_heads={k}'), os.path.join(self.runs, f'{name}.log'),
                     env=env)
        if rc:
          self.log(f'{name}: conversion failed (rc={rc})')
          results[name] = False
          return
        open(os.path.join(wd, 'converted.ok'), 'w').close()
        convert_s = time.time() - t0
      flags = [f"--config=configs/multi30k.py:mha{',tiny' if self.tiny else ''}",
               f'--config.model.num_kv_heads={k}', f'--config.variant=mha_uptrain_kv{k}',
               '--config.num_epochs=0', f'--config.num_train_steps={steps}',
               f'--config.seed={seed}', self.seq_flag()] + (
                   [] if self.tiny else ['--config.data.data_dir=.data'])
      ok, train_s = self.train(wd, flags, env)
      if ok:
        ok, decode_s = self.score(name, wd, env)
      if ok:
        with open(os.path.join(wd, 'converted_from.json')) as f:
          converted = json.load(f)
        with open(os.path.join(wd, 'uptrain.json'), 'w') as f:
          json.dump(dict(source=UPTRAIN_SOURCE, source_steps=total, source_best=best,
                         source_trained_in_window=self.window if retrained else None,
                         finetune_steps=steps, fraction=UPTRAIN_FRACTION, num_kv_heads=k,
                         converted_from=converted), f, indent=1)
        self.finish_run(name, wd, t0, train_s=round(train_s, 1), decode_s=round(decode_s, 1),
                        convert_s=round(convert_s, 1) or None, steps=steps, steps_run=steps,
                        side_by_side=len(unit.names),
                        source_train_s=round(source_s, 1) if retrained else None)
      results[name] = ok
    return side_by_side(one, unit.names, results)

  # -- Table 2

  def add_rows(self, file: str, rows: list[dict], part: str) -> None:
    """Appends a finished part's rows, tagged with it, to the staged table2 file."""
    dest = os.path.join(self.stage, 'table2', self.kind, file)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    with open(dest, 'a') as f:
      for row in rows:
        f.write(json.dumps(dict(row, job_part=part)) + '\n')

  def table2(self, unit: Unit) -> bool:
    """One benchmark part; its rows count only once the part is complete."""
    part, t0 = unit.names[0], time.time()
    out = os.path.join(self.runs, 'bench', part)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    flags = [TINY_BENCH.get(f, f) for f in BENCH[part]] if self.tiny else list(BENCH[part])
    config = 'configs/paper.py:mha' + (',tiny' if self.tiny else '')
    rc = self.sh(self.python('decode.py', '--mode=benchmark', f'--config={config}',
                             f'--out={out}', *flags, *(TINY_BENCH_FLAGS if self.tiny else ()),
                             *self.args.bench_args),
                 os.path.join(self.runs, 'bench', f'{part}.log'))
    rows = read_jsonl(os.path.join(out, 'benchmark.jsonl'))
    if rc or not rows:
      self.log(f'table2/{part}: stopped or failed (rc={rc}, {len(rows)} rows)')
      self.record(f'table2/{part}', time.time() - t0, False, rc=rc)
      return False
    self.add_rows('benchmark.jsonl', rows, part)
    errors = sum(1 for r in rows if r.get('error'))
    self.record(f'table2/{part}', time.time() - t0, True, rows=len(rows), error_rows=errors)
    self.pack()
    self.log(f'done table2/{part}: {len(rows)} rows ({errors} error rows), '
             f'{time.time() - t0:.0f} s')
    return True

  def peer(self, unit: Unit) -> bool:
    """The Flax WMT example at the same shape on the same machine (.peers/)."""
    t0, script = time.time(), os.path.join('.peers', 'flax_wmt_bench.py')
    cmd = self.python(script, *(TINY_PEER if self.tiny else ()))
    made = dict(command=' '.join(['python', *cmd[1:]]), git_commit=self.commit,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'))
    out = os.path.join(self.runs, 'peer.jsonl')
    with open(out, 'w') as stdout, open(os.path.join(self.runs, 'peer.log'), 'a') as err:
      proc = subprocess.Popen(cmd, cwd=ROOT, stdout=stdout, stderr=err, env=self.env)
      with self.lock:
        self.children.add(proc)
      try:
        rc = proc.wait(timeout=max(self.left(), 0.1))
      except subprocess.TimeoutExpired:
        proc.kill()
        rc = proc.wait()
      finally:
        with self.lock:
          self.children.discard(proc)
    rows = [dict(r, **made) for r in read_jsonl(out) if isinstance(r, dict)]
    if rc or not rows:
      self.log(f'peer: stopped or failed (rc={rc})')
      self.record('table2/peer', time.time() - t0, False, rc=rc)
      return False
    self.add_rows('peer_flax_wmt.jsonl', rows, 'peer')
    self.record('table2/peer', time.time() - t0, True, rows=len(rows))
    self.pack()
    self.log(f'done table2/peer: {len(rows)} rows, {time.time() - t0:.0f} s')
    return True


def latest_step(wd: str) -> int:
  """The newest train checkpoint's step in `wd` (0 if none)."""
  d = os.path.join(wd, 'checkpoints')
  steps = [int(n) for n in os.listdir(d) if n.isdigit()] if os.path.isdir(d) else []
  return max(steps, default=0)


def device_kind(device: str, tiny: bool) -> str:
  """'NVIDIA H200' -> 'h200', 'NVIDIA H100 80GB HBM3' -> 'h100'; --tiny: 'cpu-tiny'."""
  if tiny:
    return 'cpu-tiny'
  for word in device.lower().split():
    if word[:1].isalpha() and word[1:].isdigit() and len(word) >= 3:
      return word
  return '-'.join(''.join(c if c.isalnum() else ' ' for c in device.lower()).split())


class Parser(argparse.ArgumentParser):
  """Usage errors in one line, exit code 2."""

  def error(self, message):
    print(f'error: {message}', file=sys.stderr)
    sys.exit(2)


def main() -> int:
  p = Parser(description=__doc__.split('\n')[0])
  p.add_argument('--out', help="output folder (the device tool's $OUT)")
  p.add_argument('--command', type=int, default=1, help="which of the window's commands")
  p.add_argument('--budget', type=float, default=15, help='minutes of device time per window')
  p.add_argument('--deadline', type=float, help="seconds this command's job may run "
                 '(default: from --budget and --command)')
  p.add_argument('--results', default=os.path.join(ROOT, 'results'),
                 help='results folder: what is there is skipped')
  p.add_argument('--runs', default=os.path.join(ROOT, 'runs', 'gpu'),
                 help="this machine's workdirs and staged results")
  p.add_argument('--units', default='', help='only these units (ids: ' +
                 ','.join(u.id for u in UNITS) + ')')
  p.add_argument('--variants', default='', help='only these variants of Table 1 units')
  p.add_argument('--steps', type=int, help='steps per Table 1 run, a window\'s own recipe '
                 "(default: configs/multi30k.py's 40 epochs)")
  p.add_argument('--train_args', default='', help='extra train.py flags (space-separated)')
  p.add_argument('--bench_args', default='', help='extra benchmark flags')
  p.add_argument('--tiny', action='store_true', help='tiny configs: the CPU rehearsal')
  p.add_argument('--plan', action='store_true', help='print the next windows and exit')
  p.add_argument('--device', help="--plan: the device kind (default h200; --tiny cpu-tiny)")
  p.add_argument('--collect', metavar='DIR', help="merge DIR/results.tgz into --results")
  p.add_argument('--check_carry', action='store_true',
                 help=f'sizes of {", ".join(CARRY)}; exit 2 if one is missing or over the limit')
  args = p.parse_args()
  args.train_args, args.bench_args = args.train_args.split(), args.bench_args.split()
  for name in ('out', 'results', 'runs', 'collect'):  # The job works from ROOT.
    if getattr(args, name):
      setattr(args, name, os.path.abspath(getattr(args, name)))
  args.units = [u for u in args.units.split(',') if u]
  args.variants = [v for v in args.variants.split(',') if v]
  unknown = set(args.units) - {u.id for u in UNITS}
  if unknown:
    p.error(f'--units: unknown {",".join(sorted(unknown))}; expected ids from '
            + ','.join(u.id for u in UNITS))
  try:
    if args.plan:
      return plan(args)
    if args.collect:
      return collect(args.collect, args.results)
    if args.check_carry:
      fits = print_carry()
      missing = [c for c, v in carry_sizes(ROOT).items() if v is None]
      return 0 if fits and not missing else 2
    if not args.out:
      p.error('--out is required (or --plan, --collect, --check_carry)')
    return Job(args).run()
  except JobError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2


if __name__ == '__main__':
  sys.exit(main())
