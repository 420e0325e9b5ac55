"""The GPU program of a decode loop, encoder or train step, seen from a CPU.

  python -m mqa_flax.gpu_program --config=configs/paper.py:mqa --target=h200 \
      --program=greedy [--cache=padded --layout=BLKH --impl=xla --argmax=xla] \
      [--batch=1024 --src_len=128 --tgt_len=128 --beam_size=4] [--kernels] \
      [--registers] [--json]

XLA compiles for a GPU it does not have ("deviceless" ahead-of-time
compilation): `jax.experimental.topologies` describes an H100 or H200 by its
`GpuTargetConfig` (`gpu_targets.TARGETS`), every input is a
`jax.ShapeDtypeStruct` placed on that one-device topology, and
`jit(f).lower(...).compile()` gives the program the GPU would run. It needs
the `gpu-aot` extra (the CUDA plugin, ptxas, cuDNN); `available()` says
whether it is there. The fusions, kernel counts, copies, in-place updates
and bytes are what a GPU would run; GEMM autotuning is off without a
device, so GEMM backends and timings are not.

`program_report` reads the compiled HLO (`hlo.step_counts`): for one step of
the loop (the while-loop body with the most bytes, plus its condition) the
kernels by kind, the bytes each reads and writes (see `hlo.kernels` and
docs/perf.md for the measure), the cache-sized arrays written other than in
place, the custom calls, and all bytes moved over the memory floor's
(`costs.analyze`). The benchmark records the same counts (`hlo.step_counts`)
from the program it times, so prediction and measurement sit side by side.
With `registers`, ptxas assembles the PTX XLA generated for each kernel and
gives its registers per thread and spill stores (`kernel_registers`).
`predict` adds the step's FLOPs and the time `gpu_targets`' cost model
gives it (for a growing cache, the loop with the most bytes: the last).
"""

import dataclasses
import functools
import glob
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import flags
from ml_collections import config_flags

from mqa_flax import attention
from mqa_flax import benchmark
from mqa_flax import costs
from mqa_flax import decoding
from mqa_flax import errors
from mqa_flax import gpu_targets
from mqa_flax import hlo
from mqa_flax import state as state_lib
from mqa_flax.config import (ARGMAX_IMPLS, ATTENTION_IMPLS, CACHE_LAYOUTS, NORM_IMPLS,
                             ModelConfig)
from mqa_flax.model import abstract_model

PROGRAMS = ('greedy', 'beam', 'encoder', 'train')
# The CUDA plugins jax's wheels come as: cuda12 (the gpu-aot extra) and
# cuda13 (the H200 image's jax 0.11.2).
_PLUGINS = ('jax_plugins.xla_cuda12', 'jax_plugins.xla_cuda13')


def _spec(name: str):
  """The module `name`'s import spec, or None where it (or its parent) is
  not installed."""
  try:
    return importlib.util.find_spec(name)
  except ModuleNotFoundError:
    return None


def available() -> bool:
  """Whether a CUDA plugin that compiles for a GPU without one is installed."""
  return any(_spec(name) for name in _PLUGINS)


@functools.cache
def target_sharding(target: str) -> jax.sharding.NamedSharding:
  """A replicated sharding on the one-GPU topology that `target` describes."""
  if target not in gpu_targets.TARGETS:
    raise ValueError(f'target={target!r}; expected one of '
                     f'{tuple(gpu_targets.TARGETS)}')
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  topo = topologies.get_topology_desc(platform='cuda', topology='1x1x1',
                                      target_config=gpu_targets.TARGETS[target])
  mesh = topologies.make_mesh(topo, (1,), ('d',))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


