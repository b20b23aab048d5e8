"""A sweep: every planned trial through the executor, each result to the ledger, then to MLflow.

Files of one sweep live in `.nova-ab/<name>-<experiment id>-<n>/` under the working directory,
beside the default MLflow store: `ledger.jsonl` (the source of truth), `sweep.json` (what the
parent run holds, so `nova-ab import` can recreate it), `logs/` (each trial's stderr) and
`compare.png`. A fresh sweep takes the next n; `--resume` continues the latest one.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import asdict
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from novainfer.ab.sweep import commands
from novainfer.ab.sweep.arm_checks import ArmsHere, check_runnable
from novainfer.ab.sweep.executor import Executor, LocalSubprocessExecutor
from novainfer.ab.sweep.experiment import Experiment, ExperimentError, TrialSpec
from novainfer.ab.sweep.interrupts import KeptInterrupts, interrupts_kept
from novainfer.ab.sweep.ledger import RERUNNABLE, Ledger
from novainfer.ab.sweep.names import arm_names, sweep_name, trial_name
from novainfer.ab.sweep.outcome import outcome
from novainfer.ab.sweep.report import console as comparison_console
from novainfer.ab.sweep.report import markdown, plot, render_table, summary_metrics
from novainfer.ab.sweep.serving_report import online_report
from novainfer.ab.sweep.statistics import summarize
from novainfer.ab.sweep.tracking import SweepInfo, Tracker, TrackingError, default_tracking_uri
from novainfer.ab.sweep.ui import where_to_see
from novainfer.ab.wire import GateSettings, TrialRecord, TrialRequest, new_record

SWEEPS_DIR = ".nova-ab"
# The parent's summary metrics shown as columns of the sweep's MLflow view (report.summary_metrics).
VIEW_COLUMNS = (": median_tok_s", ": speedup", ": verified", ": tokens_checked")
LEDGER_NAME = "ledger.jsonl"
SWEEP_INFO_NAME = "sweep.json"


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C during a sweep, after the sweep has put its house in order; str() says how to resume."""


def sweep_dir(experiment: Experiment, resume: bool, root: Path) -> tuple[Path, int]:
    """The latest sweep directory of this experiment when resuming, else a new one, and its counter."""
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
        return taken[-1][1], taken[-1][0]
    counter = taken[-1][0] + 1 if taken else 1
    return root / SWEEPS_DIR / f"{prefix}{counter}", counter


def order_seed_for(experiment: Experiment, resume: bool, root: Path, requested: int | None = None) -> int | None:
    """The seed of the arms' order within each repeat block (experiment.plan_trials): on --resume the one the
    sweep recorded in its sweep.json (None for a sweep from before the order was drawn: it ran the file's order),
    else `requested` (--order-seed), else a fresh one. A --resume asking for another seed than the sweep's is
    an ExperimentError: the ledger's trials ran in the recorded order."""
    if not resume:
        return requested if requested is not None else secrets.randbits(32)
    directory, _ = sweep_dir(experiment, True, root)
    path = directory / SWEEP_INFO_NAME
    recorded = json.loads(path.read_text()).get("order_seed") if path.exists() else None
    if requested is not None and requested != recorded:
        raise ExperimentError(
            str(experiment.path), "--order-seed",
            f"the sweep being resumed ran in the order of seed {recorded}; leave --order-seed out to resume it",
        )
    return recorded


def sweep_info(experiment: Experiment, directory: Path, counter: int, order_seed: int | None = None) -> SweepInfo:
    workload = experiment.workload
    return SweepInfo(
        sweep_id=directory.name,
        name=sweep_name(experiment.name, counter, experiment.sweep_id),
        baseline_arm=experiment.baseline_arm,
        params={**shared_params(experiment), "sweep.order_seed": order_seed},
        order_seed=order_seed,
        experiment_text=experiment.path.read_text(),
        experiment_filename=experiment.path.name,
        arm_names=arm_names(experiment.arms),
        workload={
            "name": experiment.name, **workload.recipe(), "output_tokens": workload.expected_output_tokens,
            # An online caliber's arrivals are part of what was run (rates: the axis's, when it is one).
            **({"arrivals": experiment.to_dict()["serving"]["arrivals"]} if experiment.serving else {}),
        },
    )


def shared_params(experiment: Experiment) -> dict[str, object]:
    """The experiment's settings as flat params, without the [engine] values some arm overrides (its axes,
    a peer's overrides): the parent run records what its arms share, and the axes say what varies."""
    varying = {key for arm in experiment.arms for key in arm.params}
    return {
        key: value for key, value in experiment.flat_params().items()
        if not (key.startswith("engine.") and key.split(".")[1] in varying)
    }


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
        serving=experiment.serving_for(trial.arm),
    )


