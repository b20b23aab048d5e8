"""Issue 28's tables from what bench/gpu_ray.sh left under .nova-ab/ (on the device, or at home after unpacking
its ledgers.tgz): where each trial of the Ray sweep ran (GPU UUID, Ray node), the comparison paired by GPU, nothing
lost or doubled (ledger lines, trials planned, and with --tracking-uri the MLflow children after `nova-ab import`),
and the wall time of the Ray sweep against the local one.

Wall times: the Ray sweep's is its driver's clock (walls.txt: Ray's start, every trial, the end), the local
sweep's the sum of its trials' own times (process start to record, output check included): that leaves out its
driver's start-up and whatever a call's time limit cut short, so the ratio errs against the Ray sweep.

    python3 bench/ray_x2_report.py [--root .nova-ab] [--tracking-uri URI]
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import Counter, defaultdict
from pathlib import Path

from rich.console import Console

from novainfer.ab.sweep.ledger import Ledger
from novainfer.ab.sweep.report import console, render_table
from novainfer.ab.sweep.statistics import summarize
from novainfer.ab.wire import TrialRecord


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(".nova-ab"))
    parser.add_argument("--tracking-uri", help="also count each sweep's MLflow children (after `nova-ab import`)")
    args = parser.parse_args()
    walls = _walls(args.root / "walls.txt")
    out = console()
    ray_wall = local_time = None
    for sweep, runs in walls.items():
        directory = args.root / sweep
        info = json.loads((directory / "sweep.json").read_text())
        ledger = Ledger(directory / "ledger.jsonl")
        records = ledger.records()
        lines = Counter(record.trial_id for record in ledger.history())
        planned = len(info["arm_names"]) * int(info["params"]["sweep.repeats"])
        parts = sorted({part for _, _, part in runs})
        driver = sum(seconds for seconds, _, _ in runs)
        out.print(f"\n[bold]{sweep}[/] ({', '.join(parts)}): driver {driver:.1f} s over {len(runs)} run(s), "
                  f"exit codes {[rc for _, rc, _ in runs]}")
        doubled = sorted(trial for trial, n in lines.items() if n > 1) or "none"
        mlflow = f", MLflow children {_children(args.tracking_uri, info['sweep_id'])}" if args.tracking_uri else ""
        out.print(f"  trials planned {planned}, in the ledger {len(records)} ({lines.total()} lines), "
                  f"more than one line {doubled}{mlflow}")
        for record in records:
            tags = record.tags
            out.print(f"  {record.trial_id:<22} {record.status:<10} {record.metrics.get('output_tok_s', 0):>9,.0f} "
                      f"tok/s  {tags.get('gpu_uuid', '?')[:12]}  node {tags.get('ray_node', '-')[:8]}  "
                      f"ray GPU {tags.get('ray_gpu_ids', '-')}  {_trial_seconds(record):.0f} s")
        _by_gpu(out, records)
        out.print(render_table(summarize(records, info["baseline_arm"]), info["arm_names"]))
        if "ray" in parts:
            ray_wall = driver
        if "local" in parts:
            local_time = sum(_trial_seconds(r) for r in records)
    if ray_wall and local_time:
        out.print(f"\nwall: Ray on every GPU {ray_wall:.0f} s, local on one GPU {local_time:.0f} s (its trials' own "
                  f"times): {ray_wall / local_time:.2f}x")


def _walls(path: Path) -> dict[str, list[tuple[float, int, str]]]:
    """walls.txt's lines ("<sweep dir> <seconds> <exit code> <what>") by sweep, in file order."""
    walls: dict[str, list[tuple[float, int, str]]] = defaultdict(list)
    for line in path.read_text().splitlines():
        sweep, seconds, rc, what = line.split()
        walls[sweep].append((float(seconds), int(rc), what))
    return walls


def _trial_seconds(record: TrialRecord) -> float:
    """The trial's own time: its process (gate, warm-up, timed run) and then its output check's."""
    return record.finished_at - record.started_at + record.metrics.get("output_check_process_seconds", 0.0)


def _by_gpu(out: Console, records: list[TrialRecord]) -> None:
    """Each GPU's median output tok/s per arm (the blocks `nova-ab compare` pairs)."""
    speeds: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        if "output_tok_s" in record.metrics:
            speeds[record.tags.get("gpu_uuid", "?")][record.arm].append(record.metrics["output_tok_s"])
    for gpu, arms in sorted(speeds.items()):
        cells = ", ".join(f"{arm} {statistics.median(v):,.0f} (n={len(v)})" for arm, v in sorted(arms.items()))
        out.print(f"  GPU {gpu[:12]}: {cells}")


def _children(uri: str, sweep_id: str) -> int:
    from novainfer.ab.sweep.tracking import Tracker

    _, _, records = Tracker(uri, create=False).load_sweep(sweep_id)
    return len(records)


if __name__ == "__main__":
    main()
