"""Trained runs: restoring a workdir, translating with it, scoring BLEU.

A restore checks that the workdir's spm.model and config.json are the ones
its checkpoint was trained with. Translations to a file go to
`<output>.partial`, renamed to the output when complete; bleu.json is updated
under a lock and replaced atomically, after the score was reported.
"""

import dataclasses
import os
from typing import Callable, Sequence, TextIO

from absl import logging
from flax import nnx
import ml_collections

from mqa_flax import bleu as bleu_lib
from mqa_flax import checkpoint as ckpt_lib
from mqa_flax import data
from mqa_flax import errors
from mqa_flax import files
from mqa_flax import inference
from mqa_flax import metrics as metrics_lib
from mqa_flax.attention import for_gpu
from mqa_flax.config import ModelConfig, check_ranges
from mqa_flax.decoding import search_name
from mqa_flax.state import abstract_params
from mqa_flax.tokenizer import Tokenizer

TRANSLATE_BLOCK = 512  # translate_lines: lines sorted by length and written together.
BLEU_FILE = 'bleu.json'
_BLEU_FIX = ('move it aside (it holds the earlier scores; repair it by hand if '
             'needed) and rerun')


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
  A spm.model or config.json other than the checkpoint was trained with
  raises `checkpoint.RunMismatch`.
  """
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{workdir} holds no config.json: is it a trained workdir?')
  if expected is not None:
    ckpt_lib.check_same_architecture(workdir, expected.to_dict())
  config = ml_collections.ConfigDict(files.read_json(
      path, 'restore it from a copy of the run, or remove it and rerun the '
      "run's train.py command, which writes it again"))
  check_ranges(config, path)
  spm = os.path.join(workdir, 'spm.model')
  if not os.path.exists(spm):
    raise FileNotFoundError(f'{workdir} holds no vocabulary (spm.model)')
  tokenizer = Tokenizer(spm)
  # How, not what: a run trained with cuDNN's attention decodes on any backend.
  seq_impl = config.get('seq_attention_impl', 'xla') if for_gpu() else 'xla'
  cfg = ModelConfig.from_config(config.model, tokenizer.vocab_size,
                                seq_attention_impl=seq_impl)
  graphdef, abstract = abstract_params(cfg)
  now = ckpt_lib.run_record(config.model.to_dict(), tokenizer.fingerprint,
                            tokenizer.vocab_size)
  record = ckpt_lib.read_best(workdir) if best and step is None else None
  ckpt = ckpt_lib.Checkpointer(workdir, config.keep_checkpoints, now, path)
  saved = ', '.join(map(str, ckpt.manager.all_steps())) or 'none'
  if record:
    try:
      params = ckpt_lib.restore_params(workdir, abstract, record['step'],
                                       record.get('fingerprint'), record.get('run'),
                                       now, path)
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
  stopped run keeps what it translated (errors.Stopped says how much, and
  that `out_name` holds it). Signals inside `errors.stop_between_steps`
  stop it between batches.
  """
  done = 0
  try:
    for start in range(0, len(lines), TRANSLATE_BLOCK):
      errors.check_stop()
      hyps = run.translate(lines[start:start + TRANSLATE_BLOCK], beam_size, alpha,
                           batch_size, progress)
      out.writelines(' '.join(h.splitlines()) + '\n' for h in hyps)
      out.flush()
      done += len(hyps)
  except (KeyboardInterrupt, errors.Stopped) as e:
    signal = f'{errors.one_line(e)}: ' if isinstance(e, errors.Stopped) else ''
    raise errors.Stopped(f'{signal}stopped after translating {done} of {len(lines)} '
                         f'lines; {out_name} holds those {done} lines') from None
  return done


