"""The ledger: durable appends, torn final lines from killed sweeps, and real damage reported."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from novainfer.ab.sweep.ledger import RERUNNABLE, Ledger, LedgerError
from novainfer.ab.wire import TrialRecord


def _record(trial: str, sweep: str = "s1", status: str = "ok") -> TrialRecord:
    arm, repeat = trial.split("#")
    return TrialRecord(
        sweep_id=sweep,
        trial_id=trial,
        arm=arm,
        arm_params={"backend": arm},
        repeat=int(repeat),
        order=int(repeat),
        status=status,  # type: ignore[arg-type]
        config={"backend": arm, "block_size": 16},
        params={"backend": arm},
        metrics={"output_tok_s": 123.5},
        tags={"host": "h"},
        started_at=1.0,
        finished_at=2.0,
    )


def test_round_trip_and_done_ids(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "sub" / "ledger.jsonl")
    assert ledger.records() == []
    records = [_record("a#0"), _record("b#0", status="failed"), _record("a#0", sweep="s2")]
    for record in records:
        ledger.append(record)
    assert ledger.records() == records
    assert ledger.done_trial_ids() == {"a#0", "b#0"}
    assert ledger.done_trial_ids("s1") == {"a#0", "b#0"}
    assert ledger.done_trial_ids("s2") == {"a#0"}
    lines = ledger.path.read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(line)["sweep_id"] for line in lines)


def test_a_trial_run_again_reads_as_its_latest_record_and_only_failures_of_surroundings_rerun(
    tmp_path: Path,
) -> None:
    ledger = Ledger(tmp_path / "ledger.jsonl")
    first = [_record("a#0"), _record("b#0", status="failed"), _record("c#0", status="incorrect"),
             _record("d#0", status="timeout"), _record("e#0", status="skipped")]
    for record in first:
        ledger.append(record)
    assert ledger.done_trial_ids() == {"a#0", "b#0", "c#0", "d#0", "e#0"}  # plain --resume: any status is done
    # --rerun-failed: the crash, the hang and the arm that could not run; never the verdict "incorrect".
    assert ledger.done_trial_ids(rerun=RERUNNABLE) == {"a#0", "c#0"}
    again = _record("b#0")
    ledger.append(again)
    assert [r.trial_id for r in ledger.records()] == ["a#0", "c#0", "d#0", "e#0", "b#0"]
    assert ledger.records()[-1] == again and ledger.done_trial_ids(rerun=RERUNNABLE) == {"a#0", "b#0", "c#0"}
    assert len(ledger.path.read_text().splitlines()) == 6  # the failed run's record stays in the file


def test_append_fsyncs_before_returning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ledger = Ledger(tmp_path / "ledger.jsonl")
    synced: list[int] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        # What is on disk at fsync time must already hold the whole line (it was flushed).
        synced.append(os.fstat(fd).st_size)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    ledger.append(_record("a#0"))
    assert ledger.path.stat().st_size in synced


def test_torn_final_line_is_ignored_then_cut_off(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.jsonl")
    ledger.append(_record("a#0"))
    ledger.append(_record("a#1"))
    whole = json.dumps(_record("a#2").to_dict())
    with open(ledger.path, "a") as f:
        f.write(whole[: len(whole) // 2])  # a sweep killed mid-write

    assert [r.trial_id for r in ledger.records()] == ["a#0", "a#1"]
    assert ledger.done_trial_ids() == {"a#0", "a#1"}

    ledger.append(_record("a#2"))  # --resume re-runs the torn trial
    assert [r.trial_id for r in ledger.records()] == ["a#0", "a#1", "a#2"]
    lines = ledger.path.read_text().splitlines()
    assert [json.loads(line)["trial_id"] for line in lines] == ["a#0", "a#1", "a#2"]


def test_complete_record_missing_its_newline_is_kept(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.jsonl")
    ledger.append(_record("a#0"))
    with open(ledger.path, "a") as f:
        f.write(json.dumps(_record("a#1").to_dict()))
    assert ledger.done_trial_ids() == {"a#0", "a#1"}
    ledger.append(_record("a#2"))
    assert [r.trial_id for r in ledger.records()] == ["a#0", "a#1", "a#2"]


def test_damaged_middle_line_raises(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    path.write_text(
        json.dumps(_record("a#0").to_dict()) + "\n{not json\n" + json.dumps(_record("a#1").to_dict())
    )
    with pytest.raises(LedgerError, match=r"ledger.jsonl:2:"):
        Ledger(path).records()


_WRITER = """
import sys
from novainfer.ab.sweep.ledger import Ledger
from novainfer.ab.wire import TrialRecord
ledger = Ledger(sys.argv[1])
for i in range(100000):
    ledger.append(TrialRecord("s", f"a#{i}", "a", {}, i, i, "ok", config={"pad": "x" * 20000}))
"""


def test_survives_sigkill_of_the_writer(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], env=env)
    try:
        deadline = time.monotonic() + 20
        while (not path.exists() or path.stat().st_size < 200_000) and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    ledger = Ledger(path)
    done = ledger.done_trial_ids()
    assert len(done) >= 5
    ledger.append(_record("b#0", sweep="s"))
    assert ledger.done_trial_ids() == done | {"b#0"}
