"""A peer arm's trial: the same steps, timing rules, metrics and statuses as our engine's (novainfer.ab.trial).

1. skipped, with "<peer> is not installed", when the peer's package is absent (or the peer raises
   PeerUnavailable: too old, no usable device; or the arm wants a KV cache dtype other than the model's,
   which no peer here offers);
2. the model as a checkpoint directory: `random:<preset>` is materialised once (novainfer.ab.checkpoints);
3. the correctness gate, where the peer has one (else the tag correctness_gate says why not);
4. the peer engine started, then the workload's first warmup_seqs requests generated, untimed;
5. the whole workload timed, from submitting the first request to the last request's final token;
6. caliber check: every request must have produced exactly its drawn output length.

Metrics: output_tok_s, total_tok_s, run_seconds, expected/actual/prompt tokens, max_rel_err where there is a
gate, and the peer's memory and cache figures; our phase breakdown, step and allocation counters have no peer
equivalent. Params: the [engine] settings, the arguments the peer was given and its version; tags: engine (the
peer's name), peer_version, attention_backend, cuda_graphs_mode, correctness_gate, and the device tags.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from importlib import import_module
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Protocol

import torch

from novainfer.ab.checkpoints import materialize
from novainfer.ab.environment import device_tags, git_commit, package_version
from novainfer.ab.peers import PEERS, PeerUnavailable
from novainfer.ab.record import TrialRecord
from novainfer.ab.trial import REFERENCE_BACKEND, TrialRequest, _Progress, emit
from novainfer.config import EngineConfig
from novainfer.engine import resolve_device, resolve_dtype


class PeerEngine(Protocol):
    """A started peer engine (what a peer module's `start` returns)."""

    params: dict[str, str]  # the arguments the peer was given, "<peer>.<argument>" -> value
    tags: dict[str, str]  # attention_backend, cuda_graphs_mode, ...

    def generate(
        self, prompts: list[list[int]], output_lens: list[int], on_tokens: Callable[[int], None]
    ) -> list[int]:
        """Greedy, EOS ignored, request i producing output_lens[i] tokens; returns each request's output count
        once all are done (results on the host, so the clock can stop)."""
        ...

    def metrics(self) -> dict[str, float]:
        """Memory and cache figures of the last generate call, as far as the peer lets us see them."""
        ...

    def close(self) -> None: ...


def run_peer_trial(request: TrialRequest, record: TrialRecord, settings: dict[str, Any]) -> None:
    """Run a peer arm's trial, filling `record` as it goes (so a failure midway keeps what was learned).

    settings: the arm's {"peer": name, **the peer's own settings} (TrialRequest.peer).
    """
    name = settings["peer"]
    options = {k: v for k, v in settings.items() if k != "peer"}
    peer = PEERS[name]
    config = EngineConfig(**request.config)
    record.tags = {"engine": name, "git_commit": git_commit(Path(request.source_dir))}
    if find_spec(peer.package) is None:
        record.status, record.reason = "skipped", f"{name} is not installed"
        return
    version = package_version(peer.package)
    record.params = _params(config, name, version)
    record.tags["peer_version"] = version
    device = resolve_device(config.device)
    dtype = str(resolve_dtype(config.dtype, device)).removeprefix("torch.")
    if config.kv_cache_dtype not in ("auto", dtype):
        record.status = "skipped"
        record.reason = f"{name} keeps its KV cache in the model's dtype ({dtype}), not {config.kv_cache_dtype}"
        return
    module = import_module(peer.module)
    emit("phase", name="checkpoint")
    model_dir = materialize(config.model, config.seed)
    metrics = record.metrics
    try:
        if not request.gate.enabled:
            record.tags["correctness_gate"] = "disabled"
        else:
            record.tags["correctness_gate"] = module.GATE
            correctness = getattr(module, "correctness", None)
            if correctness is not None:
                emit("phase", name="correctness")
                metrics["max_rel_err"] = correctness(config, model_dir, request.gate)
                if not metrics["max_rel_err"] <= request.gate.max_rel_err:  # NaN fails too
                    record.status = "incorrect"
                    record.reason = (
                        f"teacher-forced logits differ from {REFERENCE_BACKEND}: relative error "
                        f"{metrics['max_rel_err']:.3g} > {request.gate.max_rel_err:g}"
                    )
                    return
        emit("phase", name="load")
        engine: PeerEngine = module.start(config, options, model_dir)
    except PeerUnavailable as error:
        record.status, record.reason = "skipped", str(error)
        return
    try:
        _timed_run(request, record, engine, device)
    finally:
        engine.close()


def _timed_run(request: TrialRequest, record: TrialRecord, engine: PeerEngine, device: torch.device) -> None:
    record.params.update(engine.params)
    # Only now: taking device properties starts CUDA in this process, which a peer that forks workers
    # (vLLM) should not find already started.
    record.tags.update(device_tags(device), **engine.tags)
    workload = request.workload
    prompts, output_lens = workload.prompts(), workload.output_lens()
    emit("phase", name="warmup")
    warm = min(request.warmup_seqs, len(prompts))
    if warm:
        engine.generate(prompts[:warm], output_lens[:warm], lambda n: None)
    expected = sum(output_lens)
    emit("phase", name="timed", total=expected)
    progress = _Progress(expected)
    t0 = time.perf_counter()
    counts = engine.generate(prompts, output_lens, progress.advance)
    seconds = time.perf_counter() - t0
    actual = sum(counts)
    prompt_tokens = sum(len(p) for p in prompts)
    record.metrics.update(
        output_tok_s=actual / seconds,
        total_tok_s=(actual + prompt_tokens) / seconds,
        run_seconds=seconds,
        expected_tokens=expected,
        actual_tokens=actual,
        prompt_tokens=prompt_tokens,
        **engine.metrics(),
    )
    # Per request, not only the sum: a peer that stops one request early and runs another long must not pass.
    off = sum(c != n for c, n in zip(counts, output_lens)) + abs(len(counts) - len(output_lens))
    if off:
        record.status = "caliber_mismatch"
        record.reason = f"produced {actual} output tokens, expected {expected} ({off} requests off their length)"
    else:
        record.status = "ok"


def _params(config: EngineConfig, name: str, version: str) -> dict[str, str]:
    settings = {k: v for k, v in config.to_dict().items() if k not in ("backend", "backend_options")}
    return {
        **{f"engine.{k}": str(v) for k, v in settings.items()},
        "peer": name,
        "peer_version": version,
        f"{name}_version": version,
        "novainfer_version": package_version("novainfer"),
        "torch_version": torch.__version__,
    }
