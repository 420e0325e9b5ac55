"""dot_product_attention and Attention against a naive per-head reference."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import cudnn_on_cpu
from mqa_flax import attention

B, T, S, N, H = 2, 3, 5, 4, 8
# One compiled program per case: faster on CPU than op-by-op dispatch.
_dpa = jax.jit(attention.dot_product_attention,
               static_argnames=('impl', 'kv_layout', 'num_kv_heads', 'scale'))


def _inputs(k, b=B, t=T, bk=None, seed=0):
  """Random scaled q [b, t, N, H], k and v [bk, S, k, H], a mask [b, t, S].

  The mask is random, with query (0, 0) seeing key 0 only and query (b-1, t-1)
  seeing nothing (a fully masked row).
  """
  rng = np.random.default_rng(seed)
  bk = b if bk is None else bk
  q = rng.normal(size=(b, t, N, H)).astype(np.float32) * H**-0.5
  kk = rng.normal(size=(bk, S, k, H)).astype(np.float32)
  v = rng.normal(size=(bk, S, k, H)).astype(np.float32)
  mask = rng.uniform(size=(b, t, S)) < 0.6
  mask[0, 0] = np.arange(S) == 0
  mask[-1, -1] = False
  return q, kk, v, mask


def _naive(q, k, v, mask):
  """Loops over batch, query and head; head n reads kv head n // G of row b // R.

  A fully masked row attends uniformly to every key (the module's finite
  -1e30 gives that softmax).
  """
  b, t, n, _ = q.shape
  bk, _, kh, _ = k.shape
  r, g = b // bk, n // kh
  out = np.zeros(q.shape, np.float64)
  for i in range(b):
    for j in range(t):
      for h in range(n):
        kv_row, kv_head = i // r, h // g
        logits = k[kv_row, :, kv_head] @ q[i, j, h]
        if mask[i, j].any():
          valid = mask[i, j]
          w = np.where(valid, np.exp(logits - logits[valid].max()), 0.0)
        else:
          w = np.ones(S)
        out[i, j, h] = (w / w.sum()) @ v[kv_row, :, kv_head]
  return out


def _to_bksh(x_BSKH):
  """[B, S, K, H] -> [B*K, S, H] (the bytes of [B, K, S, H])."""
  b, s, k, h = x_BSKH.shape
  return np.asarray(x_BSKH).transpose(0, 2, 1, 3).reshape(b * k, s, h)


@pytest.mark.parametrize('k', [N, 2, 1], ids=['mha', 'gqa', 'mqa'])
def test_matches_naive_per_head_reference(k):
  q, kk, v, mask = _inputs(k)
  got = _dpa(q, kk, v, mask)
  assert got.shape == (B, T, N, H)
  np.testing.assert_allclose(got, _naive(q, kk, v, mask), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('k', [2, 1], ids=['gqa', 'mqa'])
def test_bksh_layout_gives_the_same_output_as_bskh(k):
  q, kk, v, mask = _inputs(k, seed=1)
  bskh = _dpa(q, kk, v, mask)
  bksh = _dpa(q, _to_bksh(kk), _to_bksh(v), mask, kv_layout='BKSH', num_kv_heads=k)
  np.testing.assert_allclose(bksh, bskh, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('kv_layout', ['BSKH', 'BKSH'])
def test_r_query_rows_sharing_a_kv_row_equal_copied_kv(kv_layout):
  # 3 kv rows, R = 2 query rows each (rows 2b, 2b+1 read kv row b); the masks
  # of the two rows differ, which the xla path allows.
  k, r = 2, 2
  q, kk, v, mask = _inputs(k, b=3 * r, bk=3, seed=2)
  copied = [np.repeat(x, r, axis=0) for x in (kk, v)]
  want = _dpa(q, *copied, mask)
  np.testing.assert_allclose(want, _naive(q, kk, v, mask), rtol=1e-5, atol=1e-5)
  if kv_layout == 'BKSH':
    kk, v = _to_bksh(kk), _to_bksh(v)
  got = _dpa(q, kk, v, mask, kv_layout=kv_layout, num_kv_heads=k)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_fully_masked_row_is_finite_mean_of_values():
  q, kk, v, mask = _inputs(1, seed=3)
  got = np.asarray(_dpa(q, kk, v, mask))
  assert np.isfinite(got).all()
  # Query (B-1, T-1) sees nothing: every head gets the mean of v over S.
  want = np.broadcast_to(v[-1, :, 0].mean(axis=0), (N, H))
  np.testing.assert_allclose(got[-1, -1], want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(importlib.util.find_spec('mqa_flax.pallas_attention') is None,
                    reason='mqa_flax/pallas_attention.py absent')
def test_pallas_impl_at_one_query_position_equals_xla():
  # T == 1 and R = 2 rows per kv row sharing its mask, as in decoding; kv row 1
  # sees nothing.
  k, r = 2, 2
  q, kk, v, _ = _inputs(k, b=2 * r, t=1, bk=2, seed=4)
  valid = np.array([[True, False, True, True, False], [False] * S])
  mask = np.repeat(valid, r, axis=0)[:, None, :]
  want = _dpa(q, kk, v, mask)
  got = _dpa(q, _to_bksh(kk), _to_bksh(v), mask, impl='pallas', kv_layout='BKSH',
             num_kv_heads=k)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('k,r,t', [(1, 1, T), (2, 1, T), (N, 1, T), (2, 2, 1)])
def test_cudnn_call_equals_xla_values_and_gradients(monkeypatch, k, r, t):
  # T = 3 and S = 5 are odd: for whole sequences the call pads both by one
  # masked position (cuDNN's backward pass takes even lengths), which must
  # change nothing. (2, 2, 1): one query position, R = 2 rows per kv row
  # sharing its mask (beam search's cross-attention). Rows with no key to
  # attend to (padding) are left out: they average over what the call reads.
  shapes = cudnn_on_cpu(monkeypatch)
  q, kk, v, mask = _inputs(k, b=2 * r, t=t, bk=2, seed=11)
  if r > 1:
    mask = np.repeat(mask[::r], r, axis=0)
  seen = mask.any(-1)
  weights = np.random.default_rng(12).normal(size=q.shape) * seen[..., None, None]

  def loss(impl):
    return jax.jit(jax.value_and_grad(lambda q, kk, v: jnp.sum(weights * (
        attention.dot_product_attention(q, kk, v, mask, impl=impl, scale=0.7))),
                                      argnums=(0, 1, 2)))

  (want, want_grads), (got, got_grads) = loss('xla')(q, kk, v), loss('cudnn')(q, kk, v)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  for g, w in zip(got_grads, want_grads):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
  odd = t > 1  # T and S are odd: padded for whole sequences only.
  assert shapes == [((2, r * t + odd, N, H), (2, S + odd, k, H))]


@pytest.mark.parametrize('impl', ['xla', 'xla_reduce', 'pallas'])
def test_queries_given_as_a_merged_projection(impl):
  # With num_heads, q may be a merged projection [B, 1, N + 2K, H] whose
  # first N heads are the queries: each impl attends with those alone (the
  # NaN keys and values after them are never read).
  k = 2
  q, kk, v, mask = _inputs(k, t=1, seed=8)
  merged = np.concatenate([q, np.full((B, 1, 2 * k, H), np.nan, np.float32)], axis=2)
  want = _dpa(q, kk, v, mask, impl=impl)
  got = jax.jit(attention.dot_product_attention, static_argnames=(
      'impl', 'num_heads'))(merged, kk, v, mask, impl=impl, num_heads=N)
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize('kv_layout', ['BSKH', 'BKSH'])
@pytest.mark.parametrize('k', [N, 2, 1], ids=['mha', 'gqa', 'mqa'])
def test_xla_reduce_at_one_query_position_matches_naive(k, kv_layout):
  # Unscaled q with the scale given: 'xla_reduce' applies it to the scores.
  q, kk, v, mask = _inputs(k, t=1, seed=6)
  mask[0, 0] = False  # A fully masked row too.
  if kv_layout == 'BKSH':
    kk_in, v_in = _to_bksh(kk), _to_bksh(v)
  else:
    kk_in, v_in = kk, v
  got = _dpa(q / H**-0.5, kk_in, v_in, mask, impl='xla_reduce',
             kv_layout=kv_layout, num_kv_heads=k, scale=H**-0.5)
  np.testing.assert_allclose(got, _naive(q, kk, v, mask), rtol=1e-5, atol=1e-5)
  # The einsums with the same scale agree.
  want = _dpa(q / H**-0.5, kk_in, v_in, mask, kv_layout=kv_layout,
              num_kv_heads=k, scale=H**-0.5)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_xla_reduce_with_rows_sharing_a_kv_row_matches_naive():
  # R = 2 query rows per kv row (beam search's cross-attention) and T > 1:
  # both take the einsums, with the same results.
  k, r = 1, 2
  for t in (1, T):
    q, kk, v, mask = _inputs(k, b=2 * r, t=t, bk=2, seed=7)
    got = _dpa(q, kk, v, mask, impl='xla_reduce')
    np.testing.assert_allclose(got, _naive(q, kk, v, mask), rtol=1e-5, atol=1e-5)


def test_unknown_impl_or_layout_is_named():
  q, kk, v, mask = _inputs(1)
  with pytest.raises(ValueError, match="impl='flash'"):
    _dpa(q, kk, v, mask, impl='flash')
  with pytest.raises(ValueError, match="kv_layout='SBKH'"):
    _dpa(q, kk, v, mask, kv_layout='SBKH')


def _layer(d, k, seed=0):
  """An Attention layer with numpy-drawn weights (jax.random compiles slowly on CPU)."""
  graphdef, state = nnx.split(nnx.eval_shape(
      lambda: attention.Attention(d, N, k, H, jnp.float32, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(seed)
  return nnx.merge(graphdef, jax.tree.map(
      lambda x: jnp.asarray(rng.normal(size=x.shape) * 0.3, x.dtype), state))


def test_attention_module_refuses_heads_that_do_not_divide():
  with pytest.raises(ValueError, match='num_heads=4 .*num_kv_heads=3'):
    attention.Attention(16, 4, 3, H, jnp.float32, rngs=nnx.Rngs(0))


def test_call_is_attend_over_projected_kv():
  d, k = 16, 2
  layer = _layer(d, k)
  rng = np.random.default_rng(5)
  x = rng.normal(size=(B, T, d)).astype(np.float32)
  y = rng.normal(size=(B, S, d)).astype(np.float32)
  mask = rng.uniform(size=(B, T, S)) < 0.7
  w = {name: np.asarray(getattr(layer, name)[...]) for name in 'qkvo'}
  kk, v = layer.project_kv(y)
  assert kk.shape == v.shape == (B, S, k, H)
  np.testing.assert_allclose(kk, np.einsum('bsd,dkh->bskh', y, w['k']), rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(v, np.einsum('bsd,dkh->bskh', y, w['v']), rtol=1e-5,
                             atol=1e-5)
  out = layer(x, y, mask)
  assert out.shape == (B, T, d)
  np.testing.assert_allclose(out, layer.attend(x, kk, v, mask), rtol=1e-6, atol=1e-6)
  # Queries scaled by H**-0.5, the naive heads, the output projection.
  q = np.einsum('btd,dnh->btnh', x, w['q']) * H**-0.5
  heads = _naive(q, np.asarray(kk), np.asarray(v), mask)
  want = np.einsum('btnh,nhd->btd', heads, w['o'])
  np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5)
