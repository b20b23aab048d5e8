"""A request as the scheduler tracks it, and how it is to be sampled."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, auto
from itertools import count
from typing import TYPE_CHECKING

from novainfer.prefix_cache import chain_hashes

if TYPE_CHECKING:
    import torch

    from novainfer.running_batch import RunningBatch


@dataclass(frozen=True)
class SamplingParams:
    """How one request is sampled and when it stops.

    temperature: 0 means greedy. top_k: 0 means no limit. top_p: 1.0 means no limit.
    seed: makes a sampled request reproducible on its own, whatever else is in the batch.
    max_tokens: output tokens to produce; with ignore_eos the request produces exactly this many.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    max_tokens: int = 16
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    """Token ids of one request (prompt then output), how many of them the KV cache holds, and its KV blocks.

    While the scheduler runs it, these live in its row of the scheduler's RunningBatch, where one step's
    bookkeeping for every sequence is a few array operations; the properties read them there, so callers see
    one object either way. Under asynchronous scheduling a sampled token is counted (`num_tokens`) as soon as
    its step is scheduled, and its value is known (`token_ids`) a step later: `num_tokens` may run one ahead.
    """

    _ids = count()

    def __init__(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.seq_id = next(Sequence._ids)
        self._token_ids = list(prompt_token_ids)  # the values known on the host
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.status = SequenceStatus.WAITING
        self._num_tokens = len(prompt_token_ids)
        self._num_computed = 0
        self._block_table: list[int] = []
        self.generator: torch.Generator | None = None  # set by the engine when params.seed is given
        # Teacher forcing: the tokens appended instead of sampled ones.
        self.forced_tokens: list[int] | None = None
        self.batch: RunningBatch | None = None  # set while the sequence holds a row (`row`) of it
        self.row = -1
        self._prompt_block_names: list[bytes] | None = None
        self.num_cached_tokens = 0  # prompt tokens its last admission found in the prefix cache
        self.num_admissions = 0  # more than one: it was preempted and came back

    def __len__(self) -> int:
        return self.num_tokens

    @property
    def num_tokens(self) -> int:
        """Tokens so far, including sampled ones whose values are not known yet."""
        return self._num_tokens if self.batch is None else int(self.batch.num_tokens[self.row])

    @num_tokens.setter
    def num_tokens(self, value: int) -> None:
        if self.batch is None:
            self._num_tokens = value
        else:
            self.batch.num_tokens[self.row] = value

    def receive(self, token: int) -> None:
        """Append the value of a token counted earlier (a sequence without a row: one that left its row while
        its token was in flight)."""
        if self.batch is not None:
            raise RuntimeError("a running sequence's tokens arrive through its row")
        self._token_ids.append(token)

    @property
    def num_computed_tokens(self) -> int:
        """Tokens whose K/V are in the cache (or being written by a step in flight)."""
        return self._num_computed if self.batch is None else int(self.batch.num_computed[self.row])

    @num_computed_tokens.setter
    def num_computed_tokens(self, value: int) -> None:
        if self.batch is None:
            self._num_computed = value
        else:
            self.batch.num_computed[self.row] = value

    @property
    def token_ids(self) -> list[int]:
        """The token ids known on the host: the prompt, then the outputs received so far."""
        if self.batch is not None:
            known = int(self.batch.num_known[self.row])
            if known > len(self._token_ids):
                self._token_ids.extend(self.batch.tokens[self.row, len(self._token_ids) : known].tolist())
        return self._token_ids

    @property
    def block_table(self) -> list[int]:
        """The KV blocks holding the sequence's tokens, in order (a copy while it holds a row)."""
        if self.batch is None:
            return self._block_table
        return self.batch.tables[self.row, : self.batch.num_blocks[self.row]].tolist()

    @block_table.setter
    def block_table(self, blocks: list[int]) -> None:
        if self.batch is not None:
            raise RuntimeError("a running sequence's blocks change through its block manager")
        self._block_table = blocks

    def prompt_block_names(self, block_size: int) -> list[bytes]:
        """The prefix cache's names of the prompt's full blocks (novainfer.prefix_cache), computed once."""
        if self._prompt_block_names is None:
            self._prompt_block_names = chain_hashes(self.token_ids[: self.num_prompt_tokens], block_size)
        return self._prompt_block_names

    @property
    def num_blocks(self) -> int:
        return len(self._block_table) if self.batch is None else int(self.batch.num_blocks[self.row])

    def add_blocks(self, blocks: list[int]) -> None:
        """Append KV blocks to the sequence's table (the block manager's to call)."""
        if self.batch is None:
            self._block_table.extend(blocks)
        else:
            self.batch.add_blocks(self.row, blocks)

    def release_blocks(self) -> list[int]:
        """Empty the sequence's block table, returning the blocks it held (the block manager's to call)."""
        blocks = self.block_table
        if self.batch is None:
            self._block_table = []
        else:
            self.batch.clear_blocks(self.row)
        return blocks

    @property
    def num_output_tokens(self) -> int:
        """Output tokens received so far (their values known)."""
        if self.batch is not None:
            return int(self.batch.num_known[self.row]) - self.num_prompt_tokens
        return len(self._token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens
