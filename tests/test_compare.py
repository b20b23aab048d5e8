"""The comparison on known numbers, with the expected statistics computed here by their formulas."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
from rich.console import Console
from scipy import stats

from novainfer.ab.sweep.report import (
    VERIFIED_LEGEND,
    figure,
    legend_categories,
    markdown,
    plot,
    render_table,
    summary_metrics,
    summary_row,
    verdict,
)
from novainfer.ab.sweep.statistics import ArmSummary, gpu_blocks, holm_adjust, summarize, welch_p_value
from novainfer.ab.wire import TrialRecord

BASE = "backend=native"


def _trials(
    arm: str, values: list[float], statuses: list[str] | None = None, extra: list[dict[str, float]] | None = None
) -> list[TrialRecord]:
    """One record per value, with the given statuses (default "ok") and extra metrics per trial."""
    statuses = statuses or ["ok"] * len(values)
    extra = extra or [{}] * len(values)
    return [
        TrialRecord(
            sweep_id="s",
            trial_id=f"{arm}#{i}",
            arm=arm,
            arm_params={},
            repeat=i,
            order=i,
            status=status,  # type: ignore[arg-type]
            metrics={
                "output_tok_s": value,
                "run_seconds": 10.0 + i,
                "phase_metadata_s": 1.0,
                "phase_kv_write_s": 2.0 + i,
                "phase_attention_s": 4.0,
                **more,
            },
        )
        for i, (value, status, more) in enumerate(zip(values, statuses, extra, strict=True))
    ]


def _by_arm(summaries: list[ArmSummary]) -> dict[str, ArmSummary]:
    return {s.arm: s for s in summaries}


def _welch_by_hand(a: list[float], b: list[float]) -> float:
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    t = (statistics.fmean(a) - statistics.fmean(b)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))  # Welch-Satterthwaite
    return 2 * stats.t.sf(abs(t), df)


def _logs(values: list[float]) -> list[float]:
    return [math.log(v) for v in values]


def _geometric_interval_by_hand(values: list[float]) -> tuple[float, float]:
    """exp(m -+ t(0.975, n-1) * s / sqrt(n)), m and s of the logs."""
    logs = _logs(values)
    half = stats.t.ppf(0.975, len(logs) - 1) * statistics.stdev(logs) / math.sqrt(len(logs))
    return math.exp(statistics.fmean(logs) - half), math.exp(statistics.fmean(logs) + half)


def _repeats_by_hand(a: list[float], b: list[float]) -> tuple[int, float]:
    """n = ceil(2 (z_0.975 + z_0.80)^2 s^2 / d^2), s pooled over the logs, d = max(|diff of log means|, log 1.02);
    and the percentage d stands for."""
    la, lb = _logs(a), _logs(b)
    pooled = ((len(la) - 1) * statistics.variance(la) + (len(lb) - 1) * statistics.variance(lb)) / (
        len(la) + len(lb) - 2
    )
    d = max(abs(statistics.fmean(la) - statistics.fmean(lb)), math.log(1.02))
    z = stats.norm.ppf(0.975) + stats.norm.ppf(0.80)
    return math.ceil(2 * z**2 * pooled / d**2), (math.exp(d) - 1) * 100


BASE_VALUES = [100.0, 102.0, 98.0, 101.0]
FAST_VALUES = [110.0, 112.0, 109.0, 111.0]  # clearly faster
NOISY_VALUES = [90.0, 115.0, 104.0, 99.0]  # not clearly different


def test_known_numbers() -> None:
    records = _trials(BASE, BASE_VALUES) + _trials("fast", FAST_VALUES) + _trials("noisy", NOISY_VALUES)
    summaries = summarize(records, BASE)
    assert [s.arm for s in summaries] == [BASE, "fast", "noisy"]  # baseline, then fastest first
    s = _by_arm(summaries)

    fast = s["fast"]
    assert fast.median == statistics.median(FAST_VALUES) == 110.5
    assert fast.speedup == pytest.approx(110.5 / 100.5)
    # The geometric mean and the 95% t-interval of the logs, exponentiated.
    assert fast.mean == pytest.approx(math.exp(statistics.fmean(_logs(FAST_VALUES))))
    assert fast.ci == pytest.approx(_geometric_interval_by_hand(FAST_VALUES))
    assert fast.ci != pytest.approx(_t_interval_of_mean(FAST_VALUES))  # not the old interval
    # Welch on the logs; Holm over the two compared arms: the smaller p doubled, the larger kept >= it.
    p_fast = _welch_by_hand(_logs(FAST_VALUES), _logs(BASE_VALUES))
    p_noisy = _welch_by_hand(_logs(NOISY_VALUES), _logs(BASE_VALUES))
    assert p_fast < p_noisy
    assert fast.p_value == pytest.approx(2 * p_fast)
    assert s["noisy"].p_value == pytest.approx(max(2 * p_fast, p_noisy))
    assert s["noisy"].p_value != pytest.approx(max(2 * p_fast, _welch_by_hand(NOISY_VALUES, BASE_VALUES)))
    assert fast.significant is True and s["noisy"].significant is False
    assert fast.winner and not s["noisy"].winner and not s[BASE].winner
    assert fast.repeats_needed is None and fast.undecided is None  # decided

    base = s[BASE]
    assert base.is_baseline and base.speedup == 1.0 and base.significant is None and base.p_value is None
    assert base.counts == {"ok": 4} and base.n_ok == 4 and base.n_measured == 4
    assert base.verification == "verified" and base.repeats_needed is None
    # Phases: median seconds, and their share of the median run_seconds (10, 11, 12, 13 -> 11.5).
    assert base.phases == {"metadata": 1.0, "kv_write": 3.5, "attention": 4.0}
    assert base.phase_share("kv_write") == pytest.approx(3.5 / 11.5)


def _t_interval_of_mean(values: list[float]) -> tuple[float, float]:
    half = stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return statistics.fmean(values) - half, statistics.fmean(values) + half


def test_interval_stays_positive_and_two_repeats_give_the_range_instead() -> None:
    values = [4000.0, 700.0, 1500.0]
    assert _t_interval_of_mean(values)[0] < 0  # the interval of the plain mean: negative throughput
    summaries = summarize(_trials(BASE, BASE_VALUES) + _trials("wild", values), BASE)
    wild = _by_arm(summaries)["wild"]
    assert wild.ci == pytest.approx(_geometric_interval_by_hand(values))
    assert wild.ci is not None and 0 < wild.ci[0] < wild.ci[1]
    speed_axis = figure(summaries).axes[0]
    assert speed_axis.get_xlim()[0] == 0
    # Past twice the fastest trial the whisker is cut at the axis' edge: the axis follows the data.
    assert wild.ci[1] > 2 * 4000.0 and speed_axis.get_xlim()[1] == pytest.approx(1.4 * 4000.0)
    near = summarize(_trials(BASE, BASE_VALUES) + _trials("near", [1100.0, 1000.0, 1200.0]), BASE)
    near_ci = _by_arm(near)["near"].ci
    assert near_ci is not None and figure(near).axes[0].get_xlim()[1] > near_ci[1]  # within twice: all in view

    # Two repeats: t(0.975, 1) = 12.7 makes the interval span orders of magnitude; the range stands instead.
    two = [4000.0, 700.0]
    assert _geometric_interval_by_hand(two)[1] / _geometric_interval_by_hand(two)[0] > 1e4
    summaries = summarize(_trials(BASE, BASE_VALUES) + _trials("wild", two), BASE)
    wild = _by_arm(summaries)["wild"]
    assert wild.ci is None and wild.value_range == (700.0, 4000.0)
    rows = _arm_rows(summaries)
    assert rows["wild"]["95% CI"] == "700-4000\n(range)"
    assert "too few repeats for an interval: range of 2 trials" in " ".join(rows["wild"]["arm"].split())
    metrics = summary_metrics(summaries, {})
    assert (metrics["wild: min_tok_s"], metrics["wild: max_tok_s"]) == (700.0, 4000.0)
    assert "wild: ci_low" not in metrics and "backend:native: ci_low" in metrics
    assert "700-4000 (range)" in markdown(summaries, {}, "sweep")
    # The axis follows the data: the fastest trial and the medians, never a wild interval.
    wider = summarize(_trials(BASE, BASE_VALUES) + _trials("wild", [4000.0, 40.0, 400.0]), BASE)
    ci = _by_arm(wider)["wild"].ci
    assert ci is not None and ci[1] > 10 * 4000.0
    assert 4000.0 < figure(wider).axes[0].get_xlim()[1] <= 2 * 1.4 * 4000.0


def _arm_rows(summaries: list[ArmSummary]) -> dict[str, dict[str, str]]:
    """The console table's cells by arm (the first line of its arm cell) and column header."""
    table = render_table(summaries)
    columns = {str(c.header): list(c.cells) for c in table.columns}
    arms = [cell.splitlines()[0] for cell in columns["arm"]]
    return {arm: {header: cells[i] for header, cells in columns.items()} for i, arm in enumerate(arms)}


