"""CUDA-graph capture for decode steps: one captured forward per graph size, replayed on refilled inputs.

A decode step launches hundreds of small kernels; replaying them as one graph removes the launch gaps. The
model runner captures a decode forward per size of `cuda_graph_sizes(max_num_seqs)` at start and replays the
smallest that holds a decode-only step (the backend's side of it: novainfer.backend_api's protocol). What a
forward reads lives in the runner's persistent buffers, so a replay needs them refilled, nothing more; this
module holds only the capture itself, and whether it may be tried.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from novainfer.backend_api import BackendSpec

Outputs = tuple[torch.Tensor, torch.Tensor]  # a decode forward's (logits, hidden states)


def capture_refusal(device: torch.device, backend: BackendSpec) -> str | None:
    """Why decode steps cannot be captured for `backend` on `device`, as far as its spec tells, or None (its
    `cuda_graph_unsupported` hook is asked once it is created)."""
    if device.type != "cuda":
        return "CUDA graphs need a CUDA device"
    if not backend.capabilities.cuda_graphs:
        return f"{backend.name} does not support CUDA graphs"
    return None


class DecodeGraphs:
    """Captured decode forwards, one per size, sharing one memory pool."""

    def __init__(self, sizes: Sequence[int], setup: Callable[[int], Callable[[], Outputs]]) -> None:
        """Capture a forward per size, largest first so the smaller ones reuse its memory pool.

        `setup(size)` fills the inputs of a decode batch of that size (building its metadata there, outside
        the graph) and returns the forward to capture on them.
        """
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, Outputs] = {}
        pool = None
        for size in sorted(sizes, reverse=True):
            forward = setup(size)
            # Warm up on a side stream first (lazy kernel compilation and cuBLAS workspaces must
            # happen outside the capture), as PyTorch's graph docs require.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    forward()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[size] = forward()
            pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize()

    def replay(self, size: int) -> Outputs:
        """The captured forward of `size` over its inputs as now filled: the graph's static outputs, valid until
        its next replay."""
        self.graphs[size].replay()
        return self.outputs[size]
