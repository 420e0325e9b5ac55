"""Model tests: cache = forward, GQA = copied MHA, causality, masks, sharding."""

import functools
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from conftest import randomize_layer_norm
from mqa_flax import decoding
from mqa_flax import hlo
from mqa_flax.config import ModelConfig
from mqa_flax.model import Transformer, attention_mask, shift_right

VARIANTS = {  # name: (N, K, local window)
    'mha': (4, 4, 0), 'gqa': (4, 2, 0), 'mqa': (4, 1, 0),
    'mha_local': (4, 4, 3), 'mqa_local': (4, 1, 3),
}


def tiny(n=4, k=4, window=0, **kw) -> ModelConfig:
  args = dict(vocab_size=32, num_encoder_layers=2, num_decoder_layers=2,
              d_model=32, d_ff=48, num_heads=n, num_kv_heads=k, head_dim=8,
              local_window=window, max_len=32, dropout_rate=0.0)
  return ModelConfig(**(args | kw))


def batch(seed=0, b=3, s=7, t=9):
  rng = np.random.default_rng(seed)
  src = rng.integers(3, 32, (b, s))
  tgt = rng.integers(3, 32, (b, t))
  src[1, 5:] = 0  # Padding in one row of each.
  tgt[1, 6:] = 0
  return jnp.asarray(src, jnp.int32), jnp.asarray(tgt, jnp.int32)


def _has_pallas() -> bool:
  return importlib.util.find_spec('mqa_flax.pallas_attention') is not None


# (attention_impl, cache_layout): every choice must leave the results alone.
IMPLS = [('xla', 'BLKH'), ('xla', 'BKLH'), ('xla_reduce', 'BLKH'),
         ('xla_reduce', 'BKLH'),
         pytest.param(('pallas', 'BLKH'), marks=pytest.mark.skipif(
             not _has_pallas(), reason='mqa_flax/pallas_attention.py absent')),
         pytest.param(('pallas', 'BKLH'), marks=pytest.mark.skipif(
             not _has_pallas(), reason='mqa_flax/pallas_attention.py absent'))]


# Beyond xla (every variant), each choice runs on the variants that cover
# K = 1, K = 2 and the ring buffer (the Pallas kernel also has its own tests
# in test_pallas_attention).
_SOME_VARIANTS = {('xla_reduce', 'BKLH'): ('mqa', 'gqa', 'mha_local'),
                  ('xla_reduce', 'BLKH'): ('mqa',),
                  ('pallas', 'BLKH'): ('mqa', 'mha_local'),
                  ('pallas', 'BKLH'): ('mqa', 'mha_local')}


def _values(impl) -> tuple[str, str]:
  return getattr(impl, 'values', (impl,))[0]


def _decoding_cases():
  """Every variant with XLA in both layouts, padded and growing (one layout:
  they share the padded path); the other choices on _SOME_VARIANTS, and
  'pallas' (which reads a growing cache its own way) growing too."""
  for variant in VARIANTS:
    yield pytest.param(variant, 'growing', IMPLS[0], id=f'xla/BLKH-growing-{variant}')
    for impl in IMPLS:
      values = _values(impl)
      if values[0] == 'xla' or variant in _SOME_VARIANTS[values]:
        marks = getattr(impl, 'marks', ())
        modes = [None, 'growing'] if values[0] == 'pallas' else [None]
        for mode in modes:
          yield pytest.param(variant, mode, values, marks=marks,
                             id=f'{"/".join(values)}-{mode}-{variant}')


@pytest.mark.parametrize('variant,read_len,impl', list(_decoding_cases()))
def test_incremental_decoding_equals_forward(variant, read_len, impl):
  _check_decoding_equals_forward(
      tiny(*VARIANTS[variant], attention_impl=impl[0], cache_layout=impl[1]), read_len)


# The LayerNorms folded into their GEMMs (pallas_norm_gemm, interpreted here):
# K = 1, 2 and the ring buffer, with each attention path that reads the
# folded GEMMs' outputs (XLA's split, the Pallas kernel's merged rows).
@pytest.mark.parametrize('variant,read_len,impl', [
    ('mqa', None, ('xla', 'BKLH')), ('gqa', 'growing', ('xla', 'BLKH')),
    ('mha_local', None, ('pallas', 'BKLH'))])
