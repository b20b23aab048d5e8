"""Where a step's device work runs, so that the host can go on to the next step meanwhile.

On CUDA a step's work is launched from the host thread onto the current stream, as kernels always are, and an
event marks its end. The CPU has no stream, so with overlap on a single worker thread runs the launched steps
one after another, in order, as a stream would, and the host thread goes on; with overlap off the work runs in
the caller's thread, there and then. Either way `Pending.result()` is the only place the host waits.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

import torch

T = TypeVar("T")


class Pending(Generic[T]):
    """A launched step's result, once its device work is done."""

    def __init__(
        self, value: T | None = None, event: torch.cuda.Event | None = None, future: Future[T] | None = None
    ) -> None:
        self._value, self._event, self._future = value, event, future

    def done(self) -> bool:
        """Whether the device work has finished (never waits)."""
        if self._future is not None:
            return self._future.done()
        return self._event is None or self._event.query()

    def result(self) -> T:
        """Wait for the device work; its result (re-raising what the work raised)."""
        if self._future is not None:
            return self._future.result()
        if self._event is not None:
            self._event.synchronize()
        return self._value  # type: ignore[return-value]


class DeviceQueue:
    """Launches steps' device work in order: asynchronously on CUDA, and on the CPU when `overlap` is on."""

    def __init__(self, device: torch.device, overlap: bool) -> None:
        self.device = device
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="novainfer-device") if (
            overlap and device.type == "cpu"
        ) else None

    @property
    def asynchronous(self) -> bool:
        """Whether a launch returns before its work is done."""
        return self._worker is not None or self.device.type == "cuda"

    def launch(self, work: Callable[[], T]) -> Pending[T]:
        if self._worker is not None:
            return Pending(future=self._worker.submit(_without_autograd, work))
        value = work()
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        return Pending(value, event)


def _without_autograd(work: Callable[[], T]) -> T:
    with torch.inference_mode():  # the mode is per thread: the worker's must be set in the worker
        return work()
