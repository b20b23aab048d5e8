"""Check the cudnn backend on a CUDA GPU (SM80+; nvidia-cudnn-frontend and novainfer-plugin-cudnn installed).

1. attention: one layer's attention through the backend's hooks on random paged inputs (12 query / 2 KV heads,
   head_dim 128, blocks handed out in shuffled order, steps laid out by the engine itself: gpu_check's attention
   cases): decodes (a bucket, a count staged up to one, a step the engine padded to its CUDA-graph size),
   prefill chunks with and without a cached prefix, mixed steps, 64 chunks at once, float16, block size 64.
   The reference is native kernels="torch" in float32 on the same upcast inputs; native in the run's dtype is
   shown beside for scale. Two more: a decode graph captured in a CUDA graph on one batch and replayed on
   another after prepare_attention_metadata refilled the buffers, and a prefill graph with padded entries
   writing into the core's output buffer with its rows past the step poisoned (they must stay).
2. logits: teacher-forced logits of the whole model (random deepseek-r1-distill-qwen-1.5b weights,
   chunked prefill over cached prefixes, 6 sequences so decode steps pad to bucket 8): native, cudnn
   eager and with CUDA graphs, and the lazy arm, each in bfloat16 against the CPU float32 engine and
   as the sweep's gate compares (gpu_check's logits references). With prebuild="all" no graph may be built
   while the model runs.
3. start: an engine with the cudnn backend at the headline limits (max_num_seqs 256, max_num_batched_tokens
   16384, max_model_len 4096, block 16, the 1.5B model): graphs built, seconds.

Each case catches its own exception. The last thing printed is the table, PASS/FAIL per row (relative
error ||out - ref|| / ||ref|| <= 1e-2). `--cpu` is gpu_check's dry run of the attention part.

    python bench/check_cudnn_gpu.py [attention] [logits] [start] [--cpu]
"""

from __future__ import annotations

import argparse
import functools
import gc
import math
import time
from typing import Any

import torch
from gpu_check import (
    ATTENTION_PRESET,
    MAX_REL_ERROR,
    TORCH,
    Arm,
    Case,
    Engines,
    Row,
    announce,
    attention_row,
    case_steps,
    draw,
    graph_replay_row,
    guarded,
    logits_references,
    logits_rows,
    measure,
    package_version,
    parse_args,
    print_table,
)

from novainfer import LLM
from novainfer.models.qwen2 import build_model
from novainfer.testing import attend, attention_output

HEADLINE = dict(max_num_seqs=256, max_num_batched_tokens=16384, max_model_len=4096, block_size=16)
LAZY, ALL = {"prebuild": "lazy"}, {"prebuild": "all"}


def plan(metadata: Any) -> str:
    """The graphs a cudnn step plan runs (native's metadata, in the dry run, has none)."""
    if not hasattr(metadata, "stages_decodes"):
        return "no cuDNN plan (dry run)"
    return f"{metadata.decode} staged={metadata.stages_decodes} {metadata.prefill}"


def attention_case(engines: Engines, case: Case, seed: int) -> Row:
    row = Row("attention", case.name)
    got, _ = attention_row(row, engines, case, seed, "cudnn", LAZY, write_kv=False)
    row.note = f"{plan(got.metadata)}; {row.note}"
    return row


def graph_replay_case(engines: Engines) -> Row:
    """The decode graph of bucket 8 captured on 5 decodes, refilled for 7 others, replayed: no graph built."""
    row = Row("attention", "CUDA graph: capture, refill, replay")
    backend, _ = engines.get("cudnn", ALL, 16, torch.bfloat16)
    before = backend.backend_counters().get("graph_builds", 0)
    graph_replay_row(row, engines, "cudnn", ALL, 16, write_kv=False, seed=21)
    builds = backend.backend_counters().get("graph_builds", 0) - before
    row.ok = row.ok and builds == 0
    row.note += f"; graphs built meanwhile: {builds}"
    return row


def padded_prefill_case(engines: Engines) -> Row:
    """A prefill graph of 4 over 3 chunks, its queries' rows past the step NaN, writing into the core's output
    buffer whose rows past the step are poisoned."""
    row = Row("attention", "padded entries write nothing")
    case = Case("padded", [(500, 128), (33, 64), (15, 200)], num_decodes=0)
    backend, _ = engines.get("cudnn", ALL, 16, torch.bfloat16)
    reference, _ = engines.get("native", TORCH, 16, torch.float32)
    gen = torch.Generator().manual_seed(22)
    tokens, spare = case.num_real_tokens, 256
    with case_steps([backend, reference], case, gen, seed=22) as (step, reference_step):
        query = draw(gen, backend, tokens + spare)[0]
        query[tokens:] = math.nan
        poisoned = attention_output(backend, tokens + spare)
        poisoned.fill_(7.0)
        got = attend(backend, step, query[:tokens])
        untouched = bool((poisoned[tokens:] == 7.0).all())
        want = attend(reference, reference_step, query[:tokens].float())
    measure(row, got.output, want.output)
    row.ok = row.rel <= MAX_REL_ERROR and untouched
    prefill = getattr(got.metadata, "prefill", "no cuDNN plan (dry run)")
    row.note = f"{prefill} over 3 chunks; rows past the step {'untouched' if untouched else 'WRITTEN'}"
    return row


