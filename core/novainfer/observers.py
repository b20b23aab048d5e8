"""Hook wrappers that watch the attention hooks without changing them."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import torch

from novainfer.backend_api import hookimpl


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
