"""Tests for sources, the tokenize cache, packing, resume and eval batches."""

import collections
import gzip
import json
import os
import sys
import time

import numpy as np
import pytest

from configs import base as base_config
from conftest import make_examples
from mqa_flax import data
from mqa_flax import tokenizer as tokenizer_lib
from mqa_flax.errors import UserError

_REAL_DATA = os.environ.get(
    'MQA_FLAX_DATA', os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'data'))


def _cfg(**overrides):
  cfg = base_config.get_config().data
  cfg.update(dict(source='numbers', vocab_size=64, numbers_train_size=300,
                  numbers_eval_size=20, numbers_max=999, max_len=32, max_eval_len=128))
  cfg.update(overrides)
  return cfg


def _examples(n: int, max_len: int, seed: int = 0) -> data.Examples:
  """Random pairs of up to max_len tokens ending in EOS; source i starts with 1000+i."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(0, max_len - 1, (n, 2))
  src = [[1000 + i, *rng.integers(3, 50, k), 1] for i, k in enumerate(lengths[:, 0])]
  tgt = [[*rng.integers(3, 50, k), 1] for k in lengths[:, 1]]
  return make_examples(src, tgt)


def _pairs(batch: dict[str, np.ndarray]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
  """Recovers the (source, target) pairs of packed rows, checking the layout."""
  pairs = []
  for row in range(batch['inputs'].shape[0]):
    sides = []
    for side in ('inputs', 'targets'):
      tokens, seg, pos = (batch[side + suffix][row]
                          for suffix in ('', '_segmentation', '_position'))
      used = seg > 0
      assert (used == (np.arange(len(used)) < used.sum())).all(), 'padding inside a row'
      assert (tokens[~used] == 0).all() and (pos[~used] == 0).all()
      segments = seg[used]
      assert (np.diff(segments) >= 0).all()
      assert list(np.unique(segments)) == list(range(1, segments.max(initial=0) + 1))
      per_segment = [tokens[seg == s] for s in np.unique(segments)]
      for s in np.unique(segments):
        np.testing.assert_array_equal(pos[seg == s], np.arange((seg == s).sum()))
      sides.append(per_segment)
    assert len(sides[0]) == len(sides[1]), 'a segment has only one side in this row'
    pairs += [(tuple(s), tuple(t)) for s, t in zip(*sides)]
  return pairs


def _as_pair(examples: data.Examples, i: int):
  return tuple(examples.src(i)), tuple(examples.tgt(i))


def _assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# Packing and resume.


def test_packing_places_every_pair_once_in_order():
  examples, max_len = _examples(60, 12), 16
  it = data.PackedBatches(examples, batch_size=4, max_len=max_len, seed=1)
  got = []
  while it.get_state()['epoch'] == 0:
    batch = next(it)
    assert all(v.shape == (4, max_len) and v.dtype == np.int32 for v in batch.values())
    got += _pairs(batch)
  state = it.get_state()
  order = list(it.epoch_order(0)) + list(it.epoch_order(1)[:state['cursor']])
  assert got == [_as_pair(examples, i) for i in order]
  epoch0 = got[:len(examples)]
  everything = [_as_pair(examples, i) for i in range(len(examples))]
  assert collections.Counter(epoch0) == collections.Counter(everything)


def test_packing_is_greedy():
  examples = make_examples([[5, 1], [6, 6, 1], [7, 1]], [[8, 1], [9, 1], [9, 9, 9, 1]])
  its = (data.PackedBatches(examples, batch_size=2, max_len=5, seed=s) for s in range(99))
  batch = next(next(it for it in its if list(it.epoch_order(0)) == [0, 1, 2]))
  np.testing.assert_array_equal(batch['inputs'], [[5, 1, 6, 6, 1], [7, 1, 0, 0, 0]])
  np.testing.assert_array_equal(batch['targets_segmentation'],
                                [[1, 1, 2, 2, 0], [1, 1, 1, 1, 0]])
  np.testing.assert_array_equal(batch['inputs_position'],
                                [[0, 1, 0, 1, 2], [0, 1, 0, 0, 0]])


def test_resume_gives_the_same_batches_across_epochs():
  examples = _examples(30, 10)
  run = data.PackedBatches(examples, batch_size=4, max_len=16, seed=7)
  batches, states = [], []
  for _ in range(25):
    batches.append(next(run))
    states.append(run.get_state())
  assert states[-1]['epoch'] >= 2, 'the test should cross epoch boundaries'
  for k in (0, 5, 11, 17):
    resumed = data.PackedBatches(examples, batch_size=4, max_len=16, seed=7)
    resumed.set_state(json.loads(json.dumps(states[k])))
    for expected in batches[k + 1:]:
      _assert_batches_equal(next(resumed), expected)


def test_processes_share_each_epoch():
  examples = _examples(41, 8)
  its = [data.PackedBatches(examples, 8, 16, seed=3, process_index=p, process_count=2)
         for p in range(2)]
  for epoch in (0, 1):
    first, second = (set(it.epoch_order(epoch)) for it in its)
    assert not first & second and first | second == set(range(len(examples)))
  for it in its:
    batch = next(it)
    assert batch['inputs'].shape == (4, 16)
    got = _pairs(batch)
    assert got == [_as_pair(examples, i) for i in it.epoch_order(0)[:len(got)]]


def test_packed_batches_rejects_bad_arguments():
  with pytest.raises(ValueError, match='not divisible'):
    data.PackedBatches(_examples(10, 4), 3, 8, 0, process_count=2)
  with pytest.raises(ValueError, match='more than max_len'):
    data.PackedBatches(_examples(10, 12), 4, 8, 0)


def test_prefetch_returns_the_same_batches_and_state():
  examples = _examples(30, 10)
  direct = data.PackedBatches(examples, 4, 16, seed=2)
  prefetch = data.Prefetch(data.PackedBatches(examples, 4, 16, seed=2), size=3)
  assert prefetch.get_state() == {'epoch': 0, 'cursor': 0}
  for _ in range(12):
    _assert_batches_equal(next(prefetch), next(direct))
    time.sleep(0.002)  # Lets the producer run ahead.
    assert prefetch.get_state() == direct.get_state()
  assert prefetch.wait_seconds >= 0.0
  prefetch.close()


def test_prefetch_reraises_producer_errors():
  class Failing(data.PackedBatches):

    def __next__(self):
      raise KeyError('broken shard')

  prefetch = data.Prefetch(Failing(_examples(4, 4), 2, 8, 0))
  with pytest.raises(KeyError, match='broken shard'):
    next(prefetch)


def test_eval_batches_cover_every_example_in_order():
  examples = _examples(21, 13)
  rows = []
  batches = list(data.eval_batches(examples, batch_size=8))
  assert [b['num_real'] for b in batches] == [8, 8, 5]
  for b in batches:
    assert b['inputs'].shape[0] == b['targets'].shape[0] == 8
    assert b['inputs'].shape[1] % 8 == 0 and b['targets'].shape[1] % 8 == 0
    assert not b['inputs'][b['num_real']:].any()
    for r in range(b['num_real']):
      rows.append((tuple(b['inputs'][r][b['inputs'][r] > 0]),
                   tuple(b['targets'][r][b['targets'][r] > 0])))
  assert rows == [_as_pair(examples, i) for i in range(len(examples))]


# Sources.


def _write(path, lines, compress=False):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with (gzip.open if compress else open)(path, 'wt', encoding='utf-8') as f:
    f.write(''.join(line + '\n' for line in lines))


def test_text_source_reads_gz_and_plain_and_globs(tmp_path):
  _write(tmp_path / 'a/train.en.gz', ['one', 'two', '  ', 'three'], compress=True)
  _write(tmp_path / 'a/train.de', ['eins', 'zwei', 'drei', ''])
  _write(tmp_path / 'b/news2.en', ['Größe\u2028x'])  # U+2028 is not a newline.
  _write(tmp_path / 'b/news2.de.gz', ['Straße'], compress=True)
  _write(tmp_path / 'b/news1.en', ['a'])
  _write(tmp_path / 'b/news1.de', ['b'])
  cfg = _cfg(source='text', data_dir=str(tmp_path))
  src, tgt = data.read_split(cfg, 'a/train, b/news*')
  assert src == ['one', 'two', 'a', 'Größe\u2028x']
  assert tgt == ['eins', 'zwei', 'b', 'Straße']
  cfg.src_lang, cfg.tgt_lang = 'de', 'en'
  assert data.read_split(cfg, 'b/news1') == (['b'], ['a'])


def test_text_source_errors(tmp_path):
  _write(tmp_path / 'x.en', ['1', '2', '3'])
  _write(tmp_path / 'x.de.gz', ['1', '2'], compress=True)
  _write(tmp_path / 'y.en', ['1'])
  cfg = _cfg(source='text', data_dir=str(tmp_path))
  with pytest.raises(ValueError, match=r'x\.en has 3 lines, .*x\.de\.gz has 2$'):
    data.read_split(cfg, 'x')
  with pytest.raises(FileNotFoundError, match=r'looked for .*y\.de and .*y\.de\.gz'):
    data.read_split(cfg, 'y')
  with pytest.raises(FileNotFoundError, match=r'no file matches .*nothing\.en'):
    data.read_split(cfg, 'nothing')
  with pytest.raises(ValueError, match='data_dir is empty'):
    data.read_split(_cfg(source='text'), 'x')


@pytest.mark.skipif(not os.path.isdir(f'{_REAL_DATA}/multi30k'), reason='no shared data')
def test_text_source_on_multi30k():
  src, tgt = data.read_split(_cfg(source='text', data_dir=_REAL_DATA), 'multi30k/val')
  assert len(src) == len(tgt) == 1014
  assert tgt[0].startswith('Eine Gruppe von Männern')


def test_numbers_source_direction_and_splits():
  en_de = data.read_split(_cfg(), 'validation')
  de_en = data.read_split(_cfg(src_lang='de', tgt_lang='en'), 'dev')
  assert en_de == de_en[::-1] and len(en_de[0]) == 20
  assert len(data.read_split(_cfg(), 'train')[0]) == 300
  with pytest.raises(ValueError, match='unknown split'):
    data.read_split(_cfg(), 'newstest2014')


def test_tfds_source_without_tfds(monkeypatch):
  monkeypatch.setitem(sys.modules, 'tensorflow_datasets', None)
  with pytest.raises(UserError, match=r"needs the 'wmt' extra.*data.source='text'"):
    data.read_split(_cfg(source='tfds'), 'train')


@pytest.mark.parametrize('api', ['data_source', 'load', 'tfrecord'])
def test_tfds_source_with_mock_data(monkeypatch, api):
  tfds = pytest.importorskip('tensorflow_datasets')
  if api == 'load':
    monkeypatch.delattr(tfds, 'data_source')
  if api == 'tfrecord':  # Prepared as TFRecord: no random access, so tfds.load.

    def no_random_access(*args, **kwargs):
      raise NotImplementedError('Random access data source for file format tfrecord')

    monkeypatch.setattr(tfds, 'data_source', no_random_access)
  with tfds.testing.mock_data(num_examples=6):
    src, tgt = data.read_split(_cfg(source='tfds'), 'validation')
  assert len(src) == len(tgt) and 0 < len(src) <= 6
  assert all(isinstance(s, str) and s for s in src + tgt)


def test_tfds_source_not_prepared(monkeypatch):
  tfds = pytest.importorskip('tensorflow_datasets')

  def fail(*args, **kwargs):
    raise AssertionError('Failed to construct dataset: no network\nmore detail')

  monkeypatch.setattr(tfds, 'data_source', fail)
  message = r"not prepared .* could not be downloaded .*data.source='text'"
  with pytest.raises(UserError, match=message) as e:
    data.read_split(_cfg(source='tfds'), 'train')
  assert '\n' not in str(e.value)


# Vocabulary and the tokenize cache.


def test_tokenizer_and_cache(tmp_path, monkeypatch):
  cfg, workdir = _cfg(), str(tmp_path)
  tokenizer = data.get_tokenizer(cfg, workdir)
  assert tokenizer.vocab_size == 64 and os.path.exists(tmp_path / 'spm.model')
  reads = []
  real_read_split = data.read_split
  monkeypatch.setattr(data, 'read_split',
                      lambda *a: reads.append(a[1]) or real_read_split(*a))
  reloaded = data.get_tokenizer(cfg, workdir, is_primary=False)
  assert reloaded.fingerprint == tokenizer.fingerprint
  assert not reads, 'the vocabulary should be reused'

  dev = data.tokenize_split(cfg, 'dev', tokenizer, workdir)
  src, tgt = real_read_split(cfg, 'dev')
  assert len(dev) == len(src) and reads == ['dev']
  assert tokenizer.decode(dev.src(3)) == src[3] and dev.tgt(3)[-1] == tokenizer.eos_id
  assert os.path.exists(tmp_path / 'data' / 'dev.npz')
  again = data.tokenize_split(cfg, 'dev', tokenizer, workdir)
  assert reads == ['dev'], 'the second call should read the cache'
  np.testing.assert_array_equal(again.tgt_tokens, dev.tgt_tokens)

  other = tokenizer_lib.train_tokenizer(src + tgt, 48, str(tmp_path / 'o.model'), 1000)
  data.tokenize_split(cfg, 'dev', other, workdir)
  assert reads == ['dev', 'dev'], 'a new vocabulary should invalidate the cache'
  data.tokenize_split(_cfg(numbers_eval_size=10), 'dev', other, workdir)
  assert reads == ['dev', 'dev', 'dev'], 'a new source config should invalidate the cache'


def test_tokenize_truncates_and_counts(tmp_path):
  cfg = _cfg(max_eval_len=6)
  tokenizer = data.get_tokenizer(cfg, str(tmp_path))
  examples = data.tokenize_split(cfg, 'test', tokenizer, str(tmp_path))
  assert max(examples.max_lengths()) == 6 and examples.num_truncated > 0
  assert all(examples.src(i)[-1] == tokenizer.eos_id for i in range(len(examples)))


def test_waiting_for_the_primary_times_out(tmp_path):
  with pytest.raises(TimeoutError, match='spm.model'):
    data.get_tokenizer(_cfg(), str(tmp_path), is_primary=False, timeout_s=0.1)
