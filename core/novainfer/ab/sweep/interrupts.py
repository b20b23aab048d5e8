"""Ctrl-C that a sweep never loses, and that never tears a write.

Python raises KeyboardInterrupt wherever the main thread happens to be when SIGINT's handler runs. Two places
are wrong for it:
- a finalizer (a `__del__` or weakref callback: an SQLAlchemy session of MLflow's, a finished Popen, a
  temporary directory being collected): the exception cannot propagate, Python prints "Exception ignored in ..."
  and drops it, and the sweep used to run on to its end and exit 0 (seen in CI under load);
- the middle of a write: an MLflow sqlite transaction interrupted between its first statement and its commit
  keeps the database's write lock (its connection lives on in the traceback), so marking the parent run KILLED
  waited on "database is locked" for minutes (seen in CI: the Ctrl-C test timed out).
Within `interrupts_kept`, the handler remembers the interrupt (and Python's report of one it dropped, an
"Exception ignored in ..." traceback on stderr, is left out); the sweep asks at the points where it may stop
(after each trial's record) so that a dropped one is raised again there, and holds a Ctrl-C back while it
writes a record, raising it when the write is done.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType


class KeptInterrupts:
    """What `interrupts_kept` yields: whether a Ctrl-C has arrived, and blocks it may not cut short."""

    def __init__(self) -> None:
        self.arrived = False
        self._holding = 0
        self.previous_unraisablehook = sys.unraisablehook

    def on_sigint(self, signum: int, frame: FrameType | None) -> None:
        again = self.arrived
        self.arrived = True
        if not self._holding or again:  # a second Ctrl-C does not wait: the user insists
            raise KeyboardInterrupt

    def on_unraisable(self, unraisable: sys.UnraisableHookArgs) -> None:
        """sys.unraisablehook: a Ctrl-C dropped in a finalizer is remembered, to be raised where the sweep may
        stop; anything else goes to the hook there was before."""
        if not (self.arrived and isinstance(unraisable.exc_value, KeyboardInterrupt)):
            self.previous_unraisablehook(unraisable)

    def check(self) -> None:
        """Raise KeyboardInterrupt if a Ctrl-C has arrived, whether or not it got through."""
        if self.arrived:
            raise KeyboardInterrupt

    @contextmanager
    def held(self) -> Iterator[None]:
        """Within: a (first) Ctrl-C waits, and is raised when the block ends; for writes that an interrupt
        halfway would leave torn or locked."""
        self._holding += 1
        try:
            yield
        finally:
            self._holding -= 1
        self.check()


@contextmanager
def interrupts_kept() -> Iterator[KeptInterrupts]:
    """Within: SIGINT raises KeyboardInterrupt as Python's own handler does (outside `held` blocks), and is
    remembered. Only where SIGINT has Python's own handler in the main thread: a SIGINT that a shell ignores for
    a background job stays ignored, and a handler of the caller's stays theirs (`check` then never raises and
    `held` holds nothing back)."""
    kept = KeptInterrupts()
    if threading.current_thread() is not threading.main_thread() or (
        signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield kept
        return
    signal.signal(signal.SIGINT, kept.on_sigint)
    sys.unraisablehook = kept.on_unraisable
    try:
        yield kept
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.unraisablehook = kept.previous_unraisablehook
