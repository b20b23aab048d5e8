"""A backend built to slip past the verdict must not: adversarial plugins through `nova-ab sweep`, pip-installed.

Each adversary (tests/plugins/adversarial) is native's attention made wrong in one step shape only, wrong
only when it can tell it is not being checked (another engine instance, a large cache, a call count, the
gate's module on the call stack), wrong in the run's commonest shape, one row or one length range, off by a
small uniform error, or an engine that misreports which request a token belongs to. Through real sweeps
(trial subprocesses, a real MLflow store) every one is caught, none can win, an honest slow backend stays
"ok" with every output token checked, and an honest fast one still wins; with the checks off, every arm is
"unverified" and nothing is claimed. A mutation (the output check removed) shows which adversaries only the
check of the timed run's own tokens catches.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from test_sweep import ledger_records, nova_ab, runs

from novainfer.ab.sweep.outcome import EXIT_NO_VERDICT
from novainfer.ab.sweep.statistics import summarize
from novainfer.ab.wire import TrialRecord, gate_coverage

ROOT = Path(__file__).resolve().parents[1]
WRONG_SHAPES = ["wrong-when-mixed", "wrong-when-continued", "wrong-past-48-keys"]
MISREPORTING = ["drops-token", "moves-token"]
# Right whenever they can tell they are checked: the step gate, which runs in their process, passes them.
TELL_CHECKS_APART = ["wrong-in-first-engine", "wrong-unless-checked"]
HIDDEN = [
    *TELL_CHECKS_APART, "wrong-with-large-cache", "wrong-after-24-steps", "wrong-every-12th-step",
    "wrong-at-max-seqs", "wrong-in-row-3", "wrong-for-lengths-39-46", "small-uniform-error",
]


@pytest.fixture(scope="module")
def adversarial_site(pip_install: Callable[[Path], Path]) -> Path:
    return pip_install(ROOT / "tests" / "plugins" / "adversarial")


def experiment(
    path: Path, backends: list[str], batched_tokens: int | list[int], repeats: int, extra: str = ""
) -> Path:
    """The smoke caliber (8 requests, prompts 16..64, outputs 8..32) on the attention-sensitive tiny model; a list
    of token budgets is an axis (the baseline at the first)."""
    if isinstance(batched_tokens, int):
        budget, axis, baseline = f"max_num_batched_tokens = {batched_tokens}", "", ""
    else:
        budget, axis = "", f", max_num_batched_tokens = {batched_tokens}"
        baseline = f", max_num_batched_tokens = {batched_tokens[0]}"
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
{budget}
kv_cache_capacity = 1024

[sweep]
repeats = {repeats}
trial_timeout_s = 120
warmup_seqs = 2
baseline = {{ backend = "slow-but-right"{baseline} }}
axes = {{ backend = {json.dumps(backends)}{axis} }}
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
    native = summaries["backend=native"]
    # Only the honest fast arm can win. Whether 2 repeats on a loaded machine resolve a ~10x difference is the
    # statistics' call, so the test asserts what they must say for the data they got, not that they resolve it.
    assert winners in ([], ["backend=native"]), [(s.arm, s.speedup, s.p_value) for s in summaries.values()]
    assert native.speedup is not None and native.speedup > 1 and native.verification == "verified"
    assert (winners == ["backend=native"]) is native.significant, (native.speedup, native.p_value)
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
    # An unverified baseline carries no verdict, and the exit code says so (novainfer.ab.sweep.outcome).
    assert result.returncode == EXIT_NO_VERDICT, result.stderr[-3000:]
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


def test_backends_that_hide_from_checks_are_incorrect_on_both_calibers_and_never_ranked(
    tmp_path: Path, adversarial_site: Path
) -> None:
    """The smoke caliber's two budgets (64 chunks prompts, 512 never does), every hidden fault."""
    exp = experiment(tmp_path / "hidden.toml", ["slow-but-right", *HIDDEN], batched_tokens=[64, 512], repeats=1)
    result = nova_ab(tmp_path, "sweep", str(exp), env={"PYTHONPATH": str(adversarial_site)}, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    trials = records(tmp_path)
    assert len(trials) == 2 * (1 + len(HIDDEN))
    for record in trials:
        backend, metrics = record.arm_params["backend"], record.metrics
        if backend == "slow-but-right":
            assert record.status == "ok", record.reason
            assert metrics["output_tokens_checked"] == metrics["output_tokens_produced"] == metrics["expected_tokens"]
            assert metrics["output_tokens_outside"] == 0 and metrics["output_check_seconds"] > 0
            assert 0 < metrics["output_check_build_seconds"] < metrics["output_check_seconds"]
            assert metrics["output_check_steps"] >= 1
            continue
        assert record.status == "incorrect", (backend, record.arm_params, record.status, record.reason)
        if backend in TELL_CHECKS_APART:
            # The step gate saw a right backend; only the timed run's own tokens give it away.
            assert metrics["gate_worst_ratio"] <= 1, (backend, metrics["gate_worst_ratio"])
            assert metrics["output_tokens_outside"] > 0 and "output token" in (record.reason or "")
            assert "request" in record.reason
    summaries = summarize(trials, "backend=slow-but-right,max_num_batched_tokens=64")
    assert not any(s.winner for s in summaries)
    flagged = {s.arm for s in summaries if s.flagged}
    assert all(any(f"backend={b}," in arm for arm in flagged) for b in HIDDEN)


def test_without_the_output_check_the_backends_that_tell_checks_apart_pass(
    tmp_path: Path, adversarial_site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The mutation: the executor with its output check removed lets them through as "ok", so that check is
    what catches them above."""
    from novainfer.ab.sweep import executor
    from novainfer.ab.wire import GateSettings, TrialRequest
    from novainfer.ab.workload import Workload
    from novainfer.config import EngineConfig

    monkeypatch.setenv("PYTHONPATH", str(adversarial_site))
    for mutated in (False, True):
        if mutated:
            monkeypatch.setattr(executor, "check_outputs", lambda *args: None)
        for backend in TELL_CHECKS_APART:
            config = EngineConfig(
                model="random:qwen2-tiny-wide", backend=backend, device="cpu", dtype="float32", max_model_len=128,
                max_num_seqs=8, max_num_batched_tokens=64, kv_cache_capacity=1024,
            )
            request = TrialRequest(
                sweep_id="s", trial_id=f"{backend}#0", arm=backend, arm_params={"backend": backend}, repeat=0,
                order=0, config=config.to_dict(), workload=Workload(8, (16, 64), (8, 32)), warmup_seqs=2,
                gate=GateSettings(), result_path="", source_dir=str(tmp_path),
            )
            record = executor.LocalSubprocessExecutor(tmp_path / "logs").run_trial(request, 300, lambda e: None)
            assert record.status == ("ok" if mutated else "incorrect"), (backend, mutated, record.reason)
