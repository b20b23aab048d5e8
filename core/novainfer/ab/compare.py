"""The comparison of a sweep's arms: summary statistics, the verdict, a table and a plot.

Statistics, all over an arm's "ok" trials only (the other statuses are counted, never measured):
- headline: the median of output_tok_s (robust to one slow repeat);
- 95% interval: Student's t-interval of the mean, mean +- t(0.975, n-1) * s / sqrt(n). With the 3 to 10
  repeats a sweep has, a bootstrap of the median is too coarse (it can only return observed values)
  and distribution-free intervals of the median cannot reach 95% below 6 samples; the t-interval is
  defined from n = 2 and is the interval that matches the test below;
- speedup: median of the arm / median of the baseline;
- significance: Welch's two-sided t-test of the arm against the baseline (unequal variances), with
  Holm's correction over all the arms compared in the sweep, significant when the adjusted p < 0.05.
  Without the correction, a sweep of 20 arms that are all equal would show some arm as significantly
  different about two times in three (1 - 0.95^20). With fewer than 2 ok trials on either side there
  is no test: "n/a", never "yes".

An arm with any "incorrect" or "caliber_mismatch" trial is flagged: its numbers are shown, but it can
never win. The winner is the fastest arm (by median) whose trials are all "ok", that is significantly
faster than the baseline; there may be none.
"""

from __future__ import annotations

import math
import statistics
import sys
import textwrap
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table
from scipy import stats

from novainfer.ab.record import RANKABLE, TrialRecord

HEADLINE = "output_tok_s"
PHASES = ("metadata", "kv_write", "attention")  # metric phase_<name>_s
FLAG_STATUSES = ("incorrect", "caliber_mismatch")
ALPHA = 0.05
CONFIDENCE = 0.95


@dataclass
class ArmSummary:
    """One arm of a sweep, summarized (all numbers over its "ok" trials; None when there are none).

    counts: trials by status.
    median, mean: of output tok/s. ci: the 95% t-interval of the mean (None with fewer than 2).
    speedup: median / the baseline's median.
    p_value: Welch's t-test against the baseline, Holm-adjusted; None when untested.
    significant: p_value < 0.05; None ("n/a") when untested, and for the baseline itself.
    phases: median seconds of each phase in PHASES; run_seconds: median run_seconds.
    flagged: some trial was "incorrect" or "caliber_mismatch".
    """

    arm: str
    is_baseline: bool
    counts: dict[str, int]
    n_ok: int
    median: float | None
    mean: float | None
    ci: tuple[float, float] | None
    speedup: float | None = None
    p_value: float | None = None
    significant: bool | None = None
    phases: dict[str, float | None] = field(default_factory=dict)
    run_seconds: float | None = None
    flagged: bool = False
    winner: bool = False

    @property
    def n_trials(self) -> int:
        return sum(self.counts.values())

    @property
    def all_ok(self) -> bool:
        return self.n_trials > 0 and self.n_ok == self.n_trials

    def phase_share(self, phase: str) -> float | None:
        """The phase's median seconds as a fraction of the median run_seconds."""
        seconds = self.phases.get(phase)
        if seconds is None or not self.run_seconds:
            return None
        return seconds / self.run_seconds


def summarize(records: Iterable[TrialRecord], baseline_arm: str) -> list[ArmSummary]:
    """One ArmSummary per arm: the baseline first, then the others from fastest to slowest median."""
    by_arm: dict[str, list[TrialRecord]] = {}
    for record in sorted(records, key=lambda r: r.order):
        by_arm.setdefault(record.arm, []).append(record)
    summaries = {arm: _summarize_arm(arm, trials, arm == baseline_arm) for arm, trials in by_arm.items()}
    samples = {arm: _ok_values(trials, HEADLINE) for arm, trials in by_arm.items()}

    baseline = summaries.get(baseline_arm)
    if baseline is not None:
        raw: dict[str, float] = {}
        for arm, summary in summaries.items():
            if summary.median is not None and baseline.median:
                summary.speedup = summary.median / baseline.median
            if arm != baseline_arm and len(samples[arm]) >= 2 and len(samples[baseline_arm]) >= 2:
                raw[arm] = welch_p_value(samples[arm], samples[baseline_arm])
        for arm, p in holm_adjust(raw).items():
            summaries[arm].p_value = p
            summaries[arm].significant = p < ALPHA
        candidates = [
            s
            for s in summaries.values()
            if not s.is_baseline
            and s.all_ok
            and s.significant
            and s.mean is not None
            and baseline.mean is not None
            and s.mean > baseline.mean
            and (s.speedup or 0.0) > 1.0
        ]
        if candidates:
            max(candidates, key=lambda s: s.median or 0.0).winner = True

    return sorted(
        summaries.values(),
        key=lambda s: (not s.is_baseline, s.median is None, -(s.median or 0.0)),
    )


