"""Where a small-batch run's time goes: per-step wall time, graph replay alone, and the eager step's host ops.

Runs an experiment's workload as a trial does (warm-up generate, then the timed generate) with one
backend, then prints: the wall time of prefill-carrying steps and of decode steps (median, p90, sum),
per decode bucket: the steps' host work left exposed and the device time of that bucket's CUDA-graph replay (in a
run, over each step's own metadata, and alone, over the last step's),
beside the time one read of the weights takes at the device's measured copy bandwidth, the largest bucket's replay
by kernel (device time and launches per replay, under torch.profiler), and a torch.profiler table of the CPU time
by op of one eager prefill step of the workload. For diagnosis, not for numbers: the
sweep's trials are the numbers.

    python bench/step_times_gpu.py experiments/kv_layout.toml [native] [--async on|off] [--prefix-caching on|off]

By bucket, host work is compared at equal batch sizes: a setting that changes the mix of steps (prefix caching
lets more sequences decode at once) moves the by-class medians without any step getting dearer.

Each step's host work (schedule, prepare, launch, update: StepStats.host_s) and the share of it that ran while the
step before was still on the GPU (hidden_s) are printed by class: prefill-carrying steps and decode steps.
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path

import torch

from novainfer import LLM
from novainfer.ab.sweep.experiment import load_experiment
from novainfer.engine import StepStats
from novainfer.sequence import SamplingParams


def replay_ms(llm: LLM, bucket: int, repeats: int = 50) -> float:
    graphs = llm.runner.graphs
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graphs.replay(bucket)
    start.record()
    for _ in range(repeats):
        graphs.replay(bucket)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def replays_in_a_run(llm: LLM, prompts: list[list[int]], params: list[SamplingParams]) -> dict[int, list[float]]:
    """Device milliseconds of each graph replay of one more generate of the workload, by bucket: CUDA events
    around each replay as the run launches it, over the step's real metadata (a replay timed alone reruns the last
    step's). A run of its own, so the events' host cost stays out of the step times above."""
    graphs = llm.runner.graphs
    replay = graphs.replay
    events: list[tuple[int, torch.cuda.Event, torch.cuda.Event]] = []

    def timed(size: int) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = replay(size)
        end.record()
        events.append((size, start, end))
        return out

    graphs.replay = timed
    llm.reset_prefix_cache()
    try:
        llm.generate(prompts, params)
    finally:
        graphs.replay = replay
    torch.cuda.synchronize()
    by_size: dict[int, list[float]] = {}
    for size, start, end in events:
        by_size.setdefault(size, []).append(start.elapsed_time(end))
    return by_size


def replay_kernels(llm: LLM, bucket: int, repeats: int = 20) -> list[tuple[str, float, float]]:
    """The kernels of one replay of `bucket`'s graph (over the last step's metadata): (name, device ms, launches),
    per replay, largest first. Their sum against the replay's own time is what the graph spends between kernels."""
    graphs = llm.runner.graphs
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            graphs.replay(bucket)
        torch.cuda.synchronize()
    kernels = [
        (e.key, e.self_device_time_total / 1e3 / repeats, e.count / repeats)
        for e in prof.key_averages()
        if e.device_type == torch.autograd.DeviceType.CUDA and e.self_device_time_total > 0
    ]
    return sorted(kernels, key=lambda k: -k[1])


def weight_bytes(llm: LLM) -> int:
    return sum(p.numel() * p.element_size() for p in llm.model.parameters())


