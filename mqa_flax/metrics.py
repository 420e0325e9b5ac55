"""TensorBoard + JSON-lines metric logging and console progress, without TensorFlow.

`MetricWriter` has the method names of `clu.metric_writers` (which imports
TensorFlow). Scalars go both to TensorBoard event files and to
`<logdir>/metrics.jsonl`, one line per `write_scalars` call, which is what
`mqa_flax.report` reads:

  {"step": 1200, "train/loss": 2.31, "train/lr": 0.00094}

A rerun in the same workdir appends, so a step can appear twice after a resume;
readers should let the later line win.
"""

import contextlib
import datetime
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from absl import logging
import jax
import tensorboardX
from tensorboardX import summary as tbx_summary

from mqa_flax import files

METRICS_FILE = 'metrics.jsonl'
# One line per training start or resume: `provenance()`, start step, devices.
LAUNCHES_FILE = 'launches.jsonl'


def flatten_dict(d: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  """Flattens nested dicts (or ConfigDicts) into one level with '.'-joined keys."""
  flat = {}
  for k, v in d.items():
    key = f'{prefix}{k}'
    if hasattr(v, 'items'):
      flat.update(flatten_dict(v, key + '.'))
    else:
      flat[key] = v
  return flat


class MetricWriter:
  """Writes scalars, texts and hparams to TensorBoard and scalars to metrics.jsonl.

  With `enabled=False` (non-primary hosts) every method does nothing and no
  file is created.
  """

  def __init__(self, logdir: str, enabled: bool = True):
    self.logdir = logdir
    self.enabled = enabled
    self._tb = tensorboardX.SummaryWriter(logdir) if enabled else None
    self._jsonl_path = os.path.join(logdir, METRICS_FILE)
    if enabled:
      _drop_partial_last_line(self._jsonl_path)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Writes scalars (floats, numpy or jax scalars) at `step`."""
    if not self.enabled:
      return
    values = {k: float(v) for k, v in scalars.items()}
    for k, v in values.items():
      self._tb.add_scalar(k, v, int(step))
    # Opened per call, so the file is complete even if the process dies.
    with open(self._jsonl_path, 'a') as f:
      f.write(json.dumps({'step': int(step), **values}) + '\n')

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    """Writes text summaries (TensorBoard only) at `step`."""
    if not self.enabled:
      return
    for k, v in texts.items():
      self._tb.add_text(k, str(v), int(step))

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    """Writes (nested) hyperparameters to the TensorBoard HParams plugin."""
    if not self.enabled:
      return
    flat = {k: v if isinstance(v, (bool, int, float, str)) else str(v)
            for k, v in flatten_dict(hparams).items()}
    experiment, session_start, _ = tbx_summary.hparams(flat, {})
    # Same event file as the scalars (tensorboardX's add_hparams would start a
    # separate sub-run).
    self._tb.file_writer.add_summary(experiment)
    self._tb.file_writer.add_summary(session_start)

  def flush(self) -> None:
    """Flushes pending TensorBoard events to disk."""
    if self.enabled:
      self._tb.flush()

  def close(self) -> None:
    """Flushes and closes the TensorBoard writer."""
    if self.enabled:
      self._tb.close()


def _drop_partial_last_line(path: str) -> None:
  """Cuts a last line left without its newline by a killed run, so the next
  record does not join it."""
  if not os.path.exists(path) or os.path.getsize(path) == 0:
    return
  with open(path, 'rb+') as f:
    data = f.read()
    if data.endswith(b'\n'):
      return
    keep = data.rfind(b'\n') + 1
    f.truncate(keep)
  logging.warning('%s: removed an incomplete last line (%d bytes) left by an '
                  'interrupted run', path, len(data) - keep)


def read_jsonl(path: str) -> list[dict[str, Any]]:
  """Reads a JSON-lines file into a list of dicts, skipping blank lines."""
  with open(path) as f:
    lines = [line for line in f.read().splitlines() if line.strip()]
  rows = []
  for i, line in enumerate(lines):
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError as e:
      if i == len(lines) - 1:  # A run killed mid-write leaves a partial line.
        logging.warning('%s: ignoring incomplete last line', path)
      else:
        raise ValueError(f'{path}:{i + 1}: invalid JSON line: {e}') from e
  return rows


def jsonl_appender(path: str, **fields: Any) -> Callable[[Mapping[str, Any]], None]:
  """A function appending one row (plus `fields`) to the JSON-lines file
  `path`, flushed to disk at once, so that a stopped run keeps every finished
  row. A last line cut short by a crash or a full disk is removed first."""
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  _drop_partial_last_line(path)

  def append(row: Mapping[str, Any]) -> None:
    files.append_line(path, json.dumps(dict(row, **fields)))
  return append


def git_commit() -> str | None:
  """The commit of this code's checkout, or None outside a git checkout."""
  try:
    return subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True,
                          text=True, check=True,
                          cwd=os.path.dirname(__file__)).stdout.strip() or None
  except (OSError, subprocess.CalledProcessError):
    return None