def _welch_interval_by_hand(a: list[float], b: list[float]) -> tuple[float, float]:
    """exp((ma - mb) -+ t(0.975, Welch-Satterthwaite df) * sqrt(va/na + vb/nb)), m and v of the logs."""
    la, lb = _logs(a), _logs(b)
    va, vb = statistics.variance(la) / len(la), statistics.variance(lb) / len(lb)
    df = (va + vb) ** 2 / (va**2 / (len(la) - 1) + vb**2 / (len(lb) - 1))
    half = stats.t.ppf(0.975, df) * math.sqrt(va + vb)
    diff = statistics.fmean(la) - statistics.fmean(lb)
    return math.exp(diff - half), math.exp(diff + half)


def test_scipys_intervals_equal_the_formulas_they_replaced() -> None:
    """statistics uses scipy.stats' confidence_interval(); each equals the hand-written formula it replaced."""
    from novainfer.ab.sweep.statistics import geometric_interval, welch_ratio_interval

    for values in (FAST_VALUES, NOISY_VALUES, [4000.0, 700.0, 1500.0], [1.0, 1e6, 3.0]):
        assert geometric_interval(values) == pytest.approx(_geometric_interval_by_hand(values), rel=1e-12)
    for a, b in ((FAST_VALUES, BASE_VALUES), (NOISY_VALUES, BASE_VALUES), ([5.0, 9.0, 7.0], BASE_VALUES)):
        assert welch_ratio_interval(_logs(a), _logs(b)) == pytest.approx(_welch_interval_by_hand(a, b), rel=1e-12)
    # No spread on either side: the measured ratio itself, not scipy's 0/0.
    assert welch_ratio_interval(_logs([6.0, 6.0, 6.0]), _logs([3.0, 3.0, 3.0])) == pytest.approx((2.0, 2.0))
    assert geometric_interval([5.0, 5.0, 5.0]) == pytest.approx((5.0, 5.0))


