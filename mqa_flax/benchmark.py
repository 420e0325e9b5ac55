"""Per-token speed of training, encoding and incremental decoding (paper Table 2).

Every timing compiles first (`compile_s`), runs `warmup` calls, then takes the
median of `reps` calls, each ended by `jax.block_until_ready`. Units, per row:

- `train`: one optimizer step on a fully packed [batch, len] batch; µs per
  target token.
- `encoder`: encoder plus the cross-attention K/V projection (done once per
  sentence) on [batch, src_len]; µs per source token, which is µs per output
  token at the paper's equal source and target lengths.
- `greedy`: tgt_len incremental steps in one jitted loop, argmax fed back,
  EOS ignored; µs per output token. `padded` reads the whole fixed-size cache
  every step (the paper's); `growing` reads it up to the end of the current
  chunk of `chunk` steps.
- `beam4`: `decoding.beam_search` at `beam_size` beams; µs per output token
  of a sentence (time / (sentences * tgt_len)), as the paper counts.

Each row puts its time beside two floors: memory (`bytes_per_step` from
`summary.analyze` over the measured copy bandwidth; decoding only, since
training and encoding traffic is not modelled) and compute (FLOPs per token
from `summary.analyze` over the measured matmul throughput). Inference kinds
use weights cast to the compute dtype, as `analyze` assumes.
"""

import collections
import datetime
import functools
import json
import math
import os
import re
import statistics
import subprocess
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from mqa_flax import decoding
from mqa_flax import metrics
from mqa_flax import report
from mqa_flax import summary
from mqa_flax import train_lib
from mqa_flax.config import ModelConfig
from mqa_flax.model import Cache, Transformer, cache_bytes

_NO_EOS = -1  # No token matches, so every row decodes all tgt_len steps.


