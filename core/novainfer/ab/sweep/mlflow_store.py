"""Which MLflow store a sweep logs to, and reaching it safely (novainfer.ab.sweep.tracking logs into it).

`default_tracking_uri` is the store `mlflow ui` opens in a directory; `connected` yields a client on a store.
Faults cost seconds, not minutes: a call to an HTTP server fails within about 8 s (short timeout, one retry), a
sqlite store is created by one process at a time (a file lock beside it) and a write that loses a race with
another process is retried. Every failure to reach a store is a `TrackingError` with a one-line message.
"""

from __future__ import annotations

import fcntl
import logging
import os
import posixpath
import random
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.request import pathname2url, url2pathname

# Bounds on every call to an HTTP store, read by mlflow/utils/rest_utils.py `http_request` on each call
# (MLflow's defaults: a 120 s timeout and 7 retries with backoff, about 4 minutes per failing call). One try
# and one retry of at most 4 s each: a failing call costs at most about 8 s (urllib3 sleeps no backoff before
# a first retry), and a Retry-After header cannot stretch it.
_HTTP_TIMEOUT_S = 4
_HTTP_BOUNDS = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": str(_HTTP_TIMEOUT_S),
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0",
    "MLFLOW_HTTP_RESPECT_RETRY_AFTER_HEADER": "false",
}

# MLflow's sessions on sqlite wait up to 20 s for another writer's lock (PRAGMA busy_timeout in
# mlflow/store/db/utils.py), but a store's start-up checks wait only pysqlite's 5 s, SQLite answers at once a
# write that would deadlock ("database is locked"), and two processes inserting the same row (one workload's
# dataset) race ("UNIQUE constraint failed"). Such a call was rolled back whole: it is repeated after a
# randomized, doubling pause (about 5 s in all), and then sees the other writer's work.
_RACE_MESSAGES = ("database is locked", "UNIQUE constraint failed")
_RACE_RETRIES = 6


class TrackingError(RuntimeError):
    """The MLflow store is unreachable, broken, or lacks what was asked for (one-line message)."""


def default_tracking_uri(cwd: str | os.PathLike[str] | None = None) -> str:
    """The store `mlflow ui` (with no flags) opens when started in `cwd` (default: the current directory).

    What MLflow 3.17 does (mlflow/tracking/_tracking_service/utils.py `get_tracking_uri` and
    `_get_default_tracking_uri`, mlflow/cli `server`, of which `ui` is an alias): with no
    MLFLOW_TRACKING_URI, the client and the server both default to `sqlite:///mlflow.db` in the working
    directory, except when `./mlruns` already holds a file store (a numeric experiment directory with a
    meta.yaml), where both keep using that file store. We follow the same rule, and make the path
    absolute as `mlflow.get_tracking_uri()` does, so subprocesses that change directory still agree.
    MLFLOW_TRACKING_URI, when set, wins, as it does for the MLflow client.
    """
    if uri := os.environ.get("MLFLOW_TRACKING_URI"):
        return uri
    base = os.path.abspath(cwd if cwd is not None else os.getcwd())
    mlruns = Path(base, "mlruns")
    if _holds_file_store(mlruns):
        return mlruns.as_uri()
    return "sqlite:///" + posixpath.abspath(pathname2url(os.path.join(base, "mlflow.db")))


def _holds_file_store(mlruns: Path) -> bool:
    try:
        return any(d.is_dir() and d.name.isdigit() and (d / "meta.yaml").exists() for d in mlruns.iterdir())
    except OSError:
        return False


def is_http(uri: str) -> bool:
    """Whether `uri` names a tracking server (whose own UI and links serve it), not a local store."""
    return uri.startswith(("http://", "https://"))