def test_welch_matches_scipy_and_handles_no_variance() -> None:
    expected = stats.ttest_ind(FAST_VALUES, BASE_VALUES, equal_var=False).pvalue
    assert welch_p_value(FAST_VALUES, BASE_VALUES) == pytest.approx(expected)
    assert welch_p_value([5.0, 5.0], [5.0, 5.0]) == 1.0
    assert welch_p_value([6.0, 6.0], [5.0, 5.0]) == 0.0


def test_holm_adjustment() -> None:
    # m = 3: sorted p 0.01, 0.02, 0.04 -> 0.03, max(0.03, 0.04) = 0.04, max(0.04, 0.04) = 0.04.
    assert holm_adjust({"a": 0.04, "b": 0.01, "c": 0.02}) == pytest.approx({"a": 0.04, "b": 0.03, "c": 0.04})
    assert holm_adjust({"a": 0.6, "b": 0.5}) == {"a": 1.0, "b": 1.0}


def test_flagged_arm_never_wins() -> None:
    records = (
        _trials(BASE, BASE_VALUES)
        + _trials("wrong", [200.0, 201.0, 199.0, 200.0], ["ok", "incorrect", "ok", "ok"])
        + _trials("mismatch", [190.0, 191.0, 189.0, 190.0], ["caliber_mismatch", "ok", "ok", "ok"])
        + _trials("fast", FAST_VALUES)
    )
    s = _by_arm(summarize(records, BASE))
    assert s["wrong"].flagged and s["mismatch"].flagged
    assert s["wrong"].verification == "failed" and s["mismatch"].verification == "verified"
    assert s["wrong"].significant and s["wrong"].median == 200.0  # fastest and significant, still not the winner
    assert not s["wrong"].winner and not s["mismatch"].winner
    assert s["fast"].winner


def test_unverified_arm_is_shown_but_never_wins() -> None:
    records = (
        _trials(BASE, BASE_VALUES)
        + _trials("peer", [300.0, 302.0, 298.0, 301.0], ["unverified"] * 4)
        + _trials("half", [250.0, 251.0, 249.0, 250.0], ["ok", "unverified", "ok", "ok"])
        + _trials("fast", FAST_VALUES)
    )
    summaries = summarize(records, BASE)
    s = _by_arm(summaries)
    peer = s["peer"]
    # Measured: its numbers are shown, and compared with a verified baseline.
    assert peer.n_ok == 0 and peer.n_measured == 4 and peer.median == 300.5
    assert peer.ci == pytest.approx(_geometric_interval_by_hand([300.0, 302.0, 298.0, 301.0]))
    assert peer.speedup == pytest.approx(300.5 / 100.5) and peer.significant is True
    assert peer.verification == "unverified" and s["half"].verification == "unverified"
    assert s["half"].n_ok == 3 and s["half"].median == 250.0  # the unverified trial counts as measured
    # Far faster and significant, never the winner: the verified "fast" arm is.
    assert not peer.winner and not s["half"].winner and s["fast"].winner
    assert [x.arm for x in summaries] == [BASE, "peer", "half", "fast"]
    text = _table_text(summaries)
    assert "4 UNVERIFIED, never wins" in " ".join(text.split())
    assert "UNVERIFIED" in text.split("\n peer")[1].splitlines()[0]  # the verified column


def test_unverified_or_failed_baseline_gives_no_speedups() -> None:
    for statuses, problem in (
        (["unverified"] * 4, "baseline unverified"),
        (["ok", "ok", "unverified", "ok"], "baseline unverified"),
        (["ok", "incorrect", "ok", "ok"], "baseline failed its correctness gate"),
        (["ok", "caliber_mismatch", "ok", "ok"], "baseline has caliber mismatches"),
        (["failed"] * 4, "baseline has no ok trials"),
    ):
        records = _trials(BASE, BASE_VALUES, statuses) + _trials("fast", FAST_VALUES)
        summaries = summarize(records, BASE)
        for s in summaries:
            assert s.speedup is None and s.p_value is None and s.significant is None and not s.winner
            assert s.repeats_needed is None and s.undecided is None
        assert _by_arm(summaries)["fast"].median == 110.5  # still measured and shown
        assert verdict(summaries) == f"No winner: {problem}, so no speedup claims."
        assert problem in " ".join(_table_text(summaries).split())