@dataclasses.dataclass(frozen=True)
class Program:
  """One program to compile: what, for which model, at which shape."""

  program: str  # One of PROGRAMS.
  batch: int = 1024  # Sentences (greedy, beam, encoder) or train rows.
  src_len: int = 128
  tgt_len: int = 128  # Also the train sequence length.
  beam_size: int = 4  # Beam programs only.
  cache: str = 'padded'  # Decode loops: 'padded' or 'growing'.
  chunk: int = 16  # Steps per loop of the growing cache.
  gemm: str = 'xla'  # How the program does its GEMMs: benchmark.GEMM_IMPLS.

  def __post_init__(self):
    if self.program not in PROGRAMS:
      raise ValueError(f'program={self.program!r}; expected one of {PROGRAMS}')
    if self.cache not in benchmark.CACHE_MODES:
      raise ValueError(f'cache={self.cache!r}; expected one of '
                       f'{benchmark.CACHE_MODES}')
    benchmark.gemm_options(self.gemm)  # Refuses an unknown one.
    for name in ('batch', 'src_len', 'tgt_len', 'beam_size', 'chunk'):
      if getattr(self, name) <= 0:
        raise ValueError(f'{name}={getattr(self, name)} must be positive')

  @property
  def beams(self) -> int:
    """Beams per sentence: 1 for everything but beam search."""
    return self.beam_size if self.program == 'beam' else 1


def _abstract(tree: Any, sharding: jax.sharding.Sharding) -> Any:
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def lower(cfg: ModelConfig, p: Program, sharding: jax.sharding.Sharding
          ) -> tuple[jax.stages.Lowered, int]:
  """The benchmark's function for `p`, lowered on abstract inputs placed by
  `sharding`, and the bytes of the smallest self-attention K/V cache leaf
  (0 without a cache).

  Decode loops donate their cache, as the benchmark's do. The lowering runs
  under the sharding's abstract mesh: from jax 0.11 on, Pallas's Triton
  lowering reads the GPU it compiles for from there when no GPU is present.
  """
  with attention.compiling_for_gpu(), jax.sharding.use_abstract_mesh(
      sharding.mesh.abstract_mesh):
    return _lower(cfg, p, sharding)


def _lower(cfg: ModelConfig, p: Program, sharding: jax.sharding.Sharding
           ) -> tuple[jax.stages.Lowered, int]:
  graphdef, params = abstract_model(cfg)
  if p.program == 'train':
    params = _abstract(params, sharding)
    tx = state_lib.make_optimizer(ml_collections.ConfigDict(benchmark.ADAMW), 1)
    state = state_lib.TrainState(
        jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding), params,
        _abstract(jax.eval_shape(tx.init, params), sharding))
    ids = jax.ShapeDtypeStruct((p.batch, p.tgt_len), jnp.int32)
    batch = _abstract(jax.eval_shape(benchmark.train_batch, ids), sharding)
    rng = _abstract(jax.eval_shape(jax.random.key, 0), sharding)
    fn = jax.jit(benchmark.train_fn(graphdef, tx), donate_argnums=0)
    return fn.lower(state, batch, rng), 0
  # Inference runs on weights cast to the compute dtype, as the benchmark's.
  params = _abstract(jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, cfg.compute_dtype), params), sharding)
  inputs = jax.ShapeDtypeStruct((p.batch, p.src_len), jnp.int32, sharding=sharding)
  if p.program == 'encoder':
    return jax.jit(benchmark.encoder_fn(graphdef, p.tgt_len)).lower(params, inputs), 0
  make_cache = functools.partial(benchmark.encode_cache, graphdef, max_len=p.tgt_len,
                                 beam_size=p.beams)
  cache = _abstract(jax.eval_shape(make_cache, params, inputs), sharding)
  leaf = min(math.prod(c[n].shape) * c[n].dtype.itemsize for c in cache['layers']
             for n in ('k', 'v'))
  fn = benchmark.decode_fn(graphdef, p.batch, p.beams, p.tgt_len,
                           p.chunk if p.cache == 'growing' else None)
  return jax.jit(fn, donate_argnums=benchmark.DECODE_DONATE).lower(params, cache), leaf


def compile_text(cfg: ModelConfig, p: Program, target: str,
                 dump_dir: str | None = None) -> tuple[str, int]:
  """Compiled HLO text of `p` for `target` (see `lower`), and the cache leaf
  bytes; with `dump_dir`, XLA also writes there the PTX of every kernel it
  generates."""
  lowered, leaf = lower(cfg, p, target_sharding(target))
  options = benchmark.gemm_options(p.gemm)
  if dump_dir:
    options['xla_dump_to'] = dump_dir
  return lowered.compile(compiler_options=options or None).as_text(), leaf


