"""The wire format between the two halves of nova-ab: what the sweep process sends a trial and gets back.

The sweep side (novainfer.ab.sweep: experiment files, runner, executors, ledger, MLflow, statistics, report,
CLI) and the trial side (novainfer.ab.trial: the trial procedure, engines, gate, schedule, phases, output
check) both import this module and nothing of each other's insides; it imports neither, nor torch. A
TrialRequest goes to a trial process as JSON on stdin; a TrialRecord comes back as JSON, is appended to the
ledger and logged to MLflow; an OutputCheck comes back from the output-check process.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from novainfer.ab.serving import ServingSettings
from novainfer.ab.workload import Workload

Status = Literal["ok", "unverified", "incorrect", "caliber_mismatch", "failed", "timeout", "skipped"]
# Only these statuses may be ranked, called a winner or be the baseline of a speedup claim.
RANKABLE: tuple[Status, ...] = ("ok",)
# Trials that ran the whole workload to the right lengths: their throughput is a measurement, shown in every
# table, but an "unverified" one (no correctness gate ran) is never ranked.
MEASURED: tuple[Status, ...] = ("ok", "unverified")
# Trials that prove the arm wrong: its numbers are shown, it can never win.
FLAG_STATUSES: tuple[Status, ...] = ("incorrect", "caliber_mismatch")

# Metric names a trial's record carries besides the throughput ones (see TrialRecord.metrics):
# the correctness gate's coverage, per step kind (novainfer.ab.trial.gate.STEP_KINDS and "decode-b<bucket>" /
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
            timed_cuda_mallocs, timed_tensor_allocs, timed_<backend counter>, kv_cache_blocks, host_us_per_step
            (median host work per step), host_hidden_fraction (its share run while the device was busy), with
            prefix caching prefix_hit_rate_tokens / _blocks, prefix_hit_tokens, prefix_preempted_hit_tokens and
            prefix_blocks_evicted (novainfer.prefix_cache), and the phase
            breakdown phase_<metadata|kv_write|attention>_s over the whole run (tag phases_cover says how) and
            phases_seconds, what measuring it took (after the timed window).
    tags: strings for MLflow tags (device name, driver, torch and CUDA versions, git commit, host, the gate's
        method and the phases' coverage).
    breakdown: our engine's timed run by step class (novainfer.ab.trial.phases): class -> steps, sampled, wall_ms
        (mean per step in the timed run), <phase>_ms and device_ms (device time per step of its shadow
        steps), replay_ms (a CUDA-graph replay's device time, graph classes).
    seeds: drawn in the trial, after the engine started: "tokens" (the timed run's prompt token ids,
        novainfer.ab.workload) and "gate_sample" (which planned steps the gate replayed, drawn after the run).
    online calibers (TrialRequest.serving) add the latency metrics of novainfer.ab.trial.latency: <ttft|tpot|itl|
        e2e>_ms_<mean|median|p90|p99> over the steady window, request_throughput, offered_rate, declared_rate,
        good_requests, good_fraction, goodput_req_s, queue_wait_ms_mean, the window and the SLO declared
        (slo_<target>, slo_attainment); and reconstructed_steps_off (recorded steps the run's reconstruction
        misses) in place of schedule_steps_off.
    outputs: every request's output token ids of the timed run, in workload order: what the output check
        (novainfer.ab.trial.output_check) verifies, with metrics output_tokens_produced / _checked / _outside,
        output_margin, output_floor_delta, output_worst_ratio and output_check_seconds.
    throttled: the GPU's thermal or power throttle reasons seen in the timed window, in words ("sw power cap");
        None when it saw none, or had no telemetry (novainfer.ab.trial.telemetry; its gpu_* metrics and tags).
    telemetry: the GPU's state sampled over the timed window: "t_s" (seconds into it) and one list per
        quantity (sm_clock_mhz, mem_clock_mhz, temperature_c, power_w); empty without telemetry.
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
    throttled: str | None = None
    telemetry: dict[str, list[float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrialRecord:
        return cls(**data)


@dataclass(frozen=True)
class GateSettings:
    """[sweep.correctness]: whether the checks run (the step gate and the output check); a step passes when its
    worst row's error is within max(min(max_rel_err, MIN_BAR of its dtype), floor_margin x the floor's worst
    row in that step); floor_margin also scales the output check's margin; how often each kind is checked."""

    enabled: bool = True
    max_rel_err: float = 1e-2
    floor_margin: float = 2.0
    steps_per_kind: int = 1


