"""novainfer.testing: chosen engine steps run from outside the engine, through the engine's own code.

Every check that needs one particular step (nova-ab's step gate and phase breakdown, the GPU checks in bench/,
each backend's tests, a third-party backend's own conformance run) builds it here instead of reaching into the
engine's scheduler, block manager, cache or runner:

    with prepared(llm, [StepSeq(cached=40, new=8), StepSeq(cached=12, new=1)]) as step:
        fill_cached([(llm, step)], seed=0)     # the same random prefix K/V in every engine given
        hidden = run(llm, step)                # every row's final hidden state, graph-replayed where it would be
        logits = row_logits(llm, hidden)       # every row's next-token logits
        out = attend(llm, step, query)         # one layer's attention through the backend's hooks

A step is what the scheduler hands the model runner: its sequences' blocks are allocated in the engine's own
cache (freed when the `with` ends), its tokens at their positions, decodes (one new token) first, and it runs
through the same runner path as a served step: a decode-only step replays the CUDA graph of its size when the
engine runs graphs, padded exactly as a served one. Below the model, `batch`, `hooks`, `kv_cache` and
`attention_output` are what the runner hands a backend's hooks for the step, and `attend` runs one layer of them.
`check_backend` runs a backend against the core's float64 reference on a standard set of steps, each held to its
dtype's bar or a margin over an honest implementation's error on it: the conformance every backend must pass.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from novainfer.backend_api import StepBatch
from novainfer.block_manager import blocks_for
from novainfer.engine import LLM
from novainfer.scheduler import ScheduledSeq, SchedulerOutput
from novainfer.sequence import SamplingParams
from novainfer.sequence import Sequence as EngineSequence


@dataclass(frozen=True)
class StepSeq:
    """One sequence of a step: `cached` tokens whose keys and values are already in the cache, `new` tokens the
    step runs, the sequence's token ids (at least cached + new of them; zeros when only shapes matter), and its
    block table: without, the engine's block manager allocates it as a served step's; with, exactly these free
    blocks, as many as cached + new tokens fill (for a check that wants blocks out of the allocator's order)."""

    cached: int
    new: int
    tokens: tuple[int, ...] | None = None
    blocks: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Step:
    """A prepared step: the scheduler's output for it and each sequence's blocks (entry order)."""

    out: SchedulerOutput
    blocks: tuple[tuple[int, ...], ...]

    @property
    def num_tokens(self) -> int:
        return self.out.num_tokens


@contextmanager
def prepared(llm: LLM, seqs: Sequence[StepSeq], num_decodes: int | None = None) -> Iterator[Step]:
    """The step on `llm`'s cache, its blocks freed on exit. With `num_decodes`, the first that many sequences
    are the step's decodes, as a scheduler's plan has them; without, the sequences of one new token are,
    moved first. What the cached prefixes hold is the caller's business (`fill_cached`), as in a served step
    it is the earlier steps'."""
    if num_decodes is None:
        ordered = [s for s in seqs if s.new == 1] + [s for s in seqs if s.new != 1]
        num_decodes = sum(s.new == 1 for s in seqs)
    else:
        ordered = list(seqs)
    entries: list[ScheduledSeq] = []
    try:
        for spec in ordered:
            length = spec.cached + spec.new
            tokens = list(spec.tokens[:length]) if spec.tokens is not None else [0] * length
            if len(tokens) < length:
                raise ValueError(f"a sequence of {length} tokens was given {len(tokens)} token ids")
            seq = EngineSequence(tokens, SamplingParams(max_tokens=1, ignore_eos=True))
            seq.num_computed_tokens = spec.cached
            if spec.blocks is None:
                llm.block_manager.allocate(seq, length)
            elif len(spec.blocks) != blocks_for(length, llm.config.block_size):
                raise ValueError(
                    f"a sequence of {length} tokens fills {blocks_for(length, llm.config.block_size)} blocks of "
                    f"{llm.config.block_size}, was given {len(spec.blocks)}"
                )
            else:
                llm.block_manager.allocate_blocks(seq, list(spec.blocks))
            entries.append(ScheduledSeq.of(seq, spec.new))
        yield Step(SchedulerOutput.of(entries, num_decodes), tuple(tuple(e.seq.block_table) for e in entries))
    finally:
        for entry in entries:
            llm.block_manager.free(entry.seq)


def run(llm: LLM, step: Step, as_served: bool = True) -> torch.Tensor:
    """Final hidden states of every row of the step, [num_tokens, hidden], a copy (a graph's output buffer is
    overwritten by its next replay). As served: a decode-only step replays its graph (or runs padded as one)
    where the engine runs graphs; otherwise eagerly, as scheduled, unpadded."""
    with torch.inference_mode():
        if as_served:
            _, hidden = llm.runner.run(step.out)
        else:
            layout = llm.runner.prepare(step.out)
            hidden = llm.runner.forward(layout, llm.runner.prepare_metadata(batch=layout))
        return hidden[: step.num_tokens].clone()


def batch(llm: LLM, step: Step, as_served: bool = True) -> StepBatch:
    """The StepBatch a backend's hooks see for the step: as served, padded to its graph size where it replays
    one; otherwise as scheduled, unpadded (as `run(..., as_served=False)` runs it, and as an engine whose graphs
    are refused serves it). Laid out in the engine's step buffers: valid until the engine's next step."""
    return llm.runner.prepare(step.out, pad_to=llm.runner.bucket_for(step.out) if as_served else None)


class Hooks(NamedTuple):
    """An engine's attention hooks as its model runner calls them (keyword arguments, as the contract says)."""

    prepare_attention_metadata: Callable[..., Any]
    write_kv: Callable[..., Any]
    attention: Callable[..., Any]


def hooks(llm: LLM) -> Hooks:
    runner = llm.runner
    return Hooks(runner.prepare_metadata, runner.write_kv, runner.attention)


def attention_output(llm: LLM, num_tokens: int) -> torch.Tensor:
    """The core's buffer the `attention` hook writes into, for a step of `num_tokens` rows."""
    return llm.runner.attn_output[:num_tokens]


def kv_cache(llm: LLM, layer: int = 0) -> torch.Tensor:
    """`layer`'s paged KV cache as the hooks get it: [2, num_blocks, block_size, num_kv_heads, head_dim], K is
    [0] and V is [1]."""
    return llm.kv_caches[layer]


class Attended(NamedTuple):
    """One layer of a step through the hooks: `output` [num_tokens, num_q_heads, head_dim] (a copy of the core's
    buffer) and the metadata the backend's prepare_attention_metadata returned for the step."""

    output: torch.Tensor
    metadata: Any


def attend(
    llm: LLM,
    step: Step,
    query: torch.Tensor,
    key: torch.Tensor | None = None,
    value: torch.Tensor | None = None,
    *,
    layer: int = 0,
    as_served: bool = True,
) -> Attended:
    """One layer of the step through `llm`'s hooks, called as its runner calls them: prepare_attention_metadata
    on `batch(llm, step, as_served)`, write_kv of `key` and `value` [rows, num_kv_heads, head_dim] at the step's
    slots into the layer's cache (without them, what the cache holds stands for the step's own keys and
    values), then attention of `query` [rows, num_q_heads, head_dim] into the core's output buffer. The tensors
    are in the cache's dtype on the engine's device, a row per row of the batch (padding included)."""
    hook = hooks(llm)
    layout = batch(llm, step, as_served)
    if query.shape[0] != layout.num_tokens:
        raise ValueError(f"the step's batch has {layout.num_tokens} rows, the query {query.shape[0]}")
    cache = kv_cache(llm, layer)
    output = attention_output(llm, layout.num_tokens)
    with torch.no_grad():
        metadata = hook.prepare_attention_metadata(batch=layout)
        if key is not None:
            hook.write_kv(
                layer_idx=layer, key=key, value=value, kv_cache=cache, slot_mapping=layout.slot_mapping,
                metadata=metadata,
            )
        hook.attention(
            layer_idx=layer, query=query, kv_cache=cache, metadata=metadata,
            scale=llm.model_config.head_dim**-0.5, output=output,
        )
        return Attended(output.clone(), metadata)


def timed_parts(
    llm: LLM, step: Step, wrap: Callable[[str, Callable[..., Any]], Callable[..., Any]]
) -> tuple[Callable[[], None], Callable[[], None] | None]:
    """For timing one step by phase: (forward, replay). `forward` runs the step eagerly on the batch it is served
    with (padded to its graph size where it replays one), every hook first passed through
    `wrap(phase, hook)` with phase "metadata", "kv_write" or "attention"; `replay` replays its captured graph
    (metadata included, as served), None when the step replays none. The batch is laid out now."""
    runner = llm.runner
    layout = batch(llm, step)
    prepare = wrap("metadata", runner.prepare_metadata)
    wrapped = (wrap("kv_write", runner.write_kv), wrap("attention", runner.attention))

    def forward() -> None:
        runner.logits(layout, runner.forward(layout, prepare(batch=layout), wrapped))

    replays = layout.cuda_graph and llm.graph_mode == "cuda_graphs"
    return forward, (lambda: runner.replay(layout)) if replays else None


def row_logits(llm: LLM, hidden: torch.Tensor) -> torch.Tensor:
    """Next-token logits of each row of `hidden`, in float32."""
    with torch.inference_mode():
        return llm.model.compute_logits(hidden).float()


def fill_cached(steps: Sequence[tuple[LLM, Step]], seed: int) -> None:
    """Fill every layer of each engine's blocks of its step with the same standard-normal draw: block i of one
    engine's step holds what block i of another's does (the steps must have the same sequences). The draw is in
    the first engine's cache dtype: list a bfloat16 engine before a float32 one and both hold the same values."""
    caches = [llm.kv_caches for llm, _ in steps]
    blocks = [[b for seq_blocks in step.blocks for b in seq_blocks] for _, step in steps]
    if len({len(b) for b in blocks}) != 1:
        raise ValueError("the steps hold different numbers of blocks")
    device = caches[0][0].device
    indices = [torch.tensor(ids, device=device) for ids in blocks]
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.inference_mode():
        for layer in range(len(caches[0])):
            cache = caches[0][layer]
            shape = (cache.shape[0], len(blocks[0]), *cache.shape[2:])
            values = torch.randn(shape, generator=generator, device=device, dtype=cache.dtype)
            for engine_caches, index in zip(caches, indices):
                engine_caches[layer].index_copy_(1, index, values.to(engine_caches[layer].dtype))


def relative_errors(want: torch.Tensor, got: torch.Tensor) -> torch.Tensor:
    """||got - want|| / ||want|| per row, on the CPU."""
    return ((got.float() - want.float()).norm(dim=-1) / want.float().norm(dim=-1).clamp_min(1e-30)).cpu()


# The least a conformance step or a gated step is allowed, by attention dtype: well above that dtype's rounding of
# attention (float32 agrees with float64 to about 1e-6 on every caliber we run), well below a wrong step's tens of
# percent.
MIN_BAR = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1e-2}


