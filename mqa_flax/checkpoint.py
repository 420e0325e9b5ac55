"""Checkpoints with orbax's CheckpointManager: train state plus data position."""

import json
import os
from typing import Any

import orbax.checkpoint as ocp


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
  with open(path) as f:
    old = json.load(f)
  keep = lambda c: {'model': c.get('model'),
                    'data': {k: c.get('data', {}).get(k) for k in (
                        'source', 'tfds_name', 'train_split', 'src_lang',
                        'tgt_lang', 'vocab_size', 'numbers_max',
                        'numbers_train_size', 'max_len')},
                    'seed': c.get('seed')}
  diffs = _diff(keep(old), keep(config))
  if diffs:
    raise ValueError(
        f'{workdir} holds a run of another architecture ({"; ".join(diffs)}); '
        'nothing was changed there: choose a new --workdir')


class Checkpointer:
  """Saves and restores {'state': train state, 'data': iterator position}."""

  def __init__(self, workdir: str, keep: int):
    # Orbax coordinates the writes of several processes itself.
    self.manager = ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, 'checkpoints')),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_states: list[dict[str, int]],
           force: bool = False) -> None:
    """Starts an asynchronous save of `state` and each process's data position."""
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_states)), force=force)

  def restore(self, abstract_state: Any,
              step: int | None = None) -> tuple[Any, list[dict[str, int]]]:
    """Restores the latest (or given) step into `abstract_state`'s structure."""
    step = self.manager.latest_step() if step is None else step
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=ocp.args.JsonRestore()))
    return restored['state'], restored['data']

  def restore_state(self, abstract_state: Any, step: int | None = None) -> Any:
    """Restores only the train state (for decoding)."""
    step = self.manager.latest_step() if step is None else step
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))
    return restored['state']

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
