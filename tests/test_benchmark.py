"""The Table 2 benchmark on tiny configs: row fields, floors, outputs, meaning."""

import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import cudnn_on_cpu
from mqa_flax import benchmark
from mqa_flax import decoding
from mqa_flax import hlo
from mqa_flax import metrics
from mqa_flax import report
from mqa_flax import tables
from mqa_flax.config import ModelConfig
from mqa_flax.model import Transformer

B, S, T = 4, 6, 8  # S != T keeps cross and self K/V shapes apart.
TRAIN_B, TRAIN_LEN = 4, 8
REQUIRED = ('variant', 'kind', 'cache', 'batch', 'src_len', 'tgt_len',
            'us_per_token', 'compile_s', 'bytes_per_step', 'achieved_gbps',
            'floor_us_per_token', 'fraction_of_floor', 'device', 'date', 'dtype',
            'flops_per_token', 'compute_floor_us_per_token',
            'fraction_of_compute_floor', 'device_gbps', 'device_tflops',
            'platform', 'jax_version', 'median_s', 'reps', 'command',
            'git_commit', 'attention_impl', 'cache_layout')
DECODERS = (('greedy', 'padded'), ('greedy', 'growing'), ('beam4', 'padded'),
            ('beam4', 'growing'))


def tiny(num_kv_heads: int) -> ModelConfig:
  return ModelConfig(vocab_size=64, num_encoder_layers=2, num_decoder_layers=2,
                     d_model=32, d_ff=64, num_heads=4, num_kv_heads=num_kv_heads,
                     head_dim=8, max_len=32, dropout_rate=0.0)


@pytest.fixture(scope='module')
def bench(tmp_path_factory):
  out = str(tmp_path_factory.mktemp('bench'))
  emit = metrics.jsonl_appender(os.path.join(out, 'benchmark.jsonl'),
                                command='pytest tests/test_benchmark.py',
                                git_commit=metrics.git_commit())
  rows = benchmark.run({'mha': tiny(4), 'mqa': tiny(1)}, batch=B, src_len=S,
                       tgt_len=T, beam_batch=B, train_batch=TRAIN_B,
                       train_len=TRAIN_LEN, reps=2, chunk=4, emit=emit)
  markdown = report.write_benchmark(rows, out)
  print(markdown)
  return out, metrics.read_jsonl(os.path.join(out, 'benchmark.jsonl')), markdown


def by_key(rows):
  return {(r['variant'], r['kind'], r['cache']): r for r in rows}


def test_every_row_has_every_field_with_sane_values(bench):
  _, rows, _ = bench
  assert sorted(by_key(rows)) == sorted(
      (v, k, c) for v in ('mha', 'mqa') for k, c in
      DECODERS + (('encoder', None), ('train', None)))
  for r in rows:
    missing = [f for f in REQUIRED if f not in r]
    assert not missing, (r['kind'], missing)
    for f in ('us_per_token', 'compile_s', 'median_s', 'flops_per_token',
              'compute_floor_us_per_token', 'fraction_of_compute_floor',
              'device_gbps', 'device_tflops'):
      assert 0 < r[f] < math.inf, (r['kind'], f, r[f])
    per = r['src_len'] if r['kind'] == 'encoder' else r['tgt_len']
    tokens = r['batch'] * per  # Sentences x source, output or train tokens.
    assert r['us_per_token'] == pytest.approx(r['median_s'] / tokens * 1e6)
    memory = ('bytes_per_step', 'achieved_gbps', 'floor_us_per_token',
              'fraction_of_floor')
    if r['kind'] in ('encoder', 'train'):  # Traffic not modelled.
      assert all(r[f] is None for f in memory)
      continue
    assert r['loop_cache_copy_bytes_per_step'] >= 0
    assert r['loop_bytes_by_kind'].get('dynamic-update-slice', 0) > 0
    for f in memory + ('kv_cache_bytes',):
      assert 0 < r[f] < math.inf, (r['kind'], f, r[f])
    floor = r['bytes_per_step'] / r['batch'] / (r['device_gbps'] * 1e3)
    assert r['floor_us_per_token'] == pytest.approx(floor)
    assert r['fraction_of_floor'] == pytest.approx(
        r['floor_us_per_token'] / r['us_per_token'])
  assert by_key(rows)[('mqa', 'beam4', 'padded')]['beam_size'] == 4