def _median_seconds(fn: Callable[[], Any], reps: int) -> float:
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def measure_bandwidth(nbytes: int | None = None, reps: int = 5) -> float:
  """Device memory bandwidth in GB/s: bytes read + written by a jitted x + 1."""
  if nbytes is None:
    nbytes = 2**26 if jax.default_backend() == 'cpu' else 2**30
  x = jnp.zeros((nbytes // 4,), jnp.float32)
  f = jax.jit(lambda a: a + 1).lower(x).compile()
  jax.block_until_ready(f(x))
  return 2 * x.nbytes / _median_seconds(lambda: f(x), reps) / 1e9


def measure_matmul_flops(dtype: str = 'float32', n: int | None = None,
                         reps: int = 5) -> float:
  """Dense [n, n] @ [n, n] matmul throughput in `dtype`, TFLOP/s."""
  if n is None:
    n = 512 if jax.default_backend() == 'cpu' else 8192
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  f = jax.jit(jnp.matmul).lower(a, a).compile()
  jax.block_until_ready(f(a, a))
  return 2 * n**3 / _median_seconds(lambda: f(a, a), reps) / 1e12


def _timed(fn: Callable, make_args: Callable[[Any], tuple], *, reps: int,
           warmup: int, donate: tuple[int, ...] = ()) -> tuple[Any, float, float]:
  """(compiled, compile seconds, median seconds per call) of jit(fn).

  `make_args(previous_output)` gives each call's arguments, fresh where they
  are donated (built before the clock starts).
  """
  args = make_args(None)
  start = time.perf_counter()
  compiled = jax.jit(fn, donate_argnums=donate).lower(*args).compile()
  compile_s = time.perf_counter() - start
  out, times = None, []
  for i in range(warmup + reps):
    if i:
      args = make_args(out)
    jax.block_until_ready(args)
    start = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return compiled, compile_s, statistics.median(times[warmup:])


def greedy_tokens(model: Transformer, cache: Cache, steps: int,
                  chunk: int | None = None) -> tuple[jax.Array, Cache]:
  """Greedy decoding of exactly `steps` tokens, EOS ignored: (tokens [B, T], cache).

  With `chunk`, the steps run as loops of `chunk` steps, each reading the
  self-attention cache only up to the end of its chunk (`growing`); without,
  every step reads the whole cache (`padded`). The cache is the loop carry.
  """
  rows = cache['src_mask'].shape[0]

  def step(read_len, t, carry):
    tokens, cache = carry
    ids = jnp.where(t == 0, 0, tokens[:, jnp.maximum(t - 1, 0)])
    logits, cache = model.decode_step(ids, cache, read_len=read_len)
    return tokens.at[:, t].set(jnp.argmax(logits, -1).astype(jnp.int32)), cache

  carry = (jnp.zeros((rows, steps), jnp.int32), cache)
  size = chunk or steps
  for start in range(0, steps, size):
    end = min(start + size, steps)
    body = functools.partial(step, end if chunk else None)
    carry = jax.lax.fori_loop(start, end, body, carry)
  return carry


_HLO_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 'bf16': 2, 'f16': 2, 's16': 2,
              'f32': 4, 's32': 4, 'u32': 4, 'f64': 8, 's64': 8, 'u64': 8}


def loop_copy_bytes(hlo_text: str, shapes: Sequence[Sequence[int]]) -> int:
  """Most bytes one iteration of any while loop copies into arrays like `shapes`.

  Reads compiled HLO text: `copy` ops, and fusions XLA named `copy*`, in while
  bodies whose non-unit dimensions are, in some order, those of one of
  `shapes` (say the K/V cache leaves). A loop that updates its cache in place
  copies none.
  """
  keys = {tuple(sorted(d for d in s if d != 1)) for s in shapes}
  bodies = set(re.findall(r'body=%([\w.\-]+)', hlo_text))
  per_body, computation = collections.Counter(), None
  for line in hlo_text.splitlines():
    head = re.match(r'(?:ENTRY )?%([\w.\-]+) .*\{$', line)
    if head:
      computation = head.group(1)
      continue
    op = re.match(r'\s*(?:ROOT )?%(\S+) = (\w+)\[([\d,]*)\]\S* (\w+)\(', line)
    if not (computation in bodies and op and op.group(2) in _HLO_BYTES):
      continue
    name, dtype, dims, kind = op.groups()
    dims = [int(d) for d in dims.split(',') if d]
    if (kind == 'copy' or kind == 'fusion' and name.startswith('copy')) and (
        tuple(sorted(d for d in dims if d != 1)) in keys):
      per_body[computation] += _HLO_BYTES[dtype] * math.prod(dims)
  return max(per_body.values(), default=0)


def _fields(bytes_per_step: float | None, steps: int, tokens: int,
            flops_per_token: float, seconds: float, dev: dict) -> dict:
  """Time per token beside its memory and compute floors."""
  us = seconds / tokens * 1e6
  row = dict(us_per_token=us, median_s=seconds, flops_per_token=flops_per_token,
             bytes_per_step=bytes_per_step, achieved_gbps=None,
             floor_us_per_token=None, fraction_of_floor=None)
  if bytes_per_step is not None:
    floor = bytes_per_step * steps / tokens / (dev['device_gbps'] * 1e3)
    row.update(achieved_gbps=bytes_per_step * steps / seconds / 1e9,
               floor_us_per_token=floor, fraction_of_floor=floor / us)
  compute = flops_per_token / (dev['device_tflops'] * 1e6)
  row.update(compute_floor_us_per_token=compute,
             fraction_of_compute_floor=compute / us)
  return row


def _random_ids(seed: int, shape: tuple[int, ...], vocab: int) -> jax.Array:
  return jax.random.randint(jax.random.key(seed), shape, 1, vocab, jnp.int32)


def _encode(graphdef: nnx.GraphDef, params: nnx.State, inputs: jax.Array,
            max_len: int, beam_size: int = 1) -> Cache:
  model = nnx.merge(graphdef, params)
  return model.init_cache(model.encode(inputs), inputs, max_len, beam_size)


def _time_encoder(cfg, graphdef, params, b, src_len, tgt_len, seed, dev, timing):
  def cross_kv(p, inputs):  # The empty self cache is dead code, so not timed.
    cache = _encode(graphdef, p, inputs, tgt_len)
    return [(c['cross_k'], c['cross_v']) for c in cache['layers']]

  inputs = _random_ids(seed, (b, src_len), cfg.vocab_size)
  _, compile_s, sec = _timed(cross_kv, lambda _: (params, inputs), **timing)
  flops = summary.analyze(cfg, b, src_len, tgt_len)['encoder_flops_per_token']
  return dict(kind='encoder', cache=None, batch=b, compile_s=compile_s,
              **_fields(None, 1, b * src_len, flops, sec, dev))


def _time_decoder(cfg, graphdef, params, b, beam_size, modes, src_len,
                  tgt_len, chunk, seed, dev, timing) -> list[dict]:
  inputs = _random_ids(seed, (b, src_len), cfg.vocab_size)
  make_cache = jax.jit(functools.partial(_encode, graphdef, max_len=tgt_len,
                                         beam_size=beam_size))
  shapes = jax.eval_shape(make_cache, params, inputs)
  length = shapes['layers'][0]['k'].shape[1]
  kv_shapes = [(b, src_len, cfg.num_kv_heads, cfg.head_dim)] + [
      (b * beam_size, n, cfg.num_kv_heads, cfg.head_dim)
      for n in range(1, length + 1)]
  stats = summary.analyze(cfg, b, src_len, tgt_len, beam_size)
  rows = []
  for mode in modes:
    if beam_size == 1:
      fn = lambda p, c, m=mode: greedy_tokens(
          nnx.merge(graphdef, p), c, tgt_len, chunk if m == 'growing' else None)
      donate = (1,)
    else:  # beam_search keeps its cache inside, so nothing could be donated.
      fn = lambda p, c: decoding.beam_search(
          nnx.merge(graphdef, p).decode_step, c, b, beam_size, tgt_len,
          _NO_EOS, stop_at_eos=False)
      donate = ()
    compiled, compile_s, sec = _timed(
        fn, lambda _: (params, make_cache(params, inputs)), donate=donate,
        **timing)
    rows.append(dict(
        kind='greedy' if beam_size == 1 else f'beam{beam_size}', cache=mode,
        batch=b, beam_size=beam_size, compile_s=compile_s,
        kv_cache_bytes=cache_bytes(shapes),
        loop_copy_bytes_per_step=loop_copy_bytes(compiled.as_text(), kv_shapes),
        **_fields(stats[f'decode_bytes_per_step_{mode}'], tgt_len, b * tgt_len,
                  beam_size * stats['decode_flops_per_token'], sec, dev)))
  return rows


def _time_train(cfg, graphdef, params, b, length, opt_config, seed, dev, timing):
  tx = train_lib.make_optimizer(opt_config, 1)
  ids = _random_ids(seed, (b, length), cfg.vocab_size)
  ones = jnp.ones_like(ids)
  pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), ids.shape)
  batch = dict(inputs=ids, targets=ids, inputs_segmentation=ones,
               targets_segmentation=ones, inputs_position=pos,
               targets_position=pos)
  params = jax.tree.map(jnp.copy, params)  # The step donates its state.
  state = train_lib.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
  step = functools.partial(train_lib.train_step, graphdef=graphdef, tx=tx,
                           label_smoothing=0.1, rng=jax.random.key(seed))
  _, compile_s, sec = _timed(step, lambda out: (out[0] if out else state, batch),
                             donate=(0,), **timing)
  flops = summary.analyze(cfg, b, length, length)['train_flops_per_token']
  return dict(kind='train', cache=None, batch=b, src_len=length, tgt_len=length,
              compile_s=compile_s, **_fields(None, 1, b * length, flops, sec, dev))


