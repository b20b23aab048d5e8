"""Where a run's time goes by attention phase (metadata / KV write / attention), over every step of the run.

CUDA-graph replays call no hooks, and timing hooks inside the timed run would slow the run they measure.
So the phases are measured after the timed window, on shadow steps: for each step class of the planned
schedule (novainfer.ab.trial.schedule: prefill-carrying steps, and decode-only steps per CUDA-graph bucket), a few
of the run's own steps, spread evenly over the class by size, are rebuilt in the timed engine's now-empty
cache and run eagerly with every hook call bracketed by timers. A decode step of a graph class is run on
the same padded batch and metadata its graph replays, so the same kernels run; its graph replay is timed
too. On CUDA the device is held by a spin kernel until the host has queued the whole step, so each interval
is device time of the kernels alone, not the host's launch gaps (checked: a step queued too slowly is
measured again behind a longer hold). On the CPU the host clock is the device clock.

A class's phase time in the run is its samples' mean per step times its number of steps; the run's phase
time is the sum over classes. Each record says so (tag phases_cover), and keeps the per-class figures
(sampled steps, mean wall time per step in the timed run, shadow device time per phase, graph replay time).
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch

from novainfer import LLM
from novainfer.ab.trial.schedule import PlannedStep
from novainfer.testing import StepSeq, prepared, timed_parts

PHASES = ("metadata", "kv_write", "attention")
SAMPLES_PER_CLASS = 3
# Hold the device at least this long before a shadow step (longer when the host turns out slower).
_MIN_HOLD_MS = 5.0


class PhaseClock:
    """Accumulates the time of wrapped calls per phase, for the steps run inside `measure`.

    On CUDA each call is bracketed by two events and, inside `measure`, the device is held until the whole
    step is queued, so the intervals are device time; on the CPU the host clock brackets each call.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.calls: dict[str, int] = dict.fromkeys(PHASES, 0)
        self._events: list[tuple[str, Any, Any]] = []
        self._host: dict[str, float] = {}
        self._cycles_per_ms = _cycles_per_ms() if self.cuda else 0.0
        self._hold_cycles = self._cycles_per_ms * 4 * _MIN_HOLD_MS

    def wrap(self, phase: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def timed(**kwargs: Any) -> Any:
            self.calls[phase] += 1
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                result = function(**kwargs)
                end.record()
                self._events.append((phase, start, end))
                return result
            t0 = time.perf_counter()
            result = function(**kwargs)
            self._host[phase] = self._host.get(phase, 0.0) + (time.perf_counter() - t0) * 1e3
            return result

        return timed

    def measure(self, step: Callable[[], None]) -> dict[str, float]:
        """Milliseconds per phase of one run of `step`, and "step" for the whole of it."""
        if not self.cuda:
            self._host = {}
            t0 = time.perf_counter()
            step()
            return {**dict.fromkeys(PHASES, 0.0), **self._host, "step": (time.perf_counter() - t0) * 1e3}
        for _ in range(4):
            self._events = []
            torch.cuda._sleep(int(self._hold_cycles))
            released = torch.cuda.Event()
            released.record()
            begin, finish = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            begin.record()
            step()
            finish.record()
            queued_ms = (time.perf_counter() - t0) * 1e3
            queued_in_time = not released.query()  # the hold still running: the whole step was queued behind it
            torch.cuda.synchronize()
            # Next hold: twice what queueing took, so the device never waits for the host.
            if queued_in_time:
                self._hold_cycles = self._cycles_per_ms * max(_MIN_HOLD_MS, 2 * queued_ms)
                result = dict.fromkeys(PHASES, 0.0)
                for phase, start, end in self._events:
                    result[phase] += start.elapsed_time(end)
                result["step"] = begin.elapsed_time(finish)
                return result
            self._hold_cycles = self._cycles_per_ms * 4 * max(_MIN_HOLD_MS, queued_ms)
        raise RuntimeError("the host could not queue one step ahead of the device")


def _cycles_per_ms() -> float:
    """The spin kernel's cycles per millisecond on the current device."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    cycles = 10_000_000
    torch.cuda._sleep(cycles)  # the first launch loads the kernel
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    torch.cuda.synchronize()
    return cycles / start.elapsed_time(end)


def choose_samples(plan: list[PlannedStep], per_class: int) -> dict[str, list[PlannedStep]]:
    """Up to `per_class` steps of each class, at evenly spaced ranks of size (tokens, then total context)."""
    by_class: dict[str, list[PlannedStep]] = defaultdict(list)
    for step in plan:
        by_class[step.step_class].append(step)
    samples = {}
    for name, steps in sorted(by_class.items()):
        ranked = sorted(steps, key=lambda s: (s.tokens, sum(e.num_computed + e.num_new for e in s.entries), s.index))
        k = min(per_class, len(ranked))
        samples[name] = [ranked[int((i + 0.5) * len(ranked) / k)] for i in range(k)]
    return samples


def measure_phases(
    llm: LLM, plan: list[PlannedStep], step_seconds: list[float], per_class: int = SAMPLES_PER_CLASS
) -> tuple[dict[str, float], dict[str, dict[str, float]], str]:
    """(phase -> seconds over the whole run, per-class breakdown, a one-line statement of what they cover).

    `llm` is the engine that ran the plan, now idle with an empty cache; `step_seconds` the wall time of
    each of the plan's steps in the timed run.
    """
    clock = PhaseClock(llm.device)
    counts: dict[str, int] = defaultdict(int)
    wall: dict[str, float] = defaultdict(float)
    for step, seconds in zip(plan, step_seconds):
        counts[step.step_class] += 1
        wall[step.step_class] += seconds
    breakdown: dict[str, dict[str, float]] = {}
    totals = dict.fromkeys(PHASES, 0.0)
    samples = choose_samples(plan, per_class)
    with torch.inference_mode():
        for name, steps in samples.items():
            measured, replays = [], []
            for step in steps:
                seqs = [StepSeq(e.num_computed, e.num_new) for e in step.entries]
                with prepared(llm, seqs, step.num_decodes) as shadow:
                    forward, replay = timed_parts(llm, shadow, clock.wrap)
                    measured.append(clock.measure(forward))
                    if replay is not None:
                        replays.append(clock.measure(replay)["step"])
            row = {
                "steps": counts[name], "sampled": len(steps), "wall_ms": wall[name] / counts[name] * 1e3,
                **{f"{p}_ms": statistics.fmean(m[p] for m in measured) for p in PHASES},
                "device_ms": statistics.fmean(m["step"] for m in measured),
            }
            if replays:
                row["replay_ms"] = statistics.fmean(replays)
            breakdown[name] = row
            for phase in PHASES:
                totals[phase] += row[f"{phase}_ms"] * counts[name] / 1e3
    sampled = sum(len(steps) for steps in samples.values())
    clock_kind = "device time" if llm.device.type == "cuda" else "host time"
    cover = (
        f"all {len(plan)} steps: {clock_kind} per phase of {sampled} shadow steps (up to {per_class} per class, "
        f"{len(samples)} classes) times each class's step count"
    )
    return totals, breakdown, cover
