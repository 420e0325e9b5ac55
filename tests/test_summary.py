"""Golden sizes of the paper's configs: parameters, d_ff matching, cache and traffic.

These numbers are the README's; update both if a change to the model is intended.
"""

import pytest

from configs import demo, multi30k, paper, variants
from mqa_flax import costs
from mqa_flax.config import ModelConfig, matched_d_ff


def analyze(variant, **shape):
  c = paper.get_config(variant)
  return c, costs.analyze(ModelConfig.from_config(c.model, c.data.vocab_size),
                            shape.get('batch', 1024), 128, 128)


def test_paper_rows_match_the_paper():
  d_ff = {v: paper.get_config(v).model.d_ff for v in variants.VARIANTS}
  assert d_ff['mha'] == 4096 and d_ff['mqa'] == 5440
  assert {d_ff[v] for v in ('mha_h1', 'mha_h2', 'mha_h4', 'mha_h8_dk16')} == {6784}
  totals = {v: analyze(v)[1]['params_total'] for v in variants.VARIANTS}
  assert totals['mha'] == 210_366_464 and totals['mqa'] == 210_382_592
  assert all(abs(t / 211e6 - 1) < 0.01 for t in totals.values()), totals
  assert abs(totals['mqa'] / totals['mha'] - 1) < 0.01


@pytest.mark.parametrize('config', [multi30k, demo])
def test_other_families_are_parameter_matched(config):
  ref = analyze_family(config, 'mha')
  for v in ('mqa', 'gqa2', 'mha_h1'):
    assert abs(analyze_family(config, v) / ref - 1) < 0.01, v


def analyze_family(config, variant):
  c = config.get_config(variant)
  return costs.param_count(ModelConfig.from_config(c.model, c.data.vocab_size))


def test_gqa_names_need_more_query_heads():
  with pytest.raises(ValueError, match='gqa4 needs more than 4 query heads'):
    demo.get_config('gqa4')


def test_decode_traffic_and_cache():
  _, mha = analyze('mha')
  _, mqa = analyze('mqa')
  assert mha['kv_cache_bytes_per_token'] == 6 * 2 * 8 * 128 * 2  # layers, k+v, K, H, bf16
  assert mqa['kv_cache_bytes_per_token'] * 8 == mha['kv_cache_bytes_per_token']
  # Weights read per step: decoder minus its cross K/V projections, plus logits.
  weights = 100_732_928 - 6 * 2 * 1024 * 1024 + 33_554_432
  assert mha['decode_weight_bytes_per_step'] == 2 * weights
  cross = 1024 * 128 * mha['kv_cache_bytes_per_token']
  self_kv = 1024 * 64.5 * mha['kv_cache_bytes_per_token']  # Mean of 1..128 positions.
  assert mha['decode_bytes_per_step_growing'] == pytest.approx(
      mha['decode_weight_bytes_per_step'] + cross + self_kv)
  # The floors the README quotes at 2.84 TB/s.
  floor = lambda s: s['decode_bytes_per_token_growing'] / 2.84e12 * 1e6
  assert floor(mha) == pytest.approx(1.75, abs=0.01)
  assert floor(mqa) == pytest.approx(0.296, abs=0.005)
  assert mha['decode_reorder_bytes_per_step_padded'] == 0  # Greedy: no reorder.


def test_beam_reorder_moves_the_whole_self_cache_twice():
  c = paper.get_config('mqa')
  cfg = ModelConfig.from_config(c.model, c.data.vocab_size)
  beam = costs.analyze(cfg, 256, 128, 128, beam_size=4)
  per_row = 128 * beam['kv_cache_bytes_per_token']  # Every position of the cache.
  assert beam['decode_reorder_bytes_per_step_padded'] == 2 * 256 * 4 * per_row
  assert beam['decode_reorder_bytes_per_step_growing'] == 2 * 256 * 4 * per_row * 64.5 / 128


def test_matched_d_ff_rule():
  base = dict(num_encoder_layers=6, num_decoder_layers=6, d_model=1024, d_ff=4096,
              num_heads=8, head_dim=128)
  assert matched_d_ff(base, 8, 8, 128) == 4096
  assert matched_d_ff(base, 8, 2, 128) == 5248
  assert matched_d_ff(base, 8, 1, 128, 'decoder') == 4096 + 8 * round(12 * 1792 / 24 / 8)
