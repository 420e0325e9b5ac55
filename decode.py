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

import importlib.util
import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from configs import variants as variant_lib
from mqa_flax import data
from mqa_flax import errors
from mqa_flax import runs
from mqa_flax.config import ModelConfig

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
_ALPHA = flags.DEFINE_float('alpha', None, 'Length penalty; default config.decode.alpha.')
_BATCH = flags.DEFINE_integer('batch_size', None, 'Sentences per batch; default config.')
_STEP = flags.DEFINE_integer('step', None, 'Train checkpoint step (default: the '
                             "run's best parameters on dev, else the latest).")
_TRANSLATE_BLOCK = 512  # translate: lines sorted by length and written together.
_VARIANTS = flags.DEFINE_list('variants', [], 'benchmark: variants of --config.')
_OUT = flags.DEFINE_string('out', None, 'benchmark: output directory (default workdir).')
_B_BATCH = flags.DEFINE_list('bench_batch', ['1024'],
                             'benchmark: greedy batch sizes; all kinds at the first, '
                             'encoder and greedy at the others (decoder time vs batch).')
_B_BEAM_BATCH = flags.DEFINE_integer('bench_beam_batch', 256, 'benchmark: beam-4 sentences.')
_B_SRC = flags.DEFINE_integer('bench_src_len', 128, 'benchmark: source length.')
_B_TGT = flags.DEFINE_integer('bench_tgt_len', 128, 'benchmark: target length.')
_B_TRAIN = flags.DEFINE_list('bench_train_shape', ['128', '256'], 'benchmark: train rows, length.')
_B_REPS = flags.DEFINE_integer('bench_reps', 5, 'benchmark: timed repetitions.')
_B_KINDS = flags.DEFINE_list('bench_kinds', ['encoder', 'greedy', 'beam4', 'train'],
                             'benchmark: what to time.')
_B_IMPLS = flags.DEFINE_list(
    'bench_impls', [], 'benchmark: decoder implementations to compare in this '
    "one process, each 'attention_impl/cache_layout' (impl: xla, cudnn, pallas; "
    "layout: BLKH, BKLH; a bare impl means BLKH), timed in this order, one row "
    "each, e.g. xla/BLKH,xla/BKLH,pallas/BKLH,cudnn/BLKH. One that fails to "
    "compile or run gives an error row. Default: the config's decode values.")


def _beam_sizes() -> list[int | None]:
  try:
    sizes = [int(b) for b in _BEAM.value] or [None]
  except ValueError:
    raise app.UsageError(f'--beam_size={",".join(_BEAM.value)}: expected integers')
  if any(b is not None and b < 1 for b in sizes):
    raise app.UsageError('--beam_size must be at least 1')
  return sizes


def run_bleu(workdir: str) -> list[dict]:
  """Scores every --split and --test_sets at every --beam_size, one restore."""
  named = [(_NAME.value if len(_SPLIT.value) == 1 else None, s) for s in _SPLIT.value]
  for item in _TEST_SETS.value:
    name, sep, spec = item.partition('=')
    if not (sep and name and spec):
      raise app.UsageError(f'--test_sets item {item!r}: expected name=path_prefix')
    named.append((name, spec))
  run = runs.restore(workdir, _STEP.value, _CONFIG.value)
  entries = []
  for beam in _beam_sizes():
    beam = run.config.decode.beam_size if beam is None else beam
    for name, split in named:
      entry = runs.score_split(run, split, beam, name, _ALPHA.value, _BATCH.value,
                               progress=True)
      search = 'greedy' if beam == 1 else f'beam{beam}'
      print(f"{name or split} {search}: BLEU {entry['bleu_13a']:.2f} "
            f"({entry['signature_13a']}), intl {entry['bleu_intl']:.2f}, "
            f"lowercased {entry['bleu_13a_lc']:.2f} [{run.checkpoint} checkpoint, "
            f"step {run.step}]", flush=True)
      if 'not_written' in entry:
        logging.error('%s %s: hypotheses and bleu.json not written: %s',
                      name or split, search, entry['not_written'])
      entries.append(entry)
  unsaved = [e['not_written'] for e in entries if 'not_written' in e]
  if unsaved:
    raise errors.UserError(f'the scores above were printed but not recorded in '
                           f'{workdir} ({unsaved[0]}): make it writable and rerun')
  return entries


