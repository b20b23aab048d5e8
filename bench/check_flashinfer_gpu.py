"""Check the flashinfer backend against native on a CUDA GPU (sm80+, flashinfer-python installed).

1. attention: one step's write_kv + attention through the backend hooks, on random paged inputs
   (12 query / 2 KV heads, head_dim 128, blocks handed out in shuffled order; batches built by the
   engine's own ModelRunner.prepare): decode-only, prefill-only, prefill over a cached prefix, mixed,
   block sizes 16 and 1, bf16 and fp16, a decode batch padded to a CUDA-graph bucket, and a graph
   captured on one batch and replayed on another after re-planning. The reference is native with
   kernels="torch" in float32 on the same (upcast) inputs; native in the run's dtype is shown beside
   flashinfer for scale. The cache each backend wrote must be bitwise equal to the native scatter's.
2. logits: teacher-forced logits of the whole model (random deepseek-r1-distill-qwen-1.5b weights,
   chunked prefill so chunks attend to cached prefixes, 6 sequences so decode graphs pad), eager and
   with CUDA graphs: in bfloat16 against the CPU float32 engine (as bench/check_logits_gpu.py), and
   as the sweep's gate compares (float32 weights, attention over a bfloat16 cache, against native's
   PyTorch path); also checks that no backend counter (flashinfer compiles) moves after the engine
   is built.

Each case catches its own exception. The last thing printed is the table, PASS/FAIL per row
(relative error ||out - ref|| / ||ref|| <= 1e-2).

    python bench/check_flashinfer_gpu.py [attention] [logits] [--configs default,append-fa2,cuda-cores]

The first run JIT-compiles flashinfer's modules (minutes); run the parts separately if a command
has a time limit: the compiled modules are cached on disk for the next run.
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
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
CONFIGS: dict[str, dict[str, Any]] = {
    # kv_write native, tensor cores (auto: 6 query heads per KV head), prefill auto (FA3 on sm90).
    "default": {},
    "append-fa2": {"kv_write": "append", "prefill_backend": "fa2"},
    # flashinfer's own plan() for every decode step, the reference for the default fast plan.
    "wrapper-plan": {"decode_plan": "wrapper"},
    # flashinfer 0.6's CUDA-core decode has no kernel for 6 query heads per KV head: expected to fail there.
    "cuda-cores": {"tensor_cores": False},
}


@dataclass(frozen=True)
class Case:
    """One step: (cached tokens, new tokens) per sequence; the first num_decodes are decodes (one new token)."""

    name: str
    seqs: list[tuple[int, int]]
    num_decodes: int
    block_size: int = 16
    dtype: torch.dtype = torch.bfloat16
    pad_to: int | None = None  # a decode batch padded to this CUDA-graph bucket


@dataclass
class Step:
    """A step's inputs: the engine-built batch, random queries and new K/V, a cache with shuffled blocks."""

    batch: StepBatch
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    cache: torch.Tensor
    num_real_tokens: int  # rows past these are CUDA-graph padding


class Batches:
    """StepBatches from the engine's ModelRunner.prepare, laid out exactly as in a run (one runner per block size)."""

    def __init__(self) -> None:
        self.engines: dict[int, LLM] = {}

    def runner_for(self, block_size: int) -> LLM:
        if block_size not in self.engines:
            self.engines[block_size] = LLM(
                "random:qwen2-tiny", device="cuda", backend="native", backend_options={"kernels": "torch"},
                block_size=block_size, max_model_len=MAX_MODEL_LEN, max_num_seqs=MAX_SEQS,
                max_num_batched_tokens=MAX_TOKENS, kv_cache_capacity=block_size,
            )
        return self.engines[block_size]

    def batch(
        self, seqs: list[tuple[int, int]], tables: list[list[int]], num_decodes: int, block_size: int,
        pad_to: int | None,
    ) -> StepBatch:
        entries = []
        for (cached, new), table in zip(seqs, tables):
            seq = Sequence([0] * (cached + new), SamplingParams())
            seq.num_computed_tokens = cached
            seq.block_table = table
            entries.append(ScheduledSeq(seq, new))
        return self.runner_for(block_size).runner.prepare(SchedulerOutput(entries, num_decodes), pad_to=pad_to)