def test_folded_layer_norms_decode_as_the_forward(variant, read_len, impl):
  _check_decoding_equals_forward(
      tiny(*VARIANTS[variant], attention_impl=impl[0], cache_layout=impl[1],
           norm_impl='pallas'), read_len)


def _random_norms(model: Transformer) -> Transformer:
  """`model` with every LayerNorm's scale and bias random."""
  norms = [m for _, m in nnx.iter_graph(model) if isinstance(m, nnx.LayerNorm)]
  for ln, key in zip(norms, jax.random.split(jax.random.key(7), len(norms))):
    randomize_layer_norm(ln, key, 0.3)
  return model


def _check_decoding_equals_forward(cfg, read_len):
  model = Transformer(cfg, rngs=nnx.Rngs(1))
  if cfg.norm_impl == 'pallas':
    _random_norms(model)
  src, tgt = batch()
  full = jax.jit(model)(src, tgt)  # [B, T, V]
  dec_in = shift_right(tgt, (tgt != 0).astype(jnp.int32))
  cache = model.init_cache(model.encode(src), src, max_len=tgt.shape[1])
  step = jax.jit(model.decode_step, static_argnums=2)
  weights = model.decode_weights()  # Given at odd steps, derived at even.
  for t in range(tgt.shape[1]):
    logits, cache = step(dec_in[:, t], cache, t + 1 if read_len else None,
                         weights if t % 2 else None)
    real = np.asarray(tgt[:, t] != 0)
    np.testing.assert_allclose(logits[real], full[real, t], atol=1e-5, rtol=1e-5)
  if cfg.local_window:  # The ring buffer holds the window only.
    assert cache['layers'][0]['k'].shape[1] == cfg.local_window


def test_cudnn_impl_is_a_clear_error_off_gpu():
  if jax.default_backend() == 'gpu':
    pytest.skip('cuDNN present: covered by the benchmark on the device')
  model = Transformer(tiny(4, 1, attention_impl='cudnn'), rngs=nnx.Rngs(1))
  src, _ = batch()
  cache = model.init_cache(model.encode(src), src, max_len=4)
  with pytest.raises(NotImplementedError, match='cudnn.*needs a CUDA GPU'):
    model.decode_step(src[:, 0], cache)


def test_bad_impl_or_layout_is_refused():
  with pytest.raises(ValueError, match='attention_impl'):
    tiny(attention_impl='flash')
  with pytest.raises(ValueError, match='cache_layout'):
    tiny(cache_layout='LBKH')
  with pytest.raises(ValueError, match='argmax_impl'):
    tiny(argmax_impl='cuda')
  with pytest.raises(ValueError, match='norm_impl'):
    tiny(norm_impl='fused')
  with pytest.raises(ValueError, match="d_model a multiple of 16, got 24; use norm_impl='xla'"):
    tiny(d_model=24, norm_impl='pallas')


# The output kernels: XLA's; the Pallas ones after XLA's final LayerNorm;
# the Pallas ones with it folded into their table.
_OUTPUT_IMPLS = [('xla', 'xla'), ('pallas', 'xla'), ('pallas', 'pallas')]


@pytest.mark.parametrize('argmax,norm', _OUTPUT_IMPLS)
def test_next_token_is_the_argmax_of_decode_step(argmax, norm):
  # Greedy's step, either way, picks the largest logit of decode_step's (ids
  # >= min_id), updates the cache the same, and greedy search decodes the
  # same tokens from it as from the logits.
  model = _random_norms(Transformer(tiny(4, 1, argmax_impl=argmax, norm_impl=norm),
                                   rngs=nnx.Rngs(1)))
  src, tgt = batch()
  cache = model.init_cache(model.encode(src), src, max_len=tgt.shape[1])
  ref_cache = cache
  for t in range(3):
    logits, ref_cache = model.decode_step(tgt[:, t], ref_cache)
    # A min_id above row 0's argmax changes that row's pick.
    for min_id in (0, min(int(jnp.argmax(logits[0])) + 1, 31)):
      ids, new_cache = model.next_token(tgt[:, t], cache, min_id=min_id)
      want = jnp.argmax(logits.at[:, :min_id].set(-jnp.inf), axis=-1)
      np.testing.assert_array_equal(ids, want)
    jax.tree.map(np.testing.assert_array_equal, new_cache, ref_cache)
    cache = new_cache
  init = model.init_cache(model.encode(src), src, max_len=6)
  search = functools.partial(decoding.greedy_search, cache=init, batch_size=3,
                             max_len=6, eos_id=2)
  np.testing.assert_array_equal(search(model.next_token), search(model.decode_step))