def translate_file(run: Run, lines: Sequence[str], output: str,
                   beam_size: int | None = None, alpha: float | None = None,
                   batch_size: int | None = None, progress: bool = False) -> int:
  """Translates `lines` into the file `output`, replacing it only when all are done.

  Lines go to `<output>.partial` as they are finished, which is renamed to
  `output` at the end; a stopped run leaves `output` as it was and the
  finished lines in `<output>.partial`. On an error the partial file is
  removed. Returns the number of lines.
  """
  partial = f'{output}.partial'
  try:
    with open(partial, 'w', encoding='utf-8', newline='\n') as out:
      done = translate_lines(run, lines, out, f'{partial} ({output} was not changed)',
                             beam_size, alpha, batch_size, progress)
      out.flush()
      os.fsync(out.fileno())
  except errors.Stopped:
    raise
  except BaseException:
    if os.path.exists(partial):
      os.remove(partial)
    raise
  os.replace(partial, output)
  return done


def check_bleu_file(workdir: str) -> None:
  """Raises UserError if the workdir's bleu.json exists but is not valid JSON,
  so that scoring refuses before decoding rather than after."""
  path = os.path.join(workdir, BLEU_FILE)
  if os.path.exists(path):
    files.read_json(path, _BLEU_FIX)


def score_split(run: Run, split: str, beam_size: int, name: str | None = None,
                alpha: float | None = None, batch_size: int | None = None,
                progress: bool = False,
                report: Callable[[str], None] | None = None) -> dict:
  """Decodes a split, scores it with sacreBLEU and records it in bleu.json.

  `split` is 'dev', 'test' (the config's) or a split spec of the data source.
  The score line goes to `report` first; then hypotheses go to
  `hyps/<name>.<search>.txt`, the score to bleu.json under `<name>/<search>`
  and to TensorBoard as `decode/<name>_<search>_bleu`. If these cannot be
  written (a read-only or full disk, an unreadable bleu.json), the entry's
  `not_written` says why and the score is still returned.
  """
  spec = {'dev': run.config.data.dev_split,
          'test': run.config.data.test_split}.get(split, split)
  sources, references = data.read_split(run.config.data, spec)
  hyps = run.translate(sources, beam_size, alpha, batch_size, progress)
  scores = bleu_lib.bleu_scores(hyps, references)
  label = name or split
  name = name or split.replace('/', '_')
  search = search_name(beam_size)
  entry = {'bleu_13a': scores['bleu_13a'], 'bleu_intl': scores['bleu_intl'],
           'bleu_13a_lc': scores['bleu_13a_lc'],
           'signature_13a': scores['bleu_13a_signature'],
           'signature_intl': scores['bleu_intl_signature'],
           'num_sentences': scores['num_sentences'], 'checkpoint_step': run.step,
           'checkpoint': run.checkpoint, 'dev_ln_ppl': run.dev_ln_ppl,
           'split': spec, 'beam_size': beam_size, **metrics_lib.provenance()}
  if report is not None:
    report(f"{label} {search}: BLEU {entry['bleu_13a']:.2f} "
           f"({entry['signature_13a']}), intl {entry['bleu_intl']:.2f}, "
           f"lowercased {entry['bleu_13a_lc']:.2f} [{run.checkpoint} checkpoint, "
           f"step {run.step}]")
  try:
    _record_score(run, name, search, hyps, entry)
  except (OSError, errors.UserError) as e:
    return dict(entry, not_written=errors.disk_full(e) or errors.one_line(e))
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
      errors.check_stop()
      entry = score_split(run, split, beam, name, alpha, batch_size, progress=True,
                          report=report)
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
  """Writes the hypotheses, then adds `entry` to bleu.json under a lock, so that
  concurrent scorers of one workdir keep each other's entries."""
  files.write_text(os.path.join(run.workdir, 'hyps', f'{name}.{search}.txt'),
                   ''.join(h + '\n' for h in hyps))
  path = os.path.join(run.workdir, BLEU_FILE)
  with files.locked(path):
    table = files.read_json(path, _BLEU_FIX) if os.path.exists(path) else {}
    table[f'{name}/{search}'] = entry
    files.write_json(path, table)
  writer = metrics_lib.MetricWriter(run.workdir)
  writer.write_scalars(run.step, {f'decode/{name}_{search}_bleu': entry['bleu_13a']})
  writer.close()
