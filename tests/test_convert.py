"""Uptraining conversion: pooled heads keep the function, the result fine-tunes."""

import dataclasses
import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
import orbax.checkpoint as ocp

from configs import demo
from mqa_flax import convert
from mqa_flax import data
from mqa_flax import runs
from mqa_flax import state as state_lib
from mqa_flax import train_lib
from mqa_flax.checkpoint import Checkpointer
from mqa_flax.config import ModelConfig
from mqa_flax.model import Transformer


@pytest.fixture(scope='module')
def source(tmp_path_factory) -> tuple[str, ModelConfig, nnx.State]:
  """A multi-head demo workdir at step 7, its model and (random) parameters."""
  workdir = str(tmp_path_factory.mktemp('mha'))
  config = demo.get_config('mha,tiny')
  tokenizer = data.get_tokenizer(config.data, workdir)
  data.tokenize_split(config.data, config.data.train_split, tokenizer, workdir)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    json.dump(config.to_dict(), f)
  cfg = ModelConfig.from_config(config.model, tokenizer.vocab_size)
  params = nnx.state(Transformer(cfg, rngs=nnx.Rngs(params=1)), nnx.Param)
  tx = state_lib.make_optimizer(config.opt, config.num_train_steps)
  ckpt = Checkpointer(workdir, 3)
  ckpt.save(7, state_lib.TrainState(jnp.array(7, jnp.int32), params, tx.init(params)),
            [{'epoch': 1, 'cursor': 5}])
  ckpt.close()
  return workdir, cfg, params


@pytest.mark.parametrize('k,scope', [(1, 'all'), (2, 'decoder')])
def test_pooling_tied_heads_keeps_logits(source, k, scope):
  _, cfg, params = source
  n, d, h = cfg.num_heads, cfg.d_model, cfg.head_dim
  pooled = convert.pool_kv(params, n, k, scope)
  # General weights: each kv head is its group's mean; the rest is copied.
  dec_k = params['decoder'][0]['self_attn']['k'][...]
  enc_k = params['encoder'][1]['attn']['k'][...]
  group_mean = lambda x: x.reshape(d, k, n // k, h).mean(2)
  np.testing.assert_allclose(pooled['decoder'][0]['self_attn']['k'][...], group_mean(dec_k))
  np.testing.assert_allclose(pooled['encoder'][1]['attn']['k'][...],
                             group_mean(enc_k) if scope == 'all' else enc_k)
  for name in ('q', 'o'):
    np.testing.assert_array_equal(pooled['decoder'][1]['cross_attn'][name][...],
                                  params['decoder'][1]['cross_attn'][name][...])
  # Heads identical within each group: the pooled model computes the same function.
  tied = jax.tree.map(lambda p, q: jnp.repeat(q, p.shape[1] // q.shape[1], axis=1)
                      if p.shape != q.shape else p, params, pooled)
  converted = convert.pool_kv(tied, n, k, scope)
  abstract = lambda **kw: nnx.eval_shape(
      lambda: Transformer(dataclasses.replace(cfg, kv_heads_scope=scope, **kw),
                          rngs=nnx.Rngs(0)))
  mha, mqa = abstract(), abstract(num_kv_heads=k)
  shapes = lambda tree: [x.shape for x in jax.tree.leaves(tree)]
  assert shapes(converted) == shapes(nnx.state(mqa, nnx.Param))
  rng = np.random.default_rng(0)
  src, tgt = (jnp.asarray(rng.integers(3, 64, (3, t)), jnp.int32) for t in (7, 9))
  src, tgt = src.at[1, 5:].set(0), tgt.at[1, 6:].set(0)
  np.testing.assert_allclose(
      jax.jit(nnx.merge(nnx.graphdef(mqa), converted))(src, tgt),
      jax.jit(nnx.merge(nnx.graphdef(mha), tied))(src, tgt), atol=1e-6, rtol=1e-6)


def test_converted_workdir_fine_tunes(source, tmp_path):
  source, _, source_params = source
  dst = str(tmp_path / 'mha2mqa')
  assert convert.convert(source, dst, 1) == dst
  run = runs.restore(dst)
  assert (run.step, run.config.variant, run.config.model.num_kv_heads) == (
      0, 'mha_uptrain_kv1', 1)
  assert run.config.model.d_ff == demo.get_config('mha,tiny').model.d_ff
  assert os.path.exists(f'{dst}/spm.model') and os.listdir(f'{dst}/data')
  chex.assert_trees_all_close(run.params, convert.pool_kv(source_params, 4, 1, 'all'))
  ckpt = Checkpointer(dst, 3)
  position = ckpt.manager.restore(0, args=ocp.args.Composite(data=ocp.args.JsonRestore()))
  ckpt.close()
  assert position['data'] == [{'epoch': 0, 'cursor': 0}]
  # The module docstring's command: `:mha` with K, variant and steps overridden
  # (eval_every only saves test time; it is not part of the architecture check).
  config = demo.get_config('mha,tiny')
  config.model.num_kv_heads, config.variant = 1, 'mha_uptrain_kv1'
  config.num_train_steps, config.eval_every = 2, 0
  state = train_lib.train_and_evaluate(config, dst)
  assert int(state.step) == 2 and Checkpointer(dst, 3).latest_step() == 2
  moved = max(float(jnp.abs(a - b).max())
              for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(run.params)))
  assert 0 < moved < 0.01, 'fine-tuning did not start from the converted weights'


def test_errors_are_one_line_and_write_nothing(source, tmp_path):
  source, _, _ = source
  busy = tmp_path / 'busy'
  busy.mkdir()
  (busy / 'keep.txt').write_text('mine')
  untrained = tmp_path / 'untrained'
  untrained.mkdir()
  (untrained / 'config.json').write_text(open(f'{source}/config.json').read())
  cases = [
      (source, busy, 1, FileExistsError, 'is not empty'),
      (source, tmp_path / 'a', 3, ValueError, 'num_heads=4 .* num_kv_heads=3'),
      (source, tmp_path / 'b', 4, ValueError, 'nothing to pool'),
      (untrained, tmp_path / 'c', 1, FileNotFoundError, 'no checkpoint'),
  ]
  for src, dst, k, error, match in cases:
    with pytest.raises(error, match=match) as e:
      convert.convert(str(src), str(dst), k)
    assert '\n' not in str(e.value)
  assert os.listdir(busy) == ['keep.txt']
  assert sorted(os.listdir(tmp_path)) == ['busy', 'untrained']
  assert os.listdir(untrained) == ['config.json']
