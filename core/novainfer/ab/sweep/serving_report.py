"""An online sweep's comparison for people: the verdict in words, the table, Markdown, the parent run's metrics,
CSV/JSON rows and the latency-against-rate plot, from novainfer.ab.sweep.serving_stats' comparison.

Lower is better for every latency, and every place that shows one says so.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from rich import box
from rich.markup import escape
from rich.table import Table

from novainfer.ab.sweep.names import SEPARATOR, metric_prefix
from novainfer.ab.sweep.serving_stats import (
    HEADLINES,
    LATENCIES,
    RATE,
    WORDS,
    ServingArm,
    ServingComparison,
    compare,
)
from novainfer.ab.wire import TrialRecord

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# The parent's summary metrics shown as columns of the sweep's MLflow view.
VIEW_COLUMNS = (": ttft_ms_median", ": tpot_ms_median", ": goodput_req_s", ": meets_slo", ": verified")
LOWER_IS_BETTER = "lower is better for every latency"


def slo_words(c: ServingComparison) -> str:
    names = {"ttft_ms": "TTFT", "tpot_ms": "TPOT", "e2e_ms": "E2E"}
    targets = ", ".join(f"{names.get(k, k)} <= {v:g} ms" for k, v in c.slo.items())
    return f"{targets} for {c.attainment:.0%} of the steady window's requests"


def verdict(c: ServingComparison, names: Mapping[str, str] | None = None) -> str:
    """The answer in plain sentences: who meets the SLO at the highest rate, then, per rate, where each arm is
    significantly better or worse than the baseline ({LOWER_IS_BETTER})."""
    named = names or {}
    lines = [_slo_sentence(c, named)]
    for rate in c.rates:
        if rate in c.problem:
            lines.append(f"At {_rate(rate)}: no latency claims: {c.problem[rate]}.")
            continue
        for s in (s for s in c.arms if s.rate == rate and not s.is_baseline):
            lines.append(f"At {_rate(rate)}: {_group_name(s, named)} {_differences(s)}.")
    return "\n".join(lines)


def _slo_sentence(c: ServingComparison, named: Mapping[str, str]) -> str:
    if not c.slo:
        return "No SLO declared ([metrics.slo]): no goodput claims."
    reach = "; ".join(
        f"{named.get(group, group)} {'at no rate' if rate is None else f'up to {_rate(rate)}'}"
        for group, rate in c.max_rate.items()
    )
    if c.best is None:
        return f"SLO ({slo_words(c)}): no verified arm meets it ({reach})."
    rate = c.max_rate[c.best]
    return (
        f"SLO ({slo_words(c)}): {named.get(c.best, c.best)} meets it at the highest rate, {_rate(rate)} "
        f"({reach})."
    )


def _differences(s: ServingArm) -> str:
    parts = []
    for metric in HEADLINES:
        cell = s.latency[metric]
        if cell.verdict is not None and cell.ratio is not None:
            p = f"Holm p = {cell.p_value:.2g}"
            parts.append(f"{WORDS[metric]} {cell.ratio:.2f}x the baseline's ({cell.verdict}, {p})")
    trust = "" if s.trusted else " (not all its trials are ok: never named)"
    if not parts:
        untested = all(s.latency[m].p_value is None for m in HEADLINES)
        reason = "too few repeats to tell" if untested else "no significant difference from the baseline"
        return f"vs the baseline: {reason}{trust}"
    return f"vs the baseline: {'; '.join(parts)}; {LOWER_IS_BETTER}{trust}"


def _rate(rate: float | None) -> str:
    return "-" if rate is None else f"{rate:g} req/s"


def _group_name(s: ServingArm, named: Mapping[str, str]) -> str:
    return named.get(s.group, s.group)


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def _verified(s: ServingArm) -> str:
    v = s.summary.verification
    return {"verified": "yes", "unverified": "UNVERIFIED", "failed": "FAILED"}.get(v, "-") + (
        " FLAGGED" if s.summary.flagged else ""
    )


def _versus(s: ServingArm) -> str:
    """The TTFT and TPOT median ratios against the baseline, starred when significant."""
    if s.is_baseline:
        return "base"
    cells = []
    for metric, word in (("ttft_ms_median", "ttft"), ("tpot_ms_median", "tpot")):
        cell = s.latency[metric]
        if cell.ratio is not None:
            cells.append(f"{word} {cell.ratio:.2f}x{'*' if cell.significant else ''}")
    return " ".join(cells) or "-"


def render_table(c: ServingComparison, short: Mapping[str, str]) -> Table:
    """One row per arm, grouped by rate, each arm by its short name in `short` (see `named`); the caption explains
    the columns and ends with the verdict."""
    table = Table(
        title="Latency under load by arm and rate (ms; lower is better)",
        caption=(
            "n: measured trials of all. Medians over repeats of each trial's steady-window statistic. vs base: "
            "ratio to the baseline at the same rate (geometric mean of the ratios paired by repeat), * significant "
            "(paired t-test on logs, Holm). good: "
            f"requests meeting every SLO target; SLO: {slo_words(c) if c.slo else 'none declared'}.\n"
            + escape(verdict(c, short))  # plain text: "[metrics.slo]" is not rich markup
        ),
        caption_justify="left", header_style="bold", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True,
    )
    for column in ("rate", "arm", "n", "TTFT med", "TTFT p99", "TPOT med", "TPOT p99", "E2E med", "goodput",
                   "good", "vs base", "verified"):
        table.add_column(column, justify="left" if column in ("arm", "vs base", "verified") else "right",
                         overflow="fold")
    for s in c.arms:
        lat = s.latency
        table.add_row(
            f"{s.rate:g}", _group_name(s, short) + (" (base)" if s.is_baseline else ""),
            f"{s.summary.n_measured}/{s.summary.n_trials}",
            _ms(lat["ttft_ms_median"].median), _ms(lat["ttft_ms_p99"].median), _ms(lat["tpot_ms_median"].median),
            _ms(lat["tpot_ms_p99"].median), _ms(lat["e2e_ms_median"].median),
            "-" if s.goodput is None else f"{s.goodput:.3g}/s",
            "-" if s.good_fraction is None else f"{s.good_fraction:.0%}",
            _versus(s), _verified(s),
            style="red" if s.summary.flagged else "yellow" if not s.trusted else None,
        )
    return table


def markdown(c: ServingComparison, names: dict[str, str], title: str) -> str:
    """The comparison as Markdown for the parent run's description: the verdict first."""
    head = (
        "| rate (req/s) | arm | trials (measured / all) | TTFT median | TTFT p99 | TPOT median | TPOT p99 | "
        "E2E median | goodput (req/s) | good | vs baseline | verified |"
    )
    rows = [head, "|" + " --- |" * (head.count("|") - 1)]
    for s in c.arms:
        lat = s.latency
        rows.append(
            f"| {s.rate:g} | {names.get(s.arm, s.arm)}{' (baseline)' if s.is_baseline else ''} | "
            f"{s.summary.n_measured} / {s.summary.n_trials} | {_ms(lat['ttft_ms_median'].median)} | "
            f"{_ms(lat['ttft_ms_p99'].median)} | {_ms(lat['tpot_ms_median'].median)} | "
            f"{_ms(lat['tpot_ms_p99'].median)} | {_ms(lat['e2e_ms_median'].median)} | "
            f"{'-' if s.goodput is None else f'{s.goodput:.3g}'} | "
            f"{'-' if s.good_fraction is None else f'{s.good_fraction:.0%}'} | {_versus(s)} | {_verified(s)} |"
        )
    return (
        f"{verdict(c, names)}\n\n{title}\n\n" + "\n".join(rows)
        + f"\n\nLatencies in ms ({LOWER_IS_BETTER}): medians over repeats of each trial's steady-window statistic; "
        "vs baseline: at the same rate, the geometric mean of the ratios paired by repeat block (the ratio of medians "
        "with fewer than 2 pairs), * significant by the paired t-test on the logs (Welch's unpaired), Holm-adjusted. "
        "An arm whose trials are not all ok is never named.\n"
    )


