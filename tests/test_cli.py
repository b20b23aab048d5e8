"""`nova-ab` as people use it every day: help, --version, read-only compare, piped tables, dry runs, Ctrl-C."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest
from test_sweep import SMOKE, client, ledger_records, nova_ab, runs, wait_for_first_trial, write_experiment

from novainfer.ab.sweep.arm_checks import check_arms
from novainfer.ab.sweep.executor import LocalSubprocessExecutor, ProgressCallback, _signal_name
from novainfer.ab.sweep.experiment import load_experiment, plan_trials
from novainfer.ab.sweep.interrupts import interrupts_kept
from novainfer.ab.sweep.outcome import EXIT_TRIALS_FAILED
from novainfer.ab.sweep.runner import SweepInterrupted, run_sweep
from novainfer.ab.wire import TrialRecord, TrialRequest


def test_bare_nova_ab_prints_help_and_version_says_the_version() -> None:
    bare = subprocess.run([sys.executable, "-m", "novainfer.ab.sweep.cli"], capture_output=True, text=True)
    assert bare.returncode == 0 and "usage: nova-ab" in bare.stdout and "sweep" in bare.stdout
    assert bare.stderr == ""
    version = subprocess.run(
        [sys.executable, "-m", "novainfer.ab.sweep.cli", "--version"], capture_output=True, text=True
    )
    from importlib.metadata import version as installed

    assert version.returncode == 0 and version.stdout.strip() == f"nova-ab (novainfer) {installed('novainfer')}"


def test_compare_in_an_empty_folder_creates_nothing(tmp_path: Path) -> None:
    result = nova_ab(tmp_path, "compare")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_backends_stay_whole_when_piped(tmp_path: Path) -> None:
    table = nova_ab(tmp_path, "backends", env={"COLUMNS": "60"})
    assert table.returncode == 0, table.stderr
    assert "novainfer-plugin-native" in table.stdout.replace("\n", "").replace(" ", "").replace("│", "")
    assert "…" not in table.stdout and "..." not in table.stdout
    rows = json.loads(nova_ab(tmp_path, "backends", "--format", "json").stdout)
    native = next(r for r in rows if r["backend"] == "native")
    assert native["plugin"] == "novainfer-plugin-native" and native["here"] == "available"


def test_dry_run_names_the_sweep_as_the_run_will_and_says_what_is_skipped(tmp_path: Path) -> None:
    exp = write_experiment(tmp_path / "dry.toml", ["native", "flashinfer"], 1, 60)
    # device "auto": with flashinfer's plugin installed, a "cpu" engine would be a file error (it runs on CUDA only).
    exp.write_text(exp.read_text().replace('device = "cpu"', 'device = "auto"'))
    dry = nova_ab(tmp_path, "sweep", str(exp), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    first = dry.stdout.splitlines()[0]
    assert first.startswith("sweep dry #1 · ")
    lines = dry.stdout.splitlines()
    assert "  arm native: runs here" in lines
    # Whether flashinfer is installed is the machine's business: not installed, its arm says what to install;
    # installed, it runs here or says why not (on a CPU: it runs on CUDA only).
    flashinfer = next(line for line in lines if line.startswith("  arm flashinfer: "))
    try:
        distribution("novainfer-plugin-flashinfer")
    except PackageNotFoundError:
        assert flashinfer.startswith("  arm flashinfer: skipped here: ")
        assert "pip install novainfer-plugin-flashinfer" in flashinfer
    else:
        assert flashinfer == "  arm flashinfer: runs here" or (
            "pip install novainfer-plugin-flashinfer" not in flashinfer and "skipped here: flashinfer: " in flashinfer
        )
    assert not (tmp_path / ".nova-ab").exists()  # a dry run writes nothing
    real = nova_ab(tmp_path, "sweep", str(exp))
    skipped = any(line.startswith("  arm flashinfer: skipped here") for line in lines)
    # An arm that cannot run here is no result: exit 3 (novainfer.ab.sweep.outcome), and the table says why.
    assert real.returncode == (EXIT_TRIALS_FAILED if skipped else 0), real.stderr
    if skipped:
        assert "skipped: " in real.stdout and "exit 3:" in real.stdout
    sweep_name = first.removeprefix("sweep ").split(":")[0]
    parents, _ = runs(tmp_path, "nova-ab")
    assert [p.info.run_name for p in parents] == [sweep_name]
    again = nova_ab(tmp_path, "sweep", str(exp), "--dry-run")
    assert again.stdout.startswith("sweep dry #2 · ")


def test_compare_formats_and_writes_a_png_only_when_asked(tmp_path: Path) -> None:
    result = nova_ab(tmp_path, "sweep", str(SMOKE))
    assert result.returncode == 0, result.stderr[-2000:]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    parent = runs(tmp_path, "nova-ab")[0][0]
    artifacts = {a.path for a in client(tmp_path).list_artifacts(parent.info.run_id)}
    as_json = nova_ab(tmp_path, "compare", "--format", "json")
    assert as_json.returncode == 0, as_json.stderr
    rows = json.loads(as_json.stdout)
    assert rows[0]["arm"] == "bt=64" and rows[0]["baseline"]  # one name per arm, as in MLflow and the table
    assert rows[0]["settings"] == "backend=native,max_num_batched_tokens=64"
    assert rows[0]["sweep"] == parent.info.run_name
    # Another arm as the baseline, chosen when comparing (an unverified peer baseline carries no speedups).
    other = rows[1]["arm"]
    rebased = json.loads(nova_ab(tmp_path, "compare", "--format", "json", "--baseline", other).stdout)
    assert (rebased[0]["arm"], rebased[0]["baseline"]) == (other, True)
    assert not any(r["baseline"] for r in rebased[1:]) and rows[0]["arm"] in {r["arm"] for r in rebased[1:]}
    unknown = nova_ab(tmp_path, "compare", "--baseline", "no-such-arm")
    assert unknown.returncode == 2 and "Traceback" not in unknown.stderr
    (line,) = unknown.stderr.strip().splitlines()
    assert "--baseline" in line and "'no-such-arm'" in line and rows[0]["arm"] in line
    as_csv = nova_ab(tmp_path, "compare", "--format", "csv")
    assert as_csv.stdout.splitlines()[0].startswith("sweep,arm,baseline,measured,trials,median_tok_s")
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # compare wrote nothing
    assert {a.path for a in client(tmp_path).list_artifacts(parent.info.run_id)} == artifacts
    out = tmp_path / "plots" / "cmp.png"
    out.parent.mkdir()
    with_png = nova_ab(tmp_path, "compare", "--out", str(out))
    assert with_png.returncode == 0 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ctrl_c_ends_with_one_line_and_the_resume_command(tmp_path: Path) -> None:
    exp = write_experiment(tmp_path / "interrupt.toml", ["native"], 4, 120)
    proc = subprocess.Popen(
        [sys.executable, "-m", "novainfer.ab.sweep.cli", "sweep", str(exp)], cwd=tmp_path, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
        # As at a terminal: a shell that runs the tests in the background hands its children SIGINT ignored,
        # and Python then installs no KeyboardInterrupt.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    wait_for_first_trial(tmp_path)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "Traceback" not in stderr
    (line,) = stderr.strip().splitlines()
    # The command as this shell reaches nova-ab (here run as a module), to run as printed.
    assert line.endswith(f"-m novainfer.ab.sweep.cli sweep {exp} --resume"), line
    printed = line.split("resume with: ")[1]
    done = len(ledger_records(tmp_path))
    assert 1 <= done < 4
    parents, _ = runs(tmp_path, "nova-ab")
    assert [p.info.status for p in parents] == ["KILLED"]
    resumed = subprocess.run(
        shlex.split(printed), cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert sorted(r["trial_id"] for r in ledger_records(tmp_path)) == [f"backend=native#{i}" for i in range(4)]
    parents, children = runs(tmp_path, "nova-ab")
    assert [p.info.status for p in parents] == ["FINISHED"] and len(children) == 4


def _interrupted_sweep(tmp_path: Path, monkeypatch, executor: LocalSubprocessExecutor) -> SweepInterrupted:
    """A sweep of 2 native trials through `executor`, in-process with SIGINT handled as at a terminal (see the
    test above), which must end interrupted; returns how."""
    exp = write_experiment(tmp_path / "interrupted.toml", ["native"], 2, 120)
    monkeypatch.chdir(tmp_path)
    experiment = load_experiment(exp)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(SweepInterrupted) as stopped:
            run_sweep(experiment, plan_trials(experiment, 0), check_arms(experiment), order_seed=0, executor=executor)
    finally:
        sys.setprofile(None)  # a profiler an executor set and the interrupt left behind
        signal.signal(signal.SIGINT, previous)
    return stopped.value


class _InterruptedInAFinalizer:
    """Ctrl-C landing while Python runs this object's finalizer: Python prints "Exception ignored in ..." and
    drops the KeyboardInterrupt, as it does for any finalizer (an MLflow session's, a Popen's) the signal hits."""

    def __del__(self) -> None:
        signal.raise_signal(signal.SIGINT)


class _DroppingExecutor(LocalSubprocessExecutor):
    """The local executor, with a Ctrl-C dropped by a finalizer as its first trial ends."""

    def run_trial(self, request: TrialRequest, timeout_s: float, on_progress: ProgressCallback) -> TrialRecord:
        record = super().run_trial(request, timeout_s, on_progress)
        if request.repeat == 0:
            _InterruptedInAFinalizer()
        return record


# A drop that reached Python's report (pytest's hook turns it into this warning) would print a traceback.
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_a_ctrl_c_that_python_drops_in_a_finalizer_still_stops_the_sweep(tmp_path: Path, monkeypatch) -> None:
    stopped = _interrupted_sweep(tmp_path, monkeypatch, _DroppingExecutor(tmp_path / "logs"))
    assert "1 of 2 trials are in the ledger" in str(stopped)
    assert [r["trial_id"] for r in ledger_records(tmp_path)] == ["backend=native#0"]
    parents, _ = runs(tmp_path, "nova-ab")
    assert [p.info.status for p in parents] == ["KILLED"]


class _CtrlCInTheFirstCommit(LocalSubprocessExecutor):
    """The local executor; after its first trial, a Ctrl-C lands inside the next sqlite COMMIT in this process:
    the middle of the MLflow transaction that logs that trial, its write lock taken."""

    fired = False

    def run_trial(self, request: TrialRequest, timeout_s: float, on_progress: ProgressCallback) -> TrialRecord:
        record = super().run_trial(request, timeout_s, on_progress)
        if request.repeat == 0:
            sys.setprofile(self._interrupt_the_next_commit)
        return record

    def _interrupt_the_next_commit(self, frame, event: str, arg: object) -> None:
        if event == "call" and frame.f_code.co_name == "_commit_impl":  # SQLAlchemy's Connection commit
            sys.setprofile(None)
            type(self).fired = True
            signal.raise_signal(signal.SIGINT)


def test_a_ctrl_c_inside_an_mlflow_write_waits_for_it(tmp_path: Path, monkeypatch) -> None:
    """Interrupted halfway, the transaction kept sqlite's lock and marking the sweep KILLED hung on "database is
    locked" (CI): held back, the Ctrl-C stops the sweep once the trial is logged whole."""
    stopped = _interrupted_sweep(tmp_path, monkeypatch, _CtrlCInTheFirstCommit(tmp_path / "logs"))
    assert _CtrlCInTheFirstCommit.fired, "no sqlite commit was interrupted: the test tested nothing"
    assert "1 of 2 trials are in the ledger" in str(stopped)
    (record,) = ledger_records(tmp_path)
    parents, children = runs(tmp_path, "nova-ab")
    assert [p.info.status for p in parents] == ["KILLED"]
    (child,) = children
    assert child.info.status == "FINISHED"
    assert child.data.metrics == pytest.approx(record["metrics"])


