"""A sweep's comparison for people: the verdict in words, the console table, Markdown, the parent run's
metrics, CSV/JSON rows and the plot, all from novainfer.ab.sweep.statistics' summaries.
"""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich import box
from rich.console import Console
from rich.table import Table

from novainfer.ab.sweep.names import metric_prefix
from novainfer.ab.sweep.statistics import (
    HEADLINE,
    MIN_INTERVAL_REPEATS,
    NEVER_MET,
    PHASES,
    ArmSummary,
    baseline_problem,
    pct,
    rank,
)
from novainfer.ab.wire import MEASURED, RANKABLE

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def verdict(summaries: Sequence[ArmSummary], names: Mapping[str, str] | None = None) -> str:
    """The sweep's answer in one or two plain sentences: the winner and by how much, or why there is none, and
    how many trials the GPU throttled (a throttled trial looks like a slow arm). `names` gives arms short names
    (novainfer.ab.sweep.names) in place of their labels."""
    answer = _verdict(summaries, names or {})
    throttled = sum(s.throttled for s in summaries)
    if throttled:
        trials = "1 trial" if throttled == 1 else f"{throttled} trials"
        answer += f" {trials} ran on a GPU throttled for heat or power (THROTTLED in the table)."
    return answer


def _verdict(summaries: Sequence[ArmSummary], named: Mapping[str, str]) -> str:
    baseline = next((s for s in summaries if s.is_baseline), None)
    problem = baseline_problem(baseline)
    if problem is not None or baseline is None:
        return f"No winner: {problem}, so no speedup claims."
    base = named.get(baseline.arm, baseline.arm)
    winner = next((s for s in summaries if s.winner), None)
    if winner is not None and winner.speedup is not None:
        evidence = f"{_num(winner.median)} tok/s, " + (
            f"95% interval {_interval(winner)}" if winner.ci else f"{_interval(winner)}, {TOO_FEW_FOR_INTERVAL}"
        )
        if winner.speedup_ci is not None:
            low, high = winner.speedup_ci
            evidence += f"; speedup 95% interval {low:.2f}-{high:.2f}x"
        if winner.paired_blocks is not None and winner.speedup_ci is not None:
            low, high = winner.speedup_ci
            evidence = f"paired by GPU over {_blocks(winner.paired_blocks)}, 95% interval {low:.2f}-{high:.2f}x"
        return (
            f"{named.get(winner.arm, winner.arm)} is {winner.speedup:.2f}x {base} ({evidence}), "
            f"significant after Holm ({_p(winner.p_value)}): WINNER."
        )
    others = [s for s in summaries if not s.is_baseline and s.speedup is not None]
    if not others:
        never = next((s for s in summaries if not s.is_baseline and s.paired_blocks == 0), None)
        if never is not None:
            return f"No winner: {named.get(never.arm, never.arm)} {NEVER_MET}."
        return f"No winner: no arm besides the baseline {base} has a measured trial."
    best = max(others, key=rank)
    paired = " (paired by GPU)" if best.paired_blocks is not None else ""
    return f"No winner: {named.get(best.arm, best.arm)} is {best.speedup:.2f}x {base}{paired}, {_why_not_winner(best)}."


def _blocks(n: int) -> str:
    return f"{n} block" if n == 1 else f"{n} blocks"


def _why_not_winner(s: ArmSummary) -> str:
    reasons = []
    if s.flagged:
        reasons.append("but FLAGGED (incorrect or caliber mismatch) and never wins")
    elif s.verification == "unverified":
        reasons.append("but UNVERIFIED (no correctness gate ran) and never wins")
    elif not s.all_ok:
        others = ", ".join(f"{n} {status}" for status, n in sorted(s.counts.items()) if status not in RANKABLE)
        reasons.append(f"but not all its trials are ok ({others})")
    if s.undecided is not None:
        reasons.append(s.undecided)
    return "; ".join(reasons) or "significantly slower: no arm beats the baseline"


def console() -> Console:
    """A console for the comparison: the terminal's width, or a wide one when output is piped to a log,
    where rich would otherwise assume 80 columns and squeeze the arm labels out."""
    return Console() if sys.stdout.isatty() else Console(width=180)


