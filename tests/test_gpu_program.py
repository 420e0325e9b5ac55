"""The GPU program of every decode loop, compiled for an H200 on the CPU.

Needs the `gpu-aot` extra, or jax 0.11's CUDA 13 plugin (skipped without
either). Small shapes: a self K/V cache leaf is larger than every other array
a step writes, so a cache-sized copy is a cache copy.

Where the two XLAs compile differently: jax 0.11's writes no PTX without a
GPU (no registers) and copies no K/V in BLKH beam steps with the 'reorder'
cache for K = 1.
"""

import dataclasses
import functools
import importlib.util
import json
import os
import subprocess
import sys

import jax
import pytest

from mqa_flax import config as config_lib
from mqa_flax import costs
from mqa_flax import gpu_program
from mqa_flax import gpu_targets
from mqa_flax import hlo
from mqa_flax.config import ModelConfig

pytestmark = pytest.mark.skipif(
    not gpu_program.available(),
    reason="compiling for a GPU without one needs the gpu-aot extra")
# It compiles a tiny program: a string condition, evaluated at the test, and
# only where the plugin is.
_NO_PTX = pytest.mark.skipif(
    "not gpu_program.available() or not gpu_program.writes_ptx('h200')",
    reason="this jax's XLA writes no PTX without a GPU: no registers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = 2
# Kernels per decode step: per decoder layer, plus the embedding, logits,
# search and loop condition. The goal (issue 21) is 16 per layer.
PER_LAYER, FIXED = 24, {'greedy': 4, 'beam': 20}


@functools.cache
def _report(program: str, k: int, layout: str, cache: str = 'padded',
            impl: str = 'xla', beam_cache: str = 'reorder') -> dict:
  cfg = ModelConfig(vocab_size=64, num_encoder_layers=1,
                    num_decoder_layers=LAYERS, d_model=32, d_ff=64, num_heads=8,
                    num_kv_heads=k, head_dim=32, max_len=64, dtype='bfloat16',
                    cache_layout=layout, attention_impl=impl, beam_cache=beam_cache)
  p = gpu_program.Program(program, batch=16, src_len=16, tgt_len=32, beam_size=4,
                          cache=cache, chunk=8)
  return gpu_program.program_report(cfg, p, 'h200')


# Every decode loop: greedy, and beam 4 over each of its caches.
LOOPS = [(p, k, layout, bc) for p, bc in (('greedy', 'reorder'), ('beam', 'reorder'),
                                           ('beam', 'pointers'))
         for k in (1, 2, 8) for layout in ('BLKH', 'BKLH')]


# With BLKH, an attention product (a GEMM batched over B and K) needs the
# K/V leaf stored with B and K outermost. Greedy's loop stores it so; beam
# loops keep [B, L, K, H] and transpose it each step: every K with
# 'pointers', K = 2 with 'reorder' (and K = 1 under jax 0.10's XLA).
def _blkh_beam_copies(program, k, layout, beam_cache):
  return program == 'beam' and layout == 'BLKH' and (
      beam_cache == 'pointers' or k == 2 or (k == 1 and jax.__version_info__ < (0, 11)))


def _blkh_pointers_over_budget(program, k, layout, beam_cache):
  # With those transposes a step is 73 kernels for K = 2 and 8 (68 allowed;
  # BKLH: 62.5).
  return (program, layout, beam_cache) == ('beam', 'BLKH', 'pointers') and k > 1


def _loops(known_failure):
  return [pytest.param(*x, marks=pytest.mark.xfail(
      strict=True, reason='issue 21: BLKH beam steps copy K/V leaves for their '
      'GEMMs (use BKLH)')) if known_failure(*x) else x for x in LOOPS]


@pytest.mark.parametrize('program,k,layout,beam_cache',
                         _loops(_blkh_pointers_over_budget))
def test_decode_step_within_kernel_budget(program, k, layout, beam_cache):
  r = _report(program, k, layout, beam_cache=beam_cache)
  assert r['loops'] == 1
  assert r['kernels_per_step'] <= PER_LAYER * LAYERS + FIXED[program], (
      r['kernels_by_kind'])


@pytest.mark.parametrize('program,k,layout,beam_cache', _loops(_blkh_beam_copies))
def test_no_cache_copy_in_the_loop(program, k, layout, beam_cache):
  r = _report(program, k, layout, beam_cache=beam_cache)
  assert r['cache_copies_per_step'] == 0, [
      (x['name'], x['kind']) for x in r['kernels'] if x['written'] >= r['cache_leaf_bytes']]


@pytest.mark.parametrize('impl', ['xla_reduce', 'pallas'])
@pytest.mark.parametrize('k', [1, 2])
def test_beam_steps_of_every_attention_impl_copy_no_cache(impl, k):
  # Before the search held the updated cache behind an optimization barrier,
  # XLA fused each layer's cache update into the reorder's gather, which then
  # needed the pre-update cache copied: two cache copies per layer and step
  # with the Pallas attention.
  r = _report('beam', k, 'BKLH', impl=impl)
  assert r['cache_copies_per_step'] == 0, r['kernels_by_kind']


@pytest.mark.parametrize('program,cache,beam_cache', [
    ('greedy', 'padded', 'reorder'), ('greedy', 'growing', 'reorder'),
    ('beam', 'padded', 'reorder'), ('beam', 'padded', 'pointers')])
@pytest.mark.parametrize('k,layout', [(1, 'BKLH'), (2, 'BLKH')])
def test_pallas_attention_writes_the_cache_itself(program, cache, beam_cache, k,
                                                  layout):
  # With the Pallas attention each layer's self-attention kernel writes its
  # position's K/V into both cache leaves, aliased in place: no update
  # kernel writes K/V (the one update left writes the output tokens), and
  # no cache copy.
  r = _report(program, k, layout, cache, 'pallas', beam_cache)
  steps = r['steps_per_loop']
  writers = [x for x in r['kernels'] if x['kind'] == 'pallas' and
             [inplace for _, inplace in x['outputs']] == [False, True, True]]
  assert len(writers) == LAYERS * steps, r['kernels_by_kind']
  new_kv = 16 * (4 if program == 'beam' else 1) * k * 32 * 2  # [rows, K, H] bf16.
  assert not [x for x in r['kernels'] if x['kind'] == 'update'
              and x['written'] >= new_kv], r['kernels_by_kind']
  assert r['cache_copies_per_step'] == 0


@pytest.mark.parametrize('program', ['greedy', 'beam'])
def test_decode_functions_donate_the_cache(program):
  cfg = ModelConfig(vocab_size=64, num_encoder_layers=1, num_decoder_layers=LAYERS,
                    d_model=32, d_ff=64, num_heads=8, num_kv_heads=1, head_dim=32,
                    max_len=64, dtype='bfloat16')
  p = gpu_program.Program(program, batch=16, src_len=16, tgt_len=32, beam_size=4)
  lowered, leaf = gpu_program.lower(cfg, p, gpu_program.target_sharding('h200'))
  # Every self K/V leaf is an input that aliases an output.
  assert lowered.as_text().count('tf.aliasing_output') >= 2 * LAYERS
  # Without donation the call would first copy each self K/V leaf. (XLA may
  # still transpose a leaf into the loop's layout: not a copy of kind copy.)
  entry = hlo.entry_kernels(lowered.compile().as_text())
  assert not [k.name for k in entry if k.kind == 'copy' and k.copies(leaf)]


def test_beam_loop_runs_two_steps_over_two_buffers():
  # Its reorders alternate between the two buffers: the report divides the
  # loop body by its two steps.
  r = _report('beam', 1, 'BKLH')
  assert r['loops'] == 1 and r['steps_per_loop'] == 2
  assert len(r['kernels']) == 2 * r['kernels_per_step']


def test_growing_cache_loops_copy_no_cache():
  r = _report('greedy', 2, 'BLKH', 'growing')
  assert r['loops'] == 4 and r['cache_copies_per_step'] == 0


def test_report_counts_what_the_step_moves():
  r = _report('greedy', 1, 'BLKH')
  kinds = r['kernels_by_kind']
  assert kinds['gemm'] >= 4 * LAYERS and kinds['update'] >= 2 * LAYERS
  assert r['bytes_moved_per_step'] == sum(
      x['read'] + x['written'] for x in r['kernels'])
  # All bytes moved are at least what must move (costs.analyze's floor).
  assert r['bytes_over_floor'] >= 1
  assert 'kernels' in gpu_program.format_report(r, kernels=True)


@pytest.mark.parametrize('program', ['encoder', 'train'])
def test_encoder_and_train_step_compile(program):
  r = _report(program, 2, 'BLKH')
  assert r['loops'] == 0 and r['kernels_per_step'] > 0
  assert r['floor_bytes_per_step'] is None


@pytest.mark.parametrize('flag', ['--batch=0', '--impl=cudnn --layout=BKLH'])
def test_cli_user_error_is_one_line(flag):
  out = subprocess.run(
      [sys.executable, '-m', 'mqa_flax.gpu_program',
       '--config=configs/paper.py:mqa,tiny', *flag.split()],
      capture_output=True, text=True, cwd=ROOT, check=False)
  assert out.returncode == 2, out.stderr
  assert out.stderr.strip().splitlines()[-1].startswith('error: ')
  assert 'Traceback' not in out.stderr


def test_cli_takes_the_configs_decode_section():
  # configs/base.py's decode.cache_layout (BKLH) is not ModelConfig's default.
  out = subprocess.run(
      [sys.executable, '-m', 'mqa_flax.gpu_program', '--json', '--batch=4',
       '--src_len=8', '--tgt_len=8', '--config=configs/paper.py:mqa,tiny',
       '--config.decode.attention_impl=pallas'],
      capture_output=True, text=True, cwd=ROOT, check=True)
  r = json.loads(out.stdout)
  assert (r['attention_impl'], r['cache_layout']) == ('pallas', 'BKLH')


@pytest.mark.parametrize('program', ['greedy', 'beam'])
def test_cudnn_attention_compiles_for_the_gpu(program):
  # Beam search's cross-attention puts R = 4 query rows on each key/value row.
  cfg = ModelConfig(vocab_size=64, num_encoder_layers=1, num_decoder_layers=LAYERS,
                    d_model=32, d_ff=64, num_heads=8, num_kv_heads=2, head_dim=32,
                    max_len=64, dtype='bfloat16', attention_impl='cudnn')
  p = gpu_program.Program(program, batch=16, src_len=16, tgt_len=32, beam_size=4)
  r = gpu_program.program_report(cfg, p, 'h200')
  assert r['kernels_by_kind']['attention'] == 2 * LAYERS
  assert any('cudnn' in c for c in r['custom_calls'])


@pytest.mark.parametrize('k', [1, 8])
def test_cudnn_attends_whole_sequences_in_training_and_the_encoder(k):
  # 1 encoder and 2 decoder layers: 1 + 2 * 2 attentions, each one cuDNN
  # call forward and one backward, in fewer kernels and bytes than the
  # einsums (which write the [B, N, T, S] scores). Length 47 is odd: cuDNN's
  # backward pass takes even lengths, and the attention pads them by one.
  # (The einsums' program does not compile there for K < 8 here: XLA finds
  # no GEMM tiling for a [752, 32] K/V projection gradient without
  # autotuning.)
  @functools.cache
  def report(program, seq, length):
    cfg = ModelConfig(vocab_size=64, num_encoder_layers=1, num_decoder_layers=LAYERS,
                      d_model=32, d_ff=64, num_heads=8, num_kv_heads=k, head_dim=32,
                      max_len=64, dtype='bfloat16', seq_attention_impl=seq)
    p = gpu_program.Program(program, batch=16, src_len=length, tgt_len=length)
    return gpu_program.program_report(cfg, p, 'h200')

  attentions = 1 + 2 * LAYERS
  for length in (48, 47):
    train = report('train', 'cudnn', length)
    assert train['kernels_by_kind']['attention'] == 2 * attentions, length
    calls = ' '.join(train['custom_calls'])
    assert 'cudnn$fmha' in calls and 'Backward' in calls
    # Every score of every attention, forward (2 products) and backward (5).
    scores = 16 * (length + length % 2)**2 * 8 * 32
    assert sum(x['flops'] for x in train['kernels'] if x['kind'] == 'attention') == (
        attentions * 2 * (2 + 5) * scores)
  train, einsums = report('train', 'cudnn', 48), report('train', 'xla', 48)
  assert 'attention' not in einsums['kernels_by_kind']
  assert train['kernels_per_step'] < einsums['kernels_per_step']
  assert train['bytes_moved_per_step'] < einsums['bytes_moved_per_step']
  encoder = report('encoder', 'cudnn', 48)
  assert encoder['kernels_by_kind']['attention'] == 1
  assert 'attention cudnn' in gpu_program.format_report(encoder)


@pytest.mark.parametrize('k', [1, 2, 8])
def test_xla_reduce_fuses_each_attention_into_one_kernel(k):
  # Per greedy step, the einsums take a QK kernel, a softmax and a PV kernel
  # (or two) per attention; xla_reduce one, and nothing cache-sized is copied.
  fused, einsums = _report('greedy', k, 'BKLH', impl='xla_reduce'), _report(
      'greedy', k, 'BKLH')
  assert fused['kernels_per_step'] <= einsums['kernels_per_step'] - 2 * LAYERS
  assert fused['cache_copies_per_step'] == 0
  # Each attention reads its K and V in one kernel: per layer, the self
  # cache's two leaves, and the cross K/V of half their length (source 16).
  leaf = fused['cache_leaf_bytes']
  assert sum(x['read'] >= 2 * leaf for x in fused['kernels']) == LAYERS
  assert sum(x['read'] >= leaf for x in fused['kernels']) == 2 * LAYERS


@_NO_PTX
def test_registers_of_every_generated_kernel():
  cfg = ModelConfig(vocab_size=64, num_encoder_layers=1, num_decoder_layers=LAYERS,
                    d_model=32, d_ff=64, num_heads=8, num_kv_heads=1, head_dim=32,
                    max_len=64, dtype='bfloat16', cache_layout='BKLH',
                    attention_impl='xla_reduce')
  p = gpu_program.Program('greedy', batch=16, src_len=16, tgt_len=32)
  r = gpu_program.program_report(cfg, p, 'h200', registers=True)
  generated = [k for k in r['kernels'] if not k['target']]
  assert generated and all(k['registers'] and k['spill_bytes'] is not None
                           for k in generated), generated
  assert r['max_registers'] == max(k['registers'] for k in generated)
  assert 'registers (ptxas)' in gpu_program.format_report(r, kernels=True)


@pytest.mark.skipif("not gpu_program.available() or gpu_program.writes_ptx('h200')",
                    reason="this jax's XLA writes PTX")
def test_registers_without_ptx_say_which_jax_writes_it():
  cfg = ModelConfig(vocab_size=64, num_encoder_layers=1, num_decoder_layers=1,
                    d_model=32, d_ff=64, num_heads=8, num_kv_heads=1, head_dim=32,
                    max_len=64)
  p = gpu_program.Program('greedy', batch=16, src_len=16, tgt_len=32)
  with pytest.raises(ValueError, match=r"writes no PTX .* use the gpu-aot extra's jax 0\.10"):
    gpu_program.program_report(cfg, p, 'h200', registers=True)


@functools.cache
def _paper(variant: str, argmax: str = 'xla', impl: str = 'xla_reduce',
           program: str = 'greedy', beam_cache: str = 'reorder', gemm: str = 'xla',
           norm: str = 'xla') -> dict:
  c = config_lib.load_config(os.path.join(ROOT, 'configs/paper.py'), variant)
  cfg = ModelConfig.from_config(c.model, c.data.vocab_size, c.decode)
  cfg = dataclasses.replace(cfg, attention_impl=impl, cache_layout='BKLH',
                            argmax_impl=argmax, beam_cache=beam_cache, norm_impl=norm)
  p = gpu_program.Program(program, batch=1024 if program == 'greedy' else 256, gemm=gemm)
  registers = ((program == 'greedy' or argmax == 'pallas')
               and (gemm == 'xla' or norm == 'pallas') and gpu_program.writes_ptx('h200'))
  return gpu_program.program_report(cfg, p, 'h200', registers=registers)


# gqa2's fused attention (G = 4 query heads per K/V head) needs more than 255
# registers per thread and spills; mha's (G = 1) and mqa's (G = 8) do not.
_GQA_SPILLS = pytest.mark.xfail(
    strict=True, reason="issue 21: gqa2's fused xla_reduce attention spills")


GREEDY_ROWS = [(v, impl) for impl in ('xla_reduce', 'pallas')
               for v in ('mha', 'mqa', 'gqa2')]


@pytest.mark.parametrize('variant,impl', GREEDY_ROWS)
def test_paper_shape_greedy_step_meets_the_kernel_goal(variant, impl):
  # configs/paper.py, batch 1024, source and target 128, bf16, H200: at most
  # 96 kernels a step (16 per decoder layer), no cache copy. The Pallas
  # attention runs with the Pallas argmax, as the benchmark's
  # pallas/BKLH/pallas row.
  r = _paper(variant, 'pallas' if impl == 'pallas' else 'xla', impl)
  assert r['kernels_per_step'] <= 96, r['kernels_by_kind']
  assert r['cache_copies_per_step'] == 0


@_NO_PTX
@pytest.mark.parametrize('variant,impl,program', [
    pytest.param(v, impl, 'greedy', marks=_GQA_SPILLS)
    if (v, impl) == ('gqa2', 'xla_reduce') else (v, impl, 'greedy')
    for v, impl in GREEDY_ROWS] + [('mqa', 'pallas', 'beam')])
def test_paper_shape_generated_kernels_do_not_spill(variant, impl, program):
  # ptxas gives each kernel XLA generated its registers, the Pallas ones
  # included (the attention, and the argmax or beam search's top-k inside
  # the output GEMM): none spills.
  pallas = impl == 'pallas'
  r = _paper(variant, 'pallas' if pallas else 'xla', impl, program,
             'pointers' if program == 'beam' else 'reorder')
  calls = [k for k in r['kernels'] if k['kind'] == 'pallas']
  assert len(calls) == (13 if pallas else 0) * r['steps_per_loop']
  assert all(k['registers'] for k in calls)
  assert not r['spilling_kernels'], r['spilling_kernels']


@pytest.mark.parametrize('argmax,impl', [('xla', 'xla_reduce'), ('pallas', 'pallas')])
def test_paper_shape_step_flops_and_prediction(argmax, impl):
  # The FLOPs counted in the step's dots and Pallas output GEMM are the
  # model's (costs.analyze: weights and attention, within the attention's
  # 3% that reductions and the Pallas attention compute outside any dot),
  # and the cost model's prediction is the sum of its parts.
  r = _paper('mqa', argmax, impl)
  c = config_lib.load_config(os.path.join(ROOT, 'configs/paper.py'), 'mqa')
  cfg = ModelConfig.from_config(c.model, c.data.vocab_size, c.decode)
  want = costs.analyze(cfg, 1024, 128, 128, 1)['decode_flops_per_token'] * 1024
  assert 0.95 < r['flops_per_step'] / want < 1.02
  parts = sum(r[f'predicted_{n}_us'] for n in ('memory', 'compute', 'overhead'))
  assert r['predicted_step_us'] == pytest.approx(parts)
  assert r['predicted_us_per_token'] == pytest.approx(r['predicted_step_us'] / 1024)
  overhead_us = gpu_targets.COST_MODEL['kernel_overhead_s'] * 1e6
  assert r['predicted_overhead_us'] == pytest.approx(overhead_us * r['kernels_per_step'])
  assert 'predicted' in gpu_program.format_report(r)


def test_serial_floor_adds_the_gemms_arithmetic_to_the_cache_bytes():
  # 1 GB of floor of which 0.2 GB weights, 330 GFLOP, on the H200 (4.8 TB/s,
  # 659 TFLOP/s): memory 208 us, compute 501 us; one kernel after another
  # at least 0.8 GB / 4.8 TB/s + 501 us = 667 us, so 0.75 of the compute
  # floor at best.
  report = dict(floor_bytes_per_step=1e9, flops_per_step=329.5e9)
  got = gpu_program.serial_floor(report, 0.2e9, 'h200')
  assert got['floor_memory_us'] == pytest.approx(1e9 / 4.8e12 * 1e6)
  assert got['floor_compute_us'] == pytest.approx(500.0)
  assert got['serial_floor_us'] == pytest.approx(0.8e9 / 4.8e12 * 1e6 + 500.0)
  assert got['serial_floor_fraction'] == pytest.approx(0.75)
  # The paper-shape mqa step: compute-bound, and its 12 attention kernels'
  # cache reads cannot hide under the GEMMs, so it can reach at most about
  # 0.7 of its floor (docs/perf.md), whatever the kernels.
  r = _paper('mqa', 'pallas', 'pallas')
  assert r['floor_compute_us'] > r['floor_memory_us']
  assert 0.6 < r['serial_floor_fraction'] < 0.75
  assert 'one after another' in gpu_program.format_report(r)


def test_paper_shape_fused_argmax_writes_no_logits():
  # mha greedy at the paper's shape: the argmax inside the output GEMM
  # (argmax_impl 'pallas') leaves out the [1024, 32768] bf16 logits written
  # and read back (134 MB) and one kernel, which brings mha under the bytes
  # goal of 1.1 times its floor.
  xla, fused = _paper('mha'), _paper('mha', 'pallas')
  assert fused['argmax_impl'] == 'pallas'
  assert fused['kernels_per_step'] == xla['kernels_per_step'] - 1
  assert xla['bytes_moved_per_step'] - fused['bytes_moved_per_step'] > 130e6
  assert xla['bytes_over_floor'] > 1.1 >= fused['bytes_over_floor']
  [call] = [k for k in fused['kernels'] if k['kind'] == 'pallas']
  assert call['written'] < 5e6  # Per-tile maxima and indices, no logits.


def test_paper_shape_fused_top_k_writes_no_logits():
  # mqa beam 4 over 256 sentences (Pallas attention, K/V pointers): beam
  # search's top-k and log-normaliser inside the output GEMM (argmax_impl
  # 'pallas') leave out the [1024, 32768] bf16 logits, written once and read
  # by the two log-softmax reductions and the top-k (268 MB), and 2 kernels.
  xla = _paper('mqa', impl='pallas', program='beam', beam_cache='pointers')
  fused = _paper('mqa', 'pallas', 'pallas', 'beam', 'pointers')
  assert fused['argmax_impl'] == 'pallas'
  assert fused['kernels_per_step'] <= xla['kernels_per_step'] - 2
  assert xla['bytes_moved_per_step'] - fused['bytes_moved_per_step'] > 250e6
  logits = 1024 * 32768 * 2
  # (The loop runs two steps, each with its logits GEMM.)
  assert {k['kind'] for k in xla['kernels'] if k['written'] >= logits} == {'gemm'}
  assert not [k for k in fused['kernels'] if k['written'] >= logits / 2]
  top_k = [k for k in fused['kernels'] if k['kind'] == 'pallas'][-1]
  assert top_k['read'] >= logits and top_k['written'] < 2e6  # Table in, k a row out.


@pytest.mark.parametrize('variant', ['gqa2', 'mqa'])
def test_paper_shape_pallas_beam_step_moves_no_queries(variant):
  # Beam 4 with the Pallas attention: each program reads its beams' queries
  # as one [R, G] block where the projection wrote them (the
  # self-attention's in the merged QKV projection) and writes its output in
  # the same order, so no kernel slices or transposes queries or outputs
  # (for K > 1 there were 24 transposes a step, for K = 1 6 slices).
  r = _paper(variant, 'pallas', 'pallas', 'beam', 'pointers')
  assert 'transpose' not in r['kernels_by_kind'], r['kernels_by_kind']
  assert not [k for k in r['kernels'] if k['kind'] == 'slice' and k['written'] > 1e5]
  assert r['kernels_per_step'] <= 105


def test_paper_shape_pallas_attention_pads_and_slices_nothing():
  # gqa2 greedy with the Pallas decode attention: each attention kernel
  # writes [B, N, H] bf16 (2.1 MB), its queries read and written by masked
  # loads and stores rather than padded to 16 rows in HBM; the
  # self-attention reads its queries out of the merged QKV projection, so no
  # kernel slices them out (one a layer before).
  r = _paper('gqa2', 'pallas', 'pallas')
  attention = [k for k in r['kernels'] if k['kind'] == 'pallas'][:-1]
  assert len(attention) == 12, r['kernels_by_kind']
  assert all(k['written'] == 1024 * 8 * 128 * 2 for k in attention)
  assert 'slice' not in r['kernels_by_kind'], r['kernels_by_kind']


@pytest.mark.parametrize('variant', ['mha', 'mqa'])
def test_paper_shape_beam_step_with_kv_pointers_moves_no_cache(variant):
  # beam_cache 'pointers' with the Pallas attention (each beam's own mask
  # over its sentence's M*L keys): no kernel gathers or copies the cache,
  # and a step moves well under the reorder's bytes (mha: its 3.2 GB reorder).
  pointers = _paper(variant, impl='pallas', program='beam', beam_cache='pointers')
  reorder = _paper(variant, impl='pallas', program='beam')
  assert pointers['cache_copies_per_step'] == 0
  leaf = pointers['cache_leaf_bytes']
  assert not [k for k in pointers['kernels']
              if k['kind'] in ('gather', 'copy') and k['written'] >= leaf]
  assert (pointers['bytes_moved_per_step']
          < (0.5 if variant == 'mha' else 0.75) * reorder['bytes_moved_per_step'])


def test_paper_shape_beam_step_writes_no_vocabulary_sized_float32():
  # mqa beam 4 over 256 sentences with the Pallas attention: no cache copy,
  # and the top-k runs per beam on the bf16 logits [1024, 32768], so no
  # kernel writes the float32 log-probabilities or their sums with the
  # beams' scores (134 MB), written and read back by the top-k before.
  r = _paper('mqa', impl='pallas', program='beam')
  assert r['cache_copies_per_step'] == 0
  # Nor does any kernel sort them: the top-k is decoding.top_k_by_chunks
  # (for a bfloat16 lax.top_k, jax 0.11's XLA sorts whole rows).
  assert 'sort' not in r['kernels_by_kind'], r['kernels_by_kind']
  big = [k for k in r['kernels'] if k['written'] >= 1024 * 32768 * 4]
  assert {k['kind'] for k in big} == {'gather'}, big  # The reorders only.
  assert r['bytes_over_floor'] < 1.6


def test_cost_model_predicts_a_measured_h100_row(tmp_path):
  # The H100's mqa greedy padded row (commit a5d906f), its program
  # recompiled with that commit's code (scripts/fit_cost_model.py): the
  # default cost model gives its measured time within the fit's range
  # (0.82-1.08 over the 13 rows; this row 1.08).
  spec = importlib.util.spec_from_file_location(
      'fit_cost_model', os.path.join(ROOT, 'scripts', 'fit_cost_model.py'))
  fit = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(fit)
  known = subprocess.run(['git', '-C', ROOT, 'cat-file', '-e', fit.COMMIT + '^{commit}'],
                         capture_output=True)
  if known.returncode:
    pytest.skip(f'commit {fit.COMMIT[:7]} is not in this clone (shallow?)')
  [row] = [r for r in fit.measured_rows()
           if (r['variant'], r['kind'], r['cache']) == ('mqa', 'greedy', 'padded')]
  worktree = str(tmp_path / 'old')
  fit.checkout(worktree)
  try:
    loops = fit.loop_kernels(worktree, row)
  finally:
    subprocess.run(['git', '-C', ROOT, 'worktree', 'remove', '--force', worktree],
                   capture_output=True)
  [body] = loops
  assert 150 <= len(body) <= 170  # The einsum-attention step that was timed (160).
  model = gpu_targets.COST_MODEL
  predicted = fit.predict(loops, model['bandwidth_share'], model['kernel_overhead_s'],
                          model['matmul_flops'])
  assert 0.82 <= predicted / fit.step_seconds(row) <= 1.1


@pytest.mark.parametrize('program', ['greedy', 'beam'])
def test_cublas_gemms_add_the_residual_themselves(program):
  # With XLA's Triton GEMM fusions off, every GEMM of a decode step is a
  # cuBLAS call, and the self- and cross-attention's output projections and
  # the feed-forward output add the residual themselves (beta = 1, in place,
  # the whole result counted written): with the Pallas attention, fewer
  # kernels and bytes a step. (With the einsums' attention its products
  # become cuBLAS calls too, unfused: docs/perf.md, change 14.)
  cfg = ModelConfig(vocab_size=64, num_encoder_layers=1, num_decoder_layers=LAYERS,
                    d_model=64, d_ff=128, num_heads=8, num_kv_heads=1, head_dim=32,
                    max_len=64, dtype='bfloat16', cache_layout='BKLH',
                    attention_impl='pallas', beam_cache='pointers')
  xla, cublas = (gpu_program.program_report(cfg, gpu_program.Program(
      program, batch=16, src_len=16, tgt_len=32, beam_size=4, gemm=gemm), 'h200')
                 for gemm in ('xla', 'cublas'))
  gemms = [k for k in cublas['kernels'] if k['kind'] == 'gemm']
  assert gemms and all(k['target'].startswith('__cublas') for k in gemms)
  adding = [k for k in gemms if k['outputs'][0][1]]
  assert len(adding) == 3 * LAYERS * cublas['steps_per_loop']
  assert all(k['written'] == k['outputs'][0][0] > 0 for k in adding)
  assert cublas['kernels_per_step'] <= xla['kernels_per_step']
  assert cublas['bytes_moved_per_step'] < xla['bytes_moved_per_step']
  assert 'gemm cublas' in gpu_program.format_report(cublas)


def test_paper_shape_greedy_step_with_cublas_gemms():
  # configs/paper.py:mqa, pallas/BKLH/pallas: 83 -> 78 kernels and 1.55 ->
  # 1.43 x the memory floor (docs/perf.md, change 14).
  xla, cublas = _paper('mqa', 'pallas', 'pallas'), _paper('mqa', 'pallas', 'pallas',
                                                        gemm='cublas')
  assert cublas['kernels_per_step'] <= xla['kernels_per_step'] - 5
  assert cublas['bytes_over_floor'] < min(1.45, xla['bytes_over_floor'] - 0.1)
  assert cublas['cache_copies_per_step'] == 0


@pytest.mark.parametrize('program', ['greedy', 'beam'])
def test_paper_shape_step_with_folded_layer_norms(program):
  # configs/paper.py:mqa, pallas/BKLH/pallas/cublas with norm_impl 'pallas':
  # each layer's three LayerNorms go into the GEMMs after them and the final
  # one into the output kernel's table, 19 kernels and 4.2 MB each fewer a
  # step (docs/perf.md, changes 16 and 17); the GEMMs keep their FLOPs.
  # Greedy 78 -> 59 kernels, 1.42 -> 1.35 x the memory floor.
  kw = dict(program=program, gemm='cublas',
            beam_cache='pointers' if program == 'beam' else 'reorder')
  xla = _paper('mqa', 'pallas', 'pallas', **kw)
  folded = _paper('mqa', 'pallas', 'pallas', norm='pallas', **kw)
  fused = [k for k in folded['kernels'] if k['kind'] == 'pallas'
           and k['name'] not in {x['name'] for x in xla['kernels']}]
  layers = 6 * folded['steps_per_loop']
  assert folded['kernels_per_step'] == xla['kernels_per_step'] - 19
  assert len([k for k in folded['kernels'] if k['kind'] == 'pallas']) == (
      len([k for k in xla['kernels'] if k['kind'] == 'pallas']) + 3 * layers), fused
  saved = xla['bytes_moved_per_step'] - folded['bytes_moved_per_step']
  assert saved == pytest.approx(19 * 2 * 1024 * 1024 * 2, rel=0.01)
  assert folded['flops_per_step'] == xla['flops_per_step']
  assert folded['cache_copies_per_step'] == 0
  if program == 'greedy':
    assert folded['bytes_over_floor'] < 1.35
  if folded.get('spilling_kernels') is not None:  # jax 0.10: ptxas' registers.
    assert not folded['spilling_kernels'], folded['spilling_kernels']


def test_paper_shape_gqa2_greedy_step_meets_the_bytes_goal():
  # gqa2's greedy goal, at most 1.2 x its memory floor: met with every
  # LayerNorm folded (1.197; docs/perf.md, change 17), without a spill.
  r = _paper('gqa2', 'pallas', 'pallas', gemm='cublas', norm='pallas')
  assert r['bytes_over_floor'] <= 1.2
  assert r['kernels_per_step'] <= 96 and r['cache_copies_per_step'] == 0
  if r.get('spilling_kernels') is not None:
    assert not r['spilling_kernels'], r['spilling_kernels']
