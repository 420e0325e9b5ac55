"""The LayerNorm folded into its GEMM (interpret mode on CPU) against flax's
LayerNorm followed by the dense layer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import randomize_layer_norm
from mqa_flax.pallas_norm_gemm import fold, norm_gemm


def _case(b, d, n, mean=0.0, seed=0):
  kx, kw, kb, kn = jax.random.split(jax.random.key(seed), 4)
  ln = randomize_layer_norm(nnx.LayerNorm(d, use_fast_variance=False,
                                          rngs=nnx.Rngs(0)), kn)
  x = 2 * jax.random.normal(kx, (b, d)) + mean
  return ln, x, jax.random.normal(kw, (d, n)) / d**0.5, jax.random.normal(kb, (n,))


def _reference(ln, x, w, b, dtype, relu):
  y = jnp.dot(ln(x.astype(dtype)).astype(dtype), w.astype(dtype),
              preferred_element_type=jnp.float32) + jnp.asarray(b)[None]
  return jnp.maximum(y, 0) if relu else y


@pytest.mark.parametrize('b,d,n,relu', [
    (5, 32, 48, False),   # Rows padded to a block; N = 48 in blocks of 16.
    (40, 64, 40, True),   # N without a power-of-2 divisor >= 16: padded columns.
    (64, 128, 256, True)])
def test_equals_layer_norm_then_dense_in_float32(b, d, n, relu):
  ln, x, w, bias = _case(b, d, n)
  got = norm_gemm(x, fold(ln.scale[...], ln.bias[...], w, bias, ln.epsilon,
                          jnp.float32), relu=relu, block_b=32, block_n=64, block_d=32)
  assert got.shape == (b, n) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, _reference(ln, x, w, bias, jnp.float32, relu),
                             atol=2e-5, rtol=2e-5)


def test_bfloat16_within_its_rounding():
  # A residual row with a mean beside its spread: the centring cancels what
  # the GEMM added. bf16 results differ from XLA's path by the rounding of
  # the normalised rows (XLA) or of diag(scale) W (here), a few bf16 ulps.
  ln, x, w, bias = _case(64, 256, 128, mean=1.0)
  f = fold(ln.scale[...], ln.bias[...], w, bias, ln.epsilon, jnp.bfloat16)
  got = norm_gemm(x.astype(jnp.bfloat16), f)
  assert got.dtype == jnp.bfloat16  # The weights' dtype.
  got = got.astype(jnp.float32)
  ref = _reference(ln, x, w, bias, jnp.bfloat16, False)
  exact = _reference(ln, x.astype(jnp.bfloat16).astype(jnp.float32), w, bias,
                     jnp.float32, False)
  scale = float(jnp.abs(exact).max())
  err_here = float(jnp.abs(got - exact).max())
  err_xla = float(jnp.abs(ref - exact).max())
  assert err_here < 0.03 * scale and err_here < 3 * err_xla, (err_here, err_xla)


def test_without_bias_and_odd_width_is_a_clear_error():
  ln, x, w, _ = _case(4, 32, 32)
  f = fold(ln.scale[...], ln.bias[...], w, None, ln.epsilon, jnp.float32)
  np.testing.assert_allclose(norm_gemm(x, f), _reference(ln, x, w, jnp.zeros(1), jnp.float32,
                                                         False), atol=2e-5, rtol=2e-5)
  with pytest.raises(ValueError, match='multiple of 16'):
    fold(jnp.ones(24), jnp.zeros(24), jnp.ones((24, 16)), None, 1e-6, jnp.float32)
  with pytest.raises(ValueError, match='width'):
    norm_gemm(jnp.ones((4, 48)), f)