def test_mqa_moves_fewer_bytes_than_mha(bench):
  rows = by_key(bench[1])
  for kind, cache in DECODERS:
    mha, mqa = rows[('mha', kind, cache)], rows[('mqa', kind, cache)]
    assert mqa['bytes_per_step'] < mha['bytes_per_step'], (kind, cache)
    assert mqa['kv_cache_bytes'] < mha['kv_cache_bytes'], (kind, cache)
  for kind in ('greedy', 'beam4'):
    assert (rows[('mha', kind, 'growing')]['bytes_per_step'] <
            rows[('mha', kind, 'padded')]['bytes_per_step'])
  # Beam floors count the reorder (read + write of the self K/V), greedy has none.
  assert rows[('mha', 'greedy', 'padded')]['reorder_bytes_per_step'] == 0
  beam = rows[('mha', 'beam4', 'padded')]
  assert 0 < beam['reorder_bytes_per_step'] < beam['bytes_per_step']


def test_outputs(bench):
  out, rows, markdown = bench
  assert len(rows) == 12 and all(r['command'].startswith('pytest') for r in rows)
  with open(os.path.join(out, 'table2.md')) as f:
    assert f.read() == markdown
  table = markdown.split('\n\n')[1].splitlines()  # Header, rule, one per variant.
  assert [line.split(' | ')[0] for line in table[2:]] == ['| mha', '| mqa']
  assert ' + ' in table[2]  # 'enc + dec' cells.
  scalars = metrics.read_jsonl(os.path.join(out, metrics.METRICS_FILE))[0]
  assert scalars['step'] == 0 and len(scalars) == 13
  assert scalars['benchmark/mqa/greedy_growing_us_per_token'] > 0
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(out))


def greedy_decoder_traffic(k: int, layout: str, beams: int = 1) -> dict:
  """loop_traffic of the compiled benchmark decoder, N = 8, cache > weights."""
  b, s, t = 64, 12, 16  # A K=1 cache leaf outweighs activations and weights.
  cfg = ModelConfig(vocab_size=64, num_encoder_layers=1, num_decoder_layers=1,
                    d_model=32, d_ff=64, num_heads=8, num_kv_heads=k,
                    head_dim=16, max_len=32, dropout_rate=0.0,
                    cache_layout=layout)
  graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)),
                               nnx.Param)
  inputs = jnp.ones((b, s), jnp.int32)
  cache = jax.eval_shape(lambda p: benchmark.encode_cache(graphdef, p, inputs, t,
                                                      beams), params)
  leaf = min(x.size * x.dtype.itemsize for layer in cache['layers']
             for x in layer.values())
  text = jax.jit(benchmark.decode_fn(graphdef, b, beams, t, None)).lower(
      params, cache).compile().as_text()
  return hlo.loop_traffic(text, leaf)


@pytest.mark.parametrize('k', [1, 2, 8])
def test_greedy_decode_loop_updates_cache_in_place_and_copies_nothing(k):
  traffic = greedy_decoder_traffic(k, 'BKLH')
  assert set(traffic) == {'dynamic-update-slice'}, traffic


def test_growing_decode_gives_the_same_tokens_as_padded():
  cfg = tiny(1)  # The read_len path is the same for every K.
  graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(1)))
  inputs = jax.random.randint(jax.random.key(2), (B, S), 1, cfg.vocab_size)

  @jax.jit
  def decode(params, inputs):
    model = nnx.merge(graphdef, params)
    cache = model.init_cache(model.encode(inputs), inputs, T)
    padded = decoding.greedy_search(model.decode_step, cache, B, T, eos_id=-1,
                                    stop_at_eos=False)
    growing = decoding.greedy_search(model.decode_step, cache, B, T, eos_id=-1,
                                     stop_at_eos=False, chunk=3)
    return padded, growing

  padded, growing = jax.device_get(decode(params, inputs))
  assert len(np.unique(padded)) > 2  # Not a degenerate constant output.
  np.testing.assert_array_equal(growing, padded)


def test_failing_impl_gives_an_error_row_and_the_others_run(tmp_path):
  emitted = []
  rows = benchmark.run({'mqa': tiny(1)}, batch=2, src_len=S, tgt_len=T,
                       kinds=('greedy',), cache_modes=('padded',), reps=1,
                       impls=benchmark.parse_impls(['nope/BLKH', 'xla/BKLH']),
                       emit=emitted.append)
  assert emitted == rows and len(rows) == 2
  assert rows[0]['us_per_token'] is None and 'nope' in rows[0]['error']
  assert rows[1]['us_per_token'] > 0 and rows[1]['cache_layout'] == 'BKLH'
  text = report.write_benchmark(rows, str(tmp_path))
  assert '### Errors' in text and 'nope/BLKH' in text


