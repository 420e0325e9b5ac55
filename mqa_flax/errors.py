"""User errors and exit codes shared by every entry point.

A problem the user can fix (a bad path, flag, config value, input file, a
damaged checkpoint, a busy workdir) is reported as one `error:` line naming
the problem and the fix, with exit code 2 and no traceback; programming
errors keep their traceback. `MQA_FLAX_DEBUG=1` shows tracebacks for all.

Exit codes: 0 done; 1 a programming error (traceback) or absl usage error;
2 a user error (a full disk included); 3 stopped early by SIGTERM/SIGINT, with
a checkpoint saved (rerun the same command to resume) or, when decoding, the
finished work kept.
"""

import contextlib
import errno
import functools
import os
import signal
import sys
from typing import Any, Callable, Iterator

from absl import app
from absl import flags
from absl import logging

EXIT_USER_ERROR = 2
EXIT_STOPPED = 3


class UserError(ValueError):
  """A problem the user can fix; its message names the problem and the fix."""


class Stopped(Exception):
  """Work stopped early by a signal, after saving what it had (exit code 3)."""


# OSError covers missing paths, permissions, read-only and full disks.
USER_ERRORS = (UserError, OSError)
CONFIGS_NOT_IMPORTABLE = ('imports the configs/ folder, which is not on the import '
                          'path: run the command from the repository root')


def debug() -> bool:
  """Whether MQA_FLAX_DEBUG asks for tracebacks."""
  return os.environ.get('MQA_FLAX_DEBUG', '') not in ('', '0')


def disk_full(e: BaseException) -> str | None:
  """The first line saying that a disk (or quota) is full in `e` or its causes, or None.

  Orbax and tensorstore report a full disk as their own errors (a ValueError
  'RESOURCE_EXHAUSTED ... No space left on device'), raised from other threads.
  """
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
      return one_line(e)
    for line in str(e).splitlines():
      if 'No space left on device' in line or 'Disk quota exceeded' in line:
        line = ' '.join(line.split())
        return line if len(line) <= 400 else '...' + line[-400:]  # The reason ends it.
    e = e.__cause__ or e.__context__
  return None


def one_line(e: BaseException) -> str:
  """`e`'s message on one line (a KeyError's without its repr quotes)."""
  msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
  if isinstance(e, OSError) and e.filename and e.strerror:
    msg = f'{e.filename}: {e.strerror}'
  return ' '.join(str(msg).replace("\\'", "'").split())


def fail(message: str, code: int = EXIT_USER_ERROR, prefix: str = 'error: ') -> None:
  """Prints `error: message` on stderr and exits with `code`."""
  sys.stdout.flush()
  print(f'{prefix}{message}', file=sys.stderr, flush=True)
  sys.exit(code)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with bad flags and config overrides as one line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(f'{one_line(e)} (see --helpshort)')
  except ModuleNotFoundError as e:  # A config file importing configs.<name>.
    if e.name != 'configs' or debug():
      raise
    fail(f'the config file {CONFIGS_NOT_IMPORTABLE}')
  except (AttributeError, KeyError) as e:  # ml_collections: no such config key.
    if debug():
      raise
    # ml_collections nests a KeyError's repr: "'\\'key\\'\\nDid you mean ...'".
    msg = str(e.args[0] if e.args else e).strip("'").replace('\\n', ' ')
    fail(f'config override: no such key {msg.replace(chr(92), "")}')
  return []


def _raise_stopped(signum, frame):
  del frame
  raise Stopped(f'stopped by signal {signum}')


_stop_signal: list[int] = []  # Signals received inside `stop_between_steps`.


def _note_stop(signum, frame):
  del frame
  _stop_signal.append(signum)


@contextlib.contextmanager
def stop_between_steps() -> Iterator[None]:
  """Turns SIGTERM/SIGINT into a request that `check_stop` acts on.

  Work in the block calls `check_stop()` between units of work (batches), so
  a signal never interrupts a device computation: the current one finishes,
  `Stopped` unwinds the stack normally, and what was started is released in
  order. Signals after the first are ignored until the process ends.
  """
  _stop_signal.clear()
  old = {s: signal.signal(s, _note_stop) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    yield
  finally:
    for s, handler in old.items():  # Once stopping, repeats change nothing.
      signal.signal(s, signal.SIG_IGN if _stop_signal else handler)


def check_stop(done: str = '') -> None:
  """Raises `Stopped` if a signal arrived inside `stop_between_steps`."""
  if _stop_signal:
    raise Stopped(f'stopped by signal {_stop_signal[0]}' + (f' {done}' if done else ''))


def guard(main: Callable[[list[str]], Any]) -> Callable[[list[str]], Any]:
  """Wraps an absl `main` so that user errors and signals end in one line."""

  @functools.wraps(main)
  def wrapped(argv):
    signal.signal(signal.SIGTERM, _raise_stopped)  # Like Ctrl-C: `finally` runs.
    try:
      return main(argv)
    except USER_ERRORS as e:
      if debug():
        raise
      full = disk_full(e)
      fail(f'{full}: free space and rerun the same command' if full else one_line(e))
    except (Stopped, KeyboardInterrupt) as e:
      if debug():
        raise
      logging.flush()
      fail(one_line(e) or 'interrupted', EXIT_STOPPED, prefix='')
    except Exception as e:  # pylint: disable=broad-except
      full = disk_full(e)
      if full is None or debug():
        raise
      fail(f'no space left on device ({full}): free space and rerun the same '
           'command (finished checkpoints and files are kept)')

  return wrapped


def _quiet(record) -> bool:
  """Whether a log record is shown: not orbax's, nor jax's INFO that a
  platform it probes for (libtpu on every CPU machine) is absent."""
  return not ('orbax' in record.pathname or (
      record.levelno <= logging.converter.STANDARD_INFO
      and record.getMessage().startswith('Unable to initialize backend')))


def run(main: Callable[[list[str]], Any], positional_args: bool = False) -> None:
  """`absl.app.run(main)` with what every entry point shares: unexpected
  arguments refused (unless `positional_args`), orbax's logging and jax's
  notes on absent platforms quietened, one-line user errors and the
  documented exit codes."""

  def preamble(argv):
    if len(argv) > 1 and not positional_args:
      raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    logging.get_absl_handler().addFilter(_quiet)
    return main(argv)

  app.run(guard(preamble), flags_parser=_parse_flags)
