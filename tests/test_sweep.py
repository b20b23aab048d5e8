"""`nova-ab sweep` end to end: real trial subprocesses, a real MLflow store in a temp dir, real plugins."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from novainfer.ab.sweep.outcome import EXIT_TRIALS_FAILED

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "experiments" / "smoke.toml"
TRIAL_METRICS = {
    "output_tok_s", "total_tok_s", "run_seconds", "prefill_tokens", "decode_tokens", "expected_tokens",
    "actual_tokens", "phase_metadata_s", "phase_kv_write_s", "phase_attention_s", "num_steps",
    "peak_memory_bytes", "timed_cuda_mallocs", "max_rel_err",
}
# No commit tag: these sweeps run outside a git checkout (a commit goes to mlflow.source.git.commit: test_tracking).
TRIAL_TAGS = {"nova.status", "device_name", "driver", "torch_version", "cuda_version", "host"}


@pytest.fixture(scope="module")
def faulty_site(pip_install: Callable[[Path], Path]) -> Path:
    """The test-only faulty plugin, installed with pip."""
    return pip_install(ROOT / "tests" / "plugins" / "faulty")


def nova_ab(
    cwd: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "novainfer.ab.sweep.cli", *args], cwd=cwd, capture_output=True, text=True,
        timeout=timeout,
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", **(env or {})},
    )


def client(cwd: Path):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{cwd / 'mlflow.db'}")


def runs(cwd: Path, experiment: str) -> tuple[list, list]:
    mlflow = client(cwd)
    exp = mlflow.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r}"
    all_runs = mlflow.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in all_runs if r.data.tags.get("nova.kind") == "sweep"]
    children = [r for r in all_runs if r.data.tags.get("nova.kind") == "trial"]
    return parents, children


def ledger_records(cwd: Path) -> list[dict]:
    (ledger,) = cwd.glob(".nova-ab/*/ledger.jsonl")
    return [json.loads(line) for line in ledger.read_text().splitlines() if line.strip()]


def wait_for_first_trial(cwd: Path, timeout_s: float = 180) -> None:
    """Until the sweep running in `cwd` has a trial in its ledger (then a kill lands midway)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ledgers = list(cwd.glob(".nova-ab/*/ledger.jsonl"))
        if ledgers and ledgers[0].read_text().count("\n") >= 1:
            return
        time.sleep(0.1)


def write_experiment(path: Path, backends: list[str], repeats: int, timeout_s: float, extra: str = "") -> Path:
    path.write_text(
        f"""
[workload]
num_seqs = 4
input_len = [8, 24]
output_len = [4, 12]

[engine]
model = "random:qwen2-tiny"
device = "cpu"
max_model_len = 64
kv_cache_capacity = 512

[sweep]
repeats = {repeats}
trial_timeout_s = {timeout_s}
warmup_seqs = 1
axes = {{ backend = {json.dumps(backends)} }}
{extra}
"""
    )
    return path


