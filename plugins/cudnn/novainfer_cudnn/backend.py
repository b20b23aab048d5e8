"""The cudnn backend: cuDNN's paged SDPA (nvidia-cudnn-frontend), one graph per shape bucket.

What the seed tool's cuDNN path taught (its profile: graphs built mid-run, device-property queries and
library loads in the loop, cudaMalloc/cudaFree among the top API costs), and what this does instead:
- every graph a run can need (novainfer_cudnn.buckets) is built when the backend is created, before
  warm-up and timing; builds and device-property queries are counted (backend_counters), and the
  runner logs the difference over the timed window, which must be zero;
- a graph's inputs live in persistent buffers refilled in place once per step (novainfer_cudnn.layout);
  the workspace is allocated once, at the largest size any graph needs;
- one cuDNN handle, pointed at the calling stream before each execute (PyTorch's own pattern: a
  handle created while a CUDA graph is being captured would allocate inside the capture);
- the KV cache is read in place through strided views, and written by the core's default scatter.

Options:
    prebuild: "all" (default) builds every graph at creation; "lazy" builds each on first use, as the
        seed tool did, so its regression can be reproduced as an A/B arm.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import cudnn
import torch

from novainfer.backend_api import AttentionContext, BackendError, StepBatch, hookimpl
from novainfer_cudnn import MIN_BACKEND_VERSION, too_old_reason
from novainfer_cudnn.buckets import GraphKey, GraphKeys, Limits, StepPlan, prebuilt_keys, resolve_prebuild
from novainfer_cudnn.layout import Layout

COUNTERS = ("graph_builds", "graph_build_ms", "device_property_queries", "workspace_allocs")
IO_TYPES = {torch.bfloat16: cudnn.data_type.BFLOAT16, torch.float16: cudnn.data_type.HALF}


@dataclass(frozen=True)
class BuiltGraph:
    """A built graph, its Q/K/V/O tensors, and its variant pack with the persistent inputs already bound."""

    graph: Any
    q: Any
    k: Any
    v: Any
    o: Any
    pack: dict[Any, Any]
    workspace_bytes: int


class CudnnBackend:
    def __init__(self, context: AttentionContext) -> None:
        self.context = context
        self.device = context.device
        policy = resolve_prebuild(context.options)
        # The frontend may load another libcudnn than the one torch reported to the availability check.
        version = cudnn.backend_version()
        if version < MIN_BACKEND_VERSION:
            raise BackendError(f"cudnn: {too_old_reason(version)}")
        self.counters = dict.fromkeys(COUNTERS, 0)
        major, minor = torch.cuda.get_device_capability(self.device)
        self.counters["device_property_queries"] += 1
        if major < 8:
            raise BackendError(f"cudnn: SDPA needs an SM80 (Ampere) or newer GPU, this one is SM{major}{minor}")
        self.limits = Limits.from_context(context)
        row_elems = context.num_q_heads * context.head_dim
        if context.max_num_batched_tokens * row_elems >= 2**31:
            raise BackendError(
                "cudnn: a step's query is too large for int32 ragged offsets; lower max_num_batched_tokens"
            )
        self.io_type = IO_TYPES[context.dtype]
        self.scale = context.head_dim**-0.5
        self.keys = GraphKeys.for_limits(self.limits)
        self.layout = Layout(
            self.keys, self.limits.table_width, context.num_q_heads, context.head_dim, context.dtype, self.device
        )
        with torch.cuda.device(self.device):
            self.handle = cudnn.create_handle()
        self.graphs: dict[GraphKey, BuiltGraph] = {key: self._build(key) for key in prebuilt_keys(self.keys, policy)}
        self.workspace = self._allocate_workspace(max((g.workspace_bytes for g in self.graphs.values()), default=0))
        # Workspaces outgrown by a lazily built graph: CUDA graphs captured earlier still point at them.
        self._outgrown: list[torch.Tensor] = []

    def _allocate_workspace(self, nbytes: int) -> torch.Tensor:
        self.counters["workspace_allocs"] += 1
        return torch.empty(max(nbytes, 1), dtype=torch.uint8, device=self.device)

    def _build(self, key: GraphKey) -> BuiltGraph:
        started = time.perf_counter()
        c = self.context
        inputs = self.layout.inputs(key)
        row = c.num_q_heads * c.head_dim
        # Token-major rows [T, Hq, D], seen as [B, Hq, S, D]; a prefill graph locates each sequence's
        # rows through the ragged offsets instead of the batch stride.
        rows = [key.batch, c.num_q_heads, key.max_query_len, c.head_dim]
        row_strides = [key.max_query_len * row, c.head_dim, row, 1]
        # kv_cache[i].transpose(1, 2) of the core's [2, blocks, block_size, Hkv, D] cache.
        cache = [c.num_blocks, c.num_kv_heads, c.block_size, c.head_dim]
        cache_strides = [c.block_size * c.num_kv_heads * c.head_dim, c.head_dim, c.num_kv_heads * c.head_dim, 1]
        graph = cudnn.pygraph(
            io_data_type=self.io_type,
            intermediate_data_type=cudnn.data_type.FLOAT,
            compute_data_type=cudnn.data_type.FLOAT,
            handle=self.handle,
        )

        def int32(name: str, like: torch.Tensor) -> Any:
            return graph.tensor(
                name=name, dim=list(like.shape), stride=list(like.stride()), data_type=cudnn.data_type.INT32
            )

        q = graph.tensor(name="q", dim=rows, stride=row_strides, data_type=self.io_type)
        k = graph.tensor(name="k", dim=cache, stride=cache_strides, data_type=self.io_type)
        v = graph.tensor(name="v", dim=cache, stride=cache_strides, data_type=self.io_type)
        seq_len_q = int32("seq_len_q", inputs.seq_len_q)
        seq_len_kv = int32("seq_len_kv", inputs.seq_len_kv)
        table_k = int32("page_table_k", inputs.page_table)
        table_v = int32("page_table_v", inputs.page_table)
        pack: dict[Any, Any] = {
            seq_len_q: inputs.seq_len_q, seq_len_kv: inputs.seq_len_kv,
            table_k: inputs.page_table, table_v: inputs.page_table,
        }
        mask: dict[str, Any] = {}
        offsets = None
        if inputs.ragged_offsets is not None:
            offsets = int32("ragged_offsets", inputs.ragged_offsets)
            q.set_ragged_offset(offsets)
            pack[offsets] = inputs.ragged_offsets
            # Causal, the diagonal through each sequence's last query and last key: a chunk's query i
            # sees its cached prefix and the chunk's keys up to its own position.
            mask = dict(diagonal_alignment=cudnn.diagonal_alignment.BOTTOM_RIGHT, diagonal_band_right_bound=0)
        o, _ = graph.sdpa(
            name="sdpa", q=q, k=k, v=v, attn_scale=self.scale, generate_stats=False,
            use_padding_mask=True, seq_len_q=seq_len_q, seq_len_kv=seq_len_kv,
            paged_attention_k_table=table_k, paged_attention_v_table=table_v,
            paged_attention_max_seq_len_kv=self.limits.max_seq_len_kv,
            compute_data_type=cudnn.data_type.FLOAT, **mask,
        )
        o.set_output(True).set_dim(rows).set_stride(row_strides).set_data_type(self.io_type)
        if offsets is not None:
            o.set_ragged_offset(offsets)
        try:
            with torch.cuda.device(self.device):
                graph.validate()
                graph.build_operation_graph()
                graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
                graph.check_support()
                graph.build_plans()
                workspace_bytes = graph.get_workspace_size()
        except Exception as error:
            raise BackendError(f"cudnn: cannot build the {key} graph: {error}") from error
        self.counters["graph_builds"] += 1
        self.counters["graph_build_ms"] += round((time.perf_counter() - started) * 1000)
        return BuiltGraph(graph, q, k, v, o, pack, workspace_bytes)

    def _graph(self, key: GraphKey) -> BuiltGraph:
        graph = self.graphs.get(key)
        if graph is None:  # prebuild="lazy": built on first use, mid-run
            graph = self.graphs[key] = self._build(key)
            if graph.workspace_bytes > self.workspace.numel():
                self._outgrown.append(self.workspace)
                self.workspace = self._allocate_workspace(graph.workspace_bytes)
        return graph

    def _run(self, key: GraphKey, q: torch.Tensor, o: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        graph = self._graph(key)
        pack = graph.pack
        pack[graph.q], pack[graph.o], pack[graph.k], pack[graph.v] = q, o, k, v
        graph.graph.execute(pack, self.workspace, handle=self.handle)

    @hookimpl
    def cuda_graph_unsupported(self) -> str | None:
        # Capturable: every graph reads its inputs from persistent buffers and one fixed workspace, so
        # the kernels an execute launches replay correctly once prepare_attention_metadata (which runs
        # outside the CUDA graph) has refilled those buffers.
        return None

    @hookimpl
    def prepare_attention_metadata(self, batch: StepBatch) -> StepPlan:
        return self.layout.prepare(batch)

    @hookimpl
    def attention(
        self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: StepPlan, scale: float, output: torch.Tensor
    ) -> bool:
        if scale != self.scale:
            raise BackendError(f"cudnn: the graphs are built for softmax scale {self.scale}, called with {scale}")
        # The engine runs on the default stream, but CUDA-graph warm-up and capture run on their own.
        cudnn.set_stream(self.handle, torch.cuda.current_stream(self.device).cuda_stream)
        self.layout.attend(query, kv_cache, metadata, self._run, output)
        return True

    @hookimpl
    def backend_counters(self) -> dict[str, int]:
        return dict(self.counters)
