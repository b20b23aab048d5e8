"""Online workloads drawn from the seed: arrivals at the declared rate and burstiness (tested statistically, fixed
seeds), and the length mixes (vLLM's random, the ShareGPT-like log-normal, shared prefixes)."""

from __future__ import annotations

import itertools
import json
import math
import statistics
from dataclasses import asdict

import pytest
from scipy import stats

from novainfer.ab.lengths import LengthMix, ratio_range
from novainfer.ab.serving import Arrivals
from novainfer.ab.workload import MAX_TOKEN_ID, Workload

N = 4000


def gaps(arrivals: Arrivals, seed: int = 0, n: int = N) -> list[float]:
    times = arrivals.times(n, seed)
    return [b - a for a, b in itertools.pairwise(times)]


@pytest.mark.parametrize("rate, burstiness", [(10.0, 1.0), (2.5, 0.5), (40.0, 4.0)])
def test_gaps_follow_the_declared_gamma(rate: float, burstiness: float) -> None:
    """Gamma(shape = burstiness, scale = 1 / (rate x burstiness)): a Kolmogorov-Smirnov test against it passes,
    the mean gap is 1 / rate within 4 standard errors, and the coefficient of variation is 1 / sqrt(shape)."""
    drawn = gaps(Arrivals(rate, burstiness), seed=7)
    shape, scale = burstiness, 1 / (rate * burstiness)
    assert stats.kstest(drawn, stats.gamma(shape, scale=scale).cdf).pvalue > 0.01
    standard_error = math.sqrt(shape) * scale / math.sqrt(len(drawn))
    assert abs(statistics.fmean(drawn) - 1 / rate) < 4 * standard_error
    cv = statistics.stdev(drawn) / statistics.fmean(drawn)
    assert cv == pytest.approx(1 / math.sqrt(burstiness), rel=0.1)


def test_the_test_can_tell_a_wrong_rate_or_burstiness() -> None:
    """The same tests reject a schedule drawn at another rate or burstiness (so they can fail)."""
    declared = stats.gamma(1.0, scale=1 / 10.0).cdf
    assert stats.kstest(gaps(Arrivals(11.0, 1.0), seed=7), declared).pvalue < 0.01
    assert stats.kstest(gaps(Arrivals(10.0, 2.0), seed=7), declared).pvalue < 0.01


def test_schedule_starts_at_zero_is_seeded_and_rates_scale_the_same_draws() -> None:
    times = Arrivals(5.0).times(20, seed=3)
    assert times[0] == 0.0 and times == sorted(times) and len(times) == 20
    assert Arrivals(5.0).times(20, seed=3) == times
    assert Arrivals(5.0).times(20, seed=4) != times
    # Common random numbers across a rate axis: twice the rate, the same schedule at half the time.
    assert Arrivals(10.0).times(20, seed=3) == pytest.approx([t / 2 for t in times])


def test_random_mix_draws_vllms_range_from_the_seed() -> None:
    mix = LengthMix("random", input_len=100, output_len=20, range_ratio=0.25)
    assert ratio_range(100, 0.25) == (75, 125) and ratio_range(3, 0.9) == (1, 6)
    prompts, outputs = mix.draw(N, seed=1)
    assert (min(prompts), max(prompts)) == (75, 125) and (min(outputs), max(outputs)) == (15, 25)
    # Uniform over the range: a chi-square test of the 51 prompt lengths' counts.
    counts = [prompts.count(n) for n in range(75, 126)]
    assert stats.chisquare(counts).pvalue > 0.01
    assert mix.draw(N, seed=1) == (prompts, outputs) != mix.draw(N, seed=2)


def test_sharegpt_mix_is_the_clipped_lognormal_of_the_published_means() -> None:
    mix = LengthMix("sharegpt", input_len=161, output_len=338, sigma=1.0)
    prompts, outputs = mix.draw(N, seed=5)
    assert min(prompts) >= 4 and max(prompts) <= 1024 and min(outputs) >= 4 and max(outputs) <= 1024
    # The median of a log-normal is exp(mu) = mean x exp(-sigma^2 / 2) (clipping leaves the median alone).
    assert statistics.median(prompts) == pytest.approx(161 * math.exp(-0.5), rel=0.08)
    assert statistics.median(outputs) == pytest.approx(338 * math.exp(-0.5), rel=0.08)
    # Its unclipped draws' logs are normal with that spread: a Kolmogorov-Smirnov test on the unclipped middle.
    mu = math.log(338) - 0.5
    middle = [math.log(n) for n in outputs if 20 < n < 1000]
    lo, hi = stats.norm.cdf(math.log(20.5) - mu), stats.norm.cdf(math.log(999.5) - mu)
    assert stats.kstest(middle, lambda x: (stats.norm.cdf(x - mu) - lo) / (hi - lo)).pvalue > 0.001
    assert mix.bounds() == ((4, 1024), (4, 1024))


def test_shared_prefix_groups_share_their_prefix_in_every_draw_of_ids() -> None:
    mix = LengthMix("shared_prefix", input_len=16, output_len=8, range_ratio=0.5, num_groups=3, prefix_len=12)
    workload = Workload(12, *mix.bounds(), seed=2, lengths=mix)
    for prompts in (workload.prompts(), workload.prompts(token_seed=99)):
        prefixes = [tuple(p[:12]) for p in prompts]
        assert all(prefixes[i] == prefixes[i % 3] for i in range(12))
        assert len(set(prefixes[:3])) == 3
        assert all(len(p) - 12 in range(8, 25) for p in prompts)
        assert all(0 <= t <= MAX_TOKEN_ID for p in prompts for t in p)
    assert workload.prompts(token_seed=99) != workload.prompts()
    assert [len(p) for p in workload.prompts(token_seed=99)] == [len(p) for p in workload.prompts()]
    # The mix travels to the trial process as JSON and comes back equal.
    again = Workload(**json.loads(json.dumps(asdict(workload))))
    assert again == workload and again.prompts(token_seed=5) == workload.prompts(token_seed=5)


def test_a_uniform_workload_keeps_bench_py_draws_and_recipe() -> None:
    workload = Workload(8, (16, 64), (8, 32), 3)
    assert workload.recipe() == {"num_seqs": 8, "input_len": [16, 64], "output_len": [8, 32], "seed": 3}
