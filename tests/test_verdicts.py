"""A backend built to slip past the verdict must not: adversarial plugins through `nova-ab sweep`, pip-installed.

Each adversary (tests/plugins/adversarial) is native's attention made wrong in one step shape only, or an
engine that misreports which request a token belongs to. Through real sweeps (trial subprocesses, a real
MLflow store) every one is caught where its fault shows, none can win, an honest slow backend stays "ok" and
an honest fast one still wins; with the gate off, every arm is "unverified" and nothing is claimed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from test_sweep import ledger_records, nova_ab, runs

from novainfer.ab.compare import summarize
from novainfer.ab.record import TrialRecord, gate_coverage

ROOT = Path(__file__).resolve().parents[1]
WRONG_SHAPES = ["wrong-when-mixed", "wrong-when-continued", "wrong-past-48-keys"]
MISREPORTING = ["drops-token", "moves-token"]


@pytest.fixture(scope="module")
def adversarial_site(pip_install: Callable[[Path], Path]) -> Path:
    return pip_install(ROOT / "tests" / "plugins" / "adversarial")


def experiment(path: Path, backends: list[str], batched_tokens: int, repeats: int, extra: str = "") -> Path:
    """The smoke caliber (8 requests, prompts 16..64, outputs 8..32) on the attention-sensitive tiny model."""
    path.write_text(
        f"""
[workload]
num_seqs = 8
input_len = [16, 64]
output_len = [8, 32]

[engine]
model = "random:qwen2-tiny-wide"
device = "cpu"
dtype = "float32"
max_model_len = 128
max_num_seqs = 8
max_num_batched_tokens = {batched_tokens}
kv_cache_capacity = 1024

[sweep]
repeats = {repeats}
trial_timeout_s = 120
warmup_seqs = 2
baseline = {{ backend = "slow-but-right" }}
axes = {{ backend = {json.dumps(backends)} }}
{extra}
"""
    )
    return path


def records(cwd: Path) -> list[TrialRecord]:
    return [TrialRecord.from_dict(r) for r in ledger_records(cwd)]


def test_chunked_prefill_arm_catches_every_adversary_and_the_honest_fast_arm_wins(
    tmp_path: Path, adversarial_site: Path
) -> None:
    backends = ["slow-but-right", "native", *WRONG_SHAPES, *MISREPORTING]
    exp = experiment(tmp_path / "chunked.toml", backends, batched_tokens=64, repeats=2)
    result = nova_ab(tmp_path, "sweep", str(exp), env={"PYTHONPATH": str(adversarial_site)}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    by_arm: dict[str, list[TrialRecord]] = {}
    for record in records(tmp_path):
        by_arm.setdefault(record.arm_params["backend"], []).append(record)
    for backend in WRONG_SHAPES:
        for record in by_arm[backend]:
            assert record.status == "incorrect", (backend, record.status, record.reason)
            assert record.metrics["max_rel_err"] > 1e-2
    for backend in MISREPORTING:
        for record in by_arm[backend]:
            # The total is right for moves-token: only the per-request rule catches it.
            assert record.status == "caliber_mismatch", (backend, record.status, record.reason)
            assert record.metrics["requests_off"] == (1 if backend == "drops-token" else 2)
            assert (record.metrics["actual_tokens"] == record.metrics["expected_tokens"]) is (backend == "moves-token")
    for backend in ("slow-but-right", "native"):
        assert {r.status for r in by_arm[backend]} == {"ok"}
    # The gate replayed every kind of step this arm's run has; the ones the adversaries target are among them.
    coverage = gate_coverage(by_arm["native"][0].metrics)
    assert all(c["checked"] >= 1 for c in coverage.values()), coverage
    for kind in ("mixed", "continued-chunk", "first-chunk", "longest-context"):
        assert coverage[kind]["run_steps"] >= 1 and coverage[kind]["checked"] >= 1, kind

    summaries = {s.arm: s for s in summarize(records(tmp_path), "backend=slow-but-right")}
    winners = [arm for arm, s in summaries.items() if s.winner]
    assert winners == ["backend=native"], [(s.arm, s.speedup, s.p_value, s.verification) for s in summaries.values()]
    for backend in WRONG_SHAPES + MISREPORTING:
        assert summaries[f"backend={backend}"].flagged

    # The verdict is in MLflow too: status, coverage and the per-request caliber on every child.
    _, children = runs(tmp_path, "nova-ab")
    statuses = {c.data.tags["nova.arm"]: c.data.tags["nova.status"] for c in children}
    assert statuses["backend=moves-token"] == "caliber_mismatch"
    native = next(c for c in children if c.data.tags["nova.arm"] == "backend=native")
    assert native.data.metrics["requests_off"] == 0 and native.data.metrics["gate.mixed.checked"] >= 1


def test_an_arm_without_a_shape_passes_with_that_shape_absent_from_its_run(
    tmp_path: Path, adversarial_site: Path
) -> None:
    """With a budget that never splits a prompt, no step mixes or continues a chunk: the adversaries that are
    wrong only there are right for this run, and the record shows the gate saw that those kinds are absent."""
    backends = ["slow-but-right", "wrong-when-mixed", "wrong-when-continued", "wrong-past-48-keys", "moves-token"]
    exp = experiment(tmp_path / "unchunked.toml", backends, batched_tokens=512, repeats=1)
    result = nova_ab(tmp_path, "sweep", str(exp), env={"PYTHONPATH": str(adversarial_site)}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    status = {r.arm_params["backend"]: r for r in records(tmp_path)}
    assert status["wrong-past-48-keys"].status == "incorrect"
    assert status["moves-token"].status == "caliber_mismatch"
    for backend in ("wrong-when-mixed", "wrong-when-continued"):
        record = status[backend]
        assert record.status == "ok", (backend, record.reason)
        coverage = gate_coverage(record.metrics)
        assert "mixed" not in coverage and "continued-chunk" not in coverage
        assert coverage["first-chunk"]["checked"] >= 1


def test_with_the_gate_off_every_arm_is_unverified_and_nothing_is_claimed(
    tmp_path: Path, adversarial_site: Path
) -> None:
    exp = experiment(
        tmp_path / "off.toml", ["slow-but-right", "wrong-when-mixed"], batched_tokens=64, repeats=2,
        extra="[sweep.correctness]\nenabled = false",
    )
    result = nova_ab(tmp_path, "sweep", str(exp), env={"PYTHONPATH": str(adversarial_site)}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    trials = records(tmp_path)
    assert {r.status for r in trials} == {"unverified"}
    assert all("switched off" in (r.reason or "") for r in trials)
    assert all("max_rel_err" not in r.metrics for r in trials)
    summaries = summarize(trials, "backend=slow-but-right")
    assert not any(s.winner for s in summaries)
    assert all(s.speedup is None and s.verification == "unverified" for s in summaries)
    assert all(s.median is not None for s in summaries)  # measured, shown, never ranked
    assert "UNVERIFIED" in result.stdout
    _, children = runs(tmp_path, "nova-ab")
    assert {c.data.tags["nova.status"] for c in children} == {"unverified"}
    assert {c.data.tags["correctness_gate"] for c in children} == {"disabled"}
