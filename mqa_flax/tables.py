"""The report's markdown: Table 1 (quality), Table 2 (speed) and their cells."""

import collections
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from mqa_flax.results import (ATTENTION_NAMES, PEER_VARIANT, RunFiles, attention_kind,
                              dev_ln_ppl)

DASH = '–'
# Known bleu.json keys first (the paper's columns); any other key follows.
BLEU_KEYS = ('dev/greedy', 'test/greedy', 'test/beam4')
KIND_ORDER = ('train', 'encoder', 'greedy', 'beam4')


def mean_std(values: Sequence[float | None], digits: int, total: int) -> str:
  """Formats 'mean ± std' (sample std) of the present values, '(n=k)' if k < total."""
  v = [x for x in values if x is not None and math.isfinite(x)]
  if not v:
    return DASH
  text = f'{np.mean(v):.{digits}f}'
  if len(v) > 1:
    text += f' ± {np.std(v, ddof=1):.{digits}f}'
  if len(v) < total:
    text += f' (n={len(v)})'
  return text


def num(x: float | None) -> str:
  """Formats a measurement with three significant digits ('1.70', '46.0', '203')."""
  if x is None or not math.isfinite(x):
    return DASH
  return f'{x:.0f}' if abs(x) >= 99.95 else f'{x:#.3g}'


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  """Returns a GitHub markdown table."""
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  lines += ['| ' + ' | '.join(str(c) for c in r) + ' |' for r in rows]
  return '\n'.join(lines) + '\n'


def attention_type(model: dict[str, Any]) -> str:
  """Describes the attention, e.g. 'multi-query h=8 K=1, local window 32'."""
  n, k = model.get('num_heads'), model.get('num_kv_heads')
  text = f'{ATTENTION_NAMES[attention_kind(n, k)]} h={n} K={k}'
  if model.get('local_window'):
    text += f', local window {model["local_window"]}'
  if model.get('kv_heads_scope', 'all') != 'all':
    text += f' (K in {model["kv_heads_scope"]} only)'
  return text


def bleu_keys(runs: Sequence[RunFiles]) -> list[str]:
  """Returns the bleu.json keys found, the paper's columns first."""
  found = {k for r in runs for k in r.bleu}
  return [k for k in BLEU_KEYS if k in found] + sorted(found - set(BLEU_KEYS))


def bleu_label(key: str) -> str:
  """Turns a bleu.json key into a column name: 'test/beam4' -> 'test BLEU beam-4'."""
  split, _, search = key.partition('/')
  return f'{split} BLEU {search.replace("beam", "beam-")}'


def bleu_cells(runs: Sequence[RunFiles], keys: Sequence[str], field: str) -> list[str]:
  """Returns 'mean ± std' of one bleu.json field over runs, per key."""
  return [mean_std([r.bleu.get(k, {}).get(field) for r in runs], 2, len(runs))
          for k in keys]


def provenance(records: Sequence[dict[str, Any]]) -> str:
  """The devices, dates, commits and commands that `records` (benchmark rows,
  bleu.json entries, launches.jsonl lines) name, as markdown."""
  values = lambda key: list(dict.fromkeys(str(r[key]) for r in records if r.get(key)))
  dates = sorted(values('date'))
  return (f'Device: {", ".join(sorted(values("device"))) or DASH}. '
          f'Date: {" to ".join(dict.fromkeys([dates[0], dates[-1]])) if dates else DASH}. '
          f'Code: {", ".join(sorted(values("git_commit"))) or DASH}.\n'
          + ''.join(f'\nCommand: `{c}`\n' for c in values('command')))


