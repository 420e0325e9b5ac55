"""Uptraining (Ainslie et al. 2023): a trained MHA checkpoint -> an MQA/GQA one.

  python -m mqa_flax.convert --from=runs/m30k-mha --to=runs/m30k-mha2mqa \
      --num_kv_heads=1

Each group of G = N / K key heads (and value heads) is mean-pooled into one:
k, v [D, N, H] -> [D, K, G, H] -> mean over G -> [D, K, H] (query head
n = k * G + g uses kv head k). A GQA source is pooled the same way from its
K_src heads. Which attentions get K follows the source's `kv_heads_scope`
(encoder self-attention only with 'all'); every other parameter is copied.
The new workdir holds config.json (the source's, with model.num_kv_heads = K,
d_ff unchanged, variant `<source variant>_uptrain_kv<K>`), spm.model, the
tokenized data cache `data/` and a step-0 checkpoint with a fresh optimizer
state and the data position at the start. Fine-tune it with the source's
config file and variant (the GQA paper uses about 5% of the pretraining steps):

  python train.py --config=configs/multi30k.py:mha \
      --config.model.num_kv_heads=1 --config.variant=mha_uptrain_kv1 \
      --config.num_train_steps=1000 --workdir=runs/m30k-mha2mqa

(plus any override the source run was trained with); train.py resumes from
step 0, and its architecture check compares exactly the model and data that
config.json records.
"""

import json
import os
import shutil

from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
from flax import nnx

from mqa_flax import checkpoint as ckpt_lib
from mqa_flax import errors
from mqa_flax import files
from mqa_flax import runs
from mqa_flax import state as state_lib
from mqa_flax.config import KV_SCOPES, ModelConfig, check_heads


def pool_kv(params: nnx.State, num_heads: int, num_kv_heads: int,
            scope: str) -> nnx.State:
  """Mean-pools the k/v heads of the attentions in `scope` down to K heads.

  Args:
    params: Transformer parameters; their k/v leaves are [D, K_src, H].
    num_heads: N, the query heads.
    num_kv_heads: K after pooling; must divide N and K_src.
    scope: the model's `kv_heads_scope`: 'all' also pools encoder self-attention.
  """
  check_heads(num_heads, num_kv_heads)
  if scope not in KV_SCOPES:
    raise ValueError(f'kv_heads_scope={scope!r}; expected one of {KV_SCOPES}')
  pooled = {'self_attn', 'cross_attn'} | ({'attn'} if scope == 'all' else set())

  def pool(path, x):
    names = [str(p.key) for p in path if isinstance(p, jax.tree_util.DictKey)]
    if len(names) < 2 or names[-1] not in ('k', 'v') or names[-2] not in pooled:
      return x
    d, k_src, h = x.shape
    check_heads(k_src, num_kv_heads)
    return x.reshape(d, num_kv_heads, k_src // num_kv_heads, h).mean(2)

  return jax.tree_util.tree_map_with_path(pool, params)


def convert(src_workdir: str, dst_workdir: str, num_kv_heads: int) -> str:
  """Writes `dst_workdir`: the source run with K kv heads, ready to fine-tune."""
  if os.path.isdir(dst_workdir) and os.listdir(dst_workdir):
    raise FileExistsError(f'{dst_workdir} exists and is not empty; choose a new --to')
  if not os.path.isdir(os.path.join(src_workdir, 'checkpoints')):
    raise FileNotFoundError(f'{src_workdir} holds no checkpoint to convert')
  run = runs.restore(src_workdir)
  config = run.config
  n, k_src = config.model.num_heads, config.model.num_kv_heads
  check_heads(n, num_kv_heads)
  if num_kv_heads >= k_src:
    raise ValueError(f'num_kv_heads={num_kv_heads} is not below the source\'s '
                     f'{k_src}: nothing to pool')
  params = pool_kv(run.params, n, num_kv_heads, config.model.kv_heads_scope)

  config.model.num_kv_heads = num_kv_heads
  config.variant = f'{config.variant}_uptrain_kv{num_kv_heads}'
  cfg = ModelConfig.from_config(config.model, run.tokenizer.vocab_size)
  _, abstract = state_lib.abstract_params(cfg)
  shapes = lambda tree: {jax.tree_util.keystr(p): x.shape
                         for p, x in jax.tree_util.tree_leaves_with_path(tree)}
  assert shapes(params) == shapes(abstract), 'pooled shapes differ'

  os.makedirs(dst_workdir, exist_ok=True)
  shutil.copy(os.path.join(src_workdir, 'spm.model'), dst_workdir)
  if os.path.isdir(os.path.join(src_workdir, 'data')):
    shutil.copytree(os.path.join(src_workdir, 'data'),
                    os.path.join(dst_workdir, 'data'))
  files.write_json(os.path.join(dst_workdir, 'config.json'), config.to_dict(), 2)
  files.write_json(os.path.join(dst_workdir, 'converted_from.json'),
                   {'workdir': os.path.abspath(src_workdir), 'step': run.step,
                    'num_kv_heads': k_src})
  # On the host: saving one copy is faster than gathering device replicas.
  tx = state_lib.make_optimizer(config.opt, config.num_train_steps)
  state = jax.device_get(
      state_lib.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params)))
  record = ckpt_lib.run_record(config.model.to_dict(), run.tokenizer.fingerprint,
                               run.tokenizer.vocab_size)
  ckpt = ckpt_lib.Checkpointer(dst_workdir, config.keep_checkpoints, record)
  ckpt.save(0, state, [{'epoch': 0, 'cursor': 0}], force=True)
  ckpt.close()
  logging.info('wrote %s (%s, K=%d) from %s at step %d', dst_workdir,
               config.variant, num_kv_heads, src_workdir, run.step)
  return dst_workdir


_FROM = flags.DEFINE_string('from', None, 'Trained source workdir.')
_TO = flags.DEFINE_string('to', None, 'New workdir (must not exist or be empty).')
_KV = flags.DEFINE_integer('num_kv_heads', 1, 'K of the converted model.')


def main(argv):
  del argv
  try:
    out = convert(_FROM.value, _TO.value, _KV.value)
  except ValueError as e:
    raise errors.UserError(str(e)) from None
  with open(os.path.join(out, 'config.json')) as f:
    variant = json.load(f)['variant']
  print(f'wrote {out}; fine-tune it with\n  python train.py '
        f'--config=<source config file>:{variant.rsplit("_uptrain", 1)[0]} '
        f'--config.model.num_kv_heads={_KV.value} --config.variant={variant} '
        f'--config.num_train_steps=<steps> --workdir={out}')


if __name__ == '__main__':
  flags.mark_flags_as_required(['from', 'to'])
  errors.run(main)
