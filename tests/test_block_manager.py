from __future__ import annotations

import pytest

from novainfer.block_manager import SCRATCH_BLOCK, BlockManager
from novainfer.sequence import SamplingParams, Sequence


def seq(n: int) -> Sequence:
    return Sequence(list(range(n)), SamplingParams())


def test_allocate_covers_tokens_and_never_hands_out_the_scratch_block() -> None:
    bm = BlockManager(num_blocks=6, block_size=4)
    s = seq(9)
    bm.allocate(s, 9)
    assert len(s.block_table) == 3
    assert SCRATCH_BLOCK not in s.block_table
    assert bm.num_free_blocks == 2
    bm.allocate(s, 12)  # still inside the third block
    assert len(s.block_table) == 3
    assert bm.slot(s, 5) == s.block_table[1] * 4 + 1


def test_exhaustion_is_reported_not_partially_applied() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    a, b = seq(8), seq(8)
    bm.allocate(a, 8)
    assert not bm.can_allocate(b, 8)
    with pytest.raises(RuntimeError, match="out of KV blocks"):
        bm.allocate(b, 8)
    assert b.block_table == [] and bm.num_free_blocks == 1


def test_free_returns_every_block() -> None:
    bm = BlockManager(num_blocks=10, block_size=2)
    seqs = [seq(n) for n in (3, 5, 1)]
    for s in seqs:
        bm.allocate(s, len(s))
    owned = [b for s in seqs for b in s.block_table]
    assert len(owned) == len(set(owned)), "a block was given to two sequences"
    for s in seqs:
        bm.free(s)
    assert bm.num_free_blocks == bm.num_usable_blocks == 9


def test_too_small_cache_is_rejected() -> None:
    with pytest.raises(ValueError, match="at least 2 blocks"):
        BlockManager(num_blocks=1, block_size=16)


def test_particular_blocks_are_taken_out_of_order_and_the_rest_keep_theirs() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    s = seq(9)
    bm.allocate_blocks(s, [6, 2, 4])
    assert s.block_table == [6, 2, 4] and bm.num_free_blocks == 4
    t = seq(16)
    bm.allocate(t, 16)
    assert t.block_table == [1, 3, 5, 7]
    bm.free(s)
    for taken in ([SCRATCH_BLOCK], [1], [2, 2]):  # the scratch block, a block in use, one block twice
        with pytest.raises(ValueError, match="are not distinct free blocks"):
            bm.allocate_blocks(seq(4), taken)
    assert bm.num_free_blocks == 3
