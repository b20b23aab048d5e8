"""Decode in CUDA graphs: one captured forward per batch-size bucket, replayed with padding.

A decode step launches hundreds of small kernels; replaying them as one graph removes the launch
gaps. Graphs are captured at engine start for buckets 1, 2, 4, 8, then every 16 up to
max_num_seqs, largest first so smaller ones reuse its memory pool. A step of n decodes replays the
smallest bucket >= n, its extra rows reading and writing the scratch block. The inputs live in the
model runner's persistent step buffers, so a replay only needs them refilled.

With `capture=False` the same padded path runs eagerly: that is how CPU tests check that padding
leaves the real rows' logits unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from novainfer.backend_api import cuda_graph_sizes
from novainfer.block_manager import scratch_sequence
from novainfer.scheduler import ScheduledSeq, SchedulerOutput

if TYPE_CHECKING:
    from novainfer.model_runner import ModelRunner

HookCallers = tuple[Callable[..., Any], Callable[..., Any]]  # (write_kv, attention)


class DecodeGraphs:
    def __init__(self, runner: ModelRunner, hooks: HookCallers, capture: bool) -> None:
        """`hooks` are the backend's write_kv and attention callables without observers: events and
        timers cannot be recorded inside a capture."""
        self.runner = runner
        self.hooks = hooks
        self.buckets = cuda_graph_sizes(runner.buffers.max_seqs)
        self.capture = capture
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # bucket -> (logits, hidden)
        if capture:
            self._capture_all()

    def bucket_for(self, out: SchedulerOutput) -> int | None:
        """The bucket a step replays, or None when it must run eagerly (it has prefill chunks)."""
        n = len(out.entries)
        if out.num_decodes != n:
            return None
        return next(b for b in self.buckets if b >= n)

    def run(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [bucket, vocab], hidden states [bucket, hidden]) of a padded decode batch; rows past the
        real ones are garbage."""
        metadata = self.runner.prepare_metadata(batch=batch)  # outside the graph: backends may re-plan
        size = batch.num_seqs
        if not self.capture:
            return self._forward(batch, metadata)
        self.graphs[size].replay()
        return self.outputs[size]

    def _forward(self, batch: Any, metadata: Any) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.runner.forward(batch, metadata, self.hooks)
        return self.runner.logits(batch, hidden), hidden

    def _capture_all(self) -> None:
        pool = None
        for size in reversed(self.buckets):
            batch = self.runner.prepare(_dummy_decodes(size), pad_to=size)
            metadata = self.runner.prepare_metadata(batch=batch)
            # Warm up on a side stream first (lazy kernel compilation and cuBLAS workspaces must
            # happen outside the capture), as PyTorch's graph docs require.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._forward(batch, metadata)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[size] = self._forward(batch, metadata)
            pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize()


def _dummy_decodes(n: int) -> SchedulerOutput:
    """n decodes of one token each, all in the scratch block: what capture runs the forward on."""
    entries = [ScheduledSeq(scratch_sequence(1, 1), 1) for _ in range(n)]
    return SchedulerOutput(entries=entries, num_decodes=n)