def attention_part(device: str) -> list[Row]:
    gen = torch.Generator().manual_seed(1)
    decodes = [(int(n), 1) for n in torch.randint(1, 3000, (32,), generator=gen)]
    chunks = [(int(c), int(n)) for c, n in zip(torch.randint(0, 2000, (64,), generator=gen),
                                               torch.randint(2, 60, (64,), generator=gen))]
    cases = [
        Case("decode, 32 (a bucket)", decodes, num_decodes=32),
        Case("decode, 13 (staged to 16)", decodes[:13], num_decodes=13),
        Case("decode, 5 padded to 8", decodes[:5], num_decodes=5, padded=True),
        Case("prefill only", [(0, 17), (0, 300), (0, 1000), (0, 2)], num_decodes=0),
        Case("prefill over cached prefix", [(500, 128), (33, 64), (15, 200)], num_decodes=0),
        Case("mixed", [*decodes[:16], (0, 250), (700, 96)], num_decodes=16),
        Case("mixed, decodes staged", [*decodes[:5], (64, 33), (2000, 7)], num_decodes=5),
        Case("64 chunks over prefixes", chunks, num_decodes=0),
        Case("mixed, float16", [*decodes[:16], (0, 250), (700, 96)], num_decodes=16, dtype=torch.float16),
        Case("mixed, block size 64", [*decodes[:8], (0, 250), (700, 96)], num_decodes=8, block_size=64),
    ]
    engines = Engines(cases, device)
    rows = [guarded(Row("attention", case.name), functools.partial(attention_case, engines, case, seed))
            for seed, case in enumerate(cases)]
    rows.append(guarded(Row("attention", "CUDA graph: capture, refill, replay"), lambda: graph_replay_case(engines)))
    rows.append(guarded(Row("attention", "padded entries write nothing"), lambda: padded_prefill_case(engines)))
    return rows


def builds_nothing(row: Row, arm: Arm, llm: LLM, before: dict[str, int], after: dict[str, int]) -> bool:
    """No graph is built while the model runs, but by the lazy arm: building as it runs is what it is for."""
    during = {k: v - before.get(k, 0) for k, v in after.items()}
    row.note += f"; at start {before}; while running {during}"
    return during.get("graph_builds", 0) == 0 or arm.options.get("prebuild") == "lazy"


def logits_part() -> list[Row]:
    """Both comparisons of gpu_check.logits_references per arm, as bench/check_flashinfer_gpu.py makes them."""
    arms = [
        Arm(f"{backend} {options or ''} {'graphs' if graphs else 'eager'}", "", backend, options, graphs)
        for backend, options, graphs in (
            ("native", {}, False), ("native", {}, True),
            ("cudnn", {}, False), ("cudnn", {}, True), ("cudnn", LAZY, False),
        )
    ]
    return logits_rows(logits_references(), arms, builds_nothing)


def start_part() -> list[Row]:
    model = build_model(f"random:{ATTENTION_PRESET}", 0, torch.bfloat16, torch.device("cuda"),
                        HEADLINE["max_model_len"])
    rows = []
    for policy in ("all", "lazy"):
        rows.append(guarded(Row("start", f"headline limits, prebuild={policy}"), lambda p=policy: start_row(p, model)))
        gc.collect()  # the engine's cache (the headline's, ~29 GiB) goes before the next one is made
        torch.cuda.empty_cache()
    return rows


def start_row(policy: str, model: torch.nn.Module) -> Row:
    from novainfer_cudnn.buckets import GraphKeys, Limits  # the plugin's key set (no cuDNN imported)

    row = Row("start", f"headline limits, prebuild={policy}")
    keys = len(GraphKeys.for_limits(Limits(**HEADLINE)).all())
    started = time.perf_counter()
    # The KV cache a served engine at these limits holds: the graphs are built over it.
    llm = LLM(
        f"random:{ATTENTION_PRESET}", device="cuda", dtype="bfloat16", shared_model=model, backend="cudnn",
        backend_options={"prebuild": policy}, kv_cache_capacity=HEADLINE["max_num_seqs"] * HEADLINE["max_model_len"],
        warm_up=False, **HEADLINE,
    )
    seconds = time.perf_counter() - started
    counters = llm.backend_counters()
    row.ok = counters["graph_builds"] == (keys if policy == "all" else 0)
    row.note = (f"{counters['graph_builds']} of {keys} graphs built in {seconds:.1f} s (engine start; cuDNN builds "
                f"{counters['graph_build_ms'] / 1000:.1f} s); counters {counters}")
    return row


def versions() -> str:
    import cudnn

    return (f"nvidia-cudnn-frontend {package_version('nvidia-cudnn-frontend')}, cuDNN backend "
            f"{cudnn.backend_version()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parts = ["attention", "logits", "start"]
    parser.add_argument("parts", nargs="*", choices=parts, default=parts)
    args = parse_args(parser)
    announce(args.cpu, versions)
    rows = []
    if "attention" in args.parts:
        rows += attention_part(args.device)
    if "logits" in args.parts:
        rows += logits_part()
    if "start" in args.parts:
        rows += start_part()
    print_table(rows)


if __name__ == "__main__":
    main()
