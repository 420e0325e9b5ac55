"""Per-token speed of training, encoding and incremental decoding (paper Table 2).

Every timing compiles first (`compile_s`), runs `warmup` calls, then takes the
median of `reps` calls, each ended by `jax.block_until_ready`. Rows, by kind:

- `train`: one `steps.train_step` on a fully packed [batch, len] batch;
  µs per target token.
- `encoder`: the encoder and the cross-attention K/V projection (done once
  per sentence) on [batch, src_len]; µs per source token, which is µs per
  output token at the paper's equal source and target lengths.
- `greedy`: `decoding.greedy_search` over `model.next_token` (the loop that
  `decode.py --mode=translate|bleu` runs), EOS ignored so that all tgt_len
  steps run; µs per output token. Cache `padded` reads the whole fixed-size
  cache every step (the paper's); `growing` (greedy_search's `chunk`) reads
  it up to the end of the current chunk of `chunk` steps (on average
  (chunk - 1) / 2 positions more than its floor counts).
- `beam4`: `decoding.beam_search` at `beam_size` beams; µs per output token
  of a sentence, time / (sentences * tgt_len), as the paper counts.

Decoder rows are timed for each requested (attention_impl, cache_layout,
argmax_impl), beam cache, GEMM implementation and norm_impl (`ModelConfig`
fields and a compile option: how a step computes, never what; argmax_impl
is greedy's argmax and beam search's top-k); one that fails to
compile or run gives an error row and the others go on, and each row can be
written out as soon as it is measured (`emit`).

The decoder's cache is built outside the timed function. Each time sits
beside a memory floor (`bytes_per_step` from `costs.analyze` over the
measured copy bandwidth, beam rows including the bytes their cache reorder
moves, `reorder_bytes_per_step`; decoding only: training and encoder traffic is not
modelled, so those fields are null) and a compute floor (FLOPs per token from
`costs.analyze` over the measured matmul throughput); `fraction_of_*` is
floor / measured, at most 1 up to noise. Decoder rows also give the traffic
XLA put inside the compiled loop (`hlo.loop_traffic`): `loop_bytes_by_kind`, the
bytes per step of every op writing an array at least as large as one K/V
cache leaf, by what it computes, and `loop_cache_copy_bytes_per_step`, its
copying part (0 when the cache is updated in place and read as stored),
and `program_*`: one step's kernels, bytes moved (and their ratio to the
floor's bytes) and cache copies (`hlo.step_counts`), the counts that
`python -m mqa_flax.gpu_program` predicts from a CPU, here read from the
program timed; on an H100 or H200, padded rows also carry
`program_predicted_us_per_token`, the time `gpu_targets`' cost model gives
that program, beside the time measured. Every decoder row after the first
of its batch and beam size (same weights, same inputs) carries
`tokens_same_fraction`, the fraction of the tokens its last timed call
decoded that equal those of that first row (`tokens_reference`): every
implementation computes the same function, so a kernel that computes
something else shows as a low fraction; rounding (bfloat16; float32
logits in the Pallas argmax) flips near ties, each changing the rest of
its sentence, and beam search's ranking many: compare rows with each
other, not with 1.
Inference kinds use weights cast to the compute dtype, as `analyze` assumes.
"""

import dataclasses
import datetime
import functools
import math
import statistics
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from mqa_flax import costs
from mqa_flax import decoding
from mqa_flax import errors
from mqa_flax import gpu_targets
from mqa_flax import hlo
from mqa_flax import kernel_times
from mqa_flax import state as state_lib
from mqa_flax import steps
from mqa_flax import tables
from mqa_flax.config import ModelConfig
from mqa_flax.model import Cache, Transformer, abstract_model, cache_bytes

KINDS = ('encoder', 'greedy', 'beam4', 'train')
DECODE_DONATE = (1,)  # decode_fn's cache argument.
# `hlo.step_counts` fields that decoder rows carry, prefixed `program_`.
_PROGRAM_COUNTS = ('kernels_per_step', 'kernels_by_kind', 'bytes_moved_per_step',
                   'bytes_over_floor', 'cache_copies_per_step',
                   'cache_copies_per_call')
