"""Nothing lost, nothing silent: damaged checkpoints, a busy workdir, bad input
text, user errors in one line with documented exit codes."""

import errno
import fcntl
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib

import pytest

from configs import demo
from mqa_flax import checkpoint as ckpt_lib
from mqa_flax import data
from mqa_flax import errors
from mqa_flax import metrics
from mqa_flax import runs
from mqa_flax import state as state_lib
from mqa_flax import tokenizer as tokenizer_lib
from mqa_flax import train_lib
from mqa_flax.config import ModelConfig, set_values

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS='', JAX_PLATFORMS='cpu')


def tiny_config(**overrides):
  c = demo.get_config('mha,tiny')
  c.unlock()
  return set_values(c, {'num_train_steps': 40, 'checkpoint_every': 20,
                                 **overrides})


def _train(workdir, *flags):
  return _run('train.py', '--config=' + os.path.join(ROOT, 'configs/demo.py:mha,tiny'),
              f'--workdir={workdir}', '--config.num_train_steps=40',
              '--config.checkpoint_every=20', *flags)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A tiny run with train checkpoints at steps 20 and 40 and best parameters.

  Trained once for all pytest-xdist workers (they share the parent of their
  base temp directories); tests only read it or copy it.
  """
  root = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):  # This session's directory.
    root = root.parent
  workdir = str(root / 'robustness-run')
  with open(root / 'robustness-run.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not os.path.exists(workdir + '.done'):
      shutil.rmtree(workdir, ignore_errors=True)
      out = _train(workdir)  # One device: compiles faster than the tests' eight.
      assert out.returncode == 0, out.stderr.decode()[-3000:]
      open(workdir + '.done', 'w').close()
  return workdir


def _copy(trained, tmp_path):
  out = str(tmp_path / 'run')
  shutil.copytree(trained, out)
  return out


def flip_bytes(directory, n=2000):
  """Inverts `n` bytes in the middle of every large data file under `directory`."""
  paths = [p for p in glob.glob(os.path.join(directory, '**', 'd', '*'), recursive=True)
           if os.path.getsize(p) >= 4 * n]
  assert paths
  for path in paths:
    size = os.path.getsize(path)
    with open(path, 'r+b') as f:
      f.seek(size // 2)
      chunk = f.read(n)
      f.seek(size // 2)
      f.write(bytes(b ^ 0xFF for b in chunk))


def truncate(directory):
  """Cuts every large data file under `directory` to half its length."""
  paths = [p for p in glob.glob(os.path.join(directory, '**', 'd', '*'), recursive=True)
           if os.path.getsize(p) >= 8000]
  assert paths
  for path in paths:
    os.truncate(path, os.path.getsize(path) // 2)


def _run(script, *flags, stdin=None, env=ENV):
  return subprocess.run([sys.executable, os.path.join(ROOT, script), *flags],
                        input=stdin, capture_output=True, timeout=120, cwd=ROOT, env=env)


def _one_error_line(out, *words):
  err = out.stderr.decode()
  lines = [line for line in err.splitlines() if line.startswith('error: ')]
  assert out.returncode == errors.EXIT_USER_ERROR, err[-3000:]
  assert len(lines) == 1 and 'Traceback' not in err, err[-3000:]
  for w in words:
    assert w in lines[0], lines[0]
  return lines[0]


# 1, 2: damaged checkpoints are detected; training falls back, decoding refuses.


@pytest.mark.parametrize('damage', [flip_bytes, truncate])
def test_damaged_train_checkpoint_is_refused_for_decoding(trained, tmp_path, damage):
  workdir = _copy(trained, tmp_path)
  damage(os.path.join(workdir, 'checkpoints', '40', 'state'))
  with pytest.raises(ckpt_lib.CheckpointDamaged, match=r'step 40 .*--step=STEP \(saved: 20, 40\)'):
    runs.restore(workdir, step=40)
  assert runs.restore(workdir, step=20).step == 20


def test_damaged_best_parameters_give_one_line_naming_the_step(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  flip_bytes(os.path.join(workdir, 'best'))
  out = _run('decode.py', f'--workdir={workdir}', '--mode=translate',
             stdin=b'I have three apples.\n')
  line = _one_error_line(out, 'best parameters (step 40)', '--step')
  assert len(out.stderr.decode().splitlines()) < 10, out.stderr.decode()
  assert out.stdout == b'', line


def test_checksum_mismatch_is_damage(trained, tmp_path):
  # Data that reads back without error but differs from what was saved.
  workdir = _copy(trained, tmp_path)
  path = os.path.join(workdir, 'best', 'best.json')
  record = json.load(open(path))
  key = sorted(record['fingerprint'])[0]
  record['fingerprint'][key] = '00000000'
  json.dump(record, open(path, 'w'))
  with pytest.raises(ckpt_lib.CheckpointDamaged, match=f'differ from the checksums.*{key}'):
    runs.restore(workdir)


def test_training_falls_back_to_the_newest_intact_checkpoint(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  flip_bytes(os.path.join(workdir, 'checkpoints', '40', 'state'))
  out = _train(workdir, '--config.num_train_steps=60')
  err = out.stderr.decode()
  assert out.returncode == 0, err[-3000:]
  assert 'checkpoint step 40' in err and 'falling back' in err
  assert 'resumed from step 20' in err and 'Traceback' not in err
  assert os.path.isdir(os.path.join(workdir, 'checkpoints_damaged', '40'))
  assert ckpt_lib.Checkpointer(workdir, 3).manager.all_steps() == [20, 40, 60]


def test_truncated_checkpoints_are_set_aside_until_none_is_left(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  cfg = ModelConfig.from_config(tiny_config().model, 64)
  tx = state_lib.make_optimizer(tiny_config().opt, 40)
  _, abstract = state_lib.abstract_state(cfg, tx)
  truncate(os.path.join(workdir, 'checkpoints', '40', 'state'))
  ckpt = ckpt_lib.Checkpointer(workdir, 3)
  state, _ = ckpt.restore_intact(abstract)
  assert int(state.step) == 20 and ckpt.manager.all_steps() == [20]
  truncate(os.path.join(workdir, 'checkpoints', '20', 'state'))
  with pytest.raises(errors.UserError, match='every checkpoint .* is damaged'):
    ckpt.restore_intact(abstract)
  assert ckpt.restore_intact(abstract) is None  # Next: train from step 0.
  ckpt.close()


# 8, 6: user errors are one line with exit code 2; programming errors keep tracebacks.


@pytest.mark.parametrize('flag,words', [
    ('--config.model.num_kv_heads=3', ['num_kv_heads=3']),
    ('--config.num_train_steps=0', ['0 steps']),
    ('--config.model.num_kv_head=2', ["'num_kv_head'", 'num_kv_heads']),
    ('--config.seq_attention_impl=cudnn', ['bfloat16', "seq_attention_impl='xla'"]),
    ('--config.seq_attention_impl=cudnn --config.model.dtype=bfloat16 '
     '--config.model.head_dim=8', ['needs a CUDA GPU', '--config.seq_attention_impl=xla']),
])
def test_train_user_errors_are_one_line(tmp_path, flag, words):
  out = _run('train.py', '--config=' + os.path.join(ROOT, 'configs/demo.py:mha,tiny'),
             f'--workdir={tmp_path}/w', *flag.split())
  line = _one_error_line(out, *words)
  assert '\\n' not in line and "\\'" not in line


def test_debug_variable_shows_the_traceback(tmp_path):
  out = _run('train.py', '--config=' + os.path.join(ROOT, 'configs/demo.py:mha,tiny'),
             f'--workdir={tmp_path}/w', '--config.num_train_steps=-5',
             env=dict(ENV, MQA_FLAX_DEBUG='1'))
  assert out.returncode == 1 and b'Traceback' in out.stderr


def test_guard_keeps_programming_errors(monkeypatch):
  def main(argv):
    del argv
    raise KeyError('a bug')
  with pytest.raises(KeyError):
    errors.guard(main)([])
  with pytest.raises(SystemExit) as e:
    errors.guard(lambda argv: (_ for _ in ()).throw(errors.UserError('bad')))([])
  assert e.value.code == errors.EXIT_USER_ERROR


# 3, 5: input lines split at '\n' only, as in training; non-UTF-8 named or replaced.


def test_split_lines_like_training(tmp_path):
  raw = b'I have three apples.\r\nI have four\rpears.\n'
  assert data.split_lines(raw, 'x') == ['I have three apples.', 'I have four\rpears.']
  (tmp_path / 'a.en').write_bytes(raw)
  assert data._read_lines(str(tmp_path / 'a.en')) == data.split_lines(raw, 'x')
  with pytest.raises(errors.UserError, match=r'^in line 2 is not UTF-8 \(byte 0xff'):
    data.split_lines(b'ok\nbad \xff\n', 'in')
  assert data.split_lines(b'ok\nbad \xff\n', 'in', 'replace') == ['ok', 'bad \ufffd']


def test_translate_keeps_line_count_and_names_bad_bytes(trained):
  text = b'I have three apples.\r\nI have four\rpears.\n\xff\xfe seven\n\nlast'
  out = _run('decode.py', f'--workdir={trained}', '--mode=translate',
             '--invalid_utf8=replace', stdin=text)
  assert out.returncode == 0, out.stderr.decode()[-2000:]
  assert out.stdout.count(b'\n') == 5 and b'\r' not in out.stdout
  assert b'1 of 5 lines were not UTF-8' in out.stderr
  out = _run('decode.py', f'--workdir={trained}', '--mode=translate', stdin=text)
  _one_error_line(out, 'stdin line 3 is not UTF-8', '--invalid_utf8=replace')


def test_missing_input_file_fails_before_restoring(tmp_path):
  out = _run('decode.py', f'--workdir={tmp_path}/none', '--mode=translate',
             f'--input={tmp_path}/missing.en')
  _one_error_line(out, 'missing.en', 'No such file')


# 4: one training per workdir.


def test_busy_workdir_is_refused_and_stale_lock_is_not(tmp_path):
  workdir = str(tmp_path / 'w')
  with ckpt_lib.workdir_lock(workdir):
    with pytest.raises(errors.UserError, match=rf'in use by pid {os.getpid()} on '):
      train_lib.train_and_evaluate(tiny_config(), workdir)
    with ckpt_lib.workdir_lock(workdir, enabled=False):  # Processes other than 0.
      pass
  # A lock file left by a killed process holds no lock.
  with open(os.path.join(workdir, 'train.lock'), 'w') as f:
    f.write('pid 999999 on gone (training since 2026-01-01T00:00:00)\n')
  with ckpt_lib.workdir_lock(workdir):
    pass


# 10: smaller losses.


def test_scores_survive_an_unwritable_workdir(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  shutil.rmtree(os.path.join(workdir, 'hyps'), ignore_errors=True)
  open(os.path.join(workdir, 'hyps'), 'w').close()  # Unwritable, even for root.
  run = runs.restore(workdir)
  entry = runs.score_split(run, 'test', 1)
  assert entry['bleu_13a'] >= 0 and 'hyps' in entry['not_written']
  assert not os.path.exists(os.path.join(workdir, 'bleu.json'))


def test_nan_before_any_checkpoint_says_so(tmp_path):
  # The NaN error's last sentence (it said "(step None)").
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), 3)
  assert train_lib._last_good(ckpt).startswith('No checkpoint was saved yet')
  ckpt.close()


def test_partial_metrics_line_is_cut_on_resume(tmp_path):
  path = tmp_path / metrics.METRICS_FILE
  path.write_text('{"step": 1, "train/loss": 2.0}\n{"step": 2, "train/lo')
  w = metrics.MetricWriter(str(tmp_path))
  w.write_scalars(3, {'train/loss': 1.0})
  w.close()
  assert [r['step'] for r in metrics.read_jsonl(str(path))] == [1, 3]
  assert path.read_text().count('\n') == 2


# 7: empty training files are named.


def test_empty_training_files_are_named(tmp_path):
  (tmp_path / 'a.en').write_text('')
  (tmp_path / 'a.de').write_text('')
  cfg = tiny_config(**{'data.source': 'text', 'data.data_dir': str(tmp_path)}).data
  with pytest.raises(errors.UserError, match=r'a\.en, .*a\.de are empty'):
    data.read_split(cfg, 'a')


# 11, 12: dependencies.


def _pyproject():
  with open(os.path.join(ROOT, 'pyproject.toml'), 'rb') as f:
    return tomllib.load(f)['project']


def test_quick_start_installs_the_tensorboard_viewer():
  assert any(d.startswith('tensorboard>') for d in _pyproject()['dependencies'])


def test_wmt_extra_installs_what_tfds_needs_offline():
  assert any(d.startswith('importlib_resources') for d in
             _pyproject()['optional-dependencies']['wmt'])
  tfds = pytest.importorskip('tensorflow_datasets')
  builder = tfds.builder('wmt14_translate/de-en')  # As far as the network would go.
  assert builder.info.splits is not None or builder.info.name
  urls = getattr(builder, 'url_infos', None) or {}
  assert all(u.startswith('http') for u in urls)


def test_stopped_translation_keeps_the_finished_lines(trained, tmp_path, monkeypatch):
  from absl import flags  # pylint: disable=g-import-not-at-top
  import decode  # pylint: disable=g-import-not-at-top
  src, out = tmp_path / 'in.en', tmp_path / 'out.de'
  src.write_text('I have three apples.\nWe need two books.\nThe number is seven.\n')
  flags.FLAGS(['decode', f'--workdir={trained}', '--mode=translate', f'--input={src}',
               f'--output={out}', '--beam_size=1'])
  calls = []

  def translate_then_stop(run, lines, *args, **kwargs):
    calls.append(lines)
    if len(calls) > 1:
      raise KeyboardInterrupt  # Ctrl-C (SIGTERM raises errors.Stopped the same way).
    return [f'out {i}' for i in range(len(lines))]

  out.write_text('an earlier translation\n')
  monkeypatch.setattr(runs, 'TRANSLATE_BLOCK', 2)
  monkeypatch.setattr(runs.Run, 'translate', translate_then_stop)
  try:
    with pytest.raises(errors.Stopped, match=r'after translating 2 of 3 lines; .*'
                       r'out\.de\.partial \(.*out\.de was not changed\) holds those 2'):
      decode.translate_mode(trained)
  finally:
    flags.FLAGS.unparse_flags()
  assert (tmp_path / 'out.de.partial').read_text() == 'out 0\nout 1\n'
  assert out.read_text() == 'an earlier translation\n'


# Decoding loses nothing: its output, bleu.json, and the files of a run
# (spm.model, config.json, checkpoints) are checked against each other.


def _translate_mode(workdir, *extra):
  from absl import flags  # pylint: disable=g-import-not-at-top
  import decode  # pylint: disable=g-import-not-at-top
  flags.FLAGS(['decode', f'--workdir={workdir}', '--mode=translate', '--beam_size=1',
               *extra])
  try:
    decode.translate_mode(workdir)
  finally:
    flags.FLAGS.unparse_flags()


def test_translate_refuses_its_input_as_output(trained, tmp_path):
  src = tmp_path / 'in.en'
  text = b'I have three apples.\nWe need two books.\n'
  src.write_bytes(text)
  os.link(src, tmp_path / 'link.en')  # The same file under another name.
  out = _run('decode.py', f'--workdir={trained}', '--mode=translate',
             f'--input={src}', f'--output={tmp_path}/link.en')
  _one_error_line(out, 'is the input file', 'another --output')
  with open(src, 'rb') as stdin:  # decode.py --output=F < F
    out = subprocess.run([sys.executable, os.path.join(ROOT, 'decode.py'),
                          f'--workdir={trained}', '--mode=translate', f'--output={src}'],
                         stdin=stdin, capture_output=True, timeout=120, cwd=ROOT, env=ENV)
  _one_error_line(out, 'is the input file')
  assert src.read_bytes() == text


def test_a_bad_workdir_leaves_the_output_untouched(tmp_path):
  src, dst = tmp_path / 'in.en', tmp_path / 'out.de'
  src.write_text('I have three apples.\n')
  dst.write_text('an earlier translation\n')
  with pytest.raises(FileNotFoundError, match='holds no config.json'):
    _translate_mode(str(tmp_path / 'mistyped'), f'--input={src}', f'--output={dst}')
  assert dst.read_text() == 'an earlier translation\n'
  assert sorted(os.listdir(tmp_path)) == ['in.en', 'out.de']


def test_a_full_disk_while_translating_leaves_the_output(trained, tmp_path, monkeypatch):
  src, dst = tmp_path / 'in.en', tmp_path / 'out.de'
  src.write_text('I have three apples.\nWe need two books.\nThe number is seven.\n')
  dst.write_text('an earlier translation\n')
  calls = []

  def translate_then_fail(run, lines, *args, **kwargs):
    calls.append(lines)
    if len(calls) > 1:
      raise OSError(errno.ENOSPC, 'No space left on device', str(dst))
    return [f'out {i}' for i in range(len(lines))]

  monkeypatch.setattr(runs, 'TRANSLATE_BLOCK', 2)
  monkeypatch.setattr(runs.Run, 'translate', translate_then_fail)
  with pytest.raises(OSError, match='No space left'):
    _translate_mode(trained, f'--input={src}', f'--output={dst}')
  assert dst.read_text() == 'an earlier translation\n'
  assert sorted(os.listdir(tmp_path)) == ['in.en', 'out.de']


def _bleu_json(workdir):
  return json.load(open(os.path.join(workdir, 'bleu.json')))


def test_a_full_disk_never_damages_bleu_json(trained, tmp_path, monkeypatch):
  workdir = _copy(trained, tmp_path)
  run = runs.restore(workdir)
  runs.score_split(run, 'test', 1, name='earlier')
  dump = json.dump

  def dump_then_fail(obj, f, *args, **kwargs):  # Half written, then a full disk.
    f.write(json.dumps(obj)[:50])
    raise OSError(errno.ENOSPC, 'No space left on device')

  monkeypatch.setattr(json, 'dump', dump_then_fail)
  lines = []
  with pytest.raises(errors.UserError, match='printed but not recorded .*No space left'):
    runs.score_splits(run, [(None, 'test')], [1], report=lines.append)
  monkeypatch.setattr(json, 'dump', dump)
  assert lines and lines[0].startswith('test greedy: BLEU')  # Printed all the same.
  assert list(_bleu_json(workdir)) == ['earlier/greedy']
  assert not [f for f in os.listdir(workdir) if '.tmp' in f]


def test_concurrent_scorers_keep_both_entries(trained, tmp_path, monkeypatch):
  workdir = _copy(trained, tmp_path)
  run = runs.restore(workdir)
  dump, first = json.dump, []

  def slow_dump(obj, f, *args, **kwargs):  # The first writer is slow.
    if not first:
      first.append(1)
      time.sleep(0.5)
    return dump(obj, f, *args, **kwargs)

  monkeypatch.setattr(json, 'dump', slow_dump)
  entry = {'bleu_13a': 1.0}
  results = []
  threads = [threading.Thread(target=lambda n=n: results.append(
      runs._record_score(run, n, 'greedy', ['x'], entry))) for n in ('a', 'b')]
  for t in threads:
    t.start()
    time.sleep(0.1)
  for t in threads:
    t.join()
  assert len(results) == 2  # Neither thread failed.
  assert sorted(_bleu_json(workdir)) == ['a/greedy', 'b/greedy']


def test_invalid_bleu_json_is_refused_before_decoding(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  path = os.path.join(workdir, 'bleu.json')
  with open(path, 'w') as f:
    f.write('{"test/greedy": {"bleu_13a": 1')  # Cut short.
  out = _run('decode.py', f'--workdir={workdir}', '--mode=bleu', '--split=test',
             '--beam_size=1')
  _one_error_line(out, 'bleu.json is not valid JSON', 'move it aside')
  assert open(path).read() == '{"test/greedy": {"bleu_13a": 1'


def _other_vocabulary(workdir, size):
  """Replaces the run's spm.model with one trained on other text, of `size` pieces."""
  src, tgt = data.read_split(tiny_config().data, 'train')
  path = os.path.join(workdir, 'spm.model')
  old = tokenizer_lib.Tokenizer(path).fingerprint
  new = tokenizer_lib.train_tokenizer(tgt[::3] + src[:40], size, path, 10_000)
  assert new.fingerprint != old and new.vocab_size == size


