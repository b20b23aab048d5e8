"""The cuDNN graphs' per-step inputs in persistent buffers, and a step's attention as graph calls.

Plain PyTorch on any device (no cuDNN), so the CPU tests run exactly this code.

Buffers, int32, allocated once for the largest bucket and refilled in place once per step:
    decode_len_q     [max decode batch]              1 in every row; written once
    decode_len_kv    [max decode batch]              tokens in the cache incl. this step's; padded rows 1
    decode_tables    [max decode batch, width]       block ids; padded rows 0 (the scratch block)
    prefill_lens     [2, max prefill batch]          row 0 chunk lengths, row 1 tokens in the cache incl.
                                                     the chunk; padded entries 0, so cuDNN skips them
    prefill_offsets  [max prefill batch + 1]         element offset of each chunk's first row in the step's
                                                     query and output ([T, Hq, D]): query_start_loc * Hq * D;
                                                     padded entries T * Hq * D (nothing is read or written)
    prefill_tables   [max prefill batch, width]      block ids; padded rows 0
A graph of batch B binds views of the first B entries, shaped as cuDNN takes them ([B, 1, 1, 1] lengths,
[B, 1, width, 1] tables, [B + 1, 1, 1, 1] offsets). The views are made once per key, so a graph, and a
CUDA graph captured around it, always reads the same storage.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from novainfer.backend_api import StepBatch
from novainfer_cudnn.buckets import GraphKey, GraphKeys, StepPlan, plan_step

# Runs one graph: (key, query rows, output rows, K container, V container).
GraphRunner = Callable[[GraphKey, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


@dataclass(frozen=True)
class GraphInputs:
    """The persistent views one graph binds besides Q, K, V and O.

    seq_len_q, seq_len_kv: [B, 1, 1, 1] int32.
    page_table:            [B, 1, width, 1] int32, bound as both the K and the V table.
    ragged_offsets:        [B + 1, 1, 1, 1] int32, Q's and O's row offsets in elements; prefill only.
    """

    seq_len_q: torch.Tensor
    seq_len_kv: torch.Tensor
    page_table: torch.Tensor
    ragged_offsets: torch.Tensor | None


class Layout:
    def __init__(
        self,
        keys: GraphKeys,
        table_width: int,
        num_q_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.keys = keys
        self.row_elems = num_q_heads * head_dim
        max_decodes = keys.decode_batches[-1]
        max_prefills = max((key.batch for key in keys.prefill), default=0)
        i32 = dict(dtype=torch.int32, device=device)
        self.decode_len_q = torch.ones(max_decodes, **i32)
        self.decode_len_kv = torch.ones(max_decodes, **i32)
        self.decode_tables = torch.zeros(max_decodes, table_width, **i32)
        self.prefill_lens = torch.zeros(2, max_prefills, **i32)
        self.prefill_offsets = torch.zeros(max_prefills + 1, **i32)
        self.prefill_tables = torch.zeros(max_prefills, table_width, **i32)
        # An eager step's decode rows, when their count is not a bucket, are copied here, padded to the
        # bucket and copied back: a dense graph reads and writes exactly B rows.
        self.stage_q = torch.zeros(max_decodes, num_q_heads, head_dim, dtype=dtype, device=device)
        self.stage_out = torch.zeros_like(self.stage_q)
        self._inputs = {key: self._views(key) for key in keys.all()}

    def _views(self, key: GraphKey) -> GraphInputs:
        b, width = key.batch, self.decode_tables.shape[1]
        if key.kind == "decode":
            return GraphInputs(
                self.decode_len_q[:b].view(b, 1, 1, 1),
                self.decode_len_kv[:b].view(b, 1, 1, 1),
                self.decode_tables[:b].view(b, 1, width, 1),
                None,
            )
        return GraphInputs(
            self.prefill_lens[0, :b].view(b, 1, 1, 1),
            self.prefill_lens[1, :b].view(b, 1, 1, 1),
            self.prefill_tables[:b].view(b, 1, width, 1),
            self.prefill_offsets[: b + 1].view(b + 1, 1, 1, 1),
        )

    def inputs(self, key: GraphKey) -> GraphInputs:
        return self._inputs[key]

    def prepare(self, batch: StepBatch) -> StepPlan:
        """Choose the step's graphs and refill their inputs from the batch's device tensors."""
        # A CUDA-graph batch is all decodes, its padding rows included (num_decodes counts them): the CUDA
        # graph captured for its size runs the decode graph of exactly that size over every row.
        num_decodes = batch.num_decodes
        num_prefills = batch.num_seqs - num_decodes
        # With prefill chunks present the longest query is a chunk's (decodes have one token).
        plan = plan_step(self.keys, num_decodes, num_prefills, batch.max_query_len if num_prefills else 0)
        if plan.decode is not None:
            self._fill_decodes(batch, num_decodes, plan.decode.batch)
        if plan.prefill is not None:
            self._fill_prefills(batch, num_decodes, plan.prefill.batch)
        return plan

    def _fill_decodes(self, batch: StepBatch, count: int, size: int) -> None:
        self.decode_len_kv[:count].copy_(batch.seq_lens[:count])
        self.decode_tables[:count].copy_(batch.block_tables[:count])
        if size > count:
            # Padded rows attend to one token of the scratch block; their output is dropped.
            self.decode_len_kv[count:size].fill_(1)
            self.decode_tables[count:size].zero_()

    def _fill_prefills(self, batch: StepBatch, first: int, size: int) -> None:
        count = batch.num_seqs - first
        starts = batch.query_start_loc[first:]
        torch.sub(starts[1:], starts[:-1], out=self.prefill_lens[0, :count])
        self.prefill_lens[1, :count].copy_(batch.seq_lens[first:])
        # Absolute offsets: the graph is handed the whole step's query and output, decode rows included.
        torch.mul(starts, self.row_elems, out=self.prefill_offsets[: count + 1])
        self.prefill_tables[:count].copy_(batch.block_tables[first:])
        if size > count:
            self.prefill_lens[:, count:size].zero_()
            self.prefill_offsets[count + 1 : size + 1].fill_(batch.num_tokens * self.row_elems)
            self.prefill_tables[count:size].zero_()

    def attend(
        self, query: torch.Tensor, kv_cache: torch.Tensor, plan: StepPlan, run: GraphRunner, out: torch.Tensor
    ) -> None:
        """One layer's attention into `out` [T, Hq, D] (contiguous, the core's output): the decode graph over the
        decode rows, the prefill graph over the chunks, each writing its own rows."""
        # The graphs are built for token-major rows of Hq * D elements; the model's query already is one
        # (then this is free).
        query = query.contiguous()
        # The core's cache read in place: [blocks, block_size, Hkv, D] seen as [blocks, Hkv, block_size, D].
        k, v = kv_cache[0].transpose(1, 2), kv_cache[1].transpose(1, 2)
        n = plan.num_decodes
        if plan.decode is not None:
            if plan.stages_decodes:
                size = plan.decode.batch
                self.stage_q[:n].copy_(query[:n])
                run(plan.decode, self.stage_q[:size], self.stage_out[:size], k, v)
                out[:n].copy_(self.stage_out[:n])
            else:
                run(plan.decode, query[:n], out[:n], k, v)
        if plan.prefill is not None:
            run(plan.prefill, query, out, k, v)
