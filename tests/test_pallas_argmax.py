"""The output GEMM's fused argmax and top-k (interpret mode on CPU) against
jnp.argmax, lax.top_k and logsumexp of the float32 logits, with the final
LayerNorm folded into the table or not."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import randomize_layer_norm
from mqa_flax.pallas_argmax import logits_argmax, logits_top_k
from mqa_flax.pallas_norm_gemm import fold


def _logits(x, e):
  return jnp.einsum('BD,VD->BV', x, e, preferred_element_type=jnp.float32)


@pytest.mark.parametrize('b,d,v', [(5, 32, 64), (40, 48, 300), (16, 64, 1000)])
def test_matches_argmax_of_float32_logits(b, d, v):
  # B, D and V that the blocks do not divide: padded rows, masked loads of
  # the last D step and of the last vocabulary tile.
  kx, ke = jax.random.split(jax.random.key(b))
  x = jax.random.normal(kx, (b, d), jnp.bfloat16)
  e = jax.random.normal(ke, (v, d), jnp.bfloat16)
  got = logits_argmax(x, e, block_b=32, block_v=64, block_d=32)
  assert got.shape == (b,) and got.dtype == jnp.int32
  np.testing.assert_array_equal(got, jnp.argmax(_logits(x, e), axis=-1))


def test_ties_go_to_the_smallest_index_across_tiles():
  # Rows 70, 37 and 90 tie for the largest logit, in three tiles of 32,
  # walked by one program, by two (2 tiles, 2 tiles) or by one each.
  x = jnp.ones((3, 16), jnp.float32)
  e = jnp.zeros((100, 16), jnp.float32).at[jnp.array([70, 37, 90])].set(1.0)
  for splits in (1, 2, None):
    np.testing.assert_array_equal(logits_argmax(x, e, block_v=32, splits=splits),
                                  [37, 37, 37])


def test_ids_below_min_id_are_never_chosen():
  x = jnp.ones((2, 16), jnp.float32)
  e = jnp.zeros((50, 16), jnp.float32).at[0].set(5.0).at[1].set(3.0).at[33].set(4.0)
  assert logits_argmax(x, e, block_v=16).tolist() == [0, 0]
  assert logits_argmax(x, e, block_v=16, min_id=1).tolist() == [33, 33]
  assert logits_argmax(x, e, block_v=16, min_id=34).tolist() == [34, 34]


@pytest.mark.parametrize('kwargs,match', [
    (dict(block_v=48), 'block_v must be a power of 2'),
    (dict(splits=0), 'need splits >= 1'),
    (dict(min_id=50), 'min_id=50'),
])
def test_bad_arguments_are_refused(kwargs, match):
  with pytest.raises(ValueError, match=match):
    logits_argmax(jnp.ones((2, 16)), jnp.ones((50, 16)), **kwargs)


def test_shapes_and_dtypes_are_checked():
  with pytest.raises(ValueError, match='x \\[B, D\\] and embed \\[V, D\\]'):
    logits_argmax(jnp.ones((2, 16)), jnp.ones((50, 8)))
  with pytest.raises(ValueError, match='dtypes differ'):
    logits_argmax(jnp.ones((2, 16)), jnp.ones((50, 16), jnp.bfloat16))


@pytest.mark.parametrize('b,d,v,k,splits', [
    (5, 32, 64, 8, 4),  # One tile per split.
    (40, 48, 300, 6, 3),  # k not a power of 2; the last split part empty.
    (16, 64, 1000, 8, 40),  # More splits asked for than there are tiles.
])
def test_top_k_matches_top_k_and_logsumexp_of_float32_logits(b, d, v, k, splits):
  kx, ke = jax.random.split(jax.random.key(v))
  x = jax.random.normal(kx, (b, d), jnp.bfloat16)
  e = jax.random.normal(ke, (v, d), jnp.bfloat16)
  top, ids, log_z = logits_top_k(x, e, k, min_id=1, splits=splits, block_b=32,
                                 block_v=32, block_d=32)
  assert top.shape == ids.shape == (b, k) and log_z.shape == (b,)
  assert (top.dtype, ids.dtype, log_z.dtype) == (jnp.float32, jnp.int32, jnp.float32)
  logits = _logits(x, e).at[:, 0].set(-jnp.inf)
  want_top, want_ids = jax.lax.top_k(logits, k)
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_allclose(top, want_top, rtol=1e-6)
  np.testing.assert_allclose(log_z, jax.nn.logsumexp(logits, axis=-1), rtol=1e-5)


def test_top_k_keeps_the_smallest_ids_of_a_tie_and_pads_with_minus_inf():
  # Ids 3, 40, 70 and 90 tie (in four tiles of 32): k = 2 keeps 3 and 40,
  # whether the tiles are walked by one program or by two.
  x = jnp.ones((2, 16), jnp.float32)
  e = jnp.zeros((100, 16), jnp.float32).at[jnp.array([90, 70, 40, 3])].set(1.0)
  for splits in (1, 2):
    top, ids, _ = logits_top_k(x, e, 2, block_v=32, splits=splits)
    np.testing.assert_array_equal(top, [[16, 16]] * 2)
    np.testing.assert_array_equal(jnp.sort(ids, axis=1), [[3, 40]] * 2)
  # Only ids >= min_id = 96 count: 4 of them, so 2 of k = 6 are -inf.
  top, ids, log_z = logits_top_k(x, e, 6, min_id=96, block_v=32)
  assert np.isneginf(top[:, 4:]).all() and np.isfinite(top[:, :4]).all()
  np.testing.assert_array_equal(jnp.sort(ids[:, :4], axis=1), [[96, 97, 98, 99]] * 2)
  np.testing.assert_allclose(log_z, np.log(4.0), rtol=1e-6)


@pytest.mark.parametrize('kwargs,match', [
    (dict(k=0), 'need k >= 1'),
    (dict(k=2, splits=0), 'splits >= 1'),
    (dict(k=2, block_b=8), 'block_b must be a power of 2'),
])
def test_top_k_bad_arguments_are_refused(kwargs, match):
  with pytest.raises(ValueError, match=match):
    logits_top_k(jnp.ones((2, 16)), jnp.ones((50, 16)), **kwargs)


@pytest.mark.parametrize('b,d,v,splits', [(5, 32, 64, None), (40, 48, 300, 2),
                                          (16, 64, 1000, 3)])
def test_folded_final_layer_norm_matches_its_logits(b, d, v, splits):
  # Raw rows (mean 1, beside their spread) and the table with the LayerNorm
  # folded in: the argmax, top k and log Σ exp of LN(x) Eᵀ, float32; D not a
  # multiple of block_d (48) takes the masked loads in the statistics too.
  kx, ke = jax.random.split(jax.random.key(v))
  ln = randomize_layer_norm(nnx.LayerNorm(d, use_fast_variance=False,
                                         rngs=nnx.Rngs(0)), jax.random.key(d))
  x = jax.random.normal(kx, (b, d)) + 1.0
  e = jax.random.normal(ke, (v, d))
  table = fold(ln.scale[...], ln.bias[...], e, None, ln.epsilon, jnp.float32,
               table=True)
  logits = _logits(ln(x), e)
  blocks = dict(splits=splits, block_b=32, block_v=32, block_d=32)
  np.testing.assert_array_equal(logits_argmax(x, table, min_id=1, **blocks),
                                jnp.argmax(logits.at[:, 0].set(-jnp.inf), axis=-1))
  top, ids, log_z = logits_top_k(x, table, 4, min_id=1, **blocks)
  logits = logits.at[:, 0].set(-jnp.inf)
  want_top, want_ids = jax.lax.top_k(logits, 4)
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_allclose(top, want_top, atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(log_z, jax.nn.logsumexp(logits, axis=-1), rtol=2e-5)