def render_table(summaries: Sequence[ArmSummary], names: Mapping[str, str] | None = None) -> Table:
    """A table of the summaries, readable in a 100-column terminal (notes go under the arm's name).

    `names` gives each arm its short name (novainfer.ab.sweep.names), the one MLflow, the trial lines and the
    plot use; the caption spells out each short name's settings, explains the columns and ends with the verdict
    (see verdict), so that every caller that prints the table prints the answer too.
    """
    named = names or {}
    test = _test(summaries, welch="Welch t-test on log tok/s vs the baseline")
    paired = any(s.paired_blocks is not None for s in summaries)
    speedup = "see sig. (p)" if paired else "median ratio; its 95% interval (under the arm): Welch's on log tok/s"
    caption = (
        f"n: measured trials (ok + unverified) of all. 95% CI: t-interval of log tok/s (geometric mean), from "
        f"{MIN_INTERVAL_REPEATS} measured trials; below that the range of the trials. speedup: {speedup}. "
        f"sig. (p): {test}, Holm-adjusted p < 0.05. "
        f"{VERIFIED_LEGEND} caliber: requests off their length. phases: share of the run in "
        "metadata/kv write/attention."
    )
    if arms := arm_legend(summaries, named):
        caption = f"{arms}.\n{caption}"
    table = Table(
        title=f"Median {HEADLINE} by arm",
        caption=f"{caption}\n{verdict(summaries, named)}",
        caption_justify="left",
        header_style="bold",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
    )
    # 15 (16 with its padding): where rich shrinks the arm and verified columns together it gives them equal
    # widths, and a larger minimum would then push the table past the console.
    table.add_column("arm", overflow="fold", min_width=15)
    table.add_column("n", justify="right", no_wrap=True)
    table.add_column("tok/s", justify="right", no_wrap=True)
    table.add_column("95% CI", justify="right", no_wrap=True)
    table.add_column("speedup", justify="right", no_wrap=True)
    table.add_column("sig. (p)", no_wrap=True)
    table.add_column("verified")  # one part per line (see _verified_parts), a long one wrapped at its spaces
    table.add_column("caliber", justify="right", no_wrap=True)
    table.add_column("phases", justify="right", no_wrap=True)
    for s in summaries:
        notes = _notes(s)
        table.add_row(
            named.get(s.arm, s.arm) + (f"\n  {notes}" if notes else ""),
            f"{s.n_measured}/{s.n_trials}",
            _num(s.median),
            _interval(s) + ("" if s.ci or s.value_range is None or s.n_measured < 2 else "\n(range)"),
            f"{s.speedup:.3f}x" if s.speedup is not None else "-",
            _significance(s),
            "\n".join(_verified_parts(s)),
            f"{s.requests_off} off" if s.requests_off is not None else "-",
            _phases_cell(s),
            style="bold green" if s.winner else "red" if s.flagged else "yellow" if _unverified(s) else None,
        )
    return table


def _test(summaries: Sequence[ArmSummary], welch: str) -> str:
    """The significance test the comparison used, in words (`welch` when unpaired), for the table's caption
    and the Markdown."""
    if any(s.paired_blocks is not None for s in summaries):
        return (
            "paired t-test on log tok/s vs the baseline in the same block (repeat, GPU; speedup: geometric "
            "mean of the paired ratios)"
        )
    return welch


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.4g}"


# What stands beside an arm whose measured trials are too few for an interval (statistics.MIN_INTERVAL_REPEATS).
TOO_FEW_FOR_INTERVAL = "too few repeats for an interval"


def _interval(s: ArmSummary) -> str:
    """The 95% interval; below MIN_INTERVAL_REPEATS measured trials, the range of the trials (one value: itself)."""
    if s.ci:
        return f"{_num(s.ci[0])}-{_num(s.ci[1])}"
    if s.value_range is None:
        return "-"
    low, high = s.value_range
    return _num(low) if low == high else f"{_num(low)}-{_num(high)}"


def _speedup_cell(s: ArmSummary) -> str:
    """The speedup and, where the repeats support one, its 95% interval: "1.100x (95%: 1.07-1.13x)"."""
    if s.speedup is None:
        return "-"
    if s.speedup_ci is None:
        return f"{s.speedup:.3f}x"
    return f"{s.speedup:.3f}x (95%: {s.speedup_ci[0]:.2f}-{s.speedup_ci[1]:.2f}x)"


