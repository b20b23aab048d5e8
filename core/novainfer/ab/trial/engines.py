"""What a trial runs: an engine behind one shape, ours or a peer's, so every arm goes through one procedure.

Each engine module (novainfer.ab.trial.novainfer_engine for ours, novainfer.ab.trial.peers.<name>_peer for a peer) has
`open_engine(request) -> TrialEngine`, which raises EngineUnavailable when the engine cannot run here (its trials
are then "skipped" with that reason). novainfer.ab.trial drives the engine it returns, step by step.

An online caliber (requests arriving over time, novainfer.ab.serving) needs an engine with `serve`, which
drives the engine's own per-step API through novainfer.ab.trial.arrival_loop; one without it (the transformers
peer, whose continuous batching runs inside one `generate_batch` call) is skipped in an online sweep, and says so.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module
from importlib.util import find_spec
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from novainfer.ab.trial.gate import GateReport
    from novainfer.ab.trial.latency import RequestTiming
    from novainfer.ab.wire import GateSettings, TrialRequest

OUR_ENGINE = "novainfer.ab.trial.novainfer_engine"


class EngineUnavailable(RuntimeError):
    """The engine cannot run here (not installed, too old, no usable device): its trials are skipped."""


class TrialEngine(Protocol):
    """An opened engine. The trial calls, in this order: start, generate for the untimed warm-up, begin_timed,
    generate for the timed run, end_timed, gate (unless checks are switched off), and close always.

    params: what the engine was given, flat ("<engine>.<argument>" -> value) and the versions it runs;
        read after open and again after start.
    tags: what it chose and ran on (attention_backend, cuda_graphs_mode, the device tags, the gate's method).
    breakdown: per step class, where the timed run's time went (our engine; peers have none).
    """

    params: dict[str, str]
    tags: dict[str, str]
    breakdown: dict[str, dict[str, float]]

    def gate(self, settings: GateSettings, prompts: list[list[int]], seed: int) -> GateReport | str:
        """After the timed run (whose prompts were `prompts`), check the engine's steps against our reference,
        the sample drawn from `seed`; the timed engine may be let go first. Returns the report, or a one-line
        reason there can be none (the trial is then at best unverified)."""
        ...

    def start(self) -> None:
        """Build the engine that is timed (weights, cache, CUDA graphs): all set-up happens here."""
        ...

    def generate(
        self, prompts: list[list[int]], output_lens: list[int], on_tokens: Callable[[int], None]
    ) -> list[list[int]]:
        """Greedy, EOS ignored, request i asked for output_lens[i] tokens; returns the token ids each request
        produced, once all are done and their tokens are on the host (so the clock can stop).
        `on_tokens(n)` is told of newly produced tokens as they come."""
        ...

    def serve(
        self,
        prompts: list[list[int]],
        output_lens: list[int],
        arrivals: list[float],
        max_concurrency: int | None,
        on_tokens: Callable[[int], None],
    ) -> tuple[list[list[int]], list[RequestTiming]]:
        """The online timed run (only engines that can run one have it): as generate, each request submitted
        at its arrival (seconds from the start); returns the tokens and each request's timing."""
        ...

    def begin_timed(self) -> None:
        """Just before the timed generate: reset the counters read by end_timed."""
        ...

    def end_timed(self) -> dict[str, float]:
        """Just after the timed generate (the clock stopped): metrics of the timed window, and any
        measurement that needs the run behind it (our phase breakdown)."""
        ...

    def close(self) -> None: ...


def open_trial_engine(request: TrialRequest) -> TrialEngine:
    """The engine of the request's arm, opened; EngineUnavailable when it cannot run here."""
    if request.peer is None:
        return import_module(OUR_ENGINE).open_engine(request)
    from novainfer.ab.trial.peers import PEERS

    name = request.peer["peer"]
    peer = PEERS[name]
    if find_spec(peer.package) is None:
        raise EngineUnavailable(f"{name} is not installed")
    if request.serving is not None and not peer.online:
        raise EngineUnavailable(f"the {name} peer runs offline calibers only: it has no per-step API to time arrivals")
    return import_module(peer.module).open_engine(request)