def test_too_few_repeats_says_how_many_would_tell() -> None:
    summaries = summarize(_trials(BASE, BASE_VALUES) + _trials("noisy", NOISY_VALUES), BASE)
    noisy = _by_arm(summaries)["noisy"]
    n, percent = _repeats_by_hand(NOISY_VALUES, BASE_VALUES)
    assert noisy.significant is False and n > 4 and percent == pytest.approx(2.0)  # the 2% floor applies
    assert noisy.repeats_needed == n and noisy.resolvable_pct == pytest.approx(percent)
    expected = f"too few repeats to tell: ~{n} per arm would resolve a 2% difference at this spread"
    assert noisy.undecided == expected
    assert verdict(summaries) == f"No winner: noisy is {noisy.speedup:.2f}x {BASE}, {expected}."
    assert f"~{n}/arm for 2%" in " ".join(_table_text(summaries).split())


def test_repeats_needed_uses_the_observed_difference_and_exceeds_the_repeats_at_hand() -> None:
    base, arm = [100.0, 110.0], [130.0, 150.0]
    s = _by_arm(summarize(_trials(BASE, base) + _trials("arm", arm), BASE))["arm"]
    n, percent = _repeats_by_hand(arm, base)
    ratio = math.exp(statistics.fmean(_logs(arm)) - statistics.fmean(_logs(base)))
    assert s.significant is False and percent == pytest.approx((ratio - 1) * 100)  # above the 2% floor
    assert n <= 2 and s.repeats_needed == 3  # 2 each did not resolve it: at least one more
    assert s.undecided is not None and f"resolve a {percent:.0f}% difference" in s.undecided


def test_not_all_ok_or_too_few_trials_cannot_win() -> None:
    records = (
        _trials(BASE, BASE_VALUES)
        + _trials("crashy", [150.0, 151.0, 149.0, 150.0], ["ok", "ok", "ok", "failed"])
        + _trials("lonely", [300.0, 0.0], ["ok", "timeout"])
    )
    summaries = summarize(records, BASE)
    s = _by_arm(summaries)
    assert s["crashy"].significant and not s["crashy"].flagged and not s["crashy"].winner
    assert s["lonely"].n_ok == 1 and s["lonely"].ci is None
    assert s["lonely"].significant is None and s["lonely"].p_value is None  # "n/a", never "yes"
    assert s["lonely"].speedup == pytest.approx(300.0 / 100.5)
    assert s["lonely"].repeats_needed is None
    assert s["lonely"].undecided == (
        "too few repeats to tell: 1 measured here and 4 for the baseline, a test needs 2 on each side"
    )
    assert not any(x.winner for x in s.values())
    assert verdict(summaries) == (
        f"No winner: lonely is 2.99x {BASE}, but not all its trials are ok (1 timeout); {s['lonely'].undecided}."
    )


def test_no_winner_without_significance_or_baseline() -> None:
    s = _by_arm(summarize(_trials(BASE, BASE_VALUES) + _trials("noisy", NOISY_VALUES), BASE))
    assert s["noisy"].significant is False and not s["noisy"].winner
    s = _by_arm(summarize(_trials(BASE, [100.0]) + _trials("fast", FAST_VALUES), BASE))
    assert s["fast"].significant is None and not s["fast"].winner
    summaries = summarize(_trials("fast", FAST_VALUES), "missing")
    assert summaries[0].speedup is None and not summaries[0].winner
    assert verdict(summaries) == "No winner: no baseline among the trials, so no speedup claims."


