"""Which cuDNN graphs a run needs: step shapes rounded up to a small, fixed set of keys. Pure Python.

cuDNN builds one execution plan per tensor shape (about 1.2 s each on an H100), so a step whose shape
has no graph yet stalls the run: the seed tool lost most of its throughput that way. Every shape a step
can have is therefore rounded up to one of a few keys, and the key set follows from the engine's limits
alone, so the whole of it can be built before the run starts.

Two kinds of graph:
- decode: B sequences of one query token each, dense rows [B, Hq, 1, D], no mask. B is one of the
  engine's CUDA-graph buckets, so a captured decode step always has a graph of exactly its size.
- prefill: B prefill chunks packed back to back (ragged rows located by offsets), each seen as up to S
  query rows, causal with the diagonal at the bottom right (a chunk's queries follow its cached
  prefix). B and S are rounded up to powers of PREFILL_RATIO: cuDNN skips the sequences and rows a
  ragged graph does not use, so a coarse grid costs little and keeps the set small.

Both kinds read the whole page table: its width is the core's max blocks per sequence and the graph's
KV length is width * block_size, so one graph serves every context length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from novainfer.backend_api import AttentionContext, BackendError, cuda_graph_sizes

PREFILL_RATIO = 4
# A ragged graph's cost hardly depends on S below one attention tile (64 to 128 rows), so the
# smallest query bucket is one tile.
SMALLEST_QUERY_BUCKET = 64
# A prompt step of one token is scheduled as a decode, so every prefill chunk has at least two.
MIN_PREFILL_QUERY = 2


@dataclass(frozen=True, order=True)
class GraphKey:
    """One cuDNN graph: its kind, its batch B and its query rows per sequence S (1 for decode)."""

    kind: Literal["decode", "prefill"]
    batch: int
    max_query_len: int

    def __str__(self) -> str:
        return f"{self.kind}(batch={self.batch}, max_query_len={self.max_query_len})"


@dataclass(frozen=True)
class Limits:
    """The engine limits that bound every step's shape."""

    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    block_size: int

    @classmethod
    def from_context(cls, context: AttentionContext) -> Limits:
        return cls(context.max_num_seqs, context.max_num_batched_tokens, context.max_model_len, context.block_size)

    @property
    def table_width(self) -> int:
        """Blocks per page-table row: the core's block_tables width."""
        return -(-self.max_model_len // self.block_size)

    @property
    def max_seq_len_kv(self) -> int:
        """The KV length every graph is built for; cuDNN wants it to equal width * block_size."""
        return self.table_width * self.block_size

    @property
    def max_prefills(self) -> int:
        """The most prefill chunks one step can hold."""
        return min(self.max_num_seqs, self.max_num_batched_tokens // MIN_PREFILL_QUERY)

    @property
    def max_prefill_query(self) -> int:
        """The longest chunk: bounded by the token budget and by the longest sequence."""
        return min(self.max_num_batched_tokens, self.max_model_len)


def geometric(first: int, ratio: int, last: int) -> tuple[int, ...]:
    """first, first * ratio, ... below `last`, then `last` itself; empty when `last` < 1."""
    values = []
    value = first
    while value < last:
        values.append(value)
        value *= ratio
    if last >= 1:
        values.append(last)
    return tuple(values)


def round_up(value: int, buckets: tuple[int, ...], what: str) -> int:
    """The smallest bucket >= value."""
    for bucket in buckets:
        if bucket >= value:
            return bucket
    raise BackendError(
        f"cudnn: {value} {what} in one step exceed the largest graph ({buckets[-1] if buckets else 0}) "
        "built for this engine's limits"
    )


@dataclass(frozen=True)
class GraphKeys:
    """The keys of every graph a run with given limits can use."""

    decode_batches: tuple[int, ...]
    prefill_batches: tuple[int, ...]
    prefill_queries: tuple[int, ...]
    prefill: tuple[GraphKey, ...]  # the (batch, query) pairs some step can reach

    @classmethod
    def for_limits(cls, limits: Limits) -> GraphKeys:
        batches = geometric(1, PREFILL_RATIO, limits.max_prefills)
        longest = limits.max_prefill_query if limits.max_prefill_query >= MIN_PREFILL_QUERY else 0
        queries = geometric(min(SMALLEST_QUERY_BUCKET, longest), PREFILL_RATIO, longest)
        prefill = []
        for i, batch in enumerate(batches):
            for j, query in enumerate(queries):
                # The fewest tokens a step of this bucket holds: one chunk more than the bucket below,
                # the longest one query more than the bucket below, the others two tokens each.
                fewer_chunks = batches[i - 1] if i else 0
                longest_min = max(queries[j - 1] + 1 if j else 0, MIN_PREFILL_QUERY)
                if MIN_PREFILL_QUERY * fewer_chunks + longest_min <= limits.max_num_batched_tokens:
                    prefill.append(GraphKey("prefill", batch, query))
        return cls(cuda_graph_sizes(limits.max_num_seqs), batches, queries, tuple(prefill))

    def all(self) -> tuple[GraphKey, ...]:
        return tuple(GraphKey("decode", b, 1) for b in self.decode_batches) + self.prefill


@dataclass(frozen=True)
class StepPlan:
    """How one step's attention maps onto graphs; it is the backend's per-step metadata.

    num_decodes: the step's decode rows, which come first (all rows of a CUDA-graph batch).
    decode: the decode graph, batch >= num_decodes; None without decodes.
    prefill: the prefill graph over the remaining sequences; None without prefill chunks.
    """

    num_decodes: int
    decode: GraphKey | None
    prefill: GraphKey | None

    @property
    def stages_decodes(self) -> bool:
        """Whether the decode rows go through padded staging buffers: a dense graph of B rows reads
        and writes B rows, more than the step has."""
        return self.decode is not None and self.decode.batch != self.num_decodes


def plan_step(keys: GraphKeys, num_decodes: int, num_prefills: int, max_prefill_query: int) -> StepPlan:
    """The graphs of a step with these decodes and prefill chunks (the longest `max_prefill_query`)."""
    decode = None
    if num_decodes:
        decode = GraphKey("decode", round_up(num_decodes, keys.decode_batches, "decodes"), 1)
    prefill = None
    if num_prefills:
        prefill = GraphKey(
            "prefill",
            round_up(num_prefills, keys.prefill_batches, "prefill chunks"),
            round_up(max_prefill_query, keys.prefill_queries, "query tokens per chunk"),
        )
    return StepPlan(num_decodes, decode, prefill)


@dataclass(frozen=True)
class Options:
    """The backend's options (``backend_options``), parsed by the core before the backend is created.

    prebuild: "all" builds every graph of the engine's limits when the backend is created; "lazy" builds
        each on first use (see prebuilt_keys).
    """

    prebuild: Literal["all", "lazy"] = "all"


def resolve_prebuild(options: Options) -> str:
    """The prebuild policy of the parsed options."""
    return options.prebuild


def prebuilt_keys(keys: GraphKeys, policy: str) -> tuple[GraphKey, ...]:
    """The keys built when the backend is created: all of them, or none under "lazy" (built on first
    use, as the seed tool did: the A/B arm that shows what builds during a run cost)."""
    return keys.all() if policy == "all" else ()
