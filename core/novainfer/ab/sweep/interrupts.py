"""Ctrl-C that a sweep never loses.

Python raises KeyboardInterrupt wherever the main thread happens to be when SIGINT's handler runs. Where that is
a finalizer (a `__del__` or weakref callback: an SQLAlchemy session of MLflow's, a finished Popen, a temporary
directory being collected), the exception cannot propagate: Python prints "Exception ignored in ..." and drops
it, and the sweep used to run on to its end and exit 0 (seen in CI under load). Within `interrupts_kept`, the
handler also remembers the interrupt, and the sweep asks at the points where it may stop (after each trial's
record) so that a dropped one is raised again there.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType


@contextmanager
def interrupts_kept() -> Iterator[Callable[[], None]]:
    """Within: SIGINT raises KeyboardInterrupt as Python's own handler does, and is remembered; yields `check`,
    which raises KeyboardInterrupt if one has arrived, whether or not it got through. Only where SIGINT has
    Python's own handler in the main thread: a SIGINT that a shell ignores for a background job stays ignored,
    and a handler of the caller's stays theirs (`check` then never raises)."""
    arrived = False

    def remember(signum: int, frame: FrameType | None) -> None:
        nonlocal arrived
        arrived = True
        raise KeyboardInterrupt

    def check() -> None:
        if arrived:
            raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread() or (
        signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield check
        return
    signal.signal(signal.SIGINT, remember)
    try:
        yield check
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
