"""Check the flashattn backend against native on a CUDA GPU (flash-attn-4 on sm90/sm100, or flash-attn 2).

1. attention: one layer's write_kv + attention through the backend's hooks, on random paged inputs
   (12 query / 2 KV heads, head_dim 128, blocks handed out in shuffled order; steps laid out by the
   engine itself: gpu_check's attention cases): decode-only, prefill-only, prefill over a cached prefix,
   mixed, block size 1 (flash-attn-4 only), float16, a decode step the engine padded to its CUDA-graph size,
   and a graph captured on one batch and replayed on another after new metadata. The reference is native
   with kernels="torch" in float32 on the same (upcast) inputs.
2. logits: teacher-forced logits of the whole model (random deepseek-r1-distill-qwen-1.5b weights,
   chunked prefill so chunks attend to cached prefixes, 6 sequences so decode graphs pad), eager and
   with CUDA graphs: "gate" (float32 weights, attention over a bfloat16 cache, against native's
   PyTorch path: bar 1e-2) and "bf16" (the model in bfloat16 against the CPU float32 engine: bar
   1e-2 or 1.25 x native's PyTorch path in bfloat16, whichever is larger). No backend counter
   (flash-attn-4 kernels compiled) may move after the engine is built.

Each case catches its own exception; the table comes last, PASS/FAIL per row. `--cpu` is gpu_check's dry run
of the attention part.

    python bench/check_flashattn_gpu.py [attention] [logits] [--generation auto|4|2] [--cpu]

flash-attn 2 pages only in blocks of a multiple of 256, so its run uses block size 256. flash-attn-4
compiles its kernels when a backend is created (seconds each); FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1
keeps them on disk for the next run.
"""

from __future__ import annotations

import argparse
import functools
from typing import Any

import torch
from gpu_check import (
    Arm,
    Case,
    Engines,
    Row,
    announce,
    attention_row,
    graph_replay_row,
    guarded,
    logits_references,
    logits_rows,
    package_version,
    parse_args,
    print_table,
    steady,
)


def attention_case(engines: Engines, case: Case, options: dict[str, Any], seed: int) -> Row:
    row = Row("attention", case.name)
    attention_row(row, engines, case, seed, "flashattn", options)
    return row


def attention_part(options: dict[str, Any], block_size: int, any_block_size: bool, device: str) -> list[Row]:
    decodes = [(int(n), 1) for n in torch.randint(1, 3000, (32,), generator=torch.Generator().manual_seed(1))]
    cases = [
        Case("decode-only", decodes, 32, block_size),
        Case("prefill-only", [(0, 1), (0, 17), (0, 300), (0, 1000)], 0, block_size),
        # A one-token chunk after a long prefix is a prefill chunk too (a prompt's last chunk).
        Case("prefill over cached prefix", [(500, 128), (33, 64), (1024, 1), (15, 200)], 0, block_size),
        Case("mixed", [*decodes[:16], (0, 250), (700, 96), (64, 1)], 16, block_size),
        Case("mixed, float16", [*decodes[:16], (0, 250), (700, 96)], 16, block_size, dtype=torch.float16),
        Case("decode padded to bucket 8", decodes[:5], 5, block_size, padded=True),
    ]
    if any_block_size:
        cases.append(Case("mixed, block size 1", [*decodes[:6], (0, 40), (90, 33)], 6, block_size=1))
    engines = Engines(cases, device)
    rows = [guarded(Row("attention", case.name), functools.partial(attention_case, engines, case, options, seed))
            for seed, case in enumerate(cases)]
    row = Row("attention", "graph replay, bucket 8")
    rows.append(guarded(row, functools.partial(graph_replay_row, row, engines, "flashattn", options, block_size)))
    return rows


def logits_part(options: dict[str, Any], block_size: int) -> list[Row]:
    """Both comparisons of gpu_check.logits_references, native and flashattn, eager and with graphs."""
    return logits_rows(
        logits_references(block_size),
        [Arm(f"{backend} {'graphs' if graphs else 'eager'}", "", backend, backend_options, graphs)
         for backend, backend_options in (("native", {}), ("flashattn", options)) for graphs in (False, True)],
        steady("flashattn"),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("parts", nargs="*", choices=["attention", "logits"], default=["attention", "logits"])
    parser.add_argument("--generation", choices=["auto", "4", "2"], default="auto")
    args = parse_args(parser)
    fa4, fa2 = package_version("flash-attn-4"), package_version("flash-attn")
    # auto runs flash-attn-4 where it can; flash-attn 2 needs blocks of a multiple of 256.
    uses_fa2 = not args.cpu and (args.generation == "2" or (args.generation == "auto" and (
        fa4 == "not installed" or torch.cuda.get_device_capability()[0] not in (9, 10, 11))))
    block_size = 256 if uses_fa2 else 16
    options = {"generation": args.generation}
    announce(args.cpu, lambda: f"flash-attn-4 {fa4}, flash-attn {fa2}; generation {args.generation}, block size "
             f"{block_size}")
    rows = []
    if "attention" in args.parts:
        rows += attention_part(options, block_size, not uses_fa2, args.device)
    if "logits" in args.parts:
        rows += logits_part(options, block_size)
    print_table(rows)


if __name__ == "__main__":
    main()
