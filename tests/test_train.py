"""Training tests: exact resume, SIGTERM, NaN guard, data parallelism, learning."""

import functools
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from configs import demo
from conftest import cudnn_on_cpu
from mqa_flax import state as state_lib
from mqa_flax import steps
from mqa_flax import train_lib
from mqa_flax.checkpoint import Checkpointer
from mqa_flax.config import ModelConfig, set_values
from mqa_flax.errors import UserError
from mqa_flax.metrics import read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
  c = demo.get_config('mqa,tiny')
  c.unlock()
  return set_values(c, overrides)


def losses(workdir):
  return {r['step']: r['train/loss'] for r in read_jsonl(f'{workdir}/metrics.jsonl')
          if 'train/loss' in r}


def test_resume_is_exact(tmp_path):
  # rsqrt: the learning rate does not depend on num_train_steps, which differs
  # between the two legs of run b.
  kw = {'num_train_steps': 8, 'log_every': 2, 'eval_every': 4, 'checkpoint_every': 2,
        'model.dropout_rate': 0.1, 'opt.schedule': 'rsqrt'}
  straight = train_lib.train_and_evaluate(tiny_config(**kw), str(tmp_path / 'a'))
  train_lib.train_and_evaluate(tiny_config(**(kw | {'num_train_steps': 4})),
                               str(tmp_path / 'b'))
  resumed = train_lib.train_and_evaluate(tiny_config(**kw), str(tmp_path / 'b'))
  assert int(resumed.step) == 8
  jax.tree.map(np.testing.assert_array_equal, straight.params, resumed.params)
  assert losses(tmp_path / 'a') == losses(tmp_path / 'b')
  assert Checkpointer(str(tmp_path / 'b'), 3).latest_step() == 8
  launches = read_jsonl(tmp_path / 'b' / 'launches.jsonl')  # What trained run b.
  assert [r['start_step'] for r in launches] == [0, 4]
  assert all(r['device'] == jax.devices()[0].device_kind and r['date']
             and r['devices'] == jax.device_count() for r in launches)


def test_other_architecture_in_workdir_is_refused(tmp_path):
  train_lib.train_and_evaluate(tiny_config(num_train_steps=2), str(tmp_path))
  before = (tmp_path / 'config.json').read_text()
  with pytest.raises(ValueError, match='model.num_kv_heads: 1 != 4'):
    train_lib.train_and_evaluate(
        tiny_config(num_train_steps=4, **{'model.num_kv_heads': 4}), str(tmp_path))
  assert (tmp_path / 'config.json').read_text() == before
  assert Checkpointer(str(tmp_path), 3).latest_step() == 2


def test_nan_stops_training_and_keeps_last_good_checkpoint(tmp_path):
  good = tiny_config(num_train_steps=2, checkpoint_every=1)
  train_lib.train_and_evaluate(good, str(tmp_path))
  bad = tiny_config(num_train_steps=6, checkpoint_every=1,
                    **{'opt.learning_rate': float('nan')})
  with pytest.raises(FloatingPointError, match='at step [34]'):
    train_lib.train_and_evaluate(bad, str(tmp_path))
  assert Checkpointer(str(tmp_path), 3).latest_step() == 2


def test_data_parallel_step_equals_single_device():
  config = tiny_config()
  cfg = ModelConfig.from_config(config.model, 64)
  tx = state_lib.make_optimizer(config.opt, 10)
  rng = np.random.default_rng(0)
  batch = {'inputs': rng.integers(1, 64, (8, 16)), 'targets': rng.integers(1, 64, (8, 12))}
  batch = jax.tree.map(lambda x: jnp.asarray(x, jnp.int32), batch)
  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = Mesh(np.array(devices), ('data',))
    graphdef, state = state_lib.create_state(cfg, tx, 0, mesh)
    step = jax.jit(functools.partial(
        steps.train_step, graphdef=graphdef, tx=tx, label_smoothing=0.1))
    sharded = jax.device_put(batch, NamedSharding(mesh, P('data')))
    state, metrics = step(state, sharded, jax.random.key(0))
    assert len(state.params['embed'].get_value().sharding.device_set) == len(devices)
    results.append((state.params, metrics))
  (p1, m1), (p8, m8) = results
  np.testing.assert_allclose(m1['loss_sum'], m8['loss_sum'], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), p1, p8)


