"""The statistics of a sweep's arms: per-arm summaries, intervals, tests, verification and the winner.

novainfer.ab.sweep.report puts them into words, a table, Markdown, metrics and a plot.

Statistics, all over an arm's measured trials ("ok" and "unverified": they ran the whole workload to the
right lengths; the other statuses are counted, never measured):
- headline: the median of output_tok_s (robust to one slow repeat);
- 95% interval: Student's t-interval of log(tok/s), exponentiated: an interval of the geometric mean,
  exp(m +- t(0.975, n-1) * s / sqrt(n)) with m, s the mean and standard deviation of the logs
  (scipy.stats.ttest_1samp(logs, 0).confidence_interval()). It is always above 0, where the interval of the
  plain mean spans negative throughput with 2 repeats. With the 3 to 10 repeats a sweep has, a bootstrap of
  the median is too coarse (it can only return observed values) and distribution-free intervals of the
  median cannot reach 95% below 6 samples. Only from MIN_INTERVAL_REPEATS measured trials: with 2, t(0.975, 1)
  = 12.7 stretches the interval over orders of magnitude (5e-9 to 1e13 tok/s was seen); below that the
  summary keeps the range of the trials (value_range) and the report says "too few repeats";
- speedup: median of the arm / median of the baseline; its 95% interval (one GPU) is Welch's on log(tok/s),
  exponentiated (scipy.stats.ttest_ind(arm logs, baseline logs, equal_var=False).confidence_interval()): an
  interval of the ratio of the geometric means, the quantity the test is about, from MIN_INTERVAL_REPEATS
  measured trials on each side;
- significance: Welch's two-sided t-test of log(tok/s) of the arm against the baseline (a test of the
  ratio of geometric means, i.e. of the speedup), with Holm's correction over all the arms compared in
  the sweep, significant when the adjusted p < 0.05. Without the correction, a sweep of 20 arms that are
  all equal would show some arm as significantly different about two times in three (1 - 0.95^20). With
  fewer than 2 measured trials on either side there is no test: "n/a", never "yes";
- "too few repeats to tell": for an arm the test cannot tell from the baseline, the repeats per arm that
  would resolve the difference at the observed spread, by the normal approximation at 80% power and a
  two-sided 5% level (before Holm): n = ceil(2 (z_0.975 + z_0.80)^2 s^2 / d^2), s the pooled standard
  deviation of the two arms' logs, d = max(|log r|, log 1.02) with r the ratio of geometric means (the
  quantity the test is about): the observed difference, never finer than 2%; and never fewer than one
  more than the arms have, since those did not resolve it (the approximation undershoots at small n).

Blocks: a sweep on several GPUs (the tag gpu_uuid of its measured trials takes more than one value) runs each
repeat block, every arm once, on one GPU, and GPUs differ: a comparison of the arm's trials on one GPU with
the baseline's on another would measure the GPUs as much as the arm. There the comparison is paired by block,
a block being (repeat, gpu_uuid): over the k blocks in which both the arm and the baseline have a measured
trial, d = log(arm tok/s) - log(baseline tok/s), and
- speedup: exp(mean d), the geometric mean of the paired ratios (no longer the ratio of medians), with the
  95% interval exp(mean d +- t(0.975, k-1) * sd(d) / sqrt(k)) (ttest_1samp(d, 0).confidence_interval(), from
  MIN_INTERVAL_REPEATS blocks);
- significance: the paired t-test (d against 0, two-sided), Holm-adjusted over the arms as above; with
  fewer than 2 blocks there is no test, and an arm that never met the baseline on the same GPU gets no
  speedup either, so it cannot win;
- "too few repeats to tell": n = ceil((z_0.975 + z_0.80)^2 s_d^2 / d^2) blocks, s_d the standard deviation
  of the d, with the same 2% floor, and never fewer than k + 1.
Trials without a gpu_uuid tag take no part in the pairing. On one GPU, or without the tag, nothing changes.

Verification: an arm is "verified" when every measured trial is "ok" (both checks passed: the output check,
every output token of the timed run against the core's reference, and the step gate, a random sample of the
run's planned steps replayed against it), "unverified" when some measured trial is "unverified" (a check did
not run or did not cover every token), "failed" when some trial is "incorrect" (this wins over the other two),
"unmeasured" when no trial was measured. An unverified arm's numbers, speedup and p-value are shown, but it
never wins. Speedup claims need a baseline that is verified and not flagged: otherwise no arm gets a speedup,
p-value or significance, and the caption says why. What "verified" covered is shown beside it in counts, never
abbreviated: output tokens checked of those produced (or outside the margin), planned steps replayed of those
run, and the bar, the least relative error a step was allowed.

Hand-written where scipy.stats has no equivalent: Holm's step-down adjustment (scipy has only the
Benjamini-Hochberg/Yekutieli false_discovery_control) and the normal-approximation sample size (scipy has
no power analysis); tests check both by their formulas.

Throttling: a measured trial whose timed window saw the GPU's clocks held down for heat or power
(TrialRecord.throttled, novainfer.ab.trial.telemetry) is counted per arm (`throttled`): its number is kept, and
the report says so beside the arm, since a throttled trial looks like a slow backend.

An arm with any "incorrect" or "caliber_mismatch" trial is flagged: its numbers are shown, but it can
never win. The winner is the fastest arm (by median) whose trials are all "ok", that is significantly
faster than the baseline (speedup > 1 and a higher geometric mean); there may be none.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from scipy import stats

from novainfer.ab.wire import FLAG_STATUSES, MEASURED, RANKABLE, TrialRecord, gate_coverage

HEADLINE = "output_tok_s"
PHASES = ("metadata", "kv_write", "attention")  # metric phase_<name>_s
ALPHA = 0.05
CONFIDENCE = 0.95
POWER = 0.80  # of the "repeats needed" estimate
FINEST_RATIO = 1.02  # the smallest difference the "repeats needed" estimate aims at
GPU_TAG = "gpu_uuid"  # the trial's GPU (TrialRecord.tags): the blocks of a sweep on several GPUs
NEVER_MET = "never met the baseline on the same GPU: no paired comparison"
# The fewest measured trials (or blocks) an interval is computed from: at 2, t(0.975, 1) = 12.7 makes it useless.
MIN_INTERVAL_REPEATS = 3

Verification = Literal["verified", "unverified", "failed", "unmeasured"]


@dataclass
class ArmSummary:
    """One arm of a sweep, summarized (numbers over its measured trials; None when there are none).

    counts: trials by status. n_ok: "ok" trials; n_measured: "ok" and "unverified" trials.
    median: of output tok/s. mean: the geometric mean of output tok/s. ci: the 95% t-interval of
        log(tok/s), exponentiated, (lo, hi) with lo > 0; None with fewer than MIN_INTERVAL_REPEATS measured
        trials. value_range: (lowest, highest) output tok/s of the measured trials; None when none was measured.
    speedup: median / the baseline's median; when paired by GPU (see the module's docstring), the geometric
        mean of the paired ratios; None when the baseline cannot carry claims or the arm never met it.
    speedup_ci: the 95% interval of the speedup: Welch's on log tok/s on one GPU, the paired one on several
        (see the module's docstring); None below MIN_INTERVAL_REPEATS on a side (blocks), or without a speedup.
    paired_blocks: the blocks (repeat, GPU) in which the arm met the baseline, when the comparison is paired
        by GPU; None when it is unpaired (one GPU, no gpu_uuid tags) or not made (the baseline itself, an
        unmeasured arm, a baseline that cannot carry claims).
    p_value: Welch's t-test of log(tok/s) against the baseline (the paired t-test when paired),
        Holm-adjusted; None when untested.
    significant: p_value < 0.05; None ("n/a") when untested, and for the baseline itself.
    repeats_needed, resolvable_pct: when the test cannot tell the arm from the baseline, the repeats per
        arm that would resolve a difference of resolvable_pct percent at the observed spread.
    undecided: that verdict in plain words ("too few repeats to tell: ..."), or what is missing for one
        (a side with fewer than 2 measured trials, no spread at all); None when decided or not compared.
    phases: median seconds of each phase in PHASES; run_seconds: median run_seconds.
    flagged: some trial was "incorrect" or "caliber_mismatch".
    verification: "verified", "unverified", "failed" or "unmeasured" (see the module's docstring).
    gate_max_rel_err: the worst max_rel_err (overall or per kind) over all the arm's trials that have it;
        NaN when any is NaN.
    tokens_checked, tokens_produced, tokens_outside: the output check's token counts, summed over every trial
        that ran it (whatever its status: a failed arm's incorrect trials are where its tokens fell outside);
        None when none did.
    steps_checked, run_steps: the step gate's replayed steps and the run's planned steps, of the ok trial that
        replayed the fewest: what every verified trial vouches for. None when no ok trial reports both.
    bar: the largest gate_bar over the arm's trials, the loosest any trial was held to (a step may be allowed
        more where its floor's rounding is larger). None when no trial reports one.
    output_check_cost: the median of output_check_seconds / run_seconds: what checking every token costs
        beside the timed run. None when no trial reports both.
    requests_off: total requests whose output length differed from the drawn one, over the trials that
        report it; None when none does.
    throttled: measured trials whose timed window saw thermal or power throttling; throttle_reasons: what
        held the clocks down, over those trials, in NVML's words ("sw power cap", ...).
    reasons: the first trial's reason for each status that is not measured ("skipped": why it cannot run here).
    """

    arm: str
    is_baseline: bool
    counts: dict[str, int]
    n_ok: int
    n_measured: int
    median: float | None
    mean: float | None
    ci: tuple[float, float] | None
    value_range: tuple[float, float] | None = None
    speedup: float | None = None
    speedup_ci: tuple[float, float] | None = None
    paired_blocks: int | None = None
    p_value: float | None = None
    significant: bool | None = None
    repeats_needed: int | None = None
    resolvable_pct: float | None = None
    undecided: str | None = None
    phases: dict[str, float | None] = field(default_factory=dict)
    run_seconds: float | None = None
    flagged: bool = False
    verification: Verification = "unmeasured"
    gate_max_rel_err: float | None = None
    tokens_checked: int | None = None
    tokens_produced: int | None = None
    tokens_outside: int | None = None
    steps_checked: int | None = None
    run_steps: int | None = None
    bar: float | None = None
    output_check_cost: float | None = None
    requests_off: int | None = None
    throttled: int = 0
    throttle_reasons: list[str] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)
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
    """One ArmSummary per arm: the baseline first, then the others from fastest to slowest median.

    On several GPUs each arm is compared with the baseline paired by block (see the module's docstring)."""
    by_arm: dict[str, list[TrialRecord]] = {}
    for record in sorted(records, key=lambda r: r.order):
        by_arm.setdefault(record.arm, []).append(record)
    summaries = {arm: _summarize_arm(arm, trials, arm == baseline_arm) for arm, trials in by_arm.items()}
    logs = {arm: [math.log(v) for v in _measured_values(trials, HEADLINE)] for arm, trials in by_arm.items()}
    paired = len(gpu_blocks(t for trials in by_arm.values() for t in trials)) > 1

    baseline = summaries.get(baseline_arm)
    if baseline is not None and baseline_problem(baseline) is None and baseline.median:
        raw: dict[str, float] = {}
        diffs: dict[str, list[float]] = {}
        for arm, summary in summaries.items():
            if summary.median is None:
                continue
            if paired and arm != baseline_arm:
                diffs[arm] = paired_differences(by_arm[arm], by_arm[baseline_arm])
                _pair(summary, diffs[arm])
                if len(diffs[arm]) >= 2:
                    raw[arm] = paired_p_value(diffs[arm])
                continue
            summary.speedup = summary.median / baseline.median
            if arm != baseline_arm and len(logs[arm]) >= 2 and len(logs[baseline_arm]) >= 2:
                raw[arm] = welch_p_value(logs[arm], logs[baseline_arm])
            if arm != baseline_arm and min(len(logs[arm]), len(logs[baseline_arm])) >= MIN_INTERVAL_REPEATS:
                summary.speedup_ci = welch_ratio_interval(logs[arm], logs[baseline_arm])
        for arm, p in holm_adjust(raw).items():
            summaries[arm].p_value = p
            summaries[arm].significant = p < ALPHA
        for arm, summary in summaries.items():
            if arm == baseline_arm or summary.median is None or summary.significant:
                continue
            if arm in diffs:
                _resolve_paired(summary, diffs[arm])
            else:
                _resolve(summary, logs[arm], logs[baseline_arm])
        candidates = [s for s in summaries.values() if not s.is_baseline and s.all_ok and _faster(s, baseline)]
        if candidates:
            max(candidates, key=rank).winner = True

    return sorted(
        summaries.values(),
        key=lambda s: (not s.is_baseline, s.median is None, -(s.median or 0.0)),
    )


def gpu_blocks(records: Iterable[TrialRecord]) -> dict[str, list[str]]:
    """Which arms have measured trials on which GPU: gpu_uuid tag -> the sorted arm labels (trials without
    the tag left out). More than one key means the sweep's comparisons are paired by GPU; an arm and the
    baseline can only be compared where they share a GPU."""
    arms: dict[str, set[str]] = {}
    for record in records:
        gpu = record.tags.get(GPU_TAG)
        if record.status in MEASURED and gpu is not None and HEADLINE in record.metrics:
            arms.setdefault(gpu, set()).add(record.arm)
    return {gpu: sorted(labels) for gpu, labels in sorted(arms.items())}


def paired_differences(arm: Iterable[TrialRecord], baseline: Iterable[TrialRecord]) -> list[float]:
    """log(arm tok/s) - log(baseline tok/s) in every block (repeat, gpu_uuid) where both have a measured
    trial, in block order (a block's trials averaged on the log scale, should a block hold more than one)."""
    arm_blocks, base_blocks = _block_logs(arm), _block_logs(baseline)
    return [
        statistics.fmean(arm_blocks[block]) - statistics.fmean(base_blocks[block])
        for block in sorted(arm_blocks.keys() & base_blocks.keys())
    ]


def paired_p_value(diffs: Sequence[float]) -> float:
    """Two-sided p-value of the paired t-test: the one-sample t-test of the differences against 0 (needs 2
    or more)."""
    if statistics.variance(diffs) == 0:
        # As in welch_p_value: identical differences are a certainty, not noise.
        return 1.0 if statistics.fmean(diffs) == 0 else 0.0
    return float(stats.ttest_1samp(diffs, 0.0).pvalue)


def _block_logs(trials: Iterable[TrialRecord]) -> dict[tuple[int, str], list[float]]:
    blocks: dict[tuple[int, str], list[float]] = {}
    for t in trials:
        gpu = t.tags.get(GPU_TAG)
        if t.status in MEASURED and gpu is not None and HEADLINE in t.metrics:
            blocks.setdefault((t.repeat, gpu), []).append(math.log(t.metrics[HEADLINE]))
    return blocks


def _pair(summary: ArmSummary, diffs: list[float]) -> None:
    """Set the paired speedup and its interval from the arm's differences with the baseline (if any)."""
    summary.paired_blocks = len(diffs)
    if not diffs:
        return
    summary.speedup = math.exp(statistics.fmean(diffs))
    if len(diffs) >= MIN_INTERVAL_REPEATS:
        low, high = _mean_interval(diffs)
        summary.speedup_ci = (math.exp(low), math.exp(high))


def _faster(s: ArmSummary, baseline: ArmSummary) -> bool:
    """Significantly faster than the baseline, in the direction its test measured: the paired speedup, or
    the geometric means (and the medians) of an unpaired comparison."""
    if not s.significant or (s.speedup or 0.0) <= 1.0:
        return False
    return s.paired_blocks is not None or (s.mean is not None and baseline.mean is not None and s.mean > baseline.mean)


def rank(s: ArmSummary) -> float:
    """What "fastest" means among arms: the paired speedup when paired by GPU (medians mix GPUs), else the
    median."""
    return (s.speedup if s.paired_blocks is not None else s.median) or 0.0


def baseline_problem(baseline: ArmSummary | None) -> str | None:
    """Why the baseline cannot carry speedup claims (a short phrase), or None when it can."""
    if baseline is None:
        return "no baseline among the trials"
    if baseline.verification == "unverified":
        return "baseline unverified"
    if baseline.verification == "failed":
        return "baseline failed its correctness gate"
    if baseline.flagged:
        return "baseline has caliber mismatches"
    if baseline.n_ok == 0:
        return "baseline has no ok trials"
    return None


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
    for i, (key, p) in enumerate(sorted(p_values.items(), key=lambda item: item[1])):
        running = max(running, min(1.0, (m - i) * p))
        adjusted[key] = running
    return adjusted


def geometric_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The t confidence interval of the geometric mean: of log(values), exponentiated (needs 2 or more
    positive values). Always above 0, and asymmetric the way a ratio's uncertainty is."""
    low, high = _mean_interval([math.log(v) for v in values], confidence)
    return math.exp(low), math.exp(high)


def welch_ratio_interval(
    arm_logs: Sequence[float], base_logs: Sequence[float], confidence: float = CONFIDENCE
) -> tuple[float, float]:
    """Welch's t confidence interval of mean(arm_logs) - mean(base_logs), exponentiated: the interval of the
    ratio of the two geometric means (needs 2 or more values on each side)."""
    if statistics.variance(arm_logs) == 0 and statistics.variance(base_logs) == 0:
        # No spread on either side: the ratio is what was measured (scipy's t would be 0/0).
        ratio = math.exp(statistics.fmean(arm_logs) - statistics.fmean(base_logs))
        return ratio, ratio
    ci = stats.ttest_ind(arm_logs, base_logs, equal_var=False).confidence_interval(confidence)
    return math.exp(float(ci.low)), math.exp(float(ci.high))


def _mean_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Student's t confidence interval of the mean of `values` (2 or more): mean +- t(., n-1) * s / sqrt(n)."""
    if statistics.variance(values) == 0:
        # Identical values: the interval is the value itself (scipy warns of lost precision and may say nan).
        mean = statistics.fmean(values)
        return mean, mean
    ci = stats.ttest_1samp(values, 0.0).confidence_interval(confidence)
    return float(ci.low), float(ci.high)


def _resolve(summary: ArmSummary, arm_logs: list[float], base_logs: list[float]) -> None:
    """Set what it would take to tell the arm from the baseline (the test could not)."""
    if len(arm_logs) < 2 or len(base_logs) < 2:
        summary.undecided = (
            f"too few repeats to tell: {len(arm_logs)} measured here and {len(base_logs)} for the baseline, "
            "a test needs 2 on each side"
        )
        return
    dof = len(arm_logs) + len(base_logs) - 2
    pooled_var = (
        (len(arm_logs) - 1) * statistics.variance(arm_logs) + (len(base_logs) - 1) * statistics.variance(base_logs)
    ) / dof
    diff = statistics.fmean(arm_logs) - statistics.fmean(base_logs)
    # Two samples: the difference of two means has twice the variance of one.
    _repeats_needed(summary, 2 * pooled_var, diff, max(len(arm_logs), len(base_logs)))


def _resolve_paired(summary: ArmSummary, diffs: list[float]) -> None:
    """_resolve for a comparison paired by GPU: the repeats (blocks) the paired test would need."""
    if not diffs:
        summary.undecided = NEVER_MET
        return
    if len(diffs) < 2:
        summary.undecided = (
            "too few repeats to tell: met the baseline on the same GPU in only 1 block, a paired test needs 2"
        )
        return
    _repeats_needed(summary, statistics.variance(diffs), statistics.fmean(diffs), len(diffs))


def _repeats_needed(summary: ArmSummary, variance: float, diff: float, have: int) -> None:
    """n = ceil((z_0.975 + z_0.80)^2 variance / d^2), d = max(|diff|, log FINEST_RATIO), at least have + 1;
    variance is that of one repeat's contribution to the difference of the logs."""
    if variance == 0:
        summary.undecided = "no spread between repeats and no difference: nothing to resolve"
        return
    d = max(abs(diff), math.log(FINEST_RATIO))
    z = stats.norm.ppf(1 - ALPHA / 2) + stats.norm.ppf(POWER)
    # Never fewer than one more than the arms have: these did not resolve it (the normal approximation
    # undershoots at small n, where the t distribution's tails are wide).
    summary.repeats_needed = max(math.ceil(z**2 * variance / d**2), have + 1)
    summary.resolvable_pct = (math.exp(d) - 1) * 100
    summary.undecided = (
        f"too few repeats to tell: ~{summary.repeats_needed} per arm would resolve "
        f"a {pct(summary.resolvable_pct)}% difference at this spread"
    )


def _summarize_arm(arm: str, trials: list[TrialRecord], is_baseline: bool) -> ArmSummary:
    values = _measured_values(trials, HEADLINE)
    counts = Counter(t.status for t in trials)
    errors = [
        err
        for t in trials
        for err in (t.metrics.get("max_rel_err"), *(c.get("max_rel_err") for c in gate_coverage(t.metrics).values()))
        if err is not None
    ]
    steps = [
        (int(t.metrics["gate_steps"]), int(t.metrics["gate_run_steps"]))
        for t in trials
        if t.status in RANKABLE and "gate_steps" in t.metrics and "gate_run_steps" in t.metrics
    ]
    bars = [t.metrics["gate_bar"] for t in trials if "gate_bar" in t.metrics]
    throttled = [t for t in trials if t.status in MEASURED and t.throttled]
    costs = [
        t.metrics["output_check_seconds"] / t.metrics["run_seconds"]
        for t in trials
        if "output_check_seconds" in t.metrics and t.metrics.get("run_seconds")
    ]
    return ArmSummary(
        arm=arm,
        is_baseline=is_baseline,
        counts=dict(counts),
        n_ok=sum(counts[s] for s in RANKABLE),
        n_measured=len(values),
        median=_median_or_none(values),
        mean=statistics.geometric_mean(values) if values else None,
        ci=geometric_interval(values) if len(values) >= MIN_INTERVAL_REPEATS else None,
        value_range=(min(values), max(values)) if values else None,
        phases={p: _median_or_none(_measured_values(trials, f"phase_{p}_s")) for p in PHASES},
        run_seconds=_median_or_none(_measured_values(trials, "run_seconds")),
        flagged=any(counts[s] for s in FLAG_STATUSES),
        verification=_verification(counts),
        gate_max_rel_err=_worst(errors),
        tokens_checked=_total(trials, "output_tokens_checked"),
        tokens_produced=_total(trials, "output_tokens_produced"),
        tokens_outside=_total(trials, "output_tokens_outside"),
        steps_checked=min(steps)[0] if steps else None,
        run_steps=min(steps)[1] if steps else None,
        bar=max(bars) if bars else None,
        output_check_cost=_median_or_none(costs),
        requests_off=_total(trials, "requests_off"),
        throttled=len(throttled),
        throttle_reasons=sorted({r for t in throttled for r in (t.throttled or "").split(", ") if r}),
        reasons={t.status: t.reason for t in reversed(trials) if t.status not in MEASURED and t.reason},
    )


def _total(trials: list[TrialRecord], metric: str) -> int | None:
    """The metric summed over the trials that report it (counts); None when none does."""
    values = [t.metrics[metric] for t in trials if metric in t.metrics]
    return int(sum(values)) if values else None


def _worst(errors: list[float]) -> float | None:
    """The largest error, NaN when any is NaN (the gate fails NaN; max() would depend on the order)."""
    if not errors:
        return None
    return math.nan if any(math.isnan(e) for e in errors) else max(errors)


def _verification(counts: Counter[str]) -> Verification:
    if counts["incorrect"]:
        return "failed"
    if any(counts[s] for s in MEASURED if s not in RANKABLE):
        return "unverified"
    return "verified" if any(counts[s] for s in RANKABLE) else "unmeasured"


def _measured_values(trials: Iterable[TrialRecord], metric: str) -> list[float]:
    return [t.metrics[metric] for t in trials if t.status in MEASURED and metric in t.metrics]


def _median_or_none(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


# -- rendering -----------------------------------------------------------------------------------------


def pct(percent: float) -> str:
    """A percentage as the report prints it: whole above 10, two significant digits below."""
    return f"{percent:.0f}" if percent >= 10 else f"{percent:.2g}"
