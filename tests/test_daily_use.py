"""`nova-ab` as a script and a person use it daily: exit codes and the parent's status, commands that run as
printed, the UI link from the server that serves it, and one name per arm in every view of a sweep."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from novainfer.ab.sweep import commands
from novainfer.ab.sweep.outcome import EXIT_NO_VERDICT, EXIT_OK, EXIT_TRIALS_FAILED, outcome
from novainfer.ab.sweep.report import figure, markdown, render_table, summary_row, verdict
from novainfer.ab.sweep.statistics import summarize
from novainfer.ab.sweep.tracking import SweepInfo, Tracker
from novainfer.ab.sweep.ui import free_port, link, server_command
from novainfer.ab.wire import TrialRecord

BASE, FAST = "backend=native,max_num_batched_tokens=64", "backend=native,max_num_batched_tokens=512"
NAMES = {BASE: "bt=64", FAST: "bt=512"}


def _trials(arm: str, values: list[float], statuses: list[str] | None = None) -> list[TrialRecord]:
    statuses = statuses or ["ok"] * len(values)
    return [
        TrialRecord(
            sweep_id="s", trial_id=f"{arm}#{i}", arm=arm,
            arm_params={"backend": "native", "max_num_batched_tokens": int(arm.rsplit("=", 1)[1])},
            repeat=i, order=2 * i, status=status,  # type: ignore[arg-type]
            reason=None if status in ("ok", "unverified") else f"{status}: why, in one line",
            metrics={"output_tok_s": value, "run_seconds": 1.0} if status in ("ok", "unverified") else {},
        )
        for i, (value, status) in enumerate(zip(values, statuses, strict=True))
    ]


@pytest.mark.parametrize(
    ("base", "arm", "code", "status", "words"),
    [
        (["ok"] * 3, ["ok"] * 3, EXIT_OK, "FINISHED", ""),
        (["ok"] * 3, ["ok", "incorrect", "ok"], EXIT_OK, "FINISHED", ""),  # an arm judged wrong is an answer
        (["ok"] * 3, ["ok", "failed", "ok"], EXIT_TRIALS_FAILED, "FAILED", "some trials gave no result: 1 failed"),
        (["ok"] * 3, ["skipped"] * 3, EXIT_TRIALS_FAILED, "FAILED", "3 skipped"),
        (["ok", "timeout", "ok"], ["ok"] * 3, EXIT_TRIALS_FAILED, "FAILED", "1 timeout"),
        (["failed"] * 3, ["ok"] * 3, EXIT_NO_VERDICT, "FAILED", "no verdict possible: baseline has no ok trials"),
        (["unverified"] * 3, ["ok"] * 3, EXIT_NO_VERDICT, "FAILED", "baseline unverified"),
        (["failed"] * 3, ["failed"] * 3, EXIT_NO_VERDICT, "FAILED", "(6 failed)"),  # no verdict wins over failures
    ],
)
def test_exit_codes_and_the_parent_status_say_what_a_script_can_trust(
    base: list[str], arm: list[str], code: int, status: str, words: str
) -> None:
    summaries = summarize(_trials(BASE, [100.0, 101.0, 99.0], base) + _trials(FAST, [120.0, 121.0, 119.0], arm), BASE)
    ended = outcome(summaries)
    assert (ended.exit_code, ended.run_status) == (code, status)
    assert words in ended.words and (ended.words == "") is (code == EXIT_OK)
    assert len({EXIT_OK, EXIT_TRIALS_FAILED, EXIT_NO_VERDICT, 2, 130}) == 5  # distinct from bad input and Ctrl-C
    assert outcome([]).exit_code == EXIT_NO_VERDICT


def test_a_skipped_arm_says_why_in_the_table() -> None:
    reason = "flashinfer is not installed (pip install novainfer-plugin-flashinfer)"
    skipped = _trials(FAST, [0.0, 0.0], ["skipped", "skipped"])
    for record in skipped:
        record.reason = reason
    summaries = summarize(_trials(BASE, [100.0, 101.0, 99.0]) + skipped, BASE)
    table = render_table(summaries, NAMES)
    (arm,) = (c for c in table.columns if c.header == "arm")
    cells = {cell.splitlines()[0]: " ".join(cell.split()) for cell in arm.cells}
    assert f"2 skipped: {reason}" in cells["bt=512"]


def test_one_name_per_arm_in_the_table_verdict_rows_markdown_and_plot() -> None:
    summaries = summarize(_trials(BASE, [100.0, 101.0, 99.0]) + _trials(FAST, [150.0, 151.0, 149.0]), BASE)
    table = render_table(summaries, NAMES)
    (arm,) = (c for c in table.columns if c.header == "arm")
    assert [cell.splitlines()[0] for cell in arm.cells] == ["bt=64", "bt=512"]
    assert str(table.caption).startswith(f"arms: bt=64 is {BASE}; bt=512 is {FAST}.")  # what each name stands for
    assert verdict(summaries, NAMES).startswith("bt=512 is 1.50x bt=64 (")
    rows = [summary_row(s, NAMES) for s in summaries]
    assert [(r["arm"], r["settings"]) for r in rows] == [("bt=64", BASE), ("bt=512", FAST)]
    assert "| bt=512 (WINNER" in markdown(summaries, NAMES, "smoke #1 · abc")
    fig = figure(summaries, "smoke #1 · abc", NAMES)
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["bt=64", "bt=512"]
    assert fig._suptitle.get_text().startswith("smoke #1 · abc\nbt=512 is 1.50x bt=64")


def test_printed_commands_name_programs_as_this_shell_reaches_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    script = bin_dir / "nova-ab"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    # After the README's set-up: not on PATH, so by its path, as typed or from the absolute one the shell passes.
    assert commands.nova_ab(".venv/bin/nova-ab", cwd=tmp_path) == ".venv/bin/nova-ab"
    assert commands.nova_ab(str(script), cwd=tmp_path) == ".venv/bin/nova-ab"
    assert commands.nova_ab(str(script), cwd=tmp_path.parent) == f"{tmp_path.name}/.venv/bin/nova-ab"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    outside = commands.nova_ab(str(script), cwd=elsewhere)
    assert outside == shlex.quote(str(script))
    # On PATH (an activated venv): bare.
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    assert commands.nova_ab(str(script), cwd=elsewhere) == "nova-ab"
    # Run as a module: the interpreter and -m.
    module = commands.nova_ab("/x/novainfer/ab/sweep/cli.py", cwd=tmp_path)
    assert module.endswith(" -m novainfer.ab.sweep.cli") and Path(shlex.split(module)[0]).samefile(sys.executable)
    # mlflow: this environment's own script, which runs as printed.
    mlflow = shlex.split(commands.mlflow(cwd=tmp_path))[0]
    assert mlflow == "mlflow" or os.access(mlflow if os.path.isabs(mlflow) else tmp_path / mlflow, os.X_OK)
    assert commands.join("sweep", "my file.toml", "--resume") == "sweep 'my file.toml' --resume"


def test_the_ui_link_comes_from_the_server_that_serves_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker(uri, "nova-ab")
    info = SweepInfo("smoke-abc-1", "smoke #1 · abc", BASE, {}, "")
    tracker.start_sweep(info)
    name, sweep_id, route = tracker.sweep_link()
    parent = tracker._find_parent("smoke-abc-1")
    assert (name, sweep_id) == ("smoke #1 · abc", "smoke-abc-1") and route.endswith(f"/runs/{parent}")
    route = tracker.share_view("smoke-abc-1", [])
    assert route == tracker.sweep_link("smoke #1 · abc")[2] and "viewStateShareKey=" in route  # the shared view
    assert link("http://tracking:8080/", route) == f"http://tracking:8080/{route}"
    port = free_port("127.0.0.1", 5000)
    command = server_command(uri, "127.0.0.1", port)
    assert command[1:] == ["ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port)]

    # `nova-ab ui` starts MLflow's UI on the store, prints the link with the port it bound, and the link answers.
    proc = subprocess.Popen(
        [sys.executable, "-m", "novainfer.ab.sweep.cli", "ui", "--tracking-uri", uri, "--port", str(port)],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
    )
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(2)]  # blocks until the server answered (or ui ended)
        assert lines[0].startswith(f"MLflow UI on {uri}: http://127.0.0.1:{port}"), (lines, proc.poll())
        url = re.search(r"sweep smoke #1 · abc: (\S+)", lines[1])
        assert url is not None and url.group(1) == f"http://127.0.0.1:{port}/{route}"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=30) as answer:
            assert answer.status == 200
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
