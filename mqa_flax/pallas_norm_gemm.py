"""A LayerNorm folded into the GEMM that reads it (incremental decoding).

Each decoder layer's step normalises its residual rows [B, D] three times,
and each normalised copy is read by one GEMM: the merged QKV projection,
the cross-attention's query projection and the feed-forward's first layer.
XLA writes the copy (one reduction kernel) and the GEMM reads it back: at
the paper's shape 4.2 MB and one kernel per LayerNorm, 18 a step.

The LayerNorm is affine in x once its row statistics are known:

    LN(x) W + b = r ⊙ (x W') - (r μ) ⊗ c + d,
    W' = diag(γ) W,  c = 1ᵀ W',  d = β W + b,

with μ and r = 1 / sqrt(var + ε) each row's mean and inverse deviation.
`fold` computes W' (in the compute dtype), c (the column sums of the
rounded W', so that the centring cancels what the GEMM added) and d once
per decode call. `norm_gemm` then reads the raw rows: each program
accumulates x W' over D in blocks and, from the same blocks, each row's
sum and sum of squares; its epilogue applies the statistics (and a ReLU).
No extra pass over x, no normalised copy, one kernel. The decoder's final
LayerNorm folds the same way into the output embedding (`fold(...,
table=True)`), which `pallas_argmax`'s kernels read.

The variance is the mean of squares minus the squared mean (float32): a
residual row whose mean is large against its deviation loses precision
there and in the centring, where XLA's LayerNorm subtracts the mean first.
The rows are rounded to the weights' dtype for the product, as XLA rounds
the normalised rows.

Dimension letters: B rows, D model width, N output columns.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

_MIN_BLOCK = 16  # Triton's dot needs at least 16 rows and columns.


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=('w', 'colsum', 'shift'), meta_fields=('columns', 'eps'))
@dataclasses.dataclass(frozen=True)
class Folded:
  """A LayerNorm and the dense layer after it, as `norm_gemm` takes them
  (a pytree: its arrays are leaves, N and ε static)."""
  w: jax.Array  # [D, Np] W' = diag(γ) W in the compute dtype, Np >= N padded
  #   (or, from `fold(..., table=True)`, [N, D] E' = E diag(γ)).
  colsum: jax.Array  # [Np] float32, the sums of w over D.
  shift: jax.Array  # [Np] float32, β W + b.
  columns: int  # N, the dense layer's own width.
  eps: float  # The LayerNorm's ε.


def _block(n: int, most: int) -> int:
  """The largest power of 2 <= `most` dividing n, at least _MIN_BLOCK."""
  block = most
  while block > _MIN_BLOCK and n % block:
    block //= 2
  return block


def fold(scale_D: jax.Array, bias_D: jax.Array, w: jax.Array,
         b_N: jax.Array | None, eps: float, dtype: jnp.dtype, *,
         table: bool = False) -> Folded:
  """LayerNorm (scale, bias, eps) then x W + b: for `norm_gemm`, w is W [D, N].

  With `table`, w is an output embedding E [N, D] and the product is the
  logits x Eᵀ, for `pallas_argmax`'s kernels: its w stays in E's layout, as
  they read it, and unpadded. Otherwise, where N is not a multiple of 16
  (odd small shapes), the columns are padded with zeros to one, and
  `norm_gemm` slices its output."""
  axis = 1 if table else 0  # w's D axis.
  d = w.shape[axis]
  if d % _MIN_BLOCK:
    raise ValueError(f"norm_impl='pallas' needs d_model a multiple of "
                     f"{_MIN_BLOCK}, got {d}; use norm_impl='xla'")
  n = w.shape[1 - axis]
  w32 = w.astype(jnp.float32)
  scale = scale_D.astype(jnp.float32)
  w = ((scale[None, :] if table else scale[:, None]) * w32).astype(dtype)
  shift = jnp.tensordot(bias_D.astype(jnp.float32), w32, axes=(0, axis))
  if b_N is not None:
    shift = shift + b_N.astype(jnp.float32)
  pad = 0 if table else -n % _MIN_BLOCK
  if pad:
    w, shift = jnp.pad(w, ((0, 0), (0, pad))), jnp.pad(shift, (0, pad))
  return Folded(w, w.astype(jnp.float32).sum(axis=axis), shift, n, float(eps))


def row_stats(s1_B: jax.Array, s2_B: jax.Array, width: int, eps: float
              ) -> tuple[jax.Array, jax.Array]:
  """Each row's mean μ and inverse deviation r from its sum and sum of
  squares over `width` values (float32, inside a kernel)."""
  mean = s1_B / width
  return mean, lax.rsqrt(jnp.maximum(s2_B / width - mean * mean, 0.0) + eps)


def apply_norm(acc_BN: jax.Array, mean_B: jax.Array, r_B: jax.Array,
               colsum_N: jax.Array, shift_N: jax.Array) -> jax.Array:
  """LN(x) W + b from acc = x W' and the rows' statistics (see above)."""
  return (r_B[:, None] * acc_BN - (r_B * mean_B)[:, None] * colsum_N[None, :]
          + shift_N[None, :])


def _kernel(x_ref, w_ref, c_ref, d_ref, o_ref, *, block_d: int, width: int,
            eps: float, relu: bool):
  """Rows block i, columns block j: o = r (x W') - r μ c + d, [block_b, block_n]."""
  block_b, block_n = o_ref.shape

  def body(t, carry):
    acc, s1, s2 = carry
    cols = pl.ds(t * block_d, block_d)
    x = x_ref[:, cols]
    w = w_ref[cols, :]
    xf = x.astype(jnp.float32)
    acc += lax.dot(x.astype(w.dtype), w, preferred_element_type=jnp.float32)
    return acc, s1 + xf.sum(axis=1), s2 + (xf * xf).sum(axis=1)

  zeros = jnp.zeros((block_b,), jnp.float32)
  acc, s1, s2 = lax.fori_loop(
      0, width // block_d, body,
      (jnp.zeros((block_b, block_n), jnp.float32), zeros, zeros))
  y = apply_norm(acc, *row_stats(s1, s2, width, eps), c_ref[...], d_ref[...])
  if relu:
    y = jnp.maximum(y, 0.0)
  o_ref[...] = y.astype(o_ref.dtype)


def norm_gemm(x_BD: jax.Array, f: Folded, *, relu: bool = False,
              block_b: int = 64, block_n: int = 128, block_d: int = 64,
              interpret: bool | None = None, num_warps: int = 4,
              num_stages: int = 3) -> jax.Array:
  """LN(x) W + b (then ReLU if `relu`) for `f = fold(...)`: [B, N] in f.w's
  dtype, from the raw rows x [B, D] in any float dtype.

  Args:
    x_BD: the residual rows.
    f: the folded LayerNorm and weights.
    relu: apply max(., 0) to the result.
    block_b: rows per program, a power of 2 >= 16 (smaller for small B;
      the rows are padded to a multiple of it).
    block_n: columns per program at most (the largest power of 2 dividing
      the padded width).
    block_d: model width per step of the loop at most (likewise for D).
    interpret: None runs Pallas' interpreter on CPU, the Triton kernel elsewhere.
    num_warps: Triton warps per program.
    num_stages: Triton software-pipelining stages.
  """
  b, d = x_BD.shape
  if f.w.shape[0] != d:
    raise ValueError(f'x has width {d}, the folded weights {f.w.shape[0]}')
  n_pad = f.w.shape[1]
  block_b = min(block_b, max(_MIN_BLOCK, pl.next_power_of_2(b)))
  block_n, block_d = _block(n_pad, block_n), _block(d, block_d)
  rows = pl.cdiv(b, block_b) * block_b
  if rows != b:  # Small or odd batches: pad the (small) rows.
    x_BD = jnp.pad(x_BD, ((0, rows - b), (0, 0)))
  # Row blocks vary fastest: the programs that run together share a block
  # of W', which is then read from memory about once.
  out = pl.pallas_call(
      functools.partial(_kernel, block_d=block_d, width=d, eps=f.eps, relu=relu),
      out_shape=jax.ShapeDtypeStruct((rows, n_pad), f.w.dtype),
      grid=(n_pad // block_n, rows // block_b),
      in_specs=[pl.BlockSpec((block_b, d), lambda j, i: (i, 0)),
                pl.BlockSpec((d, block_n), lambda j, i: (0, j)),
                pl.BlockSpec((block_n,), lambda j, i: (j,)),
                pl.BlockSpec((block_n,), lambda j, i: (j,))],
      out_specs=pl.BlockSpec((block_b, block_n), lambda j, i: (i, j)),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps,
                                           num_stages=num_stages),
      interpret=jax.default_backend() == 'cpu' if interpret is None else interpret,
      name='norm_gemm',
  )(x_BD, f.w, f.colsum, f.shift)
  if rows != b or n_pad != f.columns:
    out = out[:b, :f.columns]
  return out