def run(variants: dict[str, ModelConfig], *,
        states: dict[str, nnx.State] | None = None, batch: int = 1024,
        src_len: int = 128, tgt_len: int = 128, beam_batch: int = 256,
        beam_size: int = 4, train_batch: int = 128, train_len: int = 256,
        cache_modes: Sequence[str] = ('padded', 'growing'), reps: int = 5,
        warmup: int = 1,
        kinds: Sequence[str] = ('encoder', 'greedy', 'beam4', 'train'),
        chunk: int = 16, seed: int = 0,
        opt_config: ml_collections.ConfigDict | None = None) -> list[dict]:
  """Times every kind for every variant and returns one dict per row.

  Args:
    variants: name -> config.
    states: optional name -> trained parameters (`nnx.State` of the Params);
      others get random weights from `Transformer(cfg, rngs=nnx.Rngs(seed))`.
    batch: sentences for greedy decoding.
    beam_batch: sentences for beam search, each with `beam_size` beams. The
      kind 'beam4' selects beam search; its rows say f'beam{beam_size}'.
    cache_modes: greedy cache modes ('padded', 'growing'); beam is padded.
    kinds: any of 'encoder' (at the greedy and beam batches), 'greedy',
      'beam4', 'train'.
    chunk: steps per loop in growing mode.
    opt_config: `config.opt` for `train_lib.make_optimizer`; default AdamW.
  """
  dev = dict(device=jax.devices()[0].device_kind, platform=jax.default_backend(),
             device_gbps=measure_bandwidth(), jax_version=jax.__version__,
             date=datetime.datetime.now(datetime.timezone.utc).isoformat(
                 timespec='seconds'))
  timing = dict(reps=reps, warmup=warmup)
  opt_config = opt_config or ml_collections.ConfigDict(dict(
      optimizer='adamw', learning_rate=1e-3, warmup_steps=1, schedule='rsqrt',
      b1=0.9, b2=0.98, weight_decay=0.0, grad_clip=1.0))
  decoders = [(batch, 1, cache_modes)] if 'greedy' in kinds else []
  if 'beam4' in kinds:
    decoders.append((beam_batch, beam_size, ('padded',)))
  tflops, rows = {}, []
  for name, cfg in variants.items():
    if cfg.dtype not in tflops:
      tflops[cfg.dtype] = measure_matmul_flops(cfg.dtype)
    d = dict(dev, device_tflops=tflops[cfg.dtype])
    graphdef = nnx.graphdef(
        nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))  # pylint: disable=cell-var-from-loop
    params = (states or {}).get(name)
    if params is None:
      params = nnx.state(Transformer(cfg, rngs=nnx.Rngs(seed)), nnx.Param)
    infer = jax.tree.map(lambda x: x.astype(cfg.compute_dtype), params)  # pylint: disable=cell-var-from-loop
    new = []
    if 'encoder' in kinds:
      for b in dict.fromkeys([b for b, _, _ in decoders] or [batch]):
        new.append(_time_encoder(cfg, graphdef, infer, b, src_len, tgt_len,
                                 seed, d, timing))
    for b, k, modes in decoders:
      new += _time_decoder(cfg, graphdef, infer, b, k, modes, src_len, tgt_len,
                           chunk, seed, d, timing)
    if 'train' in kinds:
      new.append(_time_train(cfg, graphdef, params, train_batch, train_len,
                             opt_config, seed, d, timing))
    rows += [dict(dict(variant=name, dtype=cfg.dtype, num_heads=cfg.num_heads,
                       num_kv_heads=cfg.num_kv_heads, src_len=src_len,
                       tgt_len=tgt_len, reps=reps, **d), **r) for r in new]
  return rows


