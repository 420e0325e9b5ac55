"""Per-token speed of training, encoding and incremental decoding (paper Table 2).

Every timing compiles first (`compile_s`), runs `warmup` calls, then takes the
median of `reps` calls, each ended by `jax.block_until_ready`. Rows, by kind:

- `train`: one `train_lib.train_step` on a fully packed [batch, len] batch;
  µs per target token.
- `encoder`: the encoder and the cross-attention K/V projection (done once
  per sentence) on [batch, src_len]; µs per source token, which is µs per
  output token at the paper's equal source and target lengths.
- `greedy`: exactly tgt_len incremental steps in one jitted loop, argmax fed
  back, EOS ignored, the donated cache a loop carry; µs per output token.
  Cache `padded` reads the whole fixed-size cache every step (the paper's);
  `growing` reads it up to the end of the current chunk of `chunk` steps
  (on average (chunk - 1) / 2 positions more than its floor counts).
- `beam4`: `decoding.beam_search` at `beam_size` beams; µs per output token
  of a sentence, time / (sentences * tgt_len), as the paper counts.

The decoder's cache is built outside the timed function. Each time sits
beside a memory floor (`bytes_per_step` from `summary.analyze` over the
measured copy bandwidth; decoding only: training and encoder traffic is not
modelled, so those fields are null) and a compute floor (FLOPs per token from
`summary.analyze` over the measured matmul throughput); `fraction_of_*` is
floor / measured, at most 1 up to noise. Decoder rows also give
`loop_copy_bytes_per_step`: the K/V-cache-shaped copies XLA put inside the
compiled loop (0 when the cache is updated in place). Inference kinds use
weights cast to the compute dtype, as `analyze` assumes.
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

KINDS = ('encoder', 'greedy', 'beam4', 'train')
CACHE_MODES = ('padded', 'growing')
_NO_EOS = -1  # Matches no token, so every row decodes all tgt_len steps.
_ADAMW = dict(optimizer='adamw', learning_rate=1e-3, warmup_steps=1,
              schedule='rsqrt', b1=0.9, b2=0.98, weight_decay=0.0, grad_clip=1.0)
# summary.analyze traces the model on each call; a variant's rows share calls.
_analyze = functools.lru_cache(summary.analyze)


def _timed(fn: Callable, make_args: Callable[[Any], tuple], *, reps: int,
           warmup: int, donate: tuple[int, ...] = ()) -> tuple[Any, float, float]:
  """(compiled, compile seconds, median seconds per call) of jit(fn).

  `make_args(previous_output)` gives each call's arguments (fresh ones where
  they are donated), built before the clock starts.
  """
  args = make_args(None)
  start = time.perf_counter()
  compiled = jax.jit(fn, donate_argnums=donate).lower(*args).compile()
  compile_s = time.perf_counter() - start
  out, times = None, []
  for i in range(warmup + reps):
    args = make_args(out) if i else args
    jax.block_until_ready(args)
    start = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return compiled, compile_s, statistics.median(times[warmup:])


def measure_bandwidth(nbytes: int | None = None, reps: int = 5) -> float:
  """Memory bandwidth, GB/s: bytes read + written by a jitted x + 1.

  x is 1 GiB on accelerators and 64 MiB on CPU unless `nbytes` is given.
  """
  nbytes = nbytes or (2**26 if jax.default_backend() == 'cpu' else 2**30)
  x = jnp.zeros((nbytes // 4,), jnp.float32)
  _, _, sec = _timed(lambda a: a + 1, lambda _: (x,), reps=reps, warmup=1)
  return 2 * x.nbytes / sec / 1e9


def measure_matmul_flops(dtype: str = 'float32', n: int | None = None,
                         reps: int = 5) -> float:
  """Throughput of an [n, n] @ [n, n] matmul in `dtype`, TFLOP/s.

  n is 8192 on accelerators and 512 on CPU unless given.
  """
  n = n or (512 if jax.default_backend() == 'cpu' else 8192)
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  _, _, sec = _timed(jnp.matmul, lambda _: (a, a), reps=reps, warmup=1)
  return 2 * n**3 / sec / 1e12


def greedy_tokens(model: Transformer, cache: Cache, steps: int,
                  chunk: int | None = None) -> tuple[jax.Array, Cache]:
  """Greedy decoding of exactly `steps` tokens, EOS ignored: (tokens [B, T], cache).

  `cache` comes from `init_cache` with beam_size 1 and is the loop carry.
  Without `chunk` every step reads the whole cache (`padded`); with it the
  steps run as loops of `chunk` steps, each reading the cache only up to the
  end of its chunk (`growing`).
  """
  def step(read_len, t, carry):
    tokens, cache = carry
    ids = jnp.where(t == 0, 0, tokens[:, jnp.maximum(t - 1, 0)])
    logits, cache = model.decode_step(ids, cache, read_len=read_len)
    return tokens.at[:, t].set(jnp.argmax(logits, -1).astype(jnp.int32)), cache

  carry = (jnp.zeros((cache['src_mask'].shape[0], steps), jnp.int32), cache)
  for start in range(0, steps, chunk or steps):
    end = min(start + (chunk or steps), steps)
    body = functools.partial(step, end if chunk else None)
    carry = jax.lax.fori_loop(start, end, body, carry)
  return carry


_HLO_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 'bf16': 2, 'f16': 2, 's16': 2,
              'f32': 4, 's32': 4, 'u32': 4, 'f64': 8, 's64': 8, 'u64': 8}


def loop_copy_bytes(hlo_text: str, shapes: Sequence[Sequence[int]]) -> int:
  """Most bytes one iteration of any while loop copies into arrays like `shapes`.

  Reads compiled HLO text: `copy` ops and fusions XLA named `copy*` in while
  bodies, whose non-unit dimensions are, in some order, those of one of
  `shapes` (the K/V cache leaves, say). A loop that updates its cache in
  place copies none.
  """
  keys = {tuple(sorted(d for d in s if d != 1)) for s in shapes}
  bodies = set(re.findall(r'body=%([\w.\-]+)', hlo_text))
  per_body, computation = collections.Counter(), None
  for line in hlo_text.splitlines():
    head = re.match(r'(?:ENTRY )?%([\w.\-]+) .*\{$', line)
    op = re.match(r'\s*(?:ROOT )?%(\S+) = (\w+)\[([\d,]*)\]\S* (\w+)\(', line)
    if head:
      computation = head.group(1)
    elif computation in bodies and op and op.group(2) in _HLO_BYTES:
      name, dtype, dims, kind = op.groups()
      dims = [int(d) for d in dims.split(',') if d]
      if (kind == 'copy' or kind == 'fusion' and name.startswith('copy')) and (
          tuple(sorted(d for d in dims if d != 1)) in keys):
        per_body[computation] += _HLO_BYTES[dtype] * math.prod(dims)
  return max(per_body.values(), default=0)


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


def _encode(graphdef: nnx.GraphDef, params: nnx.State, inputs: jax.Array,
            max_len: int, beam_size: int = 1) -> Cache:
  model = nnx.merge(graphdef, params)
  return model.init_cache(model.encode(inputs), inputs, max_len, beam_size)


def _time_encoder(cfg: ModelConfig, graphdef: nnx.GraphDef, params: nnx.State,
                  b: int, s: int, t: int, seed: int, dev: dict,
                  timing: dict) -> dict:
  def cross_kv(p, inputs):  # The empty self cache is dead code: not timed.
    return [(c['cross_k'], c['cross_v'])
            for c in _encode(graphdef, p, inputs, t)['layers']]

  inputs = _random_ids(seed, (b, s), cfg.vocab_size)
  _, compile_s, sec = _timed(cross_kv, lambda _: (params, inputs), **timing)
  flops = _analyze(cfg, b, s, t, 1)['encoder_flops_per_token']
  return dict(kind='encoder', cache=None, batch=b, compile_s=compile_s,
              **_fields(None, 1, b * s, flops, sec, dev))


def _time_decoder(cfg: ModelConfig, graphdef: nnx.GraphDef, params: nnx.State,
                  b: int, beams: int, modes: Sequence[str], s: int, t: int,
                  chunk: int, seed: int, dev: dict, timing: dict) -> list[dict]:
  inputs = _random_ids(seed, (b, s), cfg.vocab_size)
  make_cache = jax.jit(functools.partial(_encode, graphdef, max_len=t,
                                         beam_size=beams))
  shapes = jax.eval_shape(make_cache, params, inputs)
  k, h = cfg.num_kv_heads, cfg.head_dim
  kv_shapes = [(b, s, k, h)] + [(b * beams, n, k, h) for n in range(
      1, shapes['layers'][0]['k'].shape[1] + 1)]
  stats = _analyze(cfg, b, s, t, beams)
  rows = []
  for mode in modes:
    if beams == 1:
      fn = lambda p, c, m=mode: greedy_tokens(
          nnx.merge(graphdef, p), c, t, chunk if m == 'growing' else None)
    else:
      fn = lambda p, c: decoding.beam_search(
          nnx.merge(graphdef, p).decode_step, c, b, beams, t, _NO_EOS,
          stop_at_eos=False)
    # beam_search returns no cache, so its cache could not be donated.
    compiled, compile_s, sec = _timed(
        fn, lambda _: (params, make_cache(params, inputs)),
        donate=(1,) if beams == 1 else (), **timing)
    rows.append(dict(
        kind='greedy' if beams == 1 else f'beam{beams}', cache=mode, batch=b,
        beam_size=beams, compile_s=compile_s, kv_cache_bytes=cache_bytes(shapes),
        loop_copy_bytes_per_step=loop_copy_bytes(compiled.as_text(), kv_shapes),
        **_fields(stats[f'decode_bytes_per_step_{mode}'], t, b * t,
                  beams * stats['decode_flops_per_token'], sec, dev)))
  return rows


def _time_train(cfg: ModelConfig, graphdef: nnx.GraphDef, params: nnx.State,
                b: int, length: int, opt_config: ml_collections.ConfigDict,
                seed: int, dev: dict, timing: dict) -> dict:
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
  flops = _analyze(cfg, b, length, length, 1)['train_flops_per_token']
  return dict(kind='train', cache=None, batch=b, src_len=length, tgt_len=length,
              compile_s=compile_s, **_fields(None, 1, b * length, flops, sec, dev))


def run(variants: dict[str, ModelConfig], *,
        states: dict[str, nnx.State] | None = None, batch: int = 1024,
        src_len: int = 128, tgt_len: int = 128, beam_batch: int = 256,
        beam_size: int = 4, train_batch: int = 128, train_len: int = 256,
        cache_modes: Sequence[str] = CACHE_MODES, reps: int = 5,
        warmup: int = 1, kinds: Sequence[str] = KINDS, chunk: int = 16,
        seed: int = 0,
        opt_config: ml_collections.ConfigDict | None = None) -> list[dict]:
  """Times each kind for each variant; returns one dict per benchmark row.

  Args:
    variants: name -> config.
    states: optional name -> trained parameters (`nnx.State` of the Params);
      other variants get random weights, `Transformer(cfg, nnx.Rngs(seed))`.
    batch: sentences decoded greedily.
    beam_batch: sentences of beam search, each with `beam_size` beams. Kind
      'beam4' selects beam search; its rows are labelled f'beam{beam_size}'.
    cache_modes: greedy cache modes; beam search is padded only.
    kinds: from KINDS; the encoder is timed at the greedy and beam batches.
    chunk: steps per loop in growing mode.
    opt_config: `config.opt` for `train_lib.make_optimizer`; default AdamW.
  """
  if set(kinds) - set(KINDS) or set(cache_modes) - set(CACHE_MODES):
    raise ValueError(f'kinds={kinds} must be from {KINDS} and '
                     f'cache_modes={cache_modes} from {CACHE_MODES}')
  dev = dict(device=jax.devices()[0].device_kind, platform=jax.default_backend(),
             device_gbps=measure_bandwidth(), jax_version=jax.__version__,
             date=datetime.datetime.now(datetime.timezone.utc).isoformat(
                 timespec='seconds'))
  timing = dict(reps=reps, warmup=warmup)
  opt_config = opt_config or ml_collections.ConfigDict(_ADAMW)
  decoders = [(batch, 1, cache_modes)] if 'greedy' in kinds else []
  if 'beam4' in kinds:
    decoders.append((beam_batch, beam_size, ('padded',)))
  tflops, rows = {}, []
  for name, cfg in variants.items():
    if cfg.dtype not in tflops:
      tflops[cfg.dtype] = measure_matmul_flops(cfg.dtype)
    d = dict(dev, device_tflops=tflops[cfg.dtype])
    if name in (states or {}):
      params = states[name]
      graphdef = nnx.graphdef(nnx.eval_shape(
          lambda c=cfg: Transformer(c, rngs=nnx.Rngs(0))))
    else:
      graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(seed)),
                                   nnx.Param)
    infer = jax.tree.map(lambda x, c=cfg: x.astype(c.compute_dtype), params)
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
    common = dict(variant=name, dtype=cfg.dtype, num_heads=cfg.num_heads,
                  num_kv_heads=cfg.num_kv_heads, src_len=src_len,
                  tgt_len=tgt_len, reps=reps, **d)
    rows += [dict(common, **r) for r in new]
  return rows


def _git_commit() -> str | None:
  try:
    return subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True,
                          text=True, check=True,
                          cwd=os.path.dirname(__file__)).stdout.strip() or None
  except (OSError, subprocess.CalledProcessError):
    return None


def write_outputs(rows: Sequence[dict], out_dir: str, command: str) -> str:
  """Appends rows to benchmark.jsonl; writes table2.md and TensorBoard scalars.

  Returns the markdown: `report.table2` of these rows, the device
  measurements, and each row's compute floor and in-loop cache copies.
  """
  os.makedirs(out_dir, exist_ok=True)
  commit = _git_commit()
  with open(os.path.join(out_dir, 'benchmark.jsonl'), 'a') as f:
    for r in rows:
      f.write(json.dumps(dict(r, command=command, git_commit=commit)) + '\n')
  devices = dict.fromkeys(
      f"{r['device']} ({r['dtype']}): copy {r['device_gbps']:.0f} GB/s, "
      f"matmul {report.num(r['device_tflops'])} TFLOP/s" for r in rows)
  copies = lambda r: (report.DASH if r.get('loop_copy_bytes_per_step') is None
                      else f"{r['loop_copy_bytes_per_step'] / 1e6:.3g}")
  floors = [[r['variant'], r['kind'], r['cache'] or report.DASH, r['batch'],
             report.num(r['flops_per_token'] / 1e6),
             report.num(r['compute_floor_us_per_token']),
             f"{r['fraction_of_compute_floor']:.3f}", copies(r)] for r in rows]
  text = (report.table2(rows) + '\nMeasured: ' + '; '.join(devices) +
          '. Memory floor: bytes per token / copy bandwidth (decoding only). '
          'Compute floor: FLOPs per token / matmul throughput.\n\n'
          '### Compute floor and in-loop cache copies\n\n' + report.md_table(
              ['variant', 'kind', 'cache', 'batch', 'MFLOP/token',
               'compute floor (µs/token)', 'fraction of compute floor',
               'cache copied per step (MB)'], floors))
  with open(os.path.join(out_dir, 'table2.md'), 'w') as f:
    f.write(text)
  writer = metrics.MetricWriter(out_dir)
  writer.write_scalars(0, {
      f"benchmark/{r['variant']}/{r['kind']}"
      f"{'_' + r['cache'] if r['cache'] else ''}_us_per_token": r['us_per_token']
      for r in rows})
  writer.close()
  return text
