"""Encoder-decoder Transformer of Shazeer (2019), in Flax NNX.

The paper's base model: 6 + 6 layers, learned positional embeddings, one token
embedding shared by source, target and the output logits, ReLU feed-forward
blocks. LayerNorm comes before each sub-layer (pre-LN, as in the
tensor2tensor v2 recipe the paper used), with a final LayerNorm on each
stack. The residual stream is float32; sub-layers compute in `cfg.dtype`.

Incremental decoding keeps its state in an explicit cache (`init_cache`):
per decoder layer the self-attention keys/values [B, L, K, H], L the maximum
length (or the local window: a ring buffer), and the cross-attention
keys/values [B_src, S, K, H], projected once from the encoder output.

Dimension letters: B batch, S source length, T target length, D model,
F feed-forward, V vocabulary, N query heads, K key/value heads, H head
dimension, L self-attention cache length.
"""

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mqa_flax import decoding
from mqa_flax.attention import Attention, for_gpu
from mqa_flax.config import ModelConfig

Cache = dict[str, Any]
_KV_LAYOUT = {'BLKH': 'BSKH', 'BKLH': 'BKSH'}  # Cache layout -> attention's.
_normal = jax.nn.initializers.normal


def _to_rows(x_BSKH: jax.Array, beams: int = 1) -> jax.Array:
  """[B, S, K, H] -> [B*K, S, H], cache layout 'BKLH' as stored; with `beams`
  M > 1 (beam_cache 'pointers'), rows b*M + m go to (b, k, m): [B/M, K, M, S, H]."""
  b, s, k, h = x_BSKH.shape
  x = x_BSKH.reshape(b // beams, beams, s, k, h).transpose(0, 3, 1, 2, 4)
  return x.reshape(b * k, s, h)


def shift_right(targets_BT: jax.Array, segmentation_BT: jax.Array) -> jax.Array:
  """Decoder inputs: targets moved one step right, 0 (BOS) opening each segment."""
  shifted = jnp.pad(targets_BT, ((0, 0), (1, 0)))[:, :-1]
  prev_seg = jnp.pad(segmentation_BT, ((0, 0), (1, 0)))[:, :-1]
  return jnp.where(segmentation_BT == prev_seg, shifted, 0)


def sinusoidal_table(max_len: int, d_model: int) -> np.ndarray:
  """Fixed sine/cosine position table, [max_len, D]."""
  pos = np.arange(max_len)[:, None]
  inv = np.exp(-math.log(1e4) * np.arange(0, d_model, 2) / d_model)[None]
  table = np.zeros((max_len, d_model), np.float32)
  table[:, 0::2] = np.sin(pos * inv)
  table[:, 1::2] = np.cos(pos * inv)
  return table


def attention_mask(q_seg_BT: jax.Array, k_seg_BS: jax.Array, causal: bool = False,
                   window: int = 0) -> jax.Array:
  """[B, T, S] mask: same non-padding segment, optionally causal and local."""
  mask_BTS = ((q_seg_BT[:, :, None] == k_seg_BS[:, None, :])
              & (k_seg_BS[:, None, :] != 0))
  if causal:
    t = jnp.arange(q_seg_BT.shape[1])[:, None]
    s = jnp.arange(k_seg_BS.shape[1])[None, :]
    keep_TS = s <= t
    if window:
      keep_TS &= t - s < window
    mask_BTS &= keep_TS[None]
  return mask_BTS


def _dropout(x: jax.Array, rate: float, rngs: nnx.Rngs | None) -> jax.Array:
  if rngs is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(rngs.dropout(), 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class FeedForward(nnx.Module):
  """ReLU MLP, D -> F -> D."""

  def __init__(self, d_model: int, d_ff: int, dtype: jnp.dtype, *,
               rngs: nnx.Rngs):
    self.dtype = dtype
    self.wi = nnx.Param(_normal(d_model**-0.5)(rngs.params(), (d_model, d_ff)))
    self.bi = nnx.Param(jnp.zeros((d_ff,)))
    self.wo = nnx.Param(_normal(d_ff**-0.5)(rngs.params(), (d_ff, d_model)))
    self.bo = nnx.Param(jnp.zeros((d_model,)))

  def __call__(self, x_BTD: jax.Array, rngs: nnx.Rngs | None,
               rate: float) -> jax.Array:
    return self.project_out(_dropout(self.hidden(x_BTD), rate, rngs))

  def hidden(self, x_BTD: jax.Array) -> jax.Array:
    """The hidden layer, ReLU(x W_i + b_i), [B, T, F] in the compute dtype."""
    dt = self.dtype
    h_BTF = jnp.einsum('BTD,DF->BTF', x_BTD.astype(dt), self.wi[...].astype(dt))
    return jax.nn.relu(h_BTF + self.bi[...].astype(dt)[None, None])

  def project_out(self, h_BTF: jax.Array) -> jax.Array:
    dt = self.dtype
    y_BTD = jnp.einsum('BTF,FD->BTD', h_BTF, self.wo[...].astype(dt))
    return y_BTD + self.bo[...].astype(dt)[None, None]


class EncoderLayer(nnx.Module):
  """Self-attention and feed-forward, each pre-normed and residual."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, dt = cfg.d_model, cfg.compute_dtype
    self.rate = cfg.dropout_rate
    self.impl = cfg.seq_attention_impl
    self.ln1 = nnx.LayerNorm(d, use_fast_variance=False, rngs=rngs)
    self.attn = Attention(d, cfg.num_heads, cfg.encoder_kv_heads, cfg.head_dim,
                          dt, rngs=rngs)
    self.ln2 = nnx.LayerNorm(d, use_fast_variance=False, rngs=rngs)
    self.ffn = FeedForward(d, cfg.d_ff, dt, rngs=rngs)

  def __call__(self, x_BSD: jax.Array, mask_BSS: jax.Array,
               rngs: nnx.Rngs | None) -> jax.Array:
    h_BSD = self.ln1(x_BSD)
    x_BSD = x_BSD + _dropout(self.attn(h_BSD, h_BSD, mask_BSS, self.impl), self.rate,
                             rngs)
    return x_BSD + _dropout(self.ffn(self.ln2(x_BSD), rngs, self.rate), self.rate,
                            rngs)


class DecoderLayer(nnx.Module):
  """Causal self-attention, encoder-decoder attention and feed-forward."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, dt = cfg.d_model, cfg.compute_dtype
    n, k, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    self.rate = cfg.dropout_rate
    self.impl = cfg.seq_attention_impl  # Whole sequences; `step` takes its own.
    self.ln1 = nnx.LayerNorm(d, use_fast_variance=False, rngs=rngs)
    self.self_attn = Attention(d, n, k, h, dt, rngs=rngs)
    self.ln2 = nnx.LayerNorm(d, use_fast_variance=False, rngs=rngs)
    self.cross_attn = Attention(d, n, k, h, dt, rngs=rngs)
    self.ln3 = nnx.LayerNorm(d, use_fast_variance=False, rngs=rngs)
    self.ffn = FeedForward(d, cfg.d_ff, dt, rngs=rngs)

  def __call__(self, x_BTD: jax.Array, encoded_BSD: jax.Array,
               self_mask_BTT: jax.Array, cross_mask_BTS: jax.Array,
               rngs: nnx.Rngs | None) -> jax.Array:
    h_BTD = self.ln1(x_BTD)
    x_BTD = x_BTD + _dropout(self.self_attn(h_BTD, h_BTD, self_mask_BTT, self.impl),
                             self.rate, rngs)
    x_BTD = x_BTD + _dropout(
        self.cross_attn(self.ln2(x_BTD), encoded_BSD, cross_mask_BTS, self.impl),
        self.rate, rngs)
    return x_BTD + _dropout(self.ffn(self.ln3(x_BTD), rngs, self.rate), self.rate,
                            rngs)

  def decode_weights(self, norm_impl: str) -> dict[str, Any]:
    """What `step` would otherwise derive from the parameters at every step,
    by the GEMM that reads each LayerNorm: 'qkv' (ln1; the self-attention's
    q, k and v weights as one array, `Attention.qkv_weight`) and, with
    norm_impl 'pallas', each LayerNorm folded into its GEMM
    (`pallas_norm_gemm.Folded`): 'qkv', 'q' (ln2, cross-attention queries)
    and 'ffn' (ln3, the feed-forward's hidden layer)."""
    w_qkv = self.self_attn.qkv_weight()
    if norm_impl == 'xla':
      return {'qkv': w_qkv}
    from mqa_flax import pallas_norm_gemm  # pylint: disable=g-import-not-at-top

    def fold(ln, w, b=None):
      return pallas_norm_gemm.fold(ln.scale[...], ln.bias[...],
                                   w.reshape(w.shape[0], -1), b, ln.epsilon,
                                   self.ffn.dtype)

    return {'qkv': fold(self.ln1, w_qkv), 'q': fold(self.ln2, self.cross_attn.q[...]),
            'ffn': fold(self.ln3, self.ffn.wi[...], self.ffn.bi[...])}

  def _after_norm(self, part: str, x_B1D: jax.Array, weights: dict[str, Any]
                  ) -> jax.Array:
    """The GEMM that reads LayerNorm `part` of one position's rows (see
    `decode_weights`): [B, 1, N + 2K, H] for 'qkv', [B, 1, N, H] for 'q',
    [B, 1, F] for 'ffn' (after its ReLU), in the compute dtype."""
    w = weights.get(part)
    if w is None or isinstance(w, jax.Array):  # XLA's LayerNorm, then the GEMM.
      ln, dense = {'qkv': (self.ln1, lambda h: self.self_attn.project_qkv(h, w)),
                   'q': (self.ln2, self.cross_attn.project_q),
                   'ffn': (self.ln3, self.ffn.hidden)}[part]
      return dense(ln(x_B1D))
    from mqa_flax import pallas_norm_gemm  # pylint: disable=g-import-not-at-top
    y = pallas_norm_gemm.norm_gemm(x_B1D[:, 0], w, relu=part == 'ffn',
                                   interpret=not for_gpu())
    shape = (-1,) if part == 'ffn' else (-1, self.self_attn.head_dim)
    return y.reshape(x_B1D.shape[0], 1, *shape)

  def step(self, x_B1D: jax.Array, cache: Cache, index: jax.Array,
           self_mask_B1L: jax.Array, cross_mask_B1S: jax.Array,
           read_len: int | None, impl: str, layout: str,
           weights: dict[str, Any], beams: int = 1
           ) -> tuple[jax.Array, Cache]:
    """One incremental position: writes its K/V into the cache, then attends.

    The cache is written in place and read as it is: by XLA's update kernels
    and attention, where only a static `read_len` < L slices it (the growing
    cache), or, with impl 'pallas', by one kernel that writes this
    position's K/V and attends (reading the first `read_len` positions).
    `weights`: `decode_weights()`, whose form says where the LayerNorms run.
    `beams` M > 1 (beam_cache 'pointers'): each beam writes its own cache
    row, and self-attention reads all M rows of its sentence as one row of
    M*L keys (`self_mask_B1L` is then [B, 1, M*L]).
    """
    # Queries, keys and values by one GEMM; the Pallas attention reads the
    # queries out of its output in place.
    qkv = self._after_norm('qkv', x_B1D, weights)  # [B, 1, N+2K, H]
    length = cache['k'].shape[1]  # Axis 1 is L in both layouts.
    # A local window's cache is a ring buffer of L = W slots: position i goes
    # to slot i % W, overwriting position i - W, which the window no longer
    # sees. Attention does not depend on the order of its keys, so the slots
    # need no reordering (see decode_step for the mask).
    slot = index % length
    kv_layout = _KV_LAYOUT[layout]
    if impl == 'pallas':  # One kernel writes K/V into the cache and attends.
      y_B1D, ck, cv = self.self_attn.attend_writing(
          qkv, cache['k'], cache['v'], slot, self_mask_B1L, kv_layout, beams)
    else:
      y_B1D, ck, cv = self._write_and_attend(qkv, cache, slot, self_mask_B1L,
                                             read_len, impl, layout, beams)
    x_B1D = x_B1D + y_B1D
    x_B1D = x_B1D + self.cross_attn.attend_queries(
        self._after_norm('q', x_B1D, weights), cache['cross_k'], cache['cross_v'],
        cross_mask_B1S, impl, kv_layout)
    x_B1D = x_B1D + self.ffn.project_out(self._after_norm('ffn', x_B1D, weights))
    return x_B1D, dict(cache, k=ck, v=cv)

  def _write_and_attend(self, qkv: jax.Array, cache: Cache, slot: jax.Array,
                        self_mask_B1L: jax.Array, read_len: int | None,
                        impl: str, layout: str, beams: int
                        ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`step`'s self-attention by XLA: the cache updates, then attention.
    Returns (output [B, 1, D], k, v)."""
    _, k, v = self.self_attn.split_qkv(qkv)  # [B, 1, K, H]
    if layout == 'BKLH':  # -> [B*K, 1, H], the cache's rows.
      k, v = _to_rows(k, beams), _to_rows(v, beams)
    length = cache['k'].shape[1]
    ck = jax.lax.dynamic_update_slice_in_dim(cache['k'], k, slot, axis=1)
    cv = jax.lax.dynamic_update_slice_in_dim(cache['v'], v, slot, axis=1)
    rk, rv = ck, cv
    if beams > 1:  # A sentence's M rows, one row of M*L keys (a bitcast).
      rk, rv = (x.reshape(x.shape[0] // beams, beams * length, *x.shape[2:])
                for x in (ck, cv))
    elif read_len is not None and read_len < length:
      rk = jax.lax.slice_in_dim(ck, 0, read_len, axis=1)
      rv = jax.lax.slice_in_dim(cv, 0, read_len, axis=1)
    y_B1D = self.self_attn.attend_queries(qkv, rk, rv, self_mask_B1L, impl,
                                          _KV_LAYOUT[layout], row_masks=beams > 1)
    return y_B1D, ck, cv


class Transformer(nnx.Module):
  """The encoder-decoder; `__call__` for training, `decode_step` for inference."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d = cfg.d_model
    self.embed = nnx.Param(_normal(d**-0.5)(rngs.params(), (cfg.vocab_size, d)))
    if cfg.pos_embedding == 'learned':
      self.src_pos = nnx.Param(_normal(1.0)(rngs.params(), (cfg.max_len, d)))
      self.tgt_pos = nnx.Param(_normal(1.0)(rngs.params(), (cfg.max_len, d)))
    self.encoder = nnx.List(
        [EncoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_encoder_layers)])
    self.encoder_ln = nnx.LayerNorm(d, use_fast_variance=False, rngs=rngs)
    self.decoder = nnx.List(
        [DecoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_decoder_layers)])
    self.decoder_ln = nnx.LayerNorm(d, use_fast_variance=False, rngs=rngs)

  def _embed(self, ids_BT: jax.Array, positions_BT: jax.Array,
             side: str) -> jax.Array:
    """Token embedding * sqrt(D) plus position embedding, float32 [B, T, D]."""
    cfg = self.cfg
    x_BTD = self.embed[...][ids_BT] * math.sqrt(cfg.d_model)
    positions_BT = jnp.minimum(positions_BT, cfg.max_len - 1)
    if cfg.pos_embedding == 'learned':
      table = (self.src_pos if side == 'src' else self.tgt_pos)[...]
    else:
      table = jnp.asarray(sinusoidal_table(cfg.max_len, cfg.d_model))
    return x_BTD + table[positions_BT]

  def logits(self, x_BTD: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
    """Output logits from the tied embedding, [B, T, V] in `dtype`.

    The matmul runs in the compute dtype and accumulates in float32;
    `dtype` is only what it writes (training's loss reads float32).
    """
    dt = self.cfg.compute_dtype
    return jnp.einsum('BTD,VD->BTV', x_BTD.astype(dt),
                      self.embed[...].astype(dt), preferred_element_type=dtype)

  def encode(self, inputs: jax.Array, inputs_segmentation: jax.Array | None = None,
             inputs_position: jax.Array | None = None,
             rngs: nnx.Rngs | None = None) -> jax.Array:
    """Encoder output [B, S, D] of `inputs` [B, S]; token 0 is padding unless
    segments are given."""
    seg_BS = _segments(inputs, inputs_segmentation)
    pos_BS = _positions(inputs, inputs_position)
    x_BSD = _dropout(self._embed(inputs, pos_BS, 'src'), self.cfg.dropout_rate,
                     rngs)
    mask_BSS = attention_mask(seg_BS, seg_BS)
    for layer in self.encoder:
      x_BSD = layer(x_BSD, mask_BSS, rngs)
    return self.encoder_ln(x_BSD)

  def decode(self, targets: jax.Array, encoded: jax.Array,
             inputs_segmentation: jax.Array,
             targets_segmentation: jax.Array | None = None,
             targets_position: jax.Array | None = None,
             rngs: nnx.Rngs | None = None) -> jax.Array:
    """Teacher-forced logits [B, T, V] for predicting `targets` [B, T]."""
    seg_BT = _segments(targets, targets_segmentation)
    x_BTD = self._embed(shift_right(targets, seg_BT),
                        _positions(targets, targets_position), 'tgt')
    return self.decode_embedded(x_BTD, encoded, inputs_segmentation, seg_BT, rngs)

  def decode_embedded(self, x_BTD: jax.Array, encoded: jax.Array,
                      inputs_segmentation: jax.Array,
                      targets_segmentation: jax.Array,
                      rngs: nnx.Rngs | None = None) -> jax.Array:
    """The decoder stack from embedded (shifted) target inputs to logits."""
    x_BTD = _dropout(x_BTD, self.cfg.dropout_rate, rngs)
    self_mask_BTT = attention_mask(targets_segmentation, targets_segmentation,
                                   causal=True, window=self.cfg.local_window)
    cross_mask_BTS = attention_mask(targets_segmentation, inputs_segmentation)
    for layer in self.decoder:
      x_BTD = layer(x_BTD, encoded, self_mask_BTT, cross_mask_BTS, rngs)
    return self.logits(self.decoder_ln(x_BTD))

  def __call__(self, inputs: jax.Array, targets: jax.Array, *,
               inputs_segmentation: jax.Array | None = None,
               targets_segmentation: jax.Array | None = None,
               inputs_position: jax.Array | None = None,
               targets_position: jax.Array | None = None,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    """Logits [B, T, V]; dropout is on when `rngs` (with a 'dropout' stream) is given."""
    in_seg_BS = _segments(inputs, inputs_segmentation)
    encoded_BSD = self.encode(inputs, in_seg_BS, inputs_position, rngs)
    return self.decode(targets, encoded_BSD, in_seg_BS, targets_segmentation,
                       targets_position, rngs)

  def init_cache(self, encoded: jax.Array, inputs: jax.Array, max_len: int,
                 beam_size: int = 1) -> Cache:
    """Decode state for `encoded` [B, S, D]: empty self K/V, projected cross K/V.

    The self-attention rows are B * beam_size (sentence-major); the cross K/V
    and the source mask stay at B rows, shared by a sentence's beams. K/V
    arrays are [rows, L, K, H], or for cache_layout 'BKLH' [rows * K, L, H]
    (the bytes of [rows, K, L, H]; see `attention.dot_product_attention`).

    With beams and `cfg.beam_cache` 'pointers', K/V never move: row b*M + m
    is written only by the beam in place m of sentence b ('BKLH' stores it as
    [B, K, M, L, H]), and `kv_rows` [rows, L] int32 says, for each beam and
    cache position, which of its sentence's M rows holds its K/V there; beam
    search's reorder moves `kv_rows` alone.
    """
    cfg = self.cfg
    rows = encoded.shape[0] * beam_size
    length = min(max_len, cfg.local_window) if cfg.local_window else max_len
    shape = (rows, length, cfg.num_kv_heads, cfg.head_dim)
    bklh = cfg.cache_layout == 'BKLH'
    if bklh:
      shape = (rows * cfg.num_kv_heads, length, cfg.head_dim)
    layers = []
    for layer in self.decoder:
      ck, cv = layer.cross_attn.project_kv(encoded)
      if bklh:
        ck, cv = _to_rows(ck), _to_rows(cv)
      layers.append(dict(k=jnp.zeros(shape, cfg.compute_dtype),
                         v=jnp.zeros(shape, cfg.compute_dtype),
                         cross_k=ck, cross_v=cv))
    cache = dict(index=jnp.zeros((), jnp.int32), src_mask=inputs != 0,
                 layers=layers)
    if beam_size > 1 and cfg.beam_cache == 'pointers':
      cache['kv_rows'] = jnp.zeros((rows, length), jnp.int32)
    return cache

  def reorder_cache(self, cache: Cache, rows: jax.Array,
                    upto: int | None = None) -> Cache:
    """Beam search's reorder: self K/V row i becomes row rows[i] (of B*beams).

    With `upto` (static; no position at or past it written yet, in any row)
    only the first `upto` cache positions move: the rest is unwritten in
    every row alike. A 'pointers' cache (see `init_cache`) moves only its
    `kv_rows` table.
    """
    if 'kv_rows' in cache:
      return dict(cache, kv_rows=cache['kv_rows'][rows])
    k = self.cfg.num_kv_heads if self.cfg.cache_layout == 'BKLH' else 1
    idx = (rows[:, None] * k + jnp.arange(k)[None]).reshape(-1)  # Of [B*K, ...].

    def take(x):  # Axis 1 is the cache position in both layouts.
      if upto is None or upto >= x.shape[1]:
        return x[idx]
      return x.at[:, :upto].set(x[idx, :upto])

    layers = [dict(c, k=take(c['k']), v=take(c['v'])) for c in cache['layers']]
    return dict(cache, layers=layers)

  def decode_weights(self) -> dict[str, Any]:
    """Weights that `decode_step`, `next_token` and `candidates` would
    otherwise derive from the parameters at every step: 'layers', per
    decoder layer (`DecoderLayer.decode_weights`: the merged q, k, v weights,
    and with cfg.norm_impl 'pallas' the LayerNorms folded into their GEMMs);
    with norm_impl and argmax_impl both 'pallas', 'output': the output
    embedding with the final LayerNorm folded in (`pallas_norm_gemm.fold(...,
    table=True)`), for the fused output kernels. A decode loop computes them
    once, before the loop, and passes them as `weights`: XLA does not hoist
    such work out of a while loop, and would run it every step."""
    cfg = self.cfg
    weights = {'layers': [layer.decode_weights(cfg.norm_impl)
                          for layer in self.decoder]}
    if cfg.norm_impl == 'pallas' and cfg.argmax_impl == 'pallas':
      from mqa_flax import pallas_norm_gemm  # pylint: disable=g-import-not-at-top
      ln = self.decoder_ln
      weights['output'] = pallas_norm_gemm.fold(
          ln.scale[...], ln.bias[...], self.embed[...], None, ln.epsilon,
          cfg.compute_dtype, table=True)
    return weights

  def decode_step(self, ids_B: jax.Array, cache: Cache,
                  read_len: int | None = None,
                  weights: dict[str, Any] | None = None
                  ) -> tuple[jax.Array, Cache]:
    """Logits [B, V] (compute dtype) for the next token after `ids_B`, and the
    updated cache.

    `read_len` (static) limits self-attention to the first `read_len` cache
    slots; it must exceed the current index (a 'pointers' beam cache is read
    whole). `weights`: `decode_weights()`, or None to derive them here.
    """
    x_B1D, cache = self._decoder_step(ids_B, cache, read_len, weights)
    # Logits in the compute dtype: with bf16 the step writes [B, V] bf16 and
    # the search reads it (half the bytes of float32; greedy's argmax reads
    # the rounded values, beam search casts them to float32).
    return self.logits(self.decoder_ln(x_B1D), self.cfg.compute_dtype)[:, 0], cache

  def next_token(self, ids_B: jax.Array, cache: Cache, read_len: int | None = None,
                 min_id: int = 0, weights: dict[str, Any] | None = None
                 ) -> tuple[jax.Array, Cache]:
    """Greedy decoding's step: the argmax token [B] int32 after `ids_B` (of the
    ids >= `min_id`), and the updated cache (`read_len` and `weights` as in
    `decode_step`).

    `cfg.argmax_impl` 'xla' takes the argmax of `decode_step`'s logits;
    'pallas' computes it inside the output GEMM without writing the logits
    (`pallas_argmax.logits_argmax`; float32 logits, so a tie in the compute
    dtype may break the other way).
    """
    if self.cfg.argmax_impl == 'xla':
      logits_BV, cache = self._masked_logits(ids_B, cache, read_len, min_id, weights)
      return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32), cache
    from mqa_flax import pallas_argmax  # pylint: disable=g-import-not-at-top
    x_BD, table, cache = self._output_rows(ids_B, cache, read_len, weights)
    return pallas_argmax.logits_argmax(x_BD, table, min_id=min_id,
                                       interpret=not for_gpu()), cache

  def candidates(self, ids_B: jax.Array, cache: Cache, read_len: int | None = None,
                 *, k: int, eos_id: int, min_id: int = 0,
                 weights: dict[str, Any] | None = None
                 ) -> tuple[decoding.Candidates, Cache]:
    """Beam search's step: each row's k most likely next tokens (of the ids
    >= `min_id`) after `ids_B`, and the updated cache (`read_len` and
    `weights` as in `decode_step`).

    `cfg.argmax_impl` 'xla' takes them from `decode_step`'s logits
    (`decoding.candidates`); 'pallas' computes them inside the output GEMM
    without writing the logits (`pallas_argmax.logits_top_k`, from float32
    logits where XLA's path reads them rounded to the compute dtype).
    """
    if self.cfg.argmax_impl == 'xla':
      logits_BV, cache = self._masked_logits(ids_B, cache, read_len, min_id, weights)
      return decoding.candidates(logits_BV, k, eos_id), cache
    from mqa_flax import pallas_argmax  # pylint: disable=g-import-not-at-top
    x_BD, table, cache = self._output_rows(ids_B, cache, read_len, weights)
    top_Bk, ids_Bk, log_z_B = pallas_argmax.logits_top_k(
        x_BD, table, k, min_id=min_id, interpret=not for_gpu())
    eos_B = pallas_argmax.logits_of(x_BD, table, eos_id)
    return decoding.Candidates(top_Bk - log_z_B[:, None], ids_Bk,
                               eos_B - log_z_B), cache

  def _masked_logits(self, ids_B: jax.Array, cache: Cache, read_len: int | None,
                     min_id: int, weights: dict[str, Any] | None
                     ) -> tuple[jax.Array, Cache]:
    """`decode_step`'s logits, -inf below `min_id`."""
    logits_BV, cache = self.decode_step(ids_B, cache, read_len, weights)
    if min_id:
      logits_BV = logits_BV.at[:, :min_id].set(-jnp.inf)
    return logits_BV, cache

  def _output_rows(self, ids_B: jax.Array, cache: Cache, read_len: int | None,
                   weights: dict[str, Any] | None
                   ) -> tuple[jax.Array, Any, Cache]:
    """The fused output kernels' rows [B, D] and table, and the updated cache:
    the final LayerNorm's output in the compute dtype and the output
    embedding or, where `weights` has the folded 'output' table, the rows
    that LayerNorm reads and that table."""
    weights = weights or self.decode_weights()
    x_B1D, cache = self._decoder_step(ids_B, cache, read_len, weights)
    if 'output' in weights:
      return x_B1D[:, 0], weights['output'], cache
    h_BD = self.decoder_ln(x_B1D)[:, 0].astype(self.cfg.compute_dtype)
    return h_BD, self._output_table(), cache

  def _output_table(self) -> jax.Array:
    """The tied output embedding [V, D] in the compute dtype."""
    return self.embed[...].astype(self.cfg.compute_dtype)

  def _decoder_step(self, ids_B: jax.Array, cache: Cache, read_len: int | None,
                    weights: dict[str, Any] | None) -> tuple[jax.Array, Cache]:
    """The decoder stack over one position: the rows the final LayerNorm
    reads, [B, 1, D], and the updated cache."""
    index = cache['index']
    rows = ids_B.shape[0]
    x_B1D = self._embed(ids_B[:, None], jnp.full((rows, 1), index), 'tgt')
    cfg = self.cfg
    src_mask_BS = cache['src_mask']
    repeats = rows // src_mask_BS.shape[0]  # Beams per sentence.
    cross_mask_B1S = jnp.repeat(src_mask_BS, repeats, axis=0)[:, None, :]
    pointers = 'kv_rows' in cache  # beam_cache 'pointers' (see init_cache).
    length = cache['layers'][0]['k'].shape[1]
    n = length if read_len is None or pointers else min(read_len, length)
    # Slot j holds a position <= index once j <= index. Before a ring buffer
    # wraps (index < L) those are exactly the positions written so far;
    # after it (index >= L) every slot is <= index and holds one of the last
    # L positions, which is the window: the same mask stays right.
    written_L = jnp.arange(n) <= index
    beams, extra = 1, {}
    if pointers:
      # This position's K/V go to each beam's own row; of the sentence's M*L
      # keys a beam sees, at each cache position, the row its history is in.
      beams = repeats
      kv_rows = cache['kv_rows'].at[:, index % length].set(jnp.arange(rows) % beams)
      extra['kv_rows'] = kv_rows
      self_mask_B1L = ((kv_rows[:, None, :] == jnp.arange(beams)[None, :, None])
                       & written_L[None, None, :]).reshape(rows, 1, beams * n)
    else:
      self_mask_B1L = jnp.broadcast_to(written_L, (rows, 1, n))
    weights = weights or self.decode_weights()
    layers = []
    for layer, layer_cache, w in zip(self.decoder, cache['layers'],
                                     weights['layers']):
      x_B1D, layer_cache = layer.step(x_B1D, layer_cache, index, self_mask_B1L,
                                      cross_mask_B1S, read_len, cfg.attention_impl,
                                      cfg.cache_layout, w, beams)
      layers.append(layer_cache)
    return x_B1D, dict(cache, index=index + 1, layers=layers, **extra)


def _segments(tokens: jax.Array, segmentation: jax.Array | None) -> jax.Array:
  return (tokens != 0).astype(jnp.int32) if segmentation is None else segmentation


def _positions(tokens: jax.Array, positions: jax.Array | None) -> jax.Array:
  if positions is None:
    return jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  return positions


def abstract_model(cfg: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
  """The model's graph and the shapes of its parameters, without allocating."""
  return nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))),
                   nnx.Param)


def cache_bytes(cache: Cache) -> int:
  """Bytes held by a decode cache (or its `jax.eval_shape`)."""
  return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(cache))