def arm_legend(summaries: Sequence[ArmSummary], names: Mapping[str, str]) -> str:
    """"arms: bt=64 is backend=native,max_num_batched_tokens=64; ...": what each short name stands for (empty
    when every arm goes by its label)."""
    pairs = [f"{names[s.arm]} is {s.arm}" for s in summaries if names.get(s.arm, s.arm) != s.arm]
    return "arms: " + "; ".join(pairs) if pairs else ""


def _p(p: float | None) -> str:
    return "p n/a" if p is None else "p < 0.001" if p < 0.001 else f"p = {p:.2g}"


def _significance(s: ArmSummary) -> str:
    if s.is_baseline:
        return "base"
    if s.significant is None or s.p_value is None:
        return "n/a"
    p = "<0.001" if s.p_value < 0.001 else f"{s.p_value:.2g}"
    return f"{'yes' if s.significant else 'no'} {p}"


def _unverified(s: ArmSummary) -> bool:
    return s.verification == "unverified"


# What the verified cell says, for the table's caption and the Markdown's footnote.
VERIFIED_LEGEND = (
    "verified: yes when, in every trial, each output token checked against the reference was within its margin "
    "and each replayed step within the bar; FAILED when not. tok: output tokens checked/produced (FAILED: "
    "outside/checked). steps: planned steps replayed/run (the fewest of any trial). bar: the least relative "
    "error a step was allowed. err: the worst a step had."
)


def _verified_parts(s: ArmSummary) -> list[str]:
    """The verified cell, part by part (the table stacks them, Markdown joins them with " · "): the verdict, then
    what the checks covered, as whole counts ("6k" was read as six thousand)."""
    if s.verification == "unmeasured":
        return ["-"]
    if _unverified(s):
        return ["UNVERIFIED"]
    failed = s.verification == "failed"
    parts = ["FAILED" if failed else "yes"]
    if s.tokens_checked is not None:
        if failed or s.tokens_outside:
            parts.append(f"{s.tokens_outside}/{s.tokens_checked} tok outside")
        else:
            parts.append(f"{s.tokens_checked}/{s.tokens_produced} tok")
    if failed and s.gate_max_rel_err is not None:
        parts.append(f"err {_sci(s.gate_max_rel_err)}")
    elif s.steps_checked is not None:
        parts.append(f"{s.steps_checked}/{s.run_steps} steps")
    if s.bar is not None:
        parts.append(f"bar {_sci(s.bar)}")
    return parts


def _sci(value: float) -> str:
    """One significant digit, the exponent without padding: 1e-5, 5e-1, nan."""
    return f"{value:.0e}".replace("e-0", "e-").replace("e+0", "e")


def _phases_cell(s: ArmSummary) -> str:
    shares = [s.phase_share(p) for p in PHASES]
    if all(share is None for share in shares):
        return "-"
    return "/".join("-" if share is None else f"{share:.0%}".removesuffix("%") for share in shares) + "%"


def _notes(s: ArmSummary) -> str:
    notes = []
    if s.winner:
        notes.append("WINNER")
    if s.is_baseline:
        notes.append("baseline")
    if s.flagged:
        notes.append("FLAGGED, never wins")
    if _unverified(s):
        notes.append(f"{s.counts['unverified']} UNVERIFIED, never wins")
    notes.extend(_status_note(s, status, n) for status, n in sorted(s.counts.items()) if status not in MEASURED)
    if s.throttled:
        notes.append(f"{s.throttled} THROTTLED ({', '.join(s.throttle_reasons)})")
    if s.ci is None and s.n_measured >= 2:
        notes.append(f"{TOO_FEW_FOR_INTERVAL}: range of {s.n_measured} trials")
    if s.speedup_ci is not None and not s.is_baseline and s.paired_blocks is None:
        notes.append(f"speedup 95%: {s.speedup_ci[0]:.2f}-{s.speedup_ci[1]:.2f}x")
    if s.paired_blocks:
        notes.append(f"paired by GPU: {_blocks(s.paired_blocks)}")
    if s.repeats_needed is not None and s.resolvable_pct is not None:
        notes.append(f"too few repeats to tell: ~{s.repeats_needed}/arm for {pct(s.resolvable_pct)}%")
    elif s.undecided is not None:
        notes.append(s.undecided)
    return ", ".join(notes)


# A trial's reason beside its status in the table is cut here: a log path or a traceback's first line can run long.
REASON_CHARS = 100