def _probe_http(uri: str, timeout_s: float = _HTTP_TIMEOUT_S) -> None:
    """Fail fast when an HTTP tracking server cannot serve: no answer in time, or a server error (5xx).

    A client error (401, 403, 404: auth, a proxy without /health) means the server is there; MLflow's own
    handling then applies.
    """
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s).close()
    except urllib.error.HTTPError as exc:
        if exc.code >= 500:
            raise TrackingError(f"MLflow at {uri}: server unreachable: HTTP {exc.code} {exc.reason}") from exc
    except OSError as exc:  # URLError, timeouts, resets
        raise TrackingError(f"MLflow at {uri}: server unreachable: {one_line(exc)}") from exc


def _sqlite_file(uri: str) -> Path | None:
    """The database file of a sqlite URI; None for other stores and in-memory databases."""
    if not uri.startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url  # MLflow's own dependency; it unquotes the path as MLflow will

    database = make_url(uri).database
    return Path(database) if database and database != ":memory:" else None


def _file_store_dir(uri: str) -> Path | None:
    """The directory of a file store URI (file:// or a plain path); None for other stores."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme == "file":
        return Path(url2pathname(parsed.path))
    return Path(uri) if parsed.scheme == "" else None


def _require_store(uri: str) -> None:
    """Raise unless a local store is already there: connecting to a missing one would create it."""
    if (db := _sqlite_file(uri)) is not None:
        if not db.is_file() or db.stat().st_size == 0:
            raise TrackingError(f"no MLflow store at {db}")
    elif (directory := _file_store_dir(uri)) is not None and not _holds_file_store(directory):
        raise TrackingError(f"no MLflow store at {directory}")


@contextmanager
def _store_lock(db: Path | None, create: bool) -> Iterator[None]:
    """Hold an exclusive lock on `<db>.lock` beside a sqlite store, so that one process at a time connects first.

    MLflow creates and migrates a sqlite schema when a process first connects; two processes doing it at
    once corrupt the store. The lock file is never removed (removing it would let a third process lock a new
    file while the second still holds the old one). Read-only access (`create` False) creates no lock file:
    it locks one that a writer left, else goes on unlocked.
    """
    if db is None:
        yield
        return
    lock_path = db.with_name(db.name + ".lock")
    if create:
        db.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    else:
        try:
            fd = os.open(lock_path, os.O_RDONLY)
        except FileNotFoundError:
            yield
            return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def retry_races(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`call(*args, **kwargs)`, repeated while it loses a race with another sqlite writer (see _RACE_MESSAGES)."""
    for attempt in range(_RACE_RETRIES):
        try:
            return call(*args, **kwargs)
        except Exception as exc:
            if not any(message in str(exc) for message in _RACE_MESSAGES):
                raise
            time.sleep(random.uniform(0.05, 0.1) * 2**attempt)
    return call(*args, **kwargs)


class _RaceRetryingClient:
    """An MlflowClient on a sqlite store whose every call goes through `retry_races`."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._client, name)
        if not callable(attribute):
            return attribute
        return lambda *args, **kwargs: retry_races(attribute, *args, **kwargs)


@contextmanager
def connected(uri: str, create: bool) -> Iterator[Any]:
    """An MlflowClient on `uri`, yielded while this process alone may be creating a sqlite store (its lock
    held), so that what the caller makes in it first (an experiment) is made once. With `create` False a local
    store that is not there is a TrackingError, and nothing is created. An HTTP store's calls are bounded first
    (process-wide, as MLflow reads them; a value the user set wins), and a server that cannot serve fails here."""
    if is_http(uri):
        for name, value in _HTTP_BOUNDS.items():
            os.environ.setdefault(name, value)
        _probe_http(uri)
    if not create:
        _require_store(uri)
    db = _sqlite_file(uri)
    with _store_lock(db, create), _quiet("mlflow.store.db.utils"):
        from mlflow import MlflowClient

        if db is None:
            yield MlflowClient(tracking_uri=uri)
        else:
            yield _RaceRetryingClient(retry_races(MlflowClient, tracking_uri=uri))


@contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """Only warnings and errors from an MLflow logger within the block: creating a sqlite store would print
    two INFO lines ("Creating initial MLflow database tables...") into a sweep's output."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


def one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    text = text if len(text) <= 200 else text[:197] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
