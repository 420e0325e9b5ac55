"""The attention variants of the paper's Table 1, plus grouped-query rows.

A config file's argument is `<variant>[,tiny]`, e.g. `configs/paper.py:mqa` or
`configs/multi30k.py:gqa2,tiny`. Each variant changes the heads of the file's
multi-head baseline and sets d_ff by `mqa_flax.config.matched_d_ff`, so every
row has the baseline's parameter count (the paper's rule: d_ff 5440 for MQA,
6784 for the reduced-head rows). Reduced-head rows keep N * H equal to the
baseline's H (paper: h=1 d_k=128, h=2 d_k=64, h=4 d_k=32, h=8 d_k=16).
"""

import ml_collections

from mqa_flax.config import matched_d_ff

LOCAL_WINDOW = 32  # Paper: the current and the previous 31 positions.

# name: changes to the baseline: `heads` query heads, `kv` key/value heads
# (default: as many as query heads), `head_div` divides the baseline's
# head_dim, `local` the decoder self-attention window.
VARIANTS = {
    'mha': dict(),
    'mqa': dict(kv=1),
    'gqa2': dict(kv=2),
    'gqa4': dict(kv=4),
    'mha_local': dict(local=LOCAL_WINDOW),
    'mqa_local': dict(kv=1, local=LOCAL_WINDOW),
    'mha_h1': dict(heads=1, head_div=1),
    'mha_h2': dict(heads=2, head_div=2),
    'mha_h4': dict(heads=4, head_div=4),
    'mha_h8_dk16': dict(heads=8, head_div=8),
}


def shrink_to_tiny(c: ml_collections.ConfigDict) -> None:
  """The `tiny` size used by tests and smoke runs: seconds on a CPU."""
  m = c.model
  m.num_encoder_layers = m.num_decoder_layers = 2
  m.head_dim = max(1, m.head_dim // 16)
  m.d_model, m.d_ff, m.max_len, m.dropout_rate = 32, 64, 64, 0.0
  c.data.source = 'numbers'
  c.data.data_dir = ''
  c.data.train_split, c.data.dev_split, c.data.test_split = 'train', 'dev', 'test'
  c.data.vocab_size = 64
  c.data.numbers_train_size, c.data.numbers_eval_size = 400, 16
  c.data.numbers_max = 999
  c.data.max_len, c.data.max_eval_len = 64, 64
  c.data.batch_size, c.data.eval_batch_size = 8, 8
  c.opt.optimizer, c.opt.learning_rate, c.opt.warmup_steps = 'adamw', 3e-3, 5
  c.num_train_steps, c.num_epochs, c.opt.warmup_fraction = 20, 0.0, 0.0
  c.log_every = c.eval_every = c.checkpoint_every = 10
  c.bleu_every = 0


def apply(c: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
  """Applies `<variant>[,tiny]` to a multi-head baseline config, in place."""
  name, *flags = (arg or 'mha').split(',')
  if name not in VARIANTS:
    raise ValueError(f'unknown variant {name!r}; expected one of {list(VARIANTS)}')
  if set(flags) - {'tiny'}:
    raise ValueError(f'unknown config flag(s) {flags}; only "tiny" exists')
  if 'tiny' in flags:
    shrink_to_tiny(c)
  m = c.model
  base = m.to_dict()
  v = VARIANTS[name]
  m.num_heads = v.get('heads', m.num_heads)
  m.num_kv_heads = v.get('kv', m.num_heads)
  m.head_dim = max(1, base['head_dim'] // v.get('head_div', 1))
  m.local_window = v.get('local', 0)
  if 'kv' in v and m.num_kv_heads >= m.num_heads:
    raise ValueError(f'variant {name} needs more than {m.num_heads} query heads '
                     f'(num_kv_heads={m.num_kv_heads})')
  m.d_ff = matched_d_ff(base, m.num_heads, m.num_kv_heads, m.head_dim,
                        m.kv_heads_scope)
  c.variant = name
  return c
