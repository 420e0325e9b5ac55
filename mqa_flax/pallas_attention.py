"""Pallas decode attention: one query position, K key/value heads.

In incremental decoding every step has one query position, and the G = N // K
query heads of a key/value head (times R beams sharing cross-attention memory)
give M = R * G query rows per key/value head. Plain einsums turn this into a
batched matmul with M ~ 8 rows per batch element, which feeds the tensor cores
badly. This kernel reads K/V once instead: one program per (batch row, kv
head) keeps all M query rows, streams that head's K/V in blocks of `block_s`,
and runs a flash-style online softmax in float32. It loads its queries as an
[R, G] block of rows where the projection wrote them ([B, R, Q, H]: each
beam's heads, a merged QKV projection's included) and stores its output in
the same order, so no kernel slices, pads or transposes them.

Measured on an H100 (jax 0.11.2, `python -m mqa_flax.pallas_attention`,
B=1024 S=128 H=128 bf16): 0.041 ms at K=1 M=8 and 0.25 ms at K=8 M=1
(1.6-2.1 TB/s of K/V), on par with XLA's einsums there (0.040, 0.21 ms);
that kernel padded the queries to 16 rows in HBM, where this one reads and
writes its M rows in place (docs/perf.md, change 7).
The GPU path needs H a power of 2 (>= 16); Triton may compute float32 dots
in TF32.

Dimension letters as in `mqa_flax.attention`: B batch, S key length, K
key/value heads, M query rows per key/value head, H head dimension.
"""

import functools
import time

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

_NEG_INF = -1e30  # Masked keys: finite, so fully masked rows give a uniform softmax.
_MIN_ROWS = 16  # Triton's dot needs at least 16 rows per operand.


def _query_block(beams: int, group: int) -> tuple[int, int]:
  """(Rp, Gp): powers of 2 >= R and >= G, Rp * Gp >= 16 (Triton's dot needs
  16 rows), the [Rp, Gp] block of query rows a program loads and stores."""
  rp = pl.next_power_of_2(beams)
  return rp, max(pl.next_power_of_2(group), pl.cdiv(_MIN_ROWS, rp))


