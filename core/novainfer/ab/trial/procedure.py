"""One trial, run in its own process, by one procedure for every arm, ours and the peers alike:

1. open the arm's engine (novainfer.ab.trial.engines); one that cannot run here is "skipped", with why (also
   when that shows only as it starts);
2. start the engine for timing and generate the workload's first warmup_seqs requests (bench.py's token ids),
   untimed;
3. draw the timed run's token ids from a fresh seed (recorded), so nothing about them is known at start-up;
4. the timed run: the whole workload, from submitting the first request to the last request's final token;
   every request's output token ids are kept in the record; an online caliber submits each request at its
   arrival time and records each request's latencies (novainfer.ab.trial.latency); files that appear in the
   JIT compilers' caches meanwhile are counted, whichever process wrote them (novainfer.ab.trial.jit_caches);
5. the caliber check, one rule for every arm: each request must produce exactly its drawn output length
   (requests_off counts those that did not), and an engine that planned its schedule must have taken exactly
   the planned steps (schedule_steps_off), else "caliber_mismatch";
6. the step gate, unless [sweep.correctness] switches checks off: a sample of the run's own steps, chosen from
   a seed drawn now, after the run, replayed against the core's reference; "incorrect" when a step fails. With
   no gate (switched off, or an engine that has none), or one that left a kind of step the run executed
   unchecked, the trial is at best "unverified".

What the trial process cannot vouch for, it leaves to a process the backend never ran in: the executor checks
the recorded output tokens against the reference (novainfer.ab.trial.output_check) after this process has exited,
and only then is an "ok" final.

The parent (the sweep runner) sends a TrialRequest as JSON on stdin and reads progress lines (JSON) from
stdout; the TrialRecord is written to the request's result path. Whatever goes wrong inside a trial ends up
in that record, so the sweep always learns why.
"""

from __future__ import annotations

import json
import secrets
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from novainfer.ab.trial.engines import EngineUnavailable, TrialEngine, open_trial_engine
from novainfer.ab.trial.environment import git_commit
from novainfer.ab.trial.jit_caches import cached_files
from novainfer.ab.trial.latency import RequestTiming, latency_metrics
from novainfer.ab.trial.telemetry import open_monitor
from novainfer.ab.wire import TrialRecord, TrialRequest, new_record

GATE_OFF = "correctness gate switched off ([sweep.correctness] enabled = false)"


def emit(event: str, **fields: Any) -> None:
    """A progress line for the parent."""
    print(json.dumps({"event": event, **fields}), flush=True)


def run_trial(request: TrialRequest, record: TrialRecord) -> None:
    """Run the trial, filling `record` as it goes (so a failure midway keeps what was learned)."""
    engine_name = request.peer["peer"] if request.peer is not None else "novainfer"
    record.tags = {"engine": engine_name, "git_commit": git_commit(Path(request.source_dir))}
    try:
        engine = open_trial_engine(request)
    except EngineUnavailable as error:
        record.status, record.reason = "skipped", str(error)
        return
    try:
        record.params.update(engine.params)
        emit("phase", name="load")
        engine.start()
        record.params.update(engine.params)
        record.tags.update(engine.tags)
        _timed_run(request, record, engine)
        record.tags.update(engine.tags)
        unverified = _gate(request, record, engine)
        if record.status == "ok" and unverified is not None:
            record.status, record.reason = "unverified", unverified
    except EngineUnavailable as error:  # found out only when starting (an attention whose package is absent)
        record.status, record.reason = "skipped", str(error)
    finally:
        engine.close()


def _gate(request: TrialRequest, record: TrialRecord, engine: TrialEngine) -> str | None:
    """Run the step gate; sets "incorrect" when it fails. Returns why the trial is unverified, or None."""
    if not request.gate.enabled:
        record.tags["correctness_gate"] = "disabled"
        return GATE_OFF
    emit("phase", name="correctness")
    record.seeds["gate_sample"] = secrets.randbits(63)
    prompts = request.workload.prompts(record.seeds["tokens"])
    report = engine.gate(request.gate, prompts, record.seeds["gate_sample"])
    if isinstance(report, str):
        record.tags["correctness_gate"] = f"not applicable: {report}"
        return f"no correctness gate: {report}"
    record.tags["correctness_gate"] = report.method
    record.metrics.update(report.metrics())
    if not report.passed() and record.status == "ok":
        record.status, record.reason = "incorrect", report.problem()
    # Every kind of step the run executed must have been checked, or the gate vouches for less than the run.
    unchecked = sorted(kind for kind, cov in report.coverage.items() if cov.run_steps and not cov.checked)
    if unchecked:
        return f"incomplete gate coverage: step kinds {', '.join(unchecked)} ran but none was checked"
    return None