def _status_note(s: ArmSummary, status: str, n: int) -> str:
    """"2 skipped: flashinfer is not installed (pip install ...)": the count, and why (the first trial's reason)."""
    reason = s.reasons.get(status)
    if not reason:
        return f"{n} {status}"
    return f"{n} {status}: {reason if len(reason) <= REASON_CHARS else reason[: REASON_CHARS - 3] + '...'}"


def summary_metrics(summaries: Sequence[ArmSummary], names: dict[str, str]) -> dict[str, float]:
    """The sweep's answer as metrics of its parent run, per arm (by its short name, novainfer.ab.sweep.names):
    median tok/s, speedup against the baseline, the interval's bounds, ok trials of all, whether it is
    verified (1) or not (0), and what verified covered (tokens checked, produced and outside, steps checked of
    the run's, the bar, the output check's cost beside the timed run). What an arm lacks (no speedup claim, too
    few repeats, no check) is left out, not zero."""
    metrics: dict[str, float] = {}
    for s in summaries:
        prefix = metric_prefix(names.get(s.arm, s.arm))
        # Rounded as the table shows them: MLflow's columns print every digit of a float.
        values = {
            "median_tok_s": _rounded(s.median, 1),
            "speedup": _rounded(s.speedup, 3),
            # To 4 significant digits: rounding to 0.1 tok/s once wrote an interval's 5e-9 as 0.
            "ci_low": _significant(s.ci[0]) if s.ci else None,
            "ci_high": _significant(s.ci[1]) if s.ci else None,
            "speedup_ci_low": _significant(s.speedup_ci[0]) if s.speedup_ci else None,
            "speedup_ci_high": _significant(s.speedup_ci[1]) if s.speedup_ci else None,
            # Below MIN_INTERVAL_REPEATS, what there is instead of an interval.
            "min_tok_s": _significant(s.value_range[0]) if s.value_range and not s.ci else None,
            "max_tok_s": _significant(s.value_range[1]) if s.value_range and not s.ci else None,
            "throttled_trials": s.throttled if s.throttled else None,
            "ok_trials": s.n_ok,
            "trials": s.n_trials,
            "verified": float(s.verification == "verified"),
            "winner": float(s.winner),
            "tokens_checked": s.tokens_checked,
            "tokens_produced": s.tokens_produced,
            "tokens_outside": s.tokens_outside,
            "steps_checked": s.steps_checked,
            "run_steps": s.run_steps,
            "bar": s.bar,
            "output_check_cost": _rounded(s.output_check_cost, 3),
        }
        metrics.update({f"{prefix}: {key}": value for key, value in values.items() if value is not None})
    return metrics


