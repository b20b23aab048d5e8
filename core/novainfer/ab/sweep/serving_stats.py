"""The statistics of an online sweep: per arm and rate, latency with intervals, tests against the baseline at
the same rate, and the highest rate at which each arm meets the SLO.

An online trial reports, per latency metric, the steady window's mean, median, p90 and p99 (novainfer.ab.trial.
latency). Across an arm's repeats, each of those is one value per trial, and the comparison treats it as the
throughput comparison treats tok/s (novainfer.ab.sweep.statistics, whose rules of trust apply unchanged: only
measured trials count, only a verified baseline carries claims, a flagged or unverified arm is never named):

- per arm and metric: the median over its measured trials, and the t-interval of the log values (the
  geometric mean's 95% interval); lower is better for every latency;
- against the baseline at the same rate (the arm whose settings are the baseline's, the rate aside), paired
  by repeat: a repeat block runs every arm once, one after another, so the machine's drift between blocks (its
  load, its clocks: latency on a shared machine moves several-fold over minutes) is common to the pair and
  cancels in d = log(arm) - log(baseline). Over the k repeats where both were measured, the ratio is exp(mean
  d) (the geometric mean of the paired ratios) and the test the paired t-test of d against 0; with fewer than
  2 pairs, the ratio of medians and Welch's t-test of the logs. Holm-adjusted over every (arm, rate, headline
  metric) compared in the sweep; an arm is "better" or "worse" on a metric only when that test is significant;
- the SLO: an arm meets it at its rate when the median over its measured trials of good_fraction (the steady
  window's requests meeting every declared target) reaches the declared attainment; an arm's settings (its
  group: the label without the rate) meet it up to the highest rate at which they do. The sweep's answer is
  the verified group that meets it at the highest rate (ties: the higher goodput there).

The arms' rates, the SLO and the attainment are read back from the records (the rate axis from arm_params,
the targets from each trial's slo_* metrics), so `nova-ab compare` needs no experiment file.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from novainfer.ab.sweep.statistics import (
    ALPHA,
    ArmSummary,
    baseline_problem,
    geometric_interval,
    holm_adjust,
    paired_p_value,
    summarize,
    welch_p_value,
)
from novainfer.ab.wire import MEASURED, TrialRecord

RATE = "rate"  # the rate axis's key in arm_params (novainfer.ab.sweep.experiment.RATE_AXIS)
# The latencies the verdict compares (each tested against the baseline at the same rate).
HEADLINES = ("ttft_ms_median", "ttft_ms_p99", "tpot_ms_median", "tpot_ms_p99")
# Every latency the table and the plot show.
LATENCIES = (*HEADLINES, "itl_ms_p99", "e2e_ms_median")
SLO_METRICS = ("slo_ttft_ms", "slo_tpot_ms", "slo_e2e_ms")
WORDS = {
    "ttft_ms_median": "TTFT median", "ttft_ms_p99": "TTFT p99", "tpot_ms_median": "TPOT median",
    "tpot_ms_p99": "TPOT p99", "itl_ms_p99": "ITL p99", "e2e_ms_median": "E2E median",
}


@dataclass
class Latency:
    """One arm's metric over its measured trials; against the baseline at its rate where there is a claim."""

    median: float | None
    ci: tuple[float, float] | None = None
    ratio: float | None = None
    p_value: float | None = None
    significant: bool | None = None

    @property
    def verdict(self) -> str | None:
        """"better" or "worse" (lower is better) when significant, else None."""
        if not self.significant or self.ratio is None or self.ratio == 1:
            return None
        return "better" if self.ratio < 1 else "worse"


@dataclass
class ServingArm:
    """One arm of an online sweep: its throughput summary (trust: verification, flags), its group (the label
    without the rate), its rate, each latency, the median goodput and good fraction, and whether it meets
    the SLO at its rate (None: not measured)."""

    summary: ArmSummary
    group: str
    rate: float
    is_baseline: bool
    latency: dict[str, Latency] = field(default_factory=dict)
    goodput: float | None = None
    good_fraction: float | None = None
    meets_slo: bool | None = None

    @property
    def arm(self) -> str:
        return self.summary.arm

    @property
    def trusted(self) -> bool:
        """Every trial ok: the only arms the verdict may name."""
        return self.summary.all_ok and not self.summary.flagged


@dataclass
class ServingComparison:
    """The online sweep: arms by rate then baseline first; the SLO read from the records ({} when none was
    declared) and its attainment; each group's highest rate meeting it; the answer (best, None: none)."""

    arms: list[ServingArm]
    rates: list[float]
    baseline_group: str
    slo: dict[str, float]
    attainment: float
    max_rate: dict[str, float | None]
    best: str | None
    problem: dict[float, str] = field(default_factory=dict)  # rate -> why its baseline carries no claims


def is_online(records: Iterable[TrialRecord]) -> bool:
    """Whether the sweep's trials ran an online caliber (they report a declared arrival rate)."""
    return any("declared_rate" in r.metrics for r in records)


def group_of(label: str, params: dict[str, object]) -> str:
    """An arm's label without its rate: the settings that are compared across rates."""
    return ",".join(part for part in label.split(",") if not part.startswith(f"{RATE}=")) if RATE in params else label