def run_sweep(
    experiment: Experiment,
    trials: list[TrialSpec],
    here: ArmsHere,
    resume: bool = False,
    tracking_uri: str | None = None,
    executor: Executor | None = None,
    console: Console | None = None,
    order_seed: int | None = None,
    rerun_failed: bool = False,
) -> int:
    """Run the trials not yet in the ledger (and with `rerun_failed`, those whose latest record is RERUNNABLE:
    their new record supersedes it); with the local executor, those of arms `here` skips are recorded
    as skipped, with its reason, without a trial process (on a Ray cluster each trial finds out on its own
    machine). Ctrl-C kills the running trial, keeps the finished ones, marks the parent
    run KILLED and raises SweepInterrupted, whose message is the command that resumes the sweep.

    `trials` were planned with `order_seed` (recorded with the sweep). Returns the exit code of
    novainfer.ab.sweep.outcome, and ends the parent run with the matching status."""
    check_runnable(experiment, here.cuda)
    console = console or comparison_console()
    root = Path(os.getcwd())
    directory, counter = sweep_dir(experiment, resume, root)
    executor = executor or make_executor(experiment, directory / "logs")  # a missing Ray: before any file
    run_id = directory.name
    ledger = Ledger(directory / LEDGER_NAME)
    info = sweep_info(experiment, directory, counter, order_seed)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / SWEEP_INFO_NAME).write_text(json.dumps(asdict(info), indent=1))
    done = ledger.done_trial_ids(rerun=RERUNNABLE if rerun_failed else frozenset())
    todo = [t for t in trials if t.trial_id not in done]
    uri = tracking_uri or experiment.mlflow.tracking_uri or default_tracking_uri()
    tracker = _connect(uri, experiment.mlflow.experiment, info, ledger, console)
    console.print(f"sweep [bold]{info.name}[/]: {len(todo)} of {len(trials)} trials to run; ledger {ledger.path}")
    try:
        skipped = here.skipped if experiment.sweep.executor == "local" else {}
        with interrupts_kept() as interrupts:
            tracker = _run_trials(experiment, todo, skipped, info, executor, ledger, tracker, console, interrupts)
    except KeyboardInterrupt:
        if tracker is not None:
            _end(tracker, run_id, "KILLED", console)
        again = ("--resume", "--rerun-failed") if rerun_failed else ("--resume",)
        resume_command = f"{commands.nova_ab()} {commands.join('sweep', experiment.path, *again)}"
        if tracking_uri:
            resume_command += f" {commands.join('--tracking-uri', tracking_uri)}"
        raise SweepInterrupted(
            f"interrupted: {len(ledger.done_trial_ids())} of {len(trials)} trials are in the ledger; "
            f"resume with: {resume_command}"
        ) from None
    summaries = summarize(ledger.records(), experiment.baseline_arm)
    online = None  # an online caliber is compared by latency under load, rate by rate (serving_report)
    if experiment.serving is not None:
        online = online_report(
            ledger.records(), experiment.baseline_arm, info.arm_names, info.name, directory / "compare.png"
        )
    console.print(render_table(summaries, info.arm_names) if online is None else online.table)
    png = online.png if online else plot(summaries, directory / "compare.png", title=info.name, names=info.arm_names)
    ended = outcome(summaries)
    view = None
    if tracker is not None:
        try:
            metrics = summary_metrics(summaries, info.arm_names) if online is None else online.metrics
            text = markdown(summaries, info.arm_names, info.name) if online is None else online.markdown
            tracker.log_summary(run_id, metrics, text, png)
            columns = VIEW_COLUMNS if online is None else online.view_columns
            view = tracker.share_view(run_id, [key for key in metrics if key.endswith(columns)])
        except TrackingError as error:
            console.print(f"[yellow]MLflow: {error}[/]")
            tracker = None
    if tracker is not None:
        tracker = _end(tracker, run_id, ended.run_status, console)
    if tracker is None or view is None:
        console.print(
            f"MLflow was not reachable: log this sweep later with `{commands.nova_ab()} "
            f"{commands.join('import', ledger.path)}`",
            soft_wrap=True,
        )
    else:
        where = where_to_see(uri, info.name, view)
        console.print(f"MLflow: {uri} (experiment {experiment.mlflow.experiment!r}); {where}", soft_wrap=True)
    if ended.words:
        console.print(f"[yellow]exit {ended.exit_code}: {ended.words}[/]", soft_wrap=True)
    return ended.exit_code


