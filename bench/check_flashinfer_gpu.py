"""Check the flashinfer backend against native on a CUDA GPU (sm80+, flashinfer-python installed).

1. attention: one layer's write_kv + attention through the backend's hooks, on random paged inputs
   (12 query / 2 KV heads, head_dim 128, blocks handed out in shuffled order; steps laid out by the
   engine itself: gpu_check's attention cases): decode-only, prefill-only, prefill over a cached prefix,
   mixed, block sizes 16 and 1, bf16 and fp16, a decode step the engine padded to its CUDA-graph size, and a
   graph captured on one batch and replayed on another after re-planning. The reference is native with
   kernels="torch" in float32 on the same (upcast) inputs; native in the run's dtype is shown beside
   flashinfer for scale. The cache flashinfer wrote must be bitwise equal to the native scatter's.
2. logits: teacher-forced logits of the whole model (random deepseek-r1-distill-qwen-1.5b weights,
   chunked prefill so chunks attend to cached prefixes, 6 sequences so decode graphs pad), eager and
   with CUDA graphs: in bfloat16 against the CPU float32 engine (as bench/check_logits_gpu.py), and
   as the sweep's gate compares (float32 weights, attention over a bfloat16 cache, against native's
   PyTorch path); also checks that no backend counter (flashinfer compiles) moves after the engine
   is built.

Each case catches its own exception. The last thing printed is the table, PASS/FAIL per row
(relative error ||out - ref|| / ||ref|| <= 1e-2). `--cpu` is gpu_check's dry run of the attention part.

    python bench/check_flashinfer_gpu.py [attention] [logits] [--configs default,append-fa2,cuda-cores] [--cpu]

The first run JIT-compiles flashinfer's modules (minutes); run the parts separately if a command
has a time limit: the compiled modules are cached on disk for the next run.
"""

from __future__ import annotations

import argparse
import functools
from typing import Any

import torch
from gpu_check import (
    TORCH,
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

CONFIGS: dict[str, dict[str, Any]] = {
    # kv_write native, tensor cores (auto: 6 query heads per KV head), prefill auto (FA3 on sm90).
    "default": {},
    "append-fa2": {"kv_write": "append", "prefill_backend": "fa2"},
    # flashinfer's own plan() for every decode step, the reference for the default fast plan.
    "wrapper-plan": {"decode_plan": "wrapper"},
    # flashinfer 0.6's CUDA-core decode has no kernel for 6 query heads per KV head: expected to fail there.
    "cuda-cores": {"tensor_cores": False},
}


def attention_case(engines: Engines, case: Case, config: str, seed: int) -> Row:
    row = Row("attention", case.name, config)
    got, native = attention_row(row, engines, case, seed, "flashinfer", CONFIGS[config])
    # The step's blocks as each backend's write_kv left them (padding rows write the scratch block, not these).
    cache_equal = torch.equal(got.kv, native.kv)
    row.ok = row.ok and cache_equal
    row.note += f"; cache {'equal' if cache_equal else 'DIFFERS'}"
    return row


def attention_part(configs: list[str], device: str) -> list[Row]:
    decodes = [(int(n), 1) for n in torch.randint(1, 3000, (32,), generator=torch.Generator().manual_seed(1))]
    cases = [
        Case("decode-only", decodes, num_decodes=32),
        Case("prefill-only", [(0, 1), (0, 17), (0, 300), (0, 1000)], num_decodes=0),
        # A one-token chunk after a long prefix is a prefill chunk too (a prompt's last chunk).
        Case("prefill over cached prefix", [(500, 128), (33, 64), (1024, 1), (15, 200)], num_decodes=0),
        Case("mixed", [*decodes[:16], (0, 250), (700, 96), (64, 1)], num_decodes=16),
        Case("mixed, block size 1", [*decodes[:6], (0, 40), (90, 33)], num_decodes=6, block_size=1),
        Case("mixed, float16", [*decodes[:16], (0, 250), (700, 96)], num_decodes=16, dtype=torch.float16),
        Case("decode padded to bucket 8", decodes[:5], num_decodes=5, padded=True),
    ]
    engines = Engines(cases, device)
    rows = []
    for config in configs:
        for seed, case in enumerate(cases):
            if case.dtype != torch.bfloat16 and config != "default":
                continue  # one configuration is enough to check the other dtype; each costs JIT compiles
            run = functools.partial(attention_case, engines, case, config, seed)
            rows.append(guarded(Row("attention", case.name, config), run))
        row = Row("attention", "graph replay, bucket 8", config)
        rows.append(guarded(row, functools.partial(graph_replay_row, row, engines, "flashinfer", CONFIGS[config], 16)))
    return rows


def logits_part(configs: list[str]) -> list[Row]:
    """Both comparisons of gpu_check.logits_references per arm and graph mode."""
    arms = [("native", "kernels=torch", TORCH), ("native", "kernels=auto", {})]
    arms += [("flashinfer", config, CONFIGS[config]) for config in configs]
    return logits_rows(
        logits_references(),
        [Arm(f"{backend} {'graphs' if graphs else 'eager'}", label, backend, options, graphs)
         for backend, label, options in arms for graphs in (False, True)],
        steady("flashinfer"),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("parts", nargs="*", choices=["attention", "logits"], default=["attention", "logits"])
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, from {', '.join(CONFIGS)}")
    args = parse_args(parser)
    configs = args.configs.split(",")
    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown:
        parser.error(f"unknown config(s) {', '.join(unknown)}; known: {', '.join(CONFIGS)}")
    announce(args.cpu, lambda: f"flashinfer-python {package_version('flashinfer-python')}")
    rows = []
    if "attention" in args.parts:
        rows += attention_part(configs, args.device)
    if "logits" in args.parts:
        rows += logits_part(configs)
    print_table(rows)


if __name__ == "__main__":
    main()
