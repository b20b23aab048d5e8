"""The conformance kit (novainfer.testing.check_backend) on a CUDA GPU, for each backend named.

Every backend runs the kit's steps (prefill, decode, prefill over a cached prefix, mixed, one-token prompts) at
block sizes 16 and 1, eagerly and with decode steps replayed through CUDA graphs, against the core's float64
reference on the same weights and cache contents:

- at the attention shape of the headline (random deepseek-r1-distill-qwen-1.5b weights: 12 query / 2 KV heads of
  dim 128), float32 weights over a bfloat16 cache: what the sweep's gate compares;
- for backends that run float32 (native), also a float32 cache.

The kit holds each step to max(MIN_BAR of its dtype, 2 x the floor's error on that step), the floor being the
same step through PyTorch's SDPA in the cache's dtype: through 28 layers bfloat16 attention alone moves the
logits past the flat bar (1.5e-2 against 1e-2 on the H200). A block size a backend refuses is a row that says
so, not a failure; a refusal of the headline's block size 16 is. The last thing printed is the table; "worst /
allowed" is the worst step's error over what that step allowed (<= 1 passes).

    python bench/conformance_gpu.py native cudnn flashinfer [--cpu]

`--cpu` is the dry run: the tiny model, native only, on this machine.
"""

from __future__ import annotations

import argparse
import functools
import math
import time
import traceback
from dataclasses import dataclass

import torch

from novainfer.ab.trial.gate import worse
from novainfer.backend_api import BackendError
from novainfer.testing import check_backend

GPU_MODEL = "random:deepseek-r1-distill-qwen-1.5b"
CPU_MODEL = "random:qwen2-tiny-wide"
FLOAT32_BACKENDS = ("native",)


@dataclass
class Result:
    backend: str
    cache: str
    block_size: int
    graphs: bool
    steps: str = ""
    worst: float = math.nan
    floor: float = math.nan
    ratio: float = math.nan
    verdict: str = "FAIL"
    note: str = ""


def conformance(backend: str, cache: str, block_size: int, graphs: bool, model: str, device: str) -> Result:
    result = Result(backend, cache, block_size, graphs)
    try:
        report = check_backend(
            backend, block_sizes=(block_size,), model=model, device=device, dtype="float32", kv_cache_dtype=cache,
            cuda_graphs=graphs,
        )
    except BackendError as error:
        # A refused block size is the backend's declared limit; the headline's block size is not optional.
        result.verdict = "FAIL" if block_size == 16 else "refused"
        result.note = str(error).splitlines()[0][:100]
        return result
    except Exception as error:  # one failing case must not hide the others
        traceback.print_exc()
        result.note = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:100]
        return result
    # NaN is the worst of all (gate.worse): Python's max() would show a number past a NaN row.
    result.worst = functools.reduce(worse, (row.max_rel_err for row in report.rows))
    result.floor = functools.reduce(worse, (row.floor_rel_err for row in report.rows))
    result.ratio = functools.reduce(worse, (row.max_rel_err / report.allowed(row) for row in report.rows))
    failed = report.failures()
    result.steps = f"{len(report.rows) - len(failed)}/{len(report.rows)}"
    result.note = f"{sum(row.graphs for row in report.rows)} replayed in graphs" if graphs else ""
    result.note += f"; failed: {', '.join(row.step for row in failed)}" if failed else ""
    result.verdict = "FAIL" if failed else "PASS"
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("backends", nargs="*", default=["native"])
    parser.add_argument("--cpu", action="store_true", help="dry run: tiny model, native only, on the CPU")
    args = parser.parse_args()
    device, model = ("cpu", CPU_MODEL) if args.cpu else ("cuda", GPU_MODEL)
    where = "the CPU" if args.cpu else torch.cuda.get_device_name()
    print(f"conformance kit on {where}, torch {torch.__version__}, {model}", flush=True)
    results = []
    for backend in ["native"] if args.cpu else args.backends:
        for cache in ("bfloat16", "float32") if backend in FLOAT32_BACKENDS else ("bfloat16",):
            for block_size in (16, 1):
                for graphs in (False,) if args.cpu else (False, True):
                    started = time.perf_counter()
                    result = conformance(backend, cache, block_size, graphs, model, device)
                    results.append(result)
                    print(f"{backend} cache={cache} block={block_size} graphs={graphs}: {result.verdict} worst "
                          f"{result.worst:.2e} floor {result.floor:.2e} ({time.perf_counter() - started:.1f} s) "
                          f"{result.note}", flush=True)
    print("\n| backend | cache | block | graphs | steps passed | worst rel. err | floor's | worst / allowed | result "
          "| note |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r.backend} | {r.cache} | {r.block_size} | {'yes' if r.graphs else 'no'} | {r.steps} | "
              f"{r.worst:.2e} | {r.floor:.2e} | {r.ratio:.2f} | {r.verdict} | {r.note} |")
    verdicts = [r.verdict for r in results]
    print(f"{verdicts.count('PASS')} PASS, {verdicts.count('FAIL')} FAIL, {verdicts.count('refused')} refused")


if __name__ == "__main__":
    main()
