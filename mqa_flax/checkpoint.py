"""Checkpoints with orbax's CheckpointManager.

`<workdir>/checkpoints/`: the latest train states (parameters, optimizer, data
position) for resuming. `<workdir>/best/`: the parameters alone at the step
with the lowest dev ln(PPL) so far, with `best.json`; decoding uses them.

Every save records a CRC32 of each array (in the train checkpoint's
`fingerprint` item, in best.json's `fingerprint`); every restore checks them
and that the parameters are finite, and raises `CheckpointDamaged` otherwise.
Resuming falls back to the newest intact train checkpoint and moves damaged
ones to `<workdir>/checkpoints_damaged/`.

Every save also records what the parameters mean (`run_record`: the
vocabulary's fingerprint and the model config; the train checkpoint's `run`
item, best.json's `run`). A restore with another vocabulary or architecture,
or whose arrays have other shapes than saved, raises `RunMismatch`: the
checkpoint is intact and stays where it is. Checkpoints saved before records
existed are checked by their shapes alone.
"""

import contextlib
import datetime
import fcntl
import logging as logging_std
import math
import os
import socket
import sys
import zlib
from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from mqa_flax import files
from mqa_flax.errors import UserError


class CheckpointDamaged(UserError):
  """A checkpoint that cannot be read back, or reads back other than saved."""

  def __init__(self, message: str, step: int):
    super().__init__(message)
    self.step = step


class RunMismatch(UserError):
  """An intact checkpoint trained with another vocabulary or architecture."""


def run_record(model: dict[str, Any], vocab_fingerprint: str,
               vocab_size: int) -> dict[str, Any]:
  """What a checkpoint's parameters mean: its vocabulary and its model config."""
  return {'vocab': vocab_fingerprint, 'vocab_size': vocab_size, 'model': dict(model)}


def check_record(saved: dict | None, current: dict | None, what: str, workdir: str,
                 config_source: str) -> None:
  """Raises RunMismatch if `current` (this run's `run_record`) differs from `saved`.

  `config_source` names where the current model config comes from (the
  command's --config, or the workdir's config.json). Nothing is checked
  when either record is missing.
  """
  if saved is None or current is None:
    return
  if saved.get('vocab') != current['vocab']:
    raise RunMismatch(
        f'{os.path.join(workdir, "spm.model")} is not the vocabulary {what} was '
        f'trained with (fingerprint {current["vocab"]}, {current["vocab_size"]} '
        f'pieces; trained with {saved.get("vocab")}, {saved.get("vocab_size")} '
        'pieces): put back the spm.model of that run, or use a new --workdir')
  diffs = [f'model.{d.replace(" != ", " at training, now ")}'
           for d in _diff(saved.get('model'), current['model'])]
  if diffs:
    raise RunMismatch(
        f'{config_source} gives another architecture than {what} was trained '
        f'with ({"; ".join(diffs)}): set the values it was trained with, or use '
        'a new --workdir')