def copy_bandwidth(size: int = 1 << 32, repeats: int = 10) -> float:
    """Bytes per second a device-to-device copy moves (read plus write) over a buffer larger than any cache."""
    src = torch.empty(size, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    return 2 * size * repeats / (start.elapsed_time(end) / 1e3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", type=Path)
    parser.add_argument("backend", nargs="?", default="native")
    parser.add_argument("--async", dest="overlap", choices=("on", "off"), default="on")
    parser.add_argument("--prefix-caching", choices=("on", "off"), help="default: the experiment's engine setting")
    args = parser.parse_args()
    experiment = load_experiment(args.experiment)
    settings = {"backend": args.backend, "cuda_graphs": True, "async_scheduling": args.overlap == "on"}
    if args.prefix_caching is not None:
        settings["enable_prefix_caching"] = args.prefix_caching == "on"
    llm = LLM(**{**experiment.engine.to_dict(), **settings})
    prompts, lens = experiment.workload.prompts(), experiment.workload.output_lens()
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in lens]
    llm.generate(prompts, params)
    torch.cuda.synchronize()
    llm.step_stats.clear()
    # Cold, as a trial's timed run: the warm-up's prompts left in the prefix cache would turn every prefill into hits.
    llm.reset_prefix_cache()
    llm.generate(prompts, params)
    stats = list(llm.step_stats)
    in_run = replays_in_a_run(llm, prompts, params)
    prefill = [s.seconds * 1e3 for s in stats if s.num_prefill_tokens]
    decode = [s.seconds * 1e3 for s in stats if not s.num_prefill_tokens]
    total = sum(s.seconds for s in stats)
    tokens = sum(s.num_sampled for s in stats)
    print(f"{len(stats)} steps, {tokens} output tokens in {total * 1e3:.1f} ms = {tokens / total:,.0f} tok/s")
    print(f"prefill steps: {len(prefill)}, {sum(prefill):.2f} ms in all: {[round(t, 2) for t in prefill]}")
    if decode:
        decode.sort()
        print(
            f"decode steps: {len(decode)}, median {statistics.median(decode):.3f} ms, "
            f"p90 {decode[int(0.9 * len(decode))]:.3f} ms, {sum(decode):.1f} ms in all"
        )
    print(f"async_scheduling {args.overlap}: host work per step, median ms (hidden behind the GPU: share of the sum)")
    for name, steps in (("prefill", [s for s in stats if s.num_prefill_tokens]),
                        ("decode", [s for s in stats if not s.num_prefill_tokens])):
        if steps:
            parts = {k: statistics.median(getattr(s, k) for s in steps) * 1e3
                     for k in ("schedule_s", "prepare_s", "launch_s", "update_s", "wait_s")}
            hidden = sum(s.hidden_s for s in steps) / max(sum(s.host_s for s in steps), 1e-12)
            print(f"  {name:8} host {statistics.median(s.host_s for s in steps) * 1e3:.3f} "
                  + " ".join(f"{k[:-2]} {v:.3f}" for k, v in parts.items()) + f" hidden {hidden:.0%}")
    # By decode bucket: a step's host work not hidden behind the step before (host_s - hidden_s: an upper bound,
    # hidden_s being a lower one) beside the device time of that bucket's graph replay and of reading the weights
    # once at the device's measured copy bandwidth (what any decode step must at least spend).
    weight_ms = weight_bytes(llm) / copy_bandwidth() * 1e3
    print(f"decode steps by bucket (weights {weight_bytes(llm) / 2**30:.2f} GiB: read once in {weight_ms:.3f} ms)")
    print("  bucket  steps  step median  host median  exposed host median / p90  replay in the run  replay alone")
    sizes = sorted(llm.runner.graph_sizes)
    by_bucket: dict[int, list[StepStats]] = {}
    for s in stats:
        if not s.num_prefill_tokens:
            by_bucket.setdefault(next(b for b in sizes if b >= s.num_seqs), []).append(s)
    for bucket in sorted(by_bucket, reverse=True)[:6]:
        steps = by_bucket[bucket]
        exposed = sorted((s.host_s - s.hidden_s) * 1e3 for s in steps)
        print(f"  {bucket:6}  {len(steps):5}  {statistics.median(s.seconds for s in steps) * 1e3:8.3f} ms"
              f"  {statistics.median(s.host_s for s in steps) * 1e3:8.3f} ms"
              f"  {statistics.median(exposed):8.3f} / {exposed[int(0.9 * len(exposed))]:.3f} ms"
              f"  {statistics.median(in_run.get(bucket, [math.nan])):10.3f} ms  {replay_ms(llm, bucket):8.3f} ms")

    # The largest bucket's replay by kernel: what its device time is made of.
    if by_bucket:
        bucket = max(by_bucket)
        kernels = replay_kernels(llm, bucket)
        alone = replay_ms(llm, bucket)
        print(f"bucket {bucket} replay by kernel (over the last step's metadata): {alone:.3f} ms, of which kernels "
              f"{sum(k[1] for k in kernels):.3f} ms in {sum(k[2] for k in kernels):.0f} launches")
        for name, ms, launches in kernels[:15]:
            print(f"  {ms:7.3f} ms  {launches:5.0f}x  {name[:90]}")

    # One eager prefill step of the workload's prompts, profiled on the host.
    for prompt, n in zip(prompts, lens):
        llm.add_request(prompt, SamplingParams(max_tokens=n, ignore_eos=True))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        llm.step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=40))
    while llm.has_unfinished():
        llm.step()


if __name__ == "__main__":
    main()