def summary_row(s: ArmSummary, names: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The arm as one row of `nova-ab compare --format csv|json`: the table's numbers unrounded, the arm by its
    short name (as everywhere else) and its settings in full."""
    return {
        "arm": (names or {}).get(s.arm, s.arm), "baseline": s.is_baseline, "measured": s.n_measured,
        "trials": s.n_trials,
        "median_tok_s": s.median, "ci_low": s.ci[0] if s.ci else None, "ci_high": s.ci[1] if s.ci else None,
        "min_tok_s": s.value_range[0] if s.value_range else None,
        "max_tok_s": s.value_range[1] if s.value_range else None,
        "speedup": s.speedup, "p_value": s.p_value, "significant": s.significant, "winner": s.winner,
        "verification": s.verification, "tokens_checked": s.tokens_checked, "tokens_produced": s.tokens_produced,
        "tokens_outside": s.tokens_outside, "steps_checked": s.steps_checked, "run_steps": s.run_steps,
        "bar": s.bar, "max_rel_err": s.gate_max_rel_err, "output_check_cost": s.output_check_cost,
        "flagged": s.flagged, "requests_off": s.requests_off, "repeats_needed": s.repeats_needed,
        "paired_blocks": s.paired_blocks,
        "speedup_ci_low": s.speedup_ci[0] if s.speedup_ci else None,
        "speedup_ci_high": s.speedup_ci[1] if s.speedup_ci else None,
        "throttled_trials": s.throttled, "throttle_reasons": ", ".join(s.throttle_reasons),
        "settings": s.arm,
    }


def _significant(value: float, digits: int = 4) -> float:
    return float(f"{value:.{digits}g}")


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def markdown(summaries: Sequence[ArmSummary], names: dict[str, str], title: str) -> str:
    """The comparison as Markdown, for the parent run's description: the verdict in words first (the runs
    table's Description column shows the start), then the sweep's name and one row per arm."""
    head = (
        "| arm | trials (measured / all) | median tok/s | 95% interval | speedup | significant (p) | verified "
        "| requests off | phases: metadata / KV write / attention |"
    )
    rows = [head, "|" + " --- |" * (head.count("|") - 1)]
    for s in summaries:
        notes = _notes(s)
        arm = names.get(s.arm, s.arm) + (f" ({notes})" if notes else "")
        verified = " · ".join(_verified_parts(s))
        rows.append(
            f"| {arm} | {s.n_measured} / {s.n_trials} | {_num(s.median)} | {_interval(s)}"
            f"{'' if s.ci or s.n_measured < 2 else ' (range)'} | "
            f"{_speedup_cell(s)} | {_significance(s)} | "
            f"{verified} | "
            f"{s.requests_off if s.requests_off is not None else '-'} | {_phases_cell(s)} |"
        )
    labels = "\n".join(f"- {names[s.arm]}: `{s.arm}`" for s in summaries if names.get(s.arm, s.arm) != s.arm)
    test = _test(summaries, welch="Welch on log tok/s")
    return (
        f"{verdict(summaries, names)}\n\n{title}\n\n" + "\n".join(rows)
        + (f"\n\nArms:\n{labels}" if labels else "")
        + f"\n\nIntervals: t-interval of log tok/s, from {MIN_INTERVAL_REPEATS} measured trials (below that, the "
        "range of the trials); speedup intervals: Welch's on log tok/s (paired by GPU: the paired t); "
        f"significance: {test}, Holm-adjusted; an arm whose checks failed, whose caliber is off, or that is "
        f"unverified never wins. {VERIFIED_LEGEND}\n"
    )


# Bar colour, hatch and legend label of each kind of arm in the PNG, in legend order.
CATEGORIES: dict[str, tuple[str, str, str]] = {
    "baseline": ("tab:gray", "", "baseline"),
    "arm": ("tab:blue", "", "arm"),
    "winner": ("tab:green", "", "winner"),
    "unverified": ("gold", "..", "unverified (never wins)"),
    "flagged": ("tab:red", "//", "flagged (never wins)"),
}


def category(s: ArmSummary) -> str:
    """The arm's kind in the PNG (a key of CATEGORIES): a flag or a missing gate shows even on the baseline."""
    if s.winner:
        return "winner"
    if s.flagged:
        return "flagged"
    if _unverified(s):
        return "unverified"
    return "baseline" if s.is_baseline else "arm"


def legend_categories(summaries: Sequence[ArmSummary]) -> list[str]:
    """The categories that occur among the arms, in CATEGORIES' order: the legend lists only these."""
    present = {category(s) for s in summaries}
    return [name for name in CATEGORIES if name in present]


def plot(
    summaries: Sequence[ArmSummary], path: str | Path, title: str = "nova-ab sweep",
    names: Mapping[str, str] | None = None,
) -> Path:
    """Write a PNG: median tok/s per arm with the geometric mean's 95% interval, and the median phase
    breakdown."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(path)
    fig = figure(summaries, title, names)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110)
    return path


def figure(
    summaries: Sequence[ArmSummary], title: str = "nova-ab sweep", names: Mapping[str, str] | None = None
) -> Figure:
    """The comparison's figure: a Figure, not pyplot, so no global backend state and no display needed.

    The throughput axis follows the data (the trials' range and the medians): an interval reaching past it is cut
    at its edge and marked there with an arrow, so one wide interval cannot shrink every bar to nothing.
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    named = names or {}
    n = len(summaries)
    labels = [_wrap_label(named.get(s.arm, s.arm)) for s in summaries]
    y = list(range(n))
    fig = Figure(figsize=(11, 2.2 + 0.5 * max(n, 1)), layout="constrained")
    speed, phases = fig.subplots(1, 2, sharey=True, width_ratios=(3, 2))

    styles = [CATEGORIES[category(s)] for s in summaries]
    speed.barh(
        y,
        [s.median or 0.0 for s in summaries],
        color=[colour for colour, _, _ in styles],
        hatch=[hatch for _, hatch, _ in styles],
        edgecolor="black",
        linewidth=0.5,
    )
    with_ci = [(i, s.mean, s.ci) for i, s in enumerate(summaries) if s.ci is not None and s.mean is not None]
    if with_ci:
        speed.errorbar(
            [mean for _, mean, _ in with_ci],
            [i for i, _, _ in with_ci],
            xerr=[[mean - ci[0] for _, mean, ci in with_ci], [ci[1] - mean for _, mean, ci in with_ci]],
            fmt="o",
            color="black",
            markersize=3,
            capsize=3,
        )
    top = _axis_top(summaries)
    for i, s in enumerate(summaries):
        if s.ci is not None and s.ci[1] > top:  # the whisker runs off the axis: say so where it leaves
            speed.annotate("", (top, i), xytext=(-12, 0), textcoords="offset points",
                           arrowprops={"arrowstyle": "->", "color": "black"})
        # Right of the bar, the trials and the whisker (within the axis), so the label never covers them.
        x = min(top, max(s.median or 0.0, s.value_range[1] if s.value_range else 0.0, s.ci[1] if s.ci else 0.0))
        speed.annotate(_bar_label(s), (x, i), xytext=(5, 0), textcoords="offset points", va="center",
                       annotation_clip=False)
    trials = [(value, i) for i, s in enumerate(summaries) if s.value_range for value in s.value_range]
    if trials:  # the fastest and slowest trial of each arm: the spread an interval is made of
        speed.plot([v for v, _ in trials], [i for _, i in trials], "|", color="dimgray", markersize=10)
    speed.set_yticks(y, labels)
    speed.invert_yaxis()  # the baseline (first) on top
    speed.set_xlabel(
        f"{HEADLINE}: median (bar), slowest and fastest trial (|),\ngeometric mean and 95% interval (whisker, from "
        f"{MIN_INTERVAL_REPEATS} trials); * significant"
    )
    speed.set_xlim(0, top)  # throughput: from 0 to past the data, whatever an interval says

    left = [0.0] * n
    segments = (*PHASES, "other")
    for phase, colour in zip(segments, ("tab:orange", "tab:purple", "tab:cyan", "lightgray"), strict=True):
        widths = [_phase_seconds(s, phase) for s in summaries]
        phases.barh(y, widths, left=left, color=colour, label=phase.replace("_", " "))
        left = [a + b for a, b in zip(left, widths, strict=True)]
    phases.set_xlabel("median seconds per run,\nby phase")

    arm_handles = [
        Patch(facecolor=colour, hatch=hatch, edgecolor="black", linewidth=0.5, label=label)
        for colour, hatch, label in (CATEGORIES[name] for name in legend_categories(summaries))
    ]
    handles = [*arm_handles, *phases.get_legend_handles_labels()[0]]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 5), fontsize="small")
    fig.suptitle(f"{title}\n{textwrap.fill(verdict(summaries, named), 120)}", fontsize="medium")
    return fig


