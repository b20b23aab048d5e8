"""The persistent batch, asynchronous scheduling and prefix caching on CUDA: the same tokens and logits as the
synchronous engine and as an engine that recomputes every prefix, with CUDA graphs.

On one random-weight model (float32 weights and cache, so a rounding difference cannot pass for a bug), a
workload that chunks, mixes, preempts and shares prompt prefixes runs through engines that differ in one setting
each. Prints, last, a table: each engine's greedy tokens against the synchronous eager one (equal or not), and
teacher-forced logits against it (worst relative error per row), plus what each engine did (graph mode, steps
advanced on the device, prefix hits). Then a timed headline-shaped decode: host work per step, async off/on.

    python bench/engine_async_gpu.py [preset]
"""

from __future__ import annotations

import random
import statistics
import sys

import torch

from novainfer import LLM, SamplingParams
from novainfer.testing import relative_errors

PRESET = sys.argv[1] if len(sys.argv) > 1 else "qwen2-0.5b"
# 48 blocks hold about four of the longest requests, so sixteen at once preempt (36 times on the CPU at qwen2-0.5b).
BASE = dict(device="cuda", dtype="float32", max_model_len=512, max_num_seqs=16, max_num_batched_tokens=96,
            kv_cache_capacity=16 * 48, block_size=16)
ENGINES = {
    "sync eager (baseline)": dict(async_scheduling=False),
    "async eager": dict(async_scheduling=True),
    "sync graphs": dict(async_scheduling=False, cuda_graphs=True),
    "async graphs": dict(async_scheduling=True, cuda_graphs=True),
    "async graphs prefix-cache": dict(async_scheduling=True, cuda_graphs=True, enable_prefix_caching=True),
}


def workload() -> tuple[list[list[int]], list[int], list[list[int]]]:
    rng = random.Random(0)
    heads = [[rng.randrange(1000, 20000) for _ in range(64)] for _ in range(4)]
    prompts = [heads[i % 4] + [rng.randrange(1000, 20000) for _ in range(rng.randint(1, 80))] for i in range(40)]
    outputs = [rng.randint(1, 60) for _ in prompts]
    continuations = [[rng.randrange(1000, 20000) for _ in range(rng.randint(1, 30))] for _ in prompts]
    return prompts, outputs, continuations


def main() -> None:
    prompts, outputs, continuations = workload()
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in outputs]
    rows = []
    baseline_tokens = baseline_logits = None
    shared = None
    for name, settings in ENGINES.items():
        llm = LLM(f"random:{PRESET}", shared_model=shared, **BASE, **settings)
        shared = llm.model
        tokens = [o.token_ids for o in llm.generate(prompts, params)]
        logits = llm.teacher_forced_logits(prompts, continuations)
        if baseline_tokens is None:
            baseline_tokens, baseline_logits = tokens, logits
        same = sum(t == b for t, b in zip(tokens, baseline_tokens))
        worst = max(float(relative_errors(w, g).max()) for w, g in zip(baseline_logits, logits))
        cache = llm.block_manager.cache
        hits = f"{cache.hit_tokens}/{cache.query_tokens}" if cache is not None else "-"
        idle = llm.block_manager.num_free_blocks == llm.block_manager.num_usable_blocks
        rows.append((name, llm.graph_mode, f"{same}/{len(prompts)}", f"{worst:.1e}", llm.scheduler.num_preemptions,
                     llm.runner.num_advanced_on_device, hits, idle))
        del llm
        torch.cuda.empty_cache()
    print(f"{'engine':28} {'graphs':14} {'tokens equal':>12} {'logits err':>10} {'preempt':>7} {'advanced':>8} "
          f"{'prefix hits':>12} {'blocks back':>11}")
    for row in rows:
        print(f"{row[0]:28} {row[1]:14} {row[2]:>12} {row[3]:>10} {row[4]:>7} {row[5]:>8} {row[6]:>12} {row[7]!s:>11}")
    # Host work per decode step at 256 sequences, graphs on, async off and on (the headline's model shape).
    for overlap in (False, True):
        llm = LLM("random:deepseek-r1-distill-qwen-1.5b", device="cuda", dtype="bfloat16", max_model_len=1024,
                  max_num_seqs=256, max_num_batched_tokens=8192, cuda_graphs=True, async_scheduling=overlap)
        for i in range(256):
            llm.add_request([1 + i] * 64, SamplingParams(max_tokens=300, ignore_eos=True))
        while llm.has_unfinished():
            llm.step()
        torch.cuda.synchronize()
        decode = [s for s in llm.step_stats if not s.num_prefill_tokens and s.num_seqs == 256][5:]
        wall, host = (statistics.median(getattr(s, k) for s in decode) * 1e3 for k in ("seconds", "host_s"))
        hidden = sum(s.hidden_s for s in decode) / max(sum(s.host_s for s in decode), 1e-12)
        wait = statistics.median(s.wait_s for s in decode) * 1e3
        print(f"async {'on ' if overlap else 'off'}: {len(decode)} steps of 256 decodes, per step (median): wall "
              f"{wall:.3f} ms, host {host:.3f} ms ({hidden:.0%} of it hidden), waiting for the GPU {wait:.3f} ms")
        del llm
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
