"""One trial, run in its own process: correctness gate, untimed warm-up, timed run, caliber check.

The parent (the sweep runner) sends a TrialRequest as JSON on stdin and reads progress lines
(JSON) from stdout; the TrialRecord is written to the request's result path. Whatever goes wrong
inside a trial ends up in that record, so the sweep always learns why.
"""

from __future__ import annotations

import json
import resource
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from novainfer import LLM, SamplingParams
from novainfer.ab.environment import device_tags, git_commit, package_version
from novainfer.ab.record import TrialRecord
from novainfer.ab.workload import Workload, teacher_forcing_inputs
from novainfer.config import EngineConfig
from novainfer.engine import resolve_device, resolve_dtype
from novainfer.models.qwen2 import Qwen2ForCausalLM, build_model
from novainfer.observers import NvtxRanges, PhaseTimer
from novainfer.plugins import BackendError, select_backend

# The reference every backend's logits are checked against: native's plain-PyTorch path.
REFERENCE_BACKEND = "native"
REFERENCE_OPTIONS = {"kernels": "torch"}


@dataclass(frozen=True)
class GateSettings:
    enabled: bool = True
    num_seqs: int = 4
    prompt_len: int = 64
    decode_steps: int = 16
    max_rel_err: float = 1e-2


@dataclass(frozen=True)
class TrialRequest:
    sweep_id: str
    trial_id: str
    arm: str
    arm_params: dict[str, Any]
    repeat: int
    order: int
    config: dict[str, Any]
    workload: Workload
    warmup_seqs: int
    gate: GateSettings
    result_path: str
    source_dir: str  # where the experiment file lives, for the git commit tag
    extra: dict[str, Any] = field(default_factory=dict)
    peer: dict[str, Any] | None = None  # a peer arm's {"peer": name, **its settings}; None runs our engine

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> TrialRequest:
        data = json.loads(text)
        data["workload"] = Workload(**data["workload"])
        data["gate"] = GateSettings(**data["gate"])
        return cls(**data)


def emit(event: str, **fields: Any) -> None:
    """A progress line for the parent."""
    print(json.dumps({"event": event, **fields}), flush=True)


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got - ref).norm() / ref.norm().clamp_min(1e-30))


def correctness_gate(config: EngineConfig, gate: GateSettings) -> tuple[float, Qwen2ForCausalLM]:
    """Largest relative logits error of the arm's backend against the reference, under teacher forcing.

    The gate checks the backend, so nothing else may round differently between the two engines:
    both run the same float32 weights (so the GEMMs are identical), and only attention runs in the
    arm's dtype, over a cache of that dtype. With the whole model in bfloat16 the rounding of 28
    layers' GEMMs would amplify any one-ulp difference in attention into a few percent, for every
    backend alike, and hide real errors under that noise.

    Returns the error and the model, converted to the arm's dtype, for the arm's engine to share.
    """
    device = resolve_device(config.device)
    attention_dtype = str(resolve_dtype(
        config.dtype if config.kv_cache_dtype == "auto" else config.kv_cache_dtype, device
    )).removeprefix("torch.")
    model = build_model(config.model, config.seed, torch.float32, device, config.max_model_len)
    prompts, continuations = teacher_forcing_inputs(
        seed=1234, num_seqs=gate.num_seqs, prompt_len=gate.prompt_len, decode_steps=gate.decode_steps,
        vocab_size=model.config.vocab_size,
    )
    small = dict(
        model=config.model, device=config.device, dtype="float32", kv_cache_dtype=attention_dtype,
        block_size=config.block_size, max_model_len=config.max_model_len, max_num_seqs=gate.num_seqs,
        max_num_batched_tokens=gate.num_seqs * gate.prompt_len,
        kv_cache_capacity=gate.num_seqs * (gate.prompt_len + gate.decode_steps + config.block_size),
    )
    reference = LLM(backend=REFERENCE_BACKEND, backend_options=REFERENCE_OPTIONS, shared_model=model, **small)
    expected = reference.teacher_forced_logits(prompts, continuations)
    del reference
    tested = LLM(
        backend=config.backend, backend_options=config.backend_options, cuda_graphs=config.cuda_graphs,
        shared_model=model, **small,
    )
    got = tested.teacher_forced_logits(prompts, continuations)
    del tested
    dtype = resolve_dtype(config.dtype, device)
    for param in model.parameters():
        param.data = param.data.to(dtype)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return max(relative_error(g, e) for g, e in zip(got, expected)), model


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def allocator_counts(device: torch.device) -> dict[str, int]:
    """The caching allocator's cumulative counters: device mallocs (segments) and tensor allocations."""
    if device.type != "cuda":
        return {"cuda_mallocs": 0, "tensor_allocs": 0}
    stats = torch.cuda.memory_stats(device)
    return {
        "cuda_mallocs": stats.get("segment.all.allocated", 0),
        "tensor_allocs": stats.get("allocation.all.allocated", 0),
    }


def new_record(request: TrialRequest) -> TrialRecord:
    """The trial's record before it runs: "failed" until it proves otherwise."""
    return TrialRecord(
        sweep_id=request.sweep_id, trial_id=request.trial_id, arm=request.arm, arm_params=request.arm_params,
        repeat=request.repeat, order=request.order, status="failed", config=request.config,
        started_at=time.time(),
    )