def summary_metrics(c: ServingComparison, names: dict[str, str]) -> dict[str, float]:
    """The parent run's metrics: per arm (short name) its latencies, goodput, good fraction, whether it meets
    the SLO and is verified; per group the highest rate meeting the SLO; the sweep's best such rate."""
    metrics: dict[str, float] = {}
    for s in c.arms:
        prefix = metric_prefix(names.get(s.arm, s.arm))
        values: dict[str, float | None] = {m: _round(s.latency[m].median) for m in LATENCIES}
        values.update(
            goodput_req_s=_round(s.goodput), good_fraction=_round(s.good_fraction),
            meets_slo=None if s.meets_slo is None else float(s.meets_slo),
            verified=float(s.summary.verification == "verified"),
        )
        metrics.update({f"{prefix}: {k}": v for k, v in values.items() if v is not None})
    for group, rate in c.max_rate.items():
        if rate is not None:
            metrics[f"slo {metric_prefix(names.get(group, group))}: max_rate"] = rate
    if c.best is not None and c.max_rate[c.best] is not None:
        metrics["slo: best_max_rate"] = c.max_rate[c.best]  # type: ignore[assignment]  # checked just above
    return metrics


def rows(c: ServingComparison) -> list[dict[str, Any]]:
    """One row per arm for `nova-ab compare --format csv|json`, unrounded."""
    out = []
    for s in c.arms:
        row: dict[str, Any] = {"arm": s.arm, "group": s.group, "rate": s.rate, "baseline": s.is_baseline,
                               "measured": s.summary.n_measured, "trials": s.summary.n_trials}
        for metric, cell in s.latency.items():
            row.update({metric: cell.median, f"{metric}_ratio": cell.ratio, f"{metric}_p_value": cell.p_value})
        row.update(goodput_req_s=s.goodput, good_fraction=s.good_fraction, meets_slo=s.meets_slo,
                   verification=s.summary.verification, flagged=s.summary.flagged)
        out.append(row)
    return out


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def plot(c: ServingComparison, path: str | Path, title: str = "nova-ab online sweep") -> Path:
    """Write the latency-against-rate PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = figure(c, title)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110)
    return Path(path)


def figure(c: ServingComparison, title: str = "nova-ab online sweep") -> Figure:
    """Per group, against the rate: TTFT and TPOT (median solid, p99 dashed, the median's 95% interval as
    whiskers, the SLO target dotted) and goodput (with the offered rate, dotted)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(14, 4.8), layout="constrained")
    ttft, tpot, goodput = fig.subplots(1, 3)
    groups = list(dict.fromkeys(s.group for s in c.arms))
    colours = [f"C{i % 10}" for i in range(len(groups))]
    for group, colour in zip(groups, colours):
        arms = sorted((s for s in c.arms if s.group == group), key=lambda s: s.rate)
        label = group + ("" if all(s.trusted for s in arms) else " (not all ok)")
        for axes, metric in ((ttft, "ttft_ms"), (tpot, "tpot_ms")):
            _line(axes, arms, f"{metric}_median", colour, "-", label)
            _line(axes, arms, f"{metric}_p99", colour, "--", None)
        points = [(s.rate, s.goodput) for s in arms if s.goodput is not None]
        if points:
            goodput.plot(*zip(*points), "o-", color=colour, label=label)
    for axes, key, name in ((ttft, "ttft_ms", "TTFT"), (tpot, "tpot_ms", "TPOT")):
        if key in c.slo:
            axes.axhline(c.slo[key], color="black", linestyle=":", linewidth=1, label="SLO target")
        axes.set_xlabel("request rate (req/s)")
        axes.set_ylabel(f"{name} ms (median solid, p99 dashed; lower is better)")
        axes.set_ylim(bottom=0)
    if c.rates:
        goodput.plot(c.rates, c.rates, ":", color="gray", label="offered rate")
    goodput.set_xlabel("request rate (req/s)")
    goodput.set_ylabel("goodput: requests meeting the SLO per second")
    goodput.set_ylim(bottom=0)
    handles, labels = ttft.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 4), fontsize="small")
    fig.suptitle(f"{title}\n{textwrap.fill(verdict(c).splitlines()[0], 150)}", fontsize="medium")
    return fig


