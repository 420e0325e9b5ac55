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

import datetime
import importlib.util
import json
import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
from ml_collections import config_flags

from mqa_flax import bleu as bleu_lib
from mqa_flax import checkpoint as ckpt_lib
from mqa_flax import data
from mqa_flax import inference
from mqa_flax import metrics as metrics_lib
from mqa_flax import train_lib
from mqa_flax.config import ModelConfig
from mqa_flax.tokenizer import Tokenizer

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
_B_BATCH = flags.DEFINE_integer('bench_batch', 1024, 'benchmark: greedy batch.')
_B_BEAM_BATCH = flags.DEFINE_integer('bench_beam_batch', 256, 'benchmark: beam-4 sentences.')
_B_SRC = flags.DEFINE_integer('bench_src_len', 128, 'benchmark: source length.')
_B_TGT = flags.DEFINE_integer('bench_tgt_len', 128, 'benchmark: target length.')
_B_TRAIN = flags.DEFINE_list('bench_train_shape', ['128', '256'], 'benchmark: train rows, length.')
_B_REPS = flags.DEFINE_integer('bench_reps', 5, 'benchmark: timed repetitions.')
_B_KINDS = flags.DEFINE_list('bench_kinds', ['encoder', 'greedy', 'beam4', 'train'],
                             'benchmark: what to time.')


def load_run(workdir: str, step: int | None):
  """Config, tokenizer, graphdef, params and step of a trained workdir."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{workdir} holds no config.json: is it a trained workdir?')
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  if _CONFIG.value is not None:
    ckpt_lib.check_same_architecture(workdir, _CONFIG.value.to_dict())
  spm = os.path.join(workdir, 'spm.model')
  if not os.path.exists(spm):
    raise FileNotFoundError(f'{workdir} holds no vocabulary (spm.model)')
  tokenizer = Tokenizer(spm)
  cfg = ModelConfig.from_config(config.model, tokenizer.vocab_size)
  ckpt = ckpt_lib.Checkpointer(workdir, config.keep_checkpoints)
  step = ckpt.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'{workdir}/checkpoints holds no checkpoint: train first')
  tx = train_lib.make_optimizer(config.opt, config.num_train_steps)
  graphdef, abstract = train_lib.abstract_state(cfg, tx, config.seed)
  state = ckpt.restore_state(abstract, step)
  ckpt.close()
  logging.info('restored %s step %d', workdir, step)
  return config, tokenizer, graphdef, state.params, step


def _translate(config, tokenizer, graphdef, params, sentences, beam_size):
  dc = config.decode
  return inference.translate(
      graphdef, params, tokenizer, sentences,
      batch_size=_BATCH.value or config.data.eval_batch_size, beam_size=beam_size,
      alpha=dc.alpha if _ALPHA.value is None else _ALPHA.value,
      max_len_a=dc.max_len_a, max_len_b=dc.max_len_b,
      max_src_len=config.data.max_eval_len, overlong=dc.overlong, progress=True)


def run_bleu(workdir: str) -> dict:
  """Decodes a split, scores it with sacreBLEU and records it in bleu.json."""
  config, tokenizer, graphdef, params, step = load_run(workdir, _STEP.value)
  beam = config.decode.beam_size if _BEAM.value is None else _BEAM.value
  split = {'dev': config.data.dev_split, 'test': config.data.test_split}.get(
      _SPLIT.value, _SPLIT.value)
  sources, references = data.read_split(config.data, split)
  hyps = _translate(config, tokenizer, graphdef, params, sources, beam)
  scores = bleu_lib.bleu_scores(hyps, references)
  name = _NAME.value or _SPLIT.value.replace('/', '_')
  search = 'greedy' if beam == 1 else f'beam{beam}'
  os.makedirs(os.path.join(workdir, 'hyps'), exist_ok=True)
  with open(os.path.join(workdir, 'hyps', f'{name}.{search}.txt'), 'w') as f:
    f.writelines(h + '\n' for h in hyps)
  entry = {'bleu_13a': scores['bleu_13a'], 'bleu_intl': scores['bleu_intl'],
           'bleu_13a_lc': scores['bleu_13a_lc'],
           'signature_13a': scores['bleu_13a_signature'],
           'signature_intl': scores['bleu_intl_signature'],
           'num_sentences': scores['num_sentences'], 'checkpoint_step': step,
           'split': split, 'beam_size': beam,
           'date': datetime.datetime.now(datetime.timezone.utc).isoformat()}
  path = os.path.join(workdir, 'bleu.json')
  table = json.load(open(path)) if os.path.exists(path) else {}
  table[f'{name}/{search}'] = entry
  with open(path, 'w') as f:
    json.dump(table, f, indent=1)
  writer = metrics_lib.MetricWriter(workdir)
  writer.write_scalars(step, {f'decode/{name}_{search}_bleu': entry['bleu_13a']})
  writer.close()
  print(f"{name} {search}: BLEU {entry['bleu_13a']:.2f} ({entry['signature_13a']}), "
        f"intl {entry['bleu_intl']:.2f}, lowercased {entry['bleu_13a_lc']:.2f}")
  return entry


def run_translate(workdir: str) -> None:
  """Translates lines of --input into --output; empty lines stay empty."""
  config, tokenizer, graphdef, params, _ = load_run(workdir, _STEP.value)
  src = sys.stdin if _INPUT.value == '-' else open(_INPUT.value, encoding='utf-8')
  lines = [line.rstrip('\n') for line in src]
  beam = config.decode.beam_size if _BEAM.value is None else _BEAM.value
  hyps = _translate(config, tokenizer, graphdef, params, lines, beam)
  out = sys.stdout if _OUTPUT.value == '-' else open(_OUTPUT.value, 'w', encoding='utf-8')
  out.writelines(h + '\n' for h in hyps)
  out.flush()


def _variant_configs() -> dict[str, ModelConfig]:
  """ModelConfigs for --variants of --config's file, with its overrides."""
  flag = flags.FLAGS['config']
  path = config_flags.get_config_filename(flag)
  spec = importlib.util.spec_from_file_location('_bench_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  _, _, arg = flag.serialize().partition(':')
  suffix = ''.join(',' + f for f in arg.split(',')[1:])
  out = {}
  for v in _VARIANTS.value:
    c = module.get_config(v + suffix)
    for key, value in config_flags.get_override_values(flag).items():
      *parents, leaf = key.split('.')
      node = c
      for p in parents:
        node = node[p]
      node[leaf] = value
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
    config, tokenizer, _, params, _ = load_run(_WORKDIR.value, _STEP.value)
    variants = {config.variant: ModelConfig.from_config(config.model, tokenizer.vocab_size)}
    states = {config.variant: params}
  else:
    raise app.UsageError('benchmark needs --variants (with --config) or --workdir')
  train_rows, train_len = (int(x) for x in _B_TRAIN.value)
  rows = benchmark.run(
      variants, states=states, batch=_B_BATCH.value, src_len=_B_SRC.value,
      tgt_len=_B_TGT.value, beam_batch=_B_BEAM_BATCH.value, train_batch=train_rows,
      train_len=train_len, reps=_B_REPS.value, kinds=tuple(_B_KINDS.value))
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
