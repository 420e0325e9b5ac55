"""A small model on the generated numbers task: trains on a CPU in minutes.

  python train.py --config=configs/demo.py:mqa --workdir=runs/demo-mqa

300 steps take about 70 s on 2 CPU cores; `python -m mqa_flax.demo` trains
MHA and MQA this way and scores both above 90 BLEU on the test split.

The task (mqa_flax/number_words.py) turns English number words in short
sentences into German ones ("three hundred and twelve" -> "dreihundertzwölf").
"""

import ml_collections

from configs import base
from configs import variants


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Demo config with the variant `arg` (`<variant>[,tiny]`) applied."""
  c = base.get_config()
  m = c.model
  m.num_encoder_layers = m.num_decoder_layers = 2
  m.d_model, m.d_ff, m.num_heads, m.num_kv_heads, m.head_dim = 128, 512, 4, 4, 32
  m.max_len = 64
  m.dropout_rate = 0.0
  d = c.data
  d.source = 'numbers'
  d.train_split, d.dev_split, d.test_split = 'train', 'dev', 'test'
  d.vocab_size = 256
  d.numbers_max = 99_999
  d.numbers_train_size = 100_000
  d.spm_max_sentences = 20_000
  d.max_len = 64
  d.max_eval_len = 64
  d.batch_size = 32
  c.opt.optimizer = 'adamw'
  c.opt.learning_rate = 5e-3
  c.opt.warmup_steps = 50
  c.opt.schedule = 'cosine'
  c.opt.label_smoothing = 0.0
  c.num_train_steps = 300
  c.log_every = 50
  c.eval_every = 100
  c.bleu_every = 0
  c.checkpoint_every = 200
  return variants.apply(c, arg)
