"""Tests for the generated number-words task."""

import re

import numpy as np
import pytest

from mqa_flax import number_words


@pytest.mark.parametrize('n, english, german', [
    (0, 'zero', 'null'),
    (1, 'one', 'eins'),
    (7, 'seven', 'sieben'),
    (11, 'eleven', 'elf'),
    (12, 'twelve', 'zwölf'),
    (16, 'sixteen', 'sechzehn'),
    (17, 'seventeen', 'siebzehn'),
    (20, 'twenty', 'zwanzig'),
    (21, 'twenty-one', 'einundzwanzig'),
    (30, 'thirty', 'dreißig'),
    (60, 'sixty', 'sechzig'),
    (70, 'seventy', 'siebzig'),
    (77, 'seventy-seven', 'siebenundsiebzig'),
    (100, 'one hundred', 'einhundert'),
    (101, 'one hundred and one', 'einhunderteins'),
    (121, 'one hundred and twenty-one', 'einhunderteinundzwanzig'),
    (312, 'three hundred and twelve', 'dreihundertzwölf'),
    (1000, 'one thousand', 'eintausend'),
    (1001, 'one thousand and one', 'eintausendeins'),
    (1101, 'one thousand one hundred and one', 'eintausendeinhunderteins'),
    (21000, 'twenty-one thousand', 'einundzwanzigtausend'),
    (101001, 'one hundred and one thousand and one', 'einhunderteintausendeins'),
    (200000, 'two hundred thousand', 'zweihunderttausend'),
    (999999, 'nine hundred and ninety-nine thousand nine hundred and ninety-nine',
     'neunhundertneunundneunzigtausendneunhundertneunundneunzig'),
])
def test_known_numbers(n, english, german):
  assert number_words.english(n) == english
  assert number_words.german(n) == german


def test_out_of_range():
  with pytest.raises(ValueError, match='outside'):
    number_words.german(1_000_000)


def test_german_words_are_unique():
  words = {number_words.german(n) for n in range(0, 1_000_000, 7)}
  assert len(words) == len(range(0, 1_000_000, 7))


def test_make_split_is_deterministic_and_parallel():
  a = number_words.make_split('train', 200, 9999, seed=3)
  assert a == number_words.make_split('train', 200, 9999, seed=3)
  assert a != number_words.make_split('train', 200, 9999, seed=4)
  en, de = a
  assert len(en) == len(de) == 200
  assert all(e.endswith('.') and d.endswith('.') for e, d in zip(en, de))
  assert ' one apples' not in ' '.join(en)  # Noun templates avoid the singular.


@pytest.mark.parametrize('max_number', [99, 999_999])
def test_split_numbers_are_disjoint(max_number):
  train, dev, test = (set(number_words.split_numbers(split, max_number))
                      for split in ('train', 'dev', 'test'))
  assert not train & dev and not train & test and not dev & test
  assert train | dev | test == set(range(max_number + 1))


def _numbers_in(sentence: str, by_words: dict[str, int]) -> list[int]:
  for english, _, _ in number_words.TEMPLATES:
    pattern = re.escape(english).replace(r'\{a\}', '(.+)').replace(r'\{b\}', '(.+)')
    match = re.fullmatch(pattern, sentence)
    if match and all(g in by_words for g in match.groups()):
      return [by_words[g] for g in match.groups()]
  raise AssertionError(f'no template parses {sentence!r}')


def test_sentences_use_only_their_split_numbers():
  by_words = {number_words.english(n): n for n in range(1000)}
  for split in ('train', 'dev', 'test'):
    allowed = set(number_words.split_numbers(split, 999))
    for sentence in number_words.make_split(split, 100, 999, seed=0)[0]:
      assert set(_numbers_in(sentence, by_words)) <= allowed


def test_basic_numbers_are_trained_and_never_tested():
  train = set(number_words.split_numbers('train', 99_999))
  held_out = set(number_words.split_numbers('dev', 99_999)) | set(
      number_words.split_numbers('test', 99_999))
  basic = {n for n in range(100_000) if number_words.is_basic(np.array([n]))[0]}
  assert {0, 5, 13, 20, 30, 90, 100, 700, 1000, 9000} <= basic
  assert basic <= train and not basic & held_out
  assert 21 not in basic and 101 not in basic and 10_000 not in basic
