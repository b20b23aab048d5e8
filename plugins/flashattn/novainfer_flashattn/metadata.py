"""One step's kernel arguments, from the engine's StepBatch. Plain PyTorch: imports no FlashAttention.

Both generations read the core's cache in place: K is ``kv_cache[0]``, V ``kv_cache[1]``, each
[num_blocks, block_size, num_kv_heads, head_dim], which is FlashAttention's paged layout with our blocks
as its pages and our block tables as its page table. Key p of sequence b is in page
``page_table[b, p // block_size]`` at offset ``p % block_size``: the slot the engine wrote it to.

flash-attn-4: one call over every row of the step (decodes and prefill chunks together):
    cu_seqlens_q = query_start_loc, seqused_k = seq_lens, page_table = block_tables. Causal, aligned
    bottom-right, so query i of a chunk of q_len sits at key position seq_len - q_len + i and sees its
    cached prefix and the chunk up to itself; a decode (q_len 1) sees its whole sequence.
flash-attn 2: decodes through flash_attn_with_kvcache (cache_seqlens = seq_lens[:D], block_table =
    block_tables[:D]); prefill chunks through flash_attn_varlen_func over query rows D: with
    cu_seqlens_q counted from 0 and cu_seqlens_k the running sum of their sequence lengths.

Everything the batch already holds is passed as its own views: they are the engine's persistent step
buffers, the same storage for every batch of one CUDA-graph bucket. What flash-attn 2 needs besides
(the prefill chunks' offsets) is computed on the device, once per step, into two buffers of this
builder's, allocated once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from novainfer.backend_api import StepBatch


@dataclass(frozen=True)
class Rows:
    """One kernel call's sequences: B' of them, in the order of their query rows.

    cu_seqlens_q: [B' + 1] int32, device; sequence b's queries are rows cu_seqlens_q[b]:[b + 1] of the
                  query the call is given.
    seqused_k:    [B'] int32, device; keys of sequence b in the cache (cached prefix + this step's).
    cu_seqlens_k: [B' + 1] int32, device; running sum of seqused_k, from 0 (flash-attn 2's varlen call
                  takes key lengths so); None where the call takes seqused_k.
    page_table:   [B', W] int32, device; the engine's block tables, W = ceil(max_model_len / block_size);
                  entries past a sequence's ceil(seqused_k / block_size) are not read.
    max_seqlen_q, max_seqlen_k: host bounds on the query and key lengths. A CUDA-graph batch gets 1 and
                  max_model_len, which hold for every batch the captured graph replays.
    """

    cu_seqlens_q: torch.Tensor
    seqused_k: torch.Tensor
    cu_seqlens_k: torch.Tensor | None
    page_table: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int


@dataclass(frozen=True)
class StepArgs:
    """What one step's attention calls are given. Query rows :num_decodes are decodes, the rest chunks.

    num_decodes: decodes among the B sequences; every row of a CUDA-graph batch (its padding rows are
                 decodes of one token in the scratch block 0).
    every:       all B sequences, one flash-attn-4 call; None for flash-attn 2.
    decodes:     sequences :num_decodes, flash-attn 2's flash_attn_with_kvcache; None without decodes
                 or for flash-attn-4.
    prefills:    sequences num_decodes:, flash-attn 2's flash_attn_varlen_func over query rows
                 num_decodes:; None without prefill chunks or for flash-attn-4.
    """

    num_decodes: int
    every: Rows | None
    decodes: Rows | None
    prefills: Rows | None


class MetadataBuilder:
    """Builds StepArgs for one generation ("4" or "2"); owns flash-attn 2's two offset buffers."""

    def __init__(self, generation: str, max_num_seqs: int, device: torch.device) -> None:
        self.generation = generation
        # Prefill chunks' query offsets from 0 and key-length running sums; entry 0 of the latter stays 0.
        self.prefill_cu_seqlens_q = torch.zeros(max_num_seqs + 1, dtype=torch.int32, device=device)
        self.prefill_cu_seqlens_k = torch.zeros(max_num_seqs + 1, dtype=torch.int32, device=device)

    def build(self, batch: StepBatch) -> StepArgs:
        num_seqs, num_decodes = batch.num_seqs, batch.num_decodes
        # A graph batch's maxima are graph-safe (the longest a sequence may be), so no re-planning per replay.
        max_q, max_k = batch.max_query_len, batch.max_seq_len
        if self.generation == "4":
            every = Rows(batch.query_start_loc, batch.seq_lens, None, batch.block_tables, max_q, max_k)
            return StepArgs(num_decodes, every, None, None)
        decodes = prefills = None
        if num_decodes:
            # With every row a decode (a graph batch's always are) the batch's bound is theirs, graph-safe as given.
            decode_k = max_k if num_decodes == num_seqs else int(batch.seq_lens_cpu[:num_decodes].max())
            decodes = Rows(
                batch.query_start_loc[: num_decodes + 1], batch.seq_lens[:num_decodes], None,
                batch.block_tables[:num_decodes], 1, decode_k,
            )
        if num_decodes < num_seqs:
            count = num_seqs - num_decodes
            starts = batch.query_start_loc[num_decodes:]
            cu_q = self.prefill_cu_seqlens_q[: count + 1]
            torch.sub(starts, starts[0], out=cu_q)
            cu_k = self.prefill_cu_seqlens_k[: count + 1]
            torch.cumsum(batch.seq_lens[num_decodes:], 0, dtype=torch.int32, out=cu_k[1:])
            prefills = Rows(
                cu_q, batch.seq_lens[num_decodes:], cu_k, batch.block_tables[num_decodes:],
                # With chunks in the step, the longest query is a chunk's.
                batch.max_query_len, int(batch.seq_lens_cpu[num_decodes:].max()),
            )
        return StepArgs(num_decodes, None, decodes, prefills)


def warmup_shapes(max_num_seqs: int, max_num_tokens: int, max_query_len: int) -> list[tuple[int, int]]:
    """(sequences, longest query) pairs that cover the steps the engine's limits allow.

    flash-attn-4 picks its kernel variant (its compile key) from thresholds on the batch size and the
    longest query (one tile or more, a batch-lookup aid past 256 sequences, ...). For each batch size on
    a ladder of powers of two up to max_num_seqs (and it), the longest queries on the same ladder up to
    what the token budget leaves (and that): one chunk of the longest query plus a decode for every
    other sequence. That lands on both sides of any threshold on either axis, and inside any pair of
    thresholds that a step twice past both (within the limits) could cross. Decode batches (longest
    query 1) go up to max_num_seqs even past the token budget: the engine's CUDA-graph buckets do.
    """

    def ladder(limit: int) -> list[int]:
        return sorted({1 << i for i in range(limit.bit_length())} | {limit})

    shapes = []
    for seqs in ladder(max_num_seqs):
        room = min(max_query_len, max_num_tokens - seqs + 1)
        shapes += [(seqs, query) for query in ladder(room)] if room >= 1 else [(seqs, 1)]
    return shapes
