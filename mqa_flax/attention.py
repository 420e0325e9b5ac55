"""Attention with N query heads and K key/value heads: one code path for all.

K == N is multi-head attention, K == 1 multi-query attention (Shazeer 2019),
anything between grouped-query attention (Ainslie et al. 2023). Queries are
regrouped as (K, G) with G = N // K so that each K/V head serves G query heads.

Dimension letters: B batch, T query length, S key length, D model width,
N query heads, K key/value heads, G = N // K, H head dimension, R query rows
per key/value row (beams of a sentence sharing its cross-attention memory).
"""

import contextlib
import contextvars

import jax
import jax.numpy as jnp
from flax import nnx

from mqa_flax.config import ATTENTION_IMPLS
from mqa_flax.config import check_heads

_NEG_INF = -1e30  # Finite, so fully masked rows give a uniform softmax.
KV_LAYOUTS = ('BSKH', 'BKSH')  # Key/value array layouts.
_FOR_GPU = contextvars.ContextVar('for_gpu', default=False)


@contextlib.contextmanager
def compiling_for_gpu():
  """Functions traced inside target a GPU where the default backend is the
  CPU: deviceless compilation for one (`mqa_flax.gpu_program`)."""
  token = _FOR_GPU.set(True)
  try:
    yield
  finally:
    _FOR_GPU.reset(token)


def for_gpu() -> bool:
  """Whether the program being traced is for a GPU (see compiling_for_gpu)."""
  return jax.default_backend() == 'gpu' or _FOR_GPU.get()


