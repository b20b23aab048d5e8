"""`nova-ab`: run fixed-caliber A/B sweeps, compare them, list backends, import ledgers.

Bad input ends with one line on stderr naming the file, the field and the problem, and exit code 2.

Exit codes of `nova-ab sweep` (novainfer.ab.sweep.outcome), for scripts: 0 every trial ran to a result and the
baseline carries a verdict; 3 some trials failed, timed out or were skipped (the table says why); 4 no verdict is
possible (the baseline has no ok trial, or is unverified, failed or off its caliber); 2 bad input; 130 Ctrl-C.
The sweep's MLflow parent run ends FINISHED with 0, FAILED with 3 or 4, KILLED with 130.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from novainfer.ab.sweep.arm_checks import ArmsHere, check_arms, start_arm_check
from novainfer.ab.sweep.experiment import Experiment, ExperimentError, load_experiment, plan_trials

EXIT_BAD_INPUT = 2
# What each command needs of the `ab` extra; `backends` and `--version` need the core only, so that a machine with
# just a backend plugin installed can say what runs on it. A sweep runs without MLflow (the GPU machines have none):
# its ledger keeps every trial, and `nova-ab import` logs them where MLflow is.
AB_MODULES = {
    "sweep": ("scipy", "matplotlib"),
    "compare": ("mlflow", "scipy", "matplotlib"),
    "import": ("mlflow", "scipy", "matplotlib"),
    "ui": ("mlflow",),
}
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a command stopped by Ctrl-C
FORMATS = ("table", "csv", "json")


class UsageError(Exception):
    """Bad input outside an experiment file (a missing ledger, an unknown sweep): one line, exit 2."""


def _sweep(args: argparse.Namespace) -> int:
    if args.rerun_failed and not args.resume:
        raise UsageError("--rerun-failed runs trials of an earlier sweep again: add --resume")
    judge = start_arm_check()  # first: its imports (torch) overlap the loading of the file and of the runner
    try:
        experiment = load_experiment(Path(args.file))
        from novainfer.ab.sweep.runner import order_seed_for, run_sweep  # scipy, MLflow: while the judge imports
    except BaseException:
        judge.kill()
        judge.wait()
        raise
    if args.executor is not None:
        experiment = replace(experiment, sweep=experiment.sweep.model_copy(update={"executor": args.executor}))
    try:
        seed = order_seed_for(experiment, args.resume, Path(os.getcwd()), args.order_seed)
    except BaseException:
        judge.kill()
        judge.wait()
        raise
    trials = plan_trials(experiment, seed)
    here = check_arms(experiment, judge)  # once per sweep: the dry run and the run judge the arms alike
    if args.dry_run:
        return _dry_run(experiment, trials, args.resume, here, seed, args.order_seed is not None)
    return run_sweep(
        experiment, trials, here, resume=args.resume, tracking_uri=args.tracking_uri, order_seed=seed,
        rerun_failed=args.rerun_failed,
    )


def _dry_run(
    experiment: Experiment, trials: Sequence[Any], resume: bool, here: ArmsHere, seed: int | None, chosen: bool
) -> int:
    """What `nova-ab sweep` would do here, in a few seconds and without GPU work: the sweep's name as the run
    will give it, each arm and whether it runs on this machine (and why not), then the trials in order, and the
    seed of that order (a fresh sweep draws its own unless given this one). (A file whose settings are wrong
    for an arm's backend was refused before: check_arms.)"""
    from novainfer.ab.sweep.names import arm_names, sweep_name, trial_name
    from novainfer.ab.sweep.runner import sweep_dir

    _, counter = sweep_dir(experiment, resume, Path(os.getcwd()))
    names = arm_names(experiment.arms)
    print(
        f"sweep {sweep_name(experiment.name, counter, experiment.sweep_id)}: {len(experiment.arms)} arms x "
        f"{experiment.sweep.repeats} repeats, baseline {names[experiment.baseline_arm]}, "
        f"executor {experiment.sweep.executor}"
    )
    for arm in experiment.arms:
        reason = here.skipped.get(arm.label)
        print(f"  arm {names[arm.label]}: {'runs here' if reason is None else f'skipped here: {reason}'}")
    if seed is None:
        print("  order: as in the file (this sweep ran before the order was drawn)")
    elif resume or chosen:
        print(f"  order: shuffled within each repeat from seed {seed}")
    else:
        print(f"  order: shuffled within each repeat from seed {seed}, drawn now: the sweep draws its own, "
              f"--order-seed {seed} runs this one")
    for trial in trials:
        print(f"  {trial.order:3d}  {trial_name(names[trial.arm.label], trial.repeat):<28} {trial.trial_id}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    """Read-only: a sweep from the MLflow store as a table (or CSV/JSON); a PNG only where --out asks."""
    from novainfer.ab.sweep.names import record_names
    from novainfer.ab.sweep.report import console, plot, render_table, summary_row
    from novainfer.ab.sweep.serving_stats import is_online
    from novainfer.ab.sweep.statistics import gpu_blocks, summarize
    from novainfer.ab.sweep.tracking import Tracker, TrackingError
    from novainfer.ab.sweep.ui import where_to_see

    try:
        tracker = Tracker(args.tracking_uri, args.experiment, create=False)
        sweep_id, baseline, records = tracker.load_sweep(args.sweep)
        name, _, route = tracker.sweep_link(sweep_id)
    except TrackingError as error:
        raise UsageError(str(error)) from error
    names = record_names(records)
    if args.baseline is not None:
        baseline = _chosen_arm(args.baseline, names)
    summaries = summarize(records, baseline)
    if is_online(records):  # an online sweep: latency under load, rate by rate
        return _compare_online(args, records, baseline, name, names)
    if args.format == "table":
        where = where_to_see(tracker.uri, name, route)
        print(f"sweep {name} ({tracker.uri}, experiment {args.experiment!r}); {where}")
        console().print(render_table(summaries, names))
        blocks = gpu_blocks(records)
        if len(blocks) > 1:  # a sweep spread over GPUs: which arms met on which (compare pairs them by GPU)
            for gpu, arms in blocks.items():
                print(f"on {gpu}: {'; '.join(arms)}")
    else:
        rows = [{"sweep": name, **summary_row(s, names)} for s in summaries]
        _write_rows(rows, args.format)
    if args.out:
        print(f"plot: {plot(summaries, Path(args.out), title=name, names=names)}", file=sys.stderr)
    return 0


def _chosen_arm(wanted: str, names: dict[str, str]) -> str:
    """The label of the arm `wanted` names (by its short name, as the table shows it, or by its label)."""
    for label, name in names.items():
        if wanted in (name, label):
            return label
    raise UsageError(f"--baseline: the sweep has no arm {wanted!r}; its arms: {', '.join(names.values())}")


def _ui(args: argparse.Namespace) -> int:
    """MLflow's UI on the store, and the link to a sweep's comparison in it (novainfer.ab.sweep.ui)."""
    from novainfer.ab.sweep.mlflow_store import is_http
    from novainfer.ab.sweep.tracking import Tracker, TrackingError
    from novainfer.ab.sweep.ui import link, serve

    try:
        tracker = Tracker(args.tracking_uri, args.experiment, create=False)
        name, _, route = tracker.sweep_link(args.sweep)
    except TrackingError as error:
        raise UsageError(str(error)) from error
    if is_http(tracker.uri):  # a server the user named: it serves the UI already
        print(f"sweep {name}: {link(tracker.uri, route)}")
        return 0
    return serve(tracker.uri, name, route, args.host, args.port)


def _compare_online(
    args: argparse.Namespace, records: list[Any], baseline: str, name: str, names: dict[str, str]
) -> int:
    """`compare` of an online sweep: latency and goodput by arm and rate (novainfer.ab.sweep.serving_report)."""
    from novainfer.ab.sweep.report import console
    from novainfer.ab.sweep.serving_report import named, plot, render_table, rows
    from novainfer.ab.sweep.serving_stats import compare

    comparison = compare(records, baseline)
    if args.format == "table":
        console().print(render_table(comparison, named(comparison, names)))
    else:
        _write_rows([{"sweep": name, **row} for row in rows(comparison)], args.format)
    if args.out:
        print(f"plot: {plot(comparison, Path(args.out), title=name)}", file=sys.stderr)
    return 0


def _write_rows(rows: list[dict[str, Any]], fmt: str) -> None:
    if fmt == "json":
        print(json.dumps(rows, indent=1))
        return
    writer = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]) if rows else [], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)


def _backends(args: argparse.Namespace) -> int:
    """Every installed backend, whether it runs here (with its default options) and why not; and every plugin
    that failed to load, with why. (Like the registry itself, this imports torch: it is no sweep.)"""
    import torch
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from novainfer.backend_check import default_reason
    from novainfer.backend_options import describe_options
    from novainfer.engine import resolve_dtype
    from novainfer.plugins import registry

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype("auto", device)
    found = registry()
    rows = []
    for name, backend in sorted(found.backends.items()):
        spec = backend.spec
        caps = spec.capabilities
        reason = default_reason(spec, device, dtype, (caps.block_sizes or (16,))[0])
        rows.append({
            "backend": name, "plugin": backend.plugin, "version": backend.version, "devices": ", ".join(caps.devices),
            "block_sizes": "any" if caps.block_sizes is None else ", ".join(map(str, caps.block_sizes)),
            "cuda_graphs": caps.cuda_graphs, "options": describe_options(spec.options),
            "description": spec.description, "here": "available" if reason is None else reason,
        })
    for plugin in found.broken:
        rows.append({
            "backend": plugin.entry_point, "plugin": plugin.plugin, "version": plugin.version, "devices": "",
            "block_sizes": "", "cuda_graphs": False, "options": "", "description": "",
            "here": f"plugin failed to load: {plugin.reason}",
        })
    if args.format != "table":
        _write_rows(rows, args.format)
        return 0
    table = Table(title=f"attention backends (checked for {device.type}, {str(dtype).removeprefix('torch.')})")
    for column in ("backend", "plugin", "version", "devices", "block sizes", "CUDA graphs", "here"):
        table.add_column(column, overflow="fold")  # wrap, never cut a name short
    for row in rows:
        here = row["here"]
        # A plugin's words are text, not rich markup: "pip install 'novainfer-plugin-flashattn[fa4]'" keeps its [fa4].
        table.add_row(
            escape(row["backend"]), escape(row["plugin"]), escape(row["version"]), row["devices"], row["block_sizes"],
            "yes" if row["cuda_graphs"] else "no",
            "[green]available[/]" if here == "available" else f"[yellow]{escape(here)}[/]",
        )
    # report.console()'s width rule, without importing report (and with it scipy, from the `ab` extra).
    (Console() if sys.stdout.isatty() else Console(width=180)).print(table)
    # What each is and what it takes, below the table: long lines that would squeeze its columns.
    for row in rows:
        if row["description"] or row["options"]:
            print(f"{row['backend']}: {row['description'] or '(no description)'}")
        if row["options"]:
            print(f"  options: {row['options']}")
    return 0


def _import(args: argparse.Namespace) -> int:
    from novainfer.ab.sweep.runner import load_sweep_info
    from novainfer.ab.sweep.tracking import Tracker, TrackingError

    ledger = Path(args.ledger)
    if not ledger.is_file():
        raise UsageError(f"{ledger}: no such ledger file")
    try:
        logged = Tracker(args.tracking_uri, args.experiment).import_ledger(ledger, load_sweep_info(ledger))
    except TrackingError as error:
        raise UsageError(f"{ledger}: {error}") from error
    print(f"{ledger}: logged {logged} new trial(s)")
    return 0


def _version() -> str:
    try:
        return version("novainfer")
    except PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nova-ab", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"nova-ab (novainfer) {_version()}")
    sub = parser.add_subparsers(dest="command")
    sweep = sub.add_parser("sweep", help="run every trial of an experiment file")
    sweep.add_argument("file", help="experiment TOML file")
    sweep.add_argument("--resume", action="store_true", help="run only the trials missing from the ledger")
    sweep.add_argument(
        "--rerun-failed", action="store_true",
        help="with --resume, also run again the trials whose latest record is failed, timeout or skipped (a "
        "crash, a hang, an arm that could not run then); never incorrect ones. The new record supersedes the old",
    )
    sweep.add_argument("--tracking-uri", help="MLflow tracking URI (overrides [mlflow] tracking_uri)")
    sweep.add_argument(
        "--dry-run", action="store_true", help="validate, say which arms run here, print the plan; run nothing"
    )
    sweep.add_argument(
        "--executor", choices=("local", "ray"),
        help="where trials run (overrides [sweep] executor): this machine, or a Ray cluster's GPUs",
    )
    sweep.add_argument(
        "--order-seed", type=int, metavar="N",
        help="the seed of the arms' order within each repeat (default: drawn, and recorded with the sweep)",
    )
    sweep.set_defaults(func=_sweep)
    compare = sub.add_parser("compare", help="compare the arms of a logged sweep (reads the store, writes nothing)")
    compare.add_argument("sweep", nargs="?", help="sweep id or parent run name (default: the latest)")
    compare.add_argument("--tracking-uri", help="MLflow tracking URI (default: the local store here)")
    compare.add_argument("--experiment", default="nova-ab", help="MLflow experiment name")
    compare.add_argument("--format", choices=FORMATS, default="table", help="table (default), csv or json")
    compare.add_argument("--out", help="also write the comparison PNG to this path")
    compare.add_argument("--baseline", help="the arm to compare the others with, by its name in the table "
                         "(default: the experiment's baseline)")
    compare.set_defaults(func=_compare)
    backends = sub.add_parser("backends", help="installed backends and whether each runs here")
    backends.add_argument("--format", choices=FORMATS, default="table", help="table (default), csv or json")
    backends.set_defaults(func=_backends)
    imp = sub.add_parser("import", help="log a sweep ledger into MLflow (skips trials already there)")
    imp.add_argument("ledger", help="a ledger.jsonl written by `nova-ab sweep`")
    imp.add_argument("--tracking-uri", help="MLflow tracking URI (default: the local store here)")
    imp.add_argument("--experiment", default="nova-ab", help="MLflow experiment name")
    imp.set_defaults(func=_import)
    ui = sub.add_parser("ui", help="start MLflow's UI on the store and print a sweep's comparison link")
    ui.add_argument("sweep", nargs="?", help="sweep id or parent run name (default: the latest)")
    ui.add_argument("--tracking-uri", help="MLflow tracking URI (default: the local store here; a server's "
                    "http(s) URI: print its link, start nothing)")
    ui.add_argument("--experiment", default="nova-ab", help="MLflow experiment name")
    ui.add_argument("--host", default="127.0.0.1", help="the address the UI listens on (default 127.0.0.1)")
    ui.add_argument("--port", type=int, help="its port (default: the first free one from 5000)")
    ui.set_defaults(func=_ui)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    needed = AB_MODULES.get(args.command, ())
    if missing := [m for m in needed if importlib.util.find_spec(m) is None]:
        print(
            f"nova-ab: `nova-ab {args.command}` needs {', '.join(missing)}, of novainfer's `ab` extra: "
            "pip install 'novainfer[ab]'",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    try:
        return args.func(args)
    except (ExperimentError, UsageError) as error:
        print(f"nova-ab: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt as interrupt:  # a sweep's own (runner.SweepInterrupted) says how to resume
        print(f"nova-ab: {interrupt or 'interrupted'}", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
