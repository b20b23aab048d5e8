"""Which KV blocks hold which prompt prefixes: the index behind prefix caching (`enable_prefix_caching`).

A full block of a prompt is named by a digest of its tokens chained to the digest of the block before it, so a
name stands for the whole prefix up to the block's end: two prompts share a block exactly when they share every
token up to its end. The digest is BLAKE2b-128 over the parent's digest and the tokens as little-endian int32
(stable across processes and machines, unlike Python's salted `hash`; at 128 bits a collision among 2^32 blocks
has odds near 2^-64, so hits are not compared token by token). Only blocks of prompt tokens are named: a prompt
is known when its request comes, so a run's hits follow from its prompts alone (nova-ab plans a run's steps from
them), where output blocks would depend on the tokens a model produces.

The index maps names to blocks; the block manager owns the blocks themselves (reference counts, the free list
in least-recently-freed order, eviction when a cached block is handed out again).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

_ROOT = b"\0" * 16  # the parent of a prompt's first block


def chain_hashes(tokens: Sequence[int], block_size: int) -> list[bytes]:
    """The names of the full blocks of `tokens`, first block first."""
    data = np.asarray(tokens, dtype="<i4")
    names, parent = [], _ROOT
    for start in range(0, len(data) - block_size + 1, block_size):
        parent = hashlib.blake2b(parent + data[start : start + block_size].tobytes(), digest_size=16).digest()
        names.append(parent)
    return names


class PrefixCache:
    """Names of cached blocks, with counters of what lookups found.

    query_tokens / hit_tokens, query_blocks / hit_blocks: over first admissions (a request's prompt tokens and
    full blocks looked up, and those found); preempted_hit_tokens: found when a preempted request came back,
    kept apart (vLLM keeps them out of its hit rate too); evicted: cached blocks handed out for new tokens.
    """

    def __init__(self) -> None:
        self._block_of: dict[bytes, int] = {}
        self._name_of: dict[int, bytes] = {}
        self.reset()

    def __len__(self) -> int:
        return len(self._block_of)

    def is_cached(self, block: int) -> bool:
        return block in self._name_of

    def lookup(self, names: Sequence[bytes]) -> list[int]:
        """The blocks of the longest run of `names` cached, from the first."""
        blocks = []
        for name in names:
            block = self._block_of.get(name)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def insert(self, block: int, name: bytes) -> None:
        """Name `block`, unless another block already holds that prefix (then this one stays unnamed, and is
        freed as any unnamed block is)."""
        if name not in self._block_of:
            self._block_of[name] = block
            self._name_of[block] = name

    def evict(self, block: int) -> None:
        """Forget `block`'s name: its tokens are about to be overwritten."""
        name = self._name_of.pop(block, None)
        if name is not None:
            del self._block_of[name]
            self.evicted += 1

    def record(self, prompt_tokens: int, prompt_blocks: int, hits: int, block_size: int, preempted: bool) -> None:
        if preempted:
            self.preempted_hit_tokens += hits * block_size
            return
        self.query_tokens += prompt_tokens
        self.query_blocks += prompt_blocks
        self.hit_tokens += hits * block_size
        self.hit_blocks += hits

    def reset(self) -> None:
        """Forget every name (the blocks stay where they are) and zero the counters."""
        self._block_of.clear()
        self._name_of.clear()
        self.query_tokens = self.hit_tokens = self.query_blocks = self.hit_blocks = 0
        self.preempted_hit_tokens = self.evicted = 0
