"""The online run: requests submitted to an engine at their arrival times, each token stamped on the host clock.

No HTTP server: the loop drives an engine's own per-step API in this process (ours: `LLM.add_request` and
`LLM.step`; vLLM's: `LLMEngine.add_request` and `step`), through a Stepper, so every arm, ours and the peers,
sees the same arrival schedule and is timed by the same code. Between engine steps it submits every request
whose arrival time has passed (in arrival order), steps once, then reads how many tokens each request in
flight has that are known to the host, and stamps the host clock on those that are new: the moment a
streaming server would send them. An idle engine (nothing in flight) waits for the next arrival.

A request that arrives while the engine is in a step is submitted when the step ends; its latencies still
count from its arrival (a server receives it then; the wait for the step is the server's). Under
max_concurrency a request waits for a free slot before it is sent, and counts from then (vLLM's semaphore):
each slot frees at the finish of its request, and the request gets the earliest free slot.

The clock and the sleep are parameters, so tests run the loop on a fake clock and check its latencies by hand.
"""

from __future__ import annotations

import heapq
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

from novainfer.ab.trial.latency import RequestTiming


class Stepper(Protocol):
    """An engine's per-step API, as the loop needs it."""

    def add(self, index: int, prompt: list[int], max_tokens: int) -> None:
        """Submit request `index` (greedy, EOS ignored, exactly max_tokens output tokens)."""
        ...

    def step(self) -> None:
        """Run one engine step (or, for an engine that runs its steps elsewhere, collect what it produced)."""
        ...

    def progress(self, index: int) -> tuple[int, bool]:
        """Request `index`'s output tokens known to the host so far, and whether it has finished."""
        ...

    def abort(self) -> None:
        """Drop every request still in flight (the run failed part-way)."""
        ...


def serve(
    stepper: Stepper,
    prompts: list[list[int]],
    output_lens: list[int],
    arrivals: list[float],
    max_concurrency: int | None = None,
    on_tokens: Callable[[int], None] = lambda n: None,
    clock: Callable[[], float] = time.perf_counter,
    sleep: Callable[[float], None] = time.sleep,
) -> list[RequestTiming]:
    """Run every request (arrivals: seconds from the start, non-decreasing) to completion; returns each
    request's timing, in request order. `on_tokens(n)` is told of new tokens as they become known."""
    start = clock()
    timings = [RequestTiming(arrival) for arrival in arrivals]
    waiting = deque(range(len(prompts)))
    seen: dict[int, int] = {}  # requests in flight -> their tokens stamped so far
    # The free-at times of the free slots under max_concurrency (a slot frees when its request finishes).
    slots = [0.0] * max_concurrency if max_concurrency is not None else None
    try:
        while waiting or seen:
            now = clock() - start
            while waiting and arrivals[waiting[0]] <= now and (slots is None or slots):
                i = waiting.popleft()
                freed = heapq.heappop(slots) if slots is not None else 0.0
                timings[i].sent = max(arrivals[i], freed)
                stepper.add(i, prompts[i], output_lens[i])
                seen[i] = 0
            if not seen:
                sleep(max(0.0, arrivals[waiting[0]] - now))  # idle until the next arrival
                continue
            stepper.step()
            now = clock() - start
            for i in list(seen):
                tokens, finished = stepper.progress(i)
                if tokens > seen[i]:
                    timings[i].chunks.append((now, tokens - seen[i]))
                    on_tokens(tokens - seen[i])
                    seen[i] = tokens
                if finished:
                    timings[i].finished = now
                    del seen[i]
                    if slots is not None:
                        heapq.heappush(slots, now)
    except BaseException:
        stepper.abort()
        raise
    return timings
