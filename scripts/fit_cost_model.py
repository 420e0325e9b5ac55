"""Fits `gpu_program`'s cost model to the decode rows measured on an H100.

The only GPU timings this project has of its decode loops are Table 2's H100
rows (results/table2_h100/benchmark.jsonl, commit a5d906f). This script
checks that commit out (a git worktree), compiles each measured row's
decode loop for the `h100` target with that commit's code (the program that
was timed, on the CPU, with the gpu-aot extra), counts each kernel's bytes
and FLOPs with today's `mqa_flax.hlo`, and fits the two constants of
`gpu_targets.COST_MODEL`: each kernel takes max(bytes / (share x the
datasheet bandwidth), FLOPs / matmul rate) + a fixed overhead, the matmul
rate being the one those rows measured. It prints the fit and every row's
predicted and measured milliseconds per step.

    JAX_PLATFORMS=cpu python scripts/fit_cost_model.py [--worktree=DIR]

The programs differ from the timed ones in two ways: they are compiled by
this machine's jax (the H100 ran 0.11.2) and without GEMM autotuning.
"""

import argparse
import functools
import importlib.util
import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMIT = 'a5d906f23db00e64ef1a8c16d291e6770cd09c6a'
MEASURED = os.path.join(ROOT, 'results', 'table2_h100', 'benchmark.jsonl')
GPU_TARGETS = os.path.join(ROOT, 'mqa_flax', 'gpu_targets.py')
CHUNK = 16  # That commit's growing-cache loops (benchmark.run's default).