@pytest.mark.parametrize('argmax,norm', _OUTPUT_IMPLS)
def test_candidates_are_the_top_of_decode_steps_log_softmax(argmax, norm):
  # Beam search's step, either way, gives each row the k best tokens (ids
  # >= min_id) of decode_step's log-softmax over those ids, EOS's
  # log-probability, and the same cache; beam search finds from it what it
  # finds from the logits, with forced EOS (max_lens) too.
  model = _random_norms(Transformer(tiny(4, 1, argmax_impl=argmax, norm_impl=norm),
                                   rngs=nnx.Rngs(1)))
  src, tgt = batch()
  cache = model.init_cache(model.encode(src), src, max_len=tgt.shape[1])
  for t in range(3):
    logits, ref_cache = model.decode_step(tgt[:, t], cache)
    c, cache = model.candidates(tgt[:, t], cache, k=6, eos_id=2, min_id=1)
    logp = jax.nn.log_softmax(logits.at[:, :1].set(-jnp.inf), axis=-1)
    want_logp, want_ids = jax.lax.top_k(logp, 6)
    np.testing.assert_array_equal(c.ids, want_ids)
    np.testing.assert_allclose(c.logp, want_logp, atol=1e-5)
    np.testing.assert_allclose(c.eos_logp, logp[:, 2], atol=1e-5)
    jax.tree.map(np.testing.assert_array_equal, cache, ref_cache)

  def search(step):
    init = model.init_cache(model.encode(src), src, max_len=6, beam_size=3)
    return decoding.beam_search(step, init, 3, 3, 6, eos_id=2,
                                max_lens=jnp.array([6, 3, 4]),
                                reorder=model.reorder_cache)
  seqs, scores = search(functools.partial(model.candidates, k=6, eos_id=2))
  want_seqs, want_scores = search(model.decode_step)
  np.testing.assert_array_equal(seqs, want_seqs)
  np.testing.assert_allclose(scores, want_scores, atol=1e-5)
  assert (seqs[1, :, 3:] == 0).all() and (seqs[1, :, :3] == 2).any(-1).all()


def test_beams_share_cross_attention_memory():
  model = Transformer(tiny(4, 2), rngs=nnx.Rngs(2))
  src, tgt = batch()
  enc = model.encode(src)
  shared = model.init_cache(enc, src, max_len=4, beam_size=2)
  copied = model.init_cache(jnp.repeat(enc, 2, axis=0), jnp.repeat(src, 2, axis=0),
                            max_len=4)
  assert shared['layers'][0]['cross_k'].shape[0] == 3
  assert copied['layers'][0]['cross_k'].shape[0] == 6
  ids = jnp.repeat(tgt[:, 0], 2)
  step = jax.jit(model.decode_step)
  for _ in range(3):
    a, shared = step(ids, shared)
    b, copied = step(ids, copied)
    np.testing.assert_allclose(a, b, atol=1e-6)
    ids = jnp.argmax(a, -1).astype(jnp.int32)


@pytest.mark.parametrize('k', [1, 2])
@pytest.mark.parametrize('impl', [i for i in IMPLS if _values(i) != ('xla_reduce', 'BLKH')],
                         ids=lambda x: '/'.join(x))
