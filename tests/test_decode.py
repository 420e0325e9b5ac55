"""decode.py and translation: BLEU end to end, translate mode, bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import demo
from mqa_flax import inference
from mqa_flax import runs
from mqa_flax import train_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('run'))
  train_lib.train_and_evaluate(demo.get_config('mqa,tiny'), workdir)
  return workdir


def _decode(*flags, stdin=None):
  return subprocess.run([sys.executable, os.path.join(ROOT, 'decode.py'), *flags],
                        input=stdin, capture_output=True, text=True, timeout=300,
                        cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS=''))


def test_bleu_and_translate_modes(trained):
  out = _decode(f'--workdir={trained}', '--mode=bleu', '--split=test', '--beam_size=2')
  assert out.returncode == 0, out.stderr
  assert 'test beam2: BLEU' in out.stdout and 'tok:13a' in out.stdout
  entry = json.load(open(os.path.join(trained, 'bleu.json')))['test/beam2']
  assert entry['checkpoint_step'] == 20 and entry['num_sentences'] == 16
  assert 'tok:intl' in entry['signature_intl']
  assert entry['command'].startswith('python decode.py --workdir=')  # As typed.
  assert entry['device'] == 'cpu' and entry['date'].startswith('20')
  assert 'git_commit' in entry  # None outside a git checkout.
  hyps = open(os.path.join(trained, 'hyps', 'test.beam2.txt')).read().splitlines()
  assert len(hyps) == 16
  out = _decode(f'--workdir={trained}', '--mode=translate', '--beam_size=1',
                stdin='The number is seven.\n\nWe need two books.\n')
  assert out.returncode == 0, out.stderr
  lines = out.stdout.split('\n')
  assert len(lines) == 4 and lines[1] == '' and lines[3] == ''


def test_missing_checkpoint_is_a_clear_error(tmp_path):
  out = _decode(f'--workdir={tmp_path}', '--mode=bleu')
  assert out.returncode != 0
  assert 'holds no config.json' in out.stderr


def test_bad_input_has_defined_behaviour(trained):
  run = runs.restore(trained)
  weird = ['', 'The number is seven.', '漢字 ☃ ∮', '   ', 'seven ' * 40]
  out = run.translate(weird, beam_size=1, batch_size=2)
  assert len(out) == len(weird) and out[0] == '' and out[3] == ''
  assert run.translate(['We need two books.'], beam_size=3, batch_size=1)[0]
  with pytest.raises(ValueError, match='input line 5 has .* tokens, more than'):
    inference.translate(run.graphdef, run.params, run.tokenizer, weird, batch_size=2,
                        beam_size=1, alpha=0.6, max_len_a=1.0, max_len_b=2,
                        max_src_len=64, overlong='error')
  with pytest.raises(ValueError, match='at least one token'):
    inference.translate(run.graphdef, run.params, run.tokenizer, weird, batch_size=2,
                        beam_size=1, alpha=0.6, max_len_a=0.0, max_len_b=0,
                        max_src_len=64)


def test_outputs_respect_the_length_limit(trained):
  run = runs.restore(trained)
  src = ['The number is seven.', 'I have three hundred and twelve apples and two pears.']
  ids, _ = inference.encode_sources(run.tokenizer, src, 64, 'truncate')
  inputs = np.zeros((2, 64), np.int32)
  for i, x in enumerate(ids):
    inputs[i, :len(x)] = x
  for beam in (1, 3):
    tokens = np.asarray(inference.search(
        run.graphdef, run.params, inputs, beam_size=beam, alpha=0.6,
        eos_id=run.tokenizer.eos_id, max_len_a=0.0, max_len_b=3))
    assert tokens.shape == (2, 3)
    # At most 3 tokens, EOS included: every row ends by then.
    assert all(run.tokenizer.eos_id in row for row in tokens.tolist()), tokens


def test_benchmark_mode_over_variants(tmp_path):
  out = _decode('--mode=benchmark', '--config=configs/paper.py:mha,tiny',
                '--config.model.dtype=float32', '--variants=mha,mqa',
                f'--out={tmp_path}', '--bench_batch=2,1', '--bench_src_len=8',
                '--bench_tgt_len=8', '--bench_reps=1', '--bench_kinds=encoder,greedy',
                '--bench_impls=xla/BKLH,cudnn', '--bench_gemm_impls=cublas')
  assert out.returncode == 0, out.stderr[-3000:]
  rows = [json.loads(line) for line in open(tmp_path / 'benchmark.jsonl')]
  assert {(r['variant'], r['kind'], r['batch']) for r in rows} == {
      (v, k, b) for v in ('mha', 'mqa') for k in ('encoder', 'greedy') for b in (1, 2)}
  assert all(r['dtype'] == 'float32' and r['device'] == 'cpu' and r['date']
             and '--mode=benchmark' in r['command'] for r in rows)
  greedy = [r for r in rows if r['kind'] == 'greedy']
  assert {(r['attention_impl'], r['cache_layout'], r['gemm_impl']) for r in greedy} == {
      ('xla', 'BKLH', 'cublas'), ('cudnn', 'BLKH', 'cublas')}
  # cuDNN is not on CPU: its rows are errors, and the run went on without them.
  assert all(('error' in r) == (r['attention_impl'] == 'cudnn') for r in greedy)
  # paper.py's tiny MQA keeps one K/V head of eight: an eighth of the K/V
  # (the source mask and the index are the same in both).
  cache = {r['variant']: r['kv_cache_bytes'] for r in greedy
           if r['batch'] == 2 and 'error' not in r}
  assert 7.9 < cache['mha'] / cache['mqa'] < 8
  assert '| mqa |' in (tmp_path / 'table2.md').read_text()
