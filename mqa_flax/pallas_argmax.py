"""The output GEMM's argmax (greedy) and top-k (beam) without its logits.

Decoding needs only the best few tokens of the logits [B, V] = x . Eᵀ, yet
XLA writes them (the output GEMM) and reads them back: once for greedy's
argmax, three times for beam search's log-softmax statistics (max, sum of
exp) and top-k. At the paper's shape (B = 1024 rows, V = 32768, bf16) each
pass is 67 MB: 134 MB a greedy step, 13% of MQA's memory floor, and 268 MB
a beam step. These kernels compute one [block_b, block_v] tile of the
logits at a time in float32 registers, as a GEMM would, and keep of it only
what the search reads. Each program walks `V / (block_v * splits)`
consecutive tiles for its block of rows, and a small XLA reduction merges
the `splits` parts:

- `logits_argmax`: each row's largest value and its first index. Ties go to
  the smallest index, as `jnp.argmax`'s do.
- `logits_top_k`: each row's k largest values with their indices, and the
  running max and sum of exp that give log Σ exp (online, as a fused
  attention's softmax).

Either may take the table with the final LayerNorm folded in
(`pallas_norm_gemm.fold(..., table=True)`) and the raw rows that LayerNorm
would read: each program then takes its rows' statistics in one pass over
them and applies them to each tile, so the normalised rows are never
written (see `pallas_norm_gemm` for the algebra and its precision).

Both work on the float32 accumulators: where two logits differ in float32
but round to one bf16 value, this sees the larger, while XLA's path, which
reads bf16 logits, sees a tie.

Dimension letters: B rows (sentences), D model width, V vocabulary,
S splits of the vocabulary.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from mqa_flax import pallas_norm_gemm

_MIN_ROWS = 16  # Triton's dot needs at least 16 rows per operand.
# Programs `logits_top_k` aims at by default (splits of the vocabulary times
# blocks of rows): about two per SM of an H100 or H200 (132 SMs).
_PROGRAMS = 256
_EVERY_TILE = 2**31 - 1  # As splits: one tile a program (at most one per tile).


def _x_block(x_ref, i, *, block_d: int, width: int
             ) -> tuple[jax.Array, jax.Array | None]:
  """Block i of the program's rows over D, [block_b, block_d], zeros past D;
  and which of its columns are inside D (None where block_d divides D)."""
  cols = pl.ds(i * block_d, block_d)
  if width % block_d:  # The last block runs past D: masked loads.
    in_width = i * block_d + jnp.arange(block_d) < width
    return plgpu.load(x_ref.at[:, cols], mask=in_width[None, :], other=0), in_width
  return x_ref[:, cols], None


def _tiles(x_ref, e_ref, *folded, eps: float, block_v: int, block_d: int,
           vocab: int, width: int, min_id: int):
  """j -> tile j of the float32 logits of the program's rows, [block_b,
  block_v], with -inf at the ids outside [min_id, vocab).

  With `folded` = (colsum, shift) refs, the rows are raw and e is the table
  with the final LayerNorm folded in (`pallas_norm_gemm.fold(...,
  table=True)`): the rows' statistics are taken once per program, in a
  pass over its rows, and each tile applies them."""
  x_block = functools.partial(_x_block, x_ref, block_d=block_d, width=width)
  steps = pl.cdiv(width, block_d)
  if folded:
    def add_stats(i, carry):
      x = x_block(i)[0].astype(jnp.float32)
      return carry[0] + x.sum(axis=1), carry[1] + (x * x).sum(axis=1)

    zeros = jnp.zeros((x_ref.shape[0],), jnp.float32)
    stats = pallas_norm_gemm.row_stats(
        *lax.fori_loop(0, steps, add_stats, (zeros, zeros)), width, eps)

  def tile(j):
    rows = pl.ds(j * block_v, block_v)
    ids = j * block_v + jnp.arange(block_v)
    in_vocab = ids < vocab

    def body(i, acc):
      x, in_width = x_block(i)
      mask = in_vocab[:, None]
      if in_width is not None:
        mask = mask & in_width[None, :]
      e = plgpu.load(e_ref.at[rows, pl.ds(i * block_d, block_d)], mask=mask,
                     other=0)
      return acc + lax.dot_general(x.astype(e.dtype), e, (((1,), (1,)), ((), ())),
                                   preferred_element_type=jnp.float32)

    acc = lax.fori_loop(0, steps, body,
                        jnp.zeros((x_ref.shape[0], block_v), jnp.float32))
    if folded:
      colsum, shift = (plgpu.load(ref.at[rows], mask=in_vocab, other=0)
                       for ref in folded)
      acc = pallas_norm_gemm.apply_norm(acc, *stats, colsum, shift)
    return jnp.where((in_vocab & (ids >= min_id))[None, :], acc, -jnp.inf)

  return tile


def _argmax_kernel(*refs, tiles: int, **tile):
  """One split: tiles [s*tiles, (s+1)*tiles) of the vocabulary -> each row's
  largest logit there and its first vocabulary index."""
  *inputs, max_ref, idx_ref = refs
  logits = _tiles(*inputs, **tile)
  first = pl.program_id(1) * tiles

  def one_tile(t, carry):
    best, at = carry
    acc = logits(first + t)
    top = acc.max(axis=1)
    better = top > best  # Strictly: a tie keeps the earlier tile's index.
    return (jnp.where(better, top, best),
            jnp.where(better, (first + t) * tile['block_v']
                      + jnp.argmax(acc, axis=1).astype(jnp.int32), at))

  rows = inputs[0].shape[0]
  max_ref[...], idx_ref[...] = lax.fori_loop(
      0, tiles, one_tile, (jnp.full((rows,), -jnp.inf, jnp.float32),
                           jnp.zeros((rows,), jnp.int32)))


def _top_k_kernel(*refs, k: int, tiles: int, **tile):
  """One split: tiles [s*tiles, (s+1)*tiles) of the vocabulary -> each row's
  k largest logits (unordered) with their ids, its largest logit and the sum
  of exp(logit - largest)."""
  *inputs, top_ref, idx_ref, max_ref, sum_ref = refs
  logits = _tiles(*inputs, **tile)
  first = pl.program_id(1) * tiles
  block_v = tile['block_v']
  slots = jnp.arange(k)
  columns = jnp.arange(block_v)

  def one_tile(t, carry):
    top, idx, m, z = carry  # [block_b, k] twice, [block_b] twice.
    j = first + t
    acc = logits(j)
    m_new = jnp.maximum(m, acc.max(axis=1))
    shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # No -inf - -inf.
    z = z * jnp.exp(m - shift) + jnp.exp(acc - shift[:, None]).sum(axis=1)

    def take_best(_, c):
      # The tile's best left replaces the row's worst kept, where larger.
      acc, top, idx = c
      best, at = acc.max(axis=1), jnp.argmax(acc, axis=1).astype(jnp.int32)
      worst = jnp.argmin(top, axis=1).astype(jnp.int32)
      put = ((best > top.min(axis=1))[:, None]
             & (slots[None, :] == worst[:, None]))
      top = jnp.where(put, best[:, None], top)
      idx = jnp.where(put, (j * block_v + at)[:, None], idx)
      acc = jnp.where(columns[None, :] == at[:, None], -jnp.inf, acc)
      return acc, top, idx

    _, top, idx = lax.fori_loop(0, k, take_best, (acc, top, idx))
    return top, idx, m_new, z

  block_b = inputs[0].shape[0]
  init = (jnp.full((block_b, k), -jnp.inf, jnp.float32),
          jnp.zeros((block_b, k), jnp.int32),
          jnp.full((block_b,), -jnp.inf, jnp.float32),
          jnp.zeros((block_b,), jnp.float32))
  top, idx, m, z = lax.fori_loop(0, tiles, one_tile, init)
  top_ref[...], idx_ref[...], max_ref[...], sum_ref[...] = top, idx, m, z


def _prepare(x_BD: jax.Array, table: jax.Array | pallas_norm_gemm.Folded,
             min_id: int, splits: int | None, blocks: dict[str, int]
             ) -> tuple[jax.Array, tuple[jax.Array, ...], int, int, dict[str, Any]]:
  """Checks the arguments. Returns x with its rows padded to a multiple of
  block_b; the kernel's inputs after x (the table, and a folded table's
  column sums and shifts); block_b fitted to small batches; the number of
  splits and `_tiles`' static arguments (block_d fitted to small widths)."""
  folded = isinstance(table, pallas_norm_gemm.Folded)
  e_VD = table.w if folded else table
  if x_BD.ndim != 2 or e_VD.ndim != 2 or x_BD.shape[1] != e_VD.shape[1]:
    raise ValueError(f'need x [B, D] and embed [V, D]; got {x_BD.shape}, '
                     f'{e_VD.shape}')
  if not folded and x_BD.dtype != e_VD.dtype:
    raise ValueError(f'x and embed dtypes differ: {x_BD.dtype}, {e_VD.dtype}')
  for name, value in blocks.items():
    if value < _MIN_ROWS or value & (value - 1):
      raise ValueError(f'{name} must be a power of 2 >= 16, got {value}')
  if splits is not None and splits < 1:
    raise ValueError(f'need splits >= 1, got {splits}')
  (b, d), v = x_BD.shape, e_VD.shape[0]
  if not 0 <= min_id < v:
    raise ValueError(f'min_id={min_id} must be in [0, V={v})')
  block_b = min(blocks['block_b'], max(_MIN_ROWS, pl.next_power_of_2(b)))
  padded = pl.cdiv(b, block_b) * block_b
  if padded != b:  # Small or odd batches: pad the (small) rows, not the table.
    x_BD = jnp.pad(x_BD, ((0, padded - b), (0, 0)))
  tiles = pl.cdiv(v, blocks['block_v'])
  splits = min(tiles, splits or pl.cdiv(_PROGRAMS, padded // block_b))
  splits = pl.cdiv(tiles, pl.cdiv(tiles, splits))  # None left empty.
  tile = dict(block_v=blocks['block_v'], vocab=v, width=d, min_id=min_id,
              block_d=min(blocks['block_d'], max(_MIN_ROWS, pl.next_power_of_2(d))),
              eps=table.eps if folded else 0.0, tiles=pl.cdiv(tiles, splits))
  inputs = (e_VD, table.colsum, table.shift) if folded else (e_VD,)
  return x_BD, inputs, block_b, splits, tile


def _call(kernel, x_BD: jax.Array, inputs: tuple[jax.Array, ...], block_b: int,
          splits: int, out_shape, out_specs, name: str, interpret: bool | None,
          num_warps: int, num_stages: int, **tile):
  """`kernel` over (row blocks, splits) programs; each reads its block of
  x's rows and the whole of each input after x."""
  whole = [pl.BlockSpec(a.shape, lambda i, s, n=a.ndim: (0,) * n) for a in inputs]
  return pl.pallas_call(
      functools.partial(kernel, **tile),
      out_shape=out_shape,
      # Row blocks vary fastest, so the programs that run together share
      # tiles of the table, which is then read from memory about once.
      grid=(x_BD.shape[0] // block_b, splits),
      in_specs=[pl.BlockSpec((block_b, x_BD.shape[1]), lambda i, s: (i, 0)), *whole],
      out_specs=out_specs,
      compiler_params=plgpu.CompilerParams(num_warps=num_warps,
                                           num_stages=num_stages),
      interpret=_interpret(interpret),
      name=name,
  )(x_BD, *inputs)


def logits_argmax(x_BD: jax.Array, table: jax.Array | pallas_norm_gemm.Folded, *,
                  min_id: int = 0, splits: int | None = None, block_b: int = 128,
                  block_v: int = 128, block_d: int = 64,
                  interpret: bool | None = None, num_warps: int = 8,
                  num_stages: int = 3) -> jax.Array:
  """argmax_v of x_BD . table[v], float32 accumulation: ids [B] int32.

  Args:
    x_BD: [B, D] rows: the final LayerNorm's output in the table's dtype or,
      with a folded table, the rows that LayerNorm reads (any float dtype).
    table: the output embedding [V, D], or it with the final LayerNorm
      folded in (`pallas_norm_gemm.fold(..., table=True)`).
    min_id: ids below it are never chosen (decoding never predicts padding).
    splits: programs per block of rows, each over V / splits of the
      vocabulary; None: one tile each.
    block_b: rows per program, a power of 2 >= 16 (smaller for small B).
    block_v: vocabulary entries per tile, a power of 2 >= 16.
    block_d: model width per step of the GEMM loop, a power of 2 >= 16.
    interpret: None runs Pallas' interpreter on CPU, the Triton kernel elsewhere.
    num_warps: Triton warps per program.
    num_stages: Triton software-pipelining stages.

  The defaults suit the paper's shape on an H100 or H200: 8 x 256
  programs of 8 warps for 1024 rows, at 116 registers a thread (130 with a
  folded table, so one program an SM; ptxas, jax 0.10.2). Programs over
  several tiles write fewer partial results but need more registers (172
  at 16 tiles) or, at block_b = 64 (104), read each tile of the table
  twice as often: 1.5 times the L2 traffic of 128 x 128 tiles.
  """
  b = x_BD.shape[0]
  x_BD, inputs, block_b, splits, tile = _prepare(
      x_BD, table, min_id, _EVERY_TILE if splits is None else splits,
      dict(block_b=block_b, block_v=block_v, block_d=block_d))
  padded = x_BD.shape[0]
  part_spec = pl.BlockSpec((None, block_b), lambda i, s: (s, i))
  best_SB, idx_SB = _call(
      _argmax_kernel, x_BD, inputs, block_b, splits,
      (jax.ShapeDtypeStruct((splits, padded), jnp.float32),
       jax.ShapeDtypeStruct((splits, padded), jnp.int32)),
      (part_spec, part_spec), 'logits_argmax', interpret, num_warps, num_stages,
      **tile)
  # The first split holding the row's maximum: its index is the first overall.
  split_B = jnp.argmax(best_SB[:, :b], axis=0)
  return jnp.take_along_axis(idx_SB[:, :b], split_B[None], axis=0)[0]


def logits_top_k(x_BD: jax.Array, table: jax.Array | pallas_norm_gemm.Folded,
                 k: int, *, min_id: int = 0, splits: int | None = None,
                 block_b: int = 64, block_v: int = 128, block_d: int = 32,
                 interpret: bool | None = None, num_warps: int = 8,
                 num_stages: int = 3) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The k largest of the logits x_BD . tableᵀ (float32 accumulation) per
  row, best first, with their ids, and log Σ_v exp(logit_v): ([B, k] float32,
  [B, k] int32, [B] float32). Only ids in [min_id, V) count, in both; where
  fewer than k do, the rest are -inf (id arbitrary).

  Args as `logits_argmax`'s, and:
    k: how many, >= 1.
    splits: as `logits_argmax`'s, but None: enough for about _PROGRAMS
      programs in all (16 at 1024 rows); each program's partial results,
      2 (k + 1) numbers a row, are merged by XLA.

  The defaults suit the paper's shape on an H100 or H200: 16 x 16 programs
  of 8 warps for 1024 rows, at 128 registers a thread (127 with a folded
  table; ptxas, jax 0.10.2), so 2 programs an SM; block_d = 64 would need
  128 (130 folded), block_b = 128 255.
  """
  if k < 1:
    raise ValueError(f'need k >= 1, got k={k}')
  b = x_BD.shape[0]
  x_BD, inputs, block_b, splits, tile = _prepare(x_BD, table, min_id, splits, dict(
      block_b=block_b, block_v=block_v, block_d=block_d))
  padded = x_BD.shape[0]
  slots = pl.next_power_of_2(k)  # Triton's arrays are powers of 2.
  # Outputs row-major, [B, S, ...], so the merge reads each row's parts
  # together, and its top-k needs no transpose.
  top_spec = pl.BlockSpec((block_b, None, slots), lambda i, s: (i, s, 0))
  row_spec = pl.BlockSpec((block_b, None), lambda i, s: (i, s))
  top_BSk, idx_BSk, max_BS, sum_BS = _call(
      _top_k_kernel, x_BD, inputs, block_b, splits,
      (jax.ShapeDtypeStruct((padded, splits, slots), jnp.float32),
       jax.ShapeDtypeStruct((padded, splits, slots), jnp.int32),
       jax.ShapeDtypeStruct((padded, splits), jnp.float32),
       jax.ShapeDtypeStruct((padded, splits), jnp.float32)),
      (top_spec, top_spec, row_spec, row_spec), 'logits_top_k', interpret,
      num_warps, num_stages, k=slots, **tile)
  max_BS, sum_BS = max_BS[:b], sum_BS[:b]
  m_B = max_BS.max(axis=1)
  log_z_B = m_B + jnp.log((sum_BS * jnp.exp(max_BS - m_B[:, None])).sum(axis=1))
  top_BX = top_BSk[:b].reshape(b, -1)  # X = S * slots, each row's parts.
  top_Bk, at_Bk = lax.top_k(top_BX, min(k, top_BX.shape[1]))
  return top_Bk, jnp.take_along_axis(idx_BSk[:b].reshape(b, -1), at_Bk, axis=1), log_z_B


def logits_of(x_BD: jax.Array, table: jax.Array | pallas_norm_gemm.Folded,
              v: int) -> jax.Array:
  """The logits of one id v, x_BD . table[v], float32 [B], by XLA: the
  kernels' rows and table, folded or not (beam search's EOS)."""
  if not isinstance(table, pallas_norm_gemm.Folded):
    return jnp.einsum('BD,D->B', x_BD, table[v], preferred_element_type=jnp.float32)
  x_BD = x_BD.astype(jnp.float32)
  acc_B1 = jnp.einsum('BD,D->B', x_BD.astype(table.w.dtype), table.w[v],
                      preferred_element_type=jnp.float32)[:, None]
  stats = pallas_norm_gemm.row_stats(x_BD.sum(axis=1), (x_BD * x_BD).sum(axis=1),
                                     x_BD.shape[1], table.eps)
  return pallas_norm_gemm.apply_norm(acc_B1, *stats, table.colsum[v, None],
                                     table.shift[v, None])[:, 0]


def _interpret(interpret: bool | None) -> bool:
  """None: Pallas' interpreter on CPU, the Triton kernel elsewhere."""
  return jax.default_backend() == 'cpu' if interpret is None else interpret
