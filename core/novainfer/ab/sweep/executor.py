"""Where trials run. The runner talks only to `Executor`, so the local one and novainfer.ab.sweep.ray_executor's are
interchangeable: both run each trial in a fresh process, and hand every record back to the runner, which
alone writes the ledger and MLflow.

The runner hands an executor *repeat blocks*: the trials of one repeat, every arm once, in their planned
order. An executor runs a block's trials one after another on one device (a GPU or this machine), so each
repeat compares the arms on the same hardware; blocks may run at once on different devices.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

from novainfer.ab.wire import OUTPUT_CHECK_METHOD, OutputCheck, TrialRecord, TrialRequest, new_record

ProgressCallback = Callable[[dict[str, Any]], None]


RecordCallback = Callable[[TrialRecord], None]


class Executor(Protocol):
    def run(
        self, blocks: Sequence[Sequence[TrialRequest]], timeout_s: float, on_record: RecordCallback,
        on_progress: ProgressCallback,
    ) -> None:
        """Run every block's trials, calling `on_record` in this process as each trial ends; never raises for
        what happens inside a trial. `on_progress` may see the running trial's progress events."""
        ...


class LocalSubprocessExecutor:
    """Each trial in a fresh Python process on this machine, so a crash, out-of-memory or hang in one
    backend costs that trial only. A trial past its timeout is killed with its whole process group.

    When the trial's process has exited, its output tokens are checked in another fresh process that loads no
    backend plugin (novainfer.ab.trial.output_check, see `check_outputs`): only then is a record final.

    `log_dir` keeps each trial's stderr (tracebacks, library warnings) as <trial>.log.
    """

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir

    def run(
        self, blocks: Sequence[Sequence[TrialRequest]], timeout_s: float, on_record: RecordCallback,
        on_progress: ProgressCallback,
    ) -> None:
        """The blocks' trials one after another, in order, on this machine."""
        for block in blocks:
            for request in block:
                on_record(self.run_trial(request, timeout_s, on_progress))

    def run_trial(self, request: TrialRequest, timeout_s: float, on_progress: ProgressCallback) -> TrialRecord:
        """Run one trial to its record; never raises for what happens inside the trial."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{log_name(request.trial_id)}.log"
        with tempfile.TemporaryDirectory() as tmp:
            result_path = Path(tmp) / "result.json"
            request = replace(request, result_path=str(result_path))
            started = time.time()
            with open(log_path, "w") as log:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "novainfer.ab.trial"],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
                    start_new_session=True,  # its own process group, so a kill takes its children too
                    preexec_fn=_die_with_parent,
                )
                assert proc.stdin is not None and proc.stdout is not None
                proc.stdin.write(request.to_json())
                proc.stdin.close()
                reader = threading.Thread(target=_read_progress, args=(proc.stdout, on_progress), daemon=True)
                reader.start()
                try:
                    returncode = proc.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    _kill(proc)
                    record = new_record(request)
                    record.status, record.reason = "timeout", f"killed after the trial timeout of {timeout_s:g} s"
                    record.started_at, record.finished_at = started, time.time()
                    return record
                except BaseException:
                    # Ctrl-C reaches only this process (the trial runs in a session of its own): take the trial
                    # down with it, then let the interrupt go on.
                    _kill(proc)
                    raise
                finally:
                    reader.join(timeout=5)
            if result_path.exists():
                record = TrialRecord.from_dict(json.loads(result_path.read_text()))
                if request.gate.enabled and record.outputs:
                    check_outputs(request, record, timeout_s, log_path)
                return record
        record = new_record(request)
        record.status = "failed"
        record.reason = f"trial process exited with code {returncode} and no result; see {log_path}"
        if returncode < 0:
            record.reason = f"trial process killed by {_signal_name(-returncode)}; see {log_path}"
        record.started_at, record.finished_at = started, time.time()
        return record


def check_outputs(request: TrialRequest, record: TrialRecord, timeout_s: float, log_path: Path) -> None:
    """Check the record's output tokens in a fresh process (stderr appended to the trial's log) and fold the
    result into the record: a token outside the reference's margin makes an "ok" or "unverified" trial
    "incorrect"; a check that could not vouch for every token leaves an "ok" trial "unverified"."""
    prompts = request.workload.prompts(record.seeds["tokens"])
    payload = {
        "config": request.config, "prompts": prompts, "outputs": record.outputs,
        "floor_margin": request.gate.floor_margin,
    }
    problem = None
    started = time.perf_counter()
    with open(log_path, "a") as log:
        log.write("\n--- output check ---\n")
        log.flush()
        try:
            done = subprocess.run(
                [sys.executable, "-m", "novainfer.ab.trial.output_check"], input=json.dumps(payload), text=True,
                stdout=subprocess.PIPE, stderr=log, timeout=timeout_s, start_new_session=True,
                preexec_fn=_die_with_parent,
            )
            lines = done.stdout.strip().splitlines()
            report = OutputCheck.from_json(lines[-1]) if done.returncode == 0 and lines else None
            if report is None:
                problem = f"the output check exited with code {done.returncode}; see {log_path}"
        except subprocess.TimeoutExpired:
            report, problem = None, f"the output check took longer than {timeout_s:g} s"
    record.tags["output_check"] = OUTPUT_CHECK_METHOD
    # The check's whole cost, its process's start-up included (output_check_seconds is the check alone).
    record.metrics["output_check_process_seconds"] = time.perf_counter() - started
    if report is None:
        _unverify(record, problem or "")
        return
    record.metrics.update(report.metrics())
    if report.plugins_loaded:
        _unverify(record, f"the output check ran beside backend plugins ({', '.join(report.plugins_loaded)})")
    elif not report.passed():
        if record.status in ("ok", "unverified"):
            record.status, record.reason = "incorrect", report.problem()
    elif not report.complete():
        _unverify(record, f"only {report.tokens_checked} of {report.tokens_produced} output tokens were checked")


def _unverify(record: TrialRecord, why: str) -> None:
    if record.status == "ok":
        record.status, record.reason = "unverified", why


def log_name(trial_id: str) -> str:
    """A trial's id as a file name."""
    return "".join(c if c.isalnum() or c in "-_.=" else "_" for c in trial_id)


def _kill(proc: subprocess.Popen) -> None:
    """Kill the trial and every process it started (its process group), and reap it."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _signal_name(number: int) -> str:
    """"SIGSEGV"; SIGKILL from outside a timeout is most often the kernel's out-of-memory killer."""
    try:
        name = signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
    return f"{name} (out of memory?)" if number == signal.SIGKILL else name


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to kill it when the sweep process dies (even by SIGKILL),
    so a killed sweep leaves no trial running on behind it."""
    if sys.platform == "linux":
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def _read_progress(stream: Any, on_progress: ProgressCallback) -> None:
    for line in stream:
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue  # a library printing to stdout is not a progress event
        if isinstance(event, dict):
            on_progress(event)
