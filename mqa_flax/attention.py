"""Attention with N query heads and K key/value heads: one code path for all.

K == N is multi-head attention, K == 1 multi-query attention (Shazeer 2019),
anything between grouped-query attention (Ainslie et al. 2023). Queries are
regrouped as (K, G) with G = N // K so that each K/V head serves G query heads.

Dimension letters: B batch, T query length, S key length, D model width,
N query heads, K key/value heads, G = N // K, H head dimension, R query rows
per key/value row (beams of a sentence sharing its cross-attention memory).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from mqa_flax.config import check_heads

_NEG_INF = -1e30  # Finite, so fully masked rows give a uniform softmax.


def dot_product_attention(q_BTNH: jax.Array, k_BSKH: jax.Array,
                          v_BSKH: jax.Array, mask_BTS: jax.Array) -> jax.Array:
  """Grouped attention of N query heads over K key/value heads.

  The query batch may be R times the key/value batch (rows b*R .. b*R+R-1
  attend to key/value row b): beam search shares one sentence's encoder
  memory between its beams this way, without copying it.

  Args:
    q_BTNH: queries, already scaled.
    k_BSKH: keys.
    v_BSKH: values.
    mask_BTS: True where query t may attend to key s (query batch).

  Returns:
    The attended values, [B, T, N, H].
  """
  b, t, n, h = q_BTNH.shape
  bk, s, k, _ = k_BSKH.shape
  r, g = b // bk, n // k
  # Fold the R query rows that share a key/value row into the query axis.
  q = q_BTNH.reshape(bk, r * t, k, g, h)
  logits = jnp.einsum('BTKGH,BSKH->BKGTS', q, k_BSKH,
                      preferred_element_type=jnp.float32)
  mask = mask_BTS.reshape(bk, 1, 1, r * t, s)
  logits = jnp.where(mask, logits, _NEG_INF)
  probs = jax.nn.softmax(logits, axis=-1).astype(v_BSKH.dtype)
  out = jnp.einsum('BKGTS,BSKH->BTKGH', probs, v_BSKH)
  return out.reshape(b, t, n, h)


class Attention(nnx.Module):
  """Projections for N query heads and K key/value heads, plus the output."""

  def __init__(self, d_model: int, num_heads: int, num_kv_heads: int,
               head_dim: int, dtype: jnp.dtype, *, rngs: nnx.Rngs):
    check_heads(num_heads, num_kv_heads)
    init = jax.nn.initializers.normal
    self.dtype = dtype
    self.head_dim = head_dim
    self.q = nnx.Param(
        init(d_model**-0.5)(rngs.params(), (d_model, num_heads, head_dim)))
    self.k = nnx.Param(
        init(d_model**-0.5)(rngs.params(), (d_model, num_kv_heads, head_dim)))
    self.v = nnx.Param(
        init(d_model**-0.5)(rngs.params(), (d_model, num_kv_heads, head_dim)))
    self.o = nnx.Param(init((num_heads * head_dim)**-0.5)(
        rngs.params(), (num_heads, head_dim, d_model)))

  def project_kv(self, x_BSD: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Keys and values, [B, S, K, H] each (what a decode cache stores)."""
    x = x_BSD.astype(self.dtype)
    k = jnp.einsum('BSD,DKH->BSKH', x, self.k[...].astype(self.dtype))
    v = jnp.einsum('BSD,DKH->BSKH', x, self.v[...].astype(self.dtype))
    return k, v

  def attend(self, x_BTD: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array,
             mask_BTS: jax.Array) -> jax.Array:
    """Projects queries from x, attends to given keys/values, projects out."""
    x = x_BTD.astype(self.dtype)
    q = jnp.einsum('BTD,DNH->BTNH', x, self.q[...].astype(self.dtype))
    q = q * jnp.asarray(self.head_dim**-0.5, self.dtype)
    y = dot_product_attention(q, k_BSKH, v_BSKH, mask_BTS)
    return jnp.einsum('BTNH,NHD->BTD', y, self.o[...].astype(self.dtype))

  def __call__(self, x_BTD: jax.Array, y_BSD: jax.Array,
               mask_BTS: jax.Array) -> jax.Array:
    """Queries from x attend to keys and values from y."""
    k, v = self.project_kv(y_BSD)
    return self.attend(x_BTD, k, v, mask_BTS)
