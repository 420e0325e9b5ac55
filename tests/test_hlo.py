"""Tests for mqa_flax.hlo: loop traffic read from compiled HLO text."""

import jax
import jax.numpy as jnp

from mqa_flax import hlo

B, T = 4, 8


def _toy_loop(keep_old: bool) -> str:
  """Compiled HLO of a cache-update loop; keeping the old cache needs a copy."""
  def f(cache):
    def body(i, carry):
      cur, old = carry
      new = jax.lax.dynamic_update_slice_in_dim(
          cur, jnp.full((B, 1, 8), i, cur.dtype), i, axis=1)
      return new, cur if keep_old else old
    return jax.lax.fori_loop(0, T, body, (cache, jnp.zeros_like(cache)))
  cache = jnp.zeros((B, T, 8))
  return jax.jit(f, donate_argnums=0).lower(cache).compile().as_text()


def test_loop_traffic_sees_a_copy_per_step():
  leaf = B * T * 8 * 4
  copied = hlo.loop_traffic(_toy_loop(keep_old=True), leaf)
  assert hlo.cache_copy_bytes(copied) >= leaf, copied
  in_place = hlo.loop_traffic(_toy_loop(keep_old=False), leaf)
  assert hlo.cache_copy_bytes(in_place) == 0, in_place
  assert in_place.get('dynamic-update-slice', 0) >= leaf, in_place


def test_loop_traffic_classifies_fusions_by_their_root():
  text = """HloModule m
%fused_computation (p: f32[4,8]) -> f32[8,4] {
  %p = f32[4,8]{1,0} parameter(0)
  ROOT %t = f32[8,4]{1,0} transpose(%p), dimensions={1,0}
}
%fused_dus (p: f32[4,8], u: f32[4,1], i: s32[]) -> f32[4,8] {
  %p = f32[4,8]{1,0} parameter(0)
  ROOT %d = f32[4,8]{1,0} dynamic-update-slice(%p, %u, %z, %i)
}
%body (s: (f32[4,8])) -> (f32[4,8]) {
  %s = (f32[4,8]{1,0}) parameter(0)
  %g = f32[4,8]{1,0} get-tuple-element(%s), index=0
  %copy_dynamic-update-slice_fusion = f32[4,8]{1,0} fusion(%g), kind=kLoop, calls=%fused_dus
  %copy_fusion = f32[8,4]{1,0} fusion(%g), kind=kLoop, calls=%fused_computation
  %small = f32[4]{0} copy(%x)
  ROOT %r = (f32[4,8]{1,0}) tuple(%copy_dynamic-update-slice_fusion)
}
ENTRY %main (a: f32[4,8]) -> f32[4,8] {
  %w = (f32[4,8]{1,0}) while(%a), condition=%cond, body=%body
}
"""
  assert hlo.loop_traffic(text, 128) == {'dynamic-update-slice': 128,
                                         'transpose': 128}


def test_loop_kernels_count_an_in_place_update_by_its_update():
  leaf = B * T * 8 * 4
  [step] = hlo.loop_kernels(_toy_loop(keep_old=False))
  updates = [k for k in step if k.kind == 'update']
  assert updates and all(k.written == B * 8 * 4 for k in updates), step
  assert not [b for k in step for b in k.copies(leaf)], step
  [step] = hlo.loop_kernels(_toy_loop(keep_old=True))
  assert sum(b for k in step for b in k.copies(leaf)) >= leaf, step


def test_kernel_reads_only_the_slice_a_fusion_takes():
  text = """HloModule m
%fused_slice (p: f32[64,8]) -> f32[1,8] {
  %p = f32[64,8]{1,0} parameter(0)
  ROOT %s = f32[1,8]{1,0} slice(%p), slice={[3:4], [0:8]}
}
%body (t: (f32[64,8])) -> (f32[64,8]) {
  %t = (f32[64,8]{1,0}) parameter(0)
  %x = f32[64,8]{1,0} get-tuple-element(%t), index=0
  %f = f32[1,8]{1,0} fusion(%x), kind=kLoop, calls=%fused_slice
  ROOT %r = (f32[64,8]{1,0}) tuple(%x)
}
%cond (t: (f32[64,8])) -> pred[] {
  %t = (f32[64,8]{1,0}) parameter(0)
  ROOT %c = pred[] constant(true)
}
ENTRY %main (a: f32[64,8]) -> (f32[64,8]) {
  %a = f32[64,8]{1,0} parameter(0)
  %t = (f32[64,8]{1,0}) tuple(%a)
  ROOT %w = (f32[64,8]{1,0}) while(%t), condition=%cond, body=%body
}
"""
  [[kernel]] = hlo.loop_kernels(text)
  assert (kernel.kind, kernel.read, kernel.written) == ('slice', 32, 32)
  assert hlo.entry_kernels(text) == []


