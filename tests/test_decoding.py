"""Greedy and beam search against a tiny recurrent toy model and brute force."""

import functools
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mqa_flax import decoding

PAD, EOS, V, D = 0, 1, 4, 8  # Real tokens are 2 and 3.


RECORD = []  # (step, ids, hist, ctx) of every recorded toy-model step.


def _record(*arrays):
  RECORD.append(tuple(np.asarray(a) for a in arrays))


def make_params(seed: int = 0, eos_bias: float = 0.0) -> dict:
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
  return dict(
      embed=jax.random.normal(k1, (V, D)),
      w=jax.random.normal(k2, (D, D)) / np.sqrt(D),
      out=2.0 * jax.random.normal(k3, (D, V)),
      eos_bias=jnp.float32(eos_bias),
  )


def toy_model(params, ids, cache, record=False):
  """A recurrent toy `tokens_to_logits` with per-beam, shared and scalar leaves.

  Cache: `h` [rows, D] hidden state and `hist` [rows, T] input history (both
  per-beam), `ctx` [B, D] shared by the rows of a sentence, `step` [] int32.
  """
  rows, batch = ids.shape[0], cache["ctx"].shape[0]
  h = cache["h"] @ params["w"] + params["embed"][ids]  # [rows, D]
  h = h.reshape(batch, rows // batch, D) + cache["ctx"][:, None, :]
  h = jnp.tanh(h).reshape(rows, D)
  logits = (h @ params["out"]).at[:, PAD].set(-1e4)
  logits = logits.at[:, EOS].add(params["eos_bias"])
  hist = cache["hist"].at[:, cache["step"]].set(ids)
  if record:
    jax.debug.callback(_record, cache["step"], ids, hist, cache["ctx"])
  return logits, dict(h=h, hist=hist, ctx=cache["ctx"], step=cache["step"] + 1)


def make_ctx(batch: int, seed: int = 1) -> jax.Array:
  return jax.random.normal(jax.random.PRNGKey(seed), (batch, D))


def init_cache(ctx: jax.Array, rows_per_sentence: int, max_len: int):
  batch = ctx.shape[0]
  rows = batch * rows_per_sentence
  return dict(
      h=jnp.zeros((rows, D)),
      hist=jnp.zeros((rows, max_len), jnp.int32),
      ctx=ctx,
      step=jnp.zeros((), jnp.int32),
  )


@functools.partial(jax.jit,
                   static_argnames=("max_len", "stop_at_eos", "record"))
def _greedy(params, ctx, max_lens, *, max_len, stop_at_eos, record):
  model = functools.partial(toy_model, params, record=record)
  return decoding.greedy_search(model, init_cache(ctx, 1, max_len),
                                ctx.shape[0], max_len, EOS, max_lens=max_lens,
                                stop_at_eos=stop_at_eos)


@functools.partial(jax.jit, static_argnames=("beam_size", "max_len", "alpha",
                                             "stop_at_eos", "record"))
def _beam(params, ctx, max_lens, *, beam_size, max_len, alpha, stop_at_eos,
          record):
  model = functools.partial(toy_model, params, record=record)
  return decoding.beam_search(model, init_cache(ctx, beam_size, max_len),
                              ctx.shape[0], beam_size, max_len, EOS,
                              alpha=alpha, max_lens=max_lens,
                              stop_at_eos=stop_at_eos)


def greedy(params, ctx, max_len, max_lens=None, stop_at_eos=True,
           record=False):
  tokens = _greedy(params, ctx, max_lens, max_len=max_len,
                   stop_at_eos=stop_at_eos, record=record)
  chex.assert_shape(tokens, (ctx.shape[0], max_len))
  return np.asarray(tokens)


def beam(params, ctx, beam_size, max_len, alpha=0.6, max_lens=None,
         stop_at_eos=True, record=False):
  seqs, scores = _beam(params, ctx, max_lens, beam_size=beam_size,
                       max_len=max_len, alpha=alpha, stop_at_eos=stop_at_eos,
                       record=record)
  chex.assert_shape(seqs, (ctx.shape[0], beam_size, max_len))
  chex.assert_shape(scores, (ctx.shape[0], beam_size))
  return np.asarray(seqs), np.asarray(scores)


_step = jax.jit(toy_model)


def teacher_forced_logp(params, ctx, seqs):
  """Log-probability of every token of seqs [B, N, T] --> [B, N, T]."""
  batch, n, max_len = seqs.shape
  cache = init_cache(ctx, n, max_len)
  inputs = np.concatenate([np.zeros((batch, n, 1), np.int32), seqs[..., :-1]],
                          axis=-1)
  out = []
  for t in range(max_len):
    logits, cache = _step(params, jnp.asarray(inputs[:, :, t].reshape(-1)),
                          cache)
    logp = np.asarray(jax.nn.log_softmax(logits)).reshape(batch, n, V)
    out.append(np.take_along_axis(logp, seqs[:, :, t, None], axis=-1)[..., 0])
  return np.stack(out, axis=-1)


def length_of(seq) -> int:
  """Tokens up to and including the first EOS (all of them if none)."""
  eos = np.flatnonzero(seq == EOS)
  return int(eos[0]) + 1 if eos.size else len(seq)


def penalised(logp, n, alpha):
  return logp[:n].sum() / ((5.0 + n) / 6.0) ** alpha


def check_eos_padding(seqs):
  """Every position after the first EOS is pad."""
  for seq in seqs.reshape(-1, seqs.shape[-1]):
    assert np.all(seq[length_of(seq):] == PAD), seq


def brute_force(params, ctx, max_len, alpha, max_lens):
  """Every EOS-terminated sequence and its score, best first, per sentence."""
  batch = ctx.shape[0]
  all_seqs = np.array(list(itertools.product(range(V), repeat=max_len)),
                      np.int32)  # [N, T]
  all_seqs = np.broadcast_to(all_seqs, (batch,) + all_seqs.shape)
  logp = teacher_forced_logp(params, ctx, np.ascontiguousarray(all_seqs))
  results = []
  for b in range(batch):
    found = {}
    for seq, lp in zip(all_seqs[b], logp[b]):
      n = length_of(seq)
      if seq[n - 1] == EOS and n <= max_lens[b]:
        found[tuple(seq[:n])] = penalised(lp, n, alpha)
    results.append(sorted(found.items(), key=lambda kv: -kv[1]))
  return results


def test_greedy_matches_stepwise_argmax():
  params, ctx, max_len = make_params(3, eos_bias=1.0), make_ctx(4), 6
  max_lens = np.array([2, 6, 4, 99], np.int32)
  tokens = greedy(params, ctx, max_len, max_lens=jnp.asarray(max_lens))
  # Step the model by hand, one argmax at a time.
  cache, ids = init_cache(ctx, 1, max_len), jnp.zeros((4,), jnp.int32)
  expected = np.zeros((4, max_len), np.int32)
  done = np.zeros(4, bool)
  for t in range(max_len):
    logits, cache = _step(params, ids, cache)
    nxt = np.where(t == max_lens - 1, EOS, np.asarray(logits).argmax(-1))
    nxt = np.where(done, PAD, nxt)
    expected[:, t], done = nxt, done | (nxt == EOS)
    ids = jnp.asarray(nxt, jnp.int32)
  np.testing.assert_array_equal(tokens, expected)
  check_eos_padding(tokens)
  assert tokens.dtype == np.int32


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beam1_never_scores_below_greedy(seed):
  # Beam 1 need not equal greedy: an EOS ranked second may finish and win.
  params, ctx, max_len = make_params(seed, eos_bias=0.5), make_ctx(4, seed), 6
  max_lens = jnp.array([3, 1, 4, 50], jnp.int32)
  for lens, alpha in ((None, 0.0), (max_lens, 0.0), (max_lens, 0.6)):
    tokens = greedy(params, ctx, max_len, max_lens=lens)
    logp = teacher_forced_logp(params, ctx, tokens[:, None])[:, 0]
    _, scores = beam(params, ctx, 1, max_len, alpha=alpha, max_lens=lens)
    for b in range(4):
      n = length_of(tokens[b])
      if tokens[b, n - 1] == EOS:  # Greedy finished: beam 1 found it too.
        assert scores[b, 0] >= penalised(logp[b], n, alpha) - 1e-5


def _markov_step(logp_table, ids, cache):
  """A Markov model: next-token log-probs depend on the last token only."""
  rows = ids.shape[0]
  batch = logp_table.shape[0]
  sentence = jnp.arange(rows) // (rows // batch)
  return logp_table[sentence, ids], cache


def _reference_beam(logp, beam_size, max_len, alpha, eos_window=None):
  """The finishing rule in plain Python: (best sequence, its score) of one model.

  Each step keeps the top 2K extensions; the best K without EOS stay alive,
  and every EOS among the first `eos_window` (default 2K) of them may join
  the K finished ones.
  """
  eos_window = eos_window or 2 * beam_size
  alive, finished = [((), np.float32(0.0))], []
  for step in range(max_len):
    cands = [(seq + (v,), np.float32(lp + logp[seq[-1] if seq else 0, v]))
             for seq, lp in alive for v in range(logp.shape[1])]
    cands.sort(key=lambda c: -c[1])
    top = cands[:2 * beam_size]
    pen = np.float32(((5.0 + step + 1) / 6.0) ** alpha)
    finished += [(seq, lp / pen) for seq, lp in top[:eos_window]
                 if seq[-1] == EOS]
    finished = sorted(finished, key=lambda c: -c[1])[:beam_size]
    alive = [c for c in top if c[0][-1] != EOS][:beam_size]
  if finished:
    return finished[0]
  pen = np.float32(((5.0 + max_len) / 6.0) ** alpha)
  return alive[0][0], alive[0][1] / pen


@pytest.mark.parametrize("max_len", [6, 7, 8])  # Odd: a step before the loop.
def test_beam_matches_reference_rule_on_random_markov_models(max_len):
  models, vocab, beam_size, alpha = 300, 6, 4, 0.6
  rng = np.random.default_rng(max_len)
  logits = rng.normal(0, 1.5, (models, vocab, vocab)).astype(np.float32)
  logits[:, :, PAD] = -1e9  # Never predicted; token 0 is BOS.
  logits[:, :, EOS] += rng.normal(-1.0, 1.0, (models, 1))  # Varied EOS odds.
  logp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits), -1))
  cache = dict(step=jnp.zeros((), jnp.int32))
  seqs, scores = jax.jit(lambda t: decoding.beam_search(
      functools.partial(_markov_step, t), cache, models, beam_size, max_len,
      EOS, alpha))(jnp.asarray(logp))
  seqs, scores = np.asarray(seqs), np.asarray(scores)
  finished, changed = 0, 0
  for m in range(models):
    ref_seq, ref_score = _reference_beam(logp[m], beam_size, max_len, alpha)
    n = len(ref_seq)
    np.testing.assert_array_equal(seqs[m, 0, :n], ref_seq, err_msg=str(m))
    np.testing.assert_allclose(scores[m, 0], ref_score, rtol=1e-5, atol=1e-6)
    finished += ref_seq[-1] == EOS
    old_rule = _reference_beam(logp[m], beam_size, max_len, alpha, beam_size)
    changed += old_rule[0] != ref_seq
  assert finished > models // 2  # Most searches end in EOS, not max_len.
  assert changed > 0  # Some results differ from the top-K finishing rule.