def _module(name: str, path: str):
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def compile_one(variant: str, kind: str, cache: str, out: str) -> None:
  """In a process whose `mqa_flax` is the old commit's: one row's decode
  loop for the h100 target -> [[bytes, flops] per kernel] per loop."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  import mqa_flax  # pylint: disable=g-import-not-at-top
  if not mqa_flax.__file__.startswith(os.path.abspath(os.environ['OLD_TREE'])):
    raise SystemExit(f'mqa_flax from {mqa_flax.__file__}, not the old tree')
  from mqa_flax import benchmark, decoding  # pylint: disable=g-import-not-at-top
  from mqa_flax.config import ModelConfig  # pylint: disable=g-import-not-at-top
  from mqa_flax.model import Transformer  # pylint: disable=g-import-not-at-top
  hlo = _module('new_hlo', os.path.join(ROOT, 'mqa_flax', 'hlo.py'))
  paper = _module('paper', os.path.join(os.environ['OLD_TREE'], 'configs', 'paper.py'))
  topo = topologies.get_topology_desc(platform='cuda', topology='1x1x1',
                                      target_config=gpu_targets.TARGETS['h100'])
  sharding = jax.sharding.NamedSharding(topologies.make_mesh(topo, (1,), ('d',)),
                                        jax.sharding.PartitionSpec())
  c = paper.get_config(variant)
  cfg = ModelConfig.from_config(c.model, c.data.vocab_size)
  graphdef, params = nnx.split(
      nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))), nnx.Param)
  place = lambda x, dtype=None: jax.ShapeDtypeStruct(x.shape, dtype or x.dtype,
                                                     sharding=sharding)
  params = jax.tree.map(lambda x: place(x, cfg.compute_dtype), params)
  beams = 1 if kind == 'greedy' else 4
  batch, length = (1024, 128) if beams == 1 else (256, 128)
  inputs = jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=sharding)
  cache_shapes = jax.eval_shape(functools.partial(
      benchmark._encode, graphdef, max_len=length, beam_size=beams), params, inputs)  # pylint: disable=protected-access
  cache_shapes = jax.tree.map(place, cache_shapes)
  if beams == 1:  # As that commit's benchmark timed them.
    fn = lambda p, c: benchmark.greedy_tokens(
        nnx.merge(graphdef, p), c, length, CHUNK if cache == 'growing' else None)
    donate = (1,)
  else:
    fn = lambda p, c: decoding.beam_search(
        nnx.merge(graphdef, p).decode_step, c, batch, beams, length, -1,
        stop_at_eos=False)
    donate = ()
  text = jax.jit(fn, donate_argnums=donate).lower(params, cache_shapes).compile().as_text()
  loops = [[[k.read + k.written, k.flops] for k in body]
           for body in hlo.loop_kernels(text)]
  with open(out, 'w') as f:
    json.dump(loops, f)


gpu_targets = _module('gpu_targets', GPU_TARGETS)


def predict(loops: list, share: float, overhead: float, flops_rate: float) -> float:
  """Seconds per step: the loops' mean (a growing cache's loops run equally
  many steps each)."""
  model = dict(bandwidth_share=share, matmul_flops=flops_rate, kernel_overhead_s=overhead)
  return sum(sum(gpu_targets.kernel_seconds(b, f, 'h100', model) for b, f in body)
             for body in loops) / len(loops)


def checkout(worktree: str) -> None:
  """The measured commit at `worktree` (a git worktree of this repository)."""
  if not os.path.isdir(worktree):
    subprocess.run(['git', '-C', ROOT, 'worktree', 'add', '--detach', worktree,
                    COMMIT], check=True, capture_output=True)


def measured_rows() -> list[dict]:
  """The H100 decode rows of the measured commit."""
  with open(MEASURED) as f:
    rows = [json.loads(line) for line in f]
  return [r for r in rows
          if r['kind'] in ('greedy', 'beam4') and r.get('git_commit') == COMMIT]


def loop_kernels(worktree: str, row: dict) -> list:
  """[[bytes, flops] per kernel] per loop of `row`'s program, compiled once
  (in a process of its own, whose `mqa_flax` is the old one) and kept in
  the worktree."""
  key = (row['variant'], row['kind'], row['cache'])
  out = os.path.join(worktree, '_'.join(key) + '.kernels.json')
  if not os.path.exists(out):
    env = dict(os.environ, OLD_TREE=worktree, PYTHONPATH=worktree, JAX_PLATFORMS='cpu')
    subprocess.run([sys.executable, os.path.abspath(__file__), '--compile_one', *key,
                    out], env=env, check=True, cwd=worktree)
  with open(out) as f:
    return json.load(f)


def step_seconds(row: dict) -> float:
  """A measured row's seconds per decode step."""
  return row['median_s'] / row['tgt_len']


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--worktree', default='/tmp/mqa_flax_a5d906f',
                 help='where to check the measured commit out')
  p.add_argument('--compile_one', nargs=4, metavar=('VARIANT', 'KIND', 'CACHE', 'OUT'),
                 help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.compile_one:
    compile_one(*args.compile_one)
    return
  checkout(args.worktree)
  rows = measured_rows()
  flops_rate = rows[0]['device_tflops'] * 1e12
  loops = {id(r): loop_kernels(args.worktree, r) for r in rows}

  def rms(share, overhead):
    return math.sqrt(sum(
        math.log(predict(loops[id(r)], share, overhead, flops_rate) / step_seconds(r)) ** 2
        for r in rows) / len(rows))

  grid = [(rms(s / 100, o / 4 * 1e-6), s / 100, o / 4 * 1e-6)
          for s in range(50, 101) for o in range(0, 21)]
  err, share, overhead = min(grid)
  print(f'fit over {len(rows)} H100 rows: bandwidth share {share:.2f} of '
        f"{gpu_targets.BANDWIDTH['h100'] / 1e12:.2f} TB/s, overhead "
        f'{overhead * 1e6:.2f} us a kernel, matmul {flops_rate / 1e12:.0f} TFLOP/s; '
        f'rms log error {err:.3f}')
  print(f"{'row':<28} {'kernels':>7} {'measured ms':>12} {'predicted ms':>13} {'ratio':>6}")
  for r in rows:
    body = loops[id(r)]
    pred = predict(body, share, overhead, flops_rate)
    n = sum(len(b) for b in body) / len(body)
    name = ' '.join((r['variant'], r['kind'], r['cache']))
    print(f'{name:<28} {n:>7.0f} {step_seconds(r) * 1e3:>12.3f} {pred * 1e3:>13.3f} '
          f'{pred / step_seconds(r):>6.2f}')


if __name__ == '__main__':
  main()