def test_demo_config_learns_within_a_minute(tmp_path):
  config = demo.get_config('mqa')
  config.num_train_steps, config.log_every, config.eval_every = 60, 10, 60
  config.checkpoint_every = 60
  start = time.time()
  train_lib.train_and_evaluate(config, str(tmp_path))
  assert time.time() - start < 120  # About 40 s alone on 2 cores; CI shares them.
  loss = losses(tmp_path)
  assert loss[60] < 1.0 and loss[60] < 0.3 * loss[10], loss


def _train_cmd(workdir, *flags):
  return [sys.executable, os.path.join(ROOT, 'train.py'),
          '--config=' + os.path.join(ROOT, 'configs/demo.py') + ':mqa,tiny',
          f'--workdir={workdir}', *flags]


def test_sigterm_saves_a_checkpoint_and_rerun_resumes(tmp_path):
  env = dict(os.environ, XLA_FLAGS='', PYTHONPATH=ROOT)
  proc = subprocess.Popen(
      _train_cmd(tmp_path, '--config.num_train_steps=100000',
                 '--config.checkpoint_every=100000', '--config.eval_every=100000'),
      env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 120
  while not (tmp_path / 'metrics.jsonl').exists():
    assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 3, out  # errors.EXIT_STOPPED: resumable, not finished.
  assert 'rerun the same command to resume' in out
  step = Checkpointer(str(tmp_path), 3).latest_step()
  assert step is not None and step >= 10
  out = subprocess.run(_train_cmd(tmp_path, f'--config.num_train_steps={step + 2}'),
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  assert f'resumed from step {step}' in out.stderr
  assert Checkpointer(str(tmp_path), 3).latest_step() == step + 2


def test_misspelt_config_key_is_an_error(tmp_path):
  out = subprocess.run(_train_cmd(tmp_path, '--config.model.num_kv_head=2'),
                       env=dict(os.environ, PYTHONPATH=ROOT), cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
  assert out.returncode != 0
  assert 'num_kv_head' in out.stderr
  assert not (tmp_path / 'config.json').exists()


def test_golden_metrics_after_one_step():
  """Update these numbers only if a change to the model or loss is intended."""
  config = tiny_config()
  cfg = ModelConfig.from_config(config.model, 64)
  tx = state_lib.make_optimizer(config.opt, 10)
  mesh = Mesh(np.array(jax.devices()[:1]), ('data',))
  graphdef, state = state_lib.create_state(cfg, tx, 0, mesh)
  rng = np.random.default_rng(0)
  batch = {'inputs': jnp.asarray(rng.integers(1, 64, (4, 16)), jnp.int32),
           'targets': jnp.asarray(rng.integers(1, 64, (4, 12)), jnp.int32)}
  step = jax.jit(functools.partial(steps.train_step, graphdef=graphdef, tx=tx,
                                   label_smoothing=0.1))
  losses_, norms = [], []
  for _ in range(3):
    state, m = step(state, batch, jax.random.key(0))
    losses_.append(float(m['loss_sum'] / m['tokens']))
    norms.append(float(m['grad_norm']))
  np.testing.assert_allclose(losses_, GOLDEN_LOSSES, rtol=1e-4)
  np.testing.assert_allclose(norms, GOLDEN_GRAD_NORMS, rtol=1e-3)
  assert losses_[2] < losses_[0]  # The loss falls on a repeated batch.


GOLDEN_LOSSES = [4.8016009, 4.7215676, 4.5725350]
GOLDEN_GRAD_NORMS = [1.4632684, 1.4254425, 1.3141067]


def test_training_length_from_epochs_and_warmup_fraction():
  c = tiny_config(num_epochs=2.5, **{'opt.warmup_fraction': 0.1})
  assert train_lib.training_length(c, 63) == (158, 16)  # ceil(2.5 * 63), 10%.
  c = tiny_config(num_train_steps=50, **{'opt.warmup_steps': 7})
  assert train_lib.training_length(c, 63) == (50, 7)  # Epochs and fraction off.
  for bad in ({'num_train_steps': 0}, {'num_train_steps': -5}, {'num_epochs': -1.0}):
    with pytest.raises(ValueError, match='num_'):
      train_lib.training_length(tiny_config(**bad), 63)


def test_multi30k_recipe_is_stated_in_epochs():
  from configs import multi30k  # pylint: disable=import-outside-toplevel
  c = multi30k.get_config('mqa')
  assert c.num_epochs == 40 and c.opt.warmup_fraction == 0.1
  assert c.model.dtype == 'bfloat16' and c.keep_checkpoints == 1
  assert train_lib.training_length(c, 63) == (2520, 252)


def test_epochs_set_the_steps_and_best_dev_parameters_are_decoded(tmp_path):
  from mqa_flax import runs  # pylint: disable=import-outside-toplevel
  config = tiny_config(num_epochs=3.0, eval_every=8, checkpoint_every=1000,
                       **{'opt.warmup_fraction': 0.25})
  train_lib.train_and_evaluate(config, str(tmp_path))
  saved = json.load(open(tmp_path / 'config.json'))
  records = read_jsonl(f'{tmp_path}/metrics.jsonl')
  steps = max(r['step'] for r in records)
  assert saved['num_train_steps'] == steps > 3  # 400 pairs / 8 rows: several steps.
  assert saved['opt']['warmup_steps'] == round(0.25 * steps)
  dev = {r['step']: r['eval/ln_ppl'] for r in records if 'eval/ln_ppl' in r}
  best_step = min(dev, key=dev.get)
  best = json.load(open(tmp_path / 'best' / 'best.json'))
  assert best.pop('fingerprint')  # Checked on restore (tests/test_robustness.py).
  assert (best['step'], best['dev_ln_ppl']) == (best_step, pytest.approx(dev[best_step]))
  run = runs.restore(str(tmp_path))
  assert (run.checkpoint, run.step) == ('best', best_step)
  latest = runs.restore(str(tmp_path), step=steps)
  assert latest.checkpoint == 'latest'
  entry = runs.score_split(run, 'dev', beam_size=1)
  assert entry['checkpoint'] == 'best' and entry['checkpoint_step'] == best_step
  if best_step != steps:  # Different parameters, as restored.
    assert not all(jax.tree.leaves(jax.tree.map(
        lambda a, b: bool((a == b).all()), run.params, latest.params)))


@pytest.mark.parametrize('masks', [True, False], ids=['kernel', 'kernel_without_masks'])
def test_cudnn_training_first_checks_its_gradients_against_xla(monkeypatch, tmp_path,
                                                             masks):
  # cuDNN's attention is jax's XLA version of the same call here: with the
  # packed batches' masks it trains, and launches.jsonl keeps the check; a
  # kernel that drops them is refused before the first step.
  cudnn_on_cpu(monkeypatch, masks=masks)

  def train(steps):
    train_lib.train_and_evaluate(tiny_config(
        num_train_steps=steps, seq_attention_impl='cudnn', checkpoint_every=2,
        **{'model.dtype': 'bfloat16', 'model.head_dim': 8}), str(tmp_path))

  if not masks:
    with pytest.raises(UserError, match=r"^seq_attention_impl='cudnn' and 'xla' "
                       r'disagree .* train with --config.seq_attention_impl=xla$'):
      train(2)
    assert Checkpointer(str(tmp_path), 3).latest_step() is None
    return
  train(2)
  train(4)  # Resumed: checked again, from the parameters the run started from.
  first, resumed = [r['seq_attention_check'] for r in read_jsonl(tmp_path / 'launches.jsonl')]
  assert first == resumed
  assert first['impl'] == 'cudnn'
  assert 0 <= first['median_gradient_gap'] <= first['largest_gradient_gap'] < 0.2
  assert first['loss'] == pytest.approx(first['xla_loss'], rel=1e-3)
