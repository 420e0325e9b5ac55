"""Parameters, KV-cache bytes, FLOPs and decode memory traffic of a config.

  python -m mqa_flax.summary --config=configs/paper.py:mqa \
      [--batch=1024 --src_len=128 --tgt_len=128 --beam_size=1] [--json]

The numbers come from `mqa_flax.costs.analyze`.
"""

import json

from absl import flags
from ml_collections import config_flags

from mqa_flax import costs
from mqa_flax import errors
from mqa_flax.config import ModelConfig

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.',
                                          lock_config=True)
_BATCH = flags.DEFINE_integer('batch', 1024, 'Sentences decoded at once.')
_SRC_LEN = flags.DEFINE_integer('src_len', 128, 'Source length (tokens).')
_TGT_LEN = flags.DEFINE_integer('tgt_len', 128, 'Target length (tokens).')
_BEAM = flags.DEFINE_integer('beam_size', 1, 'Beams per sentence.')
_JSON = flags.DEFINE_bool('json', False, 'Print JSON instead of a table.')
flags.mark_flags_as_required(['config'])


def format_table(stats: dict[str, float]) -> str:
  """Aligned `name  value` lines, with M/MB units where they help."""
  lines = []
  for key, v in stats.items():
    if key.startswith('params'):
      text = f'{v / 1e6:,.3f} M'
    elif 'bytes' in key:
      text = f'{v / 2**20:,.3f} MiB' if v >= 2**20 else f'{v / 2**10:,.1f} KiB'
    elif 'flops' in key:
      text = f'{v / 1e6:,.1f} MFLOP'
    else:
      text = str(v)
    lines.append(f'{key:<40} {text}')
  return '\n'.join(lines)


def main(argv):
  del argv
  config = _CONFIG.value
  cfg = ModelConfig.from_config(config.model, config.data.vocab_size)
  stats = costs.analyze(cfg, _BATCH.value, _SRC_LEN.value, _TGT_LEN.value,
                        _BEAM.value)
  stats = {'variant': config.variant, **stats}
  print(json.dumps(stats, indent=1) if _JSON.value else format_table(stats))


if __name__ == '__main__':
  errors.run(main)
