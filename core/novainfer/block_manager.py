"""Ownership of KV-cache blocks: a free list and each sequence's block table. No tensors here."""

from __future__ import annotations

from collections import deque

from novainfer.sequence import SamplingParams, Sequence

# Block 0 is never handed out: padded batch rows (CUDA-graph padding) write their K/V there, and
# padded block-table entries point there, so no sequence's data can be overwritten by padding.
SCRATCH_BLOCK = 0


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks that hold `num_tokens` tokens: the one rounding rule for cache sizes, requests and capacities."""
    return -(-num_tokens // block_size)


def scratch_sequence(num_tokens: int, block_size: int) -> Sequence:
    """A dummy prompt of `num_tokens` zeros whose every block is the scratch block: what warm-up and
    CUDA-graph capture run the model on without touching any real sequence's cache."""
    seq = Sequence([0] * num_tokens, SamplingParams())
    seq.block_table = [SCRATCH_BLOCK] * blocks_for(num_tokens, block_size)
    return seq


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 2:
            raise ValueError(f"the KV cache needs at least 2 blocks (one is scratch), got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(1, num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks `seq` must gain so its table covers its first `num_tokens` tokens."""
        return max(0, blocks_for(num_tokens, self.block_size) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= len(self._free)

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow `seq`'s block table to cover `num_tokens` tokens."""
        needed = self.blocks_needed(seq, num_tokens)
        if needed > len(self._free):
            raise RuntimeError(f"out of KV blocks: need {needed}, have {len(self._free)}")
        seq.block_table.extend(self._free.popleft() for _ in range(needed))

    def allocate_blocks(self, seq: Sequence, blocks: list[int]) -> None:
        """Grow `seq`'s block table by these particular free blocks, in this order (for a check that wants them
        out of the free list's order: novainfer.testing); the other free blocks keep theirs."""
        wanted = set(blocks)
        taken = wanted & set(self._free)
        if len(wanted) != len(blocks) or taken != wanted:
            raise ValueError(f"blocks {list(blocks)} are not distinct free blocks (free of them: {sorted(taken)})")
        self._free = deque(b for b in self._free if b not in wanted)
        seq.block_table.extend(blocks)

    def free(self, seq: Sequence) -> None:
        self._free.extend(seq.block_table)
        seq.block_table = []

    def slot(self, seq: Sequence, position: int) -> int:
        """The flat cache slot of token `position` of `seq`."""
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size