def test_decoding_refuses_a_swapped_vocabulary(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  _other_vocabulary(workdir, 64)  # The same size: the arrays would fit.
  for step in (None, 20):
    with pytest.raises(errors.UserError, match=r'spm\.model is not the vocabulary '
                       r'.*trained with .*put back'):
      runs.restore(workdir, step=step)


@pytest.mark.parametrize('size', [64, 80])
def test_resuming_refuses_a_swapped_vocabulary_and_moves_nothing(trained, tmp_path, size):
  workdir = _copy(trained, tmp_path)
  _other_vocabulary(workdir, size)
  out = _train(workdir, '--config.num_train_steps=60')
  _one_error_line(out, 'spm.model is not the vocabulary', 'step 40')
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['20', '40']
  assert not os.path.exists(os.path.join(workdir, 'checkpoints_damaged'))


def _forget_records(workdir):
  """Makes the run look saved by older code: no vocabulary or architecture records."""
  for step in ('20', '40'):
    shutil.rmtree(os.path.join(workdir, 'checkpoints', step, 'run'))
  path = os.path.join(workdir, 'best', 'best.json')
  record = json.load(open(path))
  del record['run']
  json.dump(record, open(path, 'w'))


@pytest.mark.parametrize('records', [True, False])
def test_another_architecture_without_config_json_is_not_damage(trained, tmp_path, records):
  workdir = _copy(trained, tmp_path)
  os.remove(os.path.join(workdir, 'config.json'))
  if not records:
    _forget_records(workdir)
  out = _train(workdir, '--config.num_train_steps=60', '--config.model.d_ff=48')
  line = _one_error_line(out, 'step 40', 'new --workdir')
  assert ('d_ff' in line) if records else ('other shapes' in line), line
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['20', '40']
  assert not os.path.exists(os.path.join(workdir, 'checkpoints_damaged'))


def test_old_checkpoints_without_records_still_decode(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  _forget_records(workdir)
  assert runs.restore(workdir).step == 40 and runs.restore(workdir, 20).step == 20


def test_a_run_trained_with_cudnn_attention_decodes_without_a_gpu(trained, tmp_path):
  # How, not what: config.json's seq_attention_impl is not the architecture,
  # and a backend without cuDNN's attention decodes with the einsums.
  workdir = _copy(trained, tmp_path)
  path = os.path.join(workdir, 'config.json')
  config = json.load(open(path))
  config['seq_attention_impl'] = 'cudnn'
  json.dump(config, open(path, 'w'))
  out = _run('decode.py', f'--workdir={workdir}', '--mode=translate', stdin=b'three\n')
  assert out.returncode == 0, out.stderr.decode()[-2000:]
  assert out.stdout.count(b'\n') == 1


def test_decoding_refuses_an_edited_config_json(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  path = os.path.join(workdir, 'config.json')
  config = json.load(open(path))
  config['model']['local_window'] = 2  # Same shapes, other translations.
  json.dump(config, open(path, 'w'))
  for step in (None, 20):
    with pytest.raises(errors.UserError, match=r'config\.json gives another '
                       r'architecture .*model\.local_window: 0 at training, now 2'):
      runs.restore(workdir, step=step)


@pytest.mark.parametrize('script', ['decode.py', 'train.py'])
def test_truncated_config_json_is_one_line(trained, tmp_path, script):
  workdir = _copy(trained, tmp_path)
  path = os.path.join(workdir, 'config.json')
  os.truncate(path, os.path.getsize(path) // 2)
  if script == 'decode.py':
    out = _run('decode.py', f'--workdir={workdir}', '--mode=translate', stdin=b'x\n')
  else:
    out = _train(workdir)
  _one_error_line(out, 'config.json is not valid JSON', 'restore it')


def test_truncated_vocabulary_is_one_line(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  path = os.path.join(workdir, 'spm.model')
  os.truncate(path, os.path.getsize(path) // 3)
  out = _run('decode.py', f'--workdir={workdir}', '--mode=translate', stdin=b'x\n')
  _one_error_line(out, 'spm.model', 'not a readable sentencepiece model')


def test_damaged_cached_split_is_tokenized_again(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  cfg = tiny_config().data
  tok = tokenizer_lib.Tokenizer(os.path.join(workdir, 'spm.model'))
  path = os.path.join(workdir, 'data', 'dev.npz')
  good = data.tokenize_split(cfg, cfg.dev_split, tok, workdir)
  os.truncate(path, os.path.getsize(path) // 2)
  again = data.tokenize_split(cfg, cfg.dev_split, tok, workdir)
  assert (again.src_tokens == good.src_tokens).all() and len(again) == len(good)
  assert data.tokenize_split(cfg, cfg.dev_split, tok, workdir).num_truncated == 0


@pytest.mark.parametrize('flag', ['--batch_size=-3', '--beam_size=0', '--step=-1',
                                  '--alpha=nan', '--bench_reps=0',
                                  '--bench_gemm_impls=triton'])
def test_out_of_range_decode_flags_are_one_line(trained, flag):
  out = _run('decode.py', f'--workdir={trained}', '--mode=bleu', flag)
  _one_error_line(out, flag.split('=')[0])
  assert not os.path.exists(os.path.join(trained, 'bleu.json'))


@pytest.mark.parametrize('flag,words', [
    ('--config.data.batch_size=-3', ['data.batch_size=-3', '>= 1']),
    ('--config.decode.beam_size=0', ['decode.beam_size=0']),
    ('--config.checkpoint_every=-1', ['checkpoint_every=-1']),
])
def test_out_of_range_train_values_are_one_line(tmp_path, flag, words):
  out = _run('train.py', '--config=' + os.path.join(ROOT, 'configs/demo.py:mha,tiny'),
             f'--workdir={tmp_path}/w', flag)
  _one_error_line(out, *words)


def test_a_full_disk_in_training_is_one_line(tmp_path, monkeypatch, capsys):
  # Orbax reports a full disk from its writer thread as a ValueError.
  def save_fails(self, step, *args, **kwargs):
    raise ValueError(
        f'RESOURCE_EXHAUSTED: Error writing "params" in OCDBT database at local file '
        f'"{tmp_path}/w/checkpoints/{step}.orbax-checkpoint-tmp": Failed to write 34328 '
        "bytes to file 15: No space left on device [os_error_code='28']")
  monkeypatch.setattr(ckpt_lib.Checkpointer, 'save', save_fails)
  with pytest.raises(SystemExit) as e:
    errors.guard(lambda argv: train_lib.train_and_evaluate(
        tiny_config(num_train_steps=2, checkpoint_every=1), str(tmp_path / 'w')))([])
  err = capsys.readouterr().err
  assert e.value.code == errors.EXIT_USER_ERROR, err
  assert err.count('\n') == 1 and 'No space left on device' in err
  assert 'free space and rerun the same command' in err


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_repeated_signals_stop_a_decode_with_exit_3(trained, tmp_path, signum):
  workdir = _copy(trained, tmp_path)
  for attempt in range(2):
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, 'decode.py'), f'--workdir={workdir}',
         '--mode=bleu', '--split=dev,test', '--beam_size=1,2', '--batch_size=1'],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=ENV)
    seen = b''
    while b'translating' not in seen:  # Decoding has started.
      chunk = proc.stderr.read1(4096)
      assert chunk, seen.decode()[-3000:]
      seen += chunk
    time.sleep(0.2 * attempt)
    for _ in range(3):
      proc.send_signal(signum)
      time.sleep(0.05)
    _, err = proc.communicate(timeout=120)
    err = (seen + err).decode()
    assert proc.returncode == errors.EXIT_STOPPED, err[-3000:]
    assert f'stopped by signal {int(signum)}' in err and 'Traceback' not in err
  assert not os.path.exists(os.path.join(workdir, 'bleu.json'))


def test_signals_stop_a_benchmark_after_its_row_with_exit_3(tmp_path):
  proc = subprocess.Popen(
      [sys.executable, os.path.join(ROOT, 'decode.py'), '--mode=benchmark',
       '--config=configs/paper.py:mha,tiny', '--variants=mha,mqa', f'--out={tmp_path}',
       '--bench_batch=1,2,3,4,5,6', '--bench_src_len=8', '--bench_tgt_len=8',
       '--bench_reps=1', '--bench_kinds=encoder,greedy'],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=ENV)
  rows = tmp_path / 'benchmark.jsonl'
  deadline = time.time() + 240
  while not (rows.exists() and rows.stat().st_size) and proc.poll() is None:
    assert time.time() < deadline
    time.sleep(0.05)
  for _ in range(3):
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.05)
  _, err = proc.communicate(timeout=120)
  err = err.decode()
  assert proc.returncode == errors.EXIT_STOPPED, err[-3000:]
  assert 'stopped by signal 15 after' in err and 'Traceback' not in err, err[-3000:]
  kept = [json.loads(line) for line in rows.read_text().splitlines()]
  assert 1 <= len(kept) < 2 * 2 * 6  # Whole rows only, and not all of them.


def _can_mount_tmpfs():
  return shutil.which('unshare') and subprocess.run(
      ['unshare', '-Urm', 'sh', '-c', 'mount -t tmpfs -o size=1M tmpfs /mnt'],
      capture_output=True).returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(), reason='needs unshare -Urm to mount a tmpfs')
def test_a_real_full_disk_in_training_is_one_line_and_resumes(tmp_path):
  # A 1.5 MB tmpfs fills while the second checkpoint is saved; then it grows.
  mnt, workdir = tmp_path / 'mnt', tmp_path / 'mnt' / 'w'
  mnt.mkdir()
  train = ' '.join([sys.executable, os.path.join(ROOT, 'train.py'),
                    '--config=' + os.path.join(ROOT, 'configs/demo.py:mha,tiny'),
                    f'--workdir={workdir}', '--config.num_train_steps=60',
                    '--config.checkpoint_every=20'])
  script = (f'mount -t tmpfs -o size=1500k tmpfs {mnt} && {{ {train} 2>{tmp_path}/full.err; '
            f'echo $? > {tmp_path}/full.rc; mount -o remount,size=50m {mnt} && '
            f'{train} 2>{tmp_path}/resumed.err; echo $? > {tmp_path}/resumed.rc; }}')
  subprocess.run(['unshare', '-Urm', 'sh', '-c', script], cwd=ROOT, env=ENV, timeout=300)
  err = (tmp_path / 'full.err').read_text()
  lines = [line for line in err.splitlines() if line.startswith('error: ')]
  assert (tmp_path / 'full.rc').read_text().strip() == '2', err[-3000:]
  assert len(lines) == 1 and 'No space left on device' in lines[0], err[-3000:]
  assert 'Traceback' not in err and len(err.splitlines()) < 40, err[-3000:]
  resumed = (tmp_path / 'resumed.err').read_text()
  assert (tmp_path / 'resumed.rc').read_text().strip() == '0', resumed[-3000:]
  assert 'resumed from step' in resumed or 'training 60 steps' in resumed


def test_truncated_best_json_is_a_user_error(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  path = os.path.join(workdir, 'best', 'best.json')
  os.truncate(path, os.path.getsize(path) // 2)
  with pytest.raises(errors.UserError, match=r'best\.json is not valid JSON .*--step=STEP'):
    runs.restore(workdir)
  assert runs.restore(workdir, step=40).step == 40