def test_smoke_sweep_logs_a_parent_and_one_child_per_trial(tmp_path: Path) -> None:
    started = time.monotonic()
    result = nova_ab(tmp_path, "sweep", str(SMOKE))
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-3000:]
    assert elapsed < 120, f"the smoke sweep took {elapsed:.0f} s on this machine"
    assert "max_num_batched_tokens=64" in result.stdout and "max_num_batched_tokens=512" in result.stdout
    parents, children = runs(tmp_path, "nova-ab")
    assert len(parents) == 1 and len(children) == 4
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    for child in children:
        assert set(child.data.metrics) >= TRIAL_METRICS, TRIAL_METRICS - set(child.data.metrics)
        assert set(child.data.tags) >= TRIAL_TAGS, TRIAL_TAGS - set(child.data.tags)
        assert "git_commit" not in child.data.tags  # MLflow's standard tag or none, never a name of our own
        assert child.data.tags["nova.status"] == "ok"
        assert child.data.metrics["actual_tokens"] == child.data.metrics["expected_tokens"] > 0
        assert child.data.metrics["max_rel_err"] <= 1e-2
        assert child.data.params["backend"] == "native"
        assert child.data.params["plugin"] == "novainfer-plugin-native"
        assert "engine.max_num_batched_tokens" in child.data.params
        assert child.data.tags["gpu_telemetry"] == "absent: no GPU (a CPU trial)"
        assert next(iter(child.data.metrics)) == "output_tok_s"  # the headline first on the run's page
    # Interleaved: each repeat block runs both arms, in the order drawn from the seed the sweep recorded.
    from novainfer.ab.sweep.experiment import load_experiment, plan_trials

    order = sorted(children, key=lambda c: int(c.data.tags["nova.order"]))
    arms = [c.data.tags["nova.arm"] for c in order]
    assert arms[0] != arms[1] and set(arms[:2]) == set(arms[2:])
    seed = int(parents[0].data.params["sweep.order_seed"])
    assert arms == [t.arm.label for t in plan_trials(load_experiment(SMOKE), seed)]
    artifacts = {a.path for a in client(tmp_path).list_artifacts(children[0].info.run_id)}
    assert "config.json" in artifacts

    # The parent answers the A/B question: names that lead with what differs, per-arm summary metrics, the
    # verdict as its description, one plot, the workload as its dataset, and a view the sweep links to.
    parent = parents[0]
    assert parent.info.run_name.startswith("smoke #1 · ")
    assert sorted(c.info.run_name for c in children) == ["bt=512 · #0", "bt=512 · #1", "bt=64 · #0", "bt=64 · #1"]
    for arm in ("bt:64", "bt:512"):
        assert parent.data.metrics[f"{arm}: median_tok_s"] > 0 and parent.data.metrics[f"{arm}: verified"] == 1
    assert parent.data.metrics["bt:64: speedup"] == 1.0
    assert "engine.max_num_batched_tokens" not in parent.data.params  # the arms override it: not shared
    assert parent.data.params["sweep.axes.max_num_batched_tokens"] == "[64, 512]"
    note = parent.data.tags["mlflow.note.content"]
    assert note.splitlines()[0].startswith(("No winner", "bt="))
    assert "| bt=64 (baseline, too few repeats for an interval: range of 2 trials) |" in note  # 2 repeats: no CI
    assert [a.path for a in client(tmp_path).list_artifacts(parent.info.run_id)].count("comparison.png") == 1
    (dataset,) = client(tmp_path).get_run(parent.info.run_id).inputs.dataset_inputs
    assert dataset.dataset.name == "smoke" and '"num_seqs": 8' in dataset.dataset.source
    # A local store has no server yet: the sweep names the command that starts one and prints the link.
    hint = next(line for line in result.stdout.splitlines() if "starts MLflow's UI" in line)
    assert f"novainfer.ab.sweep.cli ui '{parent.info.run_name}'` (it starts MLflow's UI and prints the link)" in hint
    assert [line for line in result.stdout.splitlines() if "bt=64 · #0" in line]  # trial lines by the arm's name
    experiment = client(tmp_path).get_experiment_by_name("nova-ab")
    view = json.loads(experiment.tags[f"mlflow.sharedViewState.{parent.info.run_id}"])
    assert view["searchFilter"] == f"tags.`nova.sweep_id` = '{parent.data.tags['nova.sweep_id']}'"
    assert "metrics.`bt:512: speedup`" in view["selectedColumns"]
    assert view["compareRunCharts"][0]["metricKey"] == "output_tok_s"  # throughput first
    assert {c.data.tags["nova.arm_name"] for c in children} == {"bt=64", "bt=512"}

    compared = nova_ab(tmp_path, "compare")
    assert compared.returncode == 0, compared.stderr[-2000:]
    assert "max_num_batched_tokens=512" in compared.stdout
    assert compared.stdout.startswith(f"sweep {parent.info.run_name} (sqlite:")  # which sweep it shows
    assert f"ui '{parent.info.run_name}'` (it starts MLflow's UI" in compared.stdout.splitlines()[0]