CACHE_MODES = ('padded', 'growing')
# How a decoder row's program does its GEMMs: 'xla', XLA's own choice (Triton
# GEMM fusions, autotuned on the GPU against cuBLAS); 'cublas', every GEMM a
# cuBLAS call, with XLA's bias, activation and residual-add epilogues in it.
GEMM_IMPLS = ('xla', 'cublas')
_NO_EOS = -1  # Matches no token, so every row decodes all tgt_len steps.
# The train rows' optimizer unless `run` is given one.
ADAMW = dict(optimizer='adamw', learning_rate=1e-3, warmup_steps=1,
             schedule='rsqrt', b1=0.9, b2=0.98, weight_decay=0.0, grad_clip=1.0)
# costs.analyze traces the model on each call; a variant's rows share calls.
_analyze = functools.lru_cache(costs.analyze)


def gemm_options(gemm_impl: str) -> dict[str, Any]:
  """XLA compiler options of a program whose GEMMs are `gemm_impl`'s."""
  if gemm_impl not in GEMM_IMPLS:
    raise ValueError(f'gemm_impl={gemm_impl!r}; expected one of {GEMM_IMPLS}')
  return {'xla_gpu_enable_triton_gemm': False} if gemm_impl == 'cublas' else {}


def _timed(fn: Callable, make_args: Callable[[Any], tuple], *, reps: int,
           warmup: int, donate: tuple[int, ...] = (),
           compiler_options: dict[str, Any] | None = None
           ) -> tuple[Any, float, float, Any]:
  """(compiled, compile seconds, median seconds per call, the last call's
  output) of jit(fn), compiled with `compiler_options`.

  `make_args(previous_output)` gives each call's arguments (fresh ones where
  they are donated), built before the clock starts.
  """
  args = make_args(None)
  start = time.perf_counter()
  compiled = jax.jit(fn, donate_argnums=donate).lower(*args).compile(compiler_options or None)
  compile_s = time.perf_counter() - start
  out, times = None, []
  for i in range(warmup + reps):
    args = make_args(out) if i else args
    jax.block_until_ready(args)
    start = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return compiled, compile_s, statistics.median(times[warmup:]), out