def table1(groups: dict[str, list[RunFiles]]) -> str:
  """Returns Table 1 (quality) as markdown: 13a BLEU, then intl BLEU."""
  runs = [r for g in groups.values() for r in g]
  keys = bleu_keys(runs)
  rows, rows_intl, fallback = [], [], False
  for label, g in groups.items():
    m, n = g[0].model, len(g)
    params = [r.summary.get('params_total') for r in g]
    params = [p / 1e6 for p in params if p is not None]
    ppl = [dev_ln_ppl(r) for r in g]
    ppl_cell = mean_std([v for v, _ in ppl], 3, n)
    if any(v is not None and not exact for v, exact in ppl):
      ppl_cell, fallback = ppl_cell + '*', True
    head = [label, attention_type(m), m.get('num_heads', DASH),
            m.get('num_kv_heads', DASH), m.get('head_dim', DASH),
            m.get('d_ff', DASH), f'{params[0]:.1f}' if params else DASH, n]
    rows.append(head + [ppl_cell] + bleu_cells(g, keys, 'bleu_13a'))
    rows_intl.append([label, n] + bleu_cells(g, keys, 'bleu_intl'))
  header = ['variant', 'attention', 'h', 'K', 'd_k', 'd_ff', 'params (M)', 'n',
            'dev ln(PPL)'] + [bleu_label(k) for k in keys]
  sigs = sorted({e['signature_13a'] for r in runs for e in r.bleu.values()
                 if e.get('signature_13a')})
  text = ('## Table 1: quality\n\n' + md_table(header, rows) +
          '\nBLEU: sacrebleu corpus BLEU, 13a tokenization, cased. dev ln(PPL): '
          'eval/ln_ppl per target token at the step of the checkpoint that '
          'bleu.json was decoded from.\n')
  if fallback:
    text += ('\n\\* No eval at that step (or no bleu.json) in at least one run: '
             'the minimum dev ln(PPL) over that run is used.\n')
  if sigs:
    text += '\nSignature: ' + '; '.join(f'`{s}`' for s in sigs) + '\n'
  text += '\n' + provenance([x for r in runs for x in r.launches + list(r.bleu.values())])
  if keys:
    text += ('\n### BLEU, intl tokenization\n\n' +
             md_table(['variant', 'n'] + [bleu_label(k) for k in keys], rows_intl))
  return text


def pick(rows: Sequence[dict[str, Any]], kind: str,
         like: dict[str, Any] | None = None) -> dict[str, Any] | None:
  """Returns the headline row of one kind: largest batch, then its fastest cache mode.

  With `like`, rows at that row's batch and source length are preferred.
  """
  rows = [r for r in rows if r.get('kind') == kind
          and r.get('us_per_token') is not None]
  if like is not None:
    same = [r for r in rows if (r.get('batch'), r.get('src_len'))
            == (like.get('batch'), like.get('src_len'))]
    rows = same or rows
  if not rows:
    return None
  batch = max(r.get('batch') or 0 for r in rows)
  return min((r for r in rows if (r.get('batch') or 0) == batch),
             key=lambda r: r['us_per_token'])


def detail_row(r: dict[str, Any], with_impl: bool = False) -> list[str]:
  """Formats one benchmark row for the table of every row."""
  ids = ('variant', 'kind', 'cache', 'batch', 'src_len', 'tgt_len', 'dtype')
  b, f = r.get('bytes_per_step'), r.get('fraction_of_floor')
  cells = [DASH if r.get(k) is None else str(r[k]) for k in ids]
  if r.get('kind') in ('train', 'encoder'):  # Attention over whole sequences.
    if r.get('seq_attention_impl') not in (None, 'xla'):
      cells[2] = r['seq_attention_impl']
  elif with_impl:
    cells[2] += f' {impl_label(r)}'
  return (cells +
          [num(r.get('us_per_token')), num(r.get('program_predicted_us_per_token')),
           num(r.get('compile_s')),
           DASH if b is None else f'{b / 1e6:.1f}', num(r.get('achieved_gbps')),
           num(r.get('floor_us_per_token')), DASH if f is None else f'{f:.2f}',
           DASH if r.get('tokens_same_fraction') is None
           else f"{r['tokens_same_fraction']:.3f}"])


def impl_label(r: dict[str, Any]) -> str:
  """'attention_impl/cache_layout' of a benchmark row (old rows: xla/BLKH),
  then '/argmax_impl' where greedy's argmax or beam's top-k is not XLA's,
  '/pointers' for beam rows whose K/V stay put (beam_cache 'pointers'),
  '/cublas' for programs whose GEMMs are all cuBLAS's (gemm_impl) and
  '/norm' where the LayerNorms are folded into their GEMMs (norm_impl
  'pallas')."""
  label = f"{r.get('attention_impl') or 'xla'}/{r.get('cache_layout') or 'BLKH'}"
  argmax = r.get('argmax_impl')
  label = label if argmax in (None, 'xla') else f'{label}/{argmax}'
  label += '/pointers' if r.get('beam_cache') == 'pointers' else ''
  label += '/cublas' if r.get('gemm_impl') == 'cublas' else ''
  return label + ('/norm' if r.get('norm_impl') == 'pallas' else '')


