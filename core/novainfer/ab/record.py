"""The result of one trial: what the ledger stores (one JSON line each) and MLflow logs."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Status = Literal["ok", "incorrect", "caliber_mismatch", "failed", "timeout", "skipped"]
# Only these statuses may be ranked or called a winner; every other one is shown, never compared.
RANKABLE: tuple[Status, ...] = ("ok",)


@dataclass
class TrialRecord:
    """One trial of a sweep.

    sweep_id: the sweep's identity (a hash of the experiment file's resolved content).
    trial_id: unique within the sweep, stable across --resume: f"{arm}#{repeat}".
    arm: the arm's label, e.g. "backend=native,block_size=16"; trials of one arm share it.
    arm_params: the axis values that define the arm, e.g. {"backend": "native", "block_size": 16}.
    repeat: 0-based repeat index; order: position in the interleaved schedule.
    status: "ok" only when the correctness gate passed and the caliber check matched.
    reason: why the status is not "ok" (one line), else None.
    config: the fully resolved engine config the trial ran with.
    params: flat string params for MLflow (config, backend, plugin and library versions).
    metrics: numeric results (output_tok_s, total_tok_s, run_seconds, prefill_tokens, decode_tokens,
        expected_tokens, actual_tokens, phase_<name>_s, num_steps, peak_memory_bytes,
        timed_graph_builds, timed_jit_compiles, max_rel_err, ...).
    tags: strings for MLflow tags (device name, driver, torch and CUDA versions, git commit, host).
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
    started_at: float = 0.0
    finished_at: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrialRecord:
        return cls(**data)