def test_impls_name_the_argmax_and_rows_and_tables_keep_it(tmp_path):
  assert benchmark.parse_impls(['xla_reduce/BKLH/pallas', 'xla/BKLH', 'cudnn']) == [
      ('xla_reduce', 'BKLH', 'pallas'), ('xla', 'BKLH', 'xla'), ('cudnn', 'BLKH', 'xla')]
  rows = benchmark.run({'mqa': tiny(1)}, batch=2, src_len=S, tgt_len=T,
                       kinds=('greedy', 'beam4'), cache_modes=('padded',), reps=1,
                       beam_batch=2, impls=[('xla', 'BKLH', 'xla'),
                                            ('xla', 'BKLH', 'pallas')])
  # argmax_impl is greedy's argmax and beam search's top-k.
  assert [(r['kind'], r['argmax_impl']) for r in rows] == [
      ('greedy', 'xla'), ('beam4', 'xla'), ('greedy', 'pallas'), ('beam4', 'pallas')]
  assert all(r['us_per_token'] > 0 for r in rows)
  text = report.write_benchmark(rows, str(tmp_path))
  assert 'mqa (xla/BKLH/pallas)' in text and 'mqa (xla/BKLH)' in text


def test_rows_say_how_many_tokens_match_the_first_impls(monkeypatch, tmp_path):
  # Same weights and inputs: the Pallas attention decodes what XLA's does;
  # an xla_reduce whose step forgets to write its K/V into the cache (a
  # broken kernel, simulated) decodes something else, and says so.
  from mqa_flax import model as model_lib  # pylint: disable=g-import-not-at-top
  write_and_attend = model_lib.DecoderLayer._write_and_attend

  def forgetful(self, qkv, cache, slot, mask, read_len, impl, layout, beams):
    y, k, v = write_and_attend(self, qkv, cache, slot, mask, read_len, impl,
                               layout, beams)
    if impl == 'xla_reduce':
      k, v = cache['k'], cache['v']  # This position's K/V are forgotten.
    return y, k, v
  monkeypatch.setattr(model_lib.DecoderLayer, '_write_and_attend', forgetful)
  rows = benchmark.run({'mqa': tiny(1)}, batch=8, src_len=S, tgt_len=2 * T,
                       kinds=('greedy', 'beam4'), cache_modes=('padded',), reps=1,
                       beam_batch=4, impls=benchmark.parse_impls(
                           ['xla/BKLH', 'pallas/BKLH', 'xla_reduce/BKLH']))
  by = {(r['attention_impl'], r['kind']): r for r in rows}
  assert 'tokens_same_fraction' not in by['xla', 'greedy']  # The reference.
  for kind in ('greedy', 'beam4'):
    assert by['pallas', kind]['tokens_reference'] == 'xla/BKLH padded'
    assert by['pallas', kind]['tokens_same_fraction'] == 1.0
    assert by['xla_reduce', kind]['tokens_same_fraction'] < 0.8
  text = report.write_benchmark(rows, str(tmp_path))
  assert 'same tokens' in text


def test_beam_rows_for_each_beam_cache_and_tables_keep_them_apart(tmp_path):
  rows = benchmark.run({'mqa': tiny(1)}, batch=2, src_len=S, tgt_len=T,
                       kinds=('greedy', 'beam4'), cache_modes=('padded',), reps=1,
                       beam_batch=2, beam_caches=('reorder', 'pointers'))
  assert [(r['kind'], r['beam_cache']) for r in rows] == [
      ('greedy', None), ('beam4', 'reorder'), ('beam4', 'pointers')]
  assert all(r['us_per_token'] > 0 for r in rows)
  reorder, pointers = rows[1], rows[2]
  # The pointers' reorder moves a table of int32, not the K/V cache.
  assert pointers['reorder_bytes_per_step'] < reorder['reorder_bytes_per_step'] / 10
  text = report.write_benchmark(rows, str(tmp_path))
  assert 'mqa (xla/BLKH/pointers)' in text and 'mqa (xla/BLKH)' in text


def test_decoder_rows_for_each_gemm_impl(monkeypatch, tmp_path):
  # 'cublas' compiles the decoder's program with XLA's Triton GEMM fusions
  # off (on the CPU that changes nothing: the tokens are the same).
  options, compile_ = [], jax.stages.Lowered.compile

  def compile_recording(self, compiler_options=None):
    options.append(compiler_options)
    return compile_(self, compiler_options)

  monkeypatch.setattr(jax.stages.Lowered, 'compile', compile_recording)
  rows = benchmark.run({'mqa': tiny(1)}, batch=2, src_len=S, tgt_len=T,
                       kinds=('greedy', 'beam4'), cache_modes=('padded',), reps=1,
                       beam_batch=2, gemm_impls=('xla', 'cublas'))
  assert [(r['kind'], r['gemm_impl']) for r in rows] == [
      ('greedy', 'xla'), ('greedy', 'cublas'), ('beam4', 'xla'), ('beam4', 'cublas')]
  assert options.count({'xla_gpu_enable_triton_gemm': False}) == 2
  for r in rows[1::2]:
    assert (r['tokens_reference'], r['tokens_same_fraction']) == ('xla/BLKH padded', 1.0)
  text = report.write_benchmark(rows, str(tmp_path))
  assert 'mqa (xla/BLKH/cublas)' in text and 'mqa (xla/BLKH)' in text
  with pytest.raises(ValueError, match="gemm_impl='triton'"):
    benchmark.gemm_options('triton')


