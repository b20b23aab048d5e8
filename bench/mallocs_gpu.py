"""Find the steps of a sweep's timed run where the CUDA caching allocator maps new device memory.

Runs an experiment's workload once, as a trial does (warm-up generate of the first warmup_seqs
requests, then the whole workload), with one backend, and reads the allocator's counters after
every step of the second run: each step that grew the allocator's segments is printed with its
composition. Slower than a trial (a counter read per step); for diagnosis, not for numbers.

    python bench/mallocs_gpu.py experiments/grid.toml [native]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from novainfer import LLM
from novainfer.ab.sweep.experiment import load_experiment
from novainfer.sequence import SamplingParams

COUNTERS = ("segment.large_pool.allocated", "segment.small_pool.allocated", "reserved_bytes.all.current")


def counters() -> dict[str, int]:
    stats = torch.cuda.memory_stats()
    return {name: stats.get(name, 0) for name in COUNTERS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", type=Path)
    parser.add_argument("backend", nargs="?", default="native")
    args = parser.parse_args()
    experiment = load_experiment(args.experiment)
    engine = {**experiment.engine.to_dict(), "backend": args.backend}
    llm = LLM(**engine)
    prompts, lens = experiment.workload.prompts(), experiment.workload.output_lens()
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in lens]
    warm = min(experiment.sweep.warmup_seqs, len(prompts))
    llm.generate(prompts[:warm], params[:warm])
    torch.cuda.synchronize()
    llm.step_stats.clear()
    grew = []
    last = counters()
    start = dict(last)

    def after_step(_: int) -> None:
        nonlocal last
        now = counters()
        if now != last:
            stats = llm.step_stats[-1]
            grew.append((len(llm.step_stats) - 1, stats, {k: now[k] - last[k] for k in COUNTERS}))
        last = now

    llm.generate(prompts, params, on_step=after_step)
    print(f"{len(llm.step_stats)} steps; growth over the run: { {k: last[k] - start[k] for k in COUNTERS} }")
    print(f"{'step':>5} {'prefill':>8} {'decode':>7} {'seqs':>5}  growth")
    for index, stats, delta in grew:
        print(f"{index:>5} {stats.num_prefill_tokens:>8} {stats.num_decode_tokens:>7} {stats.num_seqs:>5}  {delta}")


if __name__ == "__main__":
    main()
