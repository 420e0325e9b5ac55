"""Checkpoint unit tests on small pytrees: checksums, round trips, best params, locks.

Damaged and truncated files are tested end to end in test_robustness.py.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mqa_flax import checkpoint as ckpt_lib
from mqa_flax.errors import UserError


def _state(seed=0, step=0):
  """A train-state-like tree: params, an optimizer moment and a step."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  return {'params': {'w': normal(3, 4), 'b': normal(4)},
          'opt': {'mu': normal(3, 4)}, 'step': jnp.asarray(step, jnp.int32)}


def _abstract(tree):
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def _with(tree, path, fn):
  """A copy of `tree` with the array at `path` (e.g. 'params/w') replaced by fn(it)."""
  out = jax.tree.map(lambda x: x, tree)
  *parents, leaf = path.split('/')
  node = out
  for key in parents:
    node = node[key]
  node[leaf] = jnp.asarray(fn(np.asarray(node[leaf])), node[leaf].dtype)
  return out


def _assert_trees_equal(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(g, w)


def test_fingerprint_changes_with_one_element_only_for_that_array():
  state = _state()
  fp = ckpt_lib.fingerprint(state)
  assert set(fp) == {'params/w', 'params/b', 'opt/mu', 'step'}
  assert ckpt_lib.fingerprint(_state()) == fp  # Equal trees, separately built.
  bump = lambda a: np.where(np.arange(12).reshape(3, 4) == 9, a + 1e-3, a)  # [2, 1].
  changed = ckpt_lib.fingerprint(_with(state, 'params/w', bump))
  assert {k for k in fp if fp[k] != changed[k]} == {'params/w'}


def test_verify_names_the_differing_array_and_refuses_nan_params():
  state = _state()
  fp = ckpt_lib.fingerprint(state)
  ckpt_lib.verify(state, fp, 'checkpoint step 3', 3)  # Intact: no error.
  bad = _with(state, 'opt/mu', lambda a: -a)
  with pytest.raises(ckpt_lib.CheckpointDamaged,
                     match=r'checkpoint step 3 is damaged: 1 of 4 arrays .*first: opt/mu'
                     ) as e:
    ckpt_lib.verify(bad, fp, 'checkpoint step 3', 3)
  assert e.value.step == 3
  nan = _with(state, 'params/b', lambda a: np.where(np.arange(4) == 1, np.nan, a))
  with pytest.raises(ckpt_lib.CheckpointDamaged, match=r'NaN or Inf \(first: params/b\)'):
    ckpt_lib.verify(nan, None, 'checkpoint step 3', 3)
  # Outside the params, a train checkpoint may hold non-finite values.
  ckpt_lib.verify(_with(state, 'opt/mu', lambda a: a * np.inf), None, 'checkpoint', 3)


def test_checkpointer_round_trip_latest_older_step_and_params_alone(tmp_path):
  workdir = str(tmp_path)
  old, new = _state(1, step=10), _state(2, step=20)
  ckpt = ckpt_lib.Checkpointer(workdir, keep=3)
  assert ckpt.restore_intact(_abstract(old)) is None  # Nothing saved yet.
  ckpt.save(10, old, [{'position': 7}])
  ckpt.save(20, new, [{'position': 9}, {'position': 11}])
  ckpt.close()
  ckpt = ckpt_lib.Checkpointer(workdir, keep=3)  # As on resume.
  assert ckpt.latest_step() == 20
  state, data = ckpt.restore(_abstract(new))
  _assert_trees_equal(state, new)
  assert data == [{'position': 9}, {'position': 11}]
  state, data = ckpt.restore(_abstract(old), step=10)
  _assert_trees_equal(state, old)
  assert data == [{'position': 7}]
  state, _ = ckpt.restore_intact(_abstract(new))
  _assert_trees_equal(state, new)
  ckpt.close()
  # A fresh Checkpointer, as runs.restore uses (orbax binds a manager's 'state'
  # item to the first restore's handler).
  ckpt = ckpt_lib.Checkpointer(workdir, keep=3)
  params = ckpt.restore_params(_abstract(new['params']))
  _assert_trees_equal(params, new['params'])  # Without opt or step.
  _assert_trees_equal(ckpt.restore_params(_abstract(old['params']), 10), old['params'])
  ckpt.close()


def test_best_params_keep_only_improvements_and_read_back_checked(tmp_path):
  workdir = str(tmp_path)
  params = {step: _state(step)['params'] for step in (10, 20, 30, 40)}
  best = ckpt_lib.BestParams(workdir)
  assert ckpt_lib.read_best(workdir) is None
  assert best.offer(10, 2.0, params[10])
  assert not best.offer(20, 2.5, params[20])  # Worse.
  assert not best.offer(30, float('nan'), params[30])
  assert best.offer(40, 1.5, params[40])
  best.close()
  record = ckpt_lib.read_best(workdir)
  assert (record['step'], record['dev_ln_ppl']) == (40, 1.5)
  assert record['fingerprint'] == ckpt_lib.fingerprint(params[40])
  restored = ckpt_lib.restore_params(workdir, _abstract(params[40]), record['step'],
                                     record['fingerprint'])
  _assert_trees_equal(restored, params[40])
  # After a resume the record still counts: 1.8 is not better than 1.5.
  again = ckpt_lib.BestParams(workdir)
  assert not again.offer(50, 1.8, params[10])
  assert again.manager.all_steps() == [40]
  again.close()


def test_held_workdir_lock_names_its_holder_until_released(tmp_path):
  workdir = str(tmp_path / 'w')
  with ckpt_lib.workdir_lock(workdir):
    with pytest.raises(UserError, match=rf'{workdir} is in use by pid {os.getpid()} on '):
      with ckpt_lib.workdir_lock(workdir):
        pass
  with ckpt_lib.workdir_lock(workdir):  # Released: free again.
    pass


def test_check_same_architecture_refuses_model_changes_only(tmp_path):
  workdir = str(tmp_path)
  config = {'model': {'num_heads': 4, 'num_kv_heads': 1}, 'seed': 0,
            'data': {'vocab_size': 64, 'eval_batch_size': 8}, 'num_train_steps': 40}
  ckpt_lib.check_same_architecture(workdir, config)  # No config.json yet.
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    json.dump(config, f)
  longer = dict(config, num_train_steps=80,
                data=dict(config['data'], eval_batch_size=2))
  ckpt_lib.check_same_architecture(workdir, longer)
  other = dict(config, model=dict(config['model'], num_kv_heads=2))
  with pytest.raises(UserError, match=r'model\.num_kv_heads: 1 != 2.*new --workdir'):
    ckpt_lib.check_same_architecture(workdir, other)
  with pytest.raises(UserError, match=r'data\.vocab_size: 64 != 32'):
    ckpt_lib.check_same_architecture(
        workdir, dict(config, data=dict(config['data'], vocab_size=32)))