def _saved_shapes(item_dir: str) -> dict[str, tuple[int, ...]] | None:
  """Global shapes of the arrays of an orbax pytree item, by path, or None if
  unknown (an unreadable item: its restore then reports the damage)."""
  if not os.path.isdir(item_dir):
    return None
  try:
    meta = ocp.PyTreeCheckpointer().metadata(item_dir)
  except Exception:  # pylint: disable=broad-except
    return None
  tree = getattr(meta, 'item_metadata', meta)
  return {_key(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(tree)
          if hasattr(x, 'shape')}


def check_shapes(item_dir: str, abstract: Any, what: str, step: int) -> None:
  """Raises RunMismatch if the arrays saved in `item_dir` have other shapes
  than `abstract` (a vocabulary of another size, another architecture)."""
  saved = _saved_shapes(item_dir)
  if not saved:
    return
  bad = [f'{k}: saved {saved.get(k)}, now {tuple(x.shape)}'
         for k, x in ((_key(p), x) for p, x in jax.tree_util.tree_leaves_with_path(abstract))
         if saved.get(k) != tuple(x.shape)]
  if bad:
    raise RunMismatch(
        f'{what} holds arrays of other shapes than this config and vocabulary '
        f'build ({len(bad)} differ, first {bad[0]}); it is intact and was left '
        'in place: put back the spm.model and config.json it was trained with, '
        'or use a new --workdir')


def _key(path) -> str:
  return '/'.join(str(getattr(k, 'name', getattr(k, 'key', getattr(k, 'idx', k))))
                  for k in path)


def _host_arrays(tree: Any) -> dict[str, np.ndarray]:
  """This process's copy of every (replicated) array in `tree`, by path."""
  return {_key(path): np.asarray(x.addressable_data(0) if isinstance(x, jax.Array) else x)
          for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def fingerprint(tree: Any) -> dict[str, str]:
  """CRC32 of the bytes of every array in `tree`, keyed by its path."""
  return {k: f'{zlib.crc32(np.ascontiguousarray(a).reshape(-1).view(np.uint8)):08x}'
          for k, a in _host_arrays(tree).items()}


def verify(tree: Any, expected: dict[str, str] | None, what: str, step: int) -> None:
  """Raises CheckpointDamaged if `tree` differs from `expected` or its params are not finite."""
  arrays = _host_arrays(tree)
  if expected:
    actual = fingerprint(tree)
    bad = [k for k, v in actual.items() if expected.get(k, v) != v]
    if bad:
      raise CheckpointDamaged(
          f'{what} is damaged: {len(bad)} of {len(actual)} arrays differ from the '
          f'checksums saved with it (first: {bad[0]})', step)
  nonfinite = [k for k, a in arrays.items()
               if (k.startswith('params') or what.startswith('best'))
               and np.issubdtype(a.dtype, np.inexact) and not np.isfinite(a).all()]
  if nonfinite:
    raise CheckpointDamaged(f'{what} is damaged: {len(nonfinite)} arrays hold NaN '
                            f'or Inf (first: {nonfinite[0]})', step)


def _quiet_closed_loop(hook):
  """`hook` without the 'Event loop is closed' echoes of a failed tensorstore read."""
  def quiet(unraisable):
    if not (unraisable.exc_type is RuntimeError and
            str(unraisable.exc_value) == 'Event loop is closed'):
      hook(unraisable)
  quiet.quiet = True
  return quiet


class _QuietFailedReads(logging_std.Filter):
  """Drops asyncio's 'exception was never retrieved' for failed tensorstore reads.

  When one array of a checkpoint cannot be read, orbax raises that error and
  leaves the other failed reads unretrieved; asyncio logs each with its
  traceback when it is garbage-collected, burying the one-line error.
  """

  def filter(self, record: logging_std.LogRecord) -> bool:
    message = record.getMessage()
    return not ('exception was never retrieved' in message
                and ('tensorstore_spec' in message or 'No space left' in message
                     or 'OSError(28' in message))


def _quiet_async_failures() -> None:
  """Keeps orbax's failed reads and writes (a damaged file, a full disk) to the
  one error that reports them: the reads and writes still in flight finish
  after orbax's event loop closed, each printing a traceback."""
  if not getattr(sys.unraisablehook, 'quiet', False):
    sys.unraisablehook = _quiet_closed_loop(sys.unraisablehook)
  if not getattr(sys.excepthook, 'quiet', False):
    sys.excepthook = _quiet_closed_loop_excepthook(sys.excepthook)
  asyncio_logger = logging_std.getLogger('asyncio')
  if not any(isinstance(f, _QuietFailedReads) for f in asyncio_logger.filters):
    asyncio_logger.addFilter(_QuietFailedReads())


def _quiet_closed_loop_excepthook(hook):
  """`hook` without tensorstore callbacks' 'Event loop is closed' tracebacks."""
  def quiet(exc_type, exc_value, tb):
    if not (exc_type is RuntimeError and str(exc_value) == 'Event loop is closed'):
      hook(exc_type, exc_value, tb)
  quiet.quiet = True
  return quiet


def _read(what: str, step: int, fn, *args, **kwargs) -> Any:
  """`fn(*args, **kwargs)`, with any failure to read reported as CheckpointDamaged."""
  _quiet_async_failures()
  try:
    return fn(*args, **kwargs)
  except Exception as e:  # pylint: disable=broad-except
    # The first line, without a traceback that tensorstore may embed in it.
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    first = first.split('Traceback')[0].rstrip(' \\n\'"')[:300]
    raise CheckpointDamaged(f'{what} cannot be read ({type(e).__name__}: {first})',
                            step) from e


def _diff(old: Any, new: Any, prefix: str = '') -> list[str]:
  """Keys where two nested dicts differ, as 'key: old != new'."""
  if isinstance(old, dict) and isinstance(new, dict):
    out = []
    for k in sorted(set(old) | set(new)):
      out += _diff(old.get(k), new.get(k), f'{prefix}{k}.')
    return out
  return [] if old == new else [f'{prefix[:-1]}: {old!r} != {new!r}']


def check_same_architecture(workdir: str, config: dict[str, Any]) -> None:
  """Raises ValueError if `workdir` holds a run whose model or data differ.

  Training length, logging and optimizer settings may change on resume; the
  model, the vocabulary and the data source may not.
  """
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    return
  old = files.read_json(path, 'restore it from a copy of the run (or remove it: '
                        'training writes it again, and its checkpoints record '
                        'their vocabulary and architecture)')
  keep = lambda c: {'model': c.get('model'),
                    'data': {k: c.get('data', {}).get(k) for k in (
                        'source', 'tfds_name', 'train_split', 'src_lang',
                        'tgt_lang', 'vocab_size', 'numbers_max',
                        'numbers_train_size', 'max_len')},
                    'seed': c.get('seed')}
  diffs = _diff(keep(old), keep(config))
  if diffs:
    raise UserError(
        f'{workdir} holds a run of another architecture ({"; ".join(diffs)}); '
        'nothing was changed there: choose a new --workdir')


@contextlib.contextmanager
def workdir_lock(workdir: str, enabled: bool = True):
  """Holds an exclusive lock on `<workdir>/train.lock`, or raises UserError naming its holder.

  The lock is an flock on an open file, so the kernel releases it when its
  process ends, however it ends: a killed run never blocks the next one.
  """
  if not enabled:
    yield
    return
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, 'train.lock')
  f = open(path, 'a+')
  try:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().strip() or 'another process'
      raise UserError(f'{workdir} is in use by {holder}: wait for it to finish or '
                      'stop it, or choose another --workdir') from None
    f.seek(0)
    f.truncate()
    f.write(f'pid {os.getpid()} on {socket.gethostname()} (training since '
            f'{datetime.datetime.now().isoformat(timespec="seconds")})\n')
    f.flush()
    yield
  finally:
    f.close()  # Releases the lock.


class Checkpointer:
  """Saves and restores {'state': train state, 'data': iterator position}.

  `record` (a `run_record`) is saved with every checkpoint and compared with
  the one each restored checkpoint holds; `config_source` names where its
  model config comes from in a mismatch's message.
  """

  def __init__(self, workdir: str, keep: int, record: dict | None = None,
               config_source: str = '--config'):
    # Orbax coordinates the writes of several processes itself.
    _quiet_async_failures()
    self.workdir = workdir
    self.record = record
    self.config_source = config_source
    self.directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def latest_step(self) -> int | None:
    """The newest saved step, or None."""
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_states: list[dict[str, int]],
           force: bool = False) -> None:
    """Starts an asynchronous save of `state` and each process's data position."""
    extra = {} if self.record is None else {'run': ocp.args.JsonSave(self.record)}
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_states),
        fingerprint=ocp.args.JsonSave(fingerprint(state)), **extra), force=force)

  def _json_item(self, step: int, name: str) -> Any:
    """A JSON item saved with `step` (None for checkpoints saved without)."""
    if not os.path.isdir(os.path.join(self.directory, str(step), name)):
      return None
    return self.manager.restore(step, args=ocp.args.Composite(
        **{name: ocp.args.JsonRestore()}))[name]

  def check_record(self, step: int) -> None:
    """Raises RunMismatch if `step` was trained with another vocabulary or
    architecture than `record`; CheckpointDamaged if its record is unreadable."""
    what = f'checkpoint step {step} in {self.directory}'
    saved = _read(what, step, self._json_item, step, 'run')
    if saved is None and self.record is not None:
      logging.warning('%s records no vocabulary or architecture (saved by older '
                      'code): only its array shapes are checked', what)
    check_record(saved, self.record, what, self.workdir, self.config_source)

  def _restore(self, step: int | None, abstract: Any, **items: Any) -> dict[str, Any]:
    """Restores `items` (orbax restore args) of a step, checked against its run
    record and shapes (`abstract`, the 'state' item's), then its checksums."""
    step = self.manager.latest_step() if step is None else step
    what = f'checkpoint step {step} in {self.directory}'
    self.check_record(step)
    check_shapes(os.path.join(self.directory, str(step), 'state'), abstract, what, step)
    expected = _read(what, step, self._json_item, step, 'fingerprint')
    restored = _read(what, step, self.manager.restore, step,
                     args=ocp.args.Composite(**items))
    verify(restored['state'], expected, what, step)
    return restored

  def restore(self, abstract_state: Any,
              step: int | None = None) -> tuple[Any, list[dict[str, int]]]:
    """Restores the latest (or given) step into `abstract_state`'s structure."""
    restored = self._restore(step, abstract_state,
                             state=ocp.args.StandardRestore(abstract_state),
                             data=ocp.args.JsonRestore())
    return restored['state'], restored['data']

  def restore_intact(self, abstract_state: Any) -> tuple[Any, list[dict[str, int]]] | None:
    """The newest checkpoint that reads back intact, or None if none was saved.

    Damaged checkpoints are named in a warning and moved to
    `<workdir>/checkpoints_damaged/`, so that training can save those steps
    again. One of another vocabulary or architecture raises RunMismatch and
    nothing is moved.
    """
    damaged = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        return self.restore(abstract_state, step)
      except CheckpointDamaged as e:
        logging.warning('%s; moved it to %s_damaged and falling back to the '
                        'previous checkpoint', e, self.directory)
        damaged.append(step)
        self._set_aside(step)
    if damaged:
      raise UserError(
          f'every checkpoint in {self.directory} is damaged (steps '
          f'{", ".join(map(str, damaged))}, moved to {self.directory}_damaged): '
          'rerun to train from step 0, or choose a new --workdir')
    return None

  def _set_aside(self, step: int) -> None:
    if jax.process_index() == 0:
      aside = f'{self.directory}_damaged'
      os.makedirs(aside, exist_ok=True)
      target = os.path.join(aside, str(step))
      while os.path.exists(target):
        target += '+'
      os.rename(os.path.join(self.directory, str(step)), target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'checkpoint {step} set aside')
    self.manager.reload()

  def restore_params(self, abstract_params: Any, step: int | None = None) -> Any:
    """Restores only the parameters of a train state (for decoding).

    A Checkpointer restores either whole states or parameters alone: orbax
    keeps the first way it read the 'state' item.
    """
    restored = self._restore(step, {'params': abstract_params}, state=ocp.args.PyTreeRestore(
        {'params': abstract_params},
        restore_args=jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding),
                                  {'params': abstract_params}),
        partial_restore=True))
    return restored['state']['params']

  def close(self) -> None:
    """Waits for the last asynchronous save, then closes."""
    self.manager.wait_until_finished()
    self.manager.close()