def test_gate_coverage_and_caliber() -> None:
    def gate(checked: dict[str, int], err: float, off: int) -> dict[str, float]:
        metrics = {"max_rel_err": err, "requests_off": off}
        for kind, n in checked.items():
            metrics |= {f"gate.{kind}.run_steps": 10, f"gate.{kind}.checked": n, f"gate.{kind}.max_rel_err": err}
        return metrics

    extra = [
        gate({"prefill": 3, "decode": 5, "decode-b8": 0}, 1e-3, 0),  # decode-b8 ran, unchecked: 2 kinds
        gate({"prefill": 3, "decode": 5, "decode-b8": 2}, 3e-3, 0),
    ]
    extra[1]["gate.decode.max_rel_err"] = 4e-3  # a kind's error worse than the trial's overall one
    wrong = [gate({"prefill": 3}, 0.5, 2), gate({"prefill": 3}, 1e-3, 1)]
    nan = [gate({"prefill": 3}, 1e-3, 0), gate({"prefill": 3}, math.nan, 0)]
    records = (
        _trials(BASE, [100.0, 101.0], extra=extra)
        + _trials("wrong", [100.0, 101.0], ["incorrect", "ok"], extra=wrong)
        + _trials("plain", [100.0, 101.0])
        + _trials("nan", [100.0, 101.0], ["ok", "incorrect"], extra=nan)
    )
    summaries = summarize(records, BASE)
    s = _by_arm(summaries)
    assert (s[BASE].gate_max_rel_err, s[BASE].requests_off) == (4e-3, 0)
    assert s["wrong"].verification == "failed" and s["wrong"].gate_max_rel_err == 0.5
    assert s["wrong"].requests_off == 3
    assert (s["plain"].gate_max_rel_err, s["plain"].requests_off) == (None, None)
    rows = {line.split()[0]: line for line in _table_text(summaries).splitlines() if line.strip()}
    assert "0 off" in rows[BASE] and "3 off" in rows["wrong"]
    cells = _verified_cells(summaries)
    # Records of before the output check (no token counts, steps of the run or bar): the verdict alone.
    assert cells[BASE] == "yes" and cells["wrong"] == "FAILED · err 5e-1"
    assert math.isnan(s["nan"].gate_max_rel_err or 0.0) and cells["nan"] == "FAILED · err nan"  # NaN is the worst


def _verified_cells(summaries: list[ArmSummary]) -> dict[str, str]:
    """The verified column of the Markdown table, by arm."""
    head, _, *rows = markdown(summaries, {}, "sweep").split("\n\n")[2].splitlines()
    column = [c.strip() for c in head.split("|")].index("verified")
    return {s.arm: [c.strip() for c in row.split("|")][column] for s, row in zip(summaries, rows, strict=True)}


def _checks(
    produced: int, steps: int, *, checked: int | None = None, outside: int = 0, bar: float = 1e-5, err: float = 2e-6
) -> dict[str, float]:
    """A trial's metrics of both checks: the output check's token counts (and its seconds: 3 against a run of
    10 + repeat s, see _trials) and the step gate's steps of a run of 35, its bar and worst row."""
    return {
        "output_tokens_produced": produced, "output_tokens_checked": produced if checked is None else checked,
        "output_tokens_outside": outside, "output_check_seconds": 3.0,
        "gate_steps": steps, "gate_run_steps": 35, "gate_bar": bar, "max_rel_err": err,
    }


def _checked_records() -> list[TrialRecord]:
    return (
        _trials(BASE, [100.0, 101.0], extra=[_checks(150, 14), _checks(150, 12)])
        + _trials("wrong", [200.0, 201.0], ["ok", "incorrect"],
                  extra=[_checks(150, 12), _checks(150, 12, outside=31, bar=1e-2, err=0.5)])
        + _trials("partial", [100.0, 101.0], ["ok", "unverified"],
                  extra=[_checks(150, 12), _checks(150, 12, checked=90)])
        + _trials("mismatch", [100.0, 101.0], ["ok", "caliber_mismatch"],
                  extra=[_checks(150, 12), _checks(149, 12, outside=2)])
        + _trials("old", [100.0, 101.0], extra=[{"max_rel_err": 1e-3, "gate_steps": 9}] * 2)
    )


def test_verified_says_what_the_checks_covered() -> None:
    summaries = summarize(_checked_records(), BASE)
    s = _by_arm(summaries)
    base = s[BASE]
    # Tokens summed over the trials, steps of the ok trial that replayed the fewest, the loosest bar.
    assert (base.tokens_checked, base.tokens_produced, base.tokens_outside) == (300, 300, 0)
    assert (base.steps_checked, base.run_steps, base.bar) == (12, 35, 1e-5)
    assert base.output_check_cost == pytest.approx(statistics.median([3.0 / 10.0, 3.0 / 11.0]))
    wrong = s["wrong"]
    assert wrong.verification == "failed" and (wrong.tokens_checked, wrong.tokens_outside) == (300, 31)
    assert wrong.bar == 1e-2  # the incorrect trial's, the looser
    assert s["partial"].verification == "unverified" and s["partial"].tokens_checked == 240
    old = s["old"]
    assert (old.tokens_checked, old.steps_checked, old.run_steps, old.bar) == (None, None, None, None)

    cells = _verified_cells(summaries)
    assert cells == {
        BASE: "yes · 300/300 tok · 12/35 steps · bar 1e-5",
        "wrong": "FAILED · 31/300 tok outside · err 5e-1 · bar 1e-2",
        "partial": "UNVERIFIED",
        # A caliber mismatch leaves the arm verified (and flagged): its tokens outside still show.
        "mismatch": "yes · 2/299 tok outside · 12/35 steps · bar 1e-5",
        "old": "yes",
    }
    # The console table stacks the same parts in the cell, one per line, and its caption says what they mean.
    table = render_table(summaries)
    (column,) = (c for c in table.columns if c.header == "verified")
    assert list(column.cells) == [cells[x.arm].replace(" · ", "\n") for x in summaries]
    assert " ".join(VERIFIED_LEGEND.split()) in " ".join(_table_text(summaries).split())
    assert VERIFIED_LEGEND in markdown(summaries, {}, "sweep")