@pytest.mark.parametrize("max_len,beam_size,alpha,use_max_lens", [
    (3, 16, 0.6, False),
    (4, 32, 0.6, False),
    (4, 32, 0.0, False),
    (4, 32, 2.0, True),
])
def test_beam_matches_brute_force(max_len, beam_size, alpha, use_max_lens):
  # Beams this wide keep every sequence of real tokens (3 * 2**(T-1) <= K), so
  # every finished hypothesis must be found, scored and ordered exactly.
  params, ctx = make_params(7), make_ctx(3, seed=7)
  max_lens = np.array([2, 3, 9] if use_max_lens else [99] * 3, np.int32)
  seqs, scores = beam(params, ctx, beam_size, max_len, alpha=alpha,
                      max_lens=jnp.asarray(max_lens) if use_max_lens else None)
  expected = brute_force(params, ctx, max_len, alpha, max_lens)
  for b in range(3):
    real = [(seq, score) for seq, score in expected[b] if score > -100]
    assert 0 < len(real) <= beam_size
    for k, (seq, score) in enumerate(real):
      np.testing.assert_array_equal(seqs[b, k, :len(seq)], seq)
      np.testing.assert_allclose(scores[b, k], score, rtol=1e-5)
    assert np.all(scores[b, :-1] >= scores[b, 1:])
  check_eos_padding(seqs)