def test_decoder_rows_for_each_norm_impl(tmp_path):
  # The LayerNorms folded into their GEMMs decode the same tokens (Pallas'
  # interpreter here, float32).
  rows = benchmark.run({'gqa': tiny(2)}, batch=4, src_len=S, tgt_len=T,
                       kinds=('greedy', 'beam4'), cache_modes=('padded',), reps=1,
                       beam_batch=2, norm_impls=('xla', 'pallas'))
  assert [(r['kind'], r['norm_impl']) for r in rows] == [
      ('greedy', 'xla'), ('greedy', 'pallas'), ('beam4', 'xla'), ('beam4', 'pallas')]
  for r in rows[1::2]:
    assert (r['tokens_reference'], r['tokens_same_fraction']) == ('xla/BLKH padded', 1.0)
  text = report.write_benchmark(rows, str(tmp_path))
  assert 'gqa (xla/BLKH/norm)' in text and 'gqa (xla/BLKH)' in text


def test_encoder_and_train_rows_for_each_seq_impl(monkeypatch, tmp_path):
  # cuDNN's attention runs here as jax's XLA version of the same call; a
  # float32 model cannot take it and gets error rows, the others go on.
  cudnn_on_cpu(monkeypatch)
  variants = {'mqa': dataclasses.replace(tiny(1), dtype='bfloat16'), 'mha': tiny(4)}
  rows = benchmark.run(variants, batch=2, src_len=S, tgt_len=T, reps=1,
                       kinds=('encoder', 'train'), train_batch=TRAIN_B,
                       train_len=TRAIN_LEN, seq_impls=('xla', 'cudnn'))
  assert [(r['variant'], r['kind'], r['seq_attention_impl'], r['attention_impl'])
          for r in rows] == [(v, kind, seq, seq) for v in ('mqa', 'mha')
                             for kind in ('encoder', 'train') for seq in ('xla', 'cudnn')]
  timed = [r['us_per_token'] is not None for r in rows]
  assert timed == [True] * 4 + [True, False] * 2
  assert all('bfloat16' in r['error'] for r in rows if r['us_per_token'] is None)
  text = report.write_benchmark(rows, str(tmp_path))
  assert '| mqa | train | cudnn |' in text and f'| mqa | train | {tables.DASH} |' in text


def test_trained_state_is_not_donated_and_bad_kinds_raise():
  cfg = tiny(1)
  params = nnx.state(Transformer(cfg, rngs=nnx.Rngs(3)), nnx.Param)
  rows = benchmark.run({'mqa': cfg}, states={'mqa': params}, batch=2,
                       src_len=S, tgt_len=T, kinds=('encoder',), reps=1)
  assert [r['kind'] for r in rows] == ['encoder']
  assert not any(x.is_deleted() for x in jax.tree.leaves(params))
  with pytest.raises(ValueError, match='kinds'):
    benchmark.run({'mqa': cfg}, kinds=('beam',))


def test_rows_on_a_known_gpu_carry_the_cost_models_prediction(monkeypatch, tmp_path):
  # On an H100 or H200 a padded decoder row carries the time gpu_targets'
  # cost model gives its program (here the CPU is taken for an H200); a
  # growing row, whose loops differ, does not.
  rows = benchmark.run({'mqa': tiny(1)}, batch=2, src_len=S, tgt_len=T,
                       kinds=('greedy',), reps=1)
  assert all('program_predicted_us_per_token' not in r for r in rows)
  monkeypatch.setattr(benchmark.gpu_targets, 'target_of', lambda device: 'h200')
  rows = benchmark.run({'mqa': tiny(1)}, batch=2, src_len=S, tgt_len=T,
                       kinds=('greedy',), reps=1)
  padded, growing = rows
  assert padded['cache'] == 'padded' and padded['program_predicted_us_per_token'] > 0
  assert 'program_predicted_us_per_token' not in growing
  # Table 2's every-row table shows it beside the time measured.
  text = report.write_benchmark(rows, str(tmp_path))
  line = [l for l in text.splitlines() if '| greedy | padded |' in l][0]
  measured = tables.num(padded['us_per_token'])
  assert f"| {measured} | {tables.num(padded['program_predicted_us_per_token'])} |" in line
