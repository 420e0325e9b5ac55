"""Model-agnostic greedy and beam search over an incremental decoding callback.

Both searches drive a callback `tokens_to_logits(ids, cache) -> (logits, cache)`
that consumes one token per row and returns logits [rows, V] (any float
dtype; beam search scores in float32). Greedy search also takes a callback
that returns the argmax token ids [rows] (an integer dtype) instead: a model
that computes the argmax without writing its logits
(`Transformer.next_token`). The first input token is 0 (pad, read by the
model as BOS); outputs are padded with 0 after EOS. Everything runs in one
`lax.while_loop`, so both functions are pure and jit-able, and no step waits
on the host.

Beam search may instead be driven by a callback that returns, in place of
the logits, each row's `Candidates`: the log-probabilities and ids of its k
most likely tokens (k >= 2M), and EOS's log-probability. That is all a beam
step reads, so a model can compute it without writing the logits
(`Transformer.candidates`); `candidates` computes it from logits.

Beam search cache contract: the callback sees `batch_size * beam_size` rows,
sentence-major (row = b * beam_size + m). Every cache leaf whose leading axis
has that size is per-beam and is gathered when beams are reordered; any other
leaf (cross-attention K/V of shape [B, S, K, H], a scalar decode index) is
shared and left untouched. A cache laid out otherwise comes with its own
`reorder` function.

Lengths count the EOS token. With `max_lens`, row b emits EOS at step
max_lens[b] - 1 at the latest, so it holds at most max_lens[b] tokens.
`max_len` is a hard cap: a row that reaches it without EOS is truncated.

Letters: B batch (sentences), M beams per sentence, T max_len, V vocab.
"""

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

Cache = Any
TokensToLogits = Callable[[jax.Array, Cache], tuple[Any, Cache]]


def search_name(beam_size: int) -> str:
  """'greedy' for one beam, else 'beam<M>': how results and rows are labelled."""
  return 'greedy' if beam_size == 1 else f'beam{beam_size}'


def length_penalty(length: jax.Array, alpha: float) -> jax.Array:
  """GNMT length penalty ((5 + length) / 6) ** alpha, length counting EOS."""
  return ((5.0 + length) / 6.0) ** alpha


def _forced_eos(step: jax.Array,
               max_lens: jax.Array | None) -> jax.Array | None:
  """Which sentences must emit EOS at this step ([B] bool), or None."""
  return None if max_lens is None else step == max_lens - 1


# ------------------------------------------------------------------- greedy


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GreedyState:
  """The loop state of greedy search."""

  step: jax.Array  # [] int32, index of the token being produced.
  tokens: jax.Array  # [B, T] int32
  finished: jax.Array  # [B] bool, EOS already emitted.
  cache: Cache


def greedy_search(
    tokens_to_logits: TokensToLogits,
    cache: Cache,
    batch_size: int,
    max_len: int,
    eos_id: int,
    max_lens: jax.Array | None = None,
    stop_at_eos: bool = True,
    chunk: int | None = None,
    return_cache: bool = False,
) -> jax.Array | tuple[jax.Array, Cache]:
  """Decodes the argmax token at every step and returns tokens [B, max_len].

  With `chunk`, the steps run as consecutive loops of `chunk` steps and the
  callback is called as `tokens_to_logits(ids, cache, read_len=end)`, `end`
  (static) the end of the current loop: a model may then read its cache only
  up to `end` ('growing' cache) instead of its full length. Same tokens.

  Args:
    tokens_to_logits: callback over `batch_size` rows returning logits or
      argmax ids, see the module doc.
    cache: initial decoding cache.
    batch_size: number of rows B.
    max_len: number of steps at most, T.
    eos_id: end-of-sentence id; every position after it is 0.
    max_lens: optional [B] int32 lengths >= 1 including EOS; row b is forced to
      EOS at step max_lens[b] - 1 (if that is < max_len).
    stop_at_eos: if False, run exactly max_len steps (for timing); only the
      early exit is dropped, the returned tokens are the same.
    chunk: steps per inner loop, each with a static read length; None runs
      one loop and calls `tokens_to_logits(ids, cache)`.
    return_cache: also return the final cache, (tokens, cache): a caller
      that donates the cache (the benchmark) then gets it back in place.
  """

  def cond(end: int, s: GreedyState) -> jax.Array:
    keep_going = s.step < end
    if stop_at_eos:
      keep_going &= ~jnp.all(s.finished)
    return keep_going

  def body(read_len: int | None, s: GreedyState) -> GreedyState:
    ids = jnp.where(s.step == 0, 0, s.tokens[:, jnp.maximum(s.step - 1, 0)])
    if read_len is None:
      out, cache = tokens_to_logits(ids, s.cache)  # [B, V] logits or [B] ids.
    else:
      out, cache = tokens_to_logits(ids, s.cache, read_len=read_len)
    if jnp.issubdtype(out.dtype, jnp.integer):
      next_ids = out.astype(jnp.int32)
    else:
      next_ids = jnp.argmax(out, axis=-1).astype(jnp.int32)  # [B]
    forced = _forced_eos(s.step, max_lens)
    if forced is not None:
      next_ids = jnp.where(forced, eos_id, next_ids)
    next_ids = jnp.where(s.finished, 0, next_ids)
    tokens = s.tokens.at[:, s.step].set(next_ids)  # [B, T]
    finished = s.finished | (next_ids == eos_id)
    return GreedyState(s.step + 1, tokens, finished, cache)

  init = GreedyState(
      step=jnp.zeros((), jnp.int32),
      tokens=jnp.zeros((batch_size, max_len), jnp.int32),
      finished=jnp.zeros((batch_size,), bool),
      cache=cache,
  )
  s = init
  for start in range(0, max_len, chunk or max_len):
    end = min(start + (chunk or max_len), max_len)
    s = jax.lax.while_loop(functools.partial(cond, end),
                           functools.partial(body, end if chunk else None), s)
  return (s.tokens, s.cache) if return_cache else s.tokens


