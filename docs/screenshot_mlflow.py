"""The README's picture: MLflow's runs page after the smoke sweep, as headless Chromium shows it, no clicks.

    python docs/screenshot_mlflow.py [--out docs/mlflow-runs.png]

In a temporary folder (a store of its own) it runs `nova-ab sweep experiments/smoke.toml`, then `nova-ab ui`
there on a free port, opens the comparison link that printed, and saves what Chromium renders. Needs
Chromium (Debian: `apt-get install chromium`).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "experiments" / "smoke.toml"
# What a fresh, offline, headless Chromium needs (the device README's list): no sandbox as root, no GPU,
# nothing fetched in the background, an empty profile.
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "mlflow-runs.png")
    parser.add_argument("--size", default="2400,800", help="window width,height in pixels")
    parser.add_argument("--chromium", default="chromium")
    args = parser.parse_args()
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "COLUMNS": "200"}
    with tempfile.TemporaryDirectory(prefix="nova-ab-shot-") as tmp:
        sweep = subprocess.run(
            [sys.executable, "-m", "novainfer.ab.sweep.cli", "sweep", str(SMOKE)], cwd=tmp, env=env,
            capture_output=True, text=True, check=True,
        )
        if "nova-ab ui" not in sweep.stdout and "cli ui" not in sweep.stdout:
            raise SystemExit(f"the sweep printed no way to its comparison:\n{sweep.stdout[-2000:]}")
        port = free_port()
        # What the sweep tells its user to run: MLflow's UI on this store, and the sweep's link once it answers.
        server = subprocess.Popen(
            [sys.executable, "-m", "novainfer.ab.sweep.cli", "ui", "--host", "127.0.0.1", "--port", str(port)],
            cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        try:
            assert server.stdout is not None
            printed = server.stdout.readline() + server.stdout.readline()
            link = re.search(r"(http://\S+#/experiments/\S+)", printed)
            if link is None:
                raise SystemExit(f"nova-ab ui printed no comparison link:\n{printed}")
            wait_for(f"http://127.0.0.1:{port}/health", timeout_s=90)
            url = link.group(1)
            subprocess.run(
                [args.chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp}/chromium", f"--window-size={args.size}",
                 "--virtual-time-budget=30000", f"--screenshot={args.out.resolve()}", url],
                check=True, capture_output=True, timeout=120,
            )
        finally:
            server.send_signal(signal.SIGINT)  # as Ctrl-C: `nova-ab ui` stops its MLflow server too
            server.wait(timeout=30)
    print(f"{args.out}: {url}")


if __name__ == "__main__":
    main()