def test_summary_metrics_and_rows_carry_what_the_checks_covered() -> None:
    summaries = summarize(_checked_records(), BASE)
    metrics = summary_metrics(summaries, {BASE: "native"})
    expected = {
        "tokens_checked": 300, "tokens_produced": 300, "tokens_outside": 0, "steps_checked": 12, "run_steps": 35,
        "bar": 1e-5, "output_check_cost": round(statistics.median([0.3, 3.0 / 11.0]), 3),
    }
    assert {key: metrics[f"native: {key}"] for key in expected} == expected
    assert metrics["wrong: tokens_outside"] == 31 and metrics["wrong: bar"] == 1e-2
    assert not any(key.startswith("old: ") and key.endswith(tuple(expected)) for key in metrics)  # left out, not 0
    rows = {row["arm"]: row for row in map(summary_row, summaries)}
    assert json.loads(json.dumps(rows[BASE])) == rows[BASE]  # the JSON format's row as it is
    assert {key: rows[BASE][key] for key in expected} == {**expected, "output_check_cost": pytest.approx(0.286, 1e-2)}
    assert (rows["wrong"]["tokens_outside"], rows["wrong"]["max_rel_err"]) == (31, 0.5)
    assert rows["old"]["tokens_checked"] is None and rows["old"]["bar"] is None


def test_verified_cells_of_a_real_caliber_keep_the_table_in_100_columns() -> None:
    # 4 repeats of 64 requests x 1280 tokens: counts of six digits, whole, and a long arm label beside them;
    # phases of two digits each (10/20/40%), the widest that column gets.
    wide = {"run_seconds": 10.0, "phase_kv_write_s": 2.0}
    big = [_checks(81920, 30, bar=1e-2, err=3e-3) | wide] * 4
    wrong = _checks(81920, 30, outside=12345, bar=1e-2, err=0.5) | wide
    records = (
        _trials(BASE, BASE_VALUES, extra=big)
        + _trials("backend=flashinfer,block_size=16,cuda_graphs=true", FAST_VALUES, extra=big)
        + _trials("backend=triton,block_size=32", [200.0, 201.0, 199.0, 200.0], ["ok", "incorrect", "ok", "ok"],
                  extra=[big[0], wrong, big[0], big[0]])
    )
    summaries = summarize(records, BASE)
    text = _table_text(summaries)
    assert max(len(line) for line in text.splitlines()) <= 100
    flat = " ".join(text.split())
    # A part wider than the column wraps at its spaces, never inside a count.
    for part in ("327680/327680 tok", "30/35 steps", "bar 1e-2", "12345/327680 tok outside", "err 5e-1"):
        assert all(f" {word} " in f" {flat} " for word in part.split())
    # Nothing was cut at the console's edge: the caption and the verdict read whole.
    assert " ".join(VERIFIED_LEGEND.split()) in flat and flat.endswith(verdict(summaries))


def _mixed_summaries() -> list[ArmSummary]:
    records = (
        _trials(BASE + ",block_size=16", BASE_VALUES)
        + _trials("backend=flashinfer,block_size=16,cuda_graphs=true", FAST_VALUES)
        + _trials("backend=triton,block_size=32", [200.0, 201.0, 199.0], ["ok", "incorrect", "ok"])
        + _trials("backend=vllm", [2339.0, 2100.0], ["unverified", "unverified"])
        + _trials("backend=broken", [0.0, 0.0], ["failed", "failed"])
    )
    return summarize(records, BASE + ",block_size=16")


def _table_text(summaries: list[ArmSummary], width: int = 100) -> str:
    console = Console(width=width, record=True, color_system=None)
    console.print(render_table(summaries))
    return console.export_text()


def test_table_fits_100_columns() -> None:
    text = _table_text(_mixed_summaries())
    assert max(len(line) for line in text.splitlines()) <= 100
    for expected in ("WINNER", "FLAGGED", "1 incorrect", "2 failed", "base", "n/a", "110.5", "1.100x"):
        assert expected in text
    assert "2 UNVERIFIED, never wins" in " ".join(_arm_rows(_mixed_summaries())["backend=vllm"]["arm"].split())
    assert text.rstrip().endswith("WINNER.")  # the verdict closes the caption
    wide = _table_text(_mixed_summaries(), width=180)
    assert "backend=flashinfer,block_size=16,cuda_graphs=true" in wide  # labels are never cut