def run_translate(workdir: str) -> None:
  """Translates lines of --input into --output, one output line per input line.

  Lines split at '\\n' only, as in training. Output is written in input order
  block by block as it is finished, so a stopped run keeps what it translated.
  """
  beams = _beam_sizes()
  if len(beams) > 1:
    raise app.UsageError('translate takes one --beam_size')
  name = 'stdin' if _INPUT.value == '-' else _INPUT.value
  if _INPUT.value == '-':
    raw = sys.stdin.buffer.read()
  else:
    with open(_INPUT.value, 'rb') as f:  # A bad path fails before the model loads.
      raw = f.read()
  lines = data.split_lines(raw, name, _INVALID_UTF8.value)
  out = (sys.stdout if _OUTPUT.value == '-' else
         open(_OUTPUT.value, 'w', encoding='utf-8', newline='\n'))
  run = runs.restore(workdir, _STEP.value, _CONFIG.value)
  done = 0
  try:
    for start in range(0, len(lines), _TRANSLATE_BLOCK):
      hyps = runs.translate_run(run, lines[start:start + _TRANSLATE_BLOCK], beams[0],
                                _ALPHA.value, _BATCH.value, progress=_OUTPUT.value != '-')
      out.writelines(' '.join(h.splitlines()) + '\n' for h in hyps)
      out.flush()
      done += len(hyps)
  except (KeyboardInterrupt, errors.Stopped):
    raise errors.Stopped(f'stopped after translating {done} of {len(lines)} lines '
                         f'(written to {_OUTPUT.value if out is not sys.stdout else "stdout"})')
  finally:
    if out is not sys.stdout:
      out.close()


def _variant_configs() -> dict[str, ModelConfig]:
  """ModelConfigs for --variants of --config's file, with its overrides."""
  flag = flags.FLAGS['config']
  path = config_flags.get_config_filename(flag).partition(':')[0]
  spec = importlib.util.spec_from_file_location('_bench_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  _, _, arg = flag.serialize().partition(':')
  suffix = ''.join(',' + f for f in arg.split(',')[1:])
  out = {}
  for v in _VARIANTS.value:
    c = module.get_config(v + suffix)
    variant_lib.set_values(c, config_flags.get_override_values(flag))
    out[v] = ModelConfig.from_config(c.model, c.data.vocab_size, c.decode)
  return out


def run_benchmark() -> str:
  """Times encoder, greedy and beam-4 decoding and a train step per token."""
  from mqa_flax import benchmark  # pylint: disable=g-import-not-at-top
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
  command = ' '.join(sys.argv)
  emit = benchmark.row_appender(out, command)  # Each row as it is measured.
  impls = benchmark.parse_impls(_B_IMPLS.value) or None
  rows = []
  for i, batch in enumerate(int(b) for b in _B_BATCH.value):
    kinds = [k for k in _B_KINDS.value if i == 0 or k in ('encoder', 'greedy')]
    rows += benchmark.run(
        variants, states=states, batch=batch, src_len=_B_SRC.value,
        tgt_len=_B_TGT.value, beam_batch=_B_BEAM_BATCH.value, train_batch=train_rows,
        train_len=train_len, reps=_B_REPS.value, kinds=tuple(kinds),
        impls=impls, emit=emit)
  table = benchmark.write_outputs(rows, out, command, append=False)
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
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  check_one_process()
  logging.get_absl_handler().addFilter(lambda r: 'orbax' not in r.pathname)
  logging.info('JAX %s on %s', jax.__version__, jax.devices()[0].device_kind)
  if _MODE.value == 'benchmark':
    run_benchmark()
    return
  if not _WORKDIR.value:
    raise app.UsageError(f'--mode={_MODE.value} needs --workdir')
  if _MODE.value == 'bleu':
    run_bleu(_WORKDIR.value)
  else:
    run_translate(_WORKDIR.value)


if __name__ == '__main__':
  errors.run(main)
