"""The core's own attention: plain PyTorch over the BLOCK cache, the reference every backend is checked against.

It lives in the core, not in a plugin, so a check can always run it and no plugin can stand in for it: the
backend "reference" is found without loading any entry point (novainfer.plugins.CORE_PLUGINS), and a plugin
that registers the same name is refused. Its attention in the cache's dtype is also what every engine falls
back to where a backend's hook returns None (novainfer.plugins.CoreDefaults). The correctness gate builds its
reference and floor engines on it, and the check of a timed run's tokens (novainfer.ab.trial.output_check) runs it
in a process that loads no plugin at all.

Option `precision`:
    "float64" (the default): attention computed exactly, in float64 from the cache, whatever float32 matrix
        products are set to; the only rounding left is the output's, to the query's dtype.
    "cache": PyTorch's own SDPA kernels in the cache's dtype: an honest implementation whose distance from the
        float64 one is what that dtype's rounding alone costs (the checks' "floor").

Each sequence's keys and values are gathered from the cache, then attended with a mask; decodes and prefill
chunks are padded separately, so a mixed batch does not pad every decode to the longest chunk. Not for speed:
the native plugin's Triton kernels are. It sizes its tensors from host values each step, so it never runs in a
CUDA graph.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from novainfer.backend_api import CONTRACT_VERSION, AttentionContext, BackendSpec, Capabilities, StepBatch, hookimpl

NAME = "reference"
# The exact path takes query rows in chunks of this many, to bound its float64 score matrix.
_EXACT_QUERY_CHUNK = 512


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
class ReferenceMetadata:
    """One step's groups: decodes (rows :num_decodes) and prefill chunks; None where a group is empty."""

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


def reference_metadata(batch: StepBatch) -> ReferenceMetadata:
    """The step's decode and prefill groups."""
    nd = batch.num_decodes
    max_prefill_q = 0
    if batch.num_prefills:
        max_prefill_q = int((batch.query_start_loc_cpu[nd + 1 :] - batch.query_start_loc_cpu[nd:-1]).max())
    return ReferenceMetadata(
        decodes=padded_group(batch, 0, nd, 1), prefills=padded_group(batch, nd, batch.num_seqs, max_prefill_q)
    )


def reference_attention(
    query: torch.Tensor, kv_cache: torch.Tensor, metadata: ReferenceMetadata, scale: float, exact: bool,
    out: torch.Tensor,
) -> None:
    """Attention of a step's queries [T, Hq, D] over the cache, written into `out` (the same shape and dtype):
    exact (float64) or in the cache's dtype."""
    attend = _attend_exact if exact else _attend
    for group in (metadata.decodes, metadata.prefills):
        if group is not None:
            attend(query, kv_cache, group, scale, out)


@dataclass(frozen=True)
class ReferenceOptions:
    """The option of the module's docstring; the registry parses the arm's table into it."""

    precision: Literal["float64", "cache"] = "float64"


class ReferenceBackend:
    """The hooks of the "reference" backend (KV writes fall back to the core's indexed scatter)."""

    def __init__(self, context: AttentionContext) -> None:
        self.exact = context.options.precision == "float64"

    @hookimpl
    def cuda_graph_unsupported(self) -> str:
        return f"{NAME} sizes its tensors from host values each step"

    @hookimpl
    def prepare_attention_metadata(self, batch: StepBatch) -> ReferenceMetadata:
        return reference_metadata(batch)

    @hookimpl
    def attention(
        self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: ReferenceMetadata, scale: float,
        output: torch.Tensor,
    ) -> bool:
        reference_attention(query, kv_cache, metadata, scale, self.exact, output)
        return True


@hookimpl
def register_backends(register: Callable[[BackendSpec], None]) -> None:
    register(
        BackendSpec(
            name=NAME,
            create=ReferenceBackend,
            capabilities=Capabilities(devices=("cpu", "cuda"), dtypes=("float32", "bfloat16", "float16")),
            options=ReferenceOptions,
            description="the core's plain-PyTorch attention: float64 (exact) or the cache's dtype (the floor)",
            contract_version=CONTRACT_VERSION,  # the core's own: written with the contract, never behind it
        )
    )


def _grouped(
    query: torch.Tensor, kv_cache: torch.Tensor, group: PaddedGroup, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, k, v, mask) of one group with each KV head's query heads folded into its rows: q [b, Hkv, G * max_q,
    D], k and v [b, Hkv, S, D], mask [b, 1, G * max_q, S]. Every query head then reads its KV head's keys in
    place, where SDPA's enable_gqa would fall back to copying them once per query head."""
    num_kv_heads, head_dim = kv_cache.shape[-2], kv_cache.shape[-1]
    b, max_q = group.token_rows.shape
    k = kv_cache[0].view(-1, num_kv_heads, head_dim)[group.slots].transpose(1, 2).to(dtype)
    v = kv_cache[1].view(-1, num_kv_heads, head_dim)[group.slots].transpose(1, 2).to(dtype)
    q = query[group.token_rows].to(dtype).view(b, max_q, num_kv_heads, -1, head_dim)
    groups = q.shape[3]
    q = q.permute(0, 2, 3, 1, 4).reshape(b, num_kv_heads, groups * max_q, head_dim)
    mask = group.mask.unsqueeze(1).expand(b, groups, 1, max_q, -1).reshape(b, 1, groups * max_q, -1)
    return q, k, v, mask


def _ungrouped(o: torch.Tensor, group: PaddedGroup) -> torch.Tensor:
    """The valid rows of a grouped output [b, Hkv, G * max_q, D], as [rows, Hq, D]."""
    b, max_q = group.token_rows.shape
    num_kv_heads, head_dim = o.shape[1], o.shape[3]
    o = o.view(b, num_kv_heads, -1, max_q, head_dim).permute(0, 3, 1, 2, 4).reshape(b, max_q, -1, head_dim)
    return o[group.valid]


def _attend(query: torch.Tensor, kv_cache: torch.Tensor, group: PaddedGroup, scale: float, out: torch.Tensor) -> None:
    q, k, v, mask = _grouped(query, kv_cache, group, query.dtype)
    # Not cuDNN's SDPA: it builds a graph for every new shape (~0.2 s each), and every step here has its own.
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]):
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    out[group.token_rows[group.valid]] = _ungrouped(o, group)


def _attend_exact(
    query: torch.Tensor, kv_cache: torch.Tensor, group: PaddedGroup, scale: float, out: torch.Tensor
) -> None:
    """Attention of one group in float64, written out (no fused kernel): the only rounding left is the
    output's, to its dtype, whatever float32 matrix products are set to."""
    q, k, v, mask = _grouped(query, kv_cache, group, torch.float64)
    o = torch.empty_like(q)
    for start in range(0, q.shape[2], _EXACT_QUERY_CHUNK):
        rows = slice(start, start + _EXACT_QUERY_CHUNK)
        scores = (q[:, :, rows] @ k.transpose(2, 3)) * scale
        o[:, :, rows] = scores.masked_fill(~mask[:, :, rows], float("-inf")).softmax(dim=-1) @ v
    out[group.token_rows[group.valid]] = _ungrouped(o, group).to(out.dtype)