def test_a_held_ctrl_c_is_raised_when_the_block_ends_and_a_second_one_at_once() -> None:
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as at a terminal
    finished = []
    try:
        with interrupts_kept() as interrupts:
            with pytest.raises(KeyboardInterrupt), interrupts.held():
                signal.raise_signal(signal.SIGINT)
                finished.append("the write")  # ran to its end: the interrupt waited
            with pytest.raises(KeyboardInterrupt), interrupts.held():
                signal.raise_signal(signal.SIGINT)  # the user presses again: no more waiting
                finished.append("never")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert finished == ["the write"]


def test_interrupts_kept_leaves_a_sigint_the_shell_ignores_ignored() -> None:
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with interrupts_kept() as interrupts:
            signal.raise_signal(signal.SIGINT)
            interrupts.check()  # nothing arrived: an ignored SIGINT stays ignored
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_signal_deaths_say_which_signal() -> None:
    assert _signal_name(signal.SIGSEGV) == "SIGSEGV"
    assert _signal_name(signal.SIGKILL) == "SIGKILL (out of memory?)"
    assert _signal_name(200) == "signal 200"


def test_two_sweeps_started_together_on_a_fresh_store(tmp_path: Path) -> None:
    """Each with its own experiment file, one store: both finish, and the store reads back both whole."""
    files = [write_experiment(tmp_path / f"together{i}.toml", ["native"], 2, 120) for i in range(2)]
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "novainfer.ab.sweep.cli", "sweep", str(f)], cwd=tmp_path, env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        for f in files
    ]
    for proc in procs:
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-2000:]
    parents, children = runs(tmp_path, "nova-ab")
    assert sorted(p.info.run_name.split(" · ")[0] for p in parents) == ["together0 #1", "together1 #1"]
    assert len(children) == 4 and {p.info.status for p in parents} == {"FINISHED"}
    for name in ("together0", "together1"):
        compared = nova_ab(tmp_path, "compare", f"{name} #1 · " + next(
            p.info.run_name.split(" · ")[1] for p in parents if p.info.run_name.startswith(name)
        ))
        assert compared.returncode == 0, compared.stderr
