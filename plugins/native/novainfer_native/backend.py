"""The native backend: Triton kernels on CUDA, and the core's plain-PyTorch attention elsewhere.

Option `kernels`: "auto" (Triton on CUDA when triton is installed, else PyTorch), "triton" or
"torch". The PyTorch path is the core's own attention in the cache's dtype (the contract's
core_attention): native adds the Triton kernels, never a second copy of it.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

import torch

from novainfer.backend_api import (
    AttentionContext,
    StepBatch,
    core_attention,
    core_attention_metadata,
    hookimpl,
)
from novainfer_native import Options


@dataclass(frozen=True)
class TritonMetadata:
    batch: StepBatch
    num_splits: int  # context splits of the decode launch (decodes are rows :num_decodes)
    prefill_query_start: torch.Tensor | None  # query_start_loc[num_decodes:]; None without prefills
    prefill_max_query_len: int


def resolve_kernels(options: Options, device: torch.device) -> str:
    """The kernels the option picks on `device`: "auto" is Triton on CUDA where triton is installed. (That
    "triton" needs triton installed is the registry's to check first: novainfer_native.unavailable.)"""
    if options.kernels != "auto":
        return options.kernels
    return "triton" if device.type == "cuda" and importlib.util.find_spec("triton") is not None else "torch"


class NativeBackend:
    def __init__(self, context: AttentionContext) -> None:
        self.context = context
        # A backend built on native's hooks under a name of its own (a test's, an adversary's) declares no
        # options of its own: it runs native's defaults.
        options = context.options if isinstance(context.options, Options) else Options()
        self.kernels = resolve_kernels(options, context.device)
        if self.kernels == "triton":
            from novainfer_native import triton_ops

            self.ops = triton_ops
            self.max_splits = 16
            self.workspace = triton_ops.decode_workspace(
                context.max_num_seqs, context.num_q_heads, context.head_dim, self.max_splits, context.device
            )
            self.num_sms = (
                torch.cuda.get_device_properties(context.device).multi_processor_count
                if context.device.type == "cuda"
                else 1
            )
            self._compile_decode_variants()

    def _compile_decode_variants(self) -> None:
        """Compile the decode kernel with and without the context split now.

        Which one a step needs depends on its batch size and context lengths, so a run could meet
        either for the first time inside its timed window. A one-token context in a one-block
        dummy cache is enough; the block table has the real width (strides are specialised on).
        """
        c = self.context
        cache = torch.zeros(2, 1, c.block_size, c.num_kv_heads, c.head_dim, dtype=c.dtype, device=c.device)
        query = torch.zeros(1, c.num_q_heads, c.head_dim, dtype=c.dtype, device=c.device)
        tables = torch.zeros(1, -(-c.max_model_len // c.block_size), dtype=torch.int32, device=c.device)
        seq_lens = torch.ones(1, dtype=torch.int32, device=c.device)
        for splits in (1, 2):
            self.ops.paged_decode_attention(
                query, cache, tables, seq_lens, 1.0, torch.empty_like(query), workspace=self.workspace,
                num_splits=splits,
            )

    @hookimpl
    def cuda_graph_unsupported(self) -> str | None:
        if self.kernels == "torch":
            return "native with kernels='torch' sizes its tensors from host values each step"
        return None

    @hookimpl
    def backend_counters(self) -> dict[str, int]:
        if self.kernels != "triton":
            return {}
        return {"triton_compiles": self.ops.compiled_kernel_count()}

    @hookimpl
    def prepare_attention_metadata(self, batch: StepBatch) -> Any:
        return self._triton_metadata(batch) if self.kernels == "triton" else core_attention_metadata(batch)

    def _triton_metadata(self, batch: StepBatch) -> TritonMetadata:
        nd = batch.num_decodes
        # A graph batch's max_seq_len is the longest possible: its graph serves any context length.
        splits = self.ops.choose_num_splits(
            nd, self.context.num_kv_heads, self.num_sms, batch.max_seq_len, self.max_splits
        )
        if not batch.num_prefills:
            return TritonMetadata(batch, splits, None, 0)
        # The prefill kernel reads absolute query rows from query_start_loc, so the prefill
        # sequences' slice of it addresses their rows in the full query tensor.
        lengths = batch.query_start_loc_cpu[nd + 1 :] - batch.query_start_loc_cpu[nd:-1]
        return TritonMetadata(batch, splits, batch.query_start_loc[nd:], int(lengths.max()))

    @hookimpl
    def write_kv(
        self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
    ) -> bool | None:
        if self.kernels == "torch":
            return None  # the core's indexed scatter
        self.ops.write_kv(key, value, kv_cache, slot_mapping)
        return True

    @hookimpl
    def attention(
        self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: Any, scale: float, output: torch.Tensor
    ) -> bool:
        if not isinstance(metadata, TritonMetadata):
            core_attention(query, kv_cache, metadata, scale, output)
            return True
        b, nd = metadata.batch, metadata.batch.num_decodes
        if nd:
            self.ops.paged_decode_attention(
                query[:nd], kv_cache, b.block_tables, b.seq_lens, scale, output[:nd],
                workspace=self.workspace, num_splits=metadata.num_splits,
            )
        if metadata.prefill_query_start is not None:
            self.ops.paged_prefill_attention(
                query, kv_cache, b.block_tables[nd:], metadata.prefill_query_start, b.seq_lens[nd:],
                metadata.prefill_max_query_len, scale, output,
            )
        return True
