"""Translates, scores BLEU and times incremental decoding (the paper's Table 2).

  python decode.py --workdir=runs/demo-mqa --mode=bleu --split=test --beam_size=4
  python decode.py --workdir=runs/m30k-mqa --mode=bleu --split=dev,test \
      --beam_size=1,4 --test_sets=newstest2014=wmt14_ende_eval/newstest2014
  python decode.py --workdir=runs/demo-mqa --mode=translate < input.en
  python decode.py --mode=benchmark --config=configs/paper.py:mha \
      --variants=mha,mqa,gqa2,mha_local,mqa_local --out=runs/bench

translate and bleu restore the workdir's parameters that were best on dev
(else its latest checkpoint; --step picks a train checkpoint) with its
vocabulary and config.json. benchmark times random weights for each of
--variants of --config, or the workdir's trained model when --variants is
empty.
"""

import functools
import math
import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from mqa_flax import data
from mqa_flax import errors
from mqa_flax import runs
from mqa_flax.config import ModelConfig, load_config, set_values

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file (benchmark); default: the workdir\'s config.json.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Trained run directory.')
_MODE = flags.DEFINE_enum('mode', 'bleu', ['translate', 'bleu', 'benchmark'], 'What to do.')
_SPLIT = flags.DEFINE_list(
    'split', ['test'], "bleu: splits to score, each 'dev', 'test' or a split spec "
    "of the data source (e.g. 'wmt14_ende_eval/newstest2014' for the text source).")
_TEST_SETS = flags.DEFINE_list(
    'test_sets', [], 'bleu: more parallel test sets as name=path prefix under '
    'data.data_dir (e.g. newstest2014=wmt14_ende_eval/newstest2014), each scored '
    'with the same checkpoint and recorded in bleu.json under its name.')
_NAME = flags.DEFINE_string('name', None, 'bleu: key in bleu.json for a single '
                            '--split (default: the split).')
_INPUT = flags.DEFINE_string('input', '-', 'translate: input file, - for stdin.')
_INVALID_UTF8 = flags.DEFINE_enum(
    'invalid_utf8', 'error', ['error', 'replace'], 'translate: an input line that '
    'is not UTF-8 is an error naming it, or (replace) decoded with U+FFFD '
    'characters, with a warning counting such lines.')
_OUTPUT = flags.DEFINE_string('output', '-', 'translate: output file, - for stdout.')
_BEAM = flags.DEFINE_list('beam_size', [], 'Beams (1: greedy); default config.decode. '
                          'bleu: a list scores each split with each (e.g. 1,4).')
_ALPHA = flags.DEFINE_float('alpha', None, 'Length penalty; default config.decode.alpha.',
                            lower_bound=0)
_BATCH = flags.DEFINE_integer('batch_size', None, 'Sentences per batch; default config.',
                              lower_bound=1)
_STEP = flags.DEFINE_integer('step', None, 'Train checkpoint step (default: the '
                             "run's best parameters on dev, else the latest).",
                             lower_bound=0)
_VARIANTS = flags.DEFINE_list('variants', [], 'benchmark: variants of --config.')
_OUT = flags.DEFINE_string('out', None, 'benchmark: output directory (default workdir).')
_B_BATCH = flags.DEFINE_list('bench_batch', ['1024'],
                             'benchmark: greedy batch sizes; all kinds at the first, '
                             'encoder and greedy at the others (decoder time vs batch).')
_B_BEAM_BATCH = flags.DEFINE_integer('bench_beam_batch', 256, 'benchmark: beam-4 sentences.',
                                     lower_bound=1)
_B_SRC = flags.DEFINE_integer('bench_src_len', 128, 'benchmark: source length.',
                              lower_bound=1)
_B_TGT = flags.DEFINE_integer('bench_tgt_len', 128, 'benchmark: target length.',
                              lower_bound=1)
_B_TRAIN = flags.DEFINE_list('bench_train_shape', ['128', '256'], 'benchmark: train rows, length.')
_B_REPS = flags.DEFINE_integer('bench_reps', 5, 'benchmark: timed repetitions.',
                               lower_bound=1)
_B_KINDS = flags.DEFINE_list('bench_kinds', ['encoder', 'greedy', 'beam4', 'train'],
                             'benchmark: what to time.')
_B_IMPLS = flags.DEFINE_list(
    'bench_impls', [], 'benchmark: decoder implementations to compare in this '
    "one process, each 'attention_impl/cache_layout[/argmax_impl]' (impl: xla, "
    "xla_reduce, cudnn, pallas; layout: BLKH, BKLH, BLKH if left out; greedy's "
    "argmax and beam's top-k: xla, pallas, xla if left out), timed in this order, one row each, "
    "e.g. xla/BKLH,xla_reduce/BKLH,xla_reduce/BKLH/pallas. One that fails to "
    "compile or run gives an error row. Default: the config's decode values.")
_CACHE_MODES = ('padded', 'growing')  # benchmark.CACHE_MODES (imported on use).
_B_CACHE_MODES = flags.DEFINE_list(
    'bench_cache_modes', list(_CACHE_MODES),
    'benchmark: cache modes of the decoder rows (padded, growing).')
