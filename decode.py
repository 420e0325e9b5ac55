"""Translates, scores BLEU and times incremental decoding (the paper's Table 2).

  python decode.py --workdir=runs/demo-mqa --mode=bleu --split=test --beam_size=4
  python decode.py --workdir=runs/demo-mqa --mode=translate < input.en
  python decode.py --mode=benchmark --config=configs/paper.py:mha \
      --variants=mha,mqa,gqa2,mha_local,mqa_local --out=runs/bench

translate and bleu restore the workdir's latest checkpoint (or --step) with
its vocabulary and config.json. benchmark times random weights for each of
--variants of --config, or the workdir's trained model when --variants is
empty.
"""

import importlib.util
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from configs import variants as variant_lib
from mqa_flax import runs
from mqa_flax.config import ModelConfig

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file (benchmark); default: the workdir\'s config.json.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Trained run directory.')
_MODE = flags.DEFINE_enum('mode', 'bleu', ['translate', 'bleu', 'benchmark'], 'What to do.')
_SPLIT = flags.DEFINE_string(
    'split', 'test', "bleu: 'dev', 'test' or a split spec of the data source "
    "(e.g. 'wmt14_ende_eval/newstest2014' for the text source).")
_NAME = flags.DEFINE_string('name', None, 'bleu: key in bleu.json (default: --split).')
_INPUT = flags.DEFINE_string('input', '-', 'translate: input file, - for stdin.')
_OUTPUT = flags.DEFINE_string('output', '-', 'translate: output file, - for stdout.')
_BEAM = flags.DEFINE_integer('beam_size', None, 'Beams (1: greedy); default config.decode.')
_ALPHA = flags.DEFINE_float('alpha', None, 'Length penalty; default config.decode.alpha.')
_BATCH = flags.DEFINE_integer('batch_size', None, 'Sentences per batch; default config.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: latest).')
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


def run_bleu(workdir: str) -> dict:
  """Decodes --split, scores it with sacreBLEU and records it in bleu.json."""
  run = runs.restore(workdir, _STEP.value, _CONFIG.value)
  beam = run.config.decode.beam_size if _BEAM.value is None else _BEAM.value
  entry = runs.score_split(run, _SPLIT.value, beam, _NAME.value, _ALPHA.value,
                                _BATCH.value, progress=True)
  search = 'greedy' if beam == 1 else f'beam{beam}'
  print(f"{_NAME.value or _SPLIT.value} {search}: BLEU {entry['bleu_13a']:.2f} "
        f"({entry['signature_13a']}), intl {entry['bleu_intl']:.2f}, "
        f"lowercased {entry['bleu_13a_lc']:.2f}")
  return entry


def run_translate(workdir: str) -> None:
  """Translates lines of --input into --output; empty lines stay empty."""
  run = runs.restore(workdir, _STEP.value, _CONFIG.value)
  src = sys.stdin if _INPUT.value == '-' else open(_INPUT.value, encoding='utf-8')
  lines = [line.rstrip('\n') for line in src]
  hyps = runs.translate_run(run, lines, _BEAM.value, _ALPHA.value, _BATCH.value,
                                 progress=_OUTPUT.value != '-')
  out = sys.stdout if _OUTPUT.value == '-' else open(_OUTPUT.value, 'w', encoding='utf-8')
  out.writelines(h + '\n' for h in hyps)
  out.flush()


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
    out[v] = ModelConfig.from_config(c.model, c.data.vocab_size)
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
  rows = []
  for i, batch in enumerate(int(b) for b in _B_BATCH.value):
    kinds = [k for k in _B_KINDS.value if i == 0 or k in ('encoder', 'greedy')]
    rows += benchmark.run(
        variants, states=states, batch=batch, src_len=_B_SRC.value,
        tgt_len=_B_TGT.value, beam_batch=_B_BEAM_BATCH.value, train_batch=train_rows,
        train_len=train_len, reps=_B_REPS.value, kinds=tuple(kinds))
  out = _OUT.value or _WORKDIR.value or 'runs/benchmark'
  table = benchmark.write_outputs(rows, out, ' '.join(sys.argv))
  print(table)
  print(f'wrote {out}/benchmark.jsonl and {out}/table2.md')
  return table


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
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
  app.run(main)
