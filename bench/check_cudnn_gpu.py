"""Check the cudnn backend on a CUDA GPU (SM80+; nvidia-cudnn-frontend and novainfer-plugin-cudnn installed).

1. attention: one layer's attention through the backend on random paged inputs (12 query / 2 KV heads,
   head_dim 128, blocks handed out in shuffled order, steps laid out by the engine's own
   ModelRunner.prepare): decodes (a bucket, a count staged up to one, a CUDA-graph batch the engine
   padded), prefill chunks with and without a cached prefix, mixed steps, 64 chunks at once, float16,
   block size 64. The reference is native kernels="torch" in float32 on the same upcast inputs; native
   in the run's dtype is shown beside for scale. Two more: a decode graph captured in a CUDA graph on
   one batch and replayed on another after prepare_attention_metadata refilled the buffers, and a
   prefill graph with padded entries writing into a poisoned output (rows past the step must stay).
2. logits: teacher-forced logits of the whole model (random deepseek-r1-distill-qwen-1.5b weights,
   chunked prefill over cached prefixes, 6 sequences so decode steps pad to bucket 8): native, cudnn
   eager and with CUDA graphs, and the lazy arm, each in bfloat16 against the CPU float32 engine and
   as the sweep's gate compares (see logits_part). With prebuild="all" no graph may be built while
   the model runs.
3. start: creating the backend for the headline limits (max_num_seqs 256, max_num_batched_tokens 16384,
   max_model_len 4096, block 16, the 1.5B model's attention): graphs built, seconds, workspace.

Each case catches its own exception. The last thing printed is the table, PASS/FAIL per row (relative
error ||out - ref|| / ||ref|| <= 1e-2).

    python bench/check_cudnn_gpu.py [attention] [logits] [start]
"""

from __future__ import annotations

import argparse
import functools
import math
import time
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any

import cudnn
import torch
from gpu_check import (
    MAX_REL_ERROR,
    LogitsReferences,
    Row,
    guarded,
    logits_references,
    print_table,
    relative_error,
    teacher_forced,
)

from novainfer import LLM
from novainfer.backend_api import AttentionContext, StepBatch
from novainfer.plugins import discover_backends
from novainfer.scheduler import ScheduledSeq, SchedulerOutput
from novainfer.sequence import SamplingParams, Sequence

NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM = 12, 2, 128
SCALE = HEAD_DIM**-0.5
MAX_MODEL_LEN, MAX_SEQS, MAX_TOKENS = 4096, 64, 4096
DEVICE = torch.device("cuda")
HEADLINE = dict(max_num_seqs=256, max_num_batched_tokens=16384, max_model_len=4096, block_size=16)


@dataclass(frozen=True)
class Case:
    """One step: (cached tokens, new tokens) per sequence, the first num_decodes being decodes."""

    name: str
    seqs: list[tuple[int, int]]
    num_decodes: int
    block_size: int = 16
    dtype: torch.dtype = torch.bfloat16
    pad_to: int | None = None  # a decode batch the engine padded to this CUDA-graph bucket