def _ptxas() -> str:
  """ptxas of the nvidia-cuda-nvcc wheel (CUDA 12's, as the gpu-aot extra
  installs it, or CUDA 13's), else on PATH."""
  for package in ('nvidia.cuda_nvcc', 'nvidia.cu13'):
    spec = _spec(package)
    for folder in (spec.submodule_search_locations or []) if spec else []:
      path = os.path.join(folder, 'bin', 'ptxas')
      if os.access(path, os.X_OK):
        return path
  path = shutil.which('ptxas')
  if not path:
    raise ValueError('--registers needs ptxas: pip install nvidia-cuda-nvcc-cu12 '
                     "(in the gpu-aot extra)")
  return path


@functools.cache
def writes_ptx(target: str) -> bool:
  """Whether this jax's XLA writes the PTX of the kernels it generates when it
  compiles for `target` without a GPU, as `kernel_registers` needs: jax 0.10
  does, 0.11 writes none."""
  x = jax.ShapeDtypeStruct((256,), jnp.float32, sharding=target_sharding(target))
  with tempfile.TemporaryDirectory() as tmp:
    jax.jit(lambda v: jnp.sin(v) * 2).lower(x).compile(
        compiler_options={'xla_dump_to': tmp})
    return bool(glob.glob(os.path.join(tmp, '*.ptx')))


# ptxas -v prints, per kernel: "Compiling entry function 'NAME' for 'sm_90a'",
# "... N bytes spill stores, M bytes spill loads", "Used R registers, ...".
_PTXAS_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_PTXAS_SPILL = re.compile(r'(\d+) bytes spill stores')
_PTXAS_REGS = re.compile(r'Used (\d+) registers')


def kernel_registers(dump_dir: str) -> dict[str, tuple[int, int]]:
  """Per generated kernel (PTX entry name, as the HLO names it with '.' -> '_'):
  registers per thread and bytes of spill stores, as ptxas assembles it for
  sm_90a (H100 and H200). Library kernels (cuBLAS, cuDNN) have no PTX here."""
  ptxas, out = _ptxas(), {}
  for ptx in sorted(glob.glob(os.path.join(dump_dir, '*.ptx'))):
    if not os.path.getsize(ptx):  # A module with no generated kernel.
      continue
    log = subprocess.run([ptxas, '-v', '-arch=sm_90a', ptx, '-o', os.devnull],
                         capture_output=True, text=True, check=True).stderr
    name = None
    for line in log.splitlines():
      if m := _PTXAS_ENTRY.search(line):
        name = m.group(1)
      elif name and (m := _PTXAS_SPILL.search(line)):
        out[name] = (0, int(m.group(1)))
      elif name and (m := _PTXAS_REGS.search(line)):
        out[name] = (int(m.group(1)), out.get(name, (0, 0))[1])
  return out


def decode_floor(cfg: ModelConfig, p: Program) -> tuple[float, float] | None:
  """Bytes one decode step must move (`costs.analyze`, beams' reorder
  included) and, of those, its weights' bytes; None for other programs."""
  if p.program not in ('greedy', 'beam'):
    return None
  stats = costs.analyze(cfg, p.batch, p.src_len, p.tgt_len, p.beams)
  return (stats[f'decode_bytes_per_step_{p.cache}'] +
          stats[f'decode_reorder_bytes_per_step_{p.cache}'],
          stats['decode_weight_bytes_per_step'])


# An HLO instruction and its deduplicated_name: identical fusions share that
# name and one compiled kernel, whose PTX entry is named after one of them.
_DEDUPLICATED = re.compile(r'%([\w.-]+) = [^\n]*?deduplicated_name="([\w.-]+)"')
# A Pallas (Triton) custom call and the name its kernel's PTX entry has.
_TRITON_CALL = re.compile(r'%([\w.-]+) = [^\n]*custom_call_target="__gpu\$xla\.gpu'
                          r'\.triton"[^\n]*?, name = "([\w.-]+)"')


