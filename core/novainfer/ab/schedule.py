"""An arm's schedule, planned on the host before the timed run: every step it will execute, one for one.

With EOS ignored and every output length fixed, the scheduler's decisions depend only on the workload and
the engine's limits (max_num_seqs, max_num_batched_tokens, max_model_len and the number of KV blocks), never
on the tokens a model produces. Running the real Scheduler over a BlockManager of the timed engine's size,
with placeholder tokens, therefore yields the timed run's steps exactly. The correctness gate replays a
sample of them, the phase breakdown weights its samples by them, and the trial checks afterwards that the
timed run took these steps and no others.

Each step is labelled by how it executes (its class: a partition of the run) and by what it exercises
(its kinds, which overlap; every kind the run has is one the gate must check):
    class "prefill"        a step carrying prefill chunks (always eager);
          "decode-b<N>"    a decode-only step of N' <= N sequences, N the smallest CUDA-graph bucket that
                           holds them (replayed padded to N when the engine runs graphs, else eager);
    kinds "first-chunk"     a prefill chunk with nothing cached before it;
          "continued-chunk" a prefill chunk continuing a prefix already in the cache;
          "mixed"           decodes and prefill chunks in one step;
          "longest-context" the step reaching the longest sequence of the run;
          and the step's class itself.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

from novainfer.block_manager import BlockManager
from novainfer.cuda_graphs import decode_buckets
from novainfer.scheduler import ScheduledSeq, Scheduler, SchedulerOutput
from novainfer.sequence import SamplingParams, Sequence

PREFILL = "prefill"
FIRST_CHUNK = "first-chunk"
CONTINUED_CHUNK = "continued-chunk"
MIXED = "mixed"
LONGEST_CONTEXT = "longest-context"


class PlannedEntry(NamedTuple):
    """One sequence of a step: workload request index, tokens cached before the step, tokens it runs, and the
    sequence's length at the step (prompt plus the outputs so far)."""

    request: int
    num_computed: int
    num_new: int
    length: int


@dataclass(frozen=True)
class PlannedStep:
    """One step of the plan. entries: decodes first, as the scheduler orders them. step_class and kinds: see
    the module docstring. tokens: query tokens in all; context: the longest sequence after the step."""

    index: int
    entries: tuple[PlannedEntry, ...]
    num_decodes: int
    step_class: str
    kinds: frozenset[str]

    @property
    def tokens(self) -> int:
        return sum(e.num_new for e in self.entries)

    @property
    def context(self) -> int:
        return max(e.num_computed + e.num_new for e in self.entries)

    @property
    def num_seqs(self) -> int:
        return len(self.entries)


def decode_class(num_seqs: int, max_num_seqs: int) -> str:
    """The class of a decode-only step of `num_seqs` sequences: named after its CUDA-graph bucket."""
    return f"decode-b{next(b for b in decode_buckets(max_num_seqs) if b >= num_seqs)}"


def plan_schedule(
    prompt_lens: list[int],
    output_lens: list[int],
    *,
    num_blocks: int,
    block_size: int,
    max_num_seqs: int,
    max_num_batched_tokens: int,
    max_model_len: int,
) -> list[PlannedStep]:
    """The steps the engine will take for these requests, added in this order, on a cache of `num_blocks`."""
    scheduler = Scheduler(BlockManager(num_blocks, block_size), max_num_seqs, max_num_batched_tokens, max_model_len)
    request_of: dict[int, int] = {}
    for i, (prompt_len, output_len) in enumerate(zip(prompt_lens, output_lens)):
        seq = Sequence([0] * prompt_len, SamplingParams(max_tokens=output_len, ignore_eos=True))
        scheduler.add(seq)
        request_of[seq.seq_id] = i
    planned: list[tuple[tuple[PlannedEntry, ...], int]] = []
    while scheduler.has_unfinished():
        out = scheduler.schedule()
        if not out.entries:
            raise RuntimeError("the scheduler could not schedule anything: the KV cache is too small")
        entries = tuple(
            PlannedEntry(request_of[e.seq.seq_id], e.seq.num_computed_tokens, e.num_new_tokens, len(e.seq))
            for e in out.entries
        )
        planned.append((entries, out.num_decodes))
        scheduler.update(out, {e.seq.seq_id: 0 for e in out.entries if e.samples}, None)
    longest = max(max(e.num_computed + e.num_new for e in entries) for entries, _ in planned)
    return [
        _label(i, entries, num_decodes, longest, max_num_seqs) for i, (entries, num_decodes) in enumerate(planned)
    ]


def _label(
    index: int, entries: tuple[PlannedEntry, ...], num_decodes: int, longest: int, max_num_seqs: int
) -> PlannedStep:
    prefills = entries[num_decodes:]
    step_class = PREFILL if prefills else decode_class(len(entries), max_num_seqs)
    kinds = {step_class}
    if any(e.num_computed == 0 for e in prefills):
        kinds.add(FIRST_CHUNK)
    if any(e.num_computed > 0 for e in prefills):
        kinds.add(CONTINUED_CHUNK)
    if prefills and num_decodes:
        kinds.add(MIXED)
    if max(e.num_computed + e.num_new for e in entries) == longest:
        kinds.add(LONGEST_CONTEXT)
    return PlannedStep(index, entries, num_decodes, step_class, frozenset(kinds))


def kind_counts(plan: list[PlannedStep]) -> Counter[str]:
    """How many steps of the plan have each kind."""
    return Counter(kind for step in plan for kind in step.kinds)


@contextmanager
def rebuilt(
    step: PlannedStep, manager: BlockManager, sequences: list[list[int]] | None = None
) -> Iterator[SchedulerOutput]:
    """The planned step as the scheduler hands it to the model runner, on `manager`'s cache, so it can run
    out of order: each sequence holds its tokens at that step (`sequences[request]` cut to its length, or
    zeros where only shapes matter) and the blocks its cached prefix and this step need, freed on exit.
    What the prefix's blocks hold is the caller's business."""
    entries = []
    try:
        for e in step.entries:
            tokens = sequences[e.request][: e.length] if sequences is not None else [0] * e.length
            seq = Sequence(tokens, SamplingParams(max_tokens=1, ignore_eos=True))
            seq.num_computed_tokens = e.num_computed
            manager.allocate(seq, e.num_computed + e.num_new)
            entries.append(ScheduledSeq(seq, e.num_new))
        yield SchedulerOutput(entries, step.num_decodes)
    finally:
        for entry in entries:
            manager.free(entry.seq)
