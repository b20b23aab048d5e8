"""The result of one trial: what the ledger stores (one JSON line each) and MLflow logs."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Status = Literal["ok", "unverified", "incorrect", "caliber_mismatch", "failed", "timeout", "skipped"]
# Only these statuses may be ranked, called a winner or be the baseline of a speedup claim.
RANKABLE: tuple[Status, ...] = ("ok",)
# Trials that ran the whole workload to the right lengths: their throughput is a measurement, shown in every
# table, but an "unverified" one (no correctness gate ran) is never ranked.
MEASURED: tuple[Status, ...] = ("ok", "unverified")
# Trials that prove the arm wrong: its numbers are shown, it can never win.
FLAG_STATUSES: tuple[Status, ...] = ("incorrect", "caliber_mismatch")

# Metric names a trial's record carries besides the throughput ones (see TrialRecord.metrics):
# the correctness gate's coverage, per step kind (novainfer.ab.gate.STEP_KINDS and "decode-b<bucket>" /
# "decode-eager-b<size class>"), as gate.<kind>.run_steps, gate.<kind>.checked, gate.<kind>.max_rel_err.
GATE_PREFIX = "gate."


def gate_coverage(metrics: dict[str, float]) -> dict[str, dict[str, float]]:
    """The gate's coverage read back from a record's flat metrics: kind -> {run_steps, checked, max_rel_err}."""
    coverage: dict[str, dict[str, float]] = {}
    for name, value in metrics.items():
        if name.startswith(GATE_PREFIX):
            kind, _, what = name.removeprefix(GATE_PREFIX).rpartition(".")
            coverage.setdefault(kind, {})[what] = value
    return coverage


@dataclass
class TrialRecord:
    """One trial of a sweep.

    sweep_id: the sweep's identity (a hash of the experiment file's resolved content).
    trial_id: unique within the sweep, stable across --resume: f"{arm}#{repeat}".
    arm: the arm's label, e.g. "backend=native,block_size=16"; trials of one arm share it.
    arm_params: the axis values that define the arm, e.g. {"backend": "native", "block_size": 16}.
    repeat: 0-based repeat index; order: position in the interleaved schedule.
    status: "ok" only when the correctness gate passed and every request produced exactly its length;
        "unverified" when every request did but no gate ran (switched off, or the engine has none);
        "incorrect" (gate failed), "caliber_mismatch" (some request's length differs), "failed", "timeout",
        "skipped" (cannot run here).
    reason: why the status is not "ok" (one line), else None.
    config: the fully resolved engine config the trial ran with.
    params: flat string params for MLflow (config, backend, plugin and library versions).
    metrics: numeric results:
        throughput: output_tok_s, total_tok_s, run_seconds, prompt_tokens, expected_tokens, actual_tokens;
        caliber: requests, requests_off (requests whose output length differs from the drawn one);
        gate: max_rel_err (worst row of teacher-forced logits), gate_seconds, gate_steps, gate_rows and the
            per-kind coverage (gate.<kind>.run_steps / .checked / .max_rel_err, see gate_coverage);
        our engine only: prefill_tokens, decode_tokens, num_steps, num_preemptions, peak_memory_bytes,
            timed_cuda_mallocs, timed_tensor_allocs, timed_<backend counter>, kv_cache_blocks, and the phase
            breakdown phase_<metadata|kv_write|attention>_s over the whole run (tag phases_cover says how) and
            phases_seconds, what measuring it took (after the timed window).
    tags: strings for MLflow tags (device name, driver, torch and CUDA versions, git commit, host, the gate's
        method and the phases' coverage).
    breakdown: our engine's timed run by step class (novainfer.ab.phases): class -> steps, sampled, wall_ms
        (mean per step in the timed run), <phase>_ms and device_ms (device time per step of its shadow
        steps), replay_ms (a CUDA-graph replay's device time, graph classes).
    seeds: drawn in the trial, after the engine started: "tokens" (the timed run's prompt token ids,
        novainfer.ab.workload) and "gate_sample" (which planned steps the gate replayed, drawn after the run).
    outputs: every request's output token ids of the timed run, in workload order: what the output check
        (novainfer.ab.output_check) verifies, with metrics output_tokens_produced / _checked / _outside,
        output_margin, output_floor_delta, output_worst_ratio and output_check_seconds.
    """

    sweep_id: str
    trial_id: str
    arm: str
    arm_params: dict[str, Any]
    repeat: int
    order: int
    status: Status
    reason: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    breakdown: dict[str, dict[str, float]] = field(default_factory=dict)
    seeds: dict[str, int] = field(default_factory=dict)
    outputs: list[list[int]] = field(default_factory=list)
    started_at: float = 0.0
    finished_at: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrialRecord:
        return cls(**data)
