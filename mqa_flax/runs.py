"""Trained runs: restoring a workdir, translating with it, scoring BLEU."""

import dataclasses
import datetime
import json
import os
from typing import Sequence

from absl import logging
from flax import nnx
import ml_collections

from mqa_flax import bleu as bleu_lib
from mqa_flax import checkpoint as ckpt_lib
from mqa_flax import data
from mqa_flax import errors
from mqa_flax import metrics as metrics_lib
from mqa_flax import train_lib
from mqa_flax.config import ModelConfig
from mqa_flax.inference import translate
from mqa_flax.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class Run:
  """A trained model restored from its workdir."""
  workdir: str
  config: ml_collections.ConfigDict
  tokenizer: Tokenizer
  graphdef: nnx.GraphDef
  params: nnx.State
  step: int
  checkpoint: str = 'latest'  # 'best' (lowest dev ln(PPL)) or 'latest'.
  dev_ln_ppl: float | None = None  # Of the best checkpoint.


def restore(workdir: str, step: int | None = None,
            expected: ml_collections.ConfigDict | None = None,
            best: bool = True) -> Run:
  """Restores a workdir's parameters, vocabulary and config.

  Without `step`: the best parameters on dev (`<workdir>/best`) if `best` and
  the run saved any, else the latest train checkpoint. With `step`: that train
  checkpoint. Only the parameters are restored, never the optimizer state.
  """
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{workdir} holds no config.json: is it a trained workdir?')
  if expected is not None:
    ckpt_lib.check_same_architecture(workdir, expected.to_dict())
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  spm = os.path.join(workdir, 'spm.model')
  if not os.path.exists(spm):
    raise FileNotFoundError(f'{workdir} holds no vocabulary (spm.model)')
  tokenizer = Tokenizer(spm)
  cfg = ModelConfig.from_config(config.model, tokenizer.vocab_size)
  graphdef, abstract = train_lib.abstract_model(cfg)
  record = ckpt_lib.read_best(workdir) if best and step is None else None
  ckpt = ckpt_lib.Checkpointer(workdir, config.keep_checkpoints)
  saved = ', '.join(map(str, ckpt.manager.all_steps())) or 'none'
  if record:
    try:
      params = ckpt_lib.restore_params(workdir, abstract, record['step'],
                                       record.get('fingerprint'))
    except ckpt_lib.CheckpointDamaged as e:
      raise ckpt_lib.CheckpointDamaged(
          f'{e}; decode a train checkpoint instead with --step=STEP (saved: '
          f'{saved})', e.step) from e
    ckpt.close()
    logging.info('restored %s: best on dev at step %d (ln(PPL) %.4f)', workdir,
                 record['step'], record['dev_ln_ppl'])
    return Run(workdir, config, tokenizer, graphdef, params, record['step'],
               'best', record['dev_ln_ppl'])
  step = ckpt.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'{workdir}/checkpoints holds no checkpoint: train first')
  if step not in ckpt.manager.all_steps():
    raise ckpt_lib.UserError(f'{workdir}/checkpoints holds no step {step}: pick '
                             f'one with --step (saved: {saved})')
  try:
    params = ckpt.restore_params(abstract, step)
  except ckpt_lib.CheckpointDamaged as e:
    raise ckpt_lib.CheckpointDamaged(
        f'{e}; pick another with --step=STEP (saved: {saved})', e.step) from e
  finally:
    ckpt.close()
  logging.info('restored %s at step %d', workdir, step)
  return Run(workdir, config, tokenizer, graphdef, params, step)


def translate_run(run: Run, sentences: Sequence[str], beam_size: int | None = None,
                  alpha: float | None = None, batch_size: int | None = None,
                  progress: bool = False) -> list[str]:
  """`translate` with the run's decode settings unless given."""
  dc = run.config.decode
  return translate(
      run.graphdef, run.params, run.tokenizer, sentences,
      batch_size=batch_size or run.config.data.eval_batch_size,
      beam_size=dc.beam_size if beam_size is None else beam_size,
      alpha=dc.alpha if alpha is None else alpha, max_len_a=dc.max_len_a,
      max_len_b=dc.max_len_b, max_src_len=run.config.data.max_eval_len,
      overlong=dc.overlong, progress=progress)


def score_split(run: Run, split: str, beam_size: int, name: str | None = None,
                alpha: float | None = None, batch_size: int | None = None,
                progress: bool = False) -> dict:
  """Decodes a split, scores it with sacreBLEU and records it in bleu.json.

  `split` is 'dev', 'test' (the config's) or a split spec of the data source.
  Hypotheses go to `hyps/<name>.<search>.txt`, the score to bleu.json under
  `<name>/<search>` and to TensorBoard as `decode/<name>_<search>_bleu`. If
  these cannot be written (a read-only workdir), the entry's `not_written`
  says why and the score is still returned.
  """
  spec = {'dev': run.config.data.dev_split,
          'test': run.config.data.test_split}.get(split, split)
  sources, references = data.read_split(run.config.data, spec)
  hyps = translate_run(run, sources, beam_size, alpha, batch_size, progress)
  scores = bleu_lib.bleu_scores(hyps, references)
  name = name or split.replace('/', '_')
  search = 'greedy' if beam_size == 1 else f'beam{beam_size}'
  entry = {'bleu_13a': scores['bleu_13a'], 'bleu_intl': scores['bleu_intl'],
           'bleu_13a_lc': scores['bleu_13a_lc'],
           'signature_13a': scores['bleu_13a_signature'],
           'signature_intl': scores['bleu_intl_signature'],
           'num_sentences': scores['num_sentences'], 'checkpoint_step': run.step,
           'checkpoint': run.checkpoint, 'dev_ln_ppl': run.dev_ln_ppl,
           'split': spec, 'beam_size': beam_size,
           'date': datetime.datetime.now(datetime.timezone.utc).isoformat()}
  try:
    _record_score(run, name, search, hyps, entry)
  except OSError as e:
    return dict(entry, not_written=errors.one_line(e))
  return entry


def _record_score(run: Run, name: str, search: str, hyps: list[str], entry: dict) -> None:
  os.makedirs(os.path.join(run.workdir, 'hyps'), exist_ok=True)
  with open(os.path.join(run.workdir, 'hyps', f'{name}.{search}.txt'), 'w') as f:
    f.writelines(h + '\n' for h in hyps)
  path = os.path.join(run.workdir, 'bleu.json')
  table = {}
  if os.path.exists(path):
    with open(path) as f:
      table = json.load(f)
  table[f'{name}/{search}'] = entry
  with open(path, 'w') as f:
    json.dump(table, f, indent=1)
  writer = metrics_lib.MetricWriter(run.workdir)
  writer.write_scalars(run.step, {f'decode/{name}_{search}_bleu': entry['bleu_13a']})
  writer.close()