def test_kernel_reads_an_array_it_updates_and_then_reads():
  # The update is not a result of the fusion: the reduce reads the whole
  # updated array (a cache update fused into the attention that reads it).
  text = """HloModule m
%fused_read (p: f32[64,8], u: f32[1,8], i: s32[]) -> f32[64] {
  %p = f32[64,8]{1,0} parameter(0)
  %u = f32[1,8]{1,0} parameter(1)
  %i = s32[] parameter(2)
  %d = f32[64,8]{1,0} dynamic-update-slice(%p, %u, %i, %i)
  ROOT %s = f32[64]{0} reduce(%d, %z), dimensions={1}, to_apply=%add
}
%body (t: (f32[64,8], f32[1,8], s32[])) -> (f32[64,8], f32[1,8], s32[]) {
  %t = (f32[64,8]{1,0}, f32[1,8]{1,0}, s32[]) parameter(0)
  %x = f32[64,8]{1,0} get-tuple-element(%t), index=0
  %u = f32[1,8]{1,0} get-tuple-element(%t), index=1
  %i = s32[] get-tuple-element(%t), index=2
  %f = f32[64]{0} fusion(%x, %u, %i), kind=kInput, calls=%fused_read
  ROOT %r = (f32[64,8]{1,0}, f32[1,8]{1,0}, s32[]) tuple(%x, %u, %i)
}
%cond (t: (f32[64,8], f32[1,8], s32[])) -> pred[] {
  %t = (f32[64,8]{1,0}, f32[1,8]{1,0}, s32[]) parameter(0)
  ROOT %c = pred[] constant(true)
}
ENTRY %main (a: (f32[64,8], f32[1,8], s32[])) -> (f32[64,8], f32[1,8], s32[]) {
  %a = (f32[64,8]{1,0}, f32[1,8]{1,0}, s32[]) parameter(0)
  ROOT %w = (f32[64,8]{1,0}, f32[1,8]{1,0}, s32[]) while(%a), condition=%cond, body=%body
}
"""
  [[kernel]] = hlo.loop_kernels(text)
  assert (kernel.kind, kernel.read, kernel.written) == ('reduction', 64 * 8 * 4 + 32 + 4,
                                                        64 * 4)


def test_kernels_count_the_flops_of_their_dots():
  # A GEMM fusion (batched dot), a library GEMM (dimensions in its backend
  # config, a scratch workspace beside its result), a Pallas output-GEMM
  # kernel (x [B, D] . table [V, D]) and an elementwise fusion (no FLOPs).
  text = """HloModule m
%fused_dot (p0: bf16[4,16,32], p1: bf16[4,32,8]) -> f32[4,16,8] {
  %p0 = bf16[4,16,32]{2,1,0} parameter(0)
  %p1 = bf16[4,32,8]{2,1,0} parameter(1)
  ROOT %dot.1 = f32[4,16,8]{2,1,0} dot(%p0, %p1), lhs_batch_dims={0}, lhs_contracting_dims={2}, rhs_batch_dims={0}, rhs_contracting_dims={1}
}
%fused_add (p0: f32[4,16,8]) -> f32[4,16,8] {
  %p0 = f32[4,16,8]{2,1,0} parameter(0)
  ROOT %a = f32[4,16,8]{2,1,0} add(%p0, %p0)
}
%body (s: (bf16[4,16,32], bf16[4,32,8], bf16[64,32], bf16[32,48], bf16[1000,32])) -> (f32[4,16,8]) {
  %s = (bf16[4,16,32]{2,1,0}) parameter(0)
  %x = bf16[4,16,32]{2,1,0} get-tuple-element(%s), index=0
  %y = bf16[4,32,8]{2,1,0} get-tuple-element(%s), index=1
  %a = bf16[64,32]{1,0} get-tuple-element(%s), index=2
  %b = bf16[32,48]{1,0} get-tuple-element(%s), index=3
  %e = bf16[1000,32]{1,0} get-tuple-element(%s), index=4
  %gemm_fusion_dot.1 = f32[4,16,8]{2,1,0} fusion(%x, %y), kind=kCustom, calls=%fused_dot
  %loop_add_fusion = f32[4,16,8]{2,1,0} fusion(%gemm_fusion_dot.1), kind=kLoop, calls=%fused_add
  %custom-call.1 = (bf16[64,48]{1,0}, s8[1024]{0}) custom-call(%a, %b), custom_call_target="__cublas$gemm", backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"]}}}
  %pallas_call.1 = (f32[64,4,8]{2,1,0}) custom-call(%a, %e), custom_call_target="__gpu$xla.gpu.triton", backend_config={name = "logits_top_k", ir = "..."}
  ROOT %r = (f32[4,16,8]{2,1,0}) tuple(%loop_add_fusion)
}
ENTRY %main (a: (bf16[4,16,32])) -> (f32[4,16,8]) {
  %w = (f32[4,16,8]{2,1,0}) while(%a), condition=%cond, body=%body
}
"""
  [step] = hlo.loop_kernels(text)
  flops = {k.name: k.flops for k in step}
  assert flops == {'gemm_fusion_dot.1': 2 * 4 * 16 * 8 * 32, 'loop_add_fusion': 0,
                   'custom-call.1': 2 * 64 * 48 * 32, 'pallas_call.1': 2 * 64 * 1000 * 32}
  assert [k.kind for k in step] == ['gemm', 'elementwise', 'gemm', 'pallas']