def program_report(cfg: ModelConfig, p: Program, target: str,
                   registers: bool = False) -> dict[str, Any]:
  """Compiles `p` for `target` and counts one step of it (`hlo.step_counts`).

  With `registers`, each generated kernel of the step also gets the
  registers per thread and spill-store bytes ptxas gives it
  (`kernel_registers`; None for library calls), and the report names the
  kernels that spill.
  """
  if registers and not writes_ptx(target):
    raise ValueError('registers: this jax\'s XLA writes no PTX when it compiles '
                     'without a GPU (jax 0.10\'s does); use the gpu-aot extra\'s '
                     'jax 0.10')
  with tempfile.TemporaryDirectory() as tmp:
    text, leaf = compile_text(cfg, p, target, tmp if registers else None)
    usage = kernel_registers(tmp) if registers else None
  reorder = hlo.beam_reorder_arrays(cfg.num_decoder_layers, p.beams, p.cache,
                                    cfg.beam_cache)
  floor = decode_floor(cfg, p)
  report = dict(target=target, **dataclasses.asdict(p), beams=p.beams,
                attention_impl=cfg.attention_impl, cache_layout=cfg.cache_layout,
                argmax_impl=cfg.argmax_impl if p.program in ('greedy', 'beam') else None,
                norm_impl=cfg.norm_impl if p.program in ('greedy', 'beam') else None,
                seq_attention_impl=cfg.seq_attention_impl,
                num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
                dtype=cfg.dtype, cache_leaf_bytes=leaf,
                **hlo.step_counts(text, leaf, floor and floor[0], reorder,
                                  decoding.steps_per_loop(
                                      p.beams, p.chunk if p.cache == 'growing' else None)))
  report.update(predict(report, p, target))
  if floor:
    report.update(serial_floor(report, floor[1], target))
  if usage is not None:
    # A kernel without a PTX entry of its own takes its group's; a Pallas
    # call, its kernel's.
    group = dict(_DEDUPLICATED.findall(text))
    for call, entry in _TRITON_CALL.findall(text):
      group[call] = entry
    by_group = {group.get(name, name): usage[name.replace('.', '_')]
                for name in group if name.replace('.', '_') in usage}
    for k in report['kernels']:
      name = k['name']
      g = group.get(name, name)
      k['registers'], k['spill_bytes'] = (
          usage.get(name.replace('.', '_')) or by_group.get(g)
          or usage.get(g.replace('.', '_'), (None, None)))
    report['max_registers'] = max((k['registers'] or 0) for k in report['kernels'])
    report['spilling_kernels'] = [k['name'] for k in report['kernels']
                                  if k['spill_bytes']]
  return report


def predict(report: dict[str, Any], p: Program, target: str) -> dict[str, float]:
  """The cost model's time for one step (`gpu_targets.predict_step`), in µs,
  and per token: a sentence's output token for decode loops (as the
  benchmark counts, beams included), a source token for the encoder, a
  target token for the train step."""
  parts = gpu_targets.predict_step(report['kernels'], report['steps_per_loop'], target)
  step_us = sum(parts.values()) * 1e6
  tokens = {'encoder': p.batch * p.src_len,
            'train': p.batch * p.tgt_len}.get(p.program, p.batch)
  return dict(flops_per_step=sum(k['flops'] for k in report['kernels'])
              / report['steps_per_loop'],
              predicted_step_us=step_us, predicted_us_per_token=step_us / tokens,
              **{f'predicted_{n}_us': t * 1e6 for n, t in parts.items()})


def serial_floor(report: dict[str, Any], weight_bytes: float,
                 target: str) -> dict[str, float]:
  """A decode step's floors on `target` (datasheet bandwidth, the cost
  model's matmul rate), in µs, and the least time a step of kernels run one
  after another can take: its GEMMs' FLOPs at the matmul rate plus every
  byte of its memory floor but the weights (K/V caches, the GEMMs' being
  hidden under their arithmetic) at the full bandwidth, as no kernel
  overlaps another. `serial_floor_fraction` is max(floors) over that: the
  most of its floor such a step can reach."""
  rate = gpu_targets.COST_MODEL['matmul_flops']
  bandwidth = gpu_targets.BANDWIDTH[target]
  memory = report['floor_bytes_per_step'] / bandwidth
  compute = report['flops_per_step'] / rate
  serial = (report['floor_bytes_per_step'] - weight_bytes) / bandwidth + compute
  return dict(floor_memory_us=memory * 1e6, floor_compute_us=compute * 1e6,
              serial_floor_us=serial * 1e6,
              serial_floor_fraction=max(memory, compute) / serial)


