"""The host path per decode step of the engine before issue 23 (at 72fc855), for bench/RESULTS.md's "before".

That engine recorded no sections, so its methods are wrapped: schedule (Scheduler.schedule), prepare
(ModelRunner.prepare), update (Scheduler.update), and the rest of the step, sampling bookkeeping (the Python loop
over sampled tokens, `.tolist()`'s wait, the hooks' host work), with the forward, the logits and the sampler
excluded. Thread CPU time, torch on one thread, as bench/host_path.py measures the engine after. Run it with
that commit's core and native plugin first on the path:

    git worktree add /tmp/old 72fc855
    PYTHONPATH=/tmp/old/core:/tmp/old/plugins/native python bench/host_path_before.py
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

import novainfer.model_runner as runner_module
from novainfer.engine import LLM
from novainfer.sequence import SamplingParams

SECTIONS = ("schedule", "prepare", "bookkeeping", "update", "host", "forward")


def measure(num_seqs: int, steps: int = 60) -> dict[str, tuple[float, float]]:
    size = max(num_seqs, 8)
    llm = LLM("random:qwen2-tiny", device="cpu", max_num_seqs=size, max_model_len=512,
              max_num_batched_tokens=4096, kv_cache_capacity=512 * size, backend="native")
    for i in range(num_seqs):
        llm.add_request([1 + i % 100] * 16, SamplingParams(max_tokens=400, ignore_eos=True))
    llm.step()
    spent: dict[str, float] = {}

    def timed(function: Callable[..., Any], key: str) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.thread_time()
            result = function(*args, **kwargs)
            spent[key] = spent.get(key, 0.0) + time.thread_time() - start
            return result

        return wrapper

    llm.scheduler.schedule = timed(llm.scheduler.schedule, "schedule")
    llm.scheduler.update = timed(llm.scheduler.update, "update")
    llm.runner.prepare = timed(llm.runner.prepare, "prepare")
    llm.runner.forward = timed(llm.runner.forward, "forward")
    llm.runner.logits = timed(llm.runner.logits, "forward")
    runner_module.sample = timed(runner_module.sample, "sample")
    times: dict[str, list[float]] = {name: [] for name in SECTIONS}
    for _ in range(steps):
        spent.clear()
        start = time.thread_time()
        llm.step()
        host = time.thread_time() - start - spent.get("forward", 0.0) - spent.pop("sample", 0.0)
        parts = {name: spent.get(name, 0.0) for name in ("schedule", "prepare", "update", "forward")}
        parts["bookkeeping"] = host - parts["schedule"] - parts["prepare"] - parts["update"]
        parts["host"] = host
        for name in SECTIONS:
            times[name].append(parts[name] * 1e6)
    return {name: (statistics.median(v), float(np.percentile(v, 90))) for name, v in times.items()}


def main() -> None:
    torch.set_num_threads(1)
    print(f"{'seqs':>5} " + " ".join(f"{name:>19}" for name in SECTIONS))
    for num_seqs in (1, 8, 64, 256):
        result = measure(num_seqs)
        print(f"{num_seqs:>5} " + " ".join(f"{result[n][0]:>9.1f}/{result[n][1]:>9.1f}" for n in SECTIONS))


if __name__ == "__main__":
    main()
