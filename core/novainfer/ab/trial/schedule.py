"""An arm's schedule, planned on the host before the timed run: every step it will execute, one for one.

With EOS ignored and every output length fixed, the scheduler's decisions depend only on the workload and
the engine's limits (max_num_seqs, max_num_batched_tokens, max_model_len and the number of KV blocks), never
on the tokens a model produces. Running the real Scheduler over a BlockManager of the timed engine's size,
with placeholder tokens, therefore yields the timed run's steps exactly. The correctness gate replays a
sample of them, the phase breakdown weights its samples by them, and the trial checks afterwards that the
timed run took these steps and no others.

An online run (requests arriving over time) cannot be planned ahead: which step a request joins depends on the
clock. But the scheduler's decisions depend only on the requests it holds, so the run is reconstructed after
it, exactly, from the number of steps executed before each request was added (`added_at`): the same steps,
which the trial then checks one for one against those the engine recorded.

Each step is labelled by how it executes (its class: a partition of the run) and by what it exercises
(its kinds, which overlap; every kind the run has is one the gate must check):
    class "prefill"          a step carrying prefill chunks (always eager);
          "decode-b<N>"      a decode-only step of N' <= N sequences, N the smallest CUDA-graph bucket that
                             holds them (replayed padded to N when the engine runs graphs, else eager);
    kinds "first-chunk"      a prefill chunk with nothing cached before it;
          "continued-chunk"  a prefill chunk continuing a prefix already in the cache;
          "cached-prefix"    a request's first chunk after a prefix found in the prefix cache (another
                             request computed it; enable_prefix_caching): a short chunk over a long prefix;
          "mixed"            decodes and prefill chunks in one step;
          "longest-context"  the step reaching the longest sequence of the run;
          the step's class itself, and for decode-only steps:
          "decode-n<N'>"     eager runs: each distinct decode batch size is a kind of its own (an eager
                             backend may take a different path at any size);
          "decode-b<N>-fewest", "decode-b<N>-most"
                             CUDA-graph runs: the steps with the fewest and with the most sequences of each
                             bucket (the most padded replay, and the fullest, which is also the run's
                             commonest shape at N = max_num_seqs).
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass
from typing import NamedTuple

from novainfer.backend_api import cuda_graph_sizes
from novainfer.block_manager import BlockManager
from novainfer.scheduler import Scheduler
from novainfer.sequence import SamplingParams, Sequence

PREFILL = "prefill"
FIRST_CHUNK = "first-chunk"
CONTINUED_CHUNK = "continued-chunk"
MIXED = "mixed"
LONGEST_CONTEXT = "longest-context"
CACHED_PREFIX = "cached-prefix"


class PlannedEntry(NamedTuple):
    """One sequence of a step: workload request index, tokens cached before the step, tokens it runs, and the
    sequence's length at the step (prompt plus the outputs so far)."""

    request: int
    num_computed: int
    num_new: int
    length: int
    from_cache: bool = False  # num_computed came from the prefix cache at the request's admission


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
    return f"decode-b{next(b for b in cuda_graph_sizes(max_num_seqs) if b >= num_seqs)}"


