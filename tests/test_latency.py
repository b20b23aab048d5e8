"""Per-request latency on the host: hand-computed values on hand-made timestamps and on a fake clock driving the
real engine through the arrival loop; goodput counts exactly the requests meeting every target; an online run's
steps are reconstructed exactly from when each request was added."""

from __future__ import annotations

import numpy as np
import pytest

from novainfer import LLM
from novainfer.ab.serving import Arrivals, ServingSettings, Slo
from novainfer.ab.trial import arrival_loop
from novainfer.ab.trial.latency import RequestTiming, latency_metrics, percentile, window
from novainfer.ab.trial.novainfer_engine import _Stepper
from novainfer.ab.trial.schedule import plan_schedule

STEP_S = 0.010  # what one engine step costs on the fake clock


class FakeClock:
    """Time moves only when the loop sleeps or the engine steps (STEP_S a step)."""

    def __init__(self) -> None:
        self.now = 0.0

    def time(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class TimedStepper(_Stepper):
    """Our engine's stepper, each step costing STEP_S on the fake clock."""

    def __init__(self, llm: LLM, clock: FakeClock) -> None:
        super().__init__(llm)
        self.clock = clock

    def step(self) -> None:
        super().step()
        self.clock.now += STEP_S


def settings(slo: Slo | None = None, steady: tuple[float, float] = (0.0, 1.0)) -> ServingSettings:
    return ServingSettings(Arrivals(10.0), slo or Slo(), steady)


def hand_made() -> list[RequestTiming]:
    return [
        RequestTiming(0.0, 0.0, [(0.05, 1), (0.07, 1), (0.09, 1), (0.11, 1)], 0.11),  # TTFT 50, TPOT 20
        RequestTiming(0.1, 0.1, [(0.40, 1), (0.45, 2)], 0.45),  # TTFT 300, TPOT 25: a 2-token chunk
        RequestTiming(0.2, 0.2, [(0.25, 1)], 0.25),  # one token: TTFT 50, no TPOT (0 against the SLO)
        RequestTiming(0.3, 0.3, [(0.32, 1), (0.42, 1)], 0.42),  # TTFT 20, TPOT 100
    ]


def test_latencies_match_hand_computed_values() -> None:
    m = latency_metrics(hand_made(), settings())
    # TTFT: 50, 300, 50, 20 ms; sorted 20, 50, 50, 300: p90 at position 2.7, p99 at 2.97.
    assert m["ttft_ms_mean"] == pytest.approx(105)
    assert m["ttft_ms_median"] == pytest.approx(50)
    assert m["ttft_ms_p90"] == pytest.approx(50 + 0.7 * 250)
    assert m["ttft_ms_p99"] == pytest.approx(50 + 0.97 * 250)
    # TPOT: 20, 25, 100 (the one-token request has none).
    assert m["tpot_ms_mean"] == pytest.approx(145 / 3) and m["tpot_ms_median"] == pytest.approx(25)
    # ITL, pooled, one entry per chunk: 20, 20, 20, 50, 100.
    assert m["itl_ms_mean"] == pytest.approx(42) and m["itl_ms_median"] == pytest.approx(20)
    assert m["e2e_ms_median"] == pytest.approx((110 + 120) / 2)  # 50, 110, 120, 350
    assert m["request_throughput"] == pytest.approx(4 / 0.45)
    assert m["offered_rate"] == pytest.approx(3 / 0.3)
    assert m["queue_wait_ms_mean"] == 0


def test_percentile_is_numpys_linear_method() -> None:
    values = [3.0, 1.0, 7.5, 2.25, 10.0, 4.0, 4.0]
    for q in (0, 10, 50, 90, 99, 100):
        assert percentile(values, q) == pytest.approx(np.percentile(values, q))


@pytest.mark.parametrize(
    "slo, good",
    [
        (Slo(ttft_ms=100, tpot_ms=30), [0, 2]),  # 1: TTFT 300; 3: TPOT 100
        (Slo(ttft_ms=100), [0, 2, 3]),
        (Slo(tpot_ms=30), [0, 1, 2]),  # the one-token request's TPOT counts as 0
        (Slo(e2e_ms=110), [0, 2]),  # 110 <= 110 holds
        (Slo(ttft_ms=10), []),
        (Slo(), [0, 1, 2, 3]),  # no target: every request is good
    ],
)
def test_goodput_counts_exactly_the_requests_meeting_every_target(slo: Slo, good: list[int]) -> None:
    timings = hand_made()
    m = latency_metrics(timings, settings(slo))
    assert [i for i, t in enumerate(timings) if t.good(slo.targets())] == good
    assert m["good_requests"] == len(good) and m["good_fraction"] == len(good) / 4
    assert m["goodput_req_s"] == pytest.approx(len(good) / 0.45)  # window: all four, arrival 0 to the last finish


def test_the_steady_window_leaves_out_ramp_up_and_drain() -> None:
    assert window(10, (0.1, 0.9)) == range(1, 9) and window(4, (0.0, 1.0)) == range(4)
    assert window(3, (0.5, 0.6)) == range(1, 2)  # never empty
    m = latency_metrics(hand_made(), settings(Slo(ttft_ms=100), steady=(0.25, 0.75)))
    # Requests 1 and 2 (TTFT 300 and 50): from request 1's arrival to request 3's.
    assert m["requests_in_window"] == 2 and m["ttft_ms_median"] == pytest.approx(175)
    assert (m["window_start_s"], m["window_end_s"]) == (0.1, 0.3)
    assert m["good_requests"] == 1 and m["goodput_req_s"] == pytest.approx(1 / 0.2)


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async"])
def llm(request: pytest.FixtureRequest) -> LLM:
    """Scheduled step by step, or asynchronously (a step's tokens become known to the host one step later)."""
    return LLM(
        "random:qwen2-tiny", device="cpu", max_model_len=64, kv_cache_capacity=512, max_num_batched_tokens=8,
        async_scheduling=request.param,
    )


def lag(llm: LLM) -> float:
    """How much later than its step a token becomes known: one step under asynchronous scheduling."""
    return STEP_S if llm.config.async_scheduling else 0.0


def serve(llm: LLM, arrivals: list[float], max_concurrency: int | None = None, prompt_len: int = 20, out: int = 5):
    clock = FakeClock()
    stepper = TimedStepper(llm, clock)
    prompts = [[7 + i] * prompt_len for i in range(len(arrivals))]
    timings = arrival_loop.serve(
        stepper, prompts, [out] * len(arrivals), arrivals, max_concurrency, clock=clock.time, sleep=clock.sleep
    )
    return timings, stepper


def test_the_loop_stamps_each_token_when_its_step_ends(llm: LLM) -> None:
    """Requests 1 s apart on an engine whose steps take 10 ms: with a token budget of 8, a 20-token prompt
    takes 3 steps (8 + 8 + 4), so TTFT is 30 ms, then one token a step: TPOT 10 ms, E2E 30 + 4 x 10 ms; each
    token known one step later under asynchronous scheduling."""
    timings, stepper = serve(llm, [0.0, 1.0, 2.0])
    for t in timings:
        assert t.sent == t.arrival and t.tokens == 5 and [n for _, n in t.chunks] == [1] * 5
        assert t.ttft == pytest.approx(0.030 + lag(llm)) and t.tpot == pytest.approx(0.010)
        assert t.e2e == pytest.approx(0.070 + lag(llm)) and t.finished == pytest.approx(t.arrival + t.e2e)
    assert [len(stepper.seqs[i].output_token_ids) for i in range(3)] == [5, 5, 5]


def test_a_request_that_arrives_mid_step_counts_from_its_arrival(llm: LLM) -> None:
    timings, _ = serve(llm, [0.0, 0.005])
    # Request 1 arrives 5 ms into the first step and joins the second; it is timed from its arrival.
    assert timings[1].sent == 0.005 and timings[1].chunks[0][0] > 0.010
    assert timings[1].ttft == pytest.approx(timings[1].chunks[0][0] - 0.005)


def test_max_concurrency_holds_requests_on_the_client_and_times_them_from_their_send(llm: LLM) -> None:
    timings, _ = serve(llm, [0.0, 0.0, 0.0], max_concurrency=1)
    e2e = 0.070 + lag(llm)
    assert [t.sent for t in timings] == pytest.approx([0.0, e2e, 2 * e2e])  # each when the one before finished
    assert [t.ttft for t in timings] == pytest.approx([0.030 + lag(llm)] * 3)
    m = latency_metrics(timings, ServingSettings(Arrivals(10.0, max_concurrency=1), Slo(), (0.0, 1.0)))
    assert m["queue_wait_ms_mean"] == pytest.approx(e2e * 1e3) and m["max_concurrency"] == 1


def test_an_online_run_is_reconstructed_step_for_step(llm: LLM) -> None:
    """Overlapping requests: the steps rebuilt from when each was added are the steps the engine recorded, and
    a wrong record of when they were added gives other steps (the check can fail)."""
    llm.step_stats.clear()
    arrivals = [0.0, 0.012, 0.013, 0.3, 0.6, 0.601]  # two overlap early, one alone, two late
    _, stepper = serve(llm, arrivals, out=6)
    ran = [(s.num_seqs, s.num_decode_tokens, s.num_prefill_tokens) for s in llm.step_stats]
    added = [stepper.added_at[i] for i in range(len(arrivals))]
    assert added == sorted(added) and added[0] == 0 and len(set(added)) > 3

    def rebuilt(added_at: list[int]) -> list[tuple[int, int, int]]:
        plan = plan_schedule(
            [20] * len(arrivals), [6] * len(arrivals), num_blocks=llm.block_manager.num_blocks, block_size=16,
            max_num_seqs=256, max_num_batched_tokens=8, max_model_len=64, cuda_graphs=False, added_at=added_at,
        )
        return [(p.num_seqs, p.num_decodes, p.tokens - p.num_decodes) for p in plan]

    assert rebuilt(added) == ran
    assert rebuilt([0] * len(arrivals)) != ran