_B_BEAM_CACHES = flags.DEFINE_list(
    'bench_beam_caches', [], "benchmark: beam rows' self-attention caches to "
    "compare in this one process, each 'reorder' or 'pointers' "
    '(config.decode.beam_cache), one row each; default: the config value.')
_B_SEQ_IMPLS = flags.DEFINE_list(
    'bench_seq_impls', [], 'benchmark: attention over whole sequences of the '
    'encoder and training rows to compare in this one process, each xla or '
    'cudnn (config.seq_attention_impl), one row each; default: the config value.')
_B_GEMM_IMPLS = flags.DEFINE_list(
    'bench_gemm_impls', [], "benchmark: how the decoder rows' programs do their "
    "GEMMs, each 'xla' (XLA's choice: Triton fusions, autotuned against cuBLAS) or "
    "'cublas' (every GEMM a cuBLAS call, XLA's epilogues inside it), one row each; "
    "default: xla.")
_B_NORM_IMPLS = flags.DEFINE_list(
    'bench_norm_impls', [], "benchmark: where the decoder rows' LayerNorms run, "
    "each 'xla' (a kernel each, its output read by the GEMM after it) or "
    "'pallas' (folded into that GEMM, mqa_flax.pallas_norm_gemm), one row each; "
    'default: the config value (config.decode.norm_impl).')
_B_PROFILE = flags.DEFINE_bool(
    'bench_profile', False, 'benchmark: run each padded decoder row once more '
    'under the profiler; its row then carries `profile`, the measured time of '
    'each kernel of the loop beside the bytes it moves (mqa_flax.kernel_times).')


def _positive_ints(values: list[str], count: int | None = None) -> bool:
  """Whether a list flag holds positive integers (exactly `count` if given)."""
  try:
    ints = [int(v) for v in values]
  except ValueError:
    return False
  return all(i >= 1 for i in ints) and (count is None or len(ints) == count)


for _name, _count in (('beam_size', None), ('bench_batch', None),
                      ('bench_train_shape', 2)):
  flags.register_validator(
      _name, functools.partial(_positive_ints, count=_count),
      f'--{_name} takes {"two" if _count else "a list of"} positive integers '
      '(comma-separated)')
flags.register_validator(
    'bench_cache_modes', lambda v: bool(v) and set(v) <= set(_CACHE_MODES),
    f'--bench_cache_modes takes some of {",".join(_CACHE_MODES)}')
flags.register_validator(
    'bench_beam_caches', lambda v: set(v) <= {'reorder', 'pointers'},
    '--bench_beam_caches takes reorder and/or pointers')
flags.register_validator(
    'bench_seq_impls', lambda v: set(v) <= {'xla', 'cudnn'},
    '--bench_seq_impls takes xla and/or cudnn')
flags.register_validator(
    'bench_gemm_impls', lambda v: set(v) <= {'xla', 'cublas'},
    '--bench_gemm_impls takes xla and/or cublas')
flags.register_validator(
    'bench_norm_impls', lambda v: set(v) <= {'xla', 'pallas'},
    '--bench_norm_impls takes xla and/or pallas')
flags.register_validator('alpha', lambda a: a is None or math.isfinite(a),
                         '--alpha must be a finite number >= 0')


def _beam_sizes() -> list[int | None]:
  return [int(b) for b in _BEAM.value] or [None]


def bleu_mode(workdir: str) -> list[dict]:
  """Scores every --split and --test_sets at every --beam_size, one restore."""
  named = [(_NAME.value if len(_SPLIT.value) == 1 else None, s) for s in _SPLIT.value]
  for item in _TEST_SETS.value:
    name, sep, spec = item.partition('=')
    if not (sep and name and spec):
      raise errors.UserError(f'--test_sets item {item!r}: expected name=path_prefix')
    named.append((name, spec))
  runs.check_bleu_file(workdir)  # Before decoding, not after.
  run = runs.restore(workdir, _STEP.value, _CONFIG.value)
  return runs.score_splits(run, named, _beam_sizes(), _ALPHA.value, _BATCH.value,
                           report=lambda line: print(line, flush=True))


def _same_file(output: str) -> bool:
  """Whether --output is the file --input names (or stdin reads), by inode."""
  if not os.path.exists(output):
    return False
  if _INPUT.value != '-':
    return os.path.samefile(_INPUT.value, output)
  stdin, out = os.fstat(sys.stdin.fileno()), os.stat(output)
  return (stdin.st_dev, stdin.st_ino) == (out.st_dev, out.st_ino)