def _git_commit() -> str | None:
  try:
    out = subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True,
                         text=True, check=True, cwd=os.path.dirname(__file__))
  except (OSError, subprocess.CalledProcessError):
    return None
  return out.stdout.strip() or None


def write_outputs(rows: Sequence[dict], out_dir: str, command: str) -> str:
  """Appends rows to benchmark.jsonl, writes table2.md and TensorBoard scalars.

  Returns the markdown (Table 2 of these rows, device measurements, and every
  row's compute floor).
  """
  os.makedirs(out_dir, exist_ok=True)
  commit = _git_commit()
  with open(os.path.join(out_dir, 'benchmark.jsonl'), 'a') as f:
    for r in rows:
      f.write(json.dumps(dict(r, command=command, git_commit=commit)) + '\n')
  devices = sorted({(r['device'], round(r['device_gbps']), r['device_tflops'])
                    for r in rows})
  compute = [[r['variant'], r['kind'], r['cache'] or report.DASH, r['batch'],
              report.num(r['flops_per_token'] / 1e6),
              report.num(r['compute_floor_us_per_token']),
              f"{r['fraction_of_compute_floor']:.3f}",
              report.num(r.get('loop_copy_bytes_per_step', 0) / 1e6)]
             for r in rows]
  text = (report.table2(rows) + '\nMeasured: ' + '; '.join(
      f'{dv}: copy {gb} GB/s, matmul {report.num(tf)} TFLOP/s'
      for dv, gb, tf in devices) +
          '. Memory floor = bytes per token / copy bandwidth (decoding only); '
          'compute floor = FLOPs per token / matmul throughput.\n\n'
          '### Compute floor\n\n' + report.md_table(
              ['variant', 'kind', 'cache', 'batch', 'MFLOP/token',
               'compute floor (µs/token)', 'fraction', 'loop copies (MB/step)'],
              compute))
  with open(os.path.join(out_dir, 'table2.md'), 'w') as f:
    f.write(text)
  writer = metrics.MetricWriter(out_dir)
  writer.write_scalars(0, {
      f"benchmark/{r['variant']}/{r['kind']}"
      f"{'_' + r['cache'] if r['cache'] else ''}_us_per_token": r['us_per_token']
      for r in rows})
  writer.close()
  return text
