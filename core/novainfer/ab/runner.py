"""A sweep: every planned trial through the executor, each result to the ledger, then to MLflow.

Files of one sweep live in `.nova-ab/<name>-<experiment id>-<n>/` under the working directory,
beside the default MLflow store: `ledger.jsonl` (the source of truth), `sweep.json` (what the
parent run holds, so `nova-ab import` can recreate it), `logs/` (each trial's stderr) and
`compare.png`. A fresh sweep takes the next n; `--resume` continues the latest one.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from novainfer.ab.compare import console as comparison_console
from novainfer.ab.compare import plot, render_table, summarize
from novainfer.ab.executor import Executor, LocalSubprocessExecutor
from novainfer.ab.experiment import Experiment, ExperimentError, TrialSpec, check_runnable
from novainfer.ab.gate import GateSettings
from novainfer.ab.ledger import Ledger
from novainfer.ab.record import TrialRecord
from novainfer.ab.tracking import SweepInfo, Tracker, TrackingError, default_tracking_uri
from novainfer.ab.trial import TrialRequest

SWEEPS_DIR = ".nova-ab"
LEDGER_NAME = "ledger.jsonl"
SWEEP_INFO_NAME = "sweep.json"


def sweep_dir(experiment: Experiment, resume: bool, root: Path) -> Path:
    """The latest sweep directory of this experiment when resuming, else a new one."""
    prefix = f"{experiment.name}-{experiment.sweep_id}-"
    taken = sorted(
        (int(p.name.removeprefix(prefix)), p)
        for p in (root / SWEEPS_DIR).glob(f"{prefix}*")
        if p.name.removeprefix(prefix).isdigit()
    )
    if resume:
        if not taken:
            raise ExperimentError(
                str(experiment.path), "--resume", f"no earlier sweep of this experiment under {root / SWEEPS_DIR}"
            )
        return taken[-1][1]
    return root / SWEEPS_DIR / f"{prefix}{taken[-1][0] + 1 if taken else 1}"


def sweep_info(experiment: Experiment, run_id: str) -> SweepInfo:
    return SweepInfo(
        sweep_id=run_id,
        name=run_id,
        baseline_arm=experiment.baseline_arm,
        params=experiment.flat_params(),
        experiment_text=experiment.path.read_text(),
        experiment_filename=experiment.path.name,
    )


def load_sweep_info(ledger_path: Path) -> SweepInfo | None:
    path = ledger_path.parent / SWEEP_INFO_NAME
    return SweepInfo(**json.loads(path.read_text())) if path.exists() else None


def trial_request(experiment: Experiment, run_id: str, trial: TrialSpec) -> TrialRequest:
    sweep = experiment.sweep
    return TrialRequest(
        sweep_id=run_id, trial_id=trial.trial_id, arm=trial.arm.label, arm_params=trial.arm.params,
        repeat=trial.repeat, order=trial.order, config=trial.arm.config.to_dict(),
        workload=experiment.workload, warmup_seqs=sweep.warmup_seqs,
        gate=GateSettings(**sweep.correctness.model_dump()), result_path="",
        source_dir=str(experiment.path.resolve().parent), peer=trial.arm.peer,
    )


def run_sweep(
    experiment: Experiment,
    trials: list[TrialSpec],
    resume: bool = False,
    tracking_uri: str | None = None,
    executor: Executor | None = None,
    console: Console | None = None,
) -> int:
    check_runnable(experiment)
    console = console or comparison_console()
    root = Path(os.getcwd())
    directory = sweep_dir(experiment, resume, root)
    run_id = directory.name
    ledger = Ledger(directory / LEDGER_NAME)
    info = sweep_info(experiment, run_id)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / SWEEP_INFO_NAME).write_text(json.dumps(asdict(info), indent=1))
    executor = executor or LocalSubprocessExecutor(directory / "logs")
    done = ledger.done_trial_ids()
    todo = [t for t in trials if t.trial_id not in done]
    uri = tracking_uri or experiment.mlflow.tracking_uri or default_tracking_uri()
    tracker = _connect(uri, experiment.mlflow.experiment, info, ledger, console)
    console.print(f"sweep [bold]{run_id}[/]: {len(todo)} of {len(trials)} trials to run; ledger {ledger.path}")
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    ) as progress:
        overall = progress.add_task("trials", total=len(todo))
        tokens = progress.add_task("tokens", total=None, visible=False)

        def on_progress(event: dict) -> None:
            if event.get("event") == "phase":
                progress.update(tokens, description=f"  {event['name']}", completed=0, total=event.get("total"),
                                visible=True)
            elif event.get("event") == "tokens":
                progress.update(tokens, completed=event["done"], total=event["total"])

        for trial in todo:
            progress.update(overall, description=f"trials [{trial.trial_id}]")
            request = trial_request(experiment, run_id, trial)
            record = executor.run(request, experiment.sweep.trial_timeout_s, on_progress)
            ledger.append(record)  # durable before anything else may fail
            progress.console.print(_one_line(record))
            if tracker is not None:
                tracker = _log(tracker, record, console)
            progress.advance(overall)
            progress.update(tokens, visible=False)
    summaries = summarize(ledger.records(), experiment.baseline_arm)
    console.print(render_table(summaries))
    png = plot(summaries, directory / "compare.png", title=run_id)
    if tracker is not None:
        try:
            tracker.log_plot(run_id, png)
            tracker.finish_sweep(run_id)
        except TrackingError as error:
            console.print(f"[yellow]MLflow: {error}[/]")
            tracker = None
    if tracker is None:
        console.print(f"MLflow was not reachable: log this sweep later with `nova-ab import {ledger.path}`")
    else:
        console.print(f"MLflow: {uri} (experiment {experiment.mlflow.experiment!r}); open it with `{_ui_command(uri)}`")
    return 0


def _connect(uri: str, name: str, info: SweepInfo, ledger: Ledger, console: Console) -> Tracker | None:
    """The tracker with the sweep's parent run started and earlier ledger records logged, or None."""
    try:
        tracker = Tracker(uri, name)
        tracker.start_sweep(info)
        tracker.import_ledger(ledger.path, info)  # finishes what a killed sweep did not log
        return tracker
    except TrackingError as error:
        console.print(f"[yellow]MLflow: {error}; the sweep goes on, the ledger keeps every trial[/]")
        return None


def _log(tracker: Tracker, record: TrialRecord, console: Console) -> Tracker | None:
    try:
        tracker.log_trial(record)
        return tracker
    except TrackingError as error:
        console.print(f"[yellow]MLflow: {error}; the sweep goes on, the ledger keeps every trial[/]")
        return None


def _one_line(record: TrialRecord) -> str:
    colour = {"ok": "green", "unverified": "yellow", "skipped": "yellow"}.get(record.status, "red")
    speed = record.metrics.get("output_tok_s")
    detail = f"{speed:,.0f} output tok/s" if speed is not None else ""
    if record.reason:
        detail = f"{detail}  {record.reason}".strip()
    return f"  [{colour}]{record.status:>16}[/]  {record.trial_id}  {detail}"


def _ui_command(uri: str) -> str:
    return "mlflow ui" if uri == default_tracking_uri() else f"mlflow ui --backend-store-uri {uri}"