def run_trial(request: TrialRequest, record: TrialRecord) -> None:
    """Run the trial, filling `record` as it goes (so a failure midway keeps what was learned)."""
    if request.peer is not None:
        from novainfer.ab.peers.trial import run_peer_trial  # only a peer's trial pays for peer code

        run_peer_trial(request, record, request.peer)
        return
    config = EngineConfig(**request.config)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    record.tags = {**device_tags(device), "git_commit": git_commit(Path(request.source_dir)), "engine": "novainfer"}
    try:
        backend = select_backend(config.backend, device, dtype, config.block_size)
    except BackendError as error:
        record.status, record.reason = "skipped", str(error)
        return
    record.params = _params(config, backend.plugin, backend.version)
    metrics = record.metrics
    model = None
    if request.gate.enabled:
        emit("phase", name="correctness")
        metrics["max_rel_err"], model = correctness_gate(config, request.gate)
        if not metrics["max_rel_err"] <= request.gate.max_rel_err:  # NaN fails too
            record.status = "incorrect"
            record.reason = (
                f"teacher-forced logits differ from {REFERENCE_BACKEND}: relative error "
                f"{metrics['max_rel_err']:.3g} > {request.gate.max_rel_err:g}"
            )
            return
    timer = PhaseTimer(device)
    emit("phase", name="load")
    observers: list[object] = [timer, NvtxRanges()] if device.type == "cuda" else [timer]
    llm = LLM(observers=observers, shared_model=model, **config.to_dict())
    record.tags["cuda_graphs_mode"] = str(getattr(llm, "graph_mode", "eager"))
    workload = request.workload
    prompts, output_lens = workload.prompts(), workload.output_lens()
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in output_lens]
    emit("phase", name="warmup")
    warm = min(request.warmup_seqs, len(prompts))
    if warm:
        llm.generate(prompts[:warm], params[:warm])
    _synchronize(device)
    timer.reset()
    llm.step_stats.clear()
    counters_before = llm.backend_counters()
    allocs_before = allocator_counts(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    expected = sum(output_lens)
    emit("phase", name="timed", total=expected)
    progress = _Progress(expected)
    _synchronize(device)
    t0 = time.perf_counter()
    outputs = llm.generate(prompts, params, on_step=progress.advance)
    _synchronize(device)
    seconds = time.perf_counter() - t0
    actual = sum(o.num_output_tokens for o in outputs)
    counters_after = llm.backend_counters()
    allocs_after = allocator_counts(device)
    prompt_tokens = sum(len(p) for p in prompts)
    metrics.update(
        output_tok_s=actual / seconds,
        total_tok_s=(actual + prompt_tokens) / seconds,
        run_seconds=seconds,
        expected_tokens=expected,
        actual_tokens=actual,
        prompt_tokens=prompt_tokens,
        prefill_tokens=sum(s.num_prefill_tokens for s in llm.step_stats),
        decode_tokens=sum(s.num_decode_tokens for s in llm.step_stats),
        num_steps=len(llm.step_stats),
        num_preemptions=llm.scheduler.num_preemptions,
        peak_memory_bytes=peak_memory_bytes(device),
        timed_cuda_mallocs=allocs_after["cuda_mallocs"] - allocs_before["cuda_mallocs"],
        timed_tensor_allocs=allocs_after["tensor_allocs"] - allocs_before["tensor_allocs"],
        kv_cache_blocks=llm.block_manager.num_blocks,
    )
    for phase, secs in timer.seconds().items():
        metrics[f"phase_{phase}_s"] = secs
    for name in set(counters_before) | set(counters_after):
        metrics[f"timed_{name}"] = counters_after.get(name, 0) - counters_before.get(name, 0)
    if actual != expected:
        record.status = "caliber_mismatch"
        record.reason = f"produced {actual} output tokens, expected {expected}"
    else:
        record.status = "ok"


class _Progress:
    """Reports produced tokens to the parent at most a few times a second."""

    def __init__(self, total: int) -> None:
        self.done = 0
        self.last = 0.0
        self.total = total

    def advance(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last > 0.25 or self.done >= self.total:
            self.last = now
            emit("tokens", done=self.done, total=self.total)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _params(config: EngineConfig, plugin: str, plugin_version: str) -> dict[str, str]:
    params = {f"engine.{k}": json.dumps(v) if isinstance(v, dict) else str(v) for k, v in config.to_dict().items()}
    params.update(
        backend=config.backend,
        plugin=plugin,
        plugin_version=plugin_version,
        novainfer_version=package_version("novainfer"),
        torch_version=torch.__version__,
        triton_version=package_version("triton"),
        flashinfer_version=package_version("flashinfer-python"),
        cudnn_frontend_version=package_version("nvidia-cudnn-frontend"),
        flash_attn_version=package_version("flash-attn-4"),
    )
    return params


def main() -> int:
    request = TrialRequest.from_json(sys.stdin.read())
    record = new_record(request)
    try:
        run_trial(request, record)
    except Exception as error:  # the trial's own failure is a result, never the sweep's crash
        traceback.print_exc()
        record.status = "failed"
        record.reason = f"{type(error).__name__}: {error}".splitlines()[0][:500]
    record.finished_at = time.time()
    Path(request.result_path).write_text(json.dumps(record.to_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
