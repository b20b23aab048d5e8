"""Check the flashattn backend against native on a CUDA GPU (flash-attn-4 on sm90/sm100, or flash-attn 2).

1. attention: one step's write_kv + attention through the backend hooks, on random paged inputs
   (12 query / 2 KV heads, head_dim 128, blocks handed out in shuffled order; batches built by the
   engine's own ModelRunner.prepare): decode-only, prefill-only, prefill over a cached prefix, mixed,
   block size 1 (flash-attn-4 only), float16, a decode batch padded to a CUDA-graph bucket, and a graph
   captured on one batch and replayed on another after new metadata. The reference is native with
   kernels="torch" in float32 on the same (upcast) inputs.
2. logits: teacher-forced logits of the whole model (random deepseek-r1-distill-qwen-1.5b weights,
   chunked prefill so chunks attend to cached prefixes, 6 sequences so decode graphs pad), eager and
   with CUDA graphs: "gate" (float32 weights, attention over a bfloat16 cache, against native's
   PyTorch path: bar 1e-2) and "bf16" (the model in bfloat16 against the CPU float32 engine: bar
   1e-2 or 1.25 x native's PyTorch path in bfloat16, whichever is larger). No backend counter
   (flash-attn-4 kernels compiled) may move after the engine is built.

Each case catches its own exception; the table comes last, PASS/FAIL per row.

    python bench/check_flashattn_gpu.py [attention] [logits] [--generation auto|4|2]

flash-attn 2 pages only in blocks of a multiple of 256, so its run uses block size 256. flash-attn-4
compiles its kernels when a backend is created (seconds each); FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1
keeps them on disk for the next run.
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch
from gpu_check import (
    MAX_REL_ERROR,
    TORCH,
    LogitsReferences,
    Row,
    counters_moved,
    guarded,
    logits_references,
    print_table,
    relative_error,
    teacher_forced,
)

from novainfer import LLM
from novainfer.backend_api import AttentionContext, StepBatch
from novainfer.plugins import discover_backends, engine_plugin_manager, resolve_hook
from novainfer.scheduler import ScheduledSeq, SchedulerOutput
from novainfer.sequence import SamplingParams, Sequence

NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM = 12, 2, 128
MAX_MODEL_LEN, MAX_SEQS, MAX_TOKENS = 4096, 64, 4096
DEVICE = torch.device("cuda")


@dataclass(frozen=True)
class Step:
    """A step's inputs: the engine-built batch, random queries and new K/V, a cache with shuffled blocks."""

    batch: StepBatch
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    cache: torch.Tensor
    num_real_tokens: int  # rows past these are CUDA-graph padding