def dot_product_attention(q_BTNH: jax.Array, k: jax.Array, v: jax.Array,
                          mask_BTS: jax.Array, impl: str = 'xla',
                          kv_layout: str = 'BSKH', num_kv_heads: int = 0,
                          scale: float = 1.0, num_heads: int = 0,
                          row_masks: bool = False) -> jax.Array:
  """Grouped attention of N query heads over K key/value heads.

  The query batch may be R times the key/value batch (rows b*R .. b*R+R-1
  attend to key/value row b): beam search shares one sentence's encoder
  memory between its beams this way, without copying it, and with
  `row_masks` its beams their self-attention cache (each with its own mask).

  `impl` chooses how it is computed, never what: 'xla' (grouped einsums, any
  T), 'cudnn' (cuDNN's fused attention, `jax.nn.dot_product_attention`, on
  a GPU, layout BSKH only, any T) or, for one query position (T == 1,
  incremental decoding), 'xla_reduce' (the same sums written as products
  and reductions, which XLA fuses with the softmax, where R = 1; with R > 1
  the einsums; see `_attention_by_reductions`) or 'pallas'
  (`mqa_flax.pallas_attention.decode_attention`). Those three need the R
  rows that share a key/value row to share its mask too, unless `row_masks`.

  Args:
    q_BTNH: queries; with `num_heads` = N, the first N heads of a merged
      projection [B, T, N + 2K, H] (`Attention.project_qkv`), which 'pallas'
      reads in place and the others slice.
    k: keys, [B, S, K, H] for kv_layout 'BSKH', or [B*K, S, H] for 'BKSH'
      (the bytes of [B, K, S, H], stored with B and K merged: XLA then reads
      it as stored, with no reshape between a cache update and its read).
    v: values, laid out as k.
    mask_BTS: True where query t may attend to key s (query batch).
    impl: one of config.ATTENTION_IMPLS (T == 1) or SEQ_ATTENTION_IMPLS.
    kv_layout: 'BSKH' or 'BKSH'.
    num_kv_heads: K, needed for 'BKSH' only.
    scale: multiplies q.k (1/sqrt(H) in a Transformer): 'xla_reduce',
      'cudnn' and 'pallas' apply it to the float32 scores, 'xla' to q in its
      dtype.
    num_heads: N, where q_BTNH holds more heads than the queries.
    row_masks: the R rows that share a key/value row each have a mask of
      their own (beam search's 'pointers' cache): 'pallas' takes them all,
      'xla_reduce' and 'cudnn' leave it to the einsums.

  Returns:
    The attended values, [B, T, N, H].
  """
  if kv_layout not in KV_LAYOUTS:
    raise ValueError(f'kv_layout={kv_layout!r}; expected one of {KV_LAYOUTS}')
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f'attention impl={impl!r}; expected one of {ATTENTION_IMPLS}')
  b, t, n, h = q_BTNH.shape
  n = num_heads or n
  if kv_layout == 'BSKH':
    bk, s, kh, _ = k.shape
  else:
    kh = num_kv_heads
    bk, s = k.shape[0] // kh, k.shape[1]
  r, g = b // bk, n // kh
  if impl == 'pallas' and t == 1:
    valid = mask_BTS.reshape(bk, r, s)
    return _pallas_attention(q_BTNH, k, v, valid if row_masks else valid[:, 0],
                             kv_layout, kh, scale, n)
  if row_masks and r > 1:
    impl = 'xla'
  q_BTNH = q_BTNH[:, :, :n]
  if impl == 'xla_reduce' and t == 1 and r == 1:
    return _attention_by_reductions(q_BTNH, k, v, mask_BTS[:, 0], kv_layout, kh,
                                    scale)
  if impl == 'cudnn':
    return _cudnn_attention(q_BTNH, k, v, mask_BTS, kv_layout, scale)
  if scale != 1.0:
    q_BTNH = q_BTNH * jnp.asarray(scale, q_BTNH.dtype)
  # Fold the R query rows that share a key/value row into the query axis.
  q = q_BTNH.reshape(bk, r * t, kh, g, h)
  if kv_layout == 'BSKH':
    logits = jnp.einsum('BTKGH,BSKH->BKGTS', q, k,
                        preferred_element_type=jnp.float32)
    mask = mask_BTS.reshape(bk, 1, 1, r * t, s)
    logits = jnp.where(mask, logits, _NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum('BKGTS,BSKH->BTKGH', probs, v)
    return out.reshape(b, t, n, h)
  # [B*K, S, H]: one batched matmul over C = B*K rows of Q = R*T*G queries.
  queries = r * t * g
  q = q.transpose(0, 2, 1, 3, 4).reshape(bk * kh, queries, h)
  logits = jnp.einsum('CSH,CQH->CQS', k, q, preferred_element_type=jnp.float32)
  mask = jnp.broadcast_to(mask_BTS.reshape(bk, 1, r * t, 1, s),
                          (bk, kh, r * t, g, s)).reshape(bk * kh, queries, s)
  logits = jnp.where(mask, logits, _NEG_INF)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum('CQS,CSH->CQH', probs, v).reshape(bk, kh, r * t, g, h)
  return out.transpose(0, 2, 1, 3, 4).reshape(b, t, n, h)


def _attention_by_reductions(q_B1NH: jax.Array, k: jax.Array, v: jax.Array,
                             valid_BS: jax.Array, kv_layout: str, kh: int,
                             scale: float) -> jax.Array:
  """One query position, one query row per K/V row (R = 1), as float32
  products and sums instead of dots.

  The same arithmetic as the einsums (float32 products of the stored values,
  summed in float32), written so that XLA sees reductions, not GEMMs:
  compiled for a GPU, scores, mask, softmax and the sum over values become
  one or two fused kernels that read K and V once (docs/perf.md counts
  them). The probabilities stay float32 (the einsum path rounds them to the
  value dtype).
  """
  b, _, n, h = q_B1NH.shape
  if kv_layout == 'BSKH':  # -> [B, K, S, H] (indexing only, inside the fusion).
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  else:  # [B*K, S, H], the bytes of [B, K, S, H].
    k, v = k.reshape(b, kh, -1, h), v.reshape(b, kh, -1, h)
  f32 = jnp.float32
  q = q_B1NH.reshape(b, kh, n // kh, 1, h).astype(f32)  # [B, K, G, 1, H]
  scores = jnp.sum(q * k[:, :, None].astype(f32), axis=-1) * scale
  scores = jnp.where(valid_BS[:, None, None], scores, _NEG_INF)
  probs = jax.nn.softmax(scores, axis=-1)  # [B, K, G, S]
  out = jnp.sum(probs[..., None] * v[:, :, None].astype(f32), axis=-2)
  return out.astype(v.dtype).reshape(b, 1, n, h)


def _cudnn_attention(q_BTNH: jax.Array, k: jax.Array, v: jax.Array,
                     mask_BTS: jax.Array, kv_layout: str, scale: float) -> jax.Array:
  """cuDNN's fused attention (GPU only), for any number of query positions.

  The R query rows that share a key/value row become R * T query positions
  of it, each with its own mask row. For whole sequences (T > 1), an odd
  query or key length is padded by one masked position (cuDNN's backward
  pass with a mask takes even lengths only) and the padding sliced off.
  """
  if not for_gpu():
    raise NotImplementedError(
        f"attention impl 'cudnn' needs a CUDA GPU; this backend is "
        f'{jax.default_backend()!r} (use impl xla or pallas)')
  if kv_layout != 'BSKH':
    raise ValueError("attention impl 'cudnn' takes keys/values as [B, S, K, H] "
                     "only: use cache_layout 'BLKH'")
  b, t, n, h = q_BTNH.shape
  bk, s = k.shape[:2]
  rt = b // bk * t
  q = q_BTNH.reshape(bk, rt, n, h)
  mask = mask_BTS.reshape(bk, 1, rt, s)
  if t > 1 and rt % 2:  # Whole sequences (what may be differentiated) only.
    q, mask = _pad_by_one(q, 1), _pad_by_one(mask, 2)
  if t > 1 and s % 2:
    k, v, mask = _pad_by_one(k, 1), _pad_by_one(v, 1), _pad_by_one(mask, 3)
  out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale,
                                     implementation='cudnn')
  return out[:, :rt].reshape(b, t, n, h)


def _pad_by_one(x: jax.Array, axis: int) -> jax.Array:
  """x with one more position of zeros (False for a mask) along `axis`."""
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, 1)
  return jnp.pad(x, widths)