def test_legend_lists_only_the_categories_present() -> None:
    plain = summarize(_trials(BASE, BASE_VALUES) + _trials("noisy", NOISY_VALUES), BASE)
    assert legend_categories(plain) == ["baseline", "arm"]
    mixed = _mixed_summaries()
    assert legend_categories(mixed) == ["baseline", "arm", "winner", "unverified", "flagged"]
    labels = [text.get_text() for text in figure(plain).legends[0].get_texts()]
    assert labels == ["baseline", "arm", "metadata", "kv write", "attention", "other"]
    labels = [text.get_text() for text in figure(mixed).legends[0].get_texts()]
    assert "unverified (never wins)" in labels and "flagged (never wins)" in labels and "winner" in labels


def test_plot_writes_a_png(tmp_path: Path) -> None:
    from matplotlib.image import imread

    path = plot(_mixed_summaries(), tmp_path / "comparison.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _ = imread(path).shape
    assert width > 500 and height > 200


# -- several GPUs: every repeat block (each arm once) on one GPU, compared block by block ----------------

GPUS = ["GPU-a", "GPU-b", "GPU-a", "GPU-b"]  # repeat -> GPU, alternating
GPU_BASE = [100.0, 130.0, 101.0, 131.5]  # GPU B is 30% faster than GPU A
GPU_FAST = [b * 1.03 * f for b, f in zip(GPU_BASE, (1.002, 0.999, 1.001, 0.998), strict=True)]  # +3% per block
GPU_SAME = [b * f for b, f in zip(GPU_BASE, (1.04, 0.97, 1.03, 0.96), strict=True)]  # no effect, noisy


def _on(records: list[TrialRecord], gpus: list[str]) -> list[TrialRecord]:
    """The records with the tags a Ray executor writes: the GPU of each one's repeat block, and the host."""
    for record in records:
        record.tags = {"gpu_uuid": gpus[record.repeat], "host": "node-1"}
    return records


def _paired_by_hand(arm: list[float], base: list[float]) -> tuple[list[float], float, tuple[float, float]]:
    """d = log(arm) - log(baseline) per block; exp(mean d); exp(mean d -+ t(0.975, k-1) sd(d) / sqrt(k))."""
    d = [math.log(a) - math.log(b) for a, b in zip(arm, base, strict=True)]
    half = stats.t.ppf(0.975, len(d) - 1) * statistics.stdev(d) / math.sqrt(len(d))
    mean = statistics.fmean(d)
    return d, math.exp(mean), (math.exp(mean - half), math.exp(mean + half))


def test_pairing_by_gpu_finds_a_small_effect_that_the_gpus_hide() -> None:
    def records() -> list[TrialRecord]:
        return _trials(BASE, GPU_BASE) + _trials("fast", GPU_FAST) + _trials("same", GPU_SAME)

    summaries = summarize(_on(records(), GPUS), BASE)
    s = _by_arm(summaries)
    fast = s["fast"]
    d_fast, speedup, interval = _paired_by_hand(GPU_FAST, GPU_BASE)
    d_same, _, _ = _paired_by_hand(GPU_SAME, GPU_BASE)
    p_fast, p_same = stats.ttest_1samp(d_fast, 0.0).pvalue, stats.ttest_1samp(d_same, 0.0).pvalue
    assert fast.paired_blocks == 4 and s["same"].paired_blocks == 4 and s[BASE].paired_blocks is None
    assert fast.speedup == pytest.approx(speedup) and speedup == pytest.approx(1.03, abs=1e-3)
    assert fast.speedup != pytest.approx(statistics.median(GPU_FAST) / statistics.median(GPU_BASE))
    assert fast.speedup_ci == pytest.approx(interval) and interval[0] > 1.0
    # Holm over the two arms, as unpaired: the smaller p doubled, the larger kept >= it.
    assert fast.p_value == pytest.approx(2 * p_fast) and fast.significant is True
    assert s["same"].p_value == pytest.approx(max(2 * p_fast, p_same)) and s["same"].significant is False
    assert fast.winner and not s["same"].winner
    # Why pairing matters: the GPUs' 30% swamps the arm's 3% when its trials are pooled, as Welch does.
    assert _welch_by_hand(_logs(GPU_FAST), _logs(GPU_BASE)) > 0.5
    unpaired = _by_arm(summarize(records(), BASE))
    assert unpaired["fast"].significant is False and not unpaired["fast"].winner

    assert verdict(summaries) == (
        f"fast is {speedup:.2f}x {BASE} (paired by GPU over 4 blocks, 95% interval "
        f"{interval[0]:.2f}-{interval[1]:.2f}x), significant after Holm (p < 0.001): WINNER."
    )
    text = _table_text(summaries)
    assert max(len(line) for line in text.splitlines()) <= 100
    flat = " ".join(text.split())
    assert "WINNER, paired by GPU: 4 blocks" in flat and "paired by GPU: 4 blocks, too few repeats" in flat
    assert "paired t-test" in flat and "Welch" not in flat
    assert "paired by GPU" in markdown(summaries, {}, "sweep")


def test_paired_repeats_needed_use_the_spread_of_the_differences() -> None:
    same = _by_arm(summarize(_on(_trials(BASE, GPU_BASE) + _trials("same", GPU_SAME), GPUS), BASE))["same"]
    d, _, _ = _paired_by_hand(GPU_SAME, GPU_BASE)
    z = stats.norm.ppf(0.975) + stats.norm.ppf(0.80)
    n = math.ceil(z**2 * statistics.variance(d) / math.log(1.02) ** 2)  # one sample; the 2% floor applies
    assert abs(statistics.fmean(d)) < math.log(1.02) and n > 5  # above the floor of blocks + 1
    assert same.significant is False and same.repeats_needed == n and same.resolvable_pct == pytest.approx(2.0)
    assert n != _repeats_by_hand(GPU_SAME, GPU_BASE)[0]  # not the unpaired estimate
    assert same.undecided == f"too few repeats to tell: ~{n} per arm would resolve a 2% difference at this spread"


def _apart_records() -> list[TrialRecord]:
    """The baseline only on GPU A; "elsewhere", far faster, only on GPU B; "once" on A in repeat 0 only."""
    return (
        _on(_trials(BASE, BASE_VALUES), ["GPU-a"] * 4)
        + _on(_trials("elsewhere", [200.0, 201.0, 199.0, 200.0]), ["GPU-b"] * 4)
        + _on(_trials("once", [150.0, 151.0, 149.0, 150.0]), ["GPU-a", "GPU-b", "GPU-b", "GPU-b"])
    )


NEVER_MET = "never met the baseline on the same GPU: no paired comparison"
ONE_BLOCK = "too few repeats to tell: met the baseline on the same GPU in only 1 block, a paired test needs 2"


def test_an_arm_that_never_met_the_baseline_on_its_gpu_is_not_compared() -> None:
    summaries = summarize(_apart_records(), BASE)
    s = _by_arm(summaries)
    elsewhere, once = s["elsewhere"], s["once"]
    assert elsewhere.paired_blocks == 0 and elsewhere.median == 200.0  # measured and shown
    assert elsewhere.speedup is None and elsewhere.speedup_ci is None
    assert elsewhere.p_value is None and elsewhere.significant is None and not elsewhere.winner
    assert elsewhere.undecided == NEVER_MET and elsewhere.repeats_needed is None
    assert once.paired_blocks == 1 and once.speedup == pytest.approx(150.0 / 100.0)  # repeat 0, on GPU A
    assert once.speedup_ci is None and once.significant is None and once.undecided == ONE_BLOCK
    assert not any(x.winner for x in summaries)
    assert verdict(summaries) == f"No winner: once is 1.50x {BASE} (paired by GPU), {ONE_BLOCK}."
    text = _table_text(summaries)
    assert max(len(line) for line in text.splitlines()) <= 100
    flat = " ".join(text.split())
    assert NEVER_MET in flat and "paired by GPU: 1 block," in flat and "0 blocks" not in flat
    alone = summarize([r for r in _apart_records() if r.arm != "once"], BASE)
    assert verdict(alone) == f"No winner: elsewhere {NEVER_MET}."


def test_one_gpu_changes_nothing() -> None:
    def records() -> list[TrialRecord]:
        broken = _trials("broken", [0.0], ["failed"])  # not measured
        return _trials(BASE, BASE_VALUES) + _trials("fast", FAST_VALUES) + _trials("noisy", NOISY_VALUES) + broken

    tagged = _on(records(), ["GPU-a"] * 4)
    tagged[-1].tags["gpu_uuid"] = "GPU-b"  # another GPU, but no measured trial ran on it
    summaries, plain = summarize(tagged, BASE), summarize(records(), BASE)
    assert summaries == plain
    s = _by_arm(summaries)
    assert all(x.paired_blocks is None for x in summaries)
    # The speedup's own interval: Welch's on the logs, exponentiated (the baseline and the unmeasured have none).
    assert s["fast"].speedup_ci == pytest.approx(_welch_interval_by_hand(FAST_VALUES, BASE_VALUES))
    assert s[BASE].speedup_ci is None and s["broken"].speedup_ci is None
    assert s["fast"].speedup == pytest.approx(110.5 / 100.5)  # the ratio of medians, as in test_known_numbers
    p_fast = _welch_by_hand(_logs(FAST_VALUES), _logs(BASE_VALUES))
    assert s["fast"].p_value == pytest.approx(2 * p_fast) and s["fast"].winner
    assert _table_text(summaries) == _table_text(plain) and "paired" not in _table_text(summaries)
    assert markdown(summaries, {}, "sweep") == markdown(plain, {}, "sweep")


def test_gpu_blocks_lists_the_arms_measured_on_each_gpu() -> None:
    broken = _on(_trials("broken", [0.0], ["failed"]), ["GPU-c"])  # ran there, measured nothing
    assert gpu_blocks(_apart_records() + broken) == {
        "GPU-a": [BASE, "once"],
        "GPU-b": ["elsewhere", "once"],
    }
    assert gpu_blocks(_trials(BASE, BASE_VALUES)) == {}  # no gpu_uuid tags: no blocks
