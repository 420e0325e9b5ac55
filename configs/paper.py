"""The paper's base model on WMT14 EN-DE (Shazeer 2019, Table 1 rows).

  python train.py --config=configs/paper.py:mqa --workdir=runs/paper-mqa
  python -m mqa_flax.summary --config=configs/paper.py:mqa

Variants: mha mqa gqa2 gqa4 mha_local mqa_local mha_h1 mha_h2 mha_h4
mha_h8_dk16 (configs/variants.py); each has 211M parameters (+-1%) with the
32k vocabulary. Training: 100k steps of 128 rows x 256 packed tokens,
Adafactor with the inverse-square-root schedule. Needs the `wmt` extra (tfds),
or `--config.data.source=text --config.data.data_dir=...` for local files.
Paper result (newstest2014 BLEU, greedy / beam 4): MHA 27.7 / 28.4, MQA 27.5 / 28.5.
"""

import ml_collections

from configs import base
from configs import variants


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Base config with the variant `arg` (`<variant>[,tiny]`) applied."""
  c = base.get_config()
  c.data.tfds_name = 'wmt14_translate/de-en'
  c.data.dev_split = 'validation'  # newstest2013
  c.data.test_split = 'test'  # newstest2014
  c.model.dtype = 'bfloat16'
  return variants.apply(c, arg)
