"""Input pipeline: sentence pairs -> sentencepiece ids -> packed int32 batches.

Sources (`data.source`): 'numbers' (the generated task of `number_words`),
'text' (aligned local files, plain or gzip) and 'tfds' (TensorFlow Datasets,
only as a source of sentence pairs). Tokenized splits are cached as flat
arrays under `<workdir>/data/`.

The pipeline is hand-written numpy rather than grain: grain is not available on
all our target machines (the GPU image lacks it), and deterministic packing
with exact resume is about a hundred lines of numpy.
"""

from collections.abc import Iterator, Sequence
import dataclasses
import glob
import gzip
import hashlib
import itertools
import json
import math
import os
import queue
import re
import threading
import time
import zipfile
from typing import Any

from absl import logging
import ml_collections
import numpy as np

from mqa_flax import files
from mqa_flax import number_words
from mqa_flax import tokenizer as tokenizer_lib
from mqa_flax.errors import UserError

NUMBERS_SEED = 0  # The generated task is the same for every training seed.
SPM_SEED = 0  # Sentence sampling when training the vocabulary.
_NUMBERS_SPLITS = {'train': 'train', 'dev': 'dev', 'validation': 'dev', 'val': 'dev',
                   'test': 'test'}
# Config keys that change what `read_split` returns (the vocabulary is keyed apart).
_SOURCE_KEYS = ('source', 'data_dir', 'tfds_name', 'src_lang', 'tgt_lang',
                'numbers_train_size', 'numbers_eval_size', 'numbers_max')
_CACHE_VERSION = 1
_ARRAYS = ('src_tokens', 'src_offsets', 'tgt_tokens', 'tgt_offsets')
_TOKENIZE_CHUNK = 100_000

Batch = dict[str, np.ndarray]
Pairs = tuple[list[str], list[str]]


# Sources.


def read_split(cfg: ml_collections.ConfigDict, split: str) -> Pairs:
  """Returns (source, target) sentences of `split`, aligned, in cfg's direction."""
  if cfg.source == 'numbers':
    return _read_numbers(cfg, split)
  if cfg.source == 'text':
    return _read_text(cfg, split)
  if cfg.source == 'tfds':
    return _read_tfds(cfg, split)
  raise UserError(f"data.source={cfg.source!r}; expected 'numbers', 'text' or 'tfds'")


def _read_numbers(cfg: ml_collections.ConfigDict, split: str) -> Pairs:
  if split not in _NUMBERS_SPLITS:
    raise UserError(f'numbers source: unknown split {split!r}; '
                    f'expected one of {sorted(_NUMBERS_SPLITS)}')
  if {cfg.src_lang, cfg.tgt_lang} != {'en', 'de'}:
    raise UserError(f'numbers source is en<->de, not {cfg.src_lang}->{cfg.tgt_lang}')
  name = _NUMBERS_SPLITS[split]
  size = cfg.numbers_train_size if name == 'train' else cfg.numbers_eval_size
  en, de = number_words.make_split(name, size, cfg.numbers_max, NUMBERS_SEED)
  return (en, de) if cfg.src_lang == 'en' else (de, en)


def split_lines(raw: bytes, name: str, invalid_utf8: str = 'error') -> list[str]:
  """The lines of UTF-8 text, split at '\\n' only (CRLF's '\\r' dropped).

  Training and decoding both read text this way, so a '\\r' inside a line
  never splits it. A line that is not UTF-8 raises UserError naming it, or
  with `invalid_utf8='replace'` holds U+FFFD for each bad byte (one warning).
  """
  parts = raw.split(b'\n')
  if parts[-1] == b'':
    parts.pop()
  lines, replaced = [], 0
  for number, part in enumerate(parts, 1):
    part = part.removesuffix(b'\r')
    try:
      lines.append(part.decode('utf-8'))
    except UnicodeDecodeError as e:
      if invalid_utf8 != 'replace':
        raise UserError(
            f'{name} line {number} is not UTF-8 (byte 0x{part[e.start]:02x} at '
            f'column {e.start + 1}): convert it, e.g. iconv -f latin1 -t utf-8, or '
            'decode with --invalid_utf8=replace') from None
      lines.append(part.decode('utf-8', 'replace'))
      replaced += 1
  if replaced:
    logging.warning('%s: %d of %d lines were not UTF-8; their invalid bytes became '
                    'U+FFFD', name, replaced, len(lines))
  return lines