def command() -> str:
  """This process's command line as typed, never a machine's absolute path:
  'python -m mqa_flax.demo --out=x' for a module run with -m, 'python
  decode.py ...' for a script (its path relative to the working directory,
  or only its name when it lies outside)."""
  spec = getattr(sys.modules.get('__main__'), '__spec__', None)
  if spec is not None and spec.name:
    program = '-m ' + spec.name.removesuffix('.__main__')
  else:
    program = sys.argv[0] if sys.argv else ''
    if os.path.isabs(program):
      rel = os.path.relpath(program)
      program = os.path.basename(program) if rel.startswith('..') else rel
  return ' '.join(['python', program, *sys.argv[1:]])


def provenance() -> dict[str, str | None]:
  """What produces a result: this process's command line as typed, the
  code's commit, the kind of its first device and the time (UTC, seconds)."""
  return dict(command=command(), git_commit=git_commit(),
              device=jax.devices()[0].device_kind,
              date=datetime.datetime.now(datetime.timezone.utc).isoformat(
                  timespec='seconds'))


def format_duration(seconds: float) -> str:
  """Formats seconds compactly: '3h18m', '4m05s' or '12s'."""
  if not math.isfinite(seconds):
    return '?'
  s = int(round(seconds))
  if s >= 3600:
    return f'{s // 3600}h{s % 3600 // 60:02d}m'
  if s >= 60:
    return f'{s // 60}m{s % 60:02d}s'
  return f'{s}s'


class ReportProgress:
  """The train loop's one clock: training time, steps/s and ETA between reports.

  `start(step)` starts it; each call `progress(step, extra)` logs
  `step i/n (p%) | r steps/s | ETA t | extra` via absl.logging and returns
  the seconds of training since the previous call (or the start). Time spent
  inside `with progress.paused():` (evaluation, checkpointing) is not
  training time.
  """

  def __init__(self, num_train_steps: int):
    self.num_train_steps = num_train_steps
    self._last_step = 0
    self._last_time = time.monotonic()
    self._paused_secs = 0.0

  def start(self, step: int) -> None:
    """Starts the clock at `step`."""
    self._last_step, self._last_time, self._paused_secs = step, time.monotonic(), 0.0

  def elapsed(self) -> float:
    """Training seconds since the last report (or the start)."""
    return max(time.monotonic() - self._last_time - self._paused_secs, 1e-9)

  def __call__(self, step: int, extra: str = '') -> float:
    """Logs the progress line for `step`; returns the training seconds since the last call."""
    now = time.monotonic()
    seconds = self.elapsed()
    rate = (step - self._last_step) / seconds
    n = self.num_train_steps
    parts = [f'step {step}/{n} ({100 * step / max(n, 1):.1f}%)']
    if rate > 0:
      parts += [f'{rate:.2f} steps/s', f'ETA {format_duration(max(n - step, 0) / rate)}']
    logging.info('%s', ' | '.join(parts + ([extra] if extra else [])))
    self._last_step, self._last_time, self._paused_secs = step, now, 0.0
    return seconds

  @contextlib.contextmanager
  def paused(self) -> Iterator[None]:
    """Excludes the time spent in the `with` block from training time."""
    start = time.monotonic()
    try:
      yield
    finally:
      self._paused_secs += time.monotonic() - start
