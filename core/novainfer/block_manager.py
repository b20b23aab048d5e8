"""Ownership of KV-cache blocks: a free list, reference counts, each sequence's block table, and (with prefix
caching) the prefix cache's blocks. No tensors here."""

from __future__ import annotations

from collections import OrderedDict

from novainfer.prefix_cache import PrefixCache
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
    """Blocks 1..num_blocks-1, each free or held by one or more sequences (a reference count).

    Free blocks are handed out least recently freed first. With a prefix cache, a freed block that holds a named
    prompt prefix keeps its name and its contents until it is handed out again (then it is evicted), so a later
    request with that prefix can take it back (`share`); unnamed blocks are handed out before named ones, and a
    sequence's blocks are freed last block first, so a prefix's tail goes before its head.
    """

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = False) -> None:
        if num_blocks < 2:
            raise ValueError(f"the KV cache needs at least 2 blocks (one is scratch), got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, num_blocks))
        self._refs = [0] * num_blocks
        self.cache = PrefixCache() if prefix_caching else None

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks `seq` must gain so its table covers its first `num_tokens` tokens."""
        return max(0, blocks_for(num_tokens, self.block_size) - seq.num_blocks)

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= len(self._free)

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow `seq`'s block table to cover `num_tokens` tokens."""
        needed = self.blocks_needed(seq, num_tokens)
        if needed > len(self._free):
            raise RuntimeError(f"out of KV blocks: need {needed}, have {len(self._free)}")
        seq.add_blocks(self.take(needed))

    def take(self, count: int) -> list[int]:
        """`count` free blocks, least recently freed first, now held once by the caller (who must have checked
        that there are as many: the scheduler takes a step's new blocks for every sequence at once). A block
        that held a cached prefix loses its name here."""
        blocks = [self._free.popitem(last=False)[0] for _ in range(count)]
        for block in blocks:
            self._refs[block] = 1
            if self.cache is not None:
                self.cache.evict(block)
        return blocks

    def cached_prefix(self, seq: Sequence) -> list[int]:
        """The cached blocks holding the longest run of `seq`'s full prompt blocks, leaving at least its last
        token to compute (a step must run something to sample from). Empty without a prefix cache."""
        if self.cache is None:
            return []
        names = seq.prompt_block_names(self.block_size)
        return self.cache.lookup(names[: (seq.num_tokens - 1) // self.block_size])

    def num_reclaimed(self, blocks: list[int]) -> int:
        """How many of these cached blocks are free now, so that sharing them takes them off the free list."""
        return sum(self._refs[b] == 0 for b in blocks)

    def share(self, seq: Sequence, blocks: list[int]) -> None:
        """Start `seq`'s block table with these cached blocks (copy-free: one more holder each)."""
        for block in blocks:
            if self._refs[block] == 0:
                del self._free[block]
            self._refs[block] += 1
        seq.add_blocks(blocks)

    def name_blocks(self, blocks: list[int], names: list[bytes]) -> None:
        """Record that these blocks, just filled, hold the prefixes `names` name."""
        if self.cache is not None:
            for block, name in zip(blocks, names):
                self.cache.insert(block, name)

    def allocate_blocks(self, seq: Sequence, blocks: list[int]) -> None:
        """Grow `seq`'s block table by these particular free blocks, in this order (for a check that wants them
        out of the free list's order: novainfer.testing); the other free blocks keep theirs."""
        wanted = set(blocks)
        taken = {b for b in wanted if b in self._free}
        if len(wanted) != len(blocks) or taken != wanted:
            raise ValueError(f"blocks {list(blocks)} are not distinct free blocks (free of them: {sorted(taken)})")
        for block in blocks:
            del self._free[block]
            self._refs[block] = 1
            if self.cache is not None:
                self.cache.evict(block)
        seq.add_blocks(list(blocks))

    def free(self, seq: Sequence) -> None:
        """Let go of `seq`'s blocks; a block no sequence holds any more joins the free list."""
        blocks = seq.release_blocks()
        for block in reversed(blocks) if self.cache is not None else blocks:
            if self._refs[block] <= 0:
                raise RuntimeError(f"KV block {block} freed twice (sequence {seq.seq_id})")
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._free[block] = None
                if self.cache is not None and not self.cache.is_cached(block):
                    self._free.move_to_end(block, last=False)  # nothing to keep: handed out first

    def slot(self, seq: Sequence, position: int) -> int:
        """The flat cache slot of token `position` of `seq`."""
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size
