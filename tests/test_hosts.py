"""Tests for mqa_flax.hosts."""

import signal

from mqa_flax import hosts


def test_a_signal_takes_effect_only_where_the_loop_agrees_on_it():
  # The handler records; the loop acts at `agree`, before its boundary check.
  # (When the handler itself stopped the loop, a signal during a boundary's
  # logging ended training after a boundary that had saved nothing.)
  with hosts.StopSignal() as stop:
    assert signal.getsignal(signal.SIGTERM) == stop._handle  # pylint: disable=protected-access
    stop._handle(signal.SIGTERM, None)  # pylint: disable=protected-access
    assert stop.signum is None
    stop.agree()
    assert stop.signum == signal.SIGTERM
  assert signal.getsignal(signal.SIGTERM) != stop._handle  # pylint: disable=protected-access