def _pallas_attention(q_B1NH: jax.Array, k: jax.Array, v: jax.Array,
                      valid_BS: jax.Array, kv_layout: str, kh: int,
                      scale: float, n: int, write_slot: jax.Array | None = None
                      ) -> jax.Array | tuple[jax.Array, jax.Array, jax.Array]:
  """One query position through the Pallas decode kernel (interpreted on CPU).

  The kernel reads q's first n heads where they are, the R rows that share a
  kv row (beams) as one block of query rows, and writes its output in q's
  order: no slice or transpose, whatever R and K; heads past n (a merged
  projection's K/V) are unread, unless `write_slot` is given: the kernel
  then writes them into k and v at that slot (see `Attention.attend_writing`)
  and also returns k and v, as given. `valid_BS` is [Bk, S'], or
  [Bk, R, S'] with each of the R rows' own mask; the kernel reads the first
  S' key positions.
  """
  from mqa_flax import pallas_attention  # pylint: disable=g-import-not-at-top
  b, _, heads, h = q_B1NH.shape
  bk = valid_BS.shape[0]
  kv_shape = k.shape
  if kv_layout == 'BKSH':  # [B*K, S, H] -> the kernel's [B, K, S, H].
    k = k.reshape(bk, kh, -1, h)
    v = v.reshape(bk, kh, -1, h)
  else:  # Beams' own rows [B*R, L, K, H] -> one row of R*L keys a sentence.
    k = k.reshape(bk, -1, kh, h)
    v = v.reshape(bk, -1, kh, h)
  out = pallas_attention.decode_attention(
      q_B1NH.reshape(bk, b // bk, heads, h), k, v, valid_BS,
      kv_layout=kv_layout, scale=scale, rows=n // kh, write_slot=write_slot,
      interpret=not for_gpu())  # [Bk, R, N, H]
  if write_slot is None:
    return out.reshape(b, 1, n, h)
  out, k, v = out
  return out.reshape(b, 1, n, h), k.reshape(kv_shape), v.reshape(kv_shape)


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

  def qkv_weight(self) -> jax.Array:
    """The q, k and v weights as one [D, N + 2K, H] array."""
    return jnp.concatenate([self.q[...], self.k[...], self.v[...]], axis=1)

  def project_qkv(self, x_BTD: jax.Array, w_qkv: jax.Array | None = None
                  ) -> jax.Array:
    """Queries, keys and values by one GEMM: [B, T, N + 2K, H], in that order
    (split by `split_qkv`); `w_qkv` is `qkv_weight()` if given (a decode loop
    merges it once, outside the loop)."""
    dt = self.dtype
    w = self.qkv_weight() if w_qkv is None else w_qkv
    return jnp.einsum('BTD,DNH->BTNH', x_BTD.astype(dt), w.astype(dt))

  def split_qkv(self, qkv: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`project_qkv`'s output -> q [B, T, N, H], k and v [B, T, K, H]."""
    n, kh = self.q.shape[1], self.k.shape[1]
    return qkv[:, :, :n], qkv[:, :, n:n + kh], qkv[:, :, n + kh:]

  def attend(self, x_BTD: jax.Array, k: jax.Array, v: jax.Array,
             mask_BTS: jax.Array, impl: str = 'xla',
             kv_layout: str = 'BSKH') -> jax.Array:
    """Projects queries from x, attends to given keys/values, projects out."""
    return self.attend_queries(self.project_q(x_BTD), k, v, mask_BTS, impl,
                               kv_layout)

  def project_q(self, x_BTD: jax.Array) -> jax.Array:
    """Queries, [B, T, N, H]."""
    x = x_BTD.astype(self.dtype)
    return jnp.einsum('BTD,DNH->BTNH', x, self.q[...].astype(self.dtype))

  def attend_queries(self, q_BTNH: jax.Array, k: jax.Array, v: jax.Array,
                     mask_BTS: jax.Array, impl: str = 'xla',
                     kv_layout: str = 'BSKH', row_masks: bool = False
                     ) -> jax.Array:
    """Attends with projected queries (or the whole `project_qkv` output,
    whose first N heads are the queries) and projects out."""
    n = self.q.shape[1]
    y = dot_product_attention(q_BTNH, k, v, mask_BTS, impl, kv_layout,
                              self.k.shape[1], self.head_dim**-0.5, n, row_masks)
    return self._project_out(y)

  def _project_out(self, y_BTNH: jax.Array) -> jax.Array:
    return jnp.einsum('BTNH,NHD->BTD', y_BTNH, self.o[...].astype(self.dtype))

  def attend_writing(self, qkv_B1NH: jax.Array, k: jax.Array, v: jax.Array,
                     slot: jax.Array, mask_B1S: jax.Array, kv_layout: str,
                     beams: int = 1) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One decode position by the Pallas kernel alone: it writes the keys and
    values of `qkv_B1NH` (`project_qkv`'s output) into the caches k and v at
    `slot`, attends with its queries, and the output is projected out.

    The caches are as `DecoderLayer.step` keeps them: [B, L, K, H] or, for
    kv_layout 'BKSH', [B*K, L, H]; with `beams` M > 1 (beam_cache
    'pointers') each of a sentence's M rows is its beam's own, written only
    by it, and the mask [B, 1, M*L] covers all M*L of the sentence's keys.
    A mask over S' < L positions reads only the first S' (a growing cache).
    Of the positions written, each beam attends to its own, whatever the
    mask says there, and to no other beam's (`decode_attention`'s
    `write_slot`). Returns (output [B, 1, D], k, v), k and v updated in
    place: no cache update kernel of their own.
    """
    kh, n = self.k.shape[1], self.q.shape[1]
    rows = qkv_B1NH.shape[0]
    valid = mask_B1S.reshape(rows // beams, beams, -1)
    y, k, v = _pallas_attention(qkv_B1NH, k, v, valid if beams > 1 else valid[:, 0],
                                kv_layout, kh, self.head_dim**-0.5, n, slot)
    return self._project_out(y), k, v

  def __call__(self, x_BTD: jax.Array, y_BSD: jax.Array,
               mask_BTS: jax.Array, impl: str = 'xla') -> jax.Array:
    """Queries from x attend to keys and values from y (whole sequences:
    `impl` is one of config.SEQ_ATTENTION_IMPLS)."""
    k, v = self.project_kv(y_BSD)
    return self.attend(x_BTD, k, v, mask_BTS, impl)