def _run_trials(
    experiment: Experiment,
    todo: list[TrialSpec],
    skipped: dict[str, str],
    info: SweepInfo,
    executor: Executor,
    ledger: Ledger,
    tracker: Tracker | None,
    console: Console,
    interrupts: KeptInterrupts,
) -> Tracker | None:
    """Each trial through the executor (the arms in `skipped` recorded at once, with why), into the ledger, then
    to MLflow; returns the tracker, or None once the store has failed. After each record, a Ctrl-C that Python
    dropped on the way or that arrived while the record was written (novainfer.ab.sweep.interrupts) stops the
    sweep there."""
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

        def on_record(record: TrialRecord) -> None:
            nonlocal tracker
            with interrupts.held():  # a Ctrl-C here stops the sweep once the record is in both, whole
                ledger.append(record)  # durable before anything else may fail
                progress.console.print(_one_line(record, info.arm_names))
                if tracker is not None:
                    tracker = _log(tracker, record, console)
                progress.advance(overall)
                progress.update(tokens, visible=False)

        requests = [trial_request(experiment, info.sweep_id, trial) for trial in todo]
        for request in requests:
            if request.arm in skipped:
                on_record(skipped_record(request, skipped[request.arm]))
        requests = [request for request in requests if request.arm not in skipped]
        blocks = repeat_blocks(requests) if experiment.sweep.order == "interleaved" else [requests]
        executor.run([block for block in blocks if block], experiment.sweep.trial_timeout_s, on_record, on_progress)
    return tracker


def skipped_record(request: TrialRequest, reason: str) -> TrialRecord:
    """The record of a trial of an arm judged unable to run here (novainfer.ab.sweep.arm_checks): the same
    judgement a trial process would reach, without starting one."""
    record = new_record(request)
    record.status, record.reason = "skipped", reason
    record.tags = {"engine": request.peer["peer"] if request.peer is not None else "novainfer"}
    record.finished_at = time.time()
    return record


def make_executor(experiment: Experiment, log_dir: Path) -> Executor:
    """The executor the file (or --executor) names; a Ray that is missing or unreachable is an ExperimentError."""
    if experiment.sweep.executor == "local":
        return LocalSubprocessExecutor(log_dir)
    from novainfer.ab.sweep.ray_executor import RayExecutor, RayUnavailable, resources_for

    ray = experiment.sweep.ray
    resources = resources_for(
        ray.gpus_per_trial, ray.cpus_per_trial, any(arm.config.device == "cuda" for arm in experiment.arms)
    )
    try:
        return RayExecutor(log_dir, resources)
    except RayUnavailable as error:
        raise ExperimentError(str(experiment.path), "sweep.executor", str(error)) from None


def repeat_blocks(requests: list[TrialRequest]) -> list[list[TrialRequest]]:
    """Interleaved trials grouped by repeat (every arm once), each block and the blocks in planned order, so
    that running them one after another is the plan itself. (A blocked plan, arm after arm, is one block:
    it means one device, one arm at a time.)"""
    blocks: dict[int, list[TrialRequest]] = {}
    for request in sorted(requests, key=lambda r: r.order):
        blocks.setdefault(request.repeat, []).append(request)
    return list(blocks.values())


def _end(tracker: Tracker, run_id: str, status: str, console: Console) -> Tracker | None:
    try:
        tracker.finish_sweep(run_id, status)
        return tracker
    except TrackingError as error:
        console.print(f"[yellow]MLflow: {error}[/]")
        return None


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


def _one_line(record: TrialRecord, names: dict[str, str] | None = None) -> str:
    """The trial as the sweep prints it, named as its MLflow child run is ("bt=64 · #1")."""
    colour = {"ok": "green", "unverified": "yellow", "skipped": "yellow"}.get(record.status, "red")
    speed = record.metrics.get("output_tok_s")
    detail = f"{speed:,.0f} output tok/s" if speed is not None else ""
    if record.reason:
        detail = f"{detail}  {record.reason}".strip()
    detail = escape(detail)  # a reason may hold brackets ("pip install 'pkg[extra]'"): text, not markup
    if record.throttled:
        detail = f"{detail}  [yellow]THROTTLED: {escape(record.throttled)}[/]".strip()
    name = trial_name((names or {}).get(record.arm, record.arm), record.repeat)
    return f"  [{colour}]{record.status:>16}[/]  {escape(name)}  {detail}"