def _read_lines(path: str) -> list[str]:
  """Returns the lines of a UTF-8 file (plain or gzip), per `split_lines`."""
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'rb') as f:
    return split_lines(f.read(), path)


def _find(stem: str, lang: str) -> str | None:
  """Returns `stem.lang` or `stem.lang.gz`, whichever exists."""
  for path in (f'{stem}.{lang}', f'{stem}.{lang}.gz'):
    if os.path.isfile(path):
      return path
  return None


def _read_text(cfg: ml_collections.ConfigDict, split: str) -> Pairs:
  if not cfg.data_dir:
    raise UserError("data.data_dir is empty; the 'text' source needs the directory "
                     'of the split files')
  if not os.path.isdir(cfg.data_dir):
    raise FileNotFoundError(f'data.data_dir={cfg.data_dir!r} is not a directory')
  src, tgt = cfg.src_lang, cfg.tgt_lang
  pairs_src, pairs_tgt, skipped, empty = [], [], 0, []
  for pattern in (p.strip() for p in split.split(',') if p.strip()):
    prefix = os.path.join(glob.escape(cfg.data_dir), pattern)
    matches = glob.glob(f'{prefix}.{src}') + glob.glob(f'{prefix}.{src}.gz')
    stems = sorted({re.sub(rf'\.{re.escape(src)}(\.gz)?$', '', m) for m in matches})
    if not stems:
      raise FileNotFoundError(
          f'no file matches {prefix}.{src} or {prefix}.{src}.gz (split {split!r})')
    for stem in stems:
      src_path, tgt_path = _find(stem, src), _find(stem, tgt)
      if tgt_path is None:
        raise FileNotFoundError(f'{src_path} has no target file: looked for '
                                f'{stem}.{tgt} and {stem}.{tgt}.gz')
      src_lines, tgt_lines = _read_lines(src_path), _read_lines(tgt_path)
      empty += [p for p, lines in ((src_path, src_lines), (tgt_path, tgt_lines))
                if not any(line.strip() for line in lines)]
      if len(src_lines) != len(tgt_lines):
        raise UserError(f'line counts differ: {src_path} has {len(src_lines)} lines, '
                         f'{tgt_path} has {len(tgt_lines)}')
      for s, t in zip(src_lines, tgt_lines):
        s, t = s.strip(), t.strip()
        if s and t:
          pairs_src.append(s)
          pairs_tgt.append(t)
        else:
          skipped += 1
  logging.info('text split %r: %d pairs, %d skipped with an empty side',
               split, len(pairs_src), skipped)
  if not pairs_src:
    raise UserError(f'split {split!r} holds no sentence pairs: '
                    f'{", ".join(empty) or "every pair has an empty side"} '
                    f'{"is" if len(empty) == 1 else "are"} empty; fix the files '
                    'or the split')
  if empty:
    logging.warning('split %r: %s empty', split, ', '.join(empty))
  return pairs_src, pairs_tgt


def _read_tfds(cfg: ml_collections.ConfigDict, split: str) -> Pairs:
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise UserError("the tfds source needs the 'wmt' extra: pip install -e '.[wmt]'; "
                    "or use data.source='text' with local files") from e
  name, data_dir = cfg.tfds_name, cfg.data_dir or None
  try:
    if hasattr(tfds, 'data_source'):
      try:
        examples = tfds.data_source(name, split=split, data_dir=data_dir)
      except NotImplementedError:  # Prepared as TFRecord, which has no random access.
        examples = tfds.as_numpy(tfds.load(name, split=split, data_dir=data_dir))
    else:
      examples = tfds.as_numpy(tfds.load(name, split=split, data_dir=data_dir))
  except Exception as e:  # pylint: disable=broad-except
    reason = (str(e).strip().splitlines() or [''])[0][:200]
    raise UserError(
        f'tfds dataset {name!r} split {split!r} is not prepared in '
        f'{data_dir or "the default data_dir"} and could not be downloaded '
        f'({type(e).__name__}: {reason}); prepare it with `tfds build`, or use '
        "data.source='text' with local files") from e
  pairs = [(_text(ex[cfg.src_lang]), _text(ex[cfg.tgt_lang])) for ex in examples]
  kept = [(s, t) for s, t in pairs if s and t]
  logging.info('tfds split %r: %d pairs, %d skipped with an empty side',
               split, len(kept), len(pairs) - len(kept))
  return [s for s, _ in kept], [t for _, t in kept]