def test_a_custom_calls_result_aliased_to_an_operand_is_written_in_place():
  # The Pallas attention writing its position's K/V into two cache leaves:
  # results 1 and 2 alias operands 1 and 2 (updated in place, nothing
  # counted written; the HLO does not say how much), result 0 is written.
  # A cuBLAS GEMM adding its product to its third operand (beta = 1, the
  # residual) in place writes all of it.
  text = """HloModule m
%body (s: (bf16[16,8,32], bf16[16,1,32,32], bf16[16,1,32,32], bf16[16,256])) -> (bf16[16,8,32]) {
  %s = (bf16[16,8,32]{2,1,0}) parameter(0)
  %q = bf16[16,8,32]{2,1,0} get-tuple-element(%s), index=0
  %k = bf16[16,1,32,32]{3,2,1,0} get-tuple-element(%s), index=1
  %v = bf16[16,1,32,32]{3,2,1,0} get-tuple-element(%s), index=2
  %x = bf16[16,256]{1,0} get-tuple-element(%s), index=3
  %pallas_call.1 = (bf16[16,8,32]{2,1,0}, bf16[16,1,32,32]{3,2,1,0}, bf16[16,1,32,32]{3,2,1,0}) custom-call(%q, %k, %v), custom_call_target="__gpu$xla.gpu.triton", operand_layout_constraints={bf16[16,8,32]{2,1,0}, bf16[16,1,32,32]{3,2,1,0}, bf16[16,1,32,32]{3,2,1,0}}, output_to_operand_aliasing={{1}: (1, {}), {2}: (2, {})}, api_version=API_VERSION_TYPED_FFI
  %bitcast.1 = bf16[16,256]{1,0} bitcast(%pallas_call.1)
  %cublas-lt-matmul.1 = (bf16[16,256]{1,0}, s8[1024]{0}) custom-call(%bitcast.1, %k, %x), custom_call_target="__cublas$lt$matmul", output_to_operand_aliasing={{0}: (2, {})}, backend_config={"gemm_backend_config":{"beta":1,"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"]}}}
  ROOT %r = (bf16[16,8,32]{2,1,0}) tuple(%pallas_call.1)
}
ENTRY %main (a: (bf16[16,8,32])) -> (bf16[16,8,32]) {
  %w = (bf16[16,8,32]{2,1,0}) while(%a), condition=%cond, body=%body
}
"""
  [[call, gemm]] = hlo.loop_kernels(text)
  out, leaf = 16 * 8 * 32 * 2, 16 * 32 * 32 * 2
  assert call.outputs == ((out, False), (0, True), (0, True))
  assert (call.read, call.written) == (out + 2 * leaf, out)
  assert not call.copies(leaf)
  assert gemm.kind == 'gemm' and gemm.outputs == ((out, True),)
  assert (gemm.read, gemm.written) == (out + leaf + out, out)
  assert hlo.loop_traffic(text, leaf) == {}  # Nothing cache-sized written.
  assert hlo.loop_traffic(text, out) == {'custom-call': out}
