"""Writing user-facing files so that a crash or a full disk never leaves half a file.

`atomic_write` writes a temporary file beside the target, flushes it to disk
and renames it over the target: a reader sees the old file or the new one,
never a mix, and a failed write leaves the old file as it was.
`locked` serialises read-modify-write updates (bleu.json) between processes,
and `read_json` turns a truncated or edited JSON file into one `UserError` line.
"""

import contextlib
import fcntl
import json
import os
from typing import IO, Any, Iterator

from mqa_flax.errors import UserError


def _fsync_dir(directory: str) -> None:
  """Makes a rename in `directory` durable (where the filesystem allows it)."""
  try:
    fd = os.open(directory or '.', os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass  # Some filesystems do not sync directories.
  finally:
    os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str, mode: str = 'w') -> Iterator[IO]:
  """Yields a file that replaces `path` when the `with` block ends without error.

  The data goes to `<path>.tmp<pid>` in the same directory, is flushed and
  fsync'ed, then renamed over `path`. On any error the temporary file is
  removed and `path` is left untouched.
  """
  assert mode in ('w', 'wb'), mode
  directory = os.path.dirname(path)
  if directory:
    os.makedirs(directory, exist_ok=True)
  tmp = f'{path}.tmp{os.getpid()}'
  kwargs = {} if 'b' in mode else {'encoding': 'utf-8', 'newline': '\n'}
  try:
    with open(tmp, mode, **kwargs) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise
  _fsync_dir(directory)


def write_text(path: str, text: str) -> None:
  """Replaces `path` with `text`, atomically."""
  with atomic_write(path) as f:
    f.write(text)


def write_json(path: str, obj: Any, indent: int | None = 1) -> None:
  """Replaces `path` with `obj` as JSON, atomically."""
  with atomic_write(path) as f:
    json.dump(obj, f, indent=indent)


def append_line(path: str, line: str) -> None:
  """Appends one line (a newline is added) and flushes it to disk."""
  with open(path, 'a', encoding='utf-8') as f:
    f.write(line + '\n')
    f.flush()
    os.fsync(f.fileno())


def read_json(path: str, fix: str = 'restore it from a copy, or remove it') -> Any:
  """The JSON in `path`; a file that is not valid JSON is a UserError naming it and `fix`."""
  with open(path, 'rb') as f:
    raw = f.read()
  try:
    return json.loads(raw.decode('utf-8'))
  except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8.
    raise UserError(f'{path} is not valid JSON ({e}): {fix}') from None


@contextlib.contextmanager
def locked(path: str) -> Iterator[None]:
  """Holds an exclusive lock on `<path>.lock` (the kernel's flock) in the block.

  Read-modify-write updates of `path` done inside the block by several
  processes (or threads) then keep each other's changes.
  """
  directory = os.path.dirname(path)
  if directory:
    os.makedirs(directory, exist_ok=True)
  with open(f'{path}.lock', 'a') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)