def allowed_error(bar: float, floor_margin: float, floor_err: float) -> float:
    """What one step may be off the reference: `bar`, or floor_margin x an honest implementation's error on the
    same step where that is larger; NaN (nothing passes) when the honest one's error is NaN."""
    return math.nan if math.isnan(floor_err) else max(bar, floor_margin * floor_err)


# The conformance steps: (name, sequences as (cached, new)). Ragged lengths, every kind a served step has.
CONFORMANCE_STEPS: tuple[tuple[str, tuple[tuple[int, int], ...]], ...] = (
    ("prefill", ((0, 37), (0, 5), (0, 64))),
    ("decode", ((36, 1), (4, 1), (80, 1), (15, 1))),
    ("prefill over a cached prefix", ((29, 11), (48, 3))),
    ("mixed", ((20, 1), (63, 1), (0, 17), (33, 9))),
    ("one-token prompt", ((0, 1), (0, 2))),
)


@dataclass
class ConformanceRow:
    """One conformance step: its name, block size and CUDA-graph replay, the worst row's relative error and the
    floor's (the same step through PyTorch's SDPA in the cache's dtype)."""

    step: str
    block_size: int
    graphs: bool
    rows: int
    max_rel_err: float
    floor_rel_err: float


@dataclass
class Conformance:
    """A conformance run. Each step is allowed max(bar, floor_margin x the floor's error on it), as the sweep's
    gate allows a step: through many layers a half dtype's rounding alone moves the logits past any flat bar."""

    backend: str
    bar: float
    floor_margin: float
    rows: list[ConformanceRow] = field(default_factory=list)

    def allowed(self, row: ConformanceRow) -> float:
        return allowed_error(self.bar, self.floor_margin, row.floor_rel_err)

    def passed(self) -> bool:
        return bool(self.rows) and not self.failures()

    def failures(self) -> list[ConformanceRow]:
        return [row for row in self.rows if not row.max_rel_err <= self.allowed(row)]  # NaN fails


