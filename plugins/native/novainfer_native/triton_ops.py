"""Triton kernels of the native attention backend, with their Python launchers.

Layouts (fixed by the core):
    kv_cache      [2, num_blocks, block_size, num_kv_heads, head_dim], contiguous; K is [0], V is [1].
    query         [num_tokens, num_q_heads, head_dim]; key/value [num_tokens, num_kv_heads, head_dim].
    slot_mapping  [num_tokens] int64, slot = block_id * block_size + offset.
    block_tables  [num_seqs, max_blocks_per_seq] int32, rows padded with 0 (block 0 is scratch).
    seq_lens      [num_seqs] int32, tokens in the cache after this step's tokens are written.
    query_start_loc [num_seqs + 1] int32, cumulative query lengths.

Every launcher writes into a caller-given tensor, reads no device value on the host and allocates
nothing (given a workspace), so all of them can be captured in a CUDA graph.

Both attention kernels serve all query heads of one KV head in one program ("GQA packing"): the rows
of a tile are (token, head-in-group) pairs, so each K/V tile is read once for the whole group. Keys
are gathered token by token through the block table, so the tile width does not depend on the block
size. Softmax runs in base 2 (`exp2`) with the scale folded into log2(e); accumulation is fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634

# Fewest keys a decode split should cover (one decode tile): shorter splits only add partial results
# to write and reduce.
MIN_TOKENS_PER_SPLIT = 128
# Launch configurations, read at every launch; tuned on an H100 for 12/2 heads, head_dim 128, bf16,
# block size 16 (bench/kernels_gpu.py). Both keep shared memory near 128 KiB, so they also fit GPUs
# with less than Hopper's 227 KiB. tl.dot needs at least 16 rows, columns and depth.
DECODE_BLOCK_N = 128  # keys per tile
DECODE_NUM_WARPS = 4
DECODE_NUM_STAGES = 2
PREFILL_BLOCK_M = 128  # rows per tile: (query token, head in group) pairs
PREFILL_BLOCK_N = 64  # keys per tile
PREFILL_NUM_WARPS = 4
PREFILL_NUM_STAGES = 3


@dataclass(frozen=True)
class DecodeWorkspace:
    """Partial results of split decode attention, allocated once and reused by every step.

    out: [max_num_seqs, num_q_heads, max_splits, head_dim] fp32, each split's normalised output.
    lse: [max_num_seqs, num_q_heads, max_splits] fp32, each split's log2-sum-exp2 of scores
         (-inf for a split that covers no keys).
    """

    out: torch.Tensor
    lse: torch.Tensor

    @property
    def max_splits(self) -> int:
        return self.lse.shape[2]


def compiled_kernel_count() -> int:
    """Kernel variants compiled (or loaded from Triton's disk cache) so far in this process.

    Triton compiles a kernel again for each new specialisation of its arguments (dtype, an int
    equal to 1 or divisible by 16, ...); a count that grows inside a timed window means a compile
    was timed.
    """
    kernels = (_write_kv_kernel, _decode_kernel, _decode_reduce_kernel, _prefill_kernel)
    # device_caches maps a device to a tuple whose first item is that device's compiled-kernel dict;
    # the interpreter (TRITON_INTERPRET=1) compiles nothing and has none.
    return sum(len(caches[0]) for kernel in kernels for caches in getattr(kernel, "device_caches", {}).values())


def decode_workspace(
    max_num_seqs: int, num_q_heads: int, head_dim: int, max_splits: int, device: torch.device | str
) -> DecodeWorkspace:
    """Allocate the workspace `paged_decode_attention` needs for any num_splits <= max_splits."""
    return DecodeWorkspace(
        out=torch.empty(max_num_seqs, num_q_heads, max_splits, head_dim, dtype=torch.float32, device=device),
        lse=torch.empty(max_num_seqs, num_q_heads, max_splits, dtype=torch.float32, device=device),
    )


def choose_num_splits(
    batch: int, num_kv_heads: int, num_sms: int, max_seq_len: int, max_splits: int = 16
) -> int:
    """How many context splits decode should use: a pure function of host ints (graph-capture safe).

    Without splits the grid has batch * num_kv_heads programs; split until there are about two
    programs per SM, but never so far that a split of the longest sequence gets fewer than
    MIN_TOKENS_PER_SPLIT keys. Returns 1 (no split, no reduce kernel) for large batches.
    """
    programs = max(batch * num_kv_heads, 1)
    wanted = triton.cdiv(2 * num_sms, programs)
    worthwhile = max(max_seq_len // MIN_TOKENS_PER_SPLIT, 1)
    return max(1, min(wanted, worthwhile, max_splits))


# --------------------------------------------------------------------------------------------------
# KV write
# --------------------------------------------------------------------------------------------------


@triton.jit
def _write_kv_kernel(
    key_ptr,
    value_ptr,
    cache_ptr,
    slot_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cache_half,
    stride_cache_slot,
    stride_cache_head,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    mask = (heads[:, None] < NUM_KV_HEADS) & (dims[None, :] < HEAD_DIM)
    # One flat slot addresses a whole [num_kv_heads, head_dim] row of the cache.
    dst = cache_ptr + slot * stride_cache_slot + heads[:, None] * stride_cache_head + dims[None, :]
    k = tl.load(key_ptr + token * stride_kt + heads[:, None] * stride_kh + dims[None, :], mask=mask)
    v = tl.load(value_ptr + token * stride_vt + heads[:, None] * stride_vh + dims[None, :], mask=mask)
    tl.store(dst, k, mask=mask)
    tl.store(dst + stride_cache_half, v, mask=mask)


def write_kv(
    key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Scatter this step's new keys and values into the paged cache.

    key, value: [num_tokens, num_kv_heads, head_dim], any token/head strides, unit stride in head_dim
    (views of a fused QKV projection are fine). kv_cache: [2, num_blocks, block_size, num_kv_heads,
    head_dim], contiguous. slot_mapping: [num_tokens] int64. Values are cast to the cache dtype.
    """
    num_tokens, num_kv_heads, head_dim = key.shape
    _check_cache(kv_cache, num_kv_heads, head_dim)
    assert value.shape == key.shape and slot_mapping.shape[0] >= num_tokens
    assert key.stride(2) == 1 and value.stride(2) == 1, "head_dim must be contiguous"
    if num_tokens == 0:
        return
    _write_kv_kernel[(num_tokens,)](
        key,
        value,
        kv_cache,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        kv_cache.stride(0),
        kv_cache.stride(2),
        kv_cache.stride(3),
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_H=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=triton.next_power_of_2(head_dim),
    )


# --------------------------------------------------------------------------------------------------
# Decode attention
# --------------------------------------------------------------------------------------------------


# Ints and pointers that vary from step to step are not specialised on (== 1, divisible by 16,
# 16-byte aligned), or a step with a new value would compile a new variant mid-run: num_splits
# follows the batch, and the prefill's per-sequence arrays start at row num_decodes.
@triton.jit(do_not_specialize=["num_splits"])
def _decode_kernel(
    q_ptr,
    cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    out_ptr,
    part_out_ptr,
    part_lse_ptr,
    qk_scale,
    num_splits,
    stride_qb,
    stride_qh,
    stride_ob,
    stride_oh,
    stride_cache_half,
    stride_cache_slot,
    stride_cache_head,
    stride_bt,
    stride_pob,
    stride_poh,
    stride_pos,
    stride_plb,
    stride_plh,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    seq_len = tl.load(seq_lens_ptr + seq)
    g = tl.arange(0, BLOCK_G)
    heads = kv_head * GROUP + g
    dims = tl.arange(0, BLOCK_D)
    g_mask = g < GROUP
    d_mask = dims < HEAD_DIM
    # Rows past the group are zero queries: they keep tl.dot's 16-row minimum and are never stored.
    q = tl.load(
        q_ptr + seq * stride_qb + heads[:, None] * stride_qh + dims[None, :],
        mask=g_mask[:, None] & d_mask[None, :],
        other=0.0,
    )

    if SPLIT:
        # Each sequence splits its own length, so the splits of a short sequence stay balanced; the
        # chunk is a whole number of tiles so only the last tile of a split is ragged.
        chunk = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
        start = split * chunk
        end = tl.minimum(start + chunk, seq_len)
    else:
        start = 0
        end = seq_len

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    k_base = cache_ptr + kv_head * stride_cache_head
    v_base = k_base + stride_cache_half
    for start_n in range(start, end, BLOCK_N):
        n = start_n + tl.arange(0, BLOCK_N)
        n_mask = n < end
        # Masked keys read block 0 (the scratch block), so nothing outside the cache is touched.
        block = tl.load(block_tables_ptr + seq * stride_bt + n // BLOCK_SIZE, mask=n_mask, other=0)
        slot = block.to(tl.int64) * BLOCK_SIZE + n % BLOCK_SIZE
        k = tl.load(
            k_base + slot[None, :] * stride_cache_slot + dims[:, None],
            mask=n_mask[None, :] & d_mask[:, None],
            other=0.0,
        )
        s = tl.dot(q, k, input_precision="ieee") * qk_scale
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(
            v_base + slot[:, None] * stride_cache_slot + dims[None, :],
            mask=n_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new

    # An empty range (seq_len 0 padding, or a split past the end) leaves l_i == 0: divide by 1
    # instead so the result is 0, not NaN.
    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    acc = acc / l_safe[:, None]
    store_mask = g_mask[:, None] & d_mask[None, :]
    if SPLIT:
        po = (
            part_out_ptr + seq * stride_pob + heads[:, None] * stride_poh + split * stride_pos + dims[None, :]
        )
        tl.store(po, acc, mask=store_mask)
        lse = tl.where(seen, m_i + tl.log2(l_safe), float("-inf"))
        tl.store(part_lse_ptr + seq * stride_plb + heads * stride_plh + split, lse, mask=g_mask)
    else:
        o = out_ptr + seq * stride_ob + heads[:, None] * stride_oh + dims[None, :]
        tl.store(o, acc.to(out_ptr.dtype.element_ty), mask=store_mask)


@triton.jit(do_not_specialize=["num_splits"])
def _decode_reduce_kernel(
    part_out_ptr,
    part_lse_ptr,
    out_ptr,
    num_splits,
    stride_pob,
    stride_poh,
    stride_pos,
    stride_plb,
    stride_plh,
    stride_ob,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, BLOCK_S)
    dims = tl.arange(0, BLOCK_D)
    s_mask = splits < num_splits
    d_mask = dims < HEAD_DIM
    lse = tl.load(
        part_lse_ptr + seq * stride_plb + head * stride_plh + splits, mask=s_mask, other=float("-inf")
    )
    # All splits empty (padding row): use 0 as the reference so the weights are 0, not NaN.
    lse_max = tl.max(lse, axis=0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    w = tl.exp2(lse - lse_max)
    part = tl.load(
        part_out_ptr + seq * stride_pob + head * stride_poh + splits[:, None] * stride_pos + dims[None, :],
        mask=s_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    total = tl.sum(w, axis=0)
    o = tl.sum(part * w[:, None], axis=0) / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + seq * stride_ob + head * stride_oh + dims, o.to(out_ptr.dtype.element_ty), mask=d_mask)


def paged_decode_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    *,
    workspace: DecodeWorkspace | None = None,
    num_splits: int = 1,
) -> None:
    """Attention of one new token per sequence over its whole cached context (keys 0..seq_len-1).

    query: [B, num_q_heads, head_dim] (unit stride in head_dim); out: [B, num_q_heads, head_dim].
    block_tables: [>= B, max_blocks] int32; seq_lens: [>= B] int32. The new token's K/V must already
    be in the cache. With num_splits > 1 each sequence's context is split into that many chunks
    (flash-decoding) whose partial results go to `workspace` and are merged by a second kernel;
    the workspace is allocated here when not given (pass one when capturing a CUDA graph).
    """
    batch, num_q_heads, head_dim = query.shape
    num_kv_heads = kv_cache.shape[3]
    _check_cache(kv_cache, num_kv_heads, head_dim)
    _check_attention(query, kv_cache)
    assert out.shape == query.shape and query.stride(2) == 1 and out.stride(2) == 1
    assert block_tables.shape[0] >= batch and seq_lens.shape[0] >= batch and block_tables.stride(1) == 1
    assert num_splits >= 1
    if batch == 0:
        return
    group = num_q_heads // num_kv_heads
    split = num_splits > 1
    if split:
        if workspace is None:
            workspace = decode_workspace(batch, num_q_heads, head_dim, num_splits, query.device)
        assert workspace.out.shape[0] >= batch and workspace.out.shape[1] == num_q_heads
        assert workspace.out.shape[3] == head_dim and num_splits <= workspace.max_splits
        part_out, part_lse = workspace.out, workspace.lse
        part_strides = (*part_out.stride()[:3], *part_lse.stride()[:2])
    else:
        # Unused by the non-split kernel; any tensor satisfies the signature.
        part_out, part_lse = out, out
        part_strides = (0,) * 5
    _decode_kernel[(batch, num_kv_heads, num_splits)](
        query,
        kv_cache,
        block_tables,
        seq_lens,
        out,
        part_out,
        part_lse,
        scale * LOG2E,
        num_splits,
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        kv_cache.stride(0),
        kv_cache.stride(2),
        kv_cache.stride(3),
        block_tables.stride(0),
        *part_strides,
        GROUP=group,
        HEAD_DIM=head_dim,
        BLOCK_G=max(16, triton.next_power_of_2(group)),
        BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_SIZE=kv_cache.shape[2],
        BLOCK_N=DECODE_BLOCK_N,
        SPLIT=split,
        num_warps=DECODE_NUM_WARPS,
        num_stages=DECODE_NUM_STAGES,
    )
    if split:
        _decode_reduce_kernel[(batch, num_q_heads)](
            part_out,
            part_lse,
            out,
            num_splits,
            part_out.stride(0),
            part_out.stride(1),
            part_out.stride(2),
            part_lse.stride(0),
            part_lse.stride(1),
            out.stride(0),
            out.stride(1),
            HEAD_DIM=head_dim,
            # Sized by the workspace, not num_splits, so changing num_splits never recompiles.
            BLOCK_S=triton.next_power_of_2(workspace.max_splits),
            BLOCK_D=triton.next_power_of_2(head_dim),
            num_warps=1,
        )


# --------------------------------------------------------------------------------------------------
# Prefill (variable-length causal) attention
# --------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["block_tables_ptr", "query_start_loc_ptr", "seq_lens_ptr"])
def _prefill_kernel(
    q_ptr,
    cache_ptr,
    block_tables_ptr,
    query_start_loc_ptr,
    seq_lens_ptr,
    out_ptr,
    qk_scale,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_cache_half,
    stride_cache_slot,
    stride_cache_head,
    stride_bt,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Rows of the tile are (token, head-in-group) pairs: TOKENS query tokens times the GROUP query
    # heads that share this KV head, so each K/V tile is read once for the group.
    TOKENS: tl.constexpr = BLOCK_M // GROUP
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    # Later tiles see more keys; blocks launch in grid order with the last axis slowest, so counting
    # tiles down from the last starts the longest programs first and leaves short ones for the tail.
    tile = tl.num_programs(2) - 1 - tl.program_id(2)

    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    tok0 = tile * TOKENS
    if tok0 >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context = seq_len - q_len

    rows = tl.arange(0, BLOCK_M)
    tok = tok0 + rows // GROUP
    heads = kv_head * GROUP + rows % GROUP
    row_mask = (rows < TOKENS * GROUP) & (tok < q_len)
    pos = context + tok
    dims = tl.arange(0, BLOCK_D)
    d_mask = dims < HEAD_DIM
    q_mask = row_mask[:, None] & d_mask[None, :]
    q = tl.load(
        q_ptr + (q_start + tok)[:, None] * stride_qt + heads[:, None] * stride_qh + dims[None, :], mask=q_mask
    )

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_base = cache_ptr + kv_head * stride_cache_head
    v_base = k_base + stride_cache_half
    bt_row = block_tables_ptr + seq * stride_bt

    # Keys 0..context+tok0 are visible to every row of the tile: whole tiles of them need no mask.
    full_end = (context + tok0 + 1) // BLOCK_N * BLOCK_N
    for start_n in range(0, full_end, BLOCK_N):
        n = start_n + tl.arange(0, BLOCK_N)
        slot = tl.load(bt_row + n // BLOCK_SIZE).to(tl.int64) * BLOCK_SIZE + n % BLOCK_SIZE
        k = tl.load(k_base + slot[None, :] * stride_cache_slot + dims[:, None], mask=d_mask[:, None])
        s = tl.dot(q, k, input_precision="ieee") * qk_scale
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + slot[:, None] * stride_cache_slot + dims[None, :], mask=d_mask[None, :])
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new

    # The diagonal band: keys up to the tile's last position, masked causally per row. Every valid
    # row sees at least one key by the first tile of this loop, so its running max is finite.
    tile_end = context + tl.minimum(tok0 + TOKENS, q_len)
    for start_n in range(full_end, tile_end, BLOCK_N):
        n = start_n + tl.arange(0, BLOCK_N)
        n_mask = n < tile_end
        block = tl.load(bt_row + n // BLOCK_SIZE, mask=n_mask, other=0)
        slot = block.to(tl.int64) * BLOCK_SIZE + n % BLOCK_SIZE
        k = tl.load(
            k_base + slot[None, :] * stride_cache_slot + dims[:, None],
            mask=n_mask[None, :] & d_mask[:, None],
            other=0.0,
        )
        s = tl.dot(q, k, input_precision="ieee") * qk_scale
        s = tl.where((n[None, :] <= pos[:, None]) & n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(
            v_base + slot[:, None] * stride_cache_slot + dims[None, :],
            mask=n_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new

    acc = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    o = out_ptr + (q_start + tok)[:, None] * stride_ot + heads[:, None] * stride_oh + dims[None, :]
    tl.store(o, acc.to(out_ptr.dtype.element_ty), mask=q_mask)


def paged_prefill_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    max_query_len: int,
    scale: float,
    out: torch.Tensor,
) -> None:
    """Variable-length causal attention of a step's query tokens over the paged cache.

    query, out: [num_tokens, num_q_heads, head_dim] (unit stride in head_dim). Sequence b owns query
    rows query_start_loc[b]:query_start_loc[b+1] ([num_seqs + 1] int32); its first query sits at
    position seq_lens[b] - q_len_b and attends to keys 0..its own position. All of the step's K/V
    must already be in the cache. Rows of any length, 1 included, mix freely, so a whole batch of
    decodes and prefill chunks can go through here. max_query_len (a host int) bounds the grid.
    """
    num_tokens, num_q_heads, head_dim = query.shape
    num_kv_heads = kv_cache.shape[3]
    num_seqs = query_start_loc.shape[0] - 1
    _check_cache(kv_cache, num_kv_heads, head_dim)
    _check_attention(query, kv_cache)
    assert out.shape == query.shape and query.stride(2) == 1 and out.stride(2) == 1
    assert block_tables.shape[0] >= num_seqs and seq_lens.shape[0] >= num_seqs and block_tables.stride(1) == 1
    if num_tokens == 0 or num_seqs == 0 or max_query_len == 0:
        return
    group = num_q_heads // num_kv_heads
    assert group <= PREFILL_BLOCK_M, f"GQA group of {group} exceeds the prefill tile"
    tokens_per_tile = PREFILL_BLOCK_M // group
    _prefill_kernel[(num_seqs, num_kv_heads, triton.cdiv(max_query_len, tokens_per_tile))](
        query,
        kv_cache,
        block_tables,
        query_start_loc,
        seq_lens,
        out,
        scale * LOG2E,
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        kv_cache.stride(0),
        kv_cache.stride(2),
        kv_cache.stride(3),
        block_tables.stride(0),
        GROUP=group,
        HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_SIZE=kv_cache.shape[2],
        BLOCK_M=PREFILL_BLOCK_M,
        BLOCK_N=PREFILL_BLOCK_N,
        num_warps=PREFILL_NUM_WARPS,
        num_stages=PREFILL_NUM_STAGES,
    )


def _check_cache(kv_cache: torch.Tensor, num_kv_heads: int, head_dim: int) -> None:
    assert kv_cache.dim() == 5 and kv_cache.shape[0] == 2 and kv_cache.is_contiguous()
    assert kv_cache.shape[3] == num_kv_heads and kv_cache.shape[4] == head_dim


def _check_attention(query: torch.Tensor, kv_cache: torch.Tensor) -> None:
    assert query.shape[1] % kv_cache.shape[3] == 0, "num_q_heads must be a multiple of num_kv_heads"
    # tl.dot multiplies operands of one dtype, with a contraction depth of at least 16.
    assert query.dtype == kv_cache.dtype, f"query is {query.dtype} but the cache is {kv_cache.dtype}"
    assert query.shape[2] >= 16, "head_dim must be at least 16"


__all__ = [
    "DecodeWorkspace",
    "choose_num_splits",
    "decode_workspace",
    "paged_decode_attention",
    "paged_prefill_attention",
    "write_kv",
]