def _axis_top(summaries: Sequence[ArmSummary]) -> float:
    """The throughput axis' right end: 40% past the fastest trial or median (room for the bar labels), and
    past an interval only where it ends within twice that (beyond, the interval says more about the repeats than
    about the arm)."""
    data = max([s.median or 0.0 for s in summaries] + [s.value_range[1] for s in summaries if s.value_range])
    if data <= 0:
        return 1.0
    reach = [s.ci[1] for s in summaries if s.ci is not None and s.ci[1] <= 2 * data]
    return 1.4 * max([data, *reach])


def _wrap_label(arm: str, width: int = 32) -> str:
    """The arm's label on lines of about width characters, broken after commas (labels have no spaces)."""
    return "\n".join(line.replace(", ", ",") for line in textwrap.wrap(arm.replace(",", ", "), width))


def _bar_label(s: ArmSummary) -> str:
    if s.median is None:
        return "no measured trials" + (" - FLAGGED" if s.flagged else "")
    text = _num(s.median)
    if s.speedup is not None and not s.is_baseline:
        text += f" ({s.speedup:.2f}x{'*' if s.significant else ''})"
    if s.winner:
        text += " WINNER"
    if s.flagged:
        text += " FLAGGED"
    elif _unverified(s):
        text += " UNVERIFIED"
    return text


def _phase_seconds(s: ArmSummary, phase: str) -> float:
    if phase != "other":
        return s.phases.get(phase) or 0.0
    # What the run spent outside the three timed phases (model, sampling, scheduling, ...).
    measured = sum(s.phases.get(p) or 0.0 for p in PHASES)
    return max(0.0, (s.run_seconds or 0.0) - measured)