def welch_p_value(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p-value of Welch's t-test (needs 2 or more values on each side)."""
    if statistics.variance(a) == 0 and statistics.variance(b) == 0:
        # The t statistic is undefined (0/0 or x/0): identical repeats are a certainty, not noise.
        return 1.0 if statistics.fmean(a) == statistics.fmean(b) else 0.0
    return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def holm_adjust(p_values: dict[str, float]) -> dict[str, float]:
    """Holm-Bonferroni adjusted p-values: the k-th smallest of m becomes max over j <= k of (m-j+1)*p_j."""
    m = len(p_values)
    adjusted: dict[str, float] = {}
    running = 0.0
    for rank, (key, p) in enumerate(sorted(p_values.items(), key=lambda item: item[1])):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[key] = running
    return adjusted


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Student's t confidence interval of the mean (needs 2 or more values)."""
    n = len(values)
    mean = statistics.fmean(values)
    half = stats.t.ppf((1 + confidence) / 2, n - 1) * statistics.stdev(values) / math.sqrt(n)
    return mean - half, mean + half


def _summarize_arm(arm: str, trials: list[TrialRecord], is_baseline: bool) -> ArmSummary:
    values = _ok_values(trials, HEADLINE)
    counts = Counter(t.status for t in trials)
    run_seconds = _ok_values(trials, "run_seconds")
    return ArmSummary(
        arm=arm,
        is_baseline=is_baseline,
        counts=dict(counts),
        n_ok=sum(1 for t in trials if t.status in RANKABLE),
        median=statistics.median(values) if values else None,
        mean=statistics.fmean(values) if values else None,
        ci=t_interval(values) if len(values) >= 2 else None,
        phases={p: _median_or_none(_ok_values(trials, f"phase_{p}_s")) for p in PHASES},
        run_seconds=_median_or_none(run_seconds),
        flagged=any(counts[s] for s in FLAG_STATUSES),
    )


def _ok_values(trials: Iterable[TrialRecord], metric: str) -> list[float]:
    return [t.metrics[metric] for t in trials if t.status in RANKABLE and metric in t.metrics]


def _median_or_none(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


# -- rendering -----------------------------------------------------------------------------------------


def console() -> Console:
    """A console for the comparison: the terminal's width, or a wide one when output is piped to a log,
    where rich would otherwise assume 80 columns and squeeze the arm labels out."""
    return Console() if sys.stdout.isatty() else Console(width=180)


def render_table(summaries: Sequence[ArmSummary]) -> Table:
    """A table of the summaries, readable in a 100-column terminal (notes go under the arm's label)."""
    table = Table(
        title=f"Median {HEADLINE} by arm",
        caption=(
            "95% CI: t-interval of the mean. sig. (p): Welch t-test vs the baseline, Holm-adjusted p < 0.05. "
            "Phases: median seconds and share of the run."
        ),
        caption_justify="left",
        header_style="bold",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
    )
    table.add_column("arm", overflow="fold", min_width=16)
    table.add_column("ok", justify="right", no_wrap=True)
    table.add_column("tok/s", justify="right", no_wrap=True)
    table.add_column("95% CI", justify="right", no_wrap=True)
    table.add_column("speedup", justify="right", no_wrap=True)
    table.add_column("sig. (p)", no_wrap=True)
    for phase in PHASES:
        table.add_column(phase.replace("_", " "), justify="right", no_wrap=True)
    for s in summaries:
        notes = _notes(s)
        table.add_row(
            s.arm + (f"\n  {notes}" if notes else ""),
            f"{s.n_ok}/{s.n_trials}",
            _num(s.median),
            f"{_num(s.ci[0])}-{_num(s.ci[1])}" if s.ci else "-",
            f"{s.speedup:.3f}x" if s.speedup is not None else "-",
            _significance(s),
            *(_phase_cell(s, p) for p in PHASES),
            style="bold green" if s.winner else "red" if s.flagged else None,
        )
    return table


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def _significance(s: ArmSummary) -> str:
    if s.is_baseline:
        return "base"
    if s.significant is None or s.p_value is None:
        return "n/a"
    p = "<0.001" if s.p_value < 0.001 else f"{s.p_value:.2g}"
    return f"{'yes' if s.significant else 'no'} {p}"


def _phase_cell(s: ArmSummary, phase: str) -> str:
    seconds, share = s.phases.get(phase), s.phase_share(phase)
    if seconds is None:
        return "-"
    return f"{seconds:.3g}s" + (f" {share:.0%}" if share is not None else "")


def _notes(s: ArmSummary) -> str:
    notes = []
    if s.winner:
        notes.append("WINNER")
    if s.is_baseline:
        notes.append("baseline")
    if s.flagged:
        notes.append("FLAGGED, never wins")
    notes.extend(f"{n} {status}" for status, n in sorted(s.counts.items()) if status not in RANKABLE)
    return ", ".join(notes)


def plot(summaries: Sequence[ArmSummary], path: str | Path, title: str = "nova-ab sweep") -> Path:
    """Write a PNG: median tok/s per arm with the mean's 95% interval, and the median phase breakdown."""
    # Figure + Agg canvas directly rather than pyplot: no global backend state, safe without a display.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    path = Path(path)
    n = len(summaries)
    labels = [textwrap.shorten(s.arm, 48, placeholder="...") for s in summaries]
    y = list(range(n))
    fig = Figure(figsize=(11, 2.2 + 0.5 * max(n, 1)), layout="constrained")
    FigureCanvasAgg(fig)
    speed, phases = fig.subplots(1, 2, sharey=True, width_ratios=(3, 2))

    colors = [
        "tab:green" if s.winner else "tab:red" if s.flagged else "tab:gray" if s.is_baseline else "tab:blue"
        for s in summaries
    ]
    speed.barh(
        y,
        [s.median or 0.0 for s in summaries],
        color=colors,
        hatch=["//" if s.flagged else "" for s in summaries],
        edgecolor="black",
        linewidth=0.5,
    )
    with_ci = [(i, s) for i, s in enumerate(summaries) if s.ci is not None and s.mean is not None]
    if with_ci:
        speed.errorbar(
            [s.mean for _, s in with_ci],
            [i for i, _ in with_ci],
            xerr=[[s.mean - s.ci[0] for _, s in with_ci], [s.ci[1] - s.mean for _, s in with_ci]],
            fmt="o",
            color="black",
            markersize=3,
            capsize=3,
        )
    for i, s in enumerate(summaries):
        # Right of both the bar and the whisker, so the label never covers the interval.
        x = max(s.median or 0.0, s.ci[1] if s.ci else 0.0)
        speed.annotate(_bar_label(s), (x, i), xytext=(5, 0), textcoords="offset points", va="center")
    speed.set_yticks(y, labels)
    speed.invert_yaxis()  # the baseline (first) on top
    speed.set_xlabel(f"{HEADLINE}: median (bar), mean and 95% interval (whisker); * significant")
    speed.margins(x=0.3)

    left = [0.0] * n
    segments = (*PHASES, "other")
    for phase, color in zip(segments, ("tab:orange", "tab:purple", "tab:cyan", "lightgray"), strict=True):
        widths = [_phase_seconds(s, phase) for s in summaries]
        phases.barh(y, widths, left=left, color=color, label=phase.replace("_", " "))
        left = [a + b for a, b in zip(left, widths, strict=True)]
    phases.set_xlabel("median seconds per run, by phase")

    fig.legend(
        handles=[
            Patch(color="tab:gray", label="baseline"),
            Patch(color="tab:blue", label="arm"),
            Patch(color="tab:green", label="winner"),
            Patch(facecolor="tab:red", hatch="//", label="flagged (never wins)"),
            *phases.get_legend_handles_labels()[0],
        ],
        loc="outside lower center",
        ncols=4,
        fontsize="small",
    )
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    return path


def _bar_label(s: ArmSummary) -> str:
    if s.median is None:
        return "no ok trials" + (" - FLAGGED" if s.flagged else "")
    text = _num(s.median)
    if s.speedup is not None and not s.is_baseline:
        text += f" ({s.speedup:.2f}x{'*' if s.significant else ''})"
    if s.winner:
        text += " WINNER"
    if s.flagged:
        text += " FLAGGED"
    return text


def _phase_seconds(s: ArmSummary, phase: str) -> float:
    if phase != "other":
        return s.phases.get(phase) or 0.0
    # What the run spent outside the three timed phases (model, sampling, scheduling, ...).
    measured = sum(s.phases.get(p) or 0.0 for p in PHASES)
    return max(0.0, (s.run_seconds or 0.0) - measured)