class Harness:
    """Engine-built batches (one runner per block size) and backends made through their entry points."""

    def __init__(self, options: dict[str, Any]) -> None:
        self.options = options
        self.registry = discover_backends()
        self.engines: dict[int, LLM] = {}
        self.made: dict[tuple, tuple[dict[str, Callable[..., Any]], float] | Exception] = {}

    def batch(self, seqs: list[tuple[int, int]], tables: list[list[int]], num_decodes: int, block_size: int,
              pad_to: int | None) -> StepBatch:
        if block_size not in self.engines:
            self.engines[block_size] = LLM(
                "random:qwen2-tiny", device="cuda", backend="native", backend_options=TORCH, block_size=block_size,
                max_model_len=MAX_MODEL_LEN, max_num_seqs=MAX_SEQS, max_num_batched_tokens=MAX_TOKENS,
                kv_cache_capacity=block_size,
            )
        entries = []
        for (cached, new), table in zip(seqs, tables):
            seq = Sequence([0] * (cached + new), SamplingParams())
            seq.num_computed_tokens = cached
            seq.block_table = table
            entries.append(ScheduledSeq(seq, new))
        return self.engines[block_size].runner.prepare(SchedulerOutput(entries, num_decodes), pad_to=pad_to)

    def hooks(self, name: str, block_size: int, dtype: torch.dtype) -> tuple[dict[str, Callable[..., Any]], float]:
        """The hook callables (write_kv falls back to the core's scatter) and the creation time, or raises."""
        options = TORCH if name == "native" else self.options
        key = (name, block_size, dtype)
        if key not in self.made:
            context = AttentionContext(
                NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, 1, block_size, 1 + MAX_SEQS * MAX_MODEL_LEN // block_size,
                MAX_SEQS, MAX_TOKENS, MAX_MODEL_LEN, -(-MAX_MODEL_LEN // block_size), dtype, DEVICE,
                options=dict(options),
            )
            t0 = time.perf_counter()
            try:
                pm = engine_plugin_manager(self.registry[name].spec.create(context))
                names = ("prepare_attention_metadata", "write_kv", "attention")
                self.made[key] = ({hook: resolve_hook(pm, hook) for hook in names}, time.perf_counter() - t0)
            except Exception as error:  # recorded, and reported for every case that needs this backend
                self.made[key] = error
        made = self.made[key]
        if isinstance(made, Exception):
            raise made
        return made


def block_tables(seqs: list[tuple[int, int]], block_size: int, gen: torch.Generator) -> tuple[list[list[int]], int]:
    """Each sequence's blocks, drawn from a shuffled pool (block 0 is the scratch block); and the block count."""
    counts = [-(-(cached + new) // block_size) for cached, new in seqs]
    pool = (torch.randperm(sum(counts), generator=gen) + 1).tolist()
    tables, start = [], 0
    for n in counts:
        tables.append(pool[start : start + n])
        start += n
    return tables, 1 + sum(counts)


def randn(gen: torch.Generator, dtype: torch.dtype, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)


def run_step(hooks: dict[str, Callable[..., Any]], step: Step, cache: torch.Tensor, dtype: torch.dtype
             ) -> torch.Tensor:
    """write_kv then attention for one layer, as the model calls them; returns a copy of the output."""
    metadata = hooks["prepare_attention_metadata"](batch=step.batch)
    hooks["write_kv"](layer_idx=0, key=step.key.to(dtype), value=step.value.to(dtype), kv_cache=cache,
                      slot_mapping=step.batch.slot_mapping, metadata=metadata)
    out = hooks["attention"](layer_idx=0, query=step.query.to(dtype), kv_cache=cache, metadata=metadata,
                             scale=HEAD_DIM**-0.5)
    return out.clone()


def attention_case(h: Harness, name: str, seqs: list[tuple[int, int]], num_decodes: int, block_size: int,
                   dtype: torch.dtype, pad_to: int | None, seed: int) -> Row:
    row = Row("attention", name)
    gen = torch.Generator().manual_seed(seed)
    tables, num_blocks = block_tables(seqs, block_size, gen)
    batch = h.batch(seqs, tables, num_decodes, block_size, pad_to)
    t = batch.num_tokens
    step = Step(batch, randn(gen, dtype, t, NUM_Q_HEADS, HEAD_DIM), randn(gen, dtype, t, NUM_KV_HEADS, HEAD_DIM),
                randn(gen, dtype, t, NUM_KV_HEADS, HEAD_DIM),
                randn(gen, dtype, 2, num_blocks, block_size, NUM_KV_HEADS, HEAD_DIM), sum(new for _, new in seqs))
    real = step.num_real_tokens
    reference, _ = h.hooks("native", block_size, torch.float32)
    expected = run_step(reference, step, step.cache.float(), torch.float32)[:real]
    native, _ = h.hooks("native", block_size, dtype)
    native_out = run_step(native, step, step.cache.clone(), dtype)[:real]
    flashattn, seconds = h.hooks("flashattn", block_size, dtype)
    out = run_step(flashattn, step, step.cache.clone(), dtype)[:real]
    torch.cuda.synchronize()
    row.max_abs = float((out.float() - expected).abs().max())
    row.rel = relative_error(out, expected)
    row.note = f"native {dtype} rel {relative_error(native_out, expected):.1e}; backend built in {seconds:.1f}s"
    row.ok = row.rel <= MAX_REL_ERROR and bool(out.isfinite().all())
    return row


def graph_replay_case(h: Harness, block_size: int) -> Row:
    """Capture write_kv + attention for a bucket of 8 on one batch, build the next step's metadata, replay."""
    row = Row("attention", "graph replay, bucket 8")
    first = [(cached, 1) for cached in (17, 300, 1, 64, 2000)]
    second = [(cached, 1) for cached in (1500, 16, 31, 700, 5, 3000, 129)]
    gen = torch.Generator().manual_seed(11)
    tables, num_blocks = block_tables(first + second, block_size, gen)
    dtype = torch.bfloat16
    cache = randn(gen, dtype, 2, num_blocks, block_size, NUM_KV_HEADS, HEAD_DIM)
    query = randn(gen, dtype, 8, NUM_Q_HEADS, HEAD_DIM)
    key, value = randn(gen, dtype, 8, NUM_KV_HEADS, HEAD_DIM), randn(gen, dtype, 8, NUM_KV_HEADS, HEAD_DIM)
    flashattn, _ = h.hooks("flashattn", block_size, dtype)
    batch = h.batch(first, tables[: len(first)], len(first), block_size, pad_to=8)
    slot_mapping = batch.slot_mapping  # the engine's step buffer: every batch of this bucket lands here

    def layer(metadata: Any) -> torch.Tensor:
        flashattn["write_kv"](layer_idx=0, key=key, value=value, kv_cache=cache, slot_mapping=slot_mapping,
                              metadata=metadata)
        return flashattn["attention"](layer_idx=0, query=query, kv_cache=cache, metadata=metadata,
                                      scale=HEAD_DIM**-0.5)

    metadata = flashattn["prepare_attention_metadata"](batch=batch)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            layer(metadata)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = layer(metadata)
    batch = h.batch(second, tables[len(first) :], len(second), block_size, pad_to=8)
    if batch.slot_mapping.data_ptr() != slot_mapping.data_ptr():
        raise RuntimeError("the engine's step buffers moved between two batches of one bucket")
    query.copy_(randn(gen, dtype, 8, NUM_Q_HEADS, HEAD_DIM))
    key.copy_(randn(gen, dtype, 8, NUM_KV_HEADS, HEAD_DIM))
    value.copy_(randn(gen, dtype, 8, NUM_KV_HEADS, HEAD_DIM))
    step = Step(batch, query.clone(), key.clone(), value.clone(), cache.clone(), num_real_tokens=len(second))
    reference, _ = h.hooks("native", block_size, torch.float32)
    expected = run_step(reference, step, step.cache.float(), torch.float32)[: len(second)]
    flashattn["prepare_attention_metadata"](batch=batch)  # outside the graph, as DecodeGraphs.run does
    graph.replay()
    torch.cuda.synchronize()
    got = out[: len(second)]
    row.max_abs = float((got.float() - expected).abs().max())
    row.rel = relative_error(got, expected)
    row.note = "captured on 5 decodes, replayed on 7 longer ones"
    row.ok = row.rel <= MAX_REL_ERROR
    return row


def attention_part(h: Harness, block_size: int, any_block_size: bool) -> list[Row]:
    decodes = [(int(n), 1) for n in torch.randint(1, 3000, (32,), generator=torch.Generator().manual_seed(1))]
    bf16, fp16 = torch.bfloat16, torch.float16
    cases = [
        ("decode-only", decodes, 32, block_size, bf16, None),
        ("prefill-only", [(0, 1), (0, 17), (0, 300), (0, 1000)], 0, block_size, bf16, None),
        # A one-token chunk after a long prefix is a prefill chunk too (a prompt's last chunk).
        ("prefill over cached prefix", [(500, 128), (33, 64), (1024, 1), (15, 200)], 0, block_size, bf16, None),
        ("mixed", [*decodes[:16], (0, 250), (700, 96), (64, 1)], 16, block_size, bf16, None),
        ("mixed, float16", [*decodes[:16], (0, 250), (700, 96)], 16, block_size, fp16, None),
        ("decode padded to bucket 8", decodes[:5], 5, block_size, bf16, 8),
    ]
    if any_block_size:
        cases.append(("mixed, block size 1", [*decodes[:6], (0, 40), (90, 33)], 6, 1, bf16, None))
    rows = []
    for seed, (name, seqs, num_decodes, bs, dtype, pad_to) in enumerate(cases):
        run = functools.partial(attention_case, h, name, seqs, num_decodes, bs, dtype, pad_to, seed)
        rows.append(guarded(Row("attention", name), run))
    replay = functools.partial(graph_replay_case, h, block_size)
    rows.append(guarded(Row("attention", "graph replay, bucket 8"), replay))
    return rows


def logits_part(options: dict[str, Any], block_size: int) -> list[Row]:
    """Both comparisons of gpu_check.logits_references, native and flashattn, eager and with graphs."""
    refs = logits_references(block_size)
    rows = []
    for backend, backend_options in (("native", {}), ("flashattn", options)):
        for graphs in (False, True):
            for kind in refs.models:
                row = Row("logits", f"{kind} {backend} {'graphs' if graphs else 'eager'}")
                engine = refs.engine(kind, backend, backend_options, graphs)
                rows.append(guarded(row, functools.partial(logits_row, row, refs, kind, engine)))
                torch.cuda.empty_cache()
    return rows


def logits_row(row: Row, refs: LogitsReferences, kind: str, engine: dict[str, Any]) -> Row:
    llm, before, after = teacher_forced(row, refs, kind, engine)
    moved = counters_moved(before, after)
    row.note += f"; counters {after}; moved while running: {moved or 'none'}"
    graphs_ok = not engine["cuda_graphs"] or engine["backend"] != "flashattn" or llm.graph_mode == "cuda_graphs"
    row.ok = row.rel <= refs.bars[kind] and not moved and graphs_ok
    return row


def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("parts", nargs="*", choices=["attention", "logits"], default=["attention", "logits"])
    parser.add_argument("--generation", choices=["auto", "4", "2"], default="auto")
    args = parser.parse_args()
    fa4, fa2 = package_version("flash-attn-4"), package_version("flash-attn")
    # auto runs flash-attn-4 where it can; flash-attn 2 needs blocks of a multiple of 256.
    uses_fa2 = args.generation == "2" or (args.generation == "auto" and (
        fa4 == "not installed" or torch.cuda.get_device_capability()[0] not in (9, 10, 11)))
    block_size = 256 if uses_fa2 else 16
    options = {"generation": args.generation}
    print(f"flash-attn-4 {fa4}, flash-attn {fa2}, torch {torch.__version__}, {torch.cuda.get_device_name()}; "
          f"generation {args.generation}, block size {block_size}", flush=True)
    rows = []
    if "attention" in args.parts:
        rows += attention_part(Harness(options), block_size, any_block_size=not uses_fa2)
    if "logits" in args.parts:
        rows += logits_part(options, block_size)
    print_table(rows)


if __name__ == "__main__":
    main()
