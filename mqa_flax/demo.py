"""The README's first command: MHA vs MQA on the generated numbers task, on CPU.

  python -m mqa_flax.demo [--out=runs/demo] [--variants=mha,mqa]

Run it from the repository root. Trains configs/demo.py (--config_file) for
each variant (resuming if its workdir exists), scores the test split with
greedy and beam-4 search, times greedy decoding per output token at each of
--bench_batches, prints a side-by-side table and writes the report (with
its figures: speed against the floors, speed against batch, quality).
TensorBoard: tensorboard --logdir runs/demo
"""

import os

from absl import flags

from mqa_flax import benchmark
from mqa_flax import costs
from mqa_flax import errors
from mqa_flax import metrics
from mqa_flax import report
from mqa_flax import runs
from mqa_flax import tables
from mqa_flax import train_lib
from mqa_flax.config import ModelConfig, load_config

_CONFIG_FILE = flags.DEFINE_string('config_file', 'configs/demo.py',
                                   'Config file whose variants are trained.')
_OUT = flags.DEFINE_string('out', 'runs/demo', 'Where the runs and the report go.')
_VARIANTS = flags.DEFINE_list('variants', ['mha', 'mqa'], 'Variants of --config_file.')
_TINY = flags.DEFINE_bool('tiny', False, 'Reduced mode (tests): tiny models, few steps.')
_BATCHES = flags.DEFINE_list('bench_batches', ['16', '64', '256'],
                             'Batches at which greedy decoding is timed.')
_LEN = flags.DEFINE_integer('bench_len', 32, 'Source and target length of the timing.',
                            lower_bound=1)
flags.register_validator('bench_batches', lambda v: all(x.isdigit() and int(x) > 0 for x in v),
                         '--bench_batches takes positive integers, e.g. 16,64,256')


def run_variant(variant: str, out: str, tiny: bool) -> dict:
  """Trains, scores and times one variant; returns its row of the table."""
  config = load_config(_CONFIG_FILE.value, variant + (',tiny' if tiny else ''))
  workdir = os.path.join(out, variant)
  os.makedirs(workdir, exist_ok=True)
  train_lib.train_and_evaluate(config, workdir)
  run = runs.restore(workdir)
  greedy = runs.score_split(run, 'test', beam_size=1)
  beam = runs.score_split(run, 'test', beam_size=4)
  cfg = ModelConfig.from_config(config.model, run.tokenizer.vocab_size)
  emit = metrics.jsonl_appender(os.path.join(workdir, 'benchmark.jsonl'),
                                command=metrics.command(), git_commit=metrics.git_commit())
  rows = [row for batch in _BATCHES.value for row in benchmark.run(
      {variant: cfg}, states={variant: run.params}, batch=int(batch),
      src_len=_LEN.value, tgt_len=_LEN.value, kinds=('greedy',),
      cache_modes=('padded',), reps=3, emit=emit)]
  report.write_benchmark(rows, workdir)
  stats = costs.analyze(cfg, 1, _LEN.value, _LEN.value)
  ln_ppl = [r['eval/ln_ppl'] for r in metrics.read_jsonl(
      os.path.join(workdir, 'metrics.jsonl')) if 'eval/ln_ppl' in r]
  return {'variant': variant, 'K': cfg.num_kv_heads, 'params': stats['params_total'],
          'bleu_greedy': greedy['bleu_13a'], 'bleu_beam4': beam['bleu_13a'],
          'dev_ln_ppl': ln_ppl[-1], 'us_per_token': [r['us_per_token'] for r in rows],
          'kv_bytes': (stats['kv_cache_bytes_self_per_sequence'] +
                       stats['kv_cache_bytes_cross_per_sequence'])}


def format_rows(rows: list[dict], batches: list[str]) -> str:
  """The side-by-side table printed at the end."""
  times = lambda r: ' / '.join(tables.num(u) for u in r['us_per_token'])
  return tables.md_table(
      ['variant', 'K', 'params', 'test BLEU greedy', 'test BLEU beam-4', 'dev ln(PPL)',
       f"decoder µs/token (CPU, batch {' / '.join(batches)})", 'KV cache bytes/sentence'],
      [[r['variant'], r['K'], f"{r['params'] / 1e6:.2f}M", f"{r['bleu_greedy']:.2f}",
        f"{r['bleu_beam4']:.2f}", f"{r['dev_ln_ppl']:.4f}", times(r),
        f"{r['kv_bytes']:,}"] for r in rows]).rstrip()


def main(argv):
  del argv
  rows = [run_variant(v, _OUT.value, _TINY.value) for v in _VARIANTS.value]
  report_dir = report.write_report([os.path.join(_OUT.value, v) for v in _VARIANTS.value],
                                   os.path.join(_OUT.value, 'report'), metrics.command())
  print(format_rows(rows, _BATCHES.value))
  print(f'\nreport: {report_dir}/report.md   TensorBoard: tensorboard --logdir {_OUT.value}')


if __name__ == '__main__':
  errors.run(main)