def test_scores_and_cache_history_follow_the_beams():
  # Narrow beams, so that beams are pruned and reordered at every step.
  params, ctx, max_len, beam_size = make_params(5), make_ctx(2), 6, 3
  RECORD.clear()
  seqs, scores = beam(params, ctx, beam_size, max_len, record=True)
  jax.effects_barrier()
  logp = teacher_forced_logp(params, ctx, seqs)
  hist = {int(step): h for step, _, h, _ in RECORD}
  for b, k in itertools.product(range(2), range(beam_size)):
    n = length_of(seqs[b, k])
    np.testing.assert_allclose(scores[b, k], penalised(logp[b, k], n, 0.6),
                               rtol=1e-5)
    # The per-beam `hist` leaf of some row of sentence b holds exactly this
    # hypothesis' inputs at the step where it ended.
    rows = hist[n - 1][b * beam_size:(b + 1) * beam_size, :n]
    inputs = np.concatenate([[0], seqs[b, k, :n - 1]])
    assert np.any(np.all(rows == inputs, axis=-1)), (rows, inputs)
  for _, _, _, seen_ctx in RECORD:
    np.testing.assert_array_equal(seen_ctx, ctx)  # The shared leaf stays put.


def test_always_eos_gives_length_one():
  params, ctx = make_params(0, eos_bias=1e4), make_ctx(4)
  expected = np.zeros((4, 5), np.int32)
  expected[:, 0] = EOS
  np.testing.assert_array_equal(greedy(params, ctx, 5), expected)
  seqs, scores = beam(params, ctx, 4, 5)
  np.testing.assert_array_equal(seqs[:, 0], expected)
  np.testing.assert_allclose(scores[:, 0], 0.0, atol=1e-5)