def plan_schedule(
    prompt_lens: list[int],
    output_lens: list[int],
    *,
    num_blocks: int,
    block_size: int,
    max_num_seqs: int,
    max_num_batched_tokens: int,
    max_model_len: int,
    cuda_graphs: bool,
    added_at: list[int] | None = None,
    prompts: list[list[int]] | None = None,
) -> list[PlannedStep]:
    """The steps the engine will take for these requests, added in this order, on a cache of `num_blocks`,
    labelled for an engine that replays decode steps in CUDA graphs or not. `added_at[i]`: how many steps
    had run when request i was added (an online run, reconstructed); None: all added before the first.
    `prompts`: the requests' token ids, for an engine with prefix caching (which prompts share a cached prefix
    decides its steps); None: no prefix caching, and only the lengths matter."""
    bm = BlockManager(num_blocks, block_size, prefix_caching=prompts is not None)
    scheduler = Scheduler(bm, max_num_seqs, max_num_batched_tokens, max_model_len)
    request_of: dict[int, int] = {}
    added = added_at if added_at is not None else [0] * len(prompt_lens)
    pending = deque(sorted(range(len(prompt_lens)), key=lambda i: (added[i], i)))
    planned: list[tuple[tuple[PlannedEntry, ...], int]] = []
    while pending or scheduler.has_unfinished():
        # Those added before this step; with nothing in flight, the next one (an idle engine took no steps).
        while pending and (added[pending[0]] <= len(planned) or not scheduler.has_unfinished()):
            i = pending.popleft()
            tokens = list(prompts[i]) if prompts is not None else [0] * prompt_lens[i]
            seq = Sequence(tokens, SamplingParams(max_tokens=output_lens[i], ignore_eos=True))
            scheduler.add(seq)
            request_of[seq.seq_id] = i
        out = scheduler.schedule()
        if not out.num_seqs:
            raise RuntimeError("the scheduler could not schedule anything: the KV cache is too small")
        # A sequence's length at the step: its tokens so far, before the one the step samples is counted.
        entries = tuple(
            PlannedEntry(request_of[e.seq.seq_id], e.start, e.num_new_tokens,
                         e.start + e.num_new_tokens if e.samples else e.seq.num_tokens,
                         e.start == e.seq.num_cached_tokens > 0)
            for e in out.entries
        )
        planned.append((entries, out.num_decodes))
        scheduler.update(out, [0] * out.num_sampled, None)
    return labelled([PlannedStep(i, entries, n, "", frozenset()) for i, (entries, n) in enumerate(planned)],
                    max_num_seqs, cuda_graphs)


def labelled(plan: list[PlannedStep], max_num_seqs: int, cuda_graphs: bool) -> list[PlannedStep]:
    """The plan's steps with their class and kinds (see the module docstring), for graph or eager decodes."""
    longest = max(step.context for step in plan)
    steps = []
    for step in plan:
        prefills = step.entries[step.num_decodes :]
        step_class = PREFILL if prefills else decode_class(step.num_seqs, max_num_seqs)
        kinds = {step_class}
        if any(e.num_computed == 0 for e in prefills):
            kinds.add(FIRST_CHUNK)
        if any(e.num_computed > 0 for e in prefills):
            kinds.add(CONTINUED_CHUNK)
        if prefills and step.num_decodes:
            kinds.add(MIXED)
        if step.context == longest:
            kinds.add(LONGEST_CONTEXT)
        if any(e.from_cache for e in prefills):
            kinds.add(CACHED_PREFIX)
        if not prefills and not cuda_graphs:
            kinds.add(f"decode-n{step.num_seqs}")
        steps.append(PlannedStep(step.index, step.entries, step.num_decodes, step_class, frozenset(kinds)))
    if cuda_graphs:
        _label_bucket_ends(steps)
    return steps


def _label_bucket_ends(steps: list[PlannedStep]) -> None:
    """Add the "-fewest" and "-most" kinds to the decode steps at either end of each bucket, in place."""
    sizes: dict[str, list[int]] = {}
    for step in steps:
        if step.step_class != PREFILL:
            sizes.setdefault(step.step_class, []).append(step.num_seqs)
    ends = {cls: (min(n), max(n)) for cls, n in sizes.items()}
    for i, step in enumerate(steps):
        if step.step_class in ends:
            fewest, most = ends[step.step_class]
            extra = {f"{step.step_class}-fewest"} if step.num_seqs == fewest else set()
            extra |= {f"{step.step_class}-most"} if step.num_seqs == most else set()
            steps[i] = PlannedStep(step.index, step.entries, step.num_decodes, step.step_class, step.kinds | extra)


def kind_counts(plan: list[PlannedStep]) -> Counter[str]:
    """How many steps of the plan have each kind."""
    return Counter(kind for step in plan for kind in step.kinds)
