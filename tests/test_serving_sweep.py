"""Online calibers through `nova-ab sweep`: real trial subprocesses on a tiny model, a real MLflow store in a temp
dir. An engine setting that delays first tokens (a token budget of 4 splits every prompt into chunks) loses on
TTFT and the verdict says so; every trial keeps the trust rules (lengths checked, every output token checked,
the gate over every kind of step the run executed, reconstructed from the run); a wrong backend is still
"incorrect"; `nova-ab compare` reads the online comparison back from the store."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from test_sweep import ledger_records, nova_ab, runs

from novainfer.ab.sweep.serving_stats import compare
from novainfer.ab.wire import TrialRecord, gate_coverage

ROOT = Path(__file__).resolve().parents[1]
# One thread per trial process: a CPU matmul split over threads on a loaded machine waits for its slowest
# thread, which makes a prefill step's time swing tenfold with the neighbours' load; one thread keeps latency
# a measure of the steps (the comparison also pairs arms by repeat block, so slow drift cancels).
SINGLE_THREAD = {"OMP_NUM_THREADS": "1"}
LATENCY_METRICS = {
    f"{metric}_{stat}"
    for metric in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")
    for stat in ("mean", "median", "p90", "p99")
} | {"request_throughput", "goodput_req_s", "good_fraction", "good_requests", "offered_rate", "requests_in_window"}


@pytest.fixture(scope="module")
def faulty_site(pip_install: Callable[[Path], Path]) -> Path:
    return pip_install(ROOT / "tests" / "plugins" / "faulty")


def online_experiment(path: Path, axes: str, repeats: int, num_seqs: int = 10) -> Path:
    path.write_text(
        f"""
[workload]
num_seqs = {num_seqs}
seed = 1

[workload.lengths]
mix = "random"
input_len = 64
output_len = 6
range_ratio = 0.25

# One request in flight at a time, the next always waiting on the client: no queue in the engine, so TTFT is
# the first token's own steps (a 48..80-token prompt: one step at a budget of 512, 12..20 at a budget of 4; on
# the small model a step's cost is mostly its fixed part), and the trial takes no longer than the engine needs.
[workload.arrivals]
rate = 50
max_concurrency = 1

[engine]
model = "random:qwen2-tiny"
device = "cpu"
dtype = "float32"
max_model_len = 160
kv_cache_capacity = 2048

[sweep]
repeats = {repeats}
trial_timeout_s = 180
warmup_seqs = 2

[sweep.axes]
{axes}

[metrics]
steady_state = [0.0, 1.0]

[metrics.slo]
ttft_ms = 60000
tpot_ms = 60000
"""
    )
    return path


def test_a_token_budget_that_delays_first_tokens_loses_on_ttft(tmp_path: Path) -> None:
    exp = online_experiment(tmp_path / "online.toml", "max_num_batched_tokens = [512, 4]", repeats=4)
    result = nova_ab(tmp_path, "sweep", str(exp), env=SINGLE_THREAD, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    records = [TrialRecord.from_dict(r) for r in ledger_records(tmp_path)]
    assert len(records) == 8 and {r.status for r in records} == {"ok"}, [(r.status, r.reason) for r in records]
    for record in records:
        metrics = record.metrics
        assert set(metrics) >= LATENCY_METRICS, LATENCY_METRICS - set(metrics)
        assert metrics["requests_off"] == 0 and metrics["declared_rate"] == 50
        assert metrics["output_tokens_checked"] == metrics["output_tokens_produced"] == metrics["expected_tokens"]
        # The gate covered every kind of step the run executed, as rebuilt from the run and matched to it.
        assert metrics["reconstructed_steps_off"] == 0 and "schedule_steps_off" not in metrics
        coverage = gate_coverage(metrics)
        assert coverage and all(c["checked"] >= 1 for c in coverage.values() if c["run_steps"])
        assert metrics["gate_run_steps"] == metrics["num_steps"]
        # A generous SLO: every request is good.
        assert metrics["good_fraction"] == 1
    comparison = compare(records, "max_num_batched_tokens=512")
    (slow,) = [s for s in comparison.arms if not s.is_baseline]
    assert slow.latency["ttft_ms_median"].verdict == "worse" and slow.latency["ttft_ms_median"].ratio > 3
    words = " ".join(result.stdout.split())
    # Each arm by its short name, as MLflow's runs table names its children ("bt=4 · #0"), in the live table ...
    assert "bt=4 vs the baseline: TTFT median" in words and "(worse, Holm p =" in words
    parents, children = runs(tmp_path, "nova-ab")
    assert len(parents) == 1 and len(children) == 8
    description = parents[0].data.tags["mlflow.note.content"]
    assert "TTFT median" in description and "worse" in description and "lower is better" in description
    assert any(key.endswith(": ttft_ms_median") for key in parents[0].data.metrics)
    compared = nova_ab(tmp_path, "compare")
    assert compared.returncode == 0, compared.stderr
    # ... and in the comparison read back from the store.
    compared_words = " ".join(compared.stdout.split())
    assert "Latency under load" in compared_words and "bt=4 vs the baseline: TTFT median" in compared_words


def test_a_wrong_backend_is_still_incorrect_online(tmp_path: Path, faulty_site: Path) -> None:
    exp = online_experiment(tmp_path / "wrong.toml", 'backend = ["native", "wrong"]', repeats=1, num_seqs=6)
    path = os.pathsep.join(p for p in (str(faulty_site), os.environ.get("PYTHONPATH")) if p)
    result = nova_ab(tmp_path, "sweep", str(exp), env={"PYTHONPATH": path, **SINGLE_THREAD}, timeout=600)
    assert result.returncode in (0, 3, 4), result.stderr[-3000:]
    status = {r["arm"]: r for r in ledger_records(tmp_path)}
    assert status["backend=native"]["status"] == "ok", status["backend=native"]["reason"]
    assert status["backend=wrong"]["status"] == "incorrect"
    assert "ttft_ms_median" in status["backend=wrong"]["metrics"]
