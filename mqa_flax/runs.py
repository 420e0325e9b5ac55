"""Trained runs: restoring a workdir, translating with it, scoring BLEU."""

import dataclasses
import json
import os
from typing import Callable, Sequence, TextIO

from absl import logging
from flax import nnx
import ml_collections

from mqa_flax import bleu as bleu_lib
from mqa_flax import checkpoint as ckpt_lib
from mqa_flax import data
from mqa_flax import errors
from mqa_flax import inference
from mqa_flax import metrics as metrics_lib
from mqa_flax.config import ModelConfig
from mqa_flax.decoding import search_name
from mqa_flax.state import abstract_params
from mqa_flax.tokenizer import Tokenizer

TRANSLATE_BLOCK = 512  # translate_lines: lines sorted by length and written together.


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

  def translate(self, sentences: Sequence[str], beam_size: int | None = None,
                alpha: float | None = None, batch_size: int | None = None,
                progress: bool = False) -> list[str]:
    """`inference.translate` with the run's decode settings unless given."""
    dc = self.config.decode
    return inference.translate(
        self.graphdef, self.params, self.tokenizer, sentences,
        batch_size=batch_size or self.config.data.eval_batch_size,
        beam_size=dc.beam_size if beam_size is None else beam_size,
        alpha=dc.alpha if alpha is None else alpha, max_len_a=dc.max_len_a,
        max_len_b=dc.max_len_b, max_src_len=self.config.data.max_eval_len,
        overlong=dc.overlong, progress=progress)


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
  graphdef, abstract = abstract_params(cfg)
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


def translate_lines(run: Run, lines: Sequence[str], out: TextIO, out_name: str,
                    beam_size: int | None = None, alpha: float | None = None,
                    batch_size: int | None = None, progress: bool = False) -> int:
  """Translates `lines` into `out`, one line per input line; returns the count.

  Output is written in input order block by block as it is finished, so a
  stopped run keeps what it translated (errors.Stopped says how much).
  """
  done = 0
  try:
    for start in range(0, len(lines), TRANSLATE_BLOCK):
      hyps = run.translate(lines[start:start + TRANSLATE_BLOCK], beam_size, alpha,
                           batch_size, progress)
      out.writelines(' '.join(h.splitlines()) + '\n' for h in hyps)
      out.flush()
      done += len(hyps)
  except (KeyboardInterrupt, errors.Stopped):
    raise errors.Stopped(f'stopped after translating {done} of {len(lines)} lines '
                         f'(written to {out_name})') from None
  return done


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
  hyps = run.translate(sources, beam_size, alpha, batch_size, progress)
  scores = bleu_lib.bleu_scores(hyps, references)
  name = name or split.replace('/', '_')
  search = search_name(beam_size)
  entry = {'bleu_13a': scores['bleu_13a'], 'bleu_intl': scores['bleu_intl'],
           'bleu_13a_lc': scores['bleu_13a_lc'],
           'signature_13a': scores['bleu_13a_signature'],
           'signature_intl': scores['bleu_intl_signature'],
           'num_sentences': scores['num_sentences'], 'checkpoint_step': run.step,
           'checkpoint': run.checkpoint, 'dev_ln_ppl': run.dev_ln_ppl,
           'split': spec, 'beam_size': beam_size, **metrics_lib.provenance()}
  try:
    _record_score(run, name, search, hyps, entry)
  except OSError as e:
    return dict(entry, not_written=errors.one_line(e))
  return entry


def score_splits(run: Run, named_splits: Sequence[tuple[str | None, str]],
                 beam_sizes: Sequence[int | None], alpha: float | None = None,
                 batch_size: int | None = None,
                 report: Callable[[str], None] = print) -> list[dict]:
  """Scores every (name, split) at every beam size (None: the run's), as
  `score_split` does; reports one line per score.

  Raises UserError after scoring if some score could not be recorded.
  """
  entries = []
  for beam in beam_sizes:
    beam = run.config.decode.beam_size if beam is None else beam
    for name, split in named_splits:
      entry = score_split(run, split, beam, name, alpha, batch_size, progress=True)
      report(f"{name or split} {search_name(beam)}: BLEU {entry['bleu_13a']:.2f} "
             f"({entry['signature_13a']}), intl {entry['bleu_intl']:.2f}, "
             f"lowercased {entry['bleu_13a_lc']:.2f} [{run.checkpoint} checkpoint, "
             f"step {run.step}]")
      if 'not_written' in entry:
        logging.error('%s %s: hypotheses and bleu.json not written: %s',
                      name or split, search_name(beam), entry['not_written'])
      entries.append(entry)
  unsaved = [e['not_written'] for e in entries if 'not_written' in e]
  if unsaved:
    raise errors.UserError(f'the scores above were printed but not recorded in '
                           f'{run.workdir} ({unsaved[0]}): make it writable and rerun')
  return entries


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
