"""The output GEMM's argmax (greedy) and top-k (beam) without its logits.

Decoding needs only the best few tokens of the logits [B, V] = x . Eᵀ, yet
XLA writes them (the output GEMM) and reads them back: once for greedy's
argmax, three times for beam search's log-softmax statistics (max, sum of
exp) and top-k. At the paper's shape (B = 1024 rows, V = 32768, bf16) each
pass is 67 MB: 134 MB a greedy step, 13% of MQA's memory floor, and 268 MB
a beam step. These
kernels compute one [block_b, block_v] tile of the logits at a time in
float32 registers, as a GEMM would, and keep of it only what the search
reads:

- `logits_argmax`: each row's largest value in the tile and its index; a
  small XLA reduction over the V / block_v tiles then picks the first
  largest. Ties go to the smallest index, as `jnp.argmax`'s do.
- `logits_top_k`: each program walks `V / (block_v * splits)` consecutive
  tiles, keeping each row's k largest values with their indices and the
  running max and sum of exp that give log Σ exp (online, as a fused
  attention's softmax); a small XLA reduction merges the `splits` parts.

Both work on the float32 accumulators: where two logits differ in float32
but round to one bf16 value, this sees the larger, while XLA's path, which
reads bf16 logits, sees a tie.

Dimension letters: B rows (sentences), D model width, V vocabulary,
J = ceil(V / block_v) tiles of the vocabulary, S splits of the vocabulary.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

_MIN_ROWS = 16  # Triton's dot needs at least 16 rows per operand.


def _logits_tile(x_ref, e_ref, j, *, block_v: int, block_d: int, vocab: int,
                 width: int, min_id: int) -> tuple[jax.Array, jax.Array]:
  """Tile j of the float32 logits of x's rows, [block_b, block_v], with -inf
  at the ids outside [min_id, vocab); and those ids [block_v]."""
  rows = pl.ds(j * block_v, block_v)
  ids = j * block_v + jnp.arange(block_v)
  in_vocab = ids < vocab

  def body(i, acc):
    cols = pl.ds(i * block_d, block_d)
    mask = in_vocab[:, None]
    if width % block_d:  # The last step runs past D: masked loads.
      in_width = i * block_d + jnp.arange(block_d) < width
      x = plgpu.load(x_ref.at[:, cols], mask=in_width[None, :], other=0)
      mask = mask & in_width[None, :]
    else:
      x = x_ref[:, cols]
    e = plgpu.load(e_ref.at[rows, cols], mask=mask, other=0)
    return acc + lax.dot_general(x, e, (((1,), (1,)), ((), ())),
                                 preferred_element_type=jnp.float32)

  acc = jnp.zeros((x_ref.shape[0], block_v), jnp.float32)
  acc = lax.fori_loop(0, pl.cdiv(width, block_d), body, acc)
  return jnp.where((in_vocab & (ids >= min_id))[None, :], acc, -jnp.inf), ids


def _argmax_kernel(x_ref, e_ref, max_ref, idx_ref, **tile):
  """One tile: each row's largest logit in tile j and its vocabulary index."""
  j = pl.program_id(1)
  acc, _ = _logits_tile(x_ref, e_ref, j, **tile)
  max_ref[...] = acc.max(axis=1)
  idx_ref[...] = j * tile['block_v'] + jnp.argmax(acc, axis=1).astype(jnp.int32)


def _top_k_kernel(x_ref, e_ref, top_ref, idx_ref, max_ref, sum_ref, *, k: int,
                  tiles: int, **tile):
  """One split: tiles [s*tiles, (s+1)*tiles) of the vocabulary -> each row's
  k largest logits (unordered) with their ids, its largest logit and the sum
  of exp(logit - largest)."""
  first = pl.program_id(1) * tiles
  block_v = tile['block_v']
  slots = jnp.arange(k)
  columns = jnp.arange(block_v)

  def one_tile(t, carry):
    top, idx, m, z = carry  # [block_b, k] twice, [block_b] twice.
    j = first + t
    acc, _ = _logits_tile(x_ref, e_ref, j, **tile)
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

  block_b = x_ref.shape[0]
  init = (jnp.full((block_b, k), -jnp.inf, jnp.float32),
          jnp.zeros((block_b, k), jnp.int32),
          jnp.full((block_b,), -jnp.inf, jnp.float32),
          jnp.zeros((block_b,), jnp.float32))
  top, idx, m, z = lax.fori_loop(0, tiles, one_tile, init)
  top_ref[...], idx_ref[...], max_ref[...], sum_ref[...] = top, idx, m, z


