"""Kernel times from a profiler trace, beside the program's kernels."""

import jax
import jax.numpy as jnp

from mqa_flax import benchmark
from mqa_flax import kernel_times
from mqa_flax.config import ModelConfig


def test_per_step_matches_events_to_kernels_and_divides_by_steps():
  kernels = [dict(name='fusion.3', kind='gemm', read=3_000_000, written=1_000_000),
             dict(name='loop_add_fusion', kind='elementwise', read=1_000_000,
                  written=1_000_000)]
  events = [('fusion.3', 'sm90_gemm', 10.0)] * 4 + [  # By the hlo_op stat.
      (None, 'loop_add_fusion', 2.0)] * 4 + [  # By the kernel's own name.
      ('entry_fusion', 'entry_fusion', 7.0),  # An instruction outside the loop.
      (None, 'cudaMemcpy', 3.0), (None, 'cudaMemcpy', 1.0)]  # No instruction.
  # 8 decode steps, two per loop run: each kernel ran 4 times.
  got = kernel_times.per_step(events, kernels, steps=8, steps_per_loop=2,
                              wall_s=8 * 10e-6)
  assert got['kernel_us_per_step'] == 6.0 and got['wall_us_per_step'] == 10.0
  assert got['busy_fraction'] == 0.6
  assert got['us_by_kind'] == {'gemm': 5.0, 'elementwise': 1.0}
  assert got['kernels'][0] == dict(name='fusion.3', kind='gemm', us=5.0, mb=4.0,
                                   gbps=400.0)  # 4 MB in 10 µs.
  assert got['kernels'][1]['name'] == 'loop_add_fusion'
  assert got['other_us_per_call'] == 7.0
  assert got['unmatched'] == [dict(name='cudaMemcpy', us=4.0, runs=2)]


def test_profile_sees_each_run_of_a_loop_body():
  w = jnp.eye(16)
  f = jax.jit(lambda x: jax.lax.fori_loop(0, 5, lambda i, x: jnp.tanh(x @ w), x))
  x = jnp.ones((16, 16))
  compiled = f.lower(x).compile()
  events = kernel_times.profile(compiled, (x,))
  counts = {}
  for op, _, us in events:
    assert op is not None and us >= 0
    counts[op] = counts.get(op, 0) + 1
  assert max(counts.values()) == 5, counts  # The body's kernels, once a run.


def test_benchmark_rows_carry_the_loop_kernels_measured_time():
  cfg = ModelConfig(vocab_size=64, num_encoder_layers=1, num_decoder_layers=2,
                    d_model=32, d_ff=64, num_heads=4, num_kv_heads=1, head_dim=8,
                    max_len=32, dropout_rate=0.0, cache_layout='BKLH')
  rows = benchmark.run({'mqa': cfg}, batch=2, src_len=6, tgt_len=8,
                       kinds=('greedy', 'beam4'), beam_batch=2, reps=1,
                       chunk=4, profile=True)
  by = {(r['kind'], r['cache']): r for r in rows}
  assert 'profile' not in by['greedy', 'growing']  # Several loops: not profiled.
  for kind in ('greedy', 'beam4'):
    p = by[kind, 'padded']['profile']
    assert 'error' not in p, p
    assert 0 < p['kernel_us_per_step'] and 0 < p['wall_us_per_step']
    assert p['kernels'] and p['us_by_kind'] and not p['unmatched']
    assert sum(k['us'] for k in p['kernels']) <= p['kernel_us_per_step'] + 0.1


def test_a_failing_profile_is_an_error_field_not_a_failed_row(monkeypatch):
  def broken(*_):
    raise RuntimeError('no profiler here')
  monkeypatch.setattr(kernel_times, 'profile', broken)
  got = benchmark._profile(None, (), 'jit_fn', [], 8, 1, 1.0)
  assert got == {'error': 'RuntimeError: no profiler here'}
