"""Attention over the paged cache in plain PyTorch: gather each sequence's K/V, then masked SDPA.

Decodes and prefill chunks are padded separately (one query row per decode; up to the longest
chunk for prefills), so a mixed batch does not pad every decode to the longest chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from novainfer.batch import StepBatch
from novainfer.hookspecs import hookimpl
from novainfer.plugins import AttentionContext


@dataclass(frozen=True)
class PaddedGroup:
    """Index tensors for one group of sequences (decodes or prefills), padded to rectangles.

    slots:      [b, max_seq_len] int64 flat cache slot of each key position (padding reads slot 0).
    mask:       [b, 1, max_q, max_seq_len] bool; True where a query may attend to a key.
    token_rows: [b, max_q] int64 row of each query in the step's token list (padding repeats row 0).
    valid:      [b, max_q] bool; False on padded query rows.
    """

    slots: torch.Tensor
    mask: torch.Tensor
    token_rows: torch.Tensor
    valid: torch.Tensor


@dataclass(frozen=True)
class NativeMetadata:
    decodes: PaddedGroup | None
    prefills: PaddedGroup | None


def padded_group(batch: StepBatch, first: int, last: int, max_q: int) -> PaddedGroup | None:
    """The padded index tensors for sequences first..last-1 of `batch` (all on its device)."""
    if first == last:
        return None
    device = batch.seq_lens.device
    seq_lens = batch.seq_lens[first:last].long()
    starts = batch.query_start_loc[first:last].long()
    q_lens = batch.query_start_loc[first + 1 : last + 1].long() - starts
    max_s = int(batch.seq_lens_cpu[first:last].max())
    keys = torch.arange(max_s, device=device)
    tables = batch.block_tables[first:last].long()
    slots = tables.gather(1, (keys // batch.block_size).expand(last - first, -1)) * batch.block_size
    slots = slots + keys % batch.block_size
    q_idx = torch.arange(max_q, device=device)
    valid = q_idx.unsqueeze(0) < q_lens.unsqueeze(1)
    token_rows = torch.where(valid, starts.unsqueeze(1) + q_idx, 0)
    # Query i of a chunk sits at absolute position (seq_len - q_len + i) and sees keys up to it.
    q_pos = (seq_lens - q_lens).unsqueeze(1) + q_idx
    mask = keys.view(1, 1, -1) <= q_pos.unsqueeze(2)
    # Padded query rows see key 0 only, so the softmax stays finite; their output is dropped.
    mask = (mask & valid.unsqueeze(2)) | (~valid.unsqueeze(2) & (keys == 0).view(1, 1, -1))
    return PaddedGroup(slots, mask.unsqueeze(1), token_rows, valid)


class NativeBackend:
    def __init__(self, context: AttentionContext) -> None:
        self.context = context

    @hookimpl
    def prepare_attention_metadata(self, batch: StepBatch) -> NativeMetadata:
        nd = batch.num_decodes
        max_prefill_q = int((batch.query_start_loc_cpu[nd + 1 :] - batch.query_start_loc_cpu[nd:-1]).max()) if (
            batch.num_prefills
        ) else 0
        return NativeMetadata(
            decodes=padded_group(batch, 0, nd, 1),
            prefills=padded_group(batch, nd, batch.num_seqs, max_prefill_q),
        )

    @hookimpl
    def attention(
        self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: NativeMetadata, scale: float
    ) -> torch.Tensor:
        out = torch.empty_like(query)
        for group in (metadata.decodes, metadata.prefills):
            if group is not None:
                _attend(query, kv_cache, group, scale, out)
        return out


def _attend(query: torch.Tensor, kv_cache: torch.Tensor, group: PaddedGroup, scale: float, out: torch.Tensor) -> None:
    num_kv_heads, head_dim = kv_cache.shape[-2], kv_cache.shape[-1]
    k = kv_cache[0].view(-1, num_kv_heads, head_dim)[group.slots].transpose(1, 2)  # [b, Hkv, S, D]
    v = kv_cache[1].view(-1, num_kv_heads, head_dim)[group.slots].transpose(1, 2)
    q = query[group.token_rows].transpose(1, 2)  # [b, Hq, max_q, D]
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=group.mask, scale=scale, enable_gqa=True)
    rows = group.token_rows[group.valid]
    out[rows] = o.transpose(1, 2)[group.valid]
