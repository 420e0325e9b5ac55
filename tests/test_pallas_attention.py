"""The Pallas decode kernel (interpret mode on CPU) against a float32 einsum."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mqa_flax.pallas_attention import decode_attention, reference_attention

N = 8  # Query heads; M = R * N // K query rows per kv head.


def _inputs(b, s, kh, m, h, dtype, kv_layout, seed=0):
  """Random q, k, v and a random mask with one single-position and one empty row."""
  keys = jax.random.split(jax.random.key(seed), 4)
  kv_shape = (b, s, kh, h) if kv_layout == 'BSKH' else (b, kh, s, h)
  q = (jax.random.normal(keys[0], (b, kh, m, h)) * h**-0.5).astype(dtype)
  k = jax.random.normal(keys[1], kv_shape).astype(dtype)
  v = jax.random.normal(keys[2], kv_shape).astype(dtype)
  valid = jax.random.uniform(keys[3], (b, s)) < 0.7
  valid = valid.at[1].set(jnp.arange(s) == s - 1)  # Only the last (tail) one.
  valid = valid.at[2].set(False)  # Nothing valid: mean of v over S.
  return q, k, v, valid


def _f32_reference(q, k, v, valid, kv_layout):
  f32 = lambda x: x.astype(jnp.float32)
  return reference_attention(f32(q), f32(k), f32(v), valid, kv_layout)


@pytest.mark.parametrize('kv_layout', ['BSKH', 'BKSH'])
@pytest.mark.parametrize('kh,beams', [(1, 2), (2, 1), (8, 2)])
def test_matches_reference_float32(kh, beams, kv_layout):
  # S = 40 is not a multiple of block_s = 16: the tail block is masked.
  m = beams * N // kh
  q, k, v, valid = _inputs(3, 40, kh, m, 32, jnp.float32, kv_layout)
  got = decode_attention(q, k, v, valid, kv_layout=kv_layout, block_s=16)
  assert got.shape == q.shape and got.dtype == q.dtype
  want = _f32_reference(q, k, v, valid, kv_layout)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('kh,beams', [(1, 1), (2, 1), (1, 4), (2, 4), (8, 3)])
def test_queries_read_in_place_from_a_merged_projection(kh, beams):
  # q as [B, R, Q, H] with rows=G: kv head j's queries are heads j*G ..
  # j*G+G-1 of each of the R beams' q[b, r]; the heads after K*G (a merged
  # projection's keys and values) are never read, so NaN there changes
  # nothing, and the output keeps q's order [B, R, K*G, H]. Same values as
  # the [B, K, R*G, H] form, with a mask per beam.
  g = N // kh
  q, k, v, _ = _inputs(3, 40, kh, beams * g, 32, jnp.float32, 'BSKH', seed=2)
  valid = jax.random.uniform(jax.random.key(beams), (3, beams, 40)) < 0.5
  q_rows = q.reshape(3, kh, beams, g, 32).transpose(0, 2, 1, 3, 4)  # [B, R, K, G, H]
  merged = jnp.concatenate([q_rows.reshape(3, beams, kh * g, 32),
                            jnp.full((3, beams, 2 * kh, 32), jnp.nan)], axis=2)
  got = decode_attention(merged, k, v, valid, rows=g, block_s=16)
  want = decode_attention(q, k, v, valid, block_s=16)  # [B, K, R*G, H]
  want = want.reshape(3, kh, beams, g, 32).transpose(0, 2, 1, 3, 4)
  np.testing.assert_array_equal(got, want.reshape(3, beams, kh * g, 32))
  with pytest.raises(ValueError, match='fewer than K'):
    decode_attention(merged[:, :, :kh * g - 1], k, v, valid, rows=g)


@pytest.mark.parametrize('kv_layout', ['BSKH', 'BKSH'])
@pytest.mark.parametrize('kh,groups', [(1, 4), (2, 2), (8, 2)])
def test_each_group_of_query_rows_takes_its_own_mask(kh, groups, kv_layout):
  # valid [B, R, S]: query rows r*M/R .. (r+1)*M/R - 1 of each kv head see
  # valid[b, r], as each beam sees its own history in the 'pointers' cache;
  # group 1 of batch row 2 sees nothing (the mean of v).
  m = groups * N // kh
  q, k, v, _ = _inputs(3, 40, kh, m, 32, jnp.float32, kv_layout, seed=3)
  valid = jax.random.uniform(jax.random.key(5), (3, groups, 40)) < 0.5
  valid = valid.at[2, 1].set(False)
  got = decode_attention(q, k, v, valid, kv_layout=kv_layout, block_s=16)
  per_row = jnp.repeat(valid, m // groups, axis=1)  # [B, M, S]
  for row in range(m):
    want = _f32_reference(q[:, :, row:row + 1], k, v, per_row[:, row], kv_layout)
    np.testing.assert_allclose(got[:, :, row:row + 1], want, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match='dividing M'):
    decode_attention(q, k, v, jnp.ones((3, 3, 40), bool), kv_layout=kv_layout)


@pytest.mark.parametrize('kv_layout', ['BSKH', 'BKSH'])
@pytest.mark.parametrize('kh,beams,read', [(1, 1, 40), (2, 1, 23), (8, 1, 40),
                                           (1, 3, None), (2, 4, None)])
def test_write_slot_writes_the_new_kv_and_attends_to_them(kh, beams, read,
                                                          kv_layout):
  # A merged projection [B, R, K*G + 2K, H]: each beam r's keys and values
  # (heads K*G + j and K*G + K + j) go to key position r*L + slot of its own
  # cache row of L = S/R positions, in place, and the output is attention
  # over the written cache (the first `read` positions of it), where beam r
  # sees, of the R written positions, its own only (valid or not).
  g, b, h, length, slot = N // kh, 3, 32, 20, 5
  s = beams * length if read is None else read
  read = s if read is None else 17
  kv_shape = (b, s, kh, h) if kv_layout == 'BSKH' else (b, kh, s, h)
  keys = jax.random.split(jax.random.key(kh * beams), 4)
  merged = jax.random.normal(keys[0], (b, beams, kh * g + 2 * kh, h))
  k = jax.random.normal(keys[1], kv_shape)
  v = jax.random.normal(keys[2], kv_shape)
  valid = jax.random.uniform(keys[3], (b, beams, read)) < 0.6
  valid = valid.at[1].set(False)  # Row 1 sees the new position alone.
  got, got_k, got_v = jax.jit(
      decode_attention, static_argnames=('kv_layout', 'rows', 'block_s'))(
          merged, k, v, valid, kv_layout=kv_layout, rows=g,
          write_slot=jnp.int32(slot), block_s=16)
  axis = 1 if kv_layout == 'BSKH' else 2
  new_k = merged[:, :, kh * g:kh * g + kh]  # [B, R, K, H]
  new_v = merged[:, :, kh * g + kh:]
  want_k, want_v = np.array(k), np.array(v)
  for r in range(beams):
    at = (slice(None),) * axis + (r * (s // beams) + slot,)
    want_k[at], want_v[at] = new_k[:, r], new_v[:, r]
  np.testing.assert_array_equal(got_k, want_k)
  np.testing.assert_array_equal(got_v, want_v)
  assert not np.array_equal(got_k, k)  # The write changed something.
  first = (slice(None),) * axis + (slice(0, read),)
  queries = merged[:, :, :kh * g].reshape(b, beams, kh, g, h)
  queries = queries.transpose(0, 2, 1, 3, 4).reshape(b, kh, beams * g, h)
  written = jnp.arange(read) % (s // beams) == slot  # Every beam's new position.
  own = jnp.arange(read)[None, :] == (jnp.arange(beams) * (s // beams) + slot)[:, None]
  seen = (valid & ~written[None, None]) | own[None]  # [B, R, S']
  per_row = jnp.repeat(seen, g, axis=1)  # [B, M, S']
  for row in range(beams * g):
    want = _f32_reference(queries[:, :, row:row + 1], want_k[first], want_v[first],
                          per_row[:, row], kv_layout)
    r, j = divmod(row, g)
    np.testing.assert_allclose(got[:, r, :].reshape(b, kh, g, h)[:, :, j:j + 1],
                               want, rtol=1e-5, atol=1e-5)


def test_empty_row_is_mean_of_values():
  q, k, v, valid = _inputs(3, 40, 2, 4, 32, jnp.float32, 'BSKH')
  got = decode_attention(q, k, v, valid, block_s=16)
  want = jnp.broadcast_to(v[2].mean(axis=0)[:, None, :], got[2].shape)
  np.testing.assert_allclose(got[2], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('kv_layout', ['BSKH', 'BKSH'])
@pytest.mark.parametrize('kh', [1, 8])
def test_matches_reference_bfloat16(kh, kv_layout):
  # Tolerance 2e-2: bf16 output and bf16 softmax weights before the p.v product
  # (the model's einsum path rounds them the same way).
  m = 2 * N // kh
  q, k, v, valid = _inputs(3, 100, kh, m, 64, jnp.bfloat16, kv_layout, seed=1)
  got = decode_attention(q, k, v, valid, kv_layout=kv_layout)  # block_s 64.
  assert got.dtype == jnp.bfloat16
  want = _f32_reference(q, k, v, valid, kv_layout)
  np.testing.assert_allclose(got.astype(jnp.float32), want, rtol=2e-2,
                             atol=2e-2)


def test_under_jit_matches_eager():
  q, k, v, valid = _inputs(3, 40, 2, 8, 32, jnp.float32, 'BKSH')
  fn = jax.jit(decode_attention, static_argnames=('kv_layout', 'block_s'))
  np.testing.assert_allclose(
      fn(q, k, v, valid, kv_layout='BKSH', block_s=32),
      decode_attention(q, k, v, valid, kv_layout='BKSH', block_s=32),
      rtol=1e-6, atol=1e-6)


def test_bad_arguments_raise():
  q, k, v, valid = _inputs(3, 40, 2, 8, 32, jnp.float32, 'BSKH')
  with pytest.raises(ValueError, match='kv_layout'):
    decode_attention(q, k, v, valid, kv_layout='SBKH')
  with pytest.raises(ValueError, match='B, K or H'):
    decode_attention(q[..., :16], k, v, valid)  # Head dims differ.
  with pytest.raises(ValueError, match='B, K or H'):
    decode_attention(q[:, :1], k, v, valid)  # q has 1 kv head, k has 2.
  with pytest.raises(ValueError, match='B, K or H'):
    decode_attention(q, k, v, valid, kv_layout='BKSH')  # k is BSKH.
  with pytest.raises(ValueError, match='4-d'):
    decode_attention(q[:, :, 0], k, v, valid)  # No M axis.
  with pytest.raises(ValueError, match='valid'):  # More positions than k has.
    decode_attention(q, k, v, jnp.pad(valid, ((0, 0), (0, 1))))
  with pytest.raises(ValueError, match='write_slot needs'):  # No K/V heads in q.
    decode_attention(q, k, v, valid, write_slot=jnp.int32(0))
  with pytest.raises(ValueError, match='dtypes'):
    decode_attention(q.astype(jnp.bfloat16), k, v, valid)
  with pytest.raises(ValueError, match='block_s'):
    decode_attention(q, k, v, valid, block_s=24)
