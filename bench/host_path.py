"""The engine's host work per pure-decode step, by section, on the CPU: what the GPU would wait for.

For each batch size, `--seqs` requests (16-token prompts, EOS ignored, long enough outputs) are admitted and
prefilled, then `--steps` decode-only steps are recorded from the engine's own StepStats:
    schedule  Scheduler.schedule: the step chosen, counts advanced, blocks given;
    prepare   ModelRunner.launch up to the launch: the step's inputs and host mirrors laid out;
    launch    handing the device work over (the CPU's device worker; on CUDA the kernel launches, which this
              benchmark cannot see);
    update    taking the step's sampled tokens in: Scheduler.update, finished requests retired;
    host      their sum, per step; device: the host's wait for the device work (the model, sampling and the
              device-side input ops), excluded from host.
Medians and p90 in microseconds per step, of the host thread's CPU time by default (`--clock thread`: the
engine's section clock is pointed at time.thread_time, so other processes on a shared machine do not inflate
the host's own work; `--clock wall` keeps perf_counter). With async_scheduling off the device work runs in the
host thread, inline, so the sections are the host's own work alone; with it on, a worker thread computes
meanwhile and shares the interpreter lock, so the same sections also carry that contention. Torch runs on one
thread, so that its idle OpenMP workers do not spin on the core the host's work runs on.

Device compute is excluded from every section either way, but on the CPU it runs on the host's own cores and
leaves the host's caches cold for the next step. `--device noop` replaces each step's device work by one that
only returns the token ids the step would sample (zeros): the host's work as on a GPU machine, where the
device's work does not evict the host's caches. `--device cpu` (the default) runs the model.

    python bench/host_path.py                  # 1, 8, 64, 256 sequences, async on and off
    python bench/host_path.py --seqs 256 --async on
    python bench/host_path.py --device noop    # the host alone
"""

from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace

import numpy as np
import torch

import novainfer.engine
import novainfer.model_runner
from novainfer import LLM
from novainfer.sequence import SamplingParams

SECTIONS = ("schedule_s", "prepare_s", "launch_s", "update_s", "host_s", "wait_s")


def decode_steps(num_seqs: int, steps: int, overlap: bool, noop: bool) -> dict[str, list[float]]:
    """Per-section microseconds of `steps` decode-only steps over `num_seqs` running sequences."""
    llm = LLM(
        "random:qwen2-tiny", device="cpu", max_num_seqs=max(num_seqs, 8), max_model_len=512,
        max_num_batched_tokens=4096, kv_cache_capacity=512 * max(num_seqs, 8), async_scheduling=overlap,
    )
    for i in range(num_seqs):
        llm.add_request([1 + i % 97] * 16, SamplingParams(max_tokens=400, ignore_eos=True))
    while not llm.step_stats or llm.step_stats[-1].num_prefill_tokens:
        llm.step()
    if noop:
        sampled = np.zeros(num_seqs, dtype=np.int64)
        llm.runner._device_step = lambda *args, **kwargs: (sampled[: args[5]], None)  # (..., num_sampled, ...)
    for _ in range(steps + 2):
        llm.step()
    # The last step's tokens are still in flight when overlapping: its update is not in yet.
    recorded = [s for s in llm.step_stats[-steps - 2 : -2] if not s.num_prefill_tokens]
    return {name: [getattr(s, name) * 1e6 for s in recorded] for name in SECTIONS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seqs", default="1,8,64,256")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--async", dest="modes", choices=("on", "off", "both"), default="both")
    parser.add_argument("--clock", choices=("thread", "wall"), default="thread")
    parser.add_argument("--device", choices=("cpu", "noop"), default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.clock == "thread":
        clock = SimpleNamespace(perf_counter=time.thread_time)
        novainfer.engine.time = novainfer.model_runner.time = clock  # type: ignore[assignment]
    modes = {"on": [True], "off": [False], "both": [False, True]}[args.modes]
    header = f"{'seqs':>5} {'async':>5} " + " ".join(f"{n[:-2]:>17}" for n in SECTIONS)
    print(f"median / p90, microseconds per decode step, {args.clock} clock, device {args.device} "
          "(wait = device work, not host)")
    print(header)
    for n in (int(x) for x in args.seqs.split(",")):
        for overlap in modes:
            times = decode_steps(n, args.steps, overlap, args.device == "noop")
            cells = " ".join(
                f"{statistics.median(times[k]):>8.1f}/{np.percentile(times[k], 90):>8.1f}" for k in SECTIONS
            )
            print(f"{n:>5} {'on' if overlap else 'off':>5} {cells}")


if __name__ == "__main__":
    main()
