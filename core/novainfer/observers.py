"""Hook wrappers that watch the attention hooks without changing them."""

from __future__ import annotations

import time
from collections.abc import Generator
from typing import Any

import torch

from novainfer.hookspecs import hookimpl

PHASES = ("metadata", "kv_write", "attention")


class PhaseTimer:
    """Accumulates time per attention phase: metadata preparation, KV write, attention.

    On CUDA each call is bracketed by two events on the current stream and nothing synchronises
    until `seconds()` is read, so timing does not stall the pipeline it measures; on the CPU the
    host clock is exact. Under CUDA-graph replay the hooks are not called, so graph-replayed
    decode steps are not in the breakdown.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._host: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        self._events: dict[str, list[tuple[torch.cuda.Event, torch.cuda.Event]]] = {p: [] for p in PHASES}
        self.calls: dict[str, int] = dict.fromkeys(PHASES, 0)

    def _timed(self, phase: str) -> Generator[None, Any, Any]:
        self.calls[phase] += 1
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = yield
            end.record()
            self._events[phase].append((start, end))
            return result
        t0 = time.perf_counter()
        result = yield
        self._host[phase] += time.perf_counter() - t0
        return result

    @hookimpl(wrapper=True)
    def prepare_attention_metadata(self) -> Generator[None, Any, Any]:
        return (yield from self._timed("metadata"))

    @hookimpl(wrapper=True)
    def write_kv(self) -> Generator[None, Any, Any]:
        return (yield from self._timed("kv_write"))

    @hookimpl(wrapper=True)
    def attention(self) -> Generator[None, Any, Any]:
        return (yield from self._timed("attention"))

    def seconds(self) -> dict[str, float]:
        """Total seconds per phase so far."""
        if self.cuda:
            torch.cuda.synchronize()
            for phase, pairs in self._events.items():
                self._host[phase] += sum(s.elapsed_time(e) for s, e in pairs) / 1e3
                pairs.clear()
        return dict(self._host)

    def reset(self) -> None:
        self.seconds()
        self._host = dict.fromkeys(PHASES, 0.0)
        self.calls = dict.fromkeys(PHASES, 0)


class NvtxRanges:
    """Names each attention phase in an Nsight Systems timeline (`nsys profile`), as NVTX ranges.

    The engine itself brackets every step in a "step" range; with this observer registered each
    hook call inside it shows up as "metadata", "kv_write" or "attention". A push/pop pair costs
    about a microsecond when no profiler is attached. Graph-replayed decode steps show as one
    replay, since the hooks are not called there.
    """

    def _range(self, phase: str) -> Generator[None, Any, Any]:
        torch.cuda.nvtx.range_push(phase)
        try:
            return (yield)
        finally:
            torch.cuda.nvtx.range_pop()

    @hookimpl(wrapper=True)
    def prepare_attention_metadata(self) -> Generator[None, Any, Any]:
        return (yield from self._range("metadata"))

    @hookimpl(wrapper=True)
    def write_kv(self) -> Generator[None, Any, Any]:
        return (yield from self._range("kv_write"))

    @hookimpl(wrapper=True)
    def attention(self) -> Generator[None, Any, Any]:
        return (yield from self._range("attention"))
