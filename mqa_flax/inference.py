"""Translating sentences with a model: batching, jitted search, detokenising."""

import functools
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from tqdm import tqdm

from mqa_flax import data
from mqa_flax import decoding
from mqa_flax import errors
from mqa_flax.tokenizer import Tokenizer


def max_decode_len(src_len: int, a: float, b: int, model_max_len: int) -> int:
  """Longest output allowed for a source of `src_len` tokens (incl. EOS)."""
  return max(1, min(int(a * src_len + b), model_max_len))


@functools.partial(jax.jit, static_argnames=(
    'graphdef', 'beam_size', 'alpha', 'eos_id', 'max_len_a', 'max_len_b'))
def search(graphdef: nnx.GraphDef, state: nnx.State, inputs_BS: jax.Array, *,
           beam_size: int, alpha: float, eos_id: int, max_len_a: float,
           max_len_b: int) -> jax.Array:
  """Encodes `inputs` once and decodes greedily (beam 1) or with beams: [B, T]."""
  model = nnx.merge(graphdef, state)
  batch, src_len = inputs_BS.shape
  max_len = max_decode_len(src_len, max_len_a, max_len_b, model.cfg.max_len)
  lengths = (inputs_BS != 0).sum(-1)
  max_lens = jnp.clip((max_len_a * lengths + max_len_b).astype(jnp.int32), 1,
                      max_len)
  cache = model.init_cache(model.encode(inputs_BS), inputs_BS, max_len,
                           beam_size)

  weights = model.decode_weights()

  # Padding (id 0) is never a prediction.
  if beam_size == 1:
    return decoding.greedy_search(
        functools.partial(model.next_token, min_id=1, weights=weights), cache,
        batch, max_len, eos_id, max_lens)
  step = functools.partial(model.candidates, k=2 * beam_size, eos_id=eos_id,
                           min_id=1, weights=weights)
  seqs, _ = decoding.beam_search(step, cache, batch, beam_size, max_len, eos_id,
                                 alpha, max_lens, reorder=model.reorder_cache)
  return seqs[:, 0]


def encode_sources(tokenizer: Tokenizer, sentences: Sequence[str], max_len: int,
                   overlong: str, line_numbers: Sequence[int] | None = None
                   ) -> tuple[list[list[int]], int]:
  """Token ids (with EOS) per sentence, truncated to max_len; also the count cut."""
  if overlong not in ('truncate', 'error'):
    raise ValueError(f"decode.overlong={overlong!r}; expected 'truncate' or 'error'")
  ids, cut = [], 0
  for i, s in enumerate(sentences):
    x = tokenizer.encode(s) + [tokenizer.eos_id]
    if len(x) > max_len:
      if overlong == 'error':
        line = i + 1 if line_numbers is None else line_numbers[i]
        raise ValueError(f'input line {line} has {len(x)} tokens, more than '
                         f'max_eval_len={max_len} (or set decode.overlong=truncate)')
      x, cut = x[:max_len - 1] + [tokenizer.eos_id], cut + 1
    ids.append(x)
  return ids, cut


def translate(graphdef: nnx.GraphDef, state: nnx.State, tokenizer: Tokenizer,
              sentences: Sequence[str], *, batch_size: int, beam_size: int,
              alpha: float, max_len_a: float, max_len_b: int,
              max_src_len: int, overlong: str = 'truncate',
              progress: bool = False) -> list[str]:
  """Translates sentences in batches of similar length; empty lines stay empty.

  Inside `errors.stop_between_steps`, a signal stops it between batches
  (`errors.Stopped`).
  """
  if max_len_a < 0 or max_len_b < 1:
    raise ValueError(
        f'decode.max_len_a={max_len_a}, decode.max_len_b={max_len_b}: the output '
        'must allow at least one token (EOS), so max_len_a >= 0 and max_len_b >= 1')
  nonempty = [i for i, s in enumerate(sentences) if s.strip()]
  ids, cut = encode_sources(tokenizer, [sentences[i] for i in nonempty],
                            max_src_len, overlong, [i + 1 for i in nonempty])
  if cut:
    logging.warning('%d of %d inputs were longer than %d tokens and truncated',
                    cut, len(ids), max_src_len)
  order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
  out = [''] * len(sentences)
  run: Callable = functools.partial(
      search, graphdef, beam_size=beam_size, alpha=alpha,
      eos_id=tokenizer.eos_id, max_len_a=max_len_a, max_len_b=max_len_b)
  starts = range(0, len(order), batch_size)
  start_time = time.time()
  for start in tqdm(starts, desc='translating', disable=not progress):
    errors.check_stop()  # Between batches, never inside a device computation.
    chunk = order[start:start + batch_size]
    width = data.bucket_width(max(len(ids[i]) for i in chunk))
    inputs = np.zeros((batch_size, width), np.int32)
    for row, i in enumerate(chunk):
      inputs[row, :len(ids[i])] = ids[i]
    tokens = np.asarray(run(state, inputs))
    for row, i in enumerate(chunk):
      out[nonempty[i]] = tokenizer.decode(tokens[row])
  logging.info('translated %d sentences in %.1fs', len(ids), time.time() - start_time)
  return out