def num_blocks(block_size: int) -> int:
    """Blocks of the test cache: every sequence at full length, plus the scratch block 0."""
    return 1 + MAX_SEQS * -(-MAX_MODEL_LEN // block_size)


class Fixtures:
    """What the cases share: one engine per block size (for its ModelRunner.prepare), one random cache per
    (block size, dtype), and backends created through the installed plugins' entry points."""

    def __init__(self) -> None:
        self.registry = discover_backends()
        self.engines: dict[int, LLM] = {}
        self.caches: dict[tuple[int, torch.dtype], torch.Tensor] = {}
        self.backends: dict[tuple[str, int, torch.dtype, tuple], Any] = {}

    def batch(self, case: Case, tables: list[list[int]]) -> StepBatch:
        if case.block_size not in self.engines:
            self.engines[case.block_size] = LLM(
                "random:qwen2-tiny", device="cuda", backend="native", backend_options={"kernels": "torch"},
                block_size=case.block_size, max_model_len=MAX_MODEL_LEN, max_num_seqs=MAX_SEQS,
                max_num_batched_tokens=MAX_TOKENS, kv_cache_capacity=case.block_size,
            )
        entries = []
        for (cached, new), table in zip(case.seqs, tables):
            seq = Sequence([0] * (cached + new), SamplingParams())
            seq.num_computed_tokens = cached
            seq.block_table = table
            entries.append(ScheduledSeq(seq, new))
        runner = self.engines[case.block_size].runner
        return runner.prepare(SchedulerOutput(entries, case.num_decodes), pad_to=case.pad_to)

    def cache(self, block_size: int, dtype: torch.dtype) -> torch.Tensor:
        key = (block_size, dtype)
        if key not in self.caches:
            gen = torch.Generator(device=DEVICE).manual_seed(block_size)
            shape = (2, num_blocks(block_size), block_size, NUM_KV_HEADS, HEAD_DIM)
            self.caches[key] = torch.randn(shape, generator=gen, device=DEVICE).to(dtype)
        return self.caches[key]

    def backend(self, name: str, block_size: int, dtype: torch.dtype, options: dict[str, Any]) -> Any:
        key = (name, block_size, dtype, tuple(sorted(options.items())))
        if key not in self.backends:
            context = AttentionContext(
                num_q_heads=NUM_Q_HEADS, num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM, num_layers=1,
                block_size=block_size, num_blocks=num_blocks(block_size), max_num_seqs=MAX_SEQS,
                max_num_batched_tokens=MAX_TOKENS, max_model_len=MAX_MODEL_LEN,
                max_blocks_per_seq=-(-MAX_MODEL_LEN // block_size), dtype=dtype, device=DEVICE, options=dict(options),
            )
            self.backends[key] = self.registry[name].spec.create(context)
        return self.backends[key]


def shuffled_tables(seqs: list[tuple[int, int]], block_size: int, gen: torch.Generator) -> list[list[int]]:
    """Each sequence's blocks, drawn without repeats from blocks 1.. (0 is the scratch block)."""
    counts = [-(-(cached + new) // block_size) for cached, new in seqs]
    pool = (torch.randperm(num_blocks(block_size) - 1, generator=gen)[: sum(counts)] + 1).tolist()
    tables, start = [], 0
    for n in counts:
        tables.append(pool[start : start + n])
        start += n
    return tables


def attend(backend: Any, batch: StepBatch, query: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
    """prepare_attention_metadata then one layer's attention, as the engine calls them."""
    metadata = backend.prepare_attention_metadata(batch=batch)
    return backend.attention(query=query, kv_cache=cache, metadata=metadata, scale=SCALE)


def attention_case(fx: Fixtures, case: Case, seed: int) -> Row:
    row = Row("attention", case.name)
    gen = torch.Generator().manual_seed(seed)
    batch = fx.batch(case, shuffled_tables(case.seqs, case.block_size, gen))
    real = sum(new for _, new in case.seqs)
    cache = fx.cache(case.block_size, case.dtype)
    query = torch.randn(batch.num_tokens, NUM_Q_HEADS, HEAD_DIM, generator=gen).to(DEVICE)
    reference = fx.backend("native", case.block_size, torch.float32, {"kernels": "torch"})
    expected = attend(reference, batch, query.to(case.dtype).float(), cache.float())[:real]
    native = fx.backend("native", case.block_size, case.dtype, {"kernels": "torch"})
    native_rel = relative_error(attend(native, batch, query.to(case.dtype), cache)[:real], expected)
    backend = fx.backend("cudnn", case.block_size, case.dtype, {"prebuild": "lazy"})
    plan = backend.prepare_attention_metadata(batch=batch)
    out = backend.attention(query=query.to(case.dtype), kv_cache=cache, metadata=plan, scale=SCALE)[:real]
    torch.cuda.synchronize()
    row.max_abs = float((out.float() - expected).abs().max())
    row.rel = relative_error(out, expected)
    row.ok = row.rel <= MAX_REL_ERROR and bool(out.isfinite().all())
    row.note = f"{plan.decode} staged={plan.stages_decodes} {plan.prefill}; native {case.dtype} rel {native_rel:.1e}"
    return row


def graph_replay_case(fx: Fixtures) -> Row:
    """Capture the decode graph of bucket 8 on 5 decodes, refill for 7 others, replay, compare."""
    row = Row("attention", "CUDA graph: capture, refill, replay")
    gen = torch.Generator().manual_seed(21)
    first = Case("first", [(int(n), 1) for n in (17, 300, 1, 64, 2000)], num_decodes=5, pad_to=8)
    second = Case("second", [(int(n), 1) for n in (1500, 16, 31, 700, 5, 3000, 129)], num_decodes=7, pad_to=8)
    tables = shuffled_tables(first.seqs + second.seqs, 16, gen)
    cache = fx.cache(16, torch.bfloat16)
    backend = fx.backend("cudnn", 16, torch.bfloat16, {"prebuild": "all"})
    before = backend.backend_counters()
    query = torch.randn(8, NUM_Q_HEADS, HEAD_DIM, generator=gen).to(DEVICE, torch.bfloat16)
    batch = fx.batch(first, tables[:5])
    metadata = backend.prepare_attention_metadata(batch=batch)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture, as DecodeGraphs does
        for _ in range(2):
            backend.attention(query=query, kv_cache=cache, metadata=metadata, scale=SCALE)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = backend.attention(query=query, kv_cache=cache, metadata=metadata, scale=SCALE)
    batch = fx.batch(second, tables[5:])
    query.copy_(torch.randn(8, NUM_Q_HEADS, HEAD_DIM, generator=gen).to(DEVICE, torch.bfloat16))
    backend.prepare_attention_metadata(batch=batch)  # outside the graph, as DecodeGraphs.run does
    graph.replay()
    torch.cuda.synchronize()
    reference = fx.backend("native", 16, torch.float32, {"kernels": "torch"})
    expected = attend(reference, batch, query.float(), cache.float())[:7]
    row.max_abs = float((out[:7].float() - expected).abs().max())
    row.rel = relative_error(out[:7], expected)
    builds = backend.backend_counters()["graph_builds"] - before["graph_builds"]
    row.ok = row.rel <= MAX_REL_ERROR and builds == 0
    row.note = f"captured on 5 decodes, replayed on 7 longer ones; graphs built meanwhile: {builds}"
    return row


def padded_prefill_case(fx: Fixtures) -> Row:
    """A prefill graph of 4 over 3 chunks, writing into an output whose rows past the step are poisoned."""
    row = Row("attention", "padded entries write nothing")
    case = Case("padded", [(500, 128), (33, 64), (15, 200)], num_decodes=0)
    gen = torch.Generator().manual_seed(22)
    batch = fx.batch(case, shuffled_tables(case.seqs, 16, gen))
    cache = fx.cache(16, torch.bfloat16)
    tokens, spare = batch.num_tokens, 256
    query = torch.full((tokens + spare, NUM_Q_HEADS, HEAD_DIM), math.nan, device=DEVICE, dtype=torch.bfloat16)
    query[:tokens] = torch.randn(tokens, NUM_Q_HEADS, HEAD_DIM, generator=gen).to(DEVICE, torch.bfloat16)
    out = torch.full_like(query, 7.0)
    backend = fx.backend("cudnn", 16, torch.bfloat16, {"prebuild": "all"})
    plan = backend.prepare_attention_metadata(batch=batch)
    # The graph call itself, so the output is ours to poison (the hook allocates its own); on this stream,
    # as the hook would point the handle.
    cudnn.set_stream(backend.handle, torch.cuda.current_stream().cuda_stream)
    backend._run(plan.prefill, query[:tokens], out[:tokens], cache[0].transpose(1, 2), cache[1].transpose(1, 2))
    torch.cuda.synchronize()
    reference = fx.backend("native", 16, torch.float32, {"kernels": "torch"})
    expected = attend(reference, batch, query[:tokens].float(), cache.float())
    row.max_abs = float((out[:tokens].float() - expected).abs().max())
    row.rel = relative_error(out[:tokens], expected)
    untouched = bool((out[tokens:] == 7.0).all())
    row.ok = row.rel <= MAX_REL_ERROR and untouched
    row.note = f"{plan.prefill} over 3 chunks; rows past the step {'untouched' if untouched else 'WRITTEN'}"
    return row


def attention_part(fx: Fixtures) -> list[Row]:
    gen = torch.Generator().manual_seed(1)
    decodes = [(int(n), 1) for n in torch.randint(1, 3000, (32,), generator=gen)]
    chunks = [(int(c), int(n)) for c, n in zip(torch.randint(0, 2000, (64,), generator=gen),
                                               torch.randint(2, 60, (64,), generator=gen))]
    cases = [
        Case("decode, 32 (a bucket)", decodes, num_decodes=32),
        Case("decode, 13 (staged to 16)", decodes[:13], num_decodes=13),
        Case("decode, 5 padded to 8", decodes[:5], num_decodes=5, pad_to=8),
        Case("prefill only", [(0, 17), (0, 300), (0, 1000), (0, 2)], num_decodes=0),
        Case("prefill over cached prefix", [(500, 128), (33, 64), (15, 200)], num_decodes=0),
        Case("mixed", [*decodes[:16], (0, 250), (700, 96)], num_decodes=16),
        Case("mixed, decodes staged", [*decodes[:5], (64, 33), (2000, 7)], num_decodes=5),
        Case("64 chunks over prefixes", chunks, num_decodes=0),
        Case("mixed, float16", [*decodes[:16], (0, 250), (700, 96)], num_decodes=16, dtype=torch.float16),
        Case("mixed, block size 64", [*decodes[:8], (0, 250), (700, 96)], num_decodes=8, block_size=64),
    ]
    rows = [guarded(Row("attention", case.name), lambda case=case, seed=seed: attention_case(fx, case, seed))
            for seed, case in enumerate(cases)]
    rows.append(guarded(Row("attention", "CUDA graph: capture, refill, replay"), lambda: graph_replay_case(fx)))
    rows.append(guarded(Row("attention", "padded entries write nothing"), lambda: padded_prefill_case(fx)))
    return rows


def logits_part() -> list[Row]:
    """Both comparisons of gpu_check.logits_references per arm, as bench/check_flashinfer_gpu.py makes them."""
    refs = logits_references()
    arms = [
        ("native", {}, False), ("native", {}, True),
        ("cudnn", {}, False), ("cudnn", {}, True), ("cudnn", {"prebuild": "lazy"}, False),
    ]
    rows = []
    for backend, options, graphs in arms:
        for kind in refs.models:
            row = Row("logits", f"{kind} {backend} {options or ''} {'graphs' if graphs else 'eager'}")
            engine = refs.engine(kind, backend, options, graphs)
            rows.append(guarded(row, functools.partial(logits_row, row, refs, kind, engine)))
            torch.cuda.empty_cache()
    return rows


def logits_row(row: Row, refs: LogitsReferences, kind: str, engine: dict[str, Any]) -> Row:
    _, before, after = teacher_forced(row, refs, kind, engine)
    during = {k: v - before.get(k, 0) for k, v in after.items()}
    # The lazy arm builds while it runs: that is what it is for.
    lazy = engine["backend_options"].get("prebuild") == "lazy"
    row.ok = row.rel <= refs.bars[kind] and (during.get("graph_builds", 0) == 0 or lazy)
    row.note += f"; at start {before}; while running {during}"
    return row


def start_part() -> list[Row]:
    rows = []
    for policy in ("all", "lazy"):
        rows.append(guarded(Row("start", f"headline limits, prebuild={policy}"), lambda p=policy: start_row(p)))
    return rows


def start_row(policy: str) -> Row:
    row = Row("start", f"headline limits, prebuild={policy}")
    width = -(-HEADLINE["max_model_len"] // HEADLINE["block_size"])
    context = AttentionContext(
        num_q_heads=NUM_Q_HEADS, num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM, num_layers=28,
        num_blocks=1 + HEADLINE["max_num_seqs"] * width, max_blocks_per_seq=width, dtype=torch.bfloat16, device=DEVICE,
        options={"prebuild": policy}, **HEADLINE,
    )
    started = time.perf_counter()
    backend = discover_backends()["cudnn"].spec.create(context)
    seconds = time.perf_counter() - started
    counters = backend.backend_counters()
    row.ok = counters["graph_builds"] == (len(backend.keys.all()) if policy == "all" else 0)
    row.note = (f"{counters['graph_builds']} of {len(backend.keys.all())} graphs built in {seconds:.1f} s "
                f"(cuDNN builds {counters['graph_build_ms'] / 1000:.1f} s); workspace "
                f"{backend.workspace.numel()} B; counters {counters}")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parts = ["attention", "logits", "start"]
    parser.add_argument("parts", nargs="*", choices=parts, default=parts)
    args = parser.parse_args()
    print(f"nvidia-cudnn-frontend {version('nvidia-cudnn-frontend')}, cuDNN backend {cudnn.backend_version()}, "
          f"torch {torch.__version__}, {torch.cuda.get_device_name()}", flush=True)
    rows = []
    if "attention" in args.parts:
        rows += attention_part(Fixtures())
    if "logits" in args.parts:
        rows += logits_part()
    if "start" in args.parts:
        rows += start_part()
    print_table(rows)


if __name__ == "__main__":
    main()