def _line(axes: Any, arms: list[ServingArm], metric: str, colour: str, style: str, label: str | None) -> None:
    cells = [(s.rate, s.latency[metric]) for s in arms if s.latency[metric].median is not None]
    if not cells:
        return
    rates = [r for r, _ in cells]
    medians = [cell.median for _, cell in cells]
    axes.plot(rates, medians, style, marker="o", color=colour, label=label)
    with_ci = [(r, cell) for r, cell in cells if cell.ci is not None and cell.median is not None]
    if with_ci and style == "-":
        axes.errorbar(
            [r for r, _ in with_ci], [cell.median for _, cell in with_ci],
            yerr=[[max(0.0, cell.median - cell.ci[0]) for _, cell in with_ci],  # type: ignore[index,operator]
                  [max(0.0, cell.ci[1] - cell.median) for _, cell in with_ci]],  # type: ignore[index,operator]
            fmt="none", ecolor=colour, capsize=3,
        )


class OnlineReport(NamedTuple):
    """Everything the runner shows and logs of an online sweep, in place of the throughput comparison's."""

    table: Table
    markdown: str
    metrics: dict[str, float]
    png: Path
    view_columns: tuple[str, ...] = VIEW_COLUMNS


def online_report(
    records: Sequence[TrialRecord], baseline_arm: str, names: dict[str, str], title: str, png: Path
) -> OnlineReport:
    """The online sweep's comparison, rendered every way the runner needs it (the PNG written to `png`)."""
    c = compare(records, baseline_arm)
    short = named(c, names)
    table = render_table(c, short)
    return OnlineReport(table, markdown(c, short, title), summary_metrics(c, short), plot(c, png, title))


def named(c: ServingComparison, names: Mapping[str, str]) -> dict[str, str]:
    """The arms' short names (`names`: arm label -> name) and their groups' (an arm's short name without its rate
    part, where those stay unique): what the table, the verdict and MLflow's metric keys call them."""
    return {**names, **_group_names(c, names)}


def _group_names(c: ServingComparison, names: Mapping[str, str]) -> dict[str, str]:
    """Short names of the groups (an arm's short name without its rate part), where they stay unique."""
    short: dict[str, str] = {}
    for s in c.arms:
        name = names.get(s.arm, s.arm)
        short[s.group] = SEPARATOR.join(p for p in name.split(SEPARATOR) if not p.startswith(f"{RATE}=")) or s.group
    return short if len(set(short.values())) == len(short) else {}
