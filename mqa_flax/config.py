"""The model's frozen configuration, the d_ff matching rule, config files by path.

Config files (`configs/*.py`) are not part of the package: entry points load
them by path (`--config=configs/paper.py:mqa` through `config_flags`, or
`load_config`), as the flax examples do. They import their siblings as
`configs.<name>`, so the directory holding `configs/` (the repository root)
must be on the import path: it is when a command runs from there.
"""

import dataclasses
import importlib.util
import math
import os
from typing import Any

import jax.numpy as jnp
import ml_collections

from mqa_flax.errors import CONFIGS_NOT_IMPORTABLE, UserError

KV_SCOPES = ('all', 'decoder')
POS_EMBEDDINGS = ('learned', 'sinusoidal')
ATTENTION_IMPLS = ('xla', 'xla_reduce', 'cudnn', 'pallas')
SEQ_ATTENTION_IMPLS = ('xla', 'cudnn')
ARGMAX_IMPLS = ('xla', 'pallas')
NORM_IMPLS = ('xla', 'pallas')
CACHE_LAYOUTS = ('BLKH', 'BKLH')
BEAM_CACHES = ('reorder', 'pointers')


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of the encoder-decoder Transformer (see configs/base.py)."""

  vocab_size: int
  num_encoder_layers: int = 6
  num_decoder_layers: int = 6
  d_model: int = 1024
  d_ff: int = 4096
  num_heads: int = 8
  num_kv_heads: int = 8
  head_dim: int = 128
  kv_heads_scope: str = 'all'
  local_window: int = 0
  max_len: int = 256
  pos_embedding: str = 'learned'
  dropout_rate: float = 0.1
  dtype: str = 'float32'
  # How attention over whole sequences computes, never what (training,
  # evaluation, the encoder): 'xla' (einsums, the scores in memory) or
  # 'cudnn' (cuDNN's fused attention; a CUDA GPU, bfloat16 or float16).
  seq_attention_impl: str = 'xla'
  # How incremental decode steps compute, never what (config.decode): the
  # attention implementation, the K/V cache layout, how the output GEMM's
  # best tokens are found (greedy's argmax, beam search's top-k) and whether
  # each layer's LayerNorms are folded into the GEMMs that read them.
  attention_impl: str = 'xla'
  cache_layout: str = 'BLKH'
  argmax_impl: str = 'xla'
  beam_cache: str = 'reorder'
  norm_impl: str = 'xla'

  def __post_init__(self):
    check_heads(self.num_heads, self.num_kv_heads)
    if self.kv_heads_scope not in KV_SCOPES:
      raise ValueError(
          f'kv_heads_scope={self.kv_heads_scope!r}; expected one of {KV_SCOPES}')
    if self.pos_embedding not in POS_EMBEDDINGS:
      raise ValueError(
          f'pos_embedding={self.pos_embedding!r}; expected one of '
          f'{POS_EMBEDDINGS}')
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f'attention_impl={self.attention_impl!r}; expected one '
                       f'of {ATTENTION_IMPLS}')
    if self.seq_attention_impl not in SEQ_ATTENTION_IMPLS:
      raise ValueError(f'seq_attention_impl={self.seq_attention_impl!r}; expected '
                       f'one of {SEQ_ATTENTION_IMPLS}')
    if self.seq_attention_impl == 'cudnn' and (
        self.dtype not in ('bfloat16', 'float16') or self.head_dim % 8
        or self.head_dim > 256):
      raise ValueError(
          f"seq_attention_impl='cudnn' needs dtype bfloat16 or float16 and a "
          f'head_dim that is a multiple of 8 up to 256 (dtype={self.dtype!r}, '
          f"head_dim={self.head_dim}); use seq_attention_impl='xla'")
    if self.argmax_impl not in ARGMAX_IMPLS:
      raise ValueError(f'argmax_impl={self.argmax_impl!r}; expected one of '
                       f'{ARGMAX_IMPLS}')
    if self.norm_impl not in NORM_IMPLS:
      raise ValueError(f'norm_impl={self.norm_impl!r}; expected one of '
                       f'{NORM_IMPLS}')
    if self.norm_impl == 'pallas' and self.d_model % 16:
      raise ValueError(f"norm_impl='pallas' needs d_model a multiple of 16, got "
                       f"{self.d_model}; use norm_impl='xla'")
    if self.beam_cache not in BEAM_CACHES:
      raise ValueError(f'beam_cache={self.beam_cache!r}; expected one of '
                       f'{BEAM_CACHES}')
    if self.cache_layout not in CACHE_LAYOUTS:
      raise ValueError(f'cache_layout={self.cache_layout!r}; expected one of '
                       f'{CACHE_LAYOUTS}')
    if self.local_window < 0:
      raise ValueError(f'local_window={self.local_window} must be >= 0')
    for name in ('vocab_size', 'd_model', 'd_ff', 'head_dim', 'max_len'):
      if getattr(self, name) <= 0:
        raise ValueError(f'{name}={getattr(self, name)} must be positive')
    jnp.dtype(self.dtype)  # Raises TypeError on an unknown dtype name.

  @property
  def compute_dtype(self) -> jnp.dtype:
    """`dtype` as a numpy dtype."""
    return jnp.dtype(self.dtype)

  @property
  def encoder_kv_heads(self) -> int:
    """K of encoder self-attention: N unless K applies to all attention."""
    return self.num_kv_heads if self.kv_heads_scope == 'all' else self.num_heads

  @classmethod
  def from_config(cls, model_cfg: Any, vocab_size: int, decode_cfg: Any = None,
                  seq_attention_impl: str = 'xla') -> 'ModelConfig':
    """Builds from `config.model` (and `config.decode`'s implementation
    choices, and `config.seq_attention_impl`'s).

    Raises UserError naming the bad value.
    """
    extra = {} if decode_cfg is None else dict(
        attention_impl=decode_cfg.attention_impl,
        cache_layout=decode_cfg.cache_layout,
        # Absent from the config.json of workdirs made before it existed.
        argmax_impl=decode_cfg.get('argmax_impl', 'xla'),
        beam_cache=decode_cfg.get('beam_cache', 'reorder'),
        norm_impl=decode_cfg.get('norm_impl', 'xla'))
    try:
      return cls(**model_cfg.to_dict(), vocab_size=vocab_size,
                 seq_attention_impl=seq_attention_impl, **extra)
    except (TypeError, ValueError) as e:
      raise UserError(f'{e} (fix the --config.model, --config.decode or '
                      '--config.seq_attention_impl values)') from e


def check_heads(num_heads: int, num_kv_heads: int) -> None:
  """Raises ValueError unless K divides N (both positive)."""
  if num_heads <= 0 or num_kv_heads <= 0 or num_heads % num_kv_heads:
    raise ValueError(
        f'num_heads={num_heads} must be a positive multiple of '
        f'num_kv_heads={num_kv_heads}')


def matched_d_ff(base: dict[str, int], num_heads: int, num_kv_heads: int,
                 head_dim: int, kv_heads_scope: str = 'all') -> int:
  """d_ff that keeps the parameter count of `base` when attention changes.

  The rule (it reproduces the paper's 5440 for MQA and 6784 for its reduced
  head rows): attention weights saved over all attention blocks are given to
  the feed-forward blocks, d_ff += saved / (2 * d_model * num_ffn_blocks),
  rounded to a multiple of 8.

  Args:
    base: `num_encoder_layers`, `num_decoder_layers`, `d_model`, `d_ff`,
      `num_heads`, `head_dim` of the reference multi-head model (K = N).
    num_heads: N of the variant.
    num_kv_heads: K of the variant.
    head_dim: H of the variant.
    kv_heads_scope: where K applies ('all' or 'decoder').
  """
  check_heads(num_heads, num_kv_heads)
  enc, dec, d = (base['num_encoder_layers'], base['num_decoder_layers'],
                 base['d_model'])

  def attn_width(n, k, h):  # Per d_model row: q and o are N*H wide, k and v K*H.
    return 2 * n * h + 2 * k * h

  mha = attn_width(base['num_heads'], base['num_heads'], base['head_dim'])
  var = attn_width(num_heads, num_kv_heads, head_dim)
  var_enc = var if kv_heads_scope == 'all' else attn_width(
      num_heads, num_heads, head_dim)
  saved = d * (enc * (mha - var_enc) + 2 * dec * (mha - var))
  extra = saved / (2 * d * (enc + dec))
  return base['d_ff'] + 8 * round(extra / 8)


def load_config(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """`get_config(arg)` of the config file at `path`, loaded as config_flags does."""
  if not os.path.isfile(path):
    raise UserError(f'config file {path} does not exist (paths are relative to '
                    'the directory the command runs in, e.g. the repository root)')
  spec = importlib.util.spec_from_file_location(
      '_config_' + os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except ModuleNotFoundError as e:
    if e.name != 'configs':
      raise
    raise UserError(f'{path} {CONFIGS_NOT_IMPORTABLE}') from None
  return module.get_config(arg)


def set_values(config: ml_collections.ConfigDict,
               values: dict[str, Any]) -> ml_collections.ConfigDict:
  """Sets dotted keys (`{'model.num_kv_heads': 2}`) in place, as command-line
  overrides do, and returns `config`."""
  for key, value in values.items():
    *parents, leaf = key.split('.')
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


# (dotted key, lowest allowed value); keys missing from an older config.json
# are skipped.
_RANGES = (
    ('data.batch_size', 1), ('data.eval_batch_size', 1),
    ('data.max_len', 2), ('data.max_eval_len', 2),
    ('data.vocab_size', 4), ('data.spm_max_sentences', 1),
    ('data.numbers_train_size', 1), ('data.numbers_eval_size', 1),
    ('data.prefetch', 1), ('model.num_encoder_layers', 1),
    ('model.num_decoder_layers', 1), ('model.dropout_rate', 0),
    ('num_train_steps', 0), ('num_epochs', 0), ('log_every', 0),
    ('eval_every', 0), ('bleu_every', 0), ('checkpoint_every', 0),
    ('keep_checkpoints', 1),
    ('opt.warmup_steps', 0), ('opt.warmup_fraction', 0),
    ('opt.label_smoothing', 0), ('opt.grad_clip', 0),
    ('opt.weight_decay', 0), ('decode.beam_size', 1),
    ('decode.alpha', 0), ('decode.max_len_a', 0),
    ('decode.max_len_b', 1))
_BELOW_ONE = ('model.dropout_rate', 'opt.label_smoothing')


def check_ranges(config: ml_collections.ConfigDict, source: str = '--config') -> None:
  """Raises UserError naming the first number of `config` out of its range.

  `source` names where the values come from in the message (the flags, or a
  workdir's config.json).
  """
  for key, low in _RANGES:
    node = config
    for part in key.split('.'):
      node = node.get(part) if hasattr(node, 'get') else None
    if node is None or isinstance(node, bool):
      continue
    below_one = key in _BELOW_ONE
    if not (isinstance(node, (int, float)) and math.isfinite(node) and node >= low
            and (not below_one or node < 1)):
      wanted = f'>= {low}' + (' and < 1' if below_one else '')
      raise UserError(f'{key}={node!r} is out of range: it must be {wanted} '
                      f'(fix {source})')
