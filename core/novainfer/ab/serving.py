"""What an online caliber declares: requests that arrive over time, the SLOs they are held to, the steady window.

An experiment file with `[workload.arrivals]` is online (novainfer.ab.sweep.experiment reads it): requests are
submitted to the engine at their arrival times instead of all at t = 0, and each is timed on the host at the
moment each of its tokens becomes known to the caller (novainfer.ab.trial.arrival_loop, novainfer.ab.trial.latency).

Arrivals follow vLLM `bench serve`'s definition: the gaps between requests are Gamma(shape = burstiness,
scale = 1 / (rate x burstiness)), so their mean is 1 / rate whatever the burstiness, burstiness 1 is a Poisson
process, below 1 burstier, above 1 more even. Unlike vLLM, the first request arrives at t = 0 (as SGLang's does)
and the schedule is not rescaled to end at exactly N / rate: the gaps stay a true renewal process (what the
tests check them against), and the rate the schedule actually offers is recorded beside the declared one.
The gaps come from the workload's seed, through a generator of their own (so the lengths and ids are the same
with or without arrivals), and Python's gammavariate draws a unit-scale gamma and multiplies it by the scale:
the schedules of two rates are the same draws scaled by the ratio of the rates (common random numbers across a
rate axis, which makes latency against rate a smooth curve rather than one of independent draws).

max_concurrency, when set, holds requests on the client side (vLLM's semaphore): a request that arrives while
that many are in flight is sent when one finishes, and its latencies count from then; the wait is recorded
on its own (queue_wait_ms_mean).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Arrivals:
    """[workload.arrivals]: rate in requests per second, burstiness (the gamma shape), optional max_concurrency."""

    rate: float
    burstiness: float = 1.0
    max_concurrency: int | None = None

    def times(self, num_seqs: int, seed: int) -> list[float]:
        """Each request's arrival in seconds from the start of the timed run, non-decreasing, the first at 0."""
        rng = random.Random(f"nova-ab arrivals {seed}")
        shape = self.burstiness
        times = [0.0]
        for _ in range(num_seqs - 1):
            times.append(times[-1] + rng.gammavariate(shape, 1.0 / (self.rate * shape)))
        return times[:num_seqs]


@dataclass(frozen=True)
class Slo:
    """[metrics.slo]: latency targets in milliseconds (None: not declared). A request is good when every
    declared target holds (TPOT counts as 0 for a request of one output token, as vLLM counts it); an arm
    meets the SLO at a rate when at least `attainment` of the steady window's requests are good."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None
    attainment: float = 0.9

    def targets(self) -> dict[str, float]:
        """The declared targets by the request metric they bound ("ttft_ms", "tpot_ms", "e2e_ms")."""
        return {name: value for name, value in asdict(self).items() if name != "attainment" and value is not None}

    def describe(self) -> str:
        """The targets in words: "TTFT <= 500 ms, TPOT <= 30 ms for 90% of requests"."""
        names = {"ttft_ms": "TTFT", "tpot_ms": "TPOT", "e2e_ms": "E2E"}
        targets = ", ".join(f"{names[k]} <= {v:g} ms" for k, v in self.targets().items())
        return f"{targets or 'no targets'} for {self.attainment:.0%} of requests"


@dataclass(frozen=True)
class ServingSettings:
    """An online trial's settings, as they travel to the trial (novainfer.ab.wire.TrialRequest.serving): the
    arm's arrivals (its own rate when the rate is an axis), the SLO and the steady window: the fractions
    [lo, hi) of the requests, in arrival order, whose latencies and goodput are reported (ramp-up before lo,
    drain after hi are left out)."""

    arrivals: Arrivals
    slo: Slo = field(default_factory=Slo)
    steady_state: tuple[float, float] = (0.1, 0.9)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ServingSettings:
        return cls(Arrivals(**data["arrivals"]), Slo(**data["slo"]), tuple(data["steady_state"]))