# --------------------------------------------------------------------- beam


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BeamState:
  """The loop state of beam search: alive and finished hypotheses per sentence."""

  step: jax.Array  # [] int32, index of the token being produced.
  alive_seqs: jax.Array  # [B, M, T] int32, no EOS inside.
  alive_logp: jax.Array  # [B, M] float32, raw log-probabilities.
  finished_seqs: jax.Array  # [B, M, T] int32, ending in EOS.
  finished_scores: jax.Array  # [B, M] float32, length-penalised; -inf = empty.
  cache: Cache
  # Second buffers of the per-beam cache leaves (`_reordered_leaves`), which
  # a loop of two steps reorders into and back; () otherwise.
  spare: tuple[jax.Array, ...] = ()


def _gather_beams(x: jax.Array, idx: jax.Array) -> jax.Array:
  """Picks beams: x [B, M_in, ...] and idx [B, M_out] -> [B, M_out, ...]."""
  idx = idx.reshape(idx.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, idx, axis=1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Candidates:
  """A decoding step's k most likely next tokens per row, best first."""

  logp: jax.Array  # [rows, k] float32 log-probabilities (-inf: no token).
  ids: jax.Array  # [rows, k] int32.
  eos_logp: jax.Array  # [rows] float32, EOS's log-probability.


_CHUNK = 128  # Width of `top_k_by_chunks`' vocabulary chunks.


def top_k_by_chunks(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """`lax.top_k` of x [rows, V] (any float dtype): float32 values and ids,
  ties to the lower id, with neither a float32 copy of x nor a sort of its rows.

  jax 0.11's XLA sorts each whole row for a bfloat16 top-k (a float32 one
  runs its top-k kernel), and casting the logits would write and read back
  a float32 copy. Here a reduction finds the maxima of 128-wide chunks; the
  k largest values lie in the k chunks with the largest maxima, whose top-k,
  taken in vocabulary order, is x's.
  """
  rows, v = x.shape
  n = -(-v // _CHUNK)
  if n <= k:
    return jax.lax.top_k(x.astype(jnp.float32), k)
  x = jnp.pad(x, ((0, 0), (0, n * _CHUNK - v)), constant_values=-jnp.inf)
  x = x.reshape(rows, n, _CHUNK)
  _, chunks = jax.lax.top_k(x.max(axis=-1).astype(jnp.float32), k)
  chunks = jnp.sort(chunks, axis=-1)  # [rows, k]
  part = jnp.take_along_axis(x, chunks[:, :, None], axis=1)  # [rows, k, chunk]
  values, at = jax.lax.top_k(part.reshape(rows, -1).astype(jnp.float32), k)
  ids = (jnp.take_along_axis(chunks, at // _CHUNK, axis=1) * _CHUNK
         + at % _CHUNK)
  return values, ids


def candidates(logits: jax.Array, k: int, eos_id: int) -> Candidates:
  """The `Candidates` of logits [rows, V] (any float dtype): the top-k runs
  on the logits themselves (the log-softmax keeps their order), and only
  the k chosen get float32 log-probabilities, so no [rows, V] float32 array
  is written or read. EOS's log-probability is only computed where read.
  With V < k, the last k - V are -inf (id 0)."""
  x = logits.astype(jnp.float32)
  x_max = jnp.max(x, axis=-1, keepdims=True)  # As jax.nn.log_softmax computes.
  log_z = jnp.log(jnp.sum(jnp.exp(x - x_max), axis=-1, keepdims=True))
  log_softmax = lambda y: (y - x_max) - log_z
  best, ids = top_k_by_chunks(logits, min(k, logits.shape[-1]))
  logp = log_softmax(best)
  if k > logits.shape[-1]:
    pad = ((0, 0), (0, k - logits.shape[-1]))
    logp, ids = jnp.pad(logp, pad, constant_values=-jnp.inf), jnp.pad(ids, pad)
  return Candidates(logp, ids, log_softmax(x[:, eos_id, None])[:, 0])


def _top_extensions(c: Candidates, alive_logp: jax.Array, k: int,
                    forced: jax.Array | None, eos_id: int
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The k best one-token extensions of all beams: their log-probabilities
  (alive log-prob plus the token's), beams and tokens, [B, k] each, best first.

  `c`: each beam's candidates, rows [B*M]; `forced` [B] (or None): only EOS
  may extend those sentences, with its model log-probability. The k best of
  all M*V extensions are among each beam's own k best (an extension outside
  them has k better ones in its beam): the same extensions, in the same
  order, as a top-k over all M*V sums, up to which of two sums that round
  to one float32 comes first.
  """
  batch, beams = alive_logp.shape
  logp = c.logp.reshape(batch, beams, -1)  # [B, M, k']
  tok = c.ids.reshape(batch, beams, -1)
  if forced is not None:
    only_eos = jnp.where(jnp.arange(logp.shape[-1]) == 0,
                         c.eos_logp.reshape(batch, beams, 1), -jnp.inf)
    logp = jnp.where(forced[:, None, None], only_eos, logp)
    tok = jnp.where(forced[:, None, None], eos_id, tok)
  cand = alive_logp[:, :, None] + logp
  top_logp, top_idx = jax.lax.top_k(cand.reshape(batch, -1), k)  # [B, k]
  per_beam = logp.shape[-1]
  top_tok = jnp.take_along_axis(tok.reshape(batch, -1), top_idx, axis=1)
  return top_logp, top_idx // per_beam, top_tok


def gather_rows(cache: Cache, rows: jax.Array, upto: int | None = None) -> Cache:
  """The default beam reorder: per-beam leaves (leading axis B*M) take rows.

  Row i becomes old row rows[i]; other leaves are shared and left alone.
  `upto` (positions written so far, at most) is ignored: this contract does
  not say which axis holds positions.
  """
  del upto
  def gather(x):
    per_beam = x.ndim > 0 and x.shape[0] == rows.shape[0]
    return x[rows] if per_beam else x

  return jax.tree.map(gather, cache)


def steps_per_loop(beam_size: int, chunk: int | None) -> int:
  """Decode steps per iteration of `beam_search`'s (or greedy's) loop."""
  return 2 if beam_size > 1 and chunk is None else 1


def _reordered_leaves(reorder: Callable[..., Cache], cache: Cache,
                      rows: int) -> list[bool]:
  """Which leaves of `cache` `reorder` replaces (the per-beam ones), found by
  tracing it once: a leaf it leaves alone comes back as the same object."""
  found = []

  def probe(c):
    out = reorder(c, jnp.zeros((rows,), jnp.int32))
    found.extend(o is not i for o, i in zip(jax.tree.leaves(out), jax.tree.leaves(c)))
    return out

  jax.eval_shape(probe, cache)
  return found


def beam_search(
    tokens_to_logits: TokensToLogits,
    cache: Cache,
    batch_size: int,
    beam_size: int,
    max_len: int,
    eos_id: int,
    alpha: float = 0.6,
    max_lens: jax.Array | None = None,
    stop_at_eos: bool = True,
    reorder: Callable[..., Cache] = gather_rows,
    chunk: int | None = None,
    return_cache: bool = False,
) -> tuple[jax.Array, jax.Array] | tuple[jax.Array, jax.Array, Cache]:
  """Beam search returning (sequences [B, M, T], scores [B, M]), best first.

  A finished hypothesis of n tokens (EOS included) with log-probability l
  scores l / length_penalty(n, alpha). Each step takes the top 2M of the M*V
  extensions, so that the best M non-EOS ones stay alive; every EOS extension
  among those 2M competes with the finished set for its M places (the
  finishing rule of tensor2tensor and the Flax WMT example). So beam_size=1
  need not equal greedy search: an EOS that was second best may finish and
  win (where greedy ends in EOS, beam 1 never scores below it).

  A sentence is done when its worst finished score (-inf while fewer than M
  have finished) is >= its best alive log-prob divided by the largest penalty
  it can still reach: log-probs only fall and, for alpha >= 0, the penalty
  only grows with length, so stopping then never changes the result. A
  sentence without any finished hypothesis returns its alive beams, scored
  with length max_len. Slots that no hypothesis reached score -inf and hold
  only pad.

  Args:
    tokens_to_logits: callback over batch_size * beam_size rows returning
      logits [rows, V] or `Candidates` (at least 2 * beam_size a row); see
      the module doc for the cache contract.
    cache: initial cache, per-beam leaves already expanded to B*M rows.
    batch_size: number of sentences B.
    beam_size: number of beams M.
    max_len: number of steps at most, T.
    eos_id: end-of-sentence id; positions after it are 0.
    alpha: length penalty exponent, >= 0.
    max_lens: optional [B] int32 lengths >= 1 including EOS; at step
      max_lens[b] - 1 only EOS may be chosen, with its model log-probability.
    stop_at_eos: if False, run exactly max_len steps (for timing); the result
      is the same.
    reorder: `reorder(cache, rows)` moves each per-beam row to where rows
      [B*M] (new row -> old row) says; a model whose cache does not keep the
      module doc's contract passes its own (`Transformer.reorder_cache`).
    chunk: as in `greedy_search`: the steps run as loops of `chunk` steps,
      calling `tokens_to_logits(ids, cache, read_len=end)` and
      `reorder(cache, rows, upto=end)` with `end` (static) the end of the
      loop, so that a model may read and reorder only the cache positions
      written so far. Same result.
    return_cache: also return the final cache, (sequences, scores, cache).

  With more than one beam and no `chunk`, the loop runs two steps per
  iteration over two buffers of every per-beam cache leaf: the first
  step's reorder writes into the second buffer and the second's back into
  the first, so that no reordered leaf is copied back into the loop's own
  buffer (a gather cannot write over what it reads). The per-beam cache
  takes twice its memory; an odd step count runs its first step before the
  loop. The result is the same: a second step after the search is done
  changes nothing (see above), and no step runs past max_len.
  """
  if max_lens is None:
    reachable_len = jnp.full((batch_size,), max_len, jnp.int32)
  else:
    reachable_len = jnp.minimum(max_lens, max_len)
  best_penalty = length_penalty(reachable_len.astype(jnp.float32), alpha)  # [B]

  def cond(end: int, s: BeamState) -> jax.Array:
    keep_going = s.step < end
    if stop_at_eos:
      best_alive = s.alive_logp[:, 0] / best_penalty  # [B]
      worst_finished = s.finished_scores[:, -1]  # [B]
      keep_going &= ~jnp.all(worst_finished >= best_alive)
    return keep_going

  def body(read_len: int | None, s: BeamState) -> BeamState:
    s, rows = advance(read_len, s)
    if rows is not None:
      s = dataclasses.replace(s, cache=reorder(
          s.cache, rows, **({} if read_len is None else {'upto': read_len})))
    return s

  def pair(s: BeamState) -> BeamState:  # Two steps, reordering A -> B -> A.
    s, rows = advance(None, s)
    s, rows = advance(None, dataclasses.replace(s, cache=reorder(s.cache, rows)))
    spare = tuple(x for x, m in zip(jax.tree.leaves(s.cache), moved) if m)
    return dataclasses.replace(s, cache=reorder(s.cache, rows), spare=spare)

  def advance(read_len: int | None, s: BeamState
              ) -> tuple[BeamState, jax.Array | None]:
    """One step but the reorder: the new state (cache as the model left it)
    and the rows [B*M] the cache must take (None with one beam)."""
    last = s.alive_seqs[:, :, jnp.maximum(s.step - 1, 0)]
    ids = jnp.where(s.step == 0, 0, last)  # [B, M]
    bound = {} if read_len is None else {'read_len': read_len}
    out, cache = tokens_to_logits(ids.reshape(-1), s.cache, **bound)
    if not isinstance(out, Candidates):  # Logits [B*M, V].
      out = candidates(out, 2 * beam_size, eos_id)
    if out.logp.shape[-1] < 2 * beam_size:
      raise ValueError(f'beam search at {beam_size} beams needs '
                       f'{2 * beam_size} candidates a row, got {out.logp.shape[-1]}')
    # The updated cache, as it is, is what the reorder reads: without the
    # barrier XLA may fuse a layer's cache update into the reorder's gather,
    # which then needs the cache from before the update, copied.
    cache = jax.lax.optimization_barrier(cache)
    top_logp, top_beam, top_tok = _top_extensions(
        out, s.alive_logp, 2 * beam_size,
        _forced_eos(s.step, max_lens), eos_id)  # [B, 2M] each
    top_seqs = _gather_beams(s.alive_seqs, top_beam)
    top_seqs = top_seqs.at[:, :, s.step].set(top_tok)  # --> [B, 2M, T]
    is_eos = top_tok == eos_id  # [B, 2M]

    # The best M non-EOS extensions stay alive; the cache follows them.
    alive_logp, keep = jax.lax.top_k(jnp.where(is_eos, -jnp.inf, top_logp),
                                     beam_size)  # [B, M]
    alive_seqs = _gather_beams(top_seqs, keep)  # --> [B, M, T]
    rows = None
    if beam_size > 1:  # With one beam the gather is the identity.
      parent = _gather_beams(top_beam, keep)  # [B, M]
      rows = (jnp.arange(batch_size)[:, None] * beam_size + parent).reshape(-1)

    # EOS extensions within the top 2M join the finished set, which keeps M.
    penalty = length_penalty((s.step + 1).astype(jnp.float32), alpha)
    new_scores = jnp.where(is_eos, top_logp / penalty, -jnp.inf)  # [B, 2M]
    all_scores = jnp.concatenate([s.finished_scores, new_scores], axis=1)
    all_seqs = jnp.concatenate([s.finished_seqs, top_seqs], axis=1)
    finished_scores, keep = jax.lax.top_k(all_scores, beam_size)  # [B, M]
    finished_seqs = _gather_beams(all_seqs, keep)  # --> [B, M, T]

    return BeamState(s.step + 1, alive_seqs, alive_logp, finished_seqs,
                     finished_scores, cache, s.spare), rows

  # Only beam 0 is live at first, so the M identical beams don't repeat.
  alive_logp = jnp.full((batch_size, beam_size), -jnp.inf, jnp.float32)
  init = BeamState(
      step=jnp.zeros((), jnp.int32),
      alive_seqs=jnp.zeros((batch_size, beam_size, max_len), jnp.int32),
      alive_logp=alive_logp.at[:, 0].set(0.0),
      finished_seqs=jnp.zeros((batch_size, beam_size, max_len), jnp.int32),
      finished_scores=jnp.full((batch_size, beam_size), -jnp.inf, jnp.float32),
      cache=cache,
  )
  s = init
  if steps_per_loop(beam_size, chunk) == 2:
    moved = _reordered_leaves(reorder, cache, batch_size * beam_size)
    if max_len % 2:
      s = body(None, s)  # Step 0 always runs: no sentence is done before it.
    spare = tuple(jnp.zeros_like(x) for x, m in zip(jax.tree.leaves(cache), moved) if m)
    s = jax.lax.while_loop(lambda s: cond(max_len - 1, s), pair,
                           dataclasses.replace(s, spare=spare))
    s = dataclasses.replace(s, spare=())
  else:
    for start in range(0, max_len, chunk or max_len):
      end = min(start + (chunk or max_len), max_len)
      s = jax.lax.while_loop(functools.partial(cond, end),
                             functools.partial(body, end if chunk else None), s)

  any_finished = s.finished_scores[:, 0] > -jnp.inf  # [B]
  alive_scores = s.alive_logp / length_penalty(jnp.float32(max_len), alpha)
  seqs = jnp.where(any_finished[:, None, None], s.finished_seqs, s.alive_seqs)
  scores = jnp.where(any_finished[:, None], s.finished_scores, alive_scores)
  seqs = jnp.where((scores > -jnp.inf)[:, :, None], seqs, 0)
  return (seqs, scores, s.cache) if return_cache else (seqs, scores)
