"""Latency of an online run from its requests' host timestamps: TTFT, TPOT, ITL, E2E, throughput, goodput.

Each request is timed as a streaming client would time it (the definitions of vLLM `bench serve`, see
shared/notes/serving-metrics.md), from `sent`: its arrival, or, under max_concurrency, the moment a slot freed
(the client-side wait is queue_wait, reported apart). A "chunk" is the tokens of one request that became known
to the caller at one moment (after one engine step); every time is in seconds from the start of the timed run.

- TTFT: first chunk - sent. E2E: last chunk - sent. TPOT: (E2E - TTFT) / (output tokens - 1), for requests of
  more than one token (a one-token request counts as TPOT 0 against an SLO, as vLLM counts it, and is left
  out of TPOT's statistics). ITL: the gap before each chunk after the first, one entry per chunk, pooled over
  the requests (a long output weighs more, as in vLLM and SGLang).
- Per metric: mean, median, p90, p99 (linear interpolation between order statistics, numpy's default), in
  milliseconds, over the steady window's requests: those ranked [floor(lo N), floor(hi N)) in arrival order.
  The window's span runs from its first request's arrival to the arrival of the first request after it (its
  last request's finish when none follows), so ramp-up and drain are outside it, and rates over it are rates
  of the steady load.
- request_throughput: all requests / (the last finish - the first arrival), vLLM's; offered_rate: the
  schedule's own rate, (N - 1) / (the last arrival - the first).
- goodput: the window's requests that meet every declared target of the SLO (novainfer.ab.serving.Slo), per
  second of the window's span; good_fraction: of the window's requests.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from novainfer.ab.serving import ServingSettings

STATISTICS = ("mean", "median", "p90", "p99")
REQUEST_METRICS = ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")


@dataclass
class RequestTiming:
    """One request's host timestamps (seconds from the start of the timed run): its scheduled arrival, when it
    was sent (arrival, or later when max_concurrency held it), each chunk as (time, tokens), and its finish."""

    arrival: float
    sent: float = math.nan
    chunks: list[tuple[float, int]] = field(default_factory=list)
    finished: float = math.nan

    @property
    def tokens(self) -> int:
        return sum(n for _, n in self.chunks)

    @property
    def ttft(self) -> float:
        return self.chunks[0][0] - self.sent

    @property
    def e2e(self) -> float:
        return self.chunks[-1][0] - self.sent

    @property
    def tpot(self) -> float | None:
        """None for a request of one token (no time per output token to speak of)."""
        return (self.e2e - self.ttft) / (self.tokens - 1) if self.tokens > 1 else None

    @property
    def itls(self) -> list[float]:
        times = [t for t, _ in self.chunks]
        return [b - a for a, b in itertools.pairwise(times)]

    def good(self, targets: dict[str, float]) -> bool:
        """Every declared target (ms) holds; a one-token request's TPOT counts as 0."""
        values = {"ttft_ms": self.ttft * 1e3, "tpot_ms": (self.tpot or 0.0) * 1e3, "e2e_ms": self.e2e * 1e3}
        return all(values[name] <= bound for name, bound in targets.items())


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile, linear between order statistics (numpy.percentile's default method)."""
    ordered = sorted(values)
    position = q / 100 * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def window(num_requests: int, steady_state: tuple[float, float]) -> range:
    """The steady window's requests (indices in arrival order): [floor(lo N), floor(hi N)), never empty."""
    lo, hi = steady_state
    start = min(math.floor(lo * num_requests), num_requests - 1)
    return range(start, max(math.floor(hi * num_requests), start + 1))


def latency_metrics(timings: Sequence[RequestTiming], settings: ServingSettings) -> dict[str, float]:
    """The trial's latency metrics (see the module docstring); every request must have produced a token."""
    steady = window(len(timings), settings.steady_state)
    inside = [timings[i] for i in steady]
    per_request = {
        "ttft_ms": [t.ttft * 1e3 for t in inside],
        "tpot_ms": [t.tpot * 1e3 for t in inside if t.tpot is not None],
        "itl_ms": [gap * 1e3 for t in inside for gap in t.itls],
        "e2e_ms": [t.e2e * 1e3 for t in inside],
    }
    metrics: dict[str, float] = {}
    for name, values in per_request.items():
        if not values:  # no request of the window had two tokens: no TPOT or ITL to report
            continue
        metrics.update({
            f"{name}_mean": statistics.fmean(values), f"{name}_median": percentile(values, 50),
            f"{name}_p90": percentile(values, 90), f"{name}_p99": percentile(values, 99),
        })
    begin = timings[steady.start].arrival
    after = steady.stop
    end = timings[after].arrival if after < len(timings) else max(t.finished for t in inside)
    span = max(end - begin, 1e-9)
    first, last = timings[0].arrival, max(t.finished for t in timings)
    good = sum(t.good(settings.slo.targets()) for t in inside)
    metrics.update(
        requests_in_window=len(inside),
        window_start_s=begin,
        window_end_s=end,
        request_throughput=len(timings) / max(last - first, 1e-9),
        offered_rate=(len(timings) - 1) / (timings[-1].arrival - first) if timings[-1].arrival > first else math.inf,
        declared_rate=settings.arrivals.rate,
        burstiness=settings.arrivals.burstiness,
        good_requests=good,
        good_fraction=good / len(inside),
        goodput_req_s=good / span,
        queue_wait_ms_mean=statistics.fmean((t.sent - t.arrival) * 1e3 for t in timings),
        slo_attainment=settings.slo.attainment,
        **{f"slo_{name}": bound for name, bound in settings.slo.targets().items()},
    )
    if settings.arrivals.max_concurrency is not None:
        metrics["max_concurrency"] = settings.arrivals.max_concurrency
    if math.isinf(metrics["offered_rate"]):
        del metrics["offered_rate"]  # one request, or all at once: no schedule rate (MLflow takes no inf)
    return metrics