def measure_bandwidth(nbytes: int | None = None, reps: int = 5) -> float:
  """Memory bandwidth, GB/s: bytes read + written by a jitted x + 1.

  x is 1 GiB on accelerators and 64 MiB on CPU unless `nbytes` is given.
  """
  nbytes = nbytes or (2**26 if jax.default_backend() == 'cpu' else 2**30)
  x = jnp.zeros((nbytes // 4,), jnp.float32)
  _, _, sec, _ = _timed(lambda a: a + 1, lambda _: (x,), reps=reps, warmup=1)
  return 2 * x.nbytes / sec / 1e9


def measure_matmul_flops(dtype: str = 'float32', n: int | None = None,
                         reps: int = 5) -> float:
  """Throughput of an [n, n] @ [n, n] matmul in `dtype`, TFLOP/s.

  n is 8192 on accelerators and 512 on CPU unless given.
  """
  n = n or (512 if jax.default_backend() == 'cpu' else 8192)
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  _, _, sec, _ = _timed(jnp.matmul, lambda _: (a, a), reps=reps, warmup=1)
  return 2 * n**3 / sec / 1e12


def _fields(bytes_per_step: float | None, steps: int, tokens: int,
            flops_per_token: float, seconds: float, dev: dict) -> dict:
  """µs per token beside its memory and compute floors."""
  us = seconds / tokens * 1e6
  compute = flops_per_token / (dev['device_tflops'] * 1e6)
  row = dict(us_per_token=us, median_s=seconds, bytes_per_step=bytes_per_step,
             achieved_gbps=None, floor_us_per_token=None, fraction_of_floor=None,
             flops_per_token=flops_per_token, compute_floor_us_per_token=compute,
             fraction_of_compute_floor=compute / us)
  if bytes_per_step is not None:
    floor = bytes_per_step * steps / tokens / (dev['device_gbps'] * 1e3)
    row.update(achieved_gbps=bytes_per_step * steps / seconds / 1e9,
               floor_us_per_token=floor, fraction_of_floor=floor / us)
  return row


def _random_ids(seed: int, shape: tuple[int, int], vocab: int) -> jax.Array:
  """Non-pad token ids, drawn by numpy so that nothing compiles."""
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.integers(1, vocab, shape, np.int32))


def encode_cache(graphdef: nnx.GraphDef, params: nnx.State, inputs: jax.Array,
                 max_len: int, beam_size: int = 1) -> Cache:
  """The decode cache of `inputs` [B, S]: what decoder rows start from."""
  model = nnx.merge(graphdef, params)
  return model.init_cache(model.encode(inputs), inputs, max_len, beam_size)


def encoder_fn(graphdef: nnx.GraphDef, tgt_len: int) -> Callable:
  """What encoder rows time: `(params, inputs) -> cross K/V of every layer`."""
  def cross_kv(params, inputs):  # The empty self cache is dead code: not timed.
    return [(c['cross_k'], c['cross_v'])
            for c in encode_cache(graphdef, params, inputs, tgt_len)['layers']]
  return cross_kv


def _time_encoder(cfg: ModelConfig, graphdef: nnx.GraphDef, params: nnx.State,
                  b: int, s: int, t: int, seed: int, dev: dict,
                  timing: dict) -> dict:
  inputs = _random_ids(seed, (b, s), cfg.vocab_size)
  _, compile_s, sec, _ = _timed(encoder_fn(graphdef, t), lambda _: (params, inputs),
                                **timing)
  flops = _analyze(cfg, b, s, t, 1)['encoder_flops_per_token']
  return dict(kind='encoder', cache=None, batch=b, compile_s=compile_s,
              **_fields(None, 1, b * s, flops, sec, dev))


def decode_fn(graphdef: nnx.GraphDef, batch: int, beams: int, tgt_len: int,
              chunk: int | None) -> Callable[[nnx.State, Cache],
                                             tuple[jax.Array, Cache]]:
  """What the decoder rows time: `decoding`'s search over the model's step
  (`next_token` for greedy, `candidates` for beams).

  Returns `(params, cache) -> (tokens, final cache)`, to be jitted with the
  cache donated (`DECODE_DONATE`): the loop then updates the caller's cache
  buffers in place instead of first copying them. EOS is ignored (an id that
  matches nothing), so every row decodes all tgt_len steps; `chunk` selects
  the growing cache (beam search then also reorders only the positions
  written so far).
  """
  def fn(params, cache):
    model = nnx.merge(graphdef, params)
    weights = model.decode_weights()
    if beams == 1:
      return decoding.greedy_search(
          functools.partial(model.next_token, weights=weights), cache, batch,
          tgt_len, _NO_EOS, stop_at_eos=False, chunk=chunk, return_cache=True)
    seqs, _, cache = decoding.beam_search(
        functools.partial(model.candidates, k=2 * beams, eos_id=_NO_EOS,
                          weights=weights), cache, batch,
        beams, tgt_len, _NO_EOS, stop_at_eos=False, reorder=model.reorder_cache,
        chunk=chunk, return_cache=True)
    return seqs, cache
  return fn


def _time_decoder(cfg: ModelConfig, graphdef: nnx.GraphDef, params: nnx.State,
                  b: int, beams: int, mode: str, s: int, t: int, chunk: int,
                  seed: int, dev: dict, timing: dict, profile: bool = False,
                  gemm_impl: str = 'xla') -> tuple[dict, np.ndarray]:
  """A decoder row and the tokens its last timed call decoded."""
  inputs = _random_ids(seed, (b, s), cfg.vocab_size)
  make_cache = jax.jit(functools.partial(encode_cache, graphdef, max_len=t,
                                         beam_size=beams))
  shapes = jax.eval_shape(make_cache, params, inputs)
  leaf = min(math.prod(x.shape) * x.dtype.itemsize for layer in shapes['layers']
             for x in layer.values())
  stats = _analyze(cfg, b, s, t, beams)
  fn = decode_fn(graphdef, b, beams, t, chunk if mode == 'growing' else None)
  args = lambda _: (params, make_cache(params, inputs))
  compiled, compile_s, sec, out = _timed(fn, args, donate=DECODE_DONATE,
                                         compiler_options=gemm_options(gemm_impl), **timing)
  tokens = np.asarray(out[0])
  del out  # The cache.
  text = compiled.as_text()
  steps = decoding.steps_per_loop(beams, chunk if mode == 'growing' else None)
  by_kind = {k: v // steps for k, v in hlo.loop_traffic(text, leaf).items()}
  reorder = stats[f'decode_reorder_bytes_per_step_{mode}']  # 0 without beams.
  self_leaf = min(math.prod(c[n].shape) * c[n].dtype.itemsize
                  for c in shapes['layers'] for n in ('k', 'v'))
  counts = hlo.step_counts(text, self_leaf,
                           stats[f'decode_bytes_per_step_{mode}'] + reorder,
                           hlo.beam_reorder_arrays(cfg.num_decoder_layers, beams, mode,
                                                    cfg.beam_cache),
                           steps)
  program = {f'program_{k}': counts[k] for k in _PROGRAM_COUNTS}
  target = gpu_targets.target_of(dev['device'])
  if target and mode == 'padded':  # Growing mode's loops differ; counts has the last.
    step_s = sum(gpu_targets.predict_step(counts['kernels'], steps, target).values())
    program['program_predicted_us_per_token'] = step_s * 1e6 / b
  if profile and mode == 'padded':  # Growing mode's loops run part of the steps each.
    program['profile'] = _profile(compiled, args(None), kernel_times.module_name(text),
                                  counts['kernels'], t, steps, sec)
  return dict(
      kind=decoding.search_name(beams), cache=mode, batch=b,
      beam_size=beams, compile_s=compile_s, kv_cache_bytes=cache_bytes(shapes),
      loop_bytes_by_kind=by_kind,
      loop_cache_copy_bytes_per_step=hlo.cache_copy_bytes(by_kind), **program,
      reorder_bytes_per_step=reorder,
      **_fields(stats[f'decode_bytes_per_step_{mode}'] + reorder, t, b * t,
                beams * stats['decode_flops_per_token'], sec, dev)), tokens


def _profile(compiled, args: tuple, module: str, kernels: list[dict], t: int,
             steps: int, sec: float) -> dict:
  """`kernel_times.per_step` of one more call, or the error that stopped it."""
  try:
    return kernel_times.per_step(kernel_times.profile(compiled, args, module),
                                 kernels, t, steps, sec)
  except Exception as err:  # pylint: disable=broad-except
    logging.error('profiling failed: %s: %s', type(err).__name__, err)
    return dict(error=f'{type(err).__name__}: {err}'[:500])


def train_batch(ids: jax.Array) -> dict[str, jax.Array]:
  """A fully packed training batch with `ids` [B, L] as inputs and targets."""
  ones = jnp.ones_like(ids)
  pos = jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape)
  return dict(inputs=ids, targets=ids, inputs_segmentation=ones,
              targets_segmentation=ones, inputs_position=pos,
              targets_position=pos)


def train_fn(graphdef: nnx.GraphDef, tx) -> Callable:
  """What train rows time: `(state, batch, rng) -> (state, metrics)`, state donated."""
  return functools.partial(steps.train_step, graphdef=graphdef, tx=tx,
                           label_smoothing=0.1)


def _time_train(cfg: ModelConfig, graphdef: nnx.GraphDef, params: nnx.State,
                b: int, length: int, opt_config: ml_collections.ConfigDict,
                seed: int, dev: dict, timing: dict) -> dict:
  tx = state_lib.make_optimizer(opt_config, 1)
  batch = train_batch(_random_ids(seed, (b, length), cfg.vocab_size))
  params = jax.tree.map(jnp.copy, params)  # The step donates its state.
  state = state_lib.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
  step = train_fn(graphdef, tx)
  rng = jax.random.key(seed)
  _, compile_s, sec, _ = _timed(
      step, lambda out: (out[0] if out else state, batch, rng), donate=(0,), **timing)
  flops = _analyze(cfg, b, length, length, 1)['train_flops_per_token']
  return dict(kind='train', cache=None, batch=b, src_len=length, tgt_len=length,
              compile_s=compile_s, **_fields(None, 1, b * length, flops, sec, dev))


def parse_impls(spec: Sequence[str]) -> list[tuple[str, str, str]]:
  """'attention_impl[/cache_layout[/argmax_impl]]' items -> triples:
  ['xla/BKLH/pallas', 'cudnn'] -> [('xla', 'BKLH', 'pallas'),
  ('cudnn', 'BLKH', 'xla')]."""
  out = []
  for item in spec:
    impl, _, rest = item.partition('/')
    layout, _, argmax = rest.partition('/')
    out.append((impl, layout or 'BLKH', argmax or 'xla'))
  return out


def _error_row(kind: str, cache: str | None, batch: int, err: Exception) -> dict:
  logging.error('benchmark %s/%s at batch %d failed: %s: %s', kind, cache,
                batch, type(err).__name__, err)
  return dict(kind=kind, cache=cache, batch=batch, us_per_token=None,
              error=f'{type(err).__name__}: {err}'[:2000])


def run(variants: dict[str, ModelConfig], *,
        states: dict[str, nnx.State] | None = None, batch: int = 1024,
        src_len: int = 128, tgt_len: int = 128, beam_batch: int = 256,
        beam_size: int = 4, train_batch: int = 128, train_len: int = 256,
        cache_modes: Sequence[str] = CACHE_MODES, reps: int = 5,
        warmup: int = 1, kinds: Sequence[str] = KINDS, chunk: int = 16,
        seed: int = 0, impls: Sequence[tuple[str, str, str]] | None = None,
        beam_caches: Sequence[str] | None = None,
        seq_impls: Sequence[str] | None = None,
        gemm_impls: Sequence[str] | None = None,
        norm_impls: Sequence[str] | None = None, profile: bool = False,
        emit: Callable[[dict], None] | None = None,
        opt_config: ml_collections.ConfigDict | None = None) -> list[dict]:
  """Times each kind for each variant; returns one dict per benchmark row.

  Args:
    variants: name -> config.
    states: optional name -> trained parameters (`nnx.State` of the Params);
      other variants get random weights, `Transformer(cfg, nnx.Rngs(seed))`.
    batch: sentences decoded greedily.
    beam_batch: sentences of beam search, each with `beam_size` beams. Kind
      'beam4' selects beam search; its rows are labelled f'beam{beam_size}'.
    cache_modes: cache modes of the greedy and beam rows.
    kinds: from KINDS; the encoder is timed at the greedy and beam batches.
    chunk: steps per loop in growing mode.
    impls: (attention_impl, cache_layout, argmax_impl) triples
      (`parse_impls`); each decoder row is timed for each, in this order
      (default: the variant's own). The encoder is timed with the first's
      layout.
    seq_impls: `ModelConfig.seq_attention_impl` values; each encoder and
      training row is timed for each, in this order, with fields
      `seq_attention_impl` and `attention_impl` set to it (default: the
      variant's own).
    beam_caches: `ModelConfig.beam_cache` values; each beam row is timed for
      each, in this order, with field `beam_cache` (default: the variant's own).
    gemm_impls: GEMM_IMPLS values; each decoder row is timed for each, in this
      order, with field `gemm_impl` (default: 'xla').
    norm_impls: `ModelConfig.norm_impl` values; each decoder row is timed for
      each, in this order, with field `norm_impl` (default: the variant's own).
    profile: each padded decoder row also runs once under the profiler and
      carries `profile`, its loop's measured kernel times beside their bytes
      (`kernel_times.per_step`; `{'error': ...}` where profiling failed).
    emit: called with each row as soon as it is measured (e.g.
      `metrics.jsonl_appender`). Inside `errors.stop_between_steps`, a
      signal stops the run after the row being measured.
      A row that fails to compile or run becomes an error row (field `error`,
      us_per_token None) and the others go on.
    opt_config: `config.opt` for `state.make_optimizer`; default AdamW.
  """
  if set(kinds) - set(KINDS) or set(cache_modes) - set(CACHE_MODES):
    raise ValueError(f'kinds={kinds} must be from {KINDS} and '
                     f'cache_modes={cache_modes} from {CACHE_MODES}')
  dev = dict(device=jax.devices()[0].device_kind, platform=jax.default_backend(),
             device_gbps=measure_bandwidth(), jax_version=jax.__version__,
             date=datetime.datetime.now(datetime.timezone.utc).isoformat(
                 timespec='seconds'))
  timing = dict(reps=reps, warmup=warmup)
  opt_config = opt_config or ml_collections.ConfigDict(ADAMW)
  decoders = [(batch, 1, m) for m in cache_modes] if 'greedy' in kinds else []
  if 'beam4' in kinds:
    decoders += [(beam_batch, beam_size, m) for m in cache_modes]
  tflops, rows = {}, []
  for name, base_cfg in variants.items():
    if base_cfg.dtype not in tflops:
      tflops[base_cfg.dtype] = measure_matmul_flops(base_cfg.dtype)
    d = dict(dev, device_tflops=tflops[base_cfg.dtype])
    triples = impls or [(base_cfg.attention_impl, base_cfg.cache_layout,
                         base_cfg.argmax_impl)]
    if name in (states or {}):
      params = states[name]
    else:
      params = nnx.state(Transformer(base_cfg, rngs=nnx.Rngs(seed)), nnx.Param)
    infer = jax.tree.map(lambda x, c=base_cfg: x.astype(c.compute_dtype), params)
    common = dict(variant=name, dtype=base_cfg.dtype,
                  num_heads=base_cfg.num_heads,
                  num_kv_heads=base_cfg.num_kv_heads, src_len=src_len,
                  tgt_len=tgt_len, reps=reps, **d)

    def graph(cfg):
      return abstract_model(cfg)[0]

    def measure(kind, cache, batch, impl, layout, argmax, fn, beam_cache=None,
                seq_impl=None, gemm=None, norm=None):
      try:
        row = fn()
      except Exception as err:  # pylint: disable=broad-except
        row = _error_row(kind, cache, batch, err)
      row = dict(common, attention_impl=seq_impl or impl, cache_layout=layout,
                 argmax_impl=argmax, beam_cache=beam_cache, **row)
      if seq_impl:
        row['seq_attention_impl'] = seq_impl
      if gemm:
        row['gemm_impl'] = gemm
      if norm:
        row['norm_impl'] = norm
      rows.append(row)
      if emit:
        emit(row)
      errors.check_stop(f'after {len(rows)} benchmark rows of this batch')

    first_tokens = {}  # (batch, beams) -> (the first row's label, its tokens).

    def decoder_row(b, beams, mode, impl, layout, argmax, beam_cache, gemm, norm):
      cfg = dataclasses.replace(base_cfg, attention_impl=impl, cache_layout=layout,
                                argmax_impl=argmax, beam_cache=beam_cache,
                                norm_impl=norm)
      row, tokens = _time_decoder(cfg, graph(cfg), infer, b, beams, mode, src_len,
                                  tgt_len, chunk, seed, d, timing, profile, gemm)
      label = tables.impl_label(dict(attention_impl=impl, cache_layout=layout,
                                     argmax_impl=argmax, beam_cache=beam_cache,
                                     gemm_impl=gemm, norm_impl=norm))
      ref_label, ref = first_tokens.setdefault((b, beams), (f'{label} {mode}', tokens))
      if ref is not tokens:
        row.update(tokens_reference=ref_label,
                   tokens_same_fraction=float(np.mean(tokens == ref)))
      return row

    def encoder_row(b, seq):
      cfg = dataclasses.replace(base_cfg, attention_impl='xla',
                                cache_layout=triples[0][1], seq_attention_impl=seq)
      return _time_encoder(cfg, graph(cfg), infer, b, src_len, tgt_len, seed, d, timing)

    def train_row(seq):
      cfg = dataclasses.replace(base_cfg, attention_impl='xla', seq_attention_impl=seq)
      return _time_train(cfg, graph(cfg), params, train_batch, train_len, opt_config,
                         seed, d, timing)

    seqs = list(seq_impls or [base_cfg.seq_attention_impl])
    for seq in seqs if 'encoder' in kinds else []:
      for b in dict.fromkeys([b for b, _, _ in decoders] or [batch]):
        measure('encoder', None, b, 'xla', triples[0][1], None,
                functools.partial(encoder_row, b, seq), seq_impl=seq)
    caches = list(beam_caches or [base_cfg.beam_cache])
    for impl, layout, argmax in triples:
      for b, beams, mode in decoders:
        for beam_cache in caches if beams > 1 else [base_cfg.beam_cache]:
          for gemm in gemm_impls or ['xla']:
            for norm in norm_impls or [base_cfg.norm_impl]:
              measure(decoding.search_name(beams), mode, b, impl, layout, argmax,
                      functools.partial(decoder_row, b, beams, mode, impl, layout,
                                        argmax, beam_cache, gemm, norm),
                      beam_cache if beams > 1 else None, gemm=gemm, norm=norm)
    for seq in seqs if 'train' in kinds else []:
      measure('train', None, train_batch, 'xla', base_cfg.cache_layout, None,
              functools.partial(train_row, seq), seq_impl=seq)
  return rows


def run_at_batches(variants: dict[str, ModelConfig], batches: Sequence[int],
                   kinds: Sequence[str] = KINDS, **kwargs) -> list[dict]:
  """`run` at the first of `batches` for every kind, then the encoder and
  greedy decoding at each other batch (decoder time against batch)."""
  rows = []
  for i, batch in enumerate(batches):
    rows += run(variants, batch=batch, **kwargs,
                kinds=tuple(k for k in kinds if i == 0 or k in ('encoder', 'greedy')))
  return rows
