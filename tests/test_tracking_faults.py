"""Tracking when the store misbehaves: a failing or silent HTTP server costs seconds, not minutes; a real
`mlflow server` fails mid-sweep; two Trackers create one experiment, two processes one sqlite store, at once.

Real stores only: `mlflow server` runs as a subprocess (these tests start it once, about 15 s on two cores);
the faults come from a small proxy in a thread in front of it, which forwards, answers one status to
everything, or accepts and never answers.
"""

from __future__ import annotations

import http.server
import multiprocessing
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

from novainfer.ab.sweep.mlflow_store import retry_races
from novainfer.ab.sweep.tracking import SweepInfo, Tracker, TrackingError
from novainfer.ab.wire import TrialRecord

# A failing call must end within this; the Tracker bounds it at about 8 s.
FAIL_WITHIN_S = 10
SERVER_START_S = 120


@pytest.fixture(scope="module", autouse=True)
def _own_environment() -> Iterator[None]:
    # The Tracker sets MLflow's HTTP bounds process-wide; keep them from leaking into other test modules.
    with mock.patch.dict(os.environ, {"MLFLOW_DISABLE_TELEMETRY": "true"}):
        yield


@pytest.fixture(autouse=True)
def _scratch_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)


def _sweep(sweep_id: str) -> SweepInfo:
    return SweepInfo(
        sweep_id=sweep_id, name=f"sweep {sweep_id}", baseline_arm="a", params={"repeats": 2},
        experiment_text="[sweep]\n", arm_names={"a": "A"},
        workload={"name": "tiny", "num_seqs": 2, "output_tokens": 9},
    )


def _record(sweep_id: str, repeat: int) -> TrialRecord:
    return TrialRecord(
        sweep_id=sweep_id, trial_id=f"a#{repeat}", arm="a", arm_params={}, repeat=repeat, order=repeat,
        status="ok", config={"backend": "native"}, metrics={"output_tok_s": 100.0 + repeat},
        started_at=1_700_000_000.0 + repeat, finished_at=1_700_000_001.0 + repeat,
    )


# -- servers -----------------------------------------------------------------------------------------------