def check_backend(
    backend: str,
    *,
    plugins: Sequence[object] = (),
    block_sizes: Sequence[int] = (16, 1),
    model: str = "random:qwen2-tiny-wide",
    device: str = "auto",
    dtype: str = "float32",
    kv_cache_dtype: str = "auto",
    backend_options: dict[str, Any] | None = None,
    cuda_graphs: bool = False,
    bar: float | None = None,
    floor_margin: float = 2.0,
    seed: int = 0,
) -> Conformance:
    """The conformance run: every CONFORMANCE_STEPS step at every block size, on `backend`, on the core's float64
    reference and on the floor (the reference's attention by PyTorch's SDPA in the cache's dtype: an honest
    implementation), all with the same weights and cache contents, every row's next-token logits compared.
    A backend that runs only in a half dtype keeps float32 weights with `kv_cache_dtype` set to it, so that
    attention is all that rounds (as the sweep's gate does). A step passes within max(bar, floor_margin x the
    floor's error on it); the bar defaults to the attention dtype's (MIN_BAR). Decode steps also replay through
    CUDA graphs when `cuda_graphs` (and the backend) allow it."""
    attention_dtype = dtype if kv_cache_dtype == "auto" else kv_cache_dtype
    report = Conformance(backend, MIN_BAR[attention_dtype] if bar is None else bar, floor_margin)
    rng = random.Random(seed)
    for block_size in block_sizes:
        settings = dict(
            model=model, device=device, dtype=dtype, kv_cache_dtype=kv_cache_dtype, block_size=block_size,
            max_model_len=256, max_num_seqs=8, max_num_batched_tokens=256, kv_cache_capacity=2048, warm_up=False,
        )
        reference = LLM(backend="reference", backend_options={"precision": "float64"}, **settings)
        floor = LLM(
            backend="reference", backend_options={"precision": "cache"}, shared_model=reference.model, **settings
        )
        tested = LLM(
            backend=backend, plugins=plugins, backend_options=backend_options or {}, cuda_graphs=cuda_graphs,
            shared_model=reference.model, **settings,
        )
        vocab = reference.model_config.vocab_size
        for index, (name, shape) in enumerate(CONFORMANCE_STEPS):
            seqs = [StepSeq(c, n, tuple(rng.randrange(vocab) for _ in range(c + n))) for c, n in shape]
            engines = (reference, floor, tested)
            with (
                prepared(reference, seqs) as want_step,
                prepared(floor, seqs) as floor_step,
                prepared(tested, seqs) as got_step,
            ):
                steps = (want_step, floor_step, got_step)
                fill_cached(list(zip(engines, steps, strict=True)), seed=seed + index)
                want, honest, got = (row_logits(llm, run(llm, s)) for llm, s in zip(engines, steps, strict=True))
            graphs = tested.graph_mode == "cuda_graphs" and got_step.out.num_decodes == len(got_step.out.entries)
            report.rows.append(
                ConformanceRow(
                    name, block_size, graphs, len(want), worst_row(relative_errors(want, got)),
                    worst_row(relative_errors(want, honest)),
                )
            )
    return report


def worst_row(errors: torch.Tensor) -> float:
    """The largest of the rows' errors; NaN when any row's is (a NaN must fail, and max() would skip it)."""
    return math.nan if errors.isnan().any() else float(errors.max())


def check_graph_replay(llm: LLM, context_lens: Sequence[Sequence[int]], seed: int = 0) -> list[float]:
    """The capture / re-plan / replay check: decode-only steps, one per list of context lengths (give several
    of one graph size, so its graph replays over metadata re-planned between replays), each run as served
    (graph-replayed where `llm` runs graphs, padded to its size) and eagerly unpadded on the same cache
    content; returns each step's worst row relative error of the next-token logits (0 where bitwise equal)."""
    rng = random.Random(seed)
    vocab = llm.model_config.vocab_size
    worst = []
    for index, lens in enumerate(context_lens):
        seqs = [StepSeq(n - 1, 1, tuple(rng.randrange(vocab) for _ in range(n))) for n in lens]
        with prepared(llm, seqs) as step:
            fill_cached([(llm, step)], seed=seed + index)
            served = row_logits(llm, run(llm, step))
            eager = row_logits(llm, run(llm, step, as_served=False))
        worst.append(worst_row(relative_errors(eager, served)))
    return worst
