"""The processes of a training job: joining a multi-process job, gathering
their data positions, and stopping together on a signal."""

import os
import signal

import jax
import numpy as np
from jax.experimental import multihost_utils


def maybe_initialize_distributed() -> None:
  """Joins a multi-process job when the environment describes one (once).

  JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and
  JAX_PROCESS_ID describe the job (jax itself reads only the first; on
  SLURM or a TPU pod it can find all three alone). A process that sends no
  heartbeat for JAX_HEARTBEAT_TIMEOUT_SECONDS (default 100) counts as dead:
  the others then exit with an error instead of waiting for it forever. At
  exit a process waits JAX_SHUTDOWN_TIMEOUT_SECONDS (default 300) for the
  others to exit too.
  """
  env = os.environ
  num_processes = int(env.get('JAX_NUM_PROCESSES') or 0)
  if jax.distributed.is_initialized() or not (
      env.get('JAX_COORDINATOR_ADDRESS') or num_processes > 1):
    return
  jax.distributed.initialize(
      num_processes=num_processes or None,
      process_id=int(env['JAX_PROCESS_ID']) if env.get('JAX_PROCESS_ID') else None,
      heartbeat_timeout_seconds=int(env.get('JAX_HEARTBEAT_TIMEOUT_SECONDS') or 100),
      shutdown_timeout_seconds=int(env.get('JAX_SHUTDOWN_TIMEOUT_SECONDS') or 300))


def gather_data_states(state: dict[str, int]) -> list[dict[str, int]]:
  """Every process's data position, indexed by process (saved by process 0)."""
  if jax.process_count() == 1:
    return [state]
  pairs = multihost_utils.process_allgather(np.array([state['epoch'], state['cursor']]))
  return [{'epoch': int(e), 'cursor': int(c)} for e, c in np.asarray(pairs)]


class StopSignal:
  """Turns SIGTERM/SIGINT into a flag checked between steps.

  The handler only records the signal; `signum`, what the loop acts on, is
  set by `agree`, just before the loop decides whether the step is a
  boundary. A signal that arrives while a boundary is logging, evaluating or
  saving is then acted on at the next step, with a checkpoint, rather than
  ending the loop after a boundary that saved nothing.
  """

  def __init__(self):
    self.signum = None  # What the loop acts on.
    self._seen = None  # What this process received.
    self._old = {}

  def __enter__(self):
    for s in (signal.SIGTERM, signal.SIGINT):
      self._old[s] = signal.signal(s, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self._seen = signum

  def agree(self) -> None:
    """Sets `signum`: this process's signal, or with several processes any
    process's (all of them call it at the same steps and stop together)."""
    if jax.process_count() == 1:
      self.signum = self._seen
      return
    flags = multihost_utils.process_allgather(np.int32(self._seen or 0))
    self.signum = int(np.max(flags)) or None

  def __exit__(self, *exc):
    for s, handler in self._old.items():
      signal.signal(s, handler)
