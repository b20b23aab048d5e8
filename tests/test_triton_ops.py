"""The native backend's Triton kernels, run on CPU under the Triton interpreter, against plain PyTorch.

The reference gathers each sequence's keys and values through its block table and runs dense causal
softmax attention in float32; the kernels must match it closely. Block 0 (the scratch block the core
never hands out) is filled with NaN, so a kernel that lets a masked or out-of-range key leak into a
real row fails loudly.
"""

from __future__ import annotations

import pytest
import torch

# conftest.py selected the Triton interpreter before anything imported triton; the project installs
# triton, so a missing one fails this module (an import error), never skips it.
from novainfer_native import triton_ops

# The interpreter multiplies bfloat16 as raw 16-bit integers in tl.dot, so the attention kernels are
# checked in float16 for the half-precision path (bf16 runs on the GPU in bench/kernels_gpu.py).
HALF = torch.float16
TOLERANCE = {torch.float32: 1e-4, HALF: 5e-3}
POISON = 12345.0


def reference_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Dense causal attention per sequence, in float32: query [T, Hq, D] -> [T, Hq, D]."""
    block_size, num_kv_heads, head_dim = kv_cache.shape[2:]
    group = query.shape[1] // num_kv_heads
    out = torch.zeros(query.shape, dtype=torch.float32)
    for b in range(query_start_loc.numel() - 1):
        q0, q1 = int(query_start_loc[b]), int(query_start_loc[b + 1])
        seq_len = int(seq_lens[b])
        blocks = block_tables[b, : -(-seq_len // block_size)].long()
        # [seq_len, Hq, D]: the sequence's keys in order, each KV head repeated for its query group.
        k = kv_cache[0, blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len].float()
        v = kv_cache[1, blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len].float()
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", query[q0:q1].float(), k) * scale
        positions = seq_len - (q1 - q0) + torch.arange(q1 - q0)
        scores.masked_fill_(torch.arange(seq_len)[None, :] > positions[:, None], float("-inf"))
        out[q0:q1] = torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), v)
    return out


def make_cache(
    seq_lens: list[int],
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random cache whose sequences own shuffled (non-consecutive) blocks; block 0 is NaN.

    Returns kv_cache [2, num_blocks, block_size, Hkv, D] and block_tables [num_seqs, max_blocks] int32,
    rows padded with 0 past each sequence's blocks and one spare column of padding for all.
    """
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = 1 + sum(blocks_per_seq) + 3  # scratch block 0, the sequences' blocks, a few unused
    kv_cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    kv_cache[:, 0] = float("nan")
    ids = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    block_tables = torch.zeros(len(seq_lens), max(blocks_per_seq) + 1, dtype=torch.int32)
    for b, n in enumerate(blocks_per_seq):
        block_tables[b, :n] = torch.tensor(ids[:n], dtype=torch.int32)
        ids = ids[n:]
    return kv_cache, block_tables


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.float() - expected).abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [4, 16])
def test_write_kv_scatters_into_slots(dtype: torch.dtype, block_size: int) -> None:
    gen = torch.Generator().manual_seed(0)
    num_blocks, num_kv_heads, head_dim, num_tokens = 6, 2, 32, 9
    kv_cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    # Real tokens go to distinct slots outside block 0; the last token is a padded row writing slot 0.
    slots = torch.randperm((num_blocks - 1) * block_size, generator=gen)[: num_tokens - 1] + block_size
    slot_mapping = torch.cat([slots, torch.zeros(1, dtype=torch.int64)])
    # key/value as views of a fused projection: token stride larger than the heads it holds.
    fused = torch.randn(num_tokens, 3 * num_kv_heads * head_dim, generator=gen).to(dtype)
    key = fused[:, num_kv_heads * head_dim : 2 * num_kv_heads * head_dim].view(
        num_tokens, num_kv_heads, head_dim
    )
    value = fused[:, 2 * num_kv_heads * head_dim :].view(num_tokens, num_kv_heads, head_dim)
    assert not key.is_contiguous()

    expected = kv_cache.clone()
    expected[0].view(-1, num_kv_heads, head_dim)[slot_mapping] = key
    expected[1].view(-1, num_kv_heads, head_dim)[slot_mapping] = value
    triton_ops.write_kv(key, value, kv_cache, slot_mapping)
    assert torch.equal(kv_cache, expected)