def _prepare(x_BD: jax.Array, embed_VD: jax.Array, min_id: int,
             blocks: dict[str, int]) -> tuple[jax.Array, int, int]:
  """Checks the arguments; x with its rows padded to a multiple of block_b
  and the block sizes (block_b, block_d) fitted to small shapes."""
  if x_BD.ndim != 2 or embed_VD.ndim != 2 or x_BD.shape[1] != embed_VD.shape[1]:
    raise ValueError(f'need x [B, D] and embed [V, D]; got {x_BD.shape}, '
                     f'{embed_VD.shape}')
  if x_BD.dtype != embed_VD.dtype:
    raise ValueError(f'x and embed dtypes differ: {x_BD.dtype}, {embed_VD.dtype}')
  for name, value in blocks.items():
    if value < _MIN_ROWS or value & (value - 1):
      raise ValueError(f'{name} must be a power of 2 >= 16, got {value}')
  if not 0 <= min_id < embed_VD.shape[0]:
    raise ValueError(f'min_id={min_id} must be in [0, V={embed_VD.shape[0]})')
  b, d = x_BD.shape
  block_b = min(blocks['block_b'], max(_MIN_ROWS, pl.next_power_of_2(b)))
  block_d = min(blocks['block_d'], max(_MIN_ROWS, pl.next_power_of_2(d)))
  padded = pl.cdiv(b, block_b) * block_b
  if padded != b:  # Small or odd batches: pad the (small) rows, not the table.
    x_BD = jnp.pad(x_BD, ((0, padded - b), (0, 0)))
  return x_BD, block_b, block_d


def logits_argmax(x_BD: jax.Array, embed_VD: jax.Array, *, min_id: int = 0,
                  block_b: int = 128, block_v: int = 128, block_d: int = 64,
                  interpret: bool | None = None, num_warps: int = 8,
                  num_stages: int = 3) -> jax.Array:
  """argmax_v of x_BD . embed_VD[v], float32 accumulation: ids [B] int32.

  Args:
    x_BD: [B, D] rows (the final LayerNorm's output), in the compute dtype.
    embed_VD: [V, D] output embedding, x's dtype.
    min_id: ids below it are never chosen (decoding never predicts padding).
    block_b: rows per program, a power of 2 >= 16 (smaller for small B).
    block_v: vocabulary entries per program, a power of 2 >= 16.
    block_d: model width per step of the GEMM loop, a power of 2 >= 16.
    interpret: None runs Pallas' interpreter on CPU, the Triton kernel elsewhere.
    num_warps: Triton warps per program.
    num_stages: Triton software-pipelining stages.
  """
  b, (v, d) = x_BD.shape[0], embed_VD.shape
  x_BD, block_b, block_d = _prepare(x_BD, embed_VD, min_id, dict(
      block_b=block_b, block_v=block_v, block_d=block_d))
  padded, tiles = x_BD.shape[0], pl.cdiv(v, block_v)
  # Row blocks vary fastest, so the programs that run together share one
  # tile of the table, which is then read from memory about once.
  part_spec = pl.BlockSpec((None, block_b), lambda i, j: (j, i))
  best_JB, idx_JB = pl.pallas_call(
      functools.partial(_argmax_kernel, block_v=block_v, block_d=block_d,
                        vocab=v, width=d, min_id=min_id),
      out_shape=(jax.ShapeDtypeStruct((tiles, padded), jnp.float32),
                 jax.ShapeDtypeStruct((tiles, padded), jnp.int32)),
      grid=(padded // block_b, tiles),
      in_specs=[pl.BlockSpec((block_b, d), lambda i, j: (i, 0)),
                pl.BlockSpec((v, d), lambda i, j: (0, 0))],
      out_specs=(part_spec, part_spec),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps,
                                           num_stages=num_stages),
      interpret=_interpret(interpret),
      name='logits_argmax',
  )(x_BD, embed_VD)
  # The first tile holding the row's maximum: its index is the first overall.
  tile_B = jnp.argmax(best_JB[:, :b], axis=0)
  return jnp.take_along_axis(idx_JB[:, :b], tile_B[None], axis=0)[0]


