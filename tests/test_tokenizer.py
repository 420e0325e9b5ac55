"""Tests for the sentencepiece wrapper."""

import os
import subprocess
import sys

import pytest

from mqa_flax import tokenizer as tokenizer_lib

_TEXTS = [
    'Zwei junge weiße Männer sind im Freien in der Nähe vieler Büsche.',
    'Two young, White males are outside near many bushes.',
    'Größe, Straße und Übermaß: „Äpfel“ (3,5 €) – öfter?!',
    'die Zahl ist dreihundertzwölf .',
    'the number is three hundred and twelve .',
] * 20


@pytest.fixture(scope='module')
def tokenizer(tmp_path_factory):
  path = tmp_path_factory.mktemp('spm') / 'spm.model'
  return tokenizer_lib.train_tokenizer(_TEXTS, 80, str(path), max_sentences=1000, seed=0)


def test_special_ids_and_exact_vocab_size(tokenizer):
  assert (tokenizer.eos_id, tokenizer.vocab_size) == (1, 80)
  assert all(0 not in ids and 1 not in ids for ids in tokenizer.encode_batch(_TEXTS))


@pytest.mark.parametrize('text', _TEXTS[:5] + ['Äpfel Übermaß äöü ß', 'a  b', ' a', 'y.  '])
def test_round_trip_is_exact(tokenizer, text):
  assert tokenizer.decode(tokenizer.encode(text)) == text


def test_decode_stops_at_eos_and_drops_padding(tokenizer):
  ids = tokenizer.encode('Büsche.')
  assert tokenizer.decode([0] + ids + [1] + ids + [0, 0]) == 'Büsche.'
  assert tokenizer.encode_batch(['a b', 'Büsche.'])[1] == ids


def test_training_is_deterministic_and_reloads(tokenizer, tmp_path):
  path = str(tmp_path / 'b.model')
  again = tokenizer_lib.train_tokenizer(_TEXTS, 80, path, 1000, seed=0)
  assert again.fingerprint == tokenizer.fingerprint
  assert tokenizer_lib.Tokenizer(path).encode(_TEXTS[0]) == tokenizer.encode(_TEXTS[0])


def test_too_large_vocab_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match=r'^vocab_size=5000 is more than the training '
                     r'text supports \(max \d+\); lower data.vocab_size$'):
    tokenizer_lib.train_tokenizer(_TEXTS, 5000, str(tmp_path / 'x.model'), 1000)


def test_too_small_vocab_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match='raise data.vocab_size'):
    tokenizer_lib.train_tokenizer(_TEXTS, 10, str(tmp_path / 'x.model'), 1000)


def test_sampled_vocabulary_is_the_same_in_every_process(tmp_path):
  # 300 distinct texts, 100 sampled: each process must draw the same ones.
  code = ('import sys; from mqa_flax import tokenizer as t; '
          "t.train_tokenizer([f'text {i} ' + 'abcdefghij'[i % 10] * (i % 7) "
          "for i in range(300)], 40, sys.argv[1], max_sentences=100, seed=3)")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  models = []
  for name in ('a.model', 'b.model'):
    subprocess.run([sys.executable, '-c', code, str(tmp_path / name)], check=True,
                   cwd=root, env=dict(os.environ, PYTHONPATH=root))
    models.append((tmp_path / name).read_bytes())
  assert models[0] == models[1]