DECODE_SEQ_LENS = [1, 5, 37, 64, 130, 200]


@pytest.mark.parametrize("dtype", [torch.float32, HALF])
@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("heads", [(4, 2), (6, 1)], ids=["gqa4x2", "gqa6x1"])
@pytest.mark.parametrize("num_splits", [1, 3])
# The padding row of seq_len 1 reads the NaN-filled scratch block: its output is garbage by contract.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_decode_matches_reference(
    dtype: torch.dtype, block_size: int, heads: tuple[int, int], num_splits: int
) -> None:
    gen = torch.Generator().manual_seed(1)
    num_q_heads, num_kv_heads = heads
    head_dim = 32
    kv_cache, block_tables = make_cache(DECODE_SEQ_LENS, block_size, num_kv_heads, head_dim, dtype, gen)
    # Two CUDA-graph padding rows after the real ones: block-table entries 0, seq_len 1 and 0.
    block_tables = torch.cat([block_tables, torch.zeros(2, block_tables.shape[1], dtype=torch.int32)])
    seq_lens = torch.tensor([*DECODE_SEQ_LENS, 1, 0], dtype=torch.int32)
    batch, real = seq_lens.numel(), len(DECODE_SEQ_LENS)
    query = torch.randn(batch, num_q_heads, head_dim, generator=gen).to(dtype)
    scale = head_dim**-0.5
    # out is a view of a larger poisoned buffer: rows past the batch must stay untouched.
    buffer = torch.full((batch + 2, num_q_heads, head_dim), POISON, dtype=dtype)
    out = buffer[:batch]
    workspace = triton_ops.decode_workspace(batch + 1, num_q_heads, head_dim, 4, "cpu")

    triton_ops.paged_decode_attention(
        query, kv_cache, block_tables, seq_lens, scale, out, workspace=workspace, num_splits=num_splits
    )
    expected = reference_attention(
        query[:real], kv_cache, block_tables, torch.arange(real + 1, dtype=torch.int32), seq_lens, scale
    )
    assert max_error(out[:real], expected) <= TOLERANCE[dtype]
    assert torch.all(buffer[batch:] == POISON)
    # A padding row with seq_len 0 sees no keys: its output is finite (0), not NaN.
    assert torch.all(out[batch - 1] == 0)


def test_decode_allocates_workspace_when_not_given() -> None:
    gen = torch.Generator().manual_seed(2)
    seq_lens_list = [300, 17]
    kv_cache, block_tables = make_cache(seq_lens_list, 16, 2, 32, torch.float32, gen)
    seq_lens = torch.tensor(seq_lens_list, dtype=torch.int32)
    query = torch.randn(2, 4, 32, generator=gen)
    out = torch.empty_like(query)
    triton_ops.paged_decode_attention(query, kv_cache, block_tables, seq_lens, 0.2, out, num_splits=5)
    expected = reference_attention(
        query, kv_cache, block_tables, torch.arange(3, dtype=torch.int32), seq_lens, 0.2
    )
    assert max_error(out, expected) <= TOLERANCE[torch.float32]


