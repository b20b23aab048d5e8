"""The comparison on known numbers, with the expected statistics computed here by their formulas."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import pytest
from rich.console import Console
from scipy import stats

from novainfer.ab.compare import ArmSummary, holm_adjust, plot, render_table, summarize, welch_p_value
from novainfer.ab.record import TrialRecord

BASE = "backend=native"


def _trials(arm: str, values: list[float], statuses: list[str] | None = None) -> list[TrialRecord]:
    statuses = statuses or ["ok"] * len(values)
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
            },
        )
        for i, (value, status) in enumerate(zip(values, statuses, strict=True))
    ]


def _by_arm(summaries: list[ArmSummary]) -> dict[str, ArmSummary]:
    return {s.arm: s for s in summaries}


def _welch_by_hand(a: list[float], b: list[float]) -> float:
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    t = (statistics.fmean(a) - statistics.fmean(b)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))  # Welch-Satterthwaite
    return 2 * stats.t.sf(abs(t), df)


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
    # 95% t-interval of the mean: mean +- t(0.975, n-1) * sd / sqrt(n).
    half = stats.t.ppf(0.975, 3) * statistics.stdev(FAST_VALUES) / 2
    assert fast.ci == pytest.approx((110.5 - half, 110.5 + half))
    # Holm over the two compared arms: the smaller p is doubled, the larger is kept at least as large.
    p_fast, p_noisy = _welch_by_hand(FAST_VALUES, BASE_VALUES), _welch_by_hand(NOISY_VALUES, BASE_VALUES)
    assert p_fast < p_noisy
    assert fast.p_value == pytest.approx(2 * p_fast)
    assert s["noisy"].p_value == pytest.approx(max(2 * p_fast, p_noisy))
    assert fast.significant is True and s["noisy"].significant is False
    assert fast.winner and not s["noisy"].winner and not s[BASE].winner

    base = s[BASE]
    assert base.is_baseline and base.speedup == 1.0 and base.significant is None and base.p_value is None
    assert base.counts == {"ok": 4} and base.n_ok == 4
    # Phases: median seconds, and their share of the median run_seconds (10, 11, 12, 13 -> 11.5).
    assert base.phases == {"metadata": 1.0, "kv_write": 3.5, "attention": 4.0}
    assert base.phase_share("kv_write") == pytest.approx(3.5 / 11.5)


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
    assert (
        s["wrong"].significant and s["wrong"].median == 200.0
    )  # fastest and significant, still not the winner
    assert not s["wrong"].winner and not s["mismatch"].winner
    assert s["fast"].winner


def test_not_all_ok_or_too_few_trials_cannot_win() -> None:
    records = (
        _trials(BASE, BASE_VALUES)
        + _trials("crashy", [150.0, 151.0, 149.0, 150.0], ["ok", "ok", "ok", "failed"])
        + _trials("lonely", [300.0, 0.0], ["ok", "timeout"])
    )
    s = _by_arm(summarize(records, BASE))
    assert s["crashy"].significant and not s["crashy"].flagged and not s["crashy"].winner
    assert s["lonely"].n_ok == 1 and s["lonely"].ci is None
    assert s["lonely"].significant is None and s["lonely"].p_value is None  # "n/a", never "yes"
    assert s["lonely"].speedup == pytest.approx(300.0 / 100.5)
    assert not any(x.winner for x in s.values())


def test_no_winner_without_significance_or_baseline() -> None:
    s = _by_arm(summarize(_trials(BASE, BASE_VALUES) + _trials("noisy", NOISY_VALUES), BASE))
    assert s["noisy"].significant is False and not s["noisy"].winner
    s = _by_arm(summarize(_trials(BASE, [100.0]) + _trials("fast", FAST_VALUES), BASE))
    assert s["fast"].significant is None and not s["fast"].winner
    s = _by_arm(summarize(_trials("fast", FAST_VALUES), "missing"))
    assert s["fast"].speedup is None and not s["fast"].winner


def _mixed_summaries() -> list[ArmSummary]:
    records = (
        _trials(BASE + ",block_size=16", BASE_VALUES)
        + _trials("backend=flashinfer,block_size=16,cuda_graphs=true", FAST_VALUES)
        + _trials("backend=triton,block_size=32", [200.0, 201.0, 199.0], ["ok", "incorrect", "ok"])
        + _trials("backend=broken", [0.0, 0.0], ["failed", "failed"])
    )
    return summarize(records, BASE + ",block_size=16")


def test_table_fits_100_columns() -> None:
    console = Console(width=100, record=True, color_system=None)
    console.print(render_table(_mixed_summaries()))
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 100
    for expected in ("WINNER", "FLAGGED", "1 incorrect", "2 failed", "base", "n/a", "110.5", "1.100x"):
        assert expected in text


def test_plot_writes_a_png(tmp_path: Path) -> None:
    from matplotlib.image import imread

    path = plot(_mixed_summaries(), tmp_path / "comparison.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _ = imread(path).shape
    assert width > 500 and height > 200
