"""A generated EN->DE translation task: sentences with numbers in words.

English follows British usage ("three hundred and twelve", "twenty-one",
"one thousand and five"). German writes a number as one word and always
spells out the leading one of "hundert" and "tausend" ("einhundert",
"eintausendeins", "einhunderteinundzwanzig"), so that every English "one
hundred"/"one thousand" has a German "ein" to align with. Both are correct
German; this module never produces the shorter "hundert"/"tausend".

Each example is a short sentence from a few parallel templates, so that BLEU
has 2- to 4-grams to count. Numbers are split between train, dev and test by a
fixed hash of the number, so dev and test numbers never occur in training
(unless `max_number` is too small to leave each split some numbers).
"""

import numpy as np

_EN_ONES = (
    'zero one two three four five six seven eight nine ten eleven twelve '
    'thirteen fourteen fifteen sixteen seventeen eighteen nineteen').split()
_EN_TENS = 'x x twenty thirty forty fifty sixty seventy eighty ninety'.split()
_DE_ONES = (
    'null eins zwei drei vier fünf sechs sieben acht neun zehn elf zwölf '
    'dreizehn vierzehn fünfzehn sechzehn siebzehn achtzehn neunzehn').split()
_DE_TENS = 'x x zwanzig dreißig vierzig fünfzig sechzig siebzig achtzig neunzig'.split()

# (English, German, smallest number): two-number templates use {a} and {b}.
# Noun templates start at 2 to avoid singular agreement ("einen Apfel").
TEMPLATES = (
    ('The number is {a}.', 'Die Zahl ist {a}.', 0),
    ('I have {a} apples and {b} pears.', 'Ich habe {a} Äpfel und {b} Birnen.', 2),
    ('We need {a} books.', 'Wir brauchen {a} Bücher.', 2),
    ('There are {a} cats in the house.', 'Im Haus sind {a} Katzen.', 2),
)
MAX_NUMBER = 999_999
_SPLIT_BUCKETS = {'dev': (0,), 'test': (1,), 'train': tuple(range(2, 10))}


def _check_range(n: int) -> None:
  if not 0 <= n <= MAX_NUMBER:
    raise ValueError(f'number {n} is outside 0..{MAX_NUMBER}')


def _english_below_100(n: int) -> str:
  if n < 20:
    return _EN_ONES[n]
  tens, ones = divmod(n, 10)
  return _EN_TENS[tens] + (f'-{_EN_ONES[ones]}' if ones else '')


def _english_below_1000(n: int) -> str:
  hundreds, rest = divmod(n, 100)
  if not hundreds:
    return _english_below_100(rest)
  words = f'{_EN_ONES[hundreds]} hundred'
  return words + (f' and {_english_below_100(rest)}' if rest else '')


def english(n: int) -> str:
  """Returns British English words for 0 <= n <= 999_999."""
  _check_range(n)
  thousands, rest = divmod(n, 1000)
  if not thousands:
    return _english_below_1000(rest)
  words = f'{_english_below_1000(thousands)} thousand'
  if not rest:
    return words
  # British English keeps "and" before a last part below one hundred.
  return words + (' and ' if rest < 100 else ' ') + _english_below_1000(rest)


def _german_prefix(n: int) -> str:
  """German digit 1..9 as it stands before another word: "ein", not "eins"."""
  return 'ein' if n == 1 else _DE_ONES[n]


def _german_below_1000(n: int, final: bool) -> str:
  """German for 1 <= n <= 999; `final` is False before "tausend"."""
  hundreds, rest = divmod(n, 100)
  words = _german_prefix(hundreds) + 'hundert' if hundreds else ''
  if rest == 1 and not final:
    return words + 'ein'
  if rest < 20:
    return words + (_DE_ONES[rest] if rest else '')
  tens, ones = divmod(rest, 10)
  if ones:
    words += _german_prefix(ones) + 'und'
  return words + _DE_TENS[tens]


def german(n: int) -> str:
  """Returns German words (one word, "ein" before hundert/tausend) for n."""
  _check_range(n)
  if n == 0:
    return _DE_ONES[0]
  thousands, rest = divmod(n, 1000)
  words = _german_below_1000(thousands, final=False) + 'tausend' if thousands else ''
  return words + (_german_below_1000(rest, final=True) if rest else '')


def is_basic(numbers: np.ndarray) -> np.ndarray:
  """Numbers with a word of their own (0-20, tens, hundreds, thousands), [bool]."""
  tens = (numbers < 100) & (numbers % 10 == 0)
  hundreds = (numbers < 1000) & (numbers % 100 == 0)
  thousands = (numbers < 10_000) & (numbers % 1000 == 0)
  return (numbers <= 20) | tens | hundreds | thousands


def split_numbers(split: str, max_number: int) -> np.ndarray:
  """Returns the numbers 0..max_number that belong to `split`, ascending.

  The basic numbers (`is_basic`) are the task's vocabulary and belong to
  train; dev and test hold composite numbers never seen in training.
  """
  if split not in _SPLIT_BUCKETS:
    raise ValueError(f'unknown split {split!r}; expected one of {sorted(_SPLIT_BUCKETS)}')
  _check_range(max_number)
  numbers = np.arange(max_number + 1, dtype=np.uint64)
  # A fixed multiplicative hash, so the partition does not depend on the seed.
  bucket = ((numbers * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(40)) % np.uint64(10)
  mine = np.isin(bucket, _SPLIT_BUCKETS[split])
  basic = is_basic(numbers.astype(np.int64))
  mine = (mine | basic) if split == 'train' else (mine & ~basic)
  return numbers[mine].astype(np.int64) if mine.any() else numbers.astype(np.int64)


def _sampler(pool: np.ndarray, rng: np.random.Generator):
  """Draws a number of digits uniformly, then a number of that length."""
  digits = np.digitize(pool, 10 ** np.arange(1, 7))
  by_digits = [pool[digits == d] for d in np.unique(digits)]

  def sample() -> int:
    numbers = by_digits[rng.integers(len(by_digits))]
    return int(numbers[rng.integers(len(numbers))])

  return sample


def make_split(split: str, size: int, max_number: int,
               seed: int) -> tuple[list[str], list[str]]:
  """Returns `size` (English, German) sentence pairs of one split, from `seed`."""
  if max_number < 2:
    raise ValueError(f'max_number={max_number}: the noun templates need numbers >= 2')
  pool = split_numbers(split, max_number)
  rng = np.random.default_rng([seed, sorted(_SPLIT_BUCKETS).index(split)])
  samplers = {}
  for low in sorted({t[2] for t in TEMPLATES}):
    big = pool[pool >= low]
    samplers[low] = _sampler(big if big.size else np.arange(low, max_number + 1), rng)
  english_sentences, german_sentences = [], []
  for _ in range(size):
    en, de, low = TEMPLATES[rng.integers(len(TEMPLATES))]
    a, b = samplers[low](), samplers[low]()
    english_sentences.append(en.format(a=english(a), b=english(b)))
    german_sentences.append(de.format(a=german(a), b=german(b)))
  return english_sentences, german_sentences
