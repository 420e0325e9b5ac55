"""Trains an encoder-decoder Transformer with MHA, GQA or MQA attention.

  python train.py --config=configs/demo.py:mqa --workdir=runs/demo-mqa \
      [--config.model.num_kv_heads=2 ...]

Rerunning the same command resumes from the workdir's newest intact checkpoint.
Exit codes (mqa_flax/errors.py): 0 trained, 2 a user error (one line), 3
stopped by SIGTERM/SIGINT with a checkpoint saved (rerun to resume).
"""

import os

from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from mqa_flax import errors
from mqa_flax import hosts
from mqa_flax import train_lib

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file and variant, e.g. configs/paper.py:mqa.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Experiment directory (resumed if it exists).')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  hosts.maybe_initialize_distributed()  # Before anything touches devices.
  logging.info('JAX %s on %d %s device(s), process %d of %d', jax.__version__,
               jax.device_count(), jax.default_backend(), jax.process_index(),
               jax.process_count())
  os.makedirs(_WORKDIR.value, exist_ok=True)
  train_lib.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  errors.run(main)