@dataclass(frozen=True)
class TrialRequest:
    sweep_id: str
    trial_id: str
    arm: str
    arm_params: dict[str, Any]
    repeat: int
    order: int
    config: dict[str, Any]
    workload: Workload
    warmup_seqs: int
    gate: GateSettings
    result_path: str
    source_dir: str  # where the experiment file lives, for the git commit tag
    extra: dict[str, Any] = field(default_factory=dict)
    peer: dict[str, Any] | None = None  # a peer arm's {"peer": name, **its settings}; None runs our engine
    serving: ServingSettings | None = None  # an online caliber's arrivals and SLO (novainfer.ab.serving); None: offline

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> TrialRequest:
        data = json.loads(text)
        data["workload"] = Workload(**data["workload"])
        data["gate"] = GateSettings(**data["gate"])
        if data.get("serving") is not None:
            data["serving"] = ServingSettings.from_dict(data["serving"])
        return cls(**data)


def new_record(request: TrialRequest) -> TrialRecord:
    """The trial's record before it runs: "failed" until it proves otherwise."""
    return TrialRecord(
        sweep_id=request.sweep_id, trial_id=request.trial_id, arm=request.arm, arm_params=request.arm_params,
        repeat=request.repeat, order=request.order, status="failed", config=request.config,
        started_at=time.time(),
    )


OUTPUT_CHECK_METHOD = (
    "every output token of the timed run, teacher-forced through the core's reference (float64 attention) in a "
    "process with no backend plugin, within floor_margin x twice the largest logit difference of the floor (the "
    "arm's dtypes, SDPA) from the reference"
)


@dataclass
class OutputCheck:
    """What the output check found. worst_ratio: the worst token's gap over the margin (passing is <= 1; NaN
    fails). worst_request / worst_position: that token's request and its index among the request's outputs.
    plugins_loaded: modules of installed backend plugins present in the checking process (must be none).
    seconds: the check's whole time in its process; build_seconds of it building the two engines (the rest is
    teacher forcing, over `steps` prefill steps of each engine)."""

    tokens_produced: int
    tokens_checked: int = 0
    tokens_outside: int = 0
    margin: float = 0.0
    floor_delta: float = 0.0
    worst_ratio: float = 0.0
    worst_gap: float = 0.0
    worst_request: int = -1
    worst_position: int = -1
    worst_token: int = -1
    reference_token: int = -1
    seconds: float = 0.0
    build_seconds: float = 0.0
    steps: int = 0
    plugins_loaded: tuple[str, ...] = ()

    def passed(self) -> bool:
        """Every checked token within the margin (whether the check was independent is `plugins_loaded`)."""
        return self.tokens_outside == 0 and self.worst_ratio <= 1.0

    def complete(self) -> bool:
        return self.tokens_checked == self.tokens_produced

    def problem(self) -> str:
        return (
            f"{self.tokens_outside} of {self.tokens_checked} output tokens outside the reference's margin; worst: "
            f"request {self.worst_request}, output token {self.worst_position}: produced {self.worst_token}, whose "
            f"logit is {self.worst_gap:.3g} below the reference's top ({self.reference_token}), margin "
            f"{self.margin:.3g}"
        )

    def metrics(self) -> dict[str, float]:
        return {
            "output_tokens_produced": self.tokens_produced, "output_tokens_checked": self.tokens_checked,
            "output_tokens_outside": self.tokens_outside, "output_margin": self.margin,
            "output_floor_delta": self.floor_delta, "output_worst_ratio": self.worst_ratio,
            "output_check_seconds": self.seconds, "output_check_build_seconds": self.build_seconds,
            "output_check_steps": self.steps,
        }

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> OutputCheck:
        data = json.loads(text)
        data["plugins_loaded"] = tuple(data["plugins_loaded"])
        return cls(**data)
