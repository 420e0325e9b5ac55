"""The GPUs `gpu_program` compiles for, and a cost model of their kernels.

`TARGETS`: the GpuTargetConfig text (xla/stream_executor/device_description
.proto) that XLA compiles for without a device. The SXM parts: 132 SMs of
compute capability 9.0 with 228 KiB of shared memory each, 50 MiB of L2;
they differ in memory (80 GB at 3.35 TB/s against 141 GB at 4.8 TB/s). The
cuDNN version only gates which fused attention XLA may call.

The cost model predicts a compiled step's time from its kernels' counts
(`hlo.Kernel`): each kernel takes

    max(bytes moved / (share x datasheet bandwidth), FLOPs / matmul rate)
      + a fixed overhead,

and a step is the sum. `share` and the overhead were fitted by
scripts/fit_cost_model.py to the 13 decode rows this project measured on
an H100 (commit a5d906f; greedy padded and growing, beam 4; mha, mqa,
gqa2 and the local variants), their programs recompiled here for the h100
target: 0.83 of the datasheet bandwidth and 2.25 µs a kernel, rms error
8% (in log), every row within 0.82-1.08 of its measurement. The matmul
rate is the one those rows measured (659 TFLOP/s, an 8192² bf16 matmul),
the H200's arithmetic being the H100's. It is untested on the H200 and on
kernels that differ from those rows' (the Pallas kernels): a prediction
for the GPU window to confirm, nothing more.

Only the standard library is imported here, so that the fitting script can
use it beside an old checkout of the package.
"""

from typing import Any, Iterable

_TARGET_TEXT = """gpu_device_info {{
  cuda_compute_capability {{ major: 9 minor: 0 }}
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_block_optin: 232448
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {bandwidth}
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: {memory}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 patch: 0 }}
device_description_str: "{name}"
"""
BANDWIDTH = {'h100': 3_350_000_000_000, 'h200': 4_800_000_000_000}  # Datasheets, B/s.
TARGETS = {
    'h100': _TARGET_TEXT.format(bandwidth=BANDWIDTH['h100'], memory=85_520_809_984,
                                name='NVIDIA H100 80GB HBM3'),
    'h200': _TARGET_TEXT.format(bandwidth=BANDWIDTH['h200'], memory=150_110_011_392,
                                name='NVIDIA H200'),
}
COST_MODEL = dict(bandwidth_share=0.83, matmul_flops=659e12, kernel_overhead_s=2.25e-6)


def target_of(device: str) -> str | None:
  """The target a device (`jax.Device.device_kind`) is, or None."""
  for target in ('h200', 'h100'):
    if target in device.lower():
      return target
  return None


def _terms(moved: float, flops: float, target: str,
           model: dict[str, float]) -> tuple[float, float]:
  """A kernel's seconds bound by its bytes and by its FLOPs."""
  bandwidth = model['bandwidth_share'] * BANDWIDTH[target]
  return moved / bandwidth, flops / model['matmul_flops']


def kernel_seconds(moved: float, flops: float, target: str,
                   model: dict[str, float] = COST_MODEL) -> float:
  """The cost model's time for one kernel that moves `moved` bytes."""
  return max(_terms(moved, flops, target, model)) + model['kernel_overhead_s']


def predict_step(kernels: Iterable[dict[str, Any]], steps: int, target: str,
                 model: dict[str, float] = COST_MODEL) -> dict[str, float]:
  """Predicted seconds of one step of a loop body's `kernels` (dicts with
  `read`, `written`, `flops`) that runs `steps` steps, in three parts that
  sum to it: `memory` and `compute` (each kernel's max, counted where it
  wins) and `overhead`."""
  parts = dict(memory=0.0, compute=0.0, overhead=0.0)
  for k in kernels:
    memory, compute = _terms(k['read'] + k['written'], k.get('flops', 0), target, model)
    parts['memory' if memory >= compute else 'compute'] += max(memory, compute)
    parts['overhead'] += model['kernel_overhead_s']
  return {name: t / steps for name, t in parts.items()}
