"""Where the output check's time goes (novainfer.ab.trial.output_check): issue 27's headline trials spent ~51 s of
their ~75 s in it, so it sets how many trials a device session holds.

Checks random outputs of the workload's output lengths (the check's cost does not depend on the tokens' values;
its verdict, which this script does not print, does): first a subset of the requests under torch.profiler, to
list the ops by device time, then the whole workload once per logits budget (the check holds at most that many
logits elements per engine at once, which sets its step size), timed with the build and the steps it took.

    python3 bench/output_check_gpu.py experiments/headline.toml [--subset 32] [--budgets 27 29]
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from novainfer.ab.sweep.experiment import load_experiment
from novainfer.ab.trial import output_check
from novainfer.config import EngineConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", type=Path)
    parser.add_argument("--subset", type=int, default=32, help="requests checked under the profiler")
    parser.add_argument("--budgets", type=int, nargs="+", default=[27, 29], help="log2 of the logits budget")
    args = parser.parse_args()
    experiment = load_experiment(args.experiment)
    config = EngineConfig(**experiment.engine.to_dict())
    prompts = experiment.workload.prompts()
    rng = random.Random(0)
    outputs = [[rng.randrange(10_000) for _ in range(n)] for n in experiment.workload.output_lens()]
    margin = experiment.sweep.correctness.floor_margin

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        started = time.perf_counter()
        output_check.check_outputs(config, prompts[: args.subset], outputs[: args.subset], margin)
        profiled = time.perf_counter() - started
    sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    print(f"{args.subset} requests under the profiler: {profiled:.1f} s")
    print(prof.key_averages().table(sort_by=sort, row_limit=15, max_name_column_width=48))

    rows = []
    for budget in args.budgets:
        output_check.LOGITS_ELEMENTS = output_check.LOGITS_ELEMENTS_GPU = 1 << budget  # this budget, whatever is free
        started = time.perf_counter()
        report = output_check.check_outputs(config, prompts, outputs, margin)
        rows.append((budget, time.perf_counter() - started, report.build_seconds, report.steps, report.tokens_checked))
    print(f"{'logits budget':>14} {'check s':>8} {'build s':>8} {'steps':>6} {'tokens':>8}")
    for budget, seconds, build, steps, tokens in rows:
        print(f"{'2^' + str(budget):>14} {seconds:8.1f} {build:8.1f} {steps:6d} {tokens:8d}")


if __name__ == "__main__":
    main()