def run_prefill(
    context_and_query_lens: list[tuple[int, int]],
    dtype: torch.dtype,
    block_size: int,
    heads: tuple[int, int],
    head_dim: int,
    scale_error: float = 1.0,
) -> float:
    """Run the prefill kernel on sequences of (cached context, new queries); return the max error.

    scale_error multiplies the scale the kernel gets (not the reference's), to show a wrong result
    is caught.
    """
    gen = torch.Generator().manual_seed(3)
    num_q_heads, num_kv_heads = heads
    seq_lens_list = [c + q for c, q in context_and_query_lens]
    query_lens = [q for _, q in context_and_query_lens]
    kv_cache, block_tables = make_cache(seq_lens_list, block_size, num_kv_heads, head_dim, dtype, gen)
    seq_lens = torch.tensor(seq_lens_list, dtype=torch.int32)
    query_start_loc = torch.tensor([0, *query_lens], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    num_tokens = sum(query_lens)
    # The query as the model hands it over: a view of the fused QKV projection's output.
    fused = torch.randn(num_tokens, (num_q_heads + 2 * num_kv_heads) * head_dim, generator=gen).to(dtype)
    query = fused[:, : num_q_heads * head_dim].view(num_tokens, num_q_heads, head_dim)
    scale = head_dim**-0.5
    out = torch.full((num_tokens, num_q_heads, head_dim), POISON, dtype=dtype)
    triton_ops.paged_prefill_attention(
        query, kv_cache, block_tables, query_start_loc, seq_lens, max(query_lens), scale * scale_error, out
    )
    expected = reference_attention(query, kv_cache, block_tables, query_start_loc, seq_lens, scale)
    return max_error(out, expected)


# (cached context, new query tokens): a fresh prompt, chunks over prefixes of under and over one key
# tile (64), and query lengths that span several row tiles (21 tokens a tile for 6 heads a group,
# 64 for 2) with ragged ends.
PREFILL_SEQS = [(0, 7), (13, 20), (70, 45), (150, 70)]


@pytest.mark.parametrize("dtype", [torch.float32, HALF])
@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("heads", [(4, 2), (6, 1)], ids=["gqa4x2", "gqa6x1"])
def test_prefill_matches_reference(dtype: torch.dtype, block_size: int, heads: tuple[int, int]) -> None:
    assert run_prefill(PREFILL_SEQS, dtype, block_size, heads, head_dim=32) <= TOLERANCE[dtype]


@pytest.mark.parametrize("heads", [(4, 2), (6, 1)], ids=["gqa4x2", "gqa6x1"])
def test_mixed_batch_through_prefill(heads: tuple[int, int]) -> None:
    # Decodes first (one query each, over contexts of 0 to 199 keys), then prefill chunks, then a
    # padding sequence with no queries and no keys.
    decodes = [(0, 1), (4, 1), (99, 1), (199, 1)]
    seqs = [*decodes, *PREFILL_SEQS[1:3], (0, 0)]
    assert run_prefill(seqs, torch.float32, 16, heads, head_dim=32) <= 1e-4


@pytest.mark.parametrize("heads", [(4, 2), (6, 1)], ids=["gqa4x2", "gqa6x1"])
def test_prefill_every_context_offset(heads: tuple[int, int]) -> None:
    # Contexts 38..65 with 23 queries put each row tile's first position on every offset within a key
    # tile around a boundary (64), where the unmasked and causal loops hand over.
    seqs = [(context, 23) for context in range(38, 66)]
    assert run_prefill(seqs, torch.float32, 16, heads, head_dim=16) <= 1e-4


def test_prefill_head_dim_not_power_of_two() -> None:
    assert run_prefill([(5, 9), (40, 30)], torch.float32, 4, (4, 2), head_dim=24) <= 1e-4


def test_wrong_scale_is_caught() -> None:
    # The comparison is strict enough to see a 1% error in the softmax scale.
    assert run_prefill(PREFILL_SEQS[:2], torch.float32, 16, (4, 2), head_dim=32, scale_error=1.01) > 1e-3


def test_choose_num_splits() -> None:
    # Large batches fill the GPU without splitting.
    assert triton_ops.choose_num_splits(256, 2, 132, 4096) == 1
    # Small batches split long contexts, up to max_splits...
    assert triton_ops.choose_num_splits(8, 2, 132, 4096) == 16
    assert triton_ops.choose_num_splits(8, 2, 132, 4096, max_splits=8) == 8
    # ...but never into splits shorter than MIN_TOKENS_PER_SPLIT.
    assert triton_ops.choose_num_splits(1, 2, 132, 3 * triton_ops.MIN_TOKENS_PER_SPLIT) == 3
    assert triton_ops.choose_num_splits(1, 2, 132, 100) == 1