def block_tables(seqs: list[tuple[int, int]], block_size: int, gen: torch.Generator) -> tuple[list[list[int]], int]:
    """Each sequence's blocks, drawn from a shuffled pool (block 0 is the scratch block); and the block count."""
    counts = [-(-(cached + new) // block_size) for cached, new in seqs]
    pool = (torch.randperm(sum(counts), generator=gen) + 1).tolist()
    tables, start = [], 0
    for n in counts:
        tables.append(pool[start : start + n])
        start += n
    return tables, 1 + sum(counts)


def make_step(batches: Batches, seqs: list[tuple[int, int]], num_decodes: int, block_size: int,
              dtype: torch.dtype, pad_to: int | None, seed: int) -> Step:
    gen = torch.Generator().manual_seed(seed)
    tables, num_blocks = block_tables(seqs, block_size, gen)
    batch = batches.batch(seqs, tables, num_decodes, block_size, pad_to)
    tokens = batch.num_tokens

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)

    return Step(
        batch=batch, query=randn(tokens, NUM_Q_HEADS, HEAD_DIM), key=randn(tokens, NUM_KV_HEADS, HEAD_DIM),
        value=randn(tokens, NUM_KV_HEADS, HEAD_DIM), cache=randn(2, num_blocks, block_size, NUM_KV_HEADS, HEAD_DIM),
        num_real_tokens=sum(new for _, new in seqs),
    )


class Backends:
    """Backends created through their plugins' entry points, once per (name, options, block size, dtype)."""

    def __init__(self) -> None:
        self.made: dict[tuple, tuple[dict[str, Callable[..., Any]], float] | Exception] = {}
        self.registry = discover_backends()

    def hooks(self, name: str, options: dict[str, Any], block_size: int, dtype: torch.dtype
              ) -> tuple[dict[str, Callable[..., Any]], float]:
        """The hook callables (write_kv falls back to the core's scatter) and the creation time, or raises."""
        key = (name, tuple(sorted(options.items())), block_size, dtype)
        if key not in self.made:
            context = AttentionContext(
                num_q_heads=NUM_Q_HEADS, num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM, num_layers=1,
                block_size=block_size, num_blocks=1 + MAX_SEQS * MAX_MODEL_LEN // block_size, max_num_seqs=MAX_SEQS,
                max_num_batched_tokens=MAX_TOKENS, max_model_len=MAX_MODEL_LEN,
                max_blocks_per_seq=-(-MAX_MODEL_LEN // block_size), dtype=dtype, device=DEVICE, options=dict(options),
            )
            t0 = time.perf_counter()
            try:
                pm = engine_plugin_manager(self.registry[name].spec.create(context))
                names = ("prepare_attention_metadata", "write_kv", "attention")
                hooks = {hook: resolve_hook(pm, hook) for hook in names}
                self.made[key] = (hooks, time.perf_counter() - t0)
            except Exception as error:  # recorded, and reported for every case that needs this backend
                self.made[key] = error
        made = self.made[key]
        if isinstance(made, Exception):
            raise made
        return made


def run_step(hooks: dict[str, Callable[..., Any]], step: Step, cache: torch.Tensor, dtype: torch.dtype
             ) -> torch.Tensor:
    """write_kv then attention for one layer, as the model calls them; returns a copy of the output."""
    metadata = hooks["prepare_attention_metadata"](batch=step.batch)
    hooks["write_kv"](
        layer_idx=0, key=step.key.to(dtype), value=step.value.to(dtype), kv_cache=cache,
        slot_mapping=step.batch.slot_mapping, metadata=metadata,
    )
    out = hooks["attention"](
        layer_idx=0, query=step.query.to(dtype), kv_cache=cache, metadata=metadata, scale=HEAD_DIM**-0.5
    )
    return out.clone()  # flashinfer returns a view of a buffer its next call overwrites


def attention_case(backends: Backends, batches: Batches, case: Case, config: str, seed: int) -> Row:
    row = Row("attention", case.name, config)
    step = make_step(batches, case.seqs, case.num_decodes, case.block_size, case.dtype, case.pad_to, seed)
    real = step.num_real_tokens
    reference, _ = backends.hooks("native", {"kernels": "torch"}, case.block_size, torch.float32)
    ref_cache = step.cache.float()
    expected = run_step(reference, step, ref_cache, torch.float32)[:real]
    native, _ = backends.hooks("native", {"kernels": "torch"}, case.block_size, case.dtype)
    native_cache = step.cache.clone()
    native_out = run_step(native, step, native_cache, case.dtype)[:real]
    flashinfer, seconds = backends.hooks("flashinfer", CONFIGS[config], case.block_size, case.dtype)
    cache = step.cache.clone()
    out = run_step(flashinfer, step, cache, case.dtype)[:real]
    torch.cuda.synchronize()
    # Block 0 is the scratch block: padding rows all write its slot 0, in no defined order.
    cache_equal = torch.equal(cache[:, 1:], native_cache[:, 1:])
    row.max_abs = float((out.float() - expected).abs().max())
    row.rel = relative_error(out, expected)
    row.note = (f"native {case.dtype} rel {relative_error(native_out, expected):.1e}; cache "
                f"{'equal' if cache_equal else 'DIFFERS'}; backend built in {seconds:.1f}s")
    row.ok = row.rel <= MAX_REL_ERROR and cache_equal and bool(out.isfinite().all())
    return row


def graph_replay_case(backends: Backends, batches: Batches, config: str) -> Row:
    """Capture write_kv + attention for a bucket of 8 on one batch, re-plan for another, replay, compare."""
    row = Row("attention", "graph replay, bucket 8", config)
    first = [(cached, 1) for cached in (17, 300, 1, 64, 2000)]
    second = [(cached, 1) for cached in (1500, 16, 31, 700, 5, 3000, 129)]
    # Both batches' blocks come from one cache: draw tables for the two together, then split them.
    gen = torch.Generator().manual_seed(11)
    tables, num_blocks = block_tables(first + second, 16, gen)
    dtype = torch.bfloat16

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)

    cache = randn(2, num_blocks, 16, NUM_KV_HEADS, HEAD_DIM)
    query = randn(8, NUM_Q_HEADS, HEAD_DIM)
    key, value = randn(8, NUM_KV_HEADS, HEAD_DIM), randn(8, NUM_KV_HEADS, HEAD_DIM)
    flashinfer, _ = backends.hooks("flashinfer", CONFIGS[config], 16, dtype)
    batch = batches.batch(first, tables[: len(first)], len(first), 16, pad_to=8)
    # The engine's step buffers: every batch of this bucket has its slot mapping here.
    slot_mapping = batch.slot_mapping

    def layer(metadata: Any) -> torch.Tensor:
        flashinfer["write_kv"](layer_idx=0, key=key, value=value, kv_cache=cache, slot_mapping=slot_mapping,
                               metadata=metadata)
        return flashinfer["attention"](layer_idx=0, query=query, kv_cache=cache, metadata=metadata,
                                       scale=HEAD_DIM**-0.5)

    metadata = flashinfer["prepare_attention_metadata"](batch=batch)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            layer(metadata)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = layer(metadata)
    # The second batch lands in the same step buffers (same bucket), as in the engine.
    batch = batches.batch(second, tables[len(first) :], len(second), 16, pad_to=8)
    if batch.slot_mapping.data_ptr() != slot_mapping.data_ptr():
        raise RuntimeError("the engine's step buffers moved between two batches of one bucket")
    query.copy_(randn(8, NUM_Q_HEADS, HEAD_DIM))
    key.copy_(randn(8, NUM_KV_HEADS, HEAD_DIM))
    value.copy_(randn(8, NUM_KV_HEADS, HEAD_DIM))
    step = Step(batch, query.clone(), key.clone(), value.clone(), cache.clone(), num_real_tokens=len(second))
    reference, _ = backends.hooks("native", {"kernels": "torch"}, 16, torch.float32)
    expected = run_step(reference, step, step.cache.float(), torch.float32)[: len(second)]
    flashinfer["prepare_attention_metadata"](batch=batch)  # re-plan outside the graph, as DecodeGraphs.run does
    graph.replay()
    torch.cuda.synchronize()
    got = out[: len(second)]
    row.max_abs = float((got.float() - expected).abs().max())
    row.rel = relative_error(got, expected)
    row.note = "captured on 5 decodes, replayed on 7 longer ones"
    row.ok = row.rel <= MAX_REL_ERROR
    return row


def attention_part(configs: list[str]) -> list[Row]:
    decodes = [(int(n), 1) for n in torch.randint(1, 3000, (32,), generator=torch.Generator().manual_seed(1))]
    cases = [
        Case("decode-only", decodes, num_decodes=32),
        Case("prefill-only", [(0, 1), (0, 17), (0, 300), (0, 1000)], num_decodes=0),
        # A one-token chunk after a long prefix is a prefill chunk too (a prompt's last chunk).
        Case("prefill over cached prefix", [(500, 128), (33, 64), (1024, 1), (15, 200)], num_decodes=0),
        Case("mixed", [*decodes[:16], (0, 250), (700, 96), (64, 1)], num_decodes=16),
        Case("mixed, block size 1", [*decodes[:6], (0, 40), (90, 33)], num_decodes=6, block_size=1),
        Case("mixed, float16", [*decodes[:16], (0, 250), (700, 96)], num_decodes=16, dtype=torch.float16),
        Case("decode padded to bucket 8", decodes[:5], num_decodes=5, pad_to=8),
    ]
    batches, backends = Batches(), Backends()
    rows = []
    for config in configs:
        for seed, case in enumerate(cases):
            if case.dtype != torch.bfloat16 and config != "default":
                continue  # one configuration is enough to check the other dtype; each costs JIT compiles
            run = functools.partial(attention_case, backends, batches, case, config, seed)
            rows.append(guarded(Row("attention", case.name, config), run))
        run = functools.partial(graph_replay_case, backends, batches, config)
        rows.append(guarded(Row("attention", "graph replay, bucket 8", config), run))
    return rows


def logits_part(configs: list[str]) -> list[Row]:
    """Both comparisons of gpu_check.logits_references per arm and graph mode."""
    refs = logits_references()
    arms = [("native", "kernels=torch", TORCH), ("native", "kernels=auto", {})]
    arms += [("flashinfer", config, CONFIGS[config]) for config in configs]
    rows = []
    for backend, label, options in arms:
        for graphs in (False, True):
            for kind in refs.models:
                row = Row("logits", f"{kind} {backend} {'graphs' if graphs else 'eager'}", label)
                engine = refs.engine(kind, backend, options, graphs)
                rows.append(guarded(row, functools.partial(logits_row, row, refs, kind, engine)))
                torch.cuda.empty_cache()
    return rows


def logits_row(row: Row, refs: LogitsReferences, kind: str, engine: dict[str, Any]) -> Row:
    llm, before, after = teacher_forced(row, refs, kind, engine)
    moved = counters_moved(before, after)
    row.note += f"; counters {after}; moved while running: {moved or 'none'}"
    # flashinfer must really run in graphs when asked (native's PyTorch path runs eagerly, as context).
    graphs_ok = not engine["cuda_graphs"] or engine["backend"] != "flashinfer" or llm.graph_mode == "cuda_graphs"
    row.ok = row.rel <= refs.bars[kind] and not moved and graphs_ok
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("parts", nargs="*", choices=["attention", "logits"], default=["attention", "logits"])
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, from {', '.join(CONFIGS)}")
    args = parser.parse_args()
    configs = args.configs.split(",")
    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown:
        parser.error(f"unknown config(s) {', '.join(unknown)}; known: {', '.join(CONFIGS)}")
    print(f"flashinfer-python {version('flashinfer-python')}, torch {torch.__version__}, "
          f"{torch.cuda.get_device_name()}", flush=True)
    rows = []
    if "attention" in args.parts:
        rows += attention_part(configs)
    if "logits" in args.parts:
        rows += logits_part(configs)
    print_table(rows)


if __name__ == "__main__":
    main()