def peer_ratios(bench: Sequence[dict[str, Any]]) -> str:
  """'Flax WMT example / ours' for each of the peer's rows and each of our
  variants timed at the same kind, batch, lengths and device (our fastest
  row there); '' without such pairs."""
  same = lambda r: tuple(r.get(k) for k in ('kind', 'batch', 'src_len', 'tgt_len', 'device'))
  timed = [r for r in bench if r.get('us_per_token')]
  parts = []
  for peer in (r for r in timed if r.get('variant') == PEER_VARIANT):
    ours = {}
    for r in timed:
      if r.get('variant') != PEER_VARIANT and same(r) == same(peer):
        ours[r['variant']] = min(ours.get(r['variant'], math.inf), r['us_per_token'])
    if ours:
      parts.append(f"{peer['kind']} at batch {peer['batch']}: " + ', '.join(
          f"{v} {num(peer['us_per_token'] / u)}x" for v, u in ours.items()))
  if not parts:
    return ''
  return ('\nFlax WMT example / ours, µs per token at the same shape on the same '
          'device (above 1: ours is faster): ' + '; '.join(parts) + '.\n')


def _timed_decoder(r: dict[str, Any]) -> bool:
  return r.get('kind') not in ('train', 'encoder') and r.get('us_per_token') is not None


def table2(bench: Sequence[dict[str, Any]]) -> str:
  """Returns Table 2 (speed) and the table of every benchmark row as markdown.

  With decoder rows of several implementations (attention_impl/cache_layout),
  each variant gets one line per implementation it has rows of, labelled
  with it.
  """
  by_variant = collections.defaultdict(list)
  for r in bench:
    by_variant[r.get('variant', DASH)].append(r)
  labels = list(dict.fromkeys(impl_label(r) for r in bench if _timed_decoder(r)))
  many = len(labels) > 1
  us = lambda r: num(r['us_per_token']) if r else DASH
  rows = []
  for variant, rs in by_variant.items():
    train = pick(rs, 'train')
    own = {impl_label(r) for r in rs if _timed_decoder(r)}
    lines = [x for x in labels if x in own] if many and variant != PEER_VARIANT else []
    for label in lines or [None]:
      mine = [r for r in rs if label is None or impl_label(r) == label
              or r.get('kind') in ('train', 'encoder')]
      cells, batches = [], [train['batch'] if train else DASH]
      for kind in ('greedy', 'beam4'):
        dec = pick(mine, kind)
        enc = pick(mine, 'encoder', like=dec)
        cells.append(f'{us(enc)} + {us(dec)}' if dec or enc else DASH)
        batches.append(dec['batch'] if dec else DASH)
      rows.append([f'{variant} ({label})' if label else variant, us(train)]
                  + cells + [' / '.join(str(b) for b in batches)])
  header = ['variant', 'training step (µs/token)', 'greedy enc + dec (µs/token)',
            'beam-4 enc + dec (µs/token)', 'batch (train / greedy / beam-4)']
  order = {v: i for i, v in enumerate(by_variant)}
  detail = sorted(bench, key=lambda r: (
      order[r.get('variant', DASH)],
      KIND_ORDER.index(r['kind']) if r.get('kind') in KIND_ORDER else 9,
      str(r.get('cache')), r.get('batch') or 0, r.get('src_len') or 0,
      r.get('tgt_len') or 0))
  detail_rows = [detail_row(r, many) for r in detail
                 if r.get('us_per_token') is not None]
  return (
      '## Table 2: speed\n\n' + md_table(header, rows) +
      '\nPer variant and kind, the row with the largest batch and, of its '
      'cache modes, the fastest; the encoder is timed at the same batch and '
      'source length where measured. Decoding is µs per output token.\n'
      + peer_ratios(bench) + '\n' + provenance(bench) +
      '\n### Every benchmark row\n\n' +
      md_table(['variant', 'kind', 'cache', 'batch', 'S', 'T', 'dtype',
                'µs/token', 'predicted', 'compile (s)', 'MB/step', 'GB/s',
                'floor (µs/token)', 'fraction of floor', 'same tokens'],
               detail_rows) +
      '\npredicted: the µs/token `gpu_targets`\' cost model gives the program '
      'timed (padded decoder rows on an H100 or H200). same tokens: the '
      'fraction of its decoded tokens equal to those of the first decoder row '
      'of its variant, batch and beams (same weights and inputs; in bfloat16 '
      'rounding flips near ties, beam search\'s often: compare rows with each '
      'other).\n')
