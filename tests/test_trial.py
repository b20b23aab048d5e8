"""One trial, in-process: the record's gate coverage, per-request caliber, schedule check and phase breakdown."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from novainfer.ab.trial import novainfer_engine
from novainfer.ab.trial.jit_caches import cache_dirs, cached_files
from novainfer.ab.trial.phases import PHASES, PhaseClock, choose_samples
from novainfer.ab.trial.procedure import run_trial
from novainfer.ab.trial.schedule import plan_schedule
from novainfer.ab.wire import GateSettings, TrialRequest, gate_coverage, new_record
from novainfer.ab.workload import Workload
from novainfer.config import EngineConfig

WORKLOAD = Workload(num_seqs=6, input_len=(16, 48), output_len=(4, 16), seed=1)
CONFIG = EngineConfig(
    model="random:qwen2-tiny-wide", device="cpu", dtype="float32", max_model_len=96, max_num_seqs=4,
    max_num_batched_tokens=48, kv_cache_capacity=512,
)


def request(gate: GateSettings | None = None) -> TrialRequest:
    return TrialRequest(
        sweep_id="s", trial_id="t#0", arm="t", arm_params={}, repeat=0, order=0, config=CONFIG.to_dict(),
        workload=WORKLOAD, warmup_seqs=1, gate=gate or GateSettings(), result_path="", source_dir=".",
    )


def test_an_ok_trial_records_coverage_caliber_and_phases_over_every_step() -> None:
    record = new_record(request())
    run_trial(request(), record)
    assert record.status == "ok", record.reason
    metrics = record.metrics
    assert metrics["requests"] == 6 and metrics["requests_off"] == 0 and metrics["schedule_steps_off"] == 0
    coverage = gate_coverage(metrics)
    assert coverage and all(c["checked"] >= 1 and c["run_steps"] >= c["checked"] for c in coverage.values())
    assert metrics["gate_steps"] < metrics["num_steps"] and metrics["gate_seconds"] > 0
    parts = [metrics[f"gate_{part}_seconds"] for part in ("fill", "reference", "floor", "tested", "compare")]
    assert all(p > 0 for p in parts) and metrics["gate_setup_seconds"] + sum(parts) <= metrics["gate_seconds"]
    # The breakdown's classes partition the run's steps, each measured on shadow steps.
    assert sum(row["steps"] for row in record.breakdown.values()) == metrics["num_steps"]
    assert all(1 <= row["sampled"] <= min(3, row["steps"]) for row in record.breakdown.values())
    for phase in PHASES:
        expected = sum(row[f"{phase}_ms"] * row["steps"] for row in record.breakdown.values()) / 1e3
        assert metrics[f"phase_{phase}_s"] == pytest.approx(expected) and expected > 0
    assert record.tags["phases_cover"].startswith(f"all {metrics['num_steps']:.0f} steps")
    assert record.tags["engine"] == "novainfer" and "teacher-forced" in record.tags["correctness_gate"]


def test_a_run_that_leaves_the_planned_schedule_is_a_caliber_mismatch(monkeypatch: pytest.MonkeyPatch) -> None:
    """The gate vouches only for the planned steps: a run that takes others must not pass as ok."""
    monkeypatch.setattr(novainfer_engine, "plan_schedule", lambda *a, **k: plan_schedule(*a, **k)[:-1])
    record = new_record(request())
    run_trial(request(), record)
    assert record.status == "caliber_mismatch"
    assert record.metrics["requests_off"] == 0 and record.metrics["schedule_steps_off"] == 1
    assert "planned schedule" in record.reason
    assert record.tags["phases_cover"].startswith("none")


def test_a_compile_in_the_timed_window_is_counted_those_before_it_are_not(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """An engine that compiles lazily, on the run's own shapes, writes its kernel into a JIT cache during the timed
    run (so would a peer's engine process, out of the trial's reach): counted. Entries there before the window (an
    earlier trial's, the warm-up's) are not."""
    cache = tmp_path / "triton"
    monkeypatch.setenv("TRITON_CACHE_DIR", str(cache))
    monkeypatch.setenv("FLASHINFER_WORKSPACE_BASE", str(tmp_path / "fi"))
    assert {cache, tmp_path / "fi" / ".cache" / "flashinfer"} <= set(cache_dirs())

    def entry(name: str) -> None:
        (cache / name).mkdir(parents=True)
        (cache / name / "kernel.cubin").write_bytes(b"\0")

    entry("earlier")
    generate, calls = novainfer_engine.NovaInferEngine.generate, []

    def compiling(self: novainfer_engine.NovaInferEngine, *args: Any, **kwargs: Any) -> Any:
        calls.append(len(calls))
        entry(["warm-up", "lazy"][len(calls) - 1])  # the first call is the warm-up, the second the timed run
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(novainfer_engine.NovaInferEngine, "generate", compiling)
    record = new_record(request())
    run_trial(request(), record)
    assert calls == [0, 1] and len(cached_files()) == 3
    assert record.metrics["timed_jit_cache_files"] == 1


def test_a_gate_switched_off_leaves_the_trial_unverified() -> None:
    req = request(GateSettings(enabled=False))
    record = new_record(req)
    run_trial(req, record)
    assert record.status == "unverified" and "switched off" in record.reason
    assert record.tags["correctness_gate"] == "disabled" and not gate_coverage(record.metrics)
    assert record.metrics["output_tok_s"] > 0


def test_phase_samples_spread_over_each_class() -> None:
    plan = plan_schedule(
        [len(p) for p in WORKLOAD.prompts()], WORKLOAD.output_lens(), num_blocks=33, block_size=16,
        max_num_seqs=4, max_num_batched_tokens=48, max_model_len=96, cuda_graphs=False,
    )
    samples = choose_samples(plan, 2)
    assert set(samples) == {s.step_class for s in plan}
    for name, steps in samples.items():
        of_class = [s for s in plan if s.step_class == name]
        assert len(steps) == min(2, len(of_class)) and all(s.step_class == name for s in steps)
        assert len({s.index for s in steps}) == len(steps)


def test_phase_clock_counts_and_times_wrapped_calls() -> None:
    import torch

    clock = PhaseClock(torch.device("cpu"))
    work = clock.wrap("attention", lambda n: sum(range(n)))
    timed = clock.measure(lambda: [work(n=20000) for _ in range(3)])
    assert clock.calls["attention"] == 3 and clock.calls["metadata"] == 0
    assert timed["metadata"] == 0 and 0 < timed["attention"] <= timed["step"]


def test_a_trial_overlapping_the_host_is_on_its_plan_and_checked() -> None:
    """The planned schedule, the gate's replay of it and the output lengths hold with asynchronous scheduling
    on as off (tests/test_async_scheduling.py shows the tokens are the same); the record says how much host work
    each step took and how much of it overlapped."""
    records = {}
    for overlap in (True, False):
        config = {**CONFIG.to_dict(), "async_scheduling": overlap}
        req = TrialRequest(
            sweep_id="s", trial_id=f"t{overlap}#0", arm="t", arm_params={}, repeat=0, order=0, config=config,
            workload=WORKLOAD, warmup_seqs=1, gate=GateSettings(), result_path="", source_dir=".",
        )
        records[overlap] = record = new_record(req)
        run_trial(req, record)
        assert record.status == "ok", record.reason
        assert record.metrics["schedule_steps_off"] == 0 and record.metrics["requests_off"] == 0
        assert record.metrics["host_us_per_step"] > 0
    assert records[True].metrics["num_steps"] == records[False].metrics["num_steps"]
    assert records[False].metrics["host_hidden_fraction"] == 0
    assert 0 <= records[True].metrics["host_hidden_fraction"] <= 1
