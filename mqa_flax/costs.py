"""Sizes and per-token costs of a model: parameters, K/V cache, FLOPs, traffic.

Shapes come from `jax.eval_shape`, so even the 211M model costs no memory.
The memory traffic of one incremental decode step (decoder weights + tied
output embedding + cross-attention K/V + self-attention K/V) is the floor
that the benchmark compares its timings with.
"""

import math

from flax import nnx

from mqa_flax.config import ModelConfig
from mqa_flax.model import abstract_model


def param_groups(cfg: ModelConfig) -> dict[str, int]:
  """Parameter counts by part: embeddings, encoder, decoder sub-layers."""
  groups: dict[str, int] = {}
  for path, leaf in nnx.to_flat_state(abstract_model(cfg)[1]):
    keys = [str(p) for p in path]
    if keys[0] in ('encoder', 'decoder'):
      part = keys[2] if keys[2] in ('attn', 'self_attn', 'cross_attn', 'ffn') else 'ln'
      name = f'{keys[0]}.{part}'
    else:
      name = keys[0]
    groups[name] = groups.get(name, 0) + math.prod(leaf.get_value().shape)
  return groups


def param_count(cfg: ModelConfig) -> int:
  """Total parameter count of a model config."""
  return sum(param_groups(cfg).values())


def analyze(cfg: ModelConfig, batch: int, src_len: int, tgt_len: int,
            beam_size: int = 1) -> dict[str, float]:
  """Sizes and per-token costs of training and incremental decoding.

  Traffic counts what one decode step must read at least: each weight used
  per step once, the cross K/V of every sentence, and the self K/V of every
  row up to its position (`growing`, averaged over the target length) or the
  whole cache (`padded`, the paper's fixed-size memory; the window when
  local). With beams, `decode_reorder_bytes_per_step_<mode>` adds what beam
  search's reorder moves: it reads and writes every row's self K/V cache,
  whole or up to the positions written; with `cfg.beam_cache` 'pointers'
  only each row's int32 table of cache rows ([rows, L]), and every row's
  self-attention reads its sentence's whole cache (no `growing` read).
  """
  groups = param_groups(cfg)
  item = cfg.compute_dtype.itemsize
  d, n, h = cfg.d_model, cfg.num_heads, cfg.head_dim
  k = cfg.num_kv_heads
  layers = cfg.num_decoder_layers
  rows = batch * beam_size
  kv_width = 2 * k * h  # keys + values per position per layer

  cross_kv_proj = layers * d * kv_width  # Done once per sentence.
  step_weights = (sum(v for g, v in groups.items() if g.startswith('decoder'))
                  - cross_kv_proj + cfg.vocab_size * d)
  window = cfg.local_window or tgt_len
  # Positions attended at step t (0-based) is min(t + 1, window).
  mean_seen = sum(min(t + 1, window) for t in range(tgt_len)) / tgt_len
  padded_seen = min(window, tgt_len)

  self_bytes_per_pos = layers * kv_width * item
  cross_bytes_per_sentence = layers * src_len * kv_width * item
  weight_bytes = step_weights * item
  traffic = {}
  pointers = beam_size > 1 and cfg.beam_cache == 'pointers'
  read_seen = {'growing': padded_seen if pointers else mean_seen,
               'padded': padded_seen}
  for mode, seen in read_seen.items():
    traffic[mode] = (weight_bytes + batch * cross_bytes_per_sentence +
                     rows * seen * self_bytes_per_pos)
  # What beam search's reorder reads and writes per row and position: each
  # row's self K/V, or with pointers its table's int32.
  reorder_per_pos = 4 if pointers else self_bytes_per_pos

  dec_flops = 2 * step_weights + layers * 4 * n * h * (mean_seen + src_len)
  enc_weights = sum(v for g, v in groups.items() if g.startswith('encoder'))
  enc_flops = (2 * (enc_weights + cross_kv_proj) +
               cfg.num_encoder_layers * 4 * n * h * src_len)
  train_flops_per_token = 3 * (enc_flops + dec_flops)  # fwd + 2x bwd.
  return {
      'params_total': sum(groups.values()),
      **{f'params.{g}': v for g, v in sorted(groups.items())},
      'kv_cache_bytes_self_per_sequence': self_bytes_per_pos * padded_seen,
      'kv_cache_bytes_cross_per_sequence': cross_bytes_per_sentence,
      'kv_cache_bytes_per_token': self_bytes_per_pos,
      'decode_flops_per_token': dec_flops,
      'encoder_flops_per_token': enc_flops,
      'train_flops_per_token': train_flops_per_token,
      'decode_weight_bytes_per_step': weight_bytes,
      'decode_bytes_per_step_growing': traffic['growing'],
      'decode_bytes_per_step_padded': traffic['padded'],
      'decode_bytes_per_token_growing': traffic['growing'] / rows,
      'decode_bytes_per_token_padded': traffic['padded'] / rows,
      # Beam search's reorder: all of it (padded) or, at the least, the
      # positions written so far (growing).
      **{f'decode_reorder_bytes_per_step_{mode}': (
          2 * rows * seen * reorder_per_pos if beam_size > 1 else 0)
         for mode, seen in (('growing', mean_seen), ('padded', padded_seen))},
      'batch': batch, 'beam_size': beam_size, 'src_len': src_len,
      'tgt_len': tgt_len, 'dtype': cfg.dtype,
  }