def logits_top_k(x_BD: jax.Array, embed_VD: jax.Array, k: int, *,
                 min_id: int = 0, splits: int = 16, block_b: int = 64,
                 block_v: int = 128, block_d: int = 64,
                 interpret: bool | None = None, num_warps: int = 8,
                 num_stages: int = 3) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The k largest of the logits x_BD . embed_VDᵀ (float32 accumulation) per
  row, best first, with their ids, and log Σ_v exp(logit_v): ([B, k] float32,
  [B, k] int32, [B] float32). Only ids in [min_id, V) count, in both; where
  fewer than k do, the rest are -inf (id arbitrary).

  Args as `logits_argmax`'s, and:
    k: how many, >= 1.
    splits: programs per block of rows, each over V / splits of the
      vocabulary (fewer where the vocabulary has fewer tiles); their
      partial results, 2 (k + 1) numbers a row each, are merged by XLA.

  The defaults suit the paper's shape on an H100 or H200: 16 x 16 programs
  of 8 warps for 1024 rows, at 128 registers a thread (2 programs an SM,
  ptxas); block_b = 128 would need 255.
  """
  if k < 1 or splits < 1:
    raise ValueError(f'need k >= 1 and splits >= 1, got k={k}, splits={splits}')
  b, (v, d) = x_BD.shape[0], embed_VD.shape
  x_BD, block_b, block_d = _prepare(x_BD, embed_VD, min_id, dict(
      block_b=block_b, block_v=block_v, block_d=block_d))
  padded = x_BD.shape[0]
  per_split = pl.cdiv(pl.cdiv(v, block_v), splits)
  splits = pl.cdiv(pl.cdiv(v, block_v), per_split)  # None left empty.
  slots = pl.next_power_of_2(k)  # Triton's arrays are powers of 2.
  # Outputs row-major, [B, S, ...], so the merge reads each row's parts
  # together, and its top-k needs no transpose.
  top_spec = pl.BlockSpec((block_b, None, slots), lambda i, s: (i, s, 0))
  row_spec = pl.BlockSpec((block_b, None), lambda i, s: (i, s))
  top_BSk, idx_BSk, max_BS, sum_BS = pl.pallas_call(
      functools.partial(_top_k_kernel, k=slots, tiles=per_split,
                        block_v=block_v, block_d=block_d, vocab=v, width=d,
                        min_id=min_id),
      out_shape=(jax.ShapeDtypeStruct((padded, splits, slots), jnp.float32),
                 jax.ShapeDtypeStruct((padded, splits, slots), jnp.int32),
                 jax.ShapeDtypeStruct((padded, splits), jnp.float32),
                 jax.ShapeDtypeStruct((padded, splits), jnp.float32)),
      grid=(padded // block_b, splits),
      in_specs=[pl.BlockSpec((block_b, d), lambda i, s: (i, 0)),
                pl.BlockSpec((v, d), lambda i, s: (0, 0))],
      out_specs=(top_spec, top_spec, row_spec, row_spec),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps,
                                           num_stages=num_stages),
      interpret=_interpret(interpret),
      name='logits_top_k',
  )(x_BD, embed_VD)
  max_BS, sum_BS = max_BS[:b], sum_BS[:b]
  m_B = max_BS.max(axis=1)
  log_z_B = m_B + jnp.log((sum_BS * jnp.exp(max_BS - m_B[:, None])).sum(axis=1))
  top_BX = top_BSk[:b].reshape(b, -1)  # X = S * slots, each row's parts.
  top_Bk, at_Bk = lax.top_k(top_BX, min(k, top_BX.shape[1]))
  return top_Bk, jnp.take_along_axis(idx_BSk[:b].reshape(b, -1), at_Bk, axis=1), log_z_B


def _interpret(interpret: bool | None) -> bool:
  """None: Pallas' interpreter on CPU, the Triton kernel elsewhere."""
  return jax.default_backend() == 'cpu' if interpret is None else interpret