class BestParams:
  """Keeps the parameters of the step with the lowest dev ln(PPL) in `<workdir>/best`."""

  def __init__(self, workdir: str, record: dict | None = None):
    self.run_record = record  # Saved in best.json: what the parameters mean.
    self.directory = os.path.abspath(os.path.join(workdir, 'best'))
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True))
    self.record = read_best(workdir)

  def offer(self, step: int, dev_ln_ppl: float, params: Any) -> bool:
    """Saves `params` if `dev_ln_ppl` beats every earlier offer; returns whether."""
    if not math.isfinite(dev_ln_ppl) or (
        self.record and self.record['dev_ln_ppl'] <= dev_ln_ppl):
      return False
    if step in self.manager.all_steps():  # Re-evaluated after a resume.
      return False
    self.manager.save(step, args=ocp.args.StandardSave(params), force=True)
    self.manager.wait_until_finished()  # best.json never names an unfinished save.
    self.record = {'step': step, 'dev_ln_ppl': dev_ln_ppl,
                   'fingerprint': fingerprint(params)}
    if self.run_record is not None:
      self.record['run'] = self.run_record
    if jax.process_index() == 0:  # One writer; orbax saved every process's share.
      files.write_json(os.path.join(self.directory, 'best.json'), self.record, None)
    return True

  def close(self) -> None:
    """Waits for the last asynchronous save, then closes."""
    self.manager.wait_until_finished()
    self.manager.close()