def format_report(r: dict[str, Any], kernels: bool = False) -> str:
  """The report as aligned text lines; every kernel's line with `kernels`."""
  def mb(x):
    return f'{x / 1e6:,.1f} MB' if x >= 1e5 else f'{x / 1e3:,.1f} kB'
  what = (f"{r['program']} (beam {r['beams']})" if r['program'] == 'beam'
          else r['program'])
  decoding = r['program'] in ('greedy', 'beam')
  lines = [
      f"{what} on {r['target']}: K={r['num_kv_heads']} N={r['num_heads']} "
      f"{r['dtype']} batch {r['batch']} " + (
          f"src {r['src_len']} tgt {r['tgt_len']} cache {r['cache']} "
          f"{r['cache_layout']} attention {r['attention_impl']}"
          + (f" argmax {r['argmax_impl']}" if r['argmax_impl'] else '')
          + (f" norm {r['norm_impl']}" if r.get('norm_impl') == 'pallas' else '')
          if decoding
          else f"length {r['tgt_len'] if r['program'] == 'train' else r['src_len']} "
          f"attention {r['seq_attention_impl']}")
      + (f" gemm {r['gemm']}" if r.get('gemm', 'xla') != 'xla' else ''),
      f"loops {r['loops']}; one step (loop body + condition"
      + (f" / {r['steps_per_loop']} steps it runs" if r['steps_per_loop'] > 1 else '')
      + ", or the whole program without a loop):",
      f"  kernels            {r['kernels_per_step']}: " + ', '.join(
          f'{n} {k}' for k, n in r['kernels_by_kind'].items()),
      f"  bytes read         {mb(r['bytes_read_per_step'])}",
      f"  bytes written      {mb(r['bytes_written_per_step'])}",
      f"  bytes moved        {mb(r['bytes_moved_per_step'])}",
  ]
  if r['floor_bytes_per_step']:
    lines.append(f"  memory floor       {mb(r['floor_bytes_per_step'])} "
                 f"(moved / floor = {r['bytes_over_floor']:.2f})")
  if r['cache_leaf_bytes']:
    lines.append(
        f"  cache copies       {r['cache_copies_per_step']} per step "
        f"({mb(r['cache_copy_bytes_per_step'])} beyond the beam reorder's own; "
        f"arrays >= {mb(r['cache_leaf_bytes'])}), "
        f"{r['cache_copies_per_call']} per call outside the loop")
  lines.append('  custom calls       ' + (', '.join(r['custom_calls']) or 'none'))
  lines.append(
      f"  FLOPs              {r['flops_per_step'] / 1e9:,.1f} G (dots and output GEMMs)")
  lines.append(
      f"  predicted          {r['predicted_us_per_token']:.3f} us/token, "
      f"{r['predicted_step_us']:,.0f} us a step: {r['predicted_memory_us']:,.0f} "
      f"bytes-bound + {r['predicted_compute_us']:,.0f} FLOP-bound + "
      f"{r['predicted_overhead_us']:,.0f} overhead (gpu_targets' cost model)")
  if 'serial_floor_us' in r:
    best = max(r['floor_memory_us'], r['floor_compute_us'])
    lines.append(
        f"  floors             memory {r['floor_memory_us']:,.0f} us, compute "
        f"{r['floor_compute_us']:,.0f} us a step; kernels one after another "
        f"take >= {r['serial_floor_us']:,.0f} us, at most "
        f"{r['serial_floor_fraction']:.2f} of max(floors); predicted "
        f"{best / r['predicted_step_us']:.2f}")
  regs = 'max_registers' in r
  if regs:
    spills = r['spilling_kernels']
    lines.append(f"  registers (ptxas)  at most {r['max_registers']} per thread; "
                 f"{len(spills)} kernels spill" + (f": {', '.join(spills)}" if spills
                                                   else ''))
  if kernels:
    lines.append(f"  {'kernel':<48} {'kind':<12} {'read':>12} {'written':>12}"
                 + (f" {'regs':>5} {'spill':>7}" if regs else ''))
    for k in r['kernels']:
      line = (f"  {k['name'][:48]:<48} {k['kind']:<12} {mb(k['read']):>12} "
              f"{mb(k['written']):>12}")
      if regs and k['registers'] is not None:
        line += f" {k['registers']:>5} {k['spill_bytes']:>5} B"
      lines.append(line)
  return '\n'.join(lines)