def _generate(
    request: TrialRequest, engine: TrialEngine, prompts: list[list[int]], output_lens: list[int],
    on_tokens: Callable[[int], None],
) -> tuple[list[list[int]], list[RequestTiming] | None]:
    """The timed run: offline, every request at once; online, each at its arrival time (the workload's seed
    draws them), with every request's timing."""
    if request.serving is None:
        return engine.generate(prompts, output_lens, on_tokens), None
    arrivals = request.serving.arrivals
    times = arrivals.times(len(prompts), request.workload.seed)
    return engine.serve(prompts, output_lens, times, arrivals.max_concurrency, on_tokens)


def _timed_run(request: TrialRequest, record: TrialRecord, engine: TrialEngine) -> None:
    workload = request.workload
    output_lens = workload.output_lens()
    emit("phase", name="warmup")
    warm = min(request.warmup_seqs, len(output_lens))
    if warm:
        engine.generate(workload.prompts()[:warm], output_lens[:warm], lambda n: None)
    record.seeds["tokens"] = secrets.randbits(63)
    prompts = workload.prompts(record.seeds["tokens"])
    expected = sum(output_lens)
    emit("phase", name="timed", total=expected)
    progress = _Progress(expected)
    monitor = open_monitor(record.tags.get("gpu_uuid"))  # the GPU's clocks, heat and power over the window
    compiled_before = cached_files()  # outside the window: listing the caches is not the run's time
    engine.begin_timed()
    monitor.start()  # its first reading before the clock starts, its last after it stops
    t0 = time.perf_counter()
    outputs, timings = _generate(request, engine, prompts, output_lens, progress.advance)
    seconds = time.perf_counter() - t0
    monitor.stop().apply(record)
    record.outputs = outputs
    metrics = record.metrics
    metrics.update(engine.end_timed())
    # Files new in the JIT caches: compiles during the timed run, by any engine or process (must be zero).
    metrics["timed_jit_cache_files"] = len(cached_files() - compiled_before)
    record.breakdown = engine.breakdown
    counts = [len(o) for o in outputs]
    actual = sum(counts)
    prompt_tokens = sum(len(p) for p in prompts)
    # Per request, not only the sum: a run that stops one request early and runs another long must not pass.
    off = sum(c != n for c, n in zip(counts, output_lens)) + abs(len(counts) - len(output_lens))
    metrics.update(
        output_tok_s=actual / seconds,
        total_tok_s=(actual + prompt_tokens) / seconds,
        run_seconds=seconds,
        expected_tokens=expected,
        actual_tokens=actual,
        prompt_tokens=prompt_tokens,
        requests=len(output_lens),
        requests_off=off,
    )
    if timings is not None and request.serving is not None and all(t.chunks for t in timings):  # online
        metrics.update(latency_metrics(timings, request.serving))
    steps_off = int(metrics.get("schedule_steps_off", 0))
    if off:
        record.status = "caliber_mismatch"
        record.reason = f"{off} of {len(output_lens)} requests off their length ({actual} tokens, expected {expected})"
    elif steps_off:
        record.status = "caliber_mismatch"
        record.reason = f"{steps_off} steps differ from the planned schedule"
    else:
        record.status = "ok"


class _Progress:
    """Reports produced tokens to the parent at most a few times a second."""

    def __init__(self, total: int) -> None:
        self.done = 0
        self.last = 0.0
        self.total = total

    def advance(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last > 0.25 or self.done >= self.total:
            self.last = now
            emit("tokens", done=self.done, total=self.total)


def main() -> int:
    request = TrialRequest.from_json(sys.stdin.read())
    record = new_record(request)
    try:
        run_trial(request, record)
    except Exception as error:  # the trial's own failure is a result, never the sweep's crash
        traceback.print_exc()
        record.status = "failed"
        record.reason = f"{type(error).__name__}: {error}".splitlines()[0][:500]
    record.finished_at = time.time()
    Path(request.result_path).write_text(json.dumps(record.to_dict()))
    return 0
