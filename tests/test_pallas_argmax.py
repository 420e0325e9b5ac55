"""Greedy's fused logits argmax (interpret mode on CPU) against jnp.argmax."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mqa_flax.pallas_argmax import logits_argmax


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
  # Rows 70, 37 and 90 tie for the largest logit, in three tiles of 32.
  x = jnp.ones((3, 16), jnp.float32)
  e = jnp.zeros((100, 16), jnp.float32).at[jnp.array([70, 37, 90])].set(1.0)
  np.testing.assert_array_equal(logits_argmax(x, e, block_v=32), [37, 37, 37])


def test_ids_below_min_id_are_never_chosen():
  x = jnp.ones((2, 16), jnp.float32)
  e = jnp.zeros((50, 16), jnp.float32).at[0].set(5.0).at[1].set(3.0).at[33].set(4.0)
  assert logits_argmax(x, e, block_v=16).tolist() == [0, 0]
  assert logits_argmax(x, e, block_v=16, min_id=1).tolist() == [33, 33]
  assert logits_argmax(x, e, block_v=16, min_id=34).tolist() == [34, 34]


@pytest.mark.parametrize('kwargs,match', [
    (dict(block_v=48), 'block_v must be a power of 2'),
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