def compare(records: Sequence[TrialRecord], baseline_arm: str) -> ServingComparison:
    """The online comparison of `records` (one sweep), against the baseline arm's settings at every rate."""
    records = sorted(records, key=lambda r: r.order)
    summaries = {s.arm: s for s in summarize(records, baseline_arm)}
    by_arm: dict[str, list[TrialRecord]] = {}
    for record in records:
        by_arm.setdefault(record.arm, []).append(record)
    params = {arm: trials[0].arm_params for arm, trials in by_arm.items()}
    baseline_group = group_of(baseline_arm, params.get(baseline_arm, {}))
    arms: list[ServingArm] = []
    for arm, trials in by_arm.items():
        rate = _rate(trials)
        group = group_of(arm, params[arm])
        serving = ServingArm(summaries[arm], group, rate, group == baseline_group)
        for metric in LATENCIES:
            values = _values(trials, metric)
            serving.latency[metric] = Latency(
                _median(values), geometric_interval(values) if len(values) >= 2 and min(values) > 0 else None
            )
        serving.goodput = _median(_values(trials, "goodput_req_s"))
        serving.good_fraction = _median(_values(trials, "good_fraction"))
        arms.append(serving)
    slo, attainment = _slo(records)
    for s in arms:
        if s.good_fraction is not None and slo:
            s.meets_slo = s.good_fraction >= attainment
    problem = _test_against_baselines(arms, by_arm)
    rates = sorted({s.rate for s in arms})
    arms.sort(key=lambda s: (s.rate, not s.is_baseline, s.group))
    max_rate: dict[str, float | None] = {}
    for s in arms:
        max_rate.setdefault(s.group, None)
        if s.meets_slo:
            max_rate[s.group] = s.rate  # arms are in rising rate order
    best = _best(arms, max_rate)
    return ServingComparison(arms, rates, baseline_group, slo, attainment, max_rate, best, problem)


def _test_against_baselines(arms: list[ServingArm], by_arm: dict[str, list[TrialRecord]]) -> dict[float, str]:
    """Set each arm's ratios and Holm-adjusted tests against the baseline at its rate; returns, per rate, why
    its baseline carries no claims (a baseline that is unverified, flagged or missing)."""
    baselines = {s.rate: s for s in arms if s.is_baseline}
    problems: dict[float, str] = {}
    raw: dict[tuple[str, str], float] = {}
    for s in arms:
        base = baselines.get(s.rate)
        problem = baseline_problem(base.summary if base is not None else None)
        if problem is not None:
            problems[s.rate] = problem
            continue
        if s.is_baseline or base is None:
            continue
        for metric in HEADLINES:
            cell, base_cell = s.latency[metric], base.latency[metric]
            diffs = _paired(by_arm[s.arm], by_arm[base.arm], metric)
            if len(diffs) >= 2:
                cell.ratio = math.exp(statistics.fmean(diffs))
                raw[(s.arm, metric)] = paired_p_value(diffs)
                continue
            mine, theirs = _values(by_arm[s.arm], metric), _values(by_arm[base.arm], metric)
            if cell.median and base_cell.median:
                cell.ratio = cell.median / base_cell.median
            if len(mine) >= 2 and len(theirs) >= 2 and min(mine + theirs) > 0:
                raw[(s.arm, metric)] = welch_p_value([math.log(v) for v in mine], [math.log(v) for v in theirs])
    named = {s.arm: s for s in arms}
    # holm_adjust keys are strings: arm and metric joined by a character no label has.
    adjusted = holm_adjust({f"{arm}\0{metric}": p for (arm, metric), p in raw.items()})
    for key, p in adjusted.items():
        arm, metric = key.split("\0")
        cell = named[arm].latency[metric]
        cell.p_value, cell.significant = p, p < ALPHA
    return problems


def _best(arms: list[ServingArm], max_rate: dict[str, float | None]) -> str | None:
    """The group that meets the SLO at the highest rate, every one of its arms up to that rate trusted;
    ties go to the higher goodput at that rate."""
    candidates = []
    for group, rate in max_rate.items():
        if rate is None:
            continue
        mine = [s for s in arms if s.group == group and s.rate <= rate]
        if all(s.trusted for s in mine):
            at = next(s for s in mine if s.rate == rate)
            candidates.append((rate, at.goodput or 0.0, group))
    return max(candidates)[2] if candidates else None


def _slo(records: Sequence[TrialRecord]) -> tuple[dict[str, float], float]:
    """The declared targets (metric -> ms) and attainment, as the trials recorded them."""
    for record in records:
        if "slo_attainment" in record.metrics:
            targets = {m.removeprefix("slo_"): record.metrics[m] for m in SLO_METRICS if m in record.metrics}
            return targets, record.metrics["slo_attainment"]
    return {}, 0.9


def _paired(arm: list[TrialRecord], baseline: list[TrialRecord], metric: str) -> list[float]:
    """log(arm) - log(baseline) of the metric in every repeat where both have a measured, positive value."""
    mine, theirs = _by_repeat(arm, metric), _by_repeat(baseline, metric)
    return [math.log(mine[r]) - math.log(theirs[r]) for r in sorted(mine.keys() & theirs.keys())]


def _by_repeat(trials: list[TrialRecord], metric: str) -> dict[int, float]:
    return {
        t.repeat: t.metrics[metric] for t in trials
        if t.status in MEASURED and t.metrics.get(metric, 0.0) > 0
    }


def _rate(trials: list[TrialRecord]) -> float:
    rate = trials[0].arm_params.get(RATE)
    if isinstance(rate, int | float):
        return float(rate)
    declared = [t.metrics["declared_rate"] for t in trials if "declared_rate" in t.metrics]
    return declared[0] if declared else math.nan


def _values(trials: Iterable[TrialRecord], metric: str) -> list[float]:
    return [t.metrics[metric] for t in trials if t.status in MEASURED and metric in t.metrics]


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None
