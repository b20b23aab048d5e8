"""The native backend: Triton kernels on CUDA, and a plain-PyTorch path that is the reference.

Option `kernels`: "auto" (Triton on CUDA when triton is installed, else PyTorch), "triton" or
"torch". The PyTorch path gathers each sequence's K/V, then runs masked SDPA; decodes and prefill
chunks are padded separately, so a mixed batch does not pad every decode to the longest chunk.
Option `torch_precision` (PyTorch path only): "cache" (the default) runs SDPA in the cache's dtype,
PyTorch's own kernels; "float64" computes attention exactly, in float64 from the cache, whatever float32
matrix products are set to: the reference the correctness gate checks every backend against.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from novainfer.batch import StepBatch
from novainfer.hookspecs import hookimpl
from novainfer.plugins import AttentionContext, BackendError

KERNELS = ("auto", "triton", "torch")
TORCH_PRECISIONS = ("cache", "float64")
OPTIONS = ("kernels", "torch_precision")
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
class TorchMetadata:
    decodes: PaddedGroup | None
    prefills: PaddedGroup | None


@dataclass(frozen=True)
class TritonMetadata:
    batch: StepBatch
    num_splits: int  # context splits of the decode launch (decodes are rows :num_decodes)
    prefill_query_start: torch.Tensor | None  # query_start_loc[num_decodes:]; None without prefills
    prefill_max_query_len: int


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


def resolve_kernels(options: dict[str, Any], device: torch.device) -> str:
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise BackendError(f"native: unknown backend option(s) {', '.join(unknown)}; known: {', '.join(OPTIONS)}")
    kernels = options.get("kernels", "auto")
    if kernels not in KERNELS:
        raise BackendError(f"native: kernels must be one of {', '.join(KERNELS)}, got {kernels!r}")
    precision = options.get("torch_precision", "cache")
    if precision not in TORCH_PRECISIONS:
        raise BackendError(
            f"native: torch_precision must be one of {', '.join(TORCH_PRECISIONS)}, got {precision!r}"
        )
    has_triton = importlib.util.find_spec("triton") is not None
    if kernels == "auto":
        return "triton" if device.type == "cuda" and has_triton else "torch"
    if kernels == "triton" and not has_triton:
        raise BackendError("native: kernels='triton' but triton is not installed")
    return kernels


class NativeBackend:
    def __init__(self, context: AttentionContext) -> None:
        self.context = context
        self.kernels = resolve_kernels(context.options, context.device)
        self.exact = context.options.get("torch_precision", "cache") == "float64"
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
    def prepare_attention_metadata(self, batch: StepBatch) -> TorchMetadata | TritonMetadata:
        if self.kernels == "triton":
            return self._triton_metadata(batch)
        nd = batch.num_decodes
        max_prefill_q = 0
        if batch.num_prefills:
            max_prefill_q = int((batch.query_start_loc_cpu[nd + 1 :] - batch.query_start_loc_cpu[nd:-1]).max())
        return TorchMetadata(
            decodes=padded_group(batch, 0, nd, 1),
            prefills=padded_group(batch, nd, batch.num_seqs, max_prefill_q),
        )

    def _triton_metadata(self, batch: StepBatch) -> TritonMetadata:
        nd = batch.num_decodes
        # A captured graph must serve any context length, so it plans for the longest possible.
        longest = self.context.max_model_len if batch.cuda_graph else batch.max_seq_len
        splits = self.ops.choose_num_splits(nd, self.context.num_kv_heads, self.num_sms, longest, self.max_splits)
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
    def attention(self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: Any, scale: float) -> torch.Tensor:
        out = torch.empty_like(query)
        if isinstance(metadata, TritonMetadata):
            b, nd = metadata.batch, metadata.batch.num_decodes
            if nd:
                self.ops.paged_decode_attention(
                    query[:nd], kv_cache, b.block_tables, b.seq_lens, scale, out[:nd],
                    workspace=self.workspace, num_splits=metadata.num_splits,
                )
            if metadata.prefill_query_start is not None:
                self.ops.paged_prefill_attention(
                    query, kv_cache, b.block_tables[nd:], metadata.prefill_query_start, b.seq_lens[nd:],
                    metadata.prefill_max_query_len, scale, out,
                )
            return out
        for group in (metadata.decodes, metadata.prefills):
            if group is not None:
                (_attend_exact if self.exact else _attend)(query, kv_cache, group, scale, out)
        return out


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
