"""Multi30k EN-DE (29k training pairs): the variant family at a 29k-pair size.

  python train.py --config=configs/multi30k.py:mqa --workdir=runs/m30k-mqa-s0 \
      --config.data.data_dir=../shared/data

data_dir holds `multi30k/{train,val,test_2016_flickr}.{en,de}[.gz]` (set it
with the flag or the MQA_FLAX_DATA environment variable). Same variants as
configs/paper.py at d_model 512, parameter-matched the same way. Published
text-only Transformer baselines reach about 38-41 BLEU on test2016.

Recipe: 40 epochs (passes over the 29k pairs; with the 8k vocabulary a pass
is 63 steps of 64 packed rows x 128 tokens, so 2,520 steps), AdamW with a
linear warmup over the first 10% of the steps and a cosine decay to zero,
dropout 0.3, label smoothing 0.1, bfloat16 compute. Dev ln(PPL) every 100
steps (about 1.6 epochs); the parameters best on dev are kept in
`<workdir>/best/` and are what `decode.py` scores, so test BLEU never picks
a checkpoint. Only the final train state is saved for resuming (and one on
SIGTERM), as a 48M-parameter model with AdamW state is about 580 MB.
"""

import os

import ml_collections

from configs import base
from configs import variants


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Multi30k config with the variant `arg` (`<variant>[,tiny]`) applied."""
  c = base.get_config()
  m = c.model
  m.d_model, m.d_ff, m.num_heads, m.num_kv_heads, m.head_dim = 512, 2048, 8, 8, 64
  m.max_len = 128
  m.dropout_rate = 0.3
  m.dtype = 'bfloat16'
  d = c.data
  d.source = 'text'
  d.data_dir = os.environ.get('MQA_FLAX_DATA', '../shared/data')
  d.train_split = 'multi30k/train'
  d.dev_split = 'multi30k/val'
  d.test_split = 'multi30k/test_2016_flickr'
  d.vocab_size = 8000
  d.max_len = 128
  d.max_eval_len = 128
  d.batch_size = 64
  d.eval_batch_size = 256
  c.opt.optimizer = 'adamw'
  c.opt.learning_rate = 7e-4
  c.opt.schedule = 'cosine'
  c.opt.warmup_fraction = 0.1
  c.opt.weight_decay = 1e-4
  c.num_epochs = 40
  c.eval_every = 100
  c.bleu_every = 0  # decode.py scores the best checkpoint after training.
  c.checkpoint_every = 100_000  # The end (and SIGTERM) only.
  c.keep_checkpoints = 1
  return variants.apply(c, arg)