def define_flags() -> None:
  """The command's flags, defined by `python -m` only: importing this module
  defines none (decode.py's would clash)."""
  config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
  flags.DEFINE_enum('target', 'h200', list(gpu_targets.TARGETS),
                    'GPU to compile for.')
  flags.DEFINE_enum('program', 'greedy', list(PROGRAMS), 'What to compile.')
  flags.DEFINE_enum('cache', 'padded', list(benchmark.CACHE_MODES), 'Decode cache mode.')
  flags.DEFINE_enum('impl', None, list(ATTENTION_IMPLS),
                    'Decode attention (default: the config\'s).')
  flags.DEFINE_enum('argmax', None, list(ARGMAX_IMPLS),
                    'Greedy decoding\'s argmax and beam search\'s top-k '
                    '(default: the config\'s).')
  flags.DEFINE_enum('norm', None, list(NORM_IMPLS),
                    'Decode LayerNorms: XLA\'s kernels, or folded into the '
                    'GEMMs that read them (default: the config\'s).')
  flags.DEFINE_enum('layout', None, list(CACHE_LAYOUTS),
                    'Cache layout (default: the config\'s).')
  flags.DEFINE_enum('gemm', 'xla', list(benchmark.GEMM_IMPLS),
                    "GEMMs: XLA's choice (Triton fusions) or all cuBLAS calls.")
  flags.DEFINE_integer('batch', None, 'Sentences (default 1024, beam 256, train 128).')
  flags.DEFINE_integer('src_len', 128, 'Source length.')
  flags.DEFINE_integer('tgt_len', 128, 'Target length (train: 256 unless given).')
  flags.DEFINE_integer('beam_size', 4, 'Beams per sentence (beam only).')
  flags.DEFINE_integer('chunk', 16, 'Steps per loop, growing cache.')
  flags.DEFINE_bool('kernels', False, 'List every kernel of the step.')
  flags.DEFINE_bool('registers', False, 'Registers and spills of each generated '
                    'kernel, from ptxas (slower: it assembles every kernel; '
                    'jax 0.10 only).')
  flags.DEFINE_bool('json', False, 'Print JSON instead of text.')
  flags.mark_flags_as_required(['config'])


_DEFAULT_BATCH = dict(greedy=1024, beam=256, encoder=1024, train=128)


def main(argv):
  del argv
  f = flags.FLAGS
  if not available():
    raise errors.UserError('compiling for a GPU without one needs the CUDA '
                           "plugin: pip install -e '.[gpu-aot]'")
  config = f.config
  cfg = ModelConfig.from_config(config.model, config.data.vocab_size, config.decode,
                                config.seq_attention_impl)
  cfg = dataclasses.replace(cfg, attention_impl=f.impl or cfg.attention_impl,
                            argmax_impl=f.argmax or cfg.argmax_impl,
                            norm_impl=f.norm or cfg.norm_impl,
                            cache_layout=f.layout or cfg.cache_layout)
  program = f.program
  tgt_len = f.tgt_len
  if program == 'train' and not f['tgt_len'].present:
    tgt_len = 256
  batch = _DEFAULT_BATCH[program] if f.batch is None else f.batch
  try:  # A bad shape, or an implementation the layout does not allow.
    p = Program(program, batch=batch, src_len=f.src_len, tgt_len=tgt_len,
                beam_size=f.beam_size, cache=f.cache, chunk=f.chunk, gemm=f.gemm)
    report = program_report(cfg, p, f.target, f.registers)
  except ValueError as e:
    raise errors.UserError(str(e)) from e
  report = dict(variant=config.variant, **report)
  if f.json:
    print(json.dumps(report, indent=1))
  else:
    print(format_report(report, f.kernels))


if __name__ == '__main__':
  # Compile for the described GPU; run nothing on any device but the CPU.
  jax.config.update('jax_platforms', 'cpu')
  define_flags()
  errors.run(main)