def test_grouped_equals_multi_head_with_copied_kv(k, impl):
  n = 4
  kw = dict(attention_impl=impl[0], cache_layout=impl[1])
  gqa = Transformer(tiny(n, k, **kw), rngs=nnx.Rngs(3))
  mha = Transformer(tiny(n, n, **kw), rngs=nnx.Rngs(4))
  graph, state = nnx.split(mha)
  flat = dict(nnx.to_flat_state(state))
  for path, var in nnx.to_flat_state(nnx.state(gqa)):
    value = var.get_value()
    if path[-1] in ('k', 'v'):  # [D, K, H] -> [D, N, H]: each head G times.
      value = jnp.repeat(value, n // k, axis=1)
    flat[path].set_value(value)
  mha = nnx.merge(graph, nnx.from_flat_state(flat))
  src, tgt = batch(1)
  # float32 sums over 2 or 4 heads' einsums: their order (and so the last
  # bits) depends on the CPU's vector width.
  np.testing.assert_allclose(jax.jit(gqa)(src, tgt), jax.jit(mha)(src, tgt),
                             atol=1e-5, rtol=1e-5)
  # Incremental decoding, with beams sharing the cross K/V (R = 2 rows).
  caches = [m.init_cache(m.encode(src), src, max_len=3, beam_size=2)
            for m in (gqa, mha)]
  ids = jnp.repeat(tgt[:, 0], 2)
  steps = [jax.jit(m.decode_step) for m in (gqa, mha)]
  for _ in range(3):
    (a, caches[0]), (b, caches[1]) = (f(ids, c) for f, c in zip(steps, caches))
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    ids = jnp.argmax(a, -1).astype(jnp.int32)


@pytest.mark.parametrize('variant', ['mha', 'mqa', 'mqa_local'])
def test_causality_exact_zero_gradient(variant):
  cfg = tiny(*VARIANTS[variant])
  model = Transformer(cfg, rngs=nnx.Rngs(5))
  src, tgt = batch(2, b=2, t=8)
  seg = (tgt != 0).astype(jnp.int32)
  x = model._embed(shift_right(tgt, seg), jnp.broadcast_to(jnp.arange(8), (2, 8)), 'tgt')
  enc = model.encode(src)
  in_seg = (src != 0).astype(jnp.int32)
  grad_fn = jax.jit(jax.grad(lambda x, t: model.decode_embedded(
      x, enc, in_seg, jnp.ones_like(seg))[:, t].sum()), static_argnums=1)
  for t in (0, 3, 5):
    grad = grad_fn(x, t)
    assert np.all(np.asarray(grad[:, t + 1:]) == 0.0), t
    assert np.all(np.abs(np.asarray(grad[:, t])).sum(-1) > 0), t


def test_local_window_one_layer_sees_exactly_window():
  w = 3
  cfg = tiny(4, 1, w, num_decoder_layers=1)
  model = Transformer(cfg, rngs=nnx.Rngs(6))
  src = batch(3, b=2)[0][:1]
  x = jax.random.normal(jax.random.key(0), (1, 8, 32))
  enc = model.encode(src)
  in_seg = (src != 0).astype(jnp.int32)
  seg = jnp.ones((1, 8), jnp.int32)
  t = 6
  grad = jax.jit(jax.grad(
      lambda x: model.decode_embedded(x, enc, in_seg, seg)[:, t].sum()))(x)
  seen = np.abs(np.asarray(grad[0])).sum(-1) > 0
  positions = np.arange(8)
  np.testing.assert_array_equal(seen, (positions <= t) & (positions > t - w))


@pytest.mark.parametrize('window', [0, 1, 4])
def test_attention_mask_counts(window):
  seg = jnp.ones((1, 10), jnp.int32)
  mask = np.asarray(attention_mask(seg, seg, causal=True, window=window))[0]
  t = np.arange(10)
  expected = np.minimum(t + 1, window) if window else t + 1
  np.testing.assert_array_equal(mask.sum(-1), expected)


def test_padding_and_packing_change_nothing():
  model = Transformer(tiny(4, 2), rngs=nnx.Rngs(7))
  a_src, a_tgt = jnp.array([[5, 6, 7, 1]]), jnp.array([[8, 9, 1]])
  b_src, b_tgt = jnp.array([[10, 11, 1]]), jnp.array([[12, 13, 14, 1]])
  fwd = jax.jit(model)
  la, lb = fwd(a_src, a_tgt), fwd(b_src, b_tgt)
  padded = fwd(jnp.pad(a_src, ((0, 0), (0, 5))), jnp.pad(a_tgt, ((0, 0), (0, 4))))
  np.testing.assert_allclose(padded[:, :3], la, atol=1e-5)
  packed = fwd(
      jnp.concatenate([a_src, b_src, jnp.zeros((1, 2), jnp.int32)], 1),
      jnp.concatenate([a_tgt, b_tgt, jnp.zeros((1, 1), jnp.int32)], 1),
      inputs_segmentation=jnp.array([[1, 1, 1, 1, 2, 2, 2, 0, 0]]),
      targets_segmentation=jnp.array([[1, 1, 1, 2, 2, 2, 2, 0]]),
      inputs_position=jnp.array([[0, 1, 2, 3, 0, 1, 2, 0, 0]]),
      targets_position=jnp.array([[0, 1, 2, 0, 1, 2, 3, 0]]))
  np.testing.assert_allclose(packed[:, :3], la, atol=1e-5)
  np.testing.assert_allclose(packed[:, 3:7], lb, atol=1e-5)


def test_heads_must_divide():
  with pytest.raises(ValueError, match='num_heads=8.*num_kv_heads=3'):
    tiny(8, 3)


def test_sharded_forward_equals_single_device():
  assert jax.device_count() == 8, 'conftest sets 8 fake CPU devices'
  model = Transformer(tiny(4, 1), rngs=nnx.Rngs(8))
  src, tgt = batch(4, b=8)
  graph, state = nnx.split(model)
  fwd = jax.jit(lambda state, s, t: nnx.merge(graph, state)(s, t))
  single = fwd(state, src, tgt)
  mesh = Mesh(np.array(jax.devices()), ('data',))
  shard = NamedSharding(mesh, P('data'))
  state = jax.device_put(state, NamedSharding(mesh, P()))
  sharded = fwd(state, jax.device_put(src, shard), jax.device_put(tgt, shard))
  assert len(sharded.sharding.device_set) == 8
  np.testing.assert_allclose(sharded, single, atol=1e-5)


@pytest.mark.parametrize('k', [1, 2])
def test_beam_search_is_the_same_in_both_cache_layouts(k):
  from mqa_flax import decoding  # pylint: disable=g-import-not-at-top
  src, _ = batch(5)
  out = []
  for layout in ('BLKH', 'BKLH'):
    model = Transformer(tiny(4, k, cache_layout=layout), rngs=nnx.Rngs(9))

    @jax.jit
    def search(src, model=model):
      cache = model.init_cache(model.encode(src), src, max_len=6, beam_size=3)
      return decoding.beam_search(model.decode_step, cache, 3, 3, 6, eos_id=1,
                                  reorder=model.reorder_cache)
    out.append(jax.device_get(search(src)))
  np.testing.assert_array_equal(out[0][0], out[1][0])
  np.testing.assert_allclose(out[0][1], out[1][1], atol=1e-5)
  assert len(np.unique(out[0][0])) > 3  # Beams were reordered, not constant.


@pytest.mark.parametrize('variant,layout', [('mqa', 'BLKH'), ('gqa', 'BKLH'),
                                            ('mha_local', 'BLKH')])
def test_chunked_beam_search_reorders_less_and_finds_the_same(variant, layout):
  from mqa_flax import decoding  # pylint: disable=g-import-not-at-top
  n, k, window = VARIANTS[variant]
  model = Transformer(tiny(n, k, window, cache_layout=layout), rngs=nnx.Rngs(4))
  src, _ = batch(6)
  max_len, beams = 8, 3

  def search(src, chunk, reorder=model.reorder_cache):
    cache = model.init_cache(model.encode(src), src, max_len=max_len, beam_size=beams)
    return decoding.beam_search(model.decode_step, cache, 3, beams, max_len, eos_id=1,
                                reorder=reorder, chunk=chunk)

  full = jax.jit(functools.partial(search, chunk=None))
  chunked = jax.jit(functools.partial(search, chunk=2))
  (s1, p1), (s2, p2) = jax.device_get(full(src)), jax.device_get(chunked(src))
  np.testing.assert_array_equal(s1, s2)
  np.testing.assert_allclose(p1, p2, atol=1e-5)
  # The reorder matters here: without it the search finds something else.
  unordered = jax.jit(functools.partial(
      search, chunk=None, reorder=lambda cache, rows, upto=None: cache))
  assert not np.allclose(jax.device_get(unordered(src))[1], p1)
  # Reorder bytes per step (kind 'gather'), averaged over the loops of equal
  # length: the chunked loops move only the positions written so far.
  per_body = hlo.loop_traffic(chunked.lower(src).compile().as_text(), 1,
                                    every_body=True)
  gathered = [b.get('gather', 0) for b in per_body]
  whole = hlo.loop_traffic(full.lower(src).compile().as_text(), 1).get('gather', 0)
  assert whole > 0 and len(gathered) == max_len // 2
  assert max(gathered) <= whole
  if not window:  # A ring buffer of 3 slots is whole from the second loop on.
    assert sum(gathered) / len(gathered) < 0.8 * whole


@pytest.mark.parametrize('variant,impl,layout', [
    ('mqa', 'xla', 'BKLH'), ('gqa', 'xla_reduce', 'BKLH'), ('mha', 'xla', 'BLKH'),
    ('mqa_local', 'xla', 'BKLH'),
    pytest.param('mqa', 'pallas', 'BKLH', marks=pytest.mark.skipif(
        not _has_pallas(), reason='mqa_flax/pallas_attention.py absent')),
    pytest.param('gqa', 'pallas', 'BLKH', marks=pytest.mark.skipif(
        not _has_pallas(), reason='mqa_flax/pallas_attention.py absent'))])
@pytest.mark.parametrize('chunk', [None, 3])
def test_beam_search_with_kv_pointers_finds_what_the_reorder_finds(
    variant, impl, layout, chunk):
  # beam_cache 'pointers': the K/V stay where they were written and only the
  # [rows, L] table of cache rows follows the beams; every layout, impl,
  # the local window's ring buffer and the chunked search give the same
  # sequences and scores as moving the K/V.
  n, k, window = VARIANTS[variant]
  src, _ = batch(7)
  max_len, beams, out = 8, 3, []
  for beam_cache in ('reorder', 'pointers'):
    cfg = tiny(n, k, window, cache_layout=layout, attention_impl=impl,
               beam_cache=beam_cache)
    model = Transformer(cfg, rngs=nnx.Rngs(8))

    @jax.jit
    def search(src, model=model):
      cache = model.init_cache(model.encode(src), src, max_len, beam_size=beams)
      return decoding.beam_search(model.decode_step, cache, 3, beams, max_len,
                                  eos_id=1, reorder=model.reorder_cache, chunk=chunk)
    out.append(jax.device_get(search(src)))
  np.testing.assert_array_equal(out[0][0], out[1][0])
  np.testing.assert_allclose(out[0][1], out[1][1], atol=1e-5)
  assert len(np.unique(out[0][0][:, :, 1:])) > 3  # The beams took turns.


def test_kv_pointers_reorder_moves_only_the_table():
  model = Transformer(tiny(4, 1, beam_cache='pointers', cache_layout='BKLH'),
                      rngs=nnx.Rngs(1))
  src, _ = batch()
  cache = model.init_cache(model.encode(src), src, max_len=5, beam_size=2)
  assert cache['kv_rows'].shape == (6, 5)
  _, cache = model.decode_step(jnp.zeros((6,), jnp.int32), cache)
  np.testing.assert_array_equal(cache['kv_rows'][:, 0], [0, 1] * 3)  # Own rows.
  rows = jnp.array([1, 1, 2, 2, 5, 4])
  moved = model.reorder_cache(cache, rows)
  np.testing.assert_array_equal(moved['kv_rows'], cache['kv_rows'][rows])
  assert all(m['k'] is c['k'] and m['v'] is c['v']
             for m, c in zip(moved['layers'], cache['layers']))
  greedy = model.init_cache(model.encode(src), src, max_len=5)
  assert 'kv_rows' not in greedy  # One beam: nothing to point at.
