"""A joint sentencepiece vocabulary: pad 0, EOS 1, unk 2, no BOS."""

from collections.abc import Iterable, Sequence
import hashlib
import io
import re

import numpy as np
import sentencepiece as spm

from mqa_flax import files
from mqa_flax.errors import UserError

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2


class Tokenizer:
  """Encodes text to ids and back with a trained sentencepiece model."""

  def __init__(self, model_path: str):
    with open(model_path, 'rb') as f:
      self._proto = f.read()
    try:
      self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
    except (RuntimeError, OSError) as e:
      first = (str(e).strip().splitlines() or [type(e).__name__])[0]
      raise UserError(f'{model_path} ({len(self._proto)} bytes) is not a readable '
                      f'sentencepiece model ({first}): put back the spm.model the '
                      'run was trained with') from None
    ids = (self._sp.pad_id(), self._sp.eos_id(), self._sp.unk_id(), self._sp.bos_id())
    if ids != (PAD_ID, EOS_ID, UNK_ID, -1):
      raise ValueError(f'{model_path}: (pad, eos, unk, bos) ids are {ids}, '
                       f'expected {(PAD_ID, EOS_ID, UNK_ID, -1)}')

  @property
  def vocab_size(self) -> int:
    """The number of ids, which the embedding table must match."""
    return self._sp.get_piece_size()

  @property
  def eos_id(self) -> int:
    """The end-of-sentence id, 1."""
    return EOS_ID

  @property
  def fingerprint(self) -> str:
    """A short hash of the model file, to key caches of tokenized data."""
    return hashlib.sha256(self._proto).hexdigest()[:16]

  def encode(self, text: str) -> list[int]:
    """Returns the ids of `text`, without EOS."""
    return self._sp.encode(text)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """Returns the ids of each text, without EOS."""
    return self._sp.encode(list(texts))

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Returns the text of `ids` up to the first EOS, ignoring padding."""
    ids = [int(i) for i in ids]
    if EOS_ID in ids:
      ids = ids[:ids.index(EOS_ID)]
    return self._sp.decode([i for i in ids if i != PAD_ID])


def train_tokenizer(texts: Iterable[str], vocab_size: int, model_path: str,
                    max_sentences: int, seed: int = 0) -> Tokenizer:
  """Trains a unigram model of exactly `vocab_size` pieces and saves it.

  At most `max_sentences` texts are used, a random subset drawn with `seed`
  here: sentencepiece's own sampling gives another vocabulary in every
  process, whatever its seed.
  """
  texts = list(texts)
  if len(texts) > max_sentences:
    keep = np.random.default_rng(seed).choice(len(texts), max_sentences, replace=False)
    texts = [texts[i] for i in np.sort(keep)]
  model = io.BytesIO()
  spm.set_random_generator_seed(seed)
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model,
        vocab_size=vocab_size, model_type='unigram', character_coverage=1.0,
        input_sentence_size=0, shuffle_input_sentence=False,
        # Identity normalization and kept whitespace make decode(encode(x)) == x.
        normalization_rule_name='identity', remove_extra_whitespaces=False,
        pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
        minloglevel=2)
  except RuntimeError as e:
    raise _vocab_error(e, vocab_size) from e
  with files.atomic_write(model_path, 'wb') as f:  # Never seen half-written.
    f.write(model.getvalue())
  return Tokenizer(model_path)


def _vocab_error(e: RuntimeError, vocab_size: int) -> Exception:
  """Turns sentencepiece's complaint about the vocabulary size into one line."""
  message = str(e)
  too_high = re.search(r'Vocabulary size (?:is )?too high.*?<=\s*(\d+)', message)
  if too_high:
    return UserError(f'vocab_size={vocab_size} is more than the training text '
                      f'supports (max {too_high.group(1)}); lower data.vocab_size')
  too_small = re.search(r'smaller than required_chars\. (\d+) vs (\d+)', message)
  if too_small:
    return UserError(f'vocab_size={vocab_size} is less than the {too_small.group(2)} '
                      'characters and special ids of the training text; '
                      'raise data.vocab_size')
  last_line = message.strip().splitlines()[-1]
  return RuntimeError(f'sentencepiece training failed: {last_line}')
