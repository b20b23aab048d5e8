"""`nova-ab`: run fixed-caliber A/B sweeps, compare them, list backends, import ledgers.

Bad input ends with one line on stderr naming the file, the field and the problem, and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from novainfer.ab.experiment import ExperimentError, load_experiment, plan_trials

EXIT_BAD_INPUT = 2
EXIT_UNREACHABLE = 1


class UsageError(Exception):
    """Bad input outside an experiment file (a missing ledger, an unknown sweep): one line, exit 2."""


def _sweep(args: argparse.Namespace) -> int:
    experiment = load_experiment(Path(args.file))
    trials = plan_trials(experiment)
    if args.dry_run:
        print(f"sweep {experiment.sweep_id}: {len(experiment.arms)} arms x {experiment.sweep.repeats} repeats")
        for trial in trials:
            print(f"  {trial.order:3d}  {trial.trial_id}")
        return 0
    from novainfer.ab.runner import run_sweep

    return run_sweep(experiment, trials, resume=args.resume, tracking_uri=args.tracking_uri)


def _compare(args: argparse.Namespace) -> int:
    from novainfer.ab.compare import console, plot, render_table, summarize
    from novainfer.ab.tracking import Tracker, TrackingError

    try:
        tracker = Tracker(args.tracking_uri, args.experiment)
        sweep_id, baseline, records = tracker.load_sweep(args.sweep)
    except TrackingError as error:
        raise UsageError(str(error)) from error
    summaries = summarize(records, baseline)
    console().print(render_table(summaries))
    png = plot(summaries, Path(args.output or f"{sweep_id}.png"), title=sweep_id)
    tracker.log_plot(sweep_id, png)
    print(f"plot: {png} (also logged to the sweep's parent run)")
    return 0


def _backends(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console
    from rich.table import Table

    from novainfer.engine import resolve_dtype
    from novainfer.plugins import discover_backends, unsupported_reason

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype("auto", device)
    table = Table(title=f"attention backends (checked for {device.type}, {str(dtype).removeprefix('torch.')})")
    for column in ("backend", "plugin", "version", "devices", "block sizes", "CUDA graphs", "here"):
        table.add_column(column)
    for name, backend in sorted(discover_backends().items()):
        caps = backend.spec.capabilities
        reason = unsupported_reason(backend.spec, device, dtype, (caps.block_sizes or (16,))[0])
        table.add_row(
            name, backend.plugin, backend.version, ", ".join(caps.devices),
            "any" if caps.block_sizes is None else ", ".join(map(str, caps.block_sizes)),
            "yes" if caps.cuda_graphs else "no", "[green]available[/]" if reason is None else f"[yellow]{reason}[/]",
        )
    Console().print(table)
    return 0


def _import(args: argparse.Namespace) -> int:
    from novainfer.ab.runner import load_sweep_info
    from novainfer.ab.tracking import Tracker, TrackingError

    ledger = Path(args.ledger)
    if not ledger.is_file():
        raise UsageError(f"{ledger}: no such ledger file")
    try:
        logged = Tracker(args.tracking_uri, args.experiment).import_ledger(ledger, load_sweep_info(ledger))
    except TrackingError as error:
        raise UsageError(f"{ledger}: {error}") from error
    print(f"{ledger}: logged {logged} new trial(s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nova-ab", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sweep = sub.add_parser("sweep", help="run every trial of an experiment file")
    sweep.add_argument("file", help="experiment TOML file")
    sweep.add_argument("--resume", action="store_true", help="run only the trials missing from the ledger")
    sweep.add_argument("--tracking-uri", help="MLflow tracking URI (overrides [mlflow] tracking_uri)")
    sweep.add_argument("--dry-run", action="store_true", help="validate and print the trial plan, run nothing")
    sweep.set_defaults(func=_sweep)
    compare = sub.add_parser("compare", help="compare the arms of a logged sweep")
    compare.add_argument("sweep", nargs="?", help="sweep id or parent run name (default: the latest)")
    compare.add_argument("--tracking-uri", help="MLflow tracking URI (default: the local store here)")
    compare.add_argument("--experiment", default="nova-ab", help="MLflow experiment name")
    compare.add_argument("--output", help="where to write the PNG (default: <sweep>.png)")
    compare.set_defaults(func=_compare)
    backends = sub.add_parser("backends", help="installed backends and whether each runs here")
    backends.set_defaults(func=_backends)
    imp = sub.add_parser("import", help="log a sweep ledger into MLflow (skips trials already there)")
    imp.add_argument("ledger", help="a ledger.jsonl written by `nova-ab sweep`")
    imp.add_argument("--tracking-uri", help="MLflow tracking URI (default: the local store here)")
    imp.add_argument("--experiment", default="nova-ab", help="MLflow experiment name")
    imp.set_defaults(func=_import)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ExperimentError, UsageError) as error:
        print(f"nova-ab: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