def _text(value: Any) -> str:
  return (value.decode('utf-8') if isinstance(value, bytes) else str(value)).strip()


# Vocabulary and tokenized, cached splits.


def get_tokenizer(cfg: ml_collections.ConfigDict, workdir: str, is_primary: bool = True,
                  timeout_s: float = 3600.0) -> tokenizer_lib.Tokenizer:
  """Loads `<workdir>/spm.model`, training it on the train split first if needed.

  Args:
    cfg: The `config.data` group.
    workdir: The experiment directory, shared by all processes.
    is_primary: Only the primary process trains; the others wait for the file.
    timeout_s: How long a non-primary process waits.
  """
  path = os.path.join(workdir, 'spm.model')
  if not os.path.exists(path):
    if is_primary:
      os.makedirs(workdir, exist_ok=True)
      src, tgt = read_split(cfg, cfg.train_split)
      start = time.time()
      tokenizer_lib.train_tokenizer(src + tgt, cfg.vocab_size, path,
                                    cfg.spm_max_sentences, SPM_SEED)
      logging.info('trained %s (vocab %d) in %.1fs',
                   path, cfg.vocab_size, time.time() - start)
    else:
      deadline = time.time() + timeout_s
      while not os.path.exists(path):
        if time.time() > deadline:
          raise TimeoutError(
              f'waited {timeout_s:.0f}s for the primary process to write {path}')
        time.sleep(0.2)
  return tokenizer_lib.Tokenizer(path)


@dataclasses.dataclass(frozen=True, eq=False)
class Examples:
  """Tokenized pairs as flat int32 arrays; pair i is tokens[offsets[i]:offsets[i+1]]."""

  src_tokens: np.ndarray
  src_offsets: np.ndarray
  tgt_tokens: np.ndarray
  tgt_offsets: np.ndarray
  num_truncated: int = 0  # Pairs with a side cut to the maximum length.

  def __len__(self) -> int:
    return len(self.src_offsets) - 1

  def src(self, i: int) -> np.ndarray:
    """Returns the ids of source i, EOS included."""
    return self.src_tokens[self.src_offsets[i]:self.src_offsets[i + 1]]

  def tgt(self, i: int) -> np.ndarray:
    """Returns the ids of target i, EOS included."""
    return self.tgt_tokens[self.tgt_offsets[i]:self.tgt_offsets[i + 1]]

  def max_lengths(self) -> tuple[int, int]:
    """Returns the longest source and target, in tokens."""
    return _longest(self.src_offsets), _longest(self.tgt_offsets)


def _longest(offsets: np.ndarray) -> int:
  return int(np.diff(offsets).max(initial=0))