def read_best(workdir: str) -> dict | None:
  """`{'step', 'dev_ln_ppl', 'fingerprint', 'run'}` of the best parameters
  saved in `workdir`, or None."""
  path = os.path.join(workdir, 'best', 'best.json')
  if not os.path.exists(path):
    return None
  return files.read_json(path, 'restore it from a copy of the run (meanwhile '
                         'decode.py --step=STEP decodes a train checkpoint)')


def restore_params(workdir: str, abstract_params: Any, step: int,
                   expected: dict[str, str] | None = None,
                   saved_record: dict | None = None, record: dict | None = None,
                   config_source: str = '--config') -> Any:
  """Restores the best parameters saved at `step`, checked against `expected`
  checksums, and `record` (this run's `run_record`) against `saved_record`."""
  directory = os.path.abspath(os.path.join(workdir, 'best'))
  what = f'best parameters (step {step}) in {directory}'
  if saved_record is None and record is not None:
    logging.warning('%s records no vocabulary or architecture (saved by older '
                    'code): only its array shapes are checked', what)
  check_record(saved_record, record, what, workdir, config_source)
  check_shapes(os.path.join(directory, str(step), 'default'), abstract_params, what, step)
  manager = ocp.CheckpointManager(directory)
  try:
    params = _read(what, step, manager.restore, step,
                   args=ocp.args.StandardRestore(abstract_params))
  finally:
    manager.close()
  verify(params, expected, what, step)
  return params