def translate_mode(workdir: str) -> None:
  """Translates lines of --input into --output, one output line per input line
  (lines split at '\\n' only, as in training).

  Everything is checked (input, output folder, workdir, config, vocabulary,
  checkpoint) before anything is written; --output is replaced only when
  every line is translated (see `runs.translate_file`).
  """
  beams = _beam_sizes()
  if len(beams) > 1:
    raise errors.UserError('translate takes one --beam_size')
  to_stdout = _OUTPUT.value == '-'
  if not to_stdout:
    if _same_file(_OUTPUT.value):
      raise errors.UserError(f'--output={_OUTPUT.value} is the input file: choose '
                             'another --output (it would be overwritten)')
    folder = os.path.dirname(_OUTPUT.value) or '.'
    if not os.path.isdir(folder):
      raise errors.UserError(f'--output={_OUTPUT.value}: no folder {folder}')
  if _INPUT.value == '-':
    raw = sys.stdin.buffer.read()
  else:
    with open(_INPUT.value, 'rb') as f:  # A bad path fails before the model loads.
      raw = f.read()
  lines = data.split_lines(raw, 'stdin' if _INPUT.value == '-' else _INPUT.value,
                           _INVALID_UTF8.value)
  run = runs.restore(workdir, _STEP.value, _CONFIG.value)
  errors.check_stop()
  if to_stdout:
    runs.translate_lines(run, lines, sys.stdout, 'stdout', beams[0], _ALPHA.value,
                         _BATCH.value)
  else:
    runs.translate_file(run, lines, _OUTPUT.value, beams[0], _ALPHA.value,
                        _BATCH.value, progress=True)


def _variant_configs() -> dict[str, ModelConfig]:
  """ModelConfigs for --variants of --config's file, with its overrides."""
  flag = flags.FLAGS['config']
  path = config_flags.get_config_filename(flag).partition(':')[0]
  _, _, arg = flag.serialize().partition(':')
  suffix = ''.join(',' + f for f in arg.split(',')[1:])  # ',tiny' applies to all.
  out = {}
  for v in _VARIANTS.value:
    c = set_values(load_config(path, v + suffix), config_flags.get_override_values(flag))
    out[v] = ModelConfig.from_config(c.model, c.data.vocab_size, c.decode,
                                     c.seq_attention_impl)
  return out


def benchmark_mode() -> str:
  """Times encoder, greedy and beam-4 decoding and a train step per token."""
  from mqa_flax import benchmark, metrics, report  # pylint: disable=g-import-not-at-top
  states = None
  if _VARIANTS.value:
    if _CONFIG.value is None:
      raise app.UsageError('--variants needs --config (e.g. configs/paper.py:mha)')
    variants = _variant_configs()
  elif _WORKDIR.value:
    run = runs.restore(_WORKDIR.value, _STEP.value, _CONFIG.value)
    cfg = ModelConfig.from_config(run.config.model, run.tokenizer.vocab_size)
    variants, states = {run.config.variant: cfg}, {run.config.variant: run.params}
  else:
    raise app.UsageError('benchmark needs --variants (with --config) or --workdir')
  train_rows, train_len = (int(x) for x in _B_TRAIN.value)
  out = _OUT.value or _WORKDIR.value or 'runs/benchmark'
  emit = metrics.jsonl_appender(os.path.join(out, 'benchmark.jsonl'),
                                **metrics.provenance())
  rows = benchmark.run_at_batches(
      variants, [int(b) for b in _B_BATCH.value], _B_KINDS.value, states=states,
      src_len=_B_SRC.value, tgt_len=_B_TGT.value, beam_batch=_B_BEAM_BATCH.value,
      train_batch=train_rows, train_len=train_len, reps=_B_REPS.value,
      cache_modes=_B_CACHE_MODES.value, beam_caches=_B_BEAM_CACHES.value or None,
      seq_impls=_B_SEQ_IMPLS.value or None, gemm_impls=_B_GEMM_IMPLS.value or None,
      norm_impls=_B_NORM_IMPLS.value or None,
      impls=benchmark.parse_impls(_B_IMPLS.value) or None,
      profile=_B_PROFILE.value, emit=emit)
  table = report.write_benchmark(rows, out)
  print(table)
  print(f'wrote {out}/benchmark.jsonl and {out}/table2.md')
  return table


def check_one_process() -> None:
  """Refuses a multi-process launch: each process would decode everything alone."""
  count = max(int(os.environ.get('JAX_NUM_PROCESSES') or 1), jax.process_count())
  if count > 1:
    raise errors.UserError(
        f'decode.py runs in one process, not {count}: unset JAX_NUM_PROCESSES '
        'and run it once (one process uses all of its host\'s devices)')


def main(argv):
  del argv
  check_one_process()
  logging.info('JAX %s on %s', jax.__version__, jax.devices()[0].device_kind)
  if _MODE.value != 'benchmark' and not _WORKDIR.value:
    raise app.UsageError(f'--mode={_MODE.value} needs --workdir')
  # Signals stop the work between batches (benchmark: rows), never inside a
  # device computation.
  with errors.stop_between_steps():
    if _MODE.value == 'benchmark':
      benchmark_mode()
    elif _MODE.value == 'bleu':
      bleu_mode(_WORKDIR.value)
    else:
      translate_mode(_WORKDIR.value)


if __name__ == '__main__':
  errors.run(main)
