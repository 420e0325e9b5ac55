"""Tests for mqa_flax.metrics: TensorBoard events, metrics.jsonl, progress line."""

import sys
import types

import numpy as np
import pytest

# TensorBoard's "no_tensorflow" switch, set before importing it: read events
# with its stub instead of importing TensorFlow (saves ~5 s).
sys.modules.setdefault('tensorboard.compat.notf', types.ModuleType('notf'))
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from mqa_flax import metrics


def _events(logdir: str) -> event_accumulator.EventAccumulator:
  acc = event_accumulator.EventAccumulator(
      logdir, size_guidance={event_accumulator.TENSORS: 0})
  acc.Reload()
  return acc


def test_writer_event_files_and_jsonl(tmp_path):
  w = metrics.MetricWriter(str(tmp_path))
  w.write_hparams({'seed': 0, 'model': {'num_kv_heads': 1, 'dtype': 'float32'},
                   'shape': (2, 3), 'fast': True})
  w.write_scalars(1, {'train/loss': np.float32(2.5), 'train/lr': 1e-3})
  w.write_scalars(2, {'train/loss': 2.0})
  w.write_texts(2, {'decode/sample': 'Hallo Welt'})
  w.flush()
  w.close()

  acc = _events(str(tmp_path))
  loss = acc.Scalars('train/loss')
  assert [e.step for e in loss] == [1, 2]
  np.testing.assert_allclose([e.value for e in loss], [2.5, 2.0])
  np.testing.assert_allclose(acc.Scalars('train/lr')[0].value, 1e-3, rtol=1e-6)
  assert 'decode/sample/text_summary' in acc.Tags()['tensors']
  content = acc.PluginTagToContent('hparams')['_hparams_/session_start_info']
  hp = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
  assert hp['seed'].number_value == 0
  assert hp['model.num_kv_heads'].number_value == 1
  assert hp['model.dtype'].string_value == 'float32'
  assert hp['shape'].string_value == '(2, 3)'
  assert hp['fast'].bool_value

  rows = metrics.read_jsonl(str(tmp_path / 'metrics.jsonl'))
  assert rows == [{'step': 1, 'train/loss': 2.5, 'train/lr': 1e-3},
                  {'step': 2, 'train/loss': 2.0}]


def test_writer_appends_across_instances(tmp_path):
  for step in (1, 2):  # A resumed run reopens the same workdir.
    w = metrics.MetricWriter(str(tmp_path))
    w.write_scalars(step, {'eval/loss': float(step)})
    w.close()
  rows = metrics.read_jsonl(str(tmp_path / 'metrics.jsonl'))
  assert [r['step'] for r in rows] == [1, 2]


def test_disabled_writer_writes_nothing(tmp_path):
  logdir = tmp_path / 'host1'
  w = metrics.MetricWriter(str(logdir), enabled=False)
  w.write_hparams({'a': 1})
  w.write_scalars(1, {'train/loss': 1.0})
  w.write_texts(1, {'t': 'x'})
  w.flush()
  w.close()
  assert not logdir.exists()


def test_flatten_dict():
  flat = metrics.flatten_dict({'a': 1, 'b': {'c': 2, 'd': {'e': 'x'}}})
  assert flat == {'a': 1, 'b.c': 2, 'b.d.e': 'x'}


def test_read_jsonl_ignores_truncated_last_line(tmp_path):
  path = tmp_path / 'm.jsonl'
  path.write_text('{"step": 1, "x": 1.0}\n\n{"step": 2, "x"')
  assert metrics.read_jsonl(str(path)) == [{'step': 1, 'x': 1.0}]
  path.write_text('{"step": 1\n{"step": 2}\n')
  with pytest.raises(ValueError, match='m.jsonl:1'):
    metrics.read_jsonl(str(path))


@pytest.mark.parametrize('seconds, text', [
    (12.4, '12s'), (245, '4m05s'), (3 * 3600 + 18 * 60 + 5, '3h18m')])
def test_format_duration(seconds, text):
  assert metrics.format_duration(seconds) == text


def test_report_progress(monkeypatch):
  clock = [100.0]
  monkeypatch.setattr(metrics.time, 'monotonic', lambda: clock[0])
  logged = []
  monkeypatch.setattr(metrics.logging, 'info', lambda fmt, *a: logged.append(fmt % a))
  progress = metrics.ReportProgress(num_train_steps=100_000)
  progress.start(1000)
  clock[0] += 10.0
  with progress.paused():
    clock[0] += 50.0  # Evaluation: not training time.
  clock[0] += 10.0
  assert progress.elapsed() == pytest.approx(20.0)
  assert progress(1200, extra='loss 2.31') == pytest.approx(20.0)
  # 200 steps in 20 s of training; 98800 steps left at 10 steps/s = 9880 s.
  assert logged == [
      'step 1200/100000 (1.2%) | 10.00 steps/s | ETA 2h44m | loss 2.31']
  clock[0] += 5.0  # The clock restarts at each report.
  assert progress(1250) == pytest.approx(5.0)
