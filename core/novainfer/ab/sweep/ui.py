"""`nova-ab ui`: MLflow's UI on the sweeps' store, and the link that opens a sweep's comparison in it.

A link is only as good as the address of the server that serves it, so it is built from the server itself: the
tracking server the user names (an http(s) tracking URI: that server, nothing started), or the `mlflow ui` this
command starts on the local store, on the host and port it was given (default 127.0.0.1 and the first free port
from 5000). It prints the link once the server answers and runs until Ctrl-C, which stops the server too.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable

from novainfer.ab.sweep import commands
from novainfer.ab.sweep.mlflow_store import default_tracking_uri, is_http

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5000
# How long `mlflow ui` may take to answer: it migrates and opens the store first (seconds on a loaded machine).
START_TIMEOUT_S = 300.0
PORTS_TRIED = 20


def link(base: str, route: str) -> str:
    """The UI's address and a route from Tracker.sweep_link, joined."""
    return f"{base.rstrip('/')}/{route}"


def where_to_see(uri: str, sweep: str, route: str) -> str:
    """Where to see a sweep's comparison: its link on a tracking server, or the `nova-ab ui` command that serves a
    local store and prints the link (with the port it really binds, known only once it listens)."""
    if is_http(uri):
        return f"this sweep's comparison: {link(uri, route)}"
    command = f"{commands.nova_ab()} ui"
    if uri != default_tracking_uri():
        command += f" {commands.join('--tracking-uri', uri)}"
    return f"to see this sweep's comparison, run `{command} {commands.join(sweep)}` (it starts MLflow's UI and " \
        "prints the link)"


def free_port(host: str, start: int = DEFAULT_PORT, tries: int = PORTS_TRIED) -> int:
    """The first port from `start` nothing listens on at `host` (what `mlflow ui` will then bind)."""
    for port in range(start, start + tries):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError:
                continue
            return port
    raise OSError(f"no free port on {host} from {start} to {start + tries - 1}")


def server_command(uri: str, host: str, port: int) -> list[str]:
    """`mlflow ui` on store `uri` at host:port, with this environment's mlflow (as commands.mlflow finds it)."""
    script = commands.mlflow()
    return [script if script == "mlflow" else _unquote(script), "ui", "--backend-store-uri", uri,
            "--host", host, "--port", str(port)]


def wait_until_up(base: str, alive: Callable[[], bool], timeout_s: float = START_TIMEOUT_S) -> bool:
    """Poll base/health until the server answers (True), it died, or timeout_s passed (False)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and alive():
        try:
            urllib.request.urlopen(f"{base}/health", timeout=2).close()
            return True
        except urllib.error.HTTPError:
            return True  # it answers: a proxy or auth in front of /health is still a server
        except OSError:
            time.sleep(0.5)
    return False


def serve(uri: str, name: str, route: str, host: str, port: int | None) -> int:
    """Start `mlflow ui` on the local store `uri`, print the sweep's link once it answers, run until it ends or
    Ctrl-C (then stop it). Returns the exit code for the CLI."""
    port = port if port is not None else free_port(host)
    # A `kill` (SIGTERM) stops the server as Ctrl-C does, rather than leaving it behind without us.
    signal.signal(signal.SIGTERM, _interrupt)
    base = f"http://{host}:{port}"
    # Its log on stderr: stdout is the link's, for a person or a script that reads it.
    server = subprocess.Popen(server_command(uri, host, port), stdout=sys.stderr.fileno())
    try:
        if not wait_until_up(base, lambda: server.poll() is None):
            print(f"nova-ab: mlflow ui did not answer at {base} (exit {server.poll()})", file=sys.stderr)
            return 1
        print(f"MLflow UI on {uri}: {base}\nsweep {name}: {link(base, route)}\n(Ctrl-C stops it)", flush=True)
        return server.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        if server.poll() is None:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _unquote(text: str) -> str:
    import shlex

    return shlex.split(text)[0]