def test_faulty_backends_are_recorded_and_the_sweep_goes_on(tmp_path: Path, faulty_site: Path) -> None:
    exp = write_experiment(tmp_path / "faults.toml", ["native", "raises", "wrong", "hangs"], 1, 25)
    result = nova_ab(tmp_path, "sweep", str(exp), env={"PYTHONPATH": str(faulty_site)})
    # The sweep went on, and its exit code and parent say that some trials gave no result.
    assert result.returncode == EXIT_TRIALS_FAILED, result.stderr[-3000:]
    assert "exit 3: some trials gave no result: 1 failed, 1 timeout" in " ".join(result.stdout.split())
    assert [p.info.status for p in runs(tmp_path, "nova-ab")[0]] == ["FAILED"]
    status = {r["arm"]: r for r in ledger_records(tmp_path)}
    assert status["backend=native"]["status"] == "ok"
    assert status["backend=raises"]["status"] == "failed"
    assert "injected attention failure" in status["backend=raises"]["reason"]
    assert status["backend=wrong"]["status"] == "incorrect"
    assert status["backend=hangs"]["status"] == "timeout"
    _, children = runs(tmp_path, "nova-ab")
    assert sorted(c.data.tags["nova.status"] for c in children) == ["failed", "incorrect", "ok", "timeout"]

    # Run again what gave no result for its surroundings (the crash, the hang), never the verdict "incorrect".
    alone = nova_ab(tmp_path, "sweep", str(exp), "--rerun-failed")
    assert alone.returncode == 2 and alone.stderr.strip() == (
        "nova-ab: --rerun-failed runs trials of an earlier sweep again: add --resume"
    )
    again = nova_ab(tmp_path, "sweep", str(exp), "--resume", "--rerun-failed", env={"PYTHONPATH": str(faulty_site)})
    assert again.returncode == EXIT_TRIALS_FAILED, again.stderr[-3000:]
    assert ": 2 of 4 trials to run;" in again.stdout
    lines = ledger_records(tmp_path)
    assert len(lines) == 6 and sorted(r["arm"] for r in lines[4:]) == ["backend=hangs", "backend=raises"]
    # In MLflow each trial has one child, the latest record's; the two it replaced are deleted (restorable).
    _, children = runs(tmp_path, "nova-ab")
    latest = {r["trial_id"]: int(r["finished_at"] * 1000) for r in lines}
    assert {c.data.tags["nova.trial_id"]: c.info.end_time for c in children} == latest
    from mlflow.entities import ViewType

    mlflow = client(tmp_path)
    gone = mlflow.search_runs([children[0].info.experiment_id], run_view_type=ViewType.DELETED_ONLY)
    assert sorted(r.data.tags["nova.arm"] for r in gone) == ["backend=hangs", "backend=raises"]


def test_sigkilled_sweep_is_finished_by_resume_with_one_child_per_trial(tmp_path: Path) -> None:
    exp = write_experiment(tmp_path / "resume.toml", ["native"], 4, 120, extra="")
    proc = subprocess.Popen(
        [sys.executable, "-m", "novainfer.ab.sweep.cli", "sweep", str(exp)], cwd=tmp_path,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
    )
    wait_for_first_trial(tmp_path)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = ledger_records(tmp_path)
    assert 1 <= len(before) < 4, "the kill should land midway"
    resumed = nova_ab(tmp_path, "sweep", str(exp), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{4 - len(before)} of 4 trials to run" in resumed.stdout
    after = ledger_records(tmp_path)
    assert sorted(r["trial_id"] for r in after) == [f"backend=native#{i}" for i in range(4)]
    parents, children = runs(tmp_path, "nova-ab")
    assert len(parents) == 1
    assert sorted(c.data.tags["nova.trial_id"] for c in children) == [f"backend=native#{i}" for i in range(4)]


def test_unreachable_mlflow_keeps_the_ledger_and_import_logs_it_once(tmp_path: Path) -> None:
    exp = write_experiment(tmp_path / "offline.toml", ["native"], 2, 120)
    result = nova_ab(tmp_path, "sweep", str(exp), "--tracking-uri", "http://127.0.0.1:9")
    assert result.returncode == 0, result.stderr[-3000:]
    (ledger,) = tmp_path.glob(".nova-ab/*/ledger.jsonl")
    assert len(ledger_records(tmp_path)) == 2
    # The command it prints runs as printed (nova-ab as it was run: here as a module).
    printed = re.search(r"log this sweep later with `([^`]+)`", result.stdout)
    assert printed is not None and printed.group(1).endswith(f"-m novainfer.ab.sweep.cli import {ledger}")
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    first, second = (
        subprocess.run(shlex.split(printed.group(1)), cwd=tmp_path, capture_output=True, text=True, env=env)
        for _ in range(2)
    )
    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    assert "logged 2 new" in first.stdout and "logged 0 new" in second.stdout
    parents, children = runs(tmp_path, "nova-ab")
    assert len(parents) == 1 and len(children) == 2


def test_backends_lists_installed_plugins_and_why_not(tmp_path: Path, faulty_site: Path) -> None:
    result = nova_ab(tmp_path, "backends", env={"PYTHONPATH": str(faulty_site), "COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    assert "native" in result.stdout and "novainfer-plugin-native" in result.stdout
    assert "novainfer-plugin-faulty" in result.stdout and "raises" in result.stdout


def test_import_of_a_missing_ledger_is_one_line_exit_2(tmp_path: Path) -> None:
    result = nova_ab(tmp_path, "import", "nope.jsonl")
    assert result.returncode == 2
    assert result.stderr.strip() == "nova-ab: nope.jsonl: no such ledger file"
