"""The cost model of mqa_flax.gpu_targets on kernels with known counts."""

import pytest

from mqa_flax import gpu_targets

MODEL = dict(bandwidth_share=0.5, matmul_flops=1e12, kernel_overhead_s=1e-6)


def test_a_kernel_takes_the_longer_of_its_bytes_and_flops_plus_overhead():
  # h200 at half its 4.8 TB/s: 2.4 GB/ms; 1 TFLOP/s: 1 GFLOP/ms.
  assert gpu_targets.kernel_seconds(2.4e9, 0, 'h200', MODEL) == pytest.approx(1e-3 + 1e-6)
  assert gpu_targets.kernel_seconds(2.4e9, 3e9, 'h200', MODEL) == pytest.approx(3e-3 + 1e-6)
  assert gpu_targets.kernel_seconds(0, 0, 'h100', MODEL) == pytest.approx(1e-6)


def test_a_step_sums_its_kernels_and_divides_by_the_steps_the_loop_runs():
  kernels = [dict(read=1.2e9, written=1.2e9, flops=0),  # 1 ms of bytes.
             dict(read=0, written=2.4e6, flops=2e9),  # 2 ms of FLOPs.
             dict(read=4, written=4)]  # Nearly nothing but its overhead.
  one = gpu_targets.predict_step(kernels, 1, 'h200', MODEL)
  assert one['memory'] == pytest.approx(1e-3 + 8 / 2.4e12)
  assert one['compute'] == pytest.approx(2e-3)
  assert one['overhead'] == pytest.approx(3e-6)
  assert sum(one.values()) == pytest.approx(
      sum(gpu_targets.kernel_seconds(k['read'] + k['written'], k.get('flops', 0),
                                     'h200', MODEL) for k in kernels))
  two = gpu_targets.predict_step(kernels, 2, 'h200', MODEL)
  assert two == pytest.approx({n: t / 2 for n, t in one.items()})



def test_devices_map_to_their_targets():
  assert gpu_targets.target_of('NVIDIA H200') == 'h200'
  assert gpu_targets.target_of('NVIDIA H100 80GB HBM3') == 'h100'
  assert gpu_targets.target_of('cpu') is None