class _Proxy(http.server.ThreadingHTTPServer):
    """An HTTP server on 127.0.0.1 that, by `mode`, forwards to `target` ("forward"), answers `status` to
    every request ("status"), or accepts and never answers ("hang")."""

    daemon_threads = True

    def __init__(self, target: str = "", mode: str = "forward", status: int = 500) -> None:
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.target, self.mode, self.status = target, mode, status
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.released = threading.Event()  # lets hanging handlers go at teardown
        # hold_lookups experiment lookups are answered only once all of them were answered by the server.
        self.hold_lookups = 0
        self.lookups: threading.Barrier | None = None
        self._lock = threading.Lock()

    def hold_next_lookups(self, count: int) -> None:
        self.hold_lookups, self.lookups = count, threading.Barrier(count, timeout=30)

    def take_lookup(self) -> threading.Barrier | None:
        with self._lock:
            if self.hold_lookups == 0:
                return None
            self.hold_lookups -= 1
            return self.lookups

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that timed out and left: what "hang" is for


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    server: _Proxy

    def _handle(self) -> None:
        proxy = self.server
        if proxy.mode == "hang":
            proxy.released.wait(60)
            return
        if proxy.mode == "status":
            self._answer(proxy.status, "text/plain", b"")
            return
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        request = urllib.request.Request(proxy.target + self.path, data=body or None, method=self.command)
        if "Content-Type" in self.headers:
            request.add_header("Content-Type", self.headers["Content-Type"])
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                status, kind, payload = answer.status, answer.headers.get("Content-Type"), answer.read()
        except urllib.error.HTTPError as error:
            status, kind, payload = error.code, error.headers.get("Content-Type"), error.read()
        if "experiments/get-by-name" in self.path and (barrier := proxy.take_lookup()) is not None:
            barrier.wait()
        self._answer(status, kind or "application/json", payload)

    def _answer(self, status: int, kind: str, payload: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def _serving(proxy: _Proxy) -> Iterator[_Proxy]:
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        yield proxy
    finally:
        proxy.released.set()
        proxy.shutdown()
        proxy.server_close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of a real `mlflow server` on a fresh sqlite store, serving artifacts too."""
    root = tmp_path_factory.mktemp("server")
    port = _free_port()
    command = [
        sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
        "--default-artifact-root", (root / "artifacts").as_uri(), "--artifacts-destination", (root / "served").as_uri(),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]
    # No background job runner: it starts a dozen consumer processes the tests do not need.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    log_path = root / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, process, log_path)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # the server's own process group: it and its uvicorn worker
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _wait_healthy(url: str, process: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(0.25)
    tail = log_path.read_text(errors="replace")[-2000:]
    raise RuntimeError(f"mlflow server at {url} did not come up (exit code {process.poll()}):\n{tail}")


@pytest.fixture
def proxy(server: str) -> Iterator[_Proxy]:
    with _serving(_Proxy(server)) as running:
        yield running


def _fails_fast(call: Any, *args: Any) -> TrackingError:
    """The one-line TrackingError `call(*args)` raises, checked to come within FAIL_WITHIN_S."""
    started = time.monotonic()
    with pytest.raises(TrackingError) as caught:
        call(*args)
    elapsed = time.monotonic() - started
    assert elapsed < FAIL_WITHIN_S, f"took {elapsed:.1f} s: {caught.value}"
    assert "\n" not in str(caught.value)
    return caught.value


# -- a server that fails, or never answers -----------------------------------------------------------------


def test_server_answering_500_is_unreachable() -> None:
    with _serving(_Proxy(mode="status", status=500)) as failing:
        error = _fails_fast(Tracker, failing.url, "nova-faults")
    assert "unreachable" in str(error) and "500" in str(error)


def test_server_that_never_answers_is_unreachable() -> None:
    with socket.socket() as sock:  # connections complete in the backlog; nobody ever reads them
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        error = _fails_fast(Tracker, f"http://127.0.0.1:{sock.getsockname()[1]}", "nova-faults")
    assert "unreachable" in str(error)


def test_client_error_means_the_server_is_there() -> None:
    # 401/404 on /health: auth in front of the server, or no /health; MLflow's own answer then applies.
    with _serving(_Proxy(mode="status", status=401)) as guarded:
        error = _fails_fast(Tracker, guarded.url, "nova-faults")
    assert "unreachable" not in str(error) and "connecting failed" in str(error)


@pytest.mark.parametrize("fault", ["status", "hang"], ids=["answers-500", "never-answers"])
def test_server_failing_mid_sweep_costs_seconds(proxy: _Proxy, fault: str) -> None:
    tracker = Tracker(proxy.url, "nova-faults")
    tracker.start_sweep(_sweep(f"mid-{fault}"))
    assert tracker.log_trial(_record(f"mid-{fault}", 0))
    proxy.mode = fault
    error = _fails_fast(tracker.log_trial, _record(f"mid-{fault}", 1))
    assert "logging trial a#1 failed" in str(error)


def test_http_bounds_leave_user_settings(server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "77")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    Tracker(server, "nova-faults")
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "77"
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "1"


# -- a working server --------------------------------------------------------------------------------------


def test_sweep_through_a_server(proxy: _Proxy, tmp_path: Path) -> None:
    # Artifacts go through the server too (mlflow-artifacts:), so the summary's plot is an HTTP PUT.
    tracker = Tracker(proxy.url, "nova-http", artifact_location="mlflow-artifacts:/nova-http")
    parent = tracker.start_sweep(_sweep("h1"))
    for repeat in range(2):
        tracker.log_trial(_record("h1", repeat))
    for text in (b"first", b"second"):
        png = tmp_path / "compare.png"
        png.write_bytes(b"\x89PNG " + text)
        tracker.log_summary("h1", {"speedup": 1.25}, f"# {text.decode()}", png)
    tracker.finish_sweep("h1", "KILLED")

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=proxy.url)
    assert [a.path for a in client.list_artifacts(parent)].count("comparison.png") == 1
    plot = client.download_artifacts(parent, "comparison.png", str(tmp_path / "back"))
    assert Path(plot).read_bytes() == b"\x89PNG second"
    run = client.get_run(parent)
    assert (run.info.status, run.data.tags["mlflow.note.content"]) == ("KILLED", "# second")
    reader = Tracker(proxy.url, "nova-http", create=False)
    _, _, records = reader.load_sweep("h1")
    assert [r.trial_id for r in records] == ["a#0", "a#1"]
    children = client.search_runs([reader._experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
    assert sorted(r.info.run_name for r in children) == ["A · #0", "A · #1"]
    assert client.get_run(children[0].info.run_id).inputs.dataset_inputs[0].dataset.name == "tiny"
    with pytest.raises(TrackingError, match=f"^no experiment 'absent' in {proxy.url}$"):
        Tracker(proxy.url, "absent", create=False)


def test_two_trackers_create_one_experiment_at_once(proxy: _Proxy) -> None:
    # Both look the experiment up before either creates it (the proxy holds both answers till then).
    proxy.hold_next_lookups(2)
    made: list[Tracker | BaseException] = []

    def connect() -> None:
        try:
            made.append(Tracker(proxy.url, "nova-both"))
        except BaseException as error:
            made.append(error)

    threads = [threading.Thread(target=connect) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert all(isinstance(m, Tracker) for m in made), made
    assert len({m._experiment_id for m in made}) == 1  # type: ignore[union-attr]


# -- two processes, one fresh sqlite store -----------------------------------------------------------------


def _sweep_in_process(uri: str, sweep_id: str, start: Any) -> None:
    """A whole sweep's logging, as a `nova-ab sweep` process does it (run in a spawned process)."""
    start.wait()
    tracker = Tracker(uri, "nova-race")
    tracker.start_sweep(_sweep(sweep_id))
    for repeat in range(3):
        tracker.log_trial(_record(sweep_id, repeat))
    tracker.log_summary(sweep_id, {"speedup": 1.0}, "done", None)
    tracker.finish_sweep(sweep_id)


@pytest.mark.parametrize("attempt", range(3))
def test_two_processes_create_one_sqlite_store(tmp_path: Path, attempt: int) -> None:
    uri = f"sqlite:///{tmp_path}/store/mlflow.db"
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(2)
    processes = [context.Process(target=_sweep_in_process, args=(uri, f"s{i}", start)) for i in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(120)
    assert [p.exitcode for p in processes] == [0, 0]
    reader = Tracker(uri, "nova-race", create=False)
    for sweep_id in ("s0", "s1"):
        assert [r.trial_id for r in reader.load_sweep(sweep_id)[2]] == ["a#0", "a#1", "a#2"]


def test_a_write_that_finds_sqlite_locked_is_repeated(tmp_path: Path) -> None:
    # What MLflow's busy_timeout does not cover (a write that would deadlock, a start-up check) fails at once
    # with "database is locked"; here, for real, a write that may not wait meets another writer's lock.
    db = tmp_path / "race.db"
    with closing(sqlite3.connect(db, isolation_level=None)) as other:
        other.execute("CREATE TABLE t (x)")
        other.execute("BEGIN EXCLUSIVE")
        attempts = []

        def write() -> int:
            attempts.append(1)
            if len(attempts) == 2:
                other.execute("COMMIT")  # the other writer is done
            with closing(sqlite3.connect(db, timeout=0, isolation_level=None)) as mine:
                mine.execute("INSERT INTO t VALUES (1)")
            return len(attempts)

        assert retry_races(write) == 2
    calls = []

    def read_missing() -> None:
        calls.append(1)
        with closing(sqlite3.connect(db)) as mine:
            mine.execute("SELECT * FROM missing")

    with pytest.raises(sqlite3.OperationalError, match="no such table"):
        retry_races(read_missing)
    assert len(calls) == 1  # any other error is raised at once