def test_never_eos_returns_alive_beams():
  # With one beam, EOS never makes the top 2K = 2 (the two real tokens beat
  # it), so no hypothesis ever finishes. (With two beams it would: at step 0
  # one live beam has only 4 extensions, all within the top 2K = 4.)
  params, ctx, max_len = make_params(2, eos_bias=-1e4), make_ctx(4), 5
  tokens = greedy(params, ctx, max_len)
  assert np.all(tokens > EOS)
  seqs, scores = beam(params, ctx, 1, max_len)
  assert np.all(seqs > EOS)
  logp = teacher_forced_logp(params, ctx, seqs)
  penalty = ((5.0 + max_len) / 6.0) ** 0.6
  np.testing.assert_allclose(scores, logp.sum(-1) / penalty, rtol=1e-5)
  np.testing.assert_array_equal(seqs[:, 0], tokens)


@pytest.mark.parametrize("search", ["greedy", "beam"])
def test_lengths_respect_max_lens(search):
  params, ctx, max_len = make_params(4, eos_bias=-1.0), make_ctx(4), 5
  max_lens = np.array([1, 2, 4, 50], np.int32)
  if search == "greedy":
    seqs = greedy(params, ctx, max_len, max_lens=jnp.asarray(max_lens))
    seqs = seqs[:, None]
    found = np.ones(seqs.shape[:2], bool)
  else:
    seqs, scores = beam(params, ctx, 4, max_len, max_lens=jnp.asarray(max_lens))
    found = np.isfinite(scores)  # -inf marks an empty slot.
    assert found[:, 0].all() and not seqs[~found].any()
  check_eos_padding(seqs)
  for b, k in zip(*np.nonzero(found)):
    n = length_of(seqs[b, k])
    assert n <= min(max_len, max_lens[b])
    if max_lens[b] <= max_len:
      assert seqs[b, k, n - 1] == EOS
  np.testing.assert_array_equal(seqs[0, 0], [EOS, 0, 0, 0, 0])


