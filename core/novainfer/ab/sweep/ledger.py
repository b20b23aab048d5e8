"""The sweep ledger: an append-only JSON-lines file of TrialRecords, the source of truth of a sweep.

Every finished trial is appended (and fsync'ed) here before it goes anywhere else, so a sweep that is
killed, or whose MLflow store is down, loses at most the trial that was running: `--resume` skips the
trials in `done_trial_ids()`, and `nova-ab import` replays the ledger into MLflow later.

A trial that gave no result for a reason of its surroundings (RERUNNABLE: a crash, a hang, an arm that could not
run here) may be run again (`--resume --rerun-failed`): its new record is appended, the old one stays in the
file, and readers take each trial's latest record (`records`).

A process killed mid-`append` can leave a torn final line (a prefix of a record, no newline). Readers
ignore it; the next `append` cuts it off before writing, so it never glues onto the next record.
Any other unreadable line is real damage and raises `LedgerError` rather than being skipped silently.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import BinaryIO

from novainfer.ab.wire import TrialRecord

_log = logging.getLogger(__name__)
# How far back `_tail_offset` reads per step while looking for the last newline.
_TAIL_CHUNK = 64 * 1024


# Statuses that say nothing of an arm's tokens or speed, so running the trial again picks nothing: never
# "incorrect" or "caliber_mismatch", verdicts that running again until they pass would launder.
RERUNNABLE = frozenset({"failed", "timeout", "skipped"})


class LedgerError(RuntimeError):
    """A ledger line, other than a torn final one, that is not a valid TrialRecord."""


class Ledger:
    """An append-only JSON-lines file of TrialRecords (one writer at a time)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def append(self, record: TrialRecord) -> None:
        """Write `record` as one line; when this returns, the line is on disk (flushed and fsync'ed)."""
        line = (json.dumps(record.to_dict(), sort_keys=True) + "\n").encode()
        created = not self.path.exists()
        if created:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+b") as f:
            _repair_tail(f)
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        if created:
            # A new file's directory entry is only durable once its directory is synced too.
            _fsync_dir(self.path.parent)

    def records(self) -> list[TrialRecord]:
        """Each trial's latest record (per sweep and trial id), in the file order of those; a torn final line is
        ignored, a missing file reads as empty."""
        lines = self.history()
        last = {(r.sweep_id, r.trial_id): i for i, r in enumerate(lines)}
        return [r for i, r in enumerate(lines) if last[(r.sweep_id, r.trial_id)] == i]

    def done_trial_ids(self, sweep_id: str | None = None, rerun: frozenset[str] = frozenset()) -> set[str]:
        """Ids of the trials with a record (of `sweep_id` only, when given) whose latest status is not in
        `rerun` (RERUNNABLE's, for `--rerun-failed`; by default any status is done)."""
        return {
            r.trial_id for r in self.records()
            if (sweep_id is None or r.sweep_id == sweep_id) and r.status not in rerun
        }

    def history(self) -> list[TrialRecord]:
        """Every record in file order, those a later record of the same trial superseded included (a torn final
        line is ignored, as in `records`)."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        lines = data.split(b"\n")
        # The chunk after the last newline is either empty or the torn final line (or a complete record
        # whose newline was not written yet, which is kept).
        tail = lines.pop()
        out = [self._parse(raw, number) for number, raw in enumerate(lines, start=1) if raw.strip()]
        if tail.strip():
            record = _parse_or_none(tail)
            if record is None:
                _log.warning("%s: ignoring a torn final line (%d bytes)", self.path, len(tail))
            else:
                out.append(record)
        return out

    def _parse(self, raw: bytes, number: int) -> TrialRecord:
        record = _parse_or_none(raw)
        if record is None:
            raise LedgerError(f"{self.path}:{number}: not a valid trial record")
        return record


def _parse_or_none(raw: bytes) -> TrialRecord | None:
    try:
        data = json.loads(raw)
        return TrialRecord.from_dict(data) if isinstance(data, dict) else None
    except (ValueError, TypeError):
        # ValueError: bad JSON or UTF-8; TypeError: missing or unknown fields.
        return None


def _repair_tail(f: BinaryIO) -> None:
    """Make `f` (opened "a+b") end with a newline before appending to it.

    A tail that is a complete record missing only its newline keeps the record (readers already accept
    it, so dropping it would lose a trial `done_trial_ids` reported); any other tail is a torn write and
    is cut off.
    """
    size = f.seek(0, os.SEEK_END)
    start = _tail_offset(f, size)
    if start == size:
        return
    f.seek(start)
    tail = f.read()
    if _parse_or_none(tail) is not None:
        f.write(b"\n")
    else:
        _log.warning("%s: cutting off a torn final line (%d bytes)", f.name, len(tail))
        f.truncate(start)


def _tail_offset(f: BinaryIO, size: int) -> int:
    """The offset just after the file's last newline (0 when there is none)."""
    end = size
    while end > 0:
        begin = max(0, end - _TAIL_CHUNK)
        f.seek(begin)
        newline = f.read(end - begin).rfind(b"\n")
        if newline >= 0:
            return begin + newline + 1
        end = begin
    return 0


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