def _encode(tokenizer: tokenizer_lib.Tokenizer, texts: Sequence[str],
            max_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Returns flat ids plus EOS, cut to `max_len`; their lengths; which were cut."""
  ids = tokenizer.encode_batch(texts)
  cut = np.array([len(x) >= max_len for x in ids], bool)
  ids = [x[:max_len - 1] + [tokenizer_lib.EOS_ID] for x in ids]
  lengths = np.array([len(x) for x in ids], np.int64)
  tokens = np.fromiter(itertools.chain.from_iterable(ids), np.int32, int(lengths.sum()))
  return tokens, lengths, cut


def tokenize_split(cfg: ml_collections.ConfigDict, split: str,
                   tokenizer: tokenizer_lib.Tokenizer, workdir: str) -> Examples:
  """Returns `split` tokenized with EOS, from `<workdir>/data/` if cached there."""
  max_len = cfg.max_len if split == cfg.train_split else cfg.max_eval_len
  key = {k: cfg[k] for k in _SOURCE_KEYS}
  key.update(split=split, max_len=max_len, vocab=tokenizer.fingerprint,
             version=_CACHE_VERSION)
  fingerprint = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
  safe = re.sub(r'[^A-Za-z0-9._-]+', '_', split)[:80]
  path = os.path.join(workdir, 'data', f'{safe}.npz')
  if os.path.exists(path):
    try:
      with np.load(path) as cached:
        if str(cached['fingerprint']) == fingerprint:
          logging.info('read tokenized split %r from %s', split, path)
          return Examples(*(cached[k] for k in _ARRAYS), int(cached['num_truncated']))
      logging.info('%s is stale (config or vocabulary changed); tokenizing again', path)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
      # A cache: what it held is rebuilt from the data and the vocabulary.
      logging.warning('%s cannot be read (%s: %s); tokenizing %r again', path,
                      type(e).__name__, str(e).splitlines()[0] if str(e) else '', split)
  src, tgt = read_split(cfg, split)
  if not src:
    raise UserError(f'split {split!r} has no sentence pairs')
  # Chunks bound the memory taken by Python lists of ids.
  parts = {'src': [], 'tgt': []}
  cut = np.zeros(len(src), bool)
  for start in range(0, len(src), _TOKENIZE_CHUNK):
    chunk = slice(start, start + _TOKENIZE_CHUNK)
    for side, texts in (('src', src), ('tgt', tgt)):
      tokens, lengths, side_cut = _encode(tokenizer, texts[chunk], max_len)
      parts[side].append((tokens, lengths))
      cut[chunk] |= side_cut
  flat = []
  for side in ('src', 'tgt'):
    lengths = np.concatenate([l for _, l in parts[side]])
    flat += [np.concatenate([t for t, _ in parts[side]]),
             np.concatenate([[0], np.cumsum(lengths)])]
  examples = Examples(*flat, num_truncated=int(cut.sum()))
  logging.info('tokenized split %r: %d pairs, %d truncated to %d tokens',
               split, len(examples), examples.num_truncated, max_len)
  with files.atomic_write(path, 'wb') as f:
    np.savez(f, fingerprint=np.array(fingerprint),
             num_truncated=np.array(examples.num_truncated),
             **{k: getattr(examples, k) for k in _ARRAYS})
  return examples


# Batches.


class PackedBatches:
  """An endless, resumable iterator of packed training batches.

  Each epoch visits the pairs in the order `default_rng([seed, epoch])`
  permutes them; process p of P takes every P-th pair of it from the p-th.
  Pairs are packed greedily, in that order, into rows of `max_len` tokens
  (a pair starts a new row unless both its sides fit in the current one), and
  `batch_size // process_count` rows make a batch. The stream runs on across
  epoch boundaries, so a row may hold pairs of two epochs.
  """

  def __init__(self, examples: Examples, batch_size: int, max_len: int, seed: int,
               process_index: int = 0, process_count: int = 1):
    if batch_size % process_count:
      raise ValueError(
          f'batch_size={batch_size} is not divisible by process_count={process_count}')
    if len(examples) < process_count:
      raise ValueError(
          f'{len(examples)} examples cannot be shared by {process_count} processes')
    longest = max(examples.max_lengths())
    if longest > max_len:
      raise ValueError(f'an example has {longest} tokens, more than max_len={max_len}')
    self._examples = examples
    self._rows = batch_size // process_count
    self._max_len = max_len
    self._seed = seed
    self._process_index = process_index
    self._process_count = process_count
    self.set_state({'epoch': 0, 'cursor': 0})

  def epoch_order(self, epoch: int) -> np.ndarray:
    """Returns the indices of this process's pairs in `epoch`, in visiting order."""
    order = np.random.default_rng([self._seed, epoch]).permutation(len(self._examples))
    return order[self._process_index::self._process_count]

  def steps_per_epoch(self) -> int:
    """Batches that epoch 0 fills (packing makes it data-dependent), at least 1."""
    src_len = np.diff(self._examples.src_offsets)
    tgt_len = np.diff(self._examples.tgt_offsets)
    rows, src_fill, tgt_fill = 1, 0, 0
    for i in self.epoch_order(0):
      if self._overflows(src_fill, tgt_fill, src_len[i], tgt_len[i]):
        rows, src_fill, tgt_fill = rows + 1, 0, 0
      src_fill += src_len[i]
      tgt_fill += tgt_len[i]
    return max(1, math.ceil(rows / self._rows))

  def _overflows(self, src_fill: int, tgt_fill: int, src_len: int, tgt_len: int) -> bool:
    """Whether a pair must start a new row: a side would not fit in this one."""
    return src_fill + src_len > self._max_len or tgt_fill + tgt_len > self._max_len

  def get_state(self) -> dict[str, int]:
    """Returns the position after the last batch returned (JSON-able)."""
    return {'epoch': self._epoch, 'cursor': self._cursor}

  def set_state(self, state: dict[str, int]) -> None:
    """Continues from a position given by `get_state`."""
    self._epoch, self._cursor = int(state['epoch']), int(state['cursor'])
    self._order = self.epoch_order(self._epoch)

  def __iter__(self) -> 'PackedBatches':
    return self

  def __next__(self) -> Batch:
    shape = (self._rows, self._max_len)
    batch = {k: np.zeros(shape, np.int32) for k in (
        'inputs', 'targets', 'inputs_segmentation', 'targets_segmentation',
        'inputs_position', 'targets_position')}
    row, segment, src_fill, tgt_fill = 0, 0, 0, 0
    while True:
      i = self._order[self._cursor]
      src, tgt = self._examples.src(i), self._examples.tgt(i)
      if self._overflows(src_fill, tgt_fill, len(src), len(tgt)):
        row += 1
        if row == self._rows:
          return batch
        segment, src_fill, tgt_fill = 0, 0, 0
      segment += 1
      for side, ids, fill in (('inputs', src, src_fill), ('targets', tgt, tgt_fill)):
        span = slice(fill, fill + len(ids))
        batch[side][row, span] = ids
        batch[f'{side}_segmentation'][row, span] = segment
        batch[f'{side}_position'][row, span] = np.arange(len(ids))
      src_fill += len(src)
      tgt_fill += len(tgt)
      self._cursor += 1
      if self._cursor == len(self._order):
        self.set_state({'epoch': self._epoch + 1, 'cursor': 0})


class Prefetch:
  """Prepares up to `size` batches ahead on a daemon thread.

  Call `set_state` on the wrapped iterator before wrapping it, not after.
  """

  def __init__(self, iterator: PackedBatches, size: int = 2):
    self._state = iterator.get_state()
    self._queue = queue.Queue(maxsize=max(size, 1))
    self._stop = threading.Event()
    self.wait_seconds = 0.0  # Time `__next__` spent waiting for the producer.
    self._thread = threading.Thread(target=self._produce, args=(iterator,), daemon=True)
    self._thread.start()

  def _produce(self, iterator: PackedBatches) -> None:
    try:
      while not self._stop.is_set():
        item = (next(iterator), iterator.get_state())
        self._put(item)
    except Exception as e:  # pylint: disable=broad-except
      self._put(e)  # Re-raised by the consumer.

  def _put(self, item: Any) -> None:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return
      except queue.Full:
        pass

  def __iter__(self) -> 'Prefetch':
    return self

  def __next__(self) -> Batch:
    start = time.perf_counter()
    item = self._queue.get()
    self.wait_seconds += time.perf_counter() - start
    if isinstance(item, Exception):
      self._put(item)  # Later calls fail the same way.
      raise item
    batch, self._state = item
    return batch

  def get_state(self) -> dict[str, int]:
    """Returns the wrapped iterator's state after the last batch returned here."""
    return dict(self._state)

  def close(self) -> None:
    """Stops the producer thread."""
    self._stop.set()
    self._thread.join(timeout=1.0)


def bucket_width(length: int) -> int:
  """Padded width for `length` tokens: 8, 16, 32, 64, ... (few shapes to compile)."""
  return max(8, 1 << (max(length, 1) - 1).bit_length())


def eval_batches(examples: Examples, batch_size: int) -> Iterator[Batch]:
  """Yields padded batches of `examples` in order; the last is filled with empty rows.

  Lengths are padded to `bucket_width` to limit recompilation. `num_real`
  (an int, in every batch) counts the rows that hold examples.
  """
  for start in range(0, len(examples), batch_size):
    indices = range(start, min(start + batch_size, len(examples)))
    batch = {'num_real': len(indices)}
    for side, get in (('inputs', examples.src), ('targets', examples.tgt)):
      seqs = [get(i) for i in indices]
      length = bucket_width(max(len(s) for s in seqs))
      batch[side] = np.zeros((batch_size, length), np.int32)
      for row, ids in enumerate(seqs):
        batch[side][row, :len(ids)] = ids
    yield batch
