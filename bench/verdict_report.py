"""A short table of sweep ledgers as bench/RESULTS.md records them: per trial the verdict and what backs it.

Per trial: status, output tok/s, the correctness gate (steps replayed of the run's, kinds checked of the
run's kinds, worst row error, seconds), the output check (tokens checked of produced, tokens outside the
margin, the margin and the floor's logit delta it comes from, the check's seconds alone and with its process's
start-up, against the timed run's), the per-request caliber, the phase breakdown over the whole run and the
timed window's counters; then, with --classes, each trial's step classes (steps, wall ms per step in the
timed run, device ms per phase of its shadow steps, graph replay ms).

    python bench/verdict_report.py .nova-ab/*/ledger.jsonl [--classes]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from novainfer.ab.sweep.ledger import Ledger
from novainfer.ab.wire import TrialRecord, gate_coverage


def trial_row(r: TrialRecord) -> str:
    m = r.metrics
    coverage = gate_coverage(m)
    checked = sum(1 for c in coverage.values() if c.get("checked", 0) > 0)
    gate = (
        f"{m.get('gate_steps', 0):.0f}/{m.get('num_steps', 0):.0f} steps, {checked}/{len(coverage)} kinds, "
        f"err {m['max_rel_err']:.1e}, {m.get('gate_seconds', 0):.1f}s"
        if "max_rel_err" in m else r.tags.get("correctness_gate", "-")
    )
    process_s = m.get("output_check_process_seconds", float("nan"))
    output = (
        f"tokens {m['output_tokens_checked']:.0f}/{m['output_tokens_produced']:.0f}, "
        f"{m['output_tokens_outside']:.0f} outside, margin {m['output_margin']:.3g} (floor delta "
        f"{m['output_floor_delta']:.3g}), {m['output_check_seconds']:.1f}s ({process_s:.1f}s "
        f"with start-up) for a {m.get('run_seconds', 0):.1f}s run"
        if "output_tokens_checked" in m else r.tags.get("output_check", "no output check")
    )
    phases = "/".join(f"{m[f'phase_{p}_s']:.3f}" for p in ("metadata", "kv_write", "attention")) if (
        "phase_attention_s" in m) else "-"
    counters = ", ".join(f"{k.removeprefix('timed_')}={v:.0f}" for k, v in sorted(m.items()) if k.startswith("timed_"))
    return (
        f"{r.arm:<44} {r.status:<16} {m.get('output_tok_s', 0):>9,.0f}  {gate:<44} "
        f"off={m.get('requests_off', '-')}  phases {phases} of {m.get('run_seconds', 0):.2f}s  {counters}"
        + f"\n    output check: {output}"
        + (f"\n    reason: {r.reason}" if r.reason else "")
    )


def class_rows(r: TrialRecord) -> list[str]:
    rows = []
    for name, c in sorted(r.breakdown.items(), key=lambda item: (item[0] != "prefill", item[0])):
        replay = f"{c['replay_ms']:7.2f}" if "replay_ms" in c else "      -"
        rows.append(
            f"  {name:<12} {c['steps']:>5.0f} steps ({c['sampled']:.0f} sampled)  wall {c['wall_ms']:8.2f} ms/step  "
            f"device {c['device_ms']:7.2f}  metadata {c['metadata_ms']:6.3f}  kv {c['kv_write_ms']:6.3f}  "
            f"attention {c['attention_ms']:7.3f}  replay {replay}"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ledgers", nargs="+", type=Path)
    parser.add_argument("--classes", action="store_true", help="per step class breakdown of each trial")
    args = parser.parse_args()
    for path in args.ledgers:
        print(f"== {path}")
        for record in Ledger(path).records():
            print(trial_row(record))
            parts = {k.removeprefix("gate_").removesuffix("_seconds"): v for k, v in record.metrics.items()
                     if k.startswith("gate_") and k.endswith("_seconds") and k != "gate_seconds"}
            if parts:
                print("    gate s: " + ", ".join(f"{name} {seconds:.2f}" for name, seconds in parts.items()))
            if args.classes:
                print("\n".join(class_rows(record)))


if __name__ == "__main__":
    main()