@pytest.mark.parametrize("search", ["greedy", "beam"])
def test_stop_at_eos_false_runs_every_step(search):
  params, ctx, max_len = make_params(5, eos_bias=1.0), make_ctx(3, 5), 8
  outputs, steps = [], []
  for stop_at_eos in (True, False):
    RECORD.clear()
    if search == "greedy":
      outputs.append(greedy(params, ctx, max_len, stop_at_eos=stop_at_eos,
                            record=True))
    else:
      outputs.append(beam(params, ctx, 2, max_len, stop_at_eos=stop_at_eos,
                          record=True))
    jax.effects_barrier()
    steps.append(sorted(int(r[0]) for r in RECORD))
  chex.assert_trees_all_equal(outputs[0], outputs[1])
  assert len(steps[0]) < max_len  # Stopped early...
  assert steps[1] == list(range(max_len))  # ...unless told not to.


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("k", [4, 8, 70])
def test_top_extensions_per_beam_equal_the_top_of_all_sums(dtype, k):
  # The top-k over each beam's logits, then over the M * k candidates, picks
  # the extensions that the top-k over all M * V log-prob sums picks, in the
  # same order, including the forced-EOS rows and beams not yet alive;
  # k = 70 > V = 50 takes whole rows.
  b, m, v, eos = 3, 4, 50, 7
  keys = jax.random.split(jax.random.PRNGKey(0), 2)
  logits = (4.0 * jax.random.normal(keys[0], (b, m, v))).astype(dtype)
  alive = -jax.random.uniform(keys[1], (b, m)) * 3
  alive = alive.at[0, 1:].set(-jnp.inf)  # Step 0: one live beam.
  forced = jnp.array([False, True, False])
  got = decoding._top_extensions(
      decoding.candidates(logits.reshape(b * m, v), k, eos), alive, k, forced, eos)

  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  not_eos = (jnp.arange(v) != eos)[None, None, :]
  logp = jnp.where(forced[:, None, None] & not_eos, -jnp.inf, logp)
  want_logp, idx = jax.lax.top_k((alive[:, :, None] + logp).reshape(b, -1),
                                 min(k, m * v))
  finite = np.isfinite(np.asarray(want_logp))
  np.testing.assert_array_equal(np.asarray(got[0])[finite], want_logp[finite])
  np.testing.assert_array_equal(np.asarray(got[1])[finite], (idx // v)[finite])
  np.testing.assert_array_equal(np.asarray(got[2])[finite], (idx % v)[finite])
  assert np.all(np.asarray(got[2])[1][finite[1]] == eos)  # Forced: EOS only.


@pytest.mark.parametrize("v,k", [(1000, 4), (4096, 8), (300, 2), (600, 8)])
def test_top_k_by_chunks_equals_the_top_k_of_whole_rows(v, k):
  # bfloat16 logits of few distinct values (many ties, some across chunks),
  # the vocabulary not a multiple of the chunk or shorter than k chunks, one
  # row -inf but for one token: the top-k of the k chunks with the largest
  # maxima is the row's, ties going to the lower id.
  rows = 6
  x = jax.random.randint(jax.random.PRNGKey(v), (rows, v), -40, 12).astype(jnp.bfloat16)
  x = x.at[0].set(-jnp.inf).at[0, v - 1].set(3.0)
  values, ids = jax.jit(decoding.top_k_by_chunks, static_argnums=1)(x, k)
  assert values.dtype == jnp.float32 and ids.shape == (rows, k)
  xs = np.asarray(x.astype(jnp.float32))
  want = np.argsort(-xs, axis=1, kind='stable')[:, :k]
  np.testing.assert_array_equal(ids, want)
  np.testing.assert_array_equal(values, np.take_along_axis(xs, want, axis=1))


def test_candidates_callback_finds_what_the_logits_find():
  # Beam search driven by each row's Candidates (here from the logits, as a
  # model computes them without writing logits) finds the same sequences and
  # scores, forced EOS included; fewer than 2M candidates a row is refused.
  params, ctx = make_params(3), make_ctx(3, seed=3)
  max_lens = jnp.array([2, 5, 3])
  cache = init_cache(ctx, 4, 5)

  def search(step):
    return decoding.beam_search(step, cache, 3, 4, 5, EOS, max_lens=max_lens)

  def top(k):
    def step(ids, cache):
      logits, cache = toy_model(params, ids, cache)
      return decoding.candidates(logits, k, EOS), cache
    return step

  want = search(functools.partial(toy_model, params))
  got = search(top(8))
  np.testing.assert_array_equal(got[0], want[0])
  np.testing.assert_allclose(got[1], want[1], rtol=1e-6)
  with pytest.raises(ValueError, match='needs 8 candidates a row, got 7'):
    search(top(7))