def _kernel(q_ref, k_ref, v_ref, valid_ref, *refs, block_s: int,
            seq_len: int, beams: int, group: int, scale: float, write: bool):
  """One (batch row b, kv head j): q [B*R, Q, H] at [b*R + r, j*G + g],
  k/v [S, H] (positions >= seq_len unread), valid [R', S_pad] int8 (query
  row r*G + g takes row (r*G + g) // (R*G / R')) -> o [B*R, K*G, H] at the
  queries' places.

  With `write`, refs are (slot [1], o, k_out, v_out), k_out/v_out aliasing
  k/v: beam r's new key and value (q[b*R + r] at heads K*G + j and
  K*G + K + j) go to position r * S/R + slot of k_out/v_out. The loop over
  k/v leaves out every beam's position `slot` (what it loads there may be
  old or new); each query row then adds its own beam's new key and value
  to its softmax, from registers."""
  if write:
    slot_ref, o_ref, k_out_ref, v_out_ref = refs
  else:
    (o_ref,) = refs
  # The R x G query rows are read and written as an [Rp, Gp] block by masked
  # loads and stores (at least 16 rows, Triton's dot needs them), so that
  # nothing is padded, sliced or transposed in HBM.
  rp, gp = _query_block(beams, group)
  mp, rows = rp * gp, beams * group
  b, j = pl.program_id(0), pl.program_id(1)
  block = (pl.ds(b * beams, rp), pl.ds(j * group, gp), slice(None))
  in_rows = (((jnp.arange(rp) < beams)[:, None] & (jnp.arange(gp) < group)[None, :])
             [:, :, None])
  q = plgpu.load(q_ref.at[block], mask=in_rows, other=0)
  q = q.reshape(mp, q.shape[-1])
  num_blocks = pl.cdiv(seq_len, block_s)
  groups = valid_ref.shape[0]

  def bias(i):  # [Mp, block_s] or, shared by all rows, [1, block_s].
    # Masked keys add _NEG_INF; positions past S' add -inf, so that a fully
    # masked row averages over exactly the S' positions read.
    cols = pl.ds(i * block_s, block_s)

    def row(r):  # [1, block_s]
      out = jnp.where(valid_ref[r, cols][None, :] != 0, 0.0, _NEG_INF)
      if seq_len % block_s == 0:
        return out
      past = i * block_s + jnp.arange(block_s) >= seq_len
      return jnp.where(past[None, :], -jnp.inf, out)

    if groups == 1:
      return row(0)
    flat = (jnp.arange(mp) // gp) * group + jnp.arange(mp) % gp  # r*G + g.
    which = (flat // (rows // groups))[:, None]
    out = jnp.zeros((mp, block_s), jnp.float32)
    for r in range(groups):  # R' loads of one mask row each.
      out = jnp.where(which == r, row(r), out)
    return out

  if write:  # This position's K/V, one row per beam, written where they go.
    length, slot = k_ref.shape[0] // beams, slot_ref[0]
    heads = o_ref.shape[1]  # K*G: the new keys follow the queries' heads.
    for r in range(beams):
      row = b * beams + r
      k_out_ref[r * length + slot, :] = q_ref[row, heads + j, :]
      v_out_ref[r * length + slot, :] = q_ref[row, heads + heads // group + j, :]

  def load(ref, i):
    block = ref.at[pl.ds(i * block_s, block_s), :]
    if seq_len % block_s == 0:
      return block[...]
    # The last block runs past S: masked loads instead of padding K/V in HBM,
    # which would copy the whole cache on every step.
    in_range = i * block_s + jnp.arange(block_s) < seq_len
    return plgpu.load(block, mask=in_range[:, None], other=0)

  def body(i, carry):
    m, l, acc = carry  # [Mp], [Mp], [Mp, H], float32
    s = lax.dot_general(q, load(k_ref, i), (((1,), (1,)), ((), ())),
                        preferred_element_type=jnp.float32)  # [Mp, block_s]
    if scale != 1.0:
      s = s * scale
    s = s + bias(i)
    if write:  # The new positions: added after the loop.
      s = jnp.where(((i * block_s + jnp.arange(block_s)) % length == slot)[None, :],
                    _NEG_INF, s)
    m_new = jnp.maximum(m, s.max(axis=1))
    alpha = jnp.exp(m - m_new)  # Rescales what was summed under the old max.
    p = jnp.exp(s - m_new[:, None])
    v = load(v_ref, i)
    pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return m_new, alpha * l + p.sum(axis=1), alpha[:, None] * acc + pv

  h = q.shape[1]
  init = (jnp.full((mp,), -jnp.inf, jnp.float32), jnp.zeros((mp,), jnp.float32),
          jnp.zeros((mp, h), jnp.float32))
  m, l, acc = lax.fori_loop(0, num_blocks, body, init)
  if write:  # Each query row's own beam's new key and value, as one more key.
    def new_rows(head):  # [Mp, H] float32: row (r, g) gets beam r's.
      at = (pl.ds(b * beams, rp), pl.ds(head, 1), slice(None))
      x = plgpu.load(q_ref.at[at], mask=(jnp.arange(rp) < beams)[:, None, None],
                     other=0)
      return jnp.broadcast_to(x, (rp, gp, h)).reshape(mp, h).astype(jnp.float32)
    s_new = (q.astype(jnp.float32) * new_rows(heads + j)).sum(axis=1) * scale
    m_new = jnp.maximum(m, s_new)
    alpha, p_new = jnp.exp(m - m_new), jnp.exp(s_new - m_new)
    l = alpha * l + p_new
    acc = alpha[:, None] * acc + p_new[:, None] * new_rows(heads + heads // group + j)
  # l >= 1: the row's maximum contributes exp(0).
  out = (acc / l[:, None]).astype(o_ref.dtype).reshape(rp, gp, h)
  plgpu.store(o_ref.at[block], out, mask=in_rows)


def decode_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                     valid: jax.Array, *, kv_layout: str = 'BSKH', scale: float = 1.0,
                     rows: int | None = None, write_slot: jax.Array | None = None,
                     block_s: int | None = None, interpret: bool | None = None,
                     num_warps: int = 4, num_stages: int = 2
                     ) -> jax.Array | tuple[jax.Array, jax.Array, jax.Array]:
  """Softmax(q . k) v for one query position, in one pass over K/V.

  With `write_slot`, the kernel also writes this position's keys and values
  into k and v (a decode cache, updated in place) before attending to them:
  no separate cache update kernels.

  A row with no valid key position returns the mean of v over the S'
  positions read (a uniform softmax), as
  `mqa_flax.attention.dot_product_attention` does.
  The mask is a kv row's, or one per group of M / R' query rows (each beam's
  own, where beams read all of their sentence's cache).

  Args:
    q: [B, K, M, H] queries; or, with `rows` = G, [B, R, Q, H]: R rows of
      queries (beams) per kv row, kv head j's being q[b, r, j*G .. j*G+G-1]
      for each r, so M = R*G; q[b, r] may hold more than K*G heads (a
      merged projection's keys and values [N + 2K]), which are never read.
      The queries are read where they are (no slice or transpose of q) and
      the output written in the same order.
    k: keys, [B, S, K, H] ('BSKH') or [B, K, S, H] ('BKSH'), q's dtype.
    v: values, shaped like k.
    valid: [B, S'] bool, True where key position s may be attended; or
      [B, R', S'], R' dividing M, where query rows i*M/R' .. (i+1)*M/R' - 1
      (counted r*G + g) of each kv head take valid[b, i]. S' <= S: only the
      first S' key positions are read (a growing cache's).
    kv_layout: 'BSKH' or 'BKSH'.
    scale: multiplies q.k, in float32 (1/sqrt(H) in a Transformer; inside the
      kernel, so that scaling q is no kernel of its own).
    rows: G, for q [B, R, Q, H] only.
    write_slot: int32 scalar, with `rows` only, q then holding a merged
      projection [B, R, K*G + 2K, H]: beam r's new key and value for kv head
      j (q[b, r, K*G + j] and q[b, r, K*G + K + j]) go to key position
      r * S/R + write_slot of k and v (each beam's own cache row of S/R
      positions; R = 1: position write_slot). Of those R positions, beam
      r's query rows attend to their own and no other, whatever `valid`
      says there (a decode step sees its own position, and each beam only
      its own).
    block_s: key positions per loop step, a power of 2 >= 16 (default 64).
    interpret: None runs Pallas' interpreter on CPU, the Triton kernel elsewhere.
    num_warps: Triton warps per program.
    num_stages: Triton software-pipelining stages for the K/V loads.

  Returns:
    [B, K, M, H] for q [B, K, M, H]; [B, R, K*G, H] for q [B, R, Q, H]; in
    q's dtype. With `write_slot`: (that, k, v), k and v written.
  """
  if kv_layout not in ('BSKH', 'BKSH'):
    raise ValueError(f"kv_layout must be 'BSKH' or 'BKSH', got {kv_layout!r}")
  if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
    raise ValueError(f'need q [B, K, M, H] (or [B, R, Q, H] with rows=G) and '
                     f'k, v of one 4-d shape; got q {q.shape}, k {k.shape}, '
                     f'v {v.shape}')
  s, kh = (k.shape[1], k.shape[2]) if kv_layout == 'BSKH' else k.shape[2:0:-1]
  b, h = q.shape[0], q.shape[3]
  if (k.shape[0], k.shape[3]) != (b, h) or (not rows and q.shape[1] != kh):
    raise ValueError(f'q {q.shape} does not match k/v {k.shape} = '
                     f'[{", ".join(kv_layout)}] in B, K or H')
  if rows:
    beams, group = q.shape[1], rows
  else:
    beams, group = 1, q.shape[2]
    q = q.reshape(b, 1, kh * group, h)
  m = beams * group
  if q.shape[2] < kh * group:
    raise ValueError(f'q {q.shape} holds fewer than K*G = {kh}*{group} heads a '
                     f'row')
  if write_slot is not None and (not rows or q.shape[2] < kh * (group + 2)):
    raise ValueError(f'write_slot needs rows=G and q [B, R, K*G + 2K, H] (a '
                     f'merged projection); got q {q.shape}, rows={rows}')
  if valid.ndim == 2:
    valid = valid[:, None]
  if valid.shape[0] != b or valid.shape[2] > s or m % valid.shape[1]:
    raise ValueError(f'valid must be [B, S\'] or [B, R\', S\'] with B = {b}, '
                     f'S\' <= S = {s} and R\' dividing M = {m}, got {valid.shape}')
  read = valid.shape[2]
  if not q.dtype == k.dtype == v.dtype:
    raise ValueError(f'q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}')
  block_s = 64 if block_s is None else block_s
  if block_s < 16 or block_s & (block_s - 1):
    raise ValueError(f'block_s must be a power of 2 >= 16, got {block_s}')
  if interpret is None:
    interpret = jax.default_backend() == 'cpu'

  # The mask as int8 (a quarter of a float32 bias's bytes, read by every
  # program of a kv row), padded to whole blocks; the kernel makes the bias.
  s_pad = pl.cdiv(read, block_s) * block_s
  valid = jnp.pad(valid.astype(jnp.int8), ((0, 0), (0, 0), (0, s_pad - read)))

  if kv_layout == 'BSKH':
    kv_spec = pl.BlockSpec((None, s, None, h), lambda i, j: (i, 0, j, 0))
  else:
    kv_spec = pl.BlockSpec((None, None, s, h), lambda i, j: (i, j, 0, 0))
  # q as [B*R, Q, H] and the output as [B*R, K*G, H], whole: each program
  # finds its [R, G] block of rows.
  whole = lambda shape: pl.BlockSpec(shape, lambda i, j: (0, 0, 0))
  out_shape = jax.ShapeDtypeStruct((b * beams, kh * group, h), q.dtype)
  in_specs = [whole((b * beams,) + q.shape[2:]), kv_spec, kv_spec,
              pl.BlockSpec((None, valid.shape[1], s_pad), lambda i, j: (i, 0, 0))]
  args = [q.reshape(b * beams, *q.shape[2:]), k, v, valid]
  out_specs, aliases = whole(out_shape.shape), {}
  if write_slot is not None:
    in_specs.append(pl.BlockSpec((1,), lambda i, j: (0,)))
    args.append(jnp.asarray(write_slot, jnp.int32).reshape(1))
    out_shape = (out_shape, jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct(v.shape, v.dtype))
    out_specs, aliases = (out_specs, kv_spec, kv_spec), {1: 1, 2: 2}
  out = pl.pallas_call(
      functools.partial(_kernel, block_s=block_s, seq_len=read, beams=beams,
                        group=group, scale=scale, write=write_slot is not None),
      out_shape=out_shape,
      grid=(b, kh),
      in_specs=in_specs,
      out_specs=out_specs,
      input_output_aliases=aliases,
      compiler_params=plgpu.CompilerParams(num_warps=num_warps,
                                           num_stages=num_stages),
      interpret=interpret,
      name='decode_attention' + ('_write' if write_slot is not None else ''),
  )(*args)
  if write_slot is not None:
    out, k, v = out
    return out.reshape(b, beams, kh * group, h), k, v
  return out.reshape(b, beams, kh * group, h) if rows else out.reshape(b, kh, group, h)


def reference_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                        valid: jax.Array, kv_layout: str = 'BSKH') -> jax.Array:
  """The XLA einsum version of `decode_attention`, same semantics."""
  if kv_layout == 'BKSH':
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  logits = jnp.einsum('BKMH,BSKH->BKMS', q, k,
                      preferred_element_type=jnp.float32)
  logits = jnp.where(valid[:, None, None, :], logits, _NEG_INF)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum('BKMS,BSKH->BKMH', probs, v)


def _selfcheck(reps: int = 20):
  """Compiled kernel vs. reference at decode shapes: error and median ms."""
  print(jax.devices()[0])

  def median_ms(f, *args, chain=20):
    # `chain` dependent calls in one executable, so that host dispatch (tens
    # of microseconds a call) does not hide the kernel's device time.
    g = jax.jit(lambda q, *kv: lax.fori_loop(0, chain, lambda _, x: f(x, *kv),
                                             q, unroll=True))
    jax.block_until_ready(g(*args))
    times = []
    for _ in range(reps):
      t0 = time.perf_counter()
      jax.block_until_ready(g(*args))
      times.append((time.perf_counter() - t0) / chain)
    return 1e3 * sorted(times)[reps // 2]

  s, h = 128, 128
  for b, kh, m in [(1024, 1, 8), (1024, 8, 1), (256, 1, 32), (256, 8, 4)]:
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (b, kh, m, h), jnp.bfloat16) * h**-0.5
    k = jax.random.normal(keys[1], (b, s, kh, h), jnp.bfloat16)
    v = jax.random.normal(keys[2], (b, s, kh, h), jnp.bfloat16)
    valid = jax.random.uniform(keys[3], (b, s)) < 0.9
    name = f'B={b} K={kh} M={m} S={s} H={h} bf16'
    ref_fn = jax.jit(reference_attention)
    want = ref_fn(q, k, v, valid).astype(jnp.float32)
    try:
      fn = jax.jit(decode_attention)
      got = fn(q, k, v, valid).astype(jnp.float32)
      err = jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want))
      ms = median_ms(fn, q, k, v, valid)
      print(f'{name}: max rel err {float(err):.2e}, kernel {ms:.3f} ms '
            f'({(k.nbytes + v.nbytes) / ms / 1e9:.2f} TB/s of K/V), '
            f'XLA {median_ms(ref_fn, q, k, v, valid):.3f} ms')
    except Exception as e:  # pylint: disable=broad-except
      print(f'{name}: kernel failed: {type(e).__name__}: {e}')


if __name__ == '__main__':
  _selfcheck()
