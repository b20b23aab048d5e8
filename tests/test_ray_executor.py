"""`nova-ab sweep --executor ray` on a real local Ray (2 CPUs, GPUs declared as resources), real trials and store."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from test_sweep import SMOKE, ledger_records, nova_ab, runs, wait_for_first_trial, write_experiment

from novainfer.ab.sweep.outcome import EXIT_TRIALS_FAILED

RAY = [str(Path(sys.executable).with_name("ray"))]  # the CLI installed beside this Python
# Ray 2.5x asks a cluster started from the command line for a token its clients then lack: a test cluster on
# loopback needs none.
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


def test_the_smoke_sweep_through_a_local_ray(tmp_path: Path) -> None:
    result = nova_ab(tmp_path, "sweep", str(SMOKE), "--executor", "ray", env=RAY_ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    records = ledger_records(tmp_path)
    assert sorted(r["trial_id"] for r in records) == sorted({r["trial_id"] for r in records})
    assert len(records) == 4 and {r["status"] for r in records} == {"ok"}
    assert {r["tags"]["executor"] for r in records} == {"ray"}
    assert len(list(tmp_path.glob(".nova-ab/*/logs/*.log"))) == 4  # the driver wrote each trial's log
    parents, children = runs(tmp_path, "nova-ab")
    assert len(parents) == 1 and len(children) == 4
    assert {c.info.status for c in children} == {"FINISHED"}


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Ray head on this machine with 2 CPUs and 2 GPUs declared as resources; yields its address."""
    env = {**os.environ, **RAY_ENV}
    started = subprocess.run(
        [*RAY, "start", "--head", "--num-cpus=2", "--num-gpus=2", "--port=0", "--include-dashboard=false",
         "--disable-usage-stats"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    address = re.search(r"ray start --address='([^']+)'", started.stdout + started.stderr)
    assert started.returncode == 0 and address, started.stdout + started.stderr
    yield address.group(1)
    subprocess.run([*RAY, "stop", "--force"], capture_output=True, env=env, timeout=120)


def test_each_repeat_block_runs_on_one_gpu_of_the_cluster(tmp_path: Path, ray_head: str) -> None:
    exp = tmp_path / "gpus.toml"
    exp.write_text(
        """
[workload]
num_seqs = 3
input_len = [8, 16]
output_len = [2, 4]

[engine]
model = "random:qwen2-tiny"
device = "cpu"
max_model_len = 32
kv_cache_capacity = 256

[sweep]
repeats = 2
executor = "ray"
axes = { max_num_batched_tokens = [16, 64] }

[sweep.ray]
gpus_per_trial = 1   # declared GPUs: each worker holds one, and each repeat block runs on one worker
"""
    )
    result = nova_ab(tmp_path, "sweep", str(exp), env={**RAY_ENV, "RAY_ADDRESS": ray_head})
    assert result.returncode == 0, result.stderr[-3000:]
    records = ledger_records(tmp_path)
    assert len(records) == 4 and {r["status"] for r in records} == {"ok"}
    gpus_of_block: dict[int, set[str]] = {}
    for r in records:
        gpus_of_block.setdefault(r["repeat"], set()).add(r["tags"]["ray_gpu_ids"])
    assert all(len(gpus) == 1 for gpus in gpus_of_block.values()), gpus_of_block  # every arm of a repeat, one GPU
    assert {gpu for gpus in gpus_of_block.values() for gpu in gpus} <= {"0", "1"}


@pytest.fixture(scope="module")
def faulty_site(pip_install: Callable[[Path], Path]) -> Path:
    return pip_install(Path(__file__).resolve().parent / "plugins" / "faulty")


def test_a_crashing_and_a_hanging_trial_are_isolated(tmp_path: Path, faulty_site: Path) -> None:
    exp = write_experiment(tmp_path / "faults.toml", ["native", "raises", "hangs"], 1, 20)
    result = nova_ab(
        tmp_path, "sweep", str(exp), "--executor", "ray", env={**RAY_ENV, "PYTHONPATH": str(faulty_site)}
    )
    assert result.returncode == EXIT_TRIALS_FAILED, result.stderr[-3000:]  # a failed and a timed-out trial
    status = {r["arm"]: r for r in ledger_records(tmp_path)}
    assert status["backend=native"]["status"] == "ok"
    assert status["backend=raises"]["status"] == "failed" and "injected" in status["backend=raises"]["reason"]
    assert status["backend=hangs"]["status"] == "timeout"


def test_a_killed_driver_resumes_without_duplicates_on_either_executor(tmp_path: Path, ray_head: str) -> None:
    exp = write_experiment(tmp_path / "resume.toml", ["native"], 4, 120)
    env = {**os.environ, **RAY_ENV, "RAY_ADDRESS": ray_head, "MLFLOW_DISABLE_TELEMETRY": "true"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "novainfer.ab.sweep.cli", "sweep", str(exp), "--executor", "ray"], cwd=tmp_path,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )
    wait_for_first_trial(tmp_path)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = ledger_records(tmp_path)
    assert 1 <= len(before) < 4, "the kill should land midway"
    resumed = nova_ab(tmp_path, "sweep", str(exp), "--resume", "--executor", "local")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = ledger_records(tmp_path)
    assert sorted(r["trial_id"] for r in after) == [f"backend=native#{i}" for i in range(4)]
    parents, children = runs(tmp_path, "nova-ab")
    assert len(parents) == 1 and sorted(c.data.tags["nova.trial_id"] for c in children) == [
        f"backend=native#{i}" for i in range(4)
    ]


def test_without_ray_the_executor_says_how_to_install_it(tmp_path: Path) -> None:
    blocked = (
        "import sys; sys.modules['ray'] = None; from novainfer.ab.sweep.cli import main; "
        f"sys.exit(main(['sweep', {str(SMOKE)!r}, '--executor', 'ray']))"
    )
    result = subprocess.run([sys.executable, "-c", blocked], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.endswith("sweep.executor: Ray is not installed (pip install 'novainfer[ray]')"), line
    assert not (tmp_path / ".nova-ab").exists()


def test_the_executor_is_not_part_of_what_a_sweep_measures(tmp_path: Path) -> None:
    from novainfer.ab.sweep.experiment import load_experiment

    local = write_experiment(tmp_path / "a.toml", ["native"], 2, 60)
    ray = tmp_path / "b.toml"
    ray.write_text(local.read_text().replace("axes = {", 'executor = "ray"\naxes = {', 1))
    assert load_experiment(local).sweep_id == load_experiment(ray).sweep_id
    assert json.dumps(load_experiment(ray).to_dict()).count("ray") == 0
