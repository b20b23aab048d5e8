"""Our engine as a trial engine (novainfer.ab.trial.engines), the same shape as the peers'.

open: the backend is chosen (unavailable here: skipped), the model built in the arm's dtype, the KV cache's
    size resolved exactly as the engine resolves it, and the timed run's steps planned on the host
    (novainfer.ab.trial.schedule);
start: the timed engine, with the arm's settings and the planned cache size (so the plan is its schedule),
    and the plan labelled for the decode path it took (CUDA graphs or eager);
end_timed: the window's counters, a check that the run took the planned steps, and the phase breakdown of
    the whole run from shadow steps (novainfer.ab.trial.phases), measured after the clock has stopped;
gate: the timed engine is let go, then novainfer.ab.trial.gate replays a random sample of the run's steps on the
    arm's backend and on the reference;
serve: an online run (novainfer.ab.trial.arrival_loop) through `add_request` and `step`; its steps cannot be
    planned ahead, so end_timed reconstructs them from the step each request was added at, and checks the
    reconstruction against the steps the engine recorded: when they differ, the gate cannot show it covers the
    run's step kinds, and says so (the trial is then at best unverified).
"""

from __future__ import annotations

import gc
import json
import statistics
import time
from collections.abc import Callable

import torch

from novainfer import LLM, SamplingParams
from novainfer.ab.trial import arrival_loop
from novainfer.ab.trial.engines import EngineUnavailable
from novainfer.ab.trial.environment import device_tags, package_version, peak_memory_bytes
from novainfer.ab.trial.gate import GateReport, check_backend, forced_sequences
from novainfer.ab.trial.latency import RequestTiming
from novainfer.ab.trial.phases import PHASES, measure_phases
from novainfer.ab.trial.schedule import PlannedStep, labelled, plan_schedule
from novainfer.ab.wire import GateSettings, TrialRequest
from novainfer.backend_api import BackendError
from novainfer.config import EngineConfig
from novainfer.engine import resolve_device, resolve_dtype
from novainfer.kv_cache import num_kv_blocks
from novainfer.models.qwen2 import build_model
from novainfer.plugins import discover_backends, select_backend
from novainfer.sequence import Sequence


def open_engine(request: TrialRequest) -> NovaInferEngine:
    return NovaInferEngine(request)


class NovaInferEngine:
    def __init__(self, request: TrialRequest) -> None:
        config = EngineConfig(**request.config)
        self.config = config
        self.device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, self.device)
        kv_dtype = dtype if config.kv_cache_dtype == "auto" else resolve_dtype(config.kv_cache_dtype, self.device)
        try:
            backend = select_backend(config.backend, self.device, kv_dtype, config.block_size)
        except BackendError as error:
            raise EngineUnavailable(str(error)) from None
        self.params = _params(config, backend.plugin, backend.version)
        self.tags = device_tags(self.device)
        self.breakdown: dict[str, dict[str, float]] = {}
        self.workload = request.workload
        self.model = build_model(config.model, config.seed, dtype, self.device, config.max_model_len)
        # Resolved now, as LLM would resolve it now, and handed to the timed engine: the plan must be made
        # for the cache the run will have, and the gate's memory must not shrink an "auto" cache.
        self.num_blocks = num_kv_blocks(config, self.model.config, self.device, dtype, kv_dtype)
        self.llm: LLM | None = None
        # None until the timed run begins, then [] until its prompts come (a plan with prefix caching needs them)
        self.timed_prompts: list[list[int]] | None = None
        self.plan = self._plan()
        self.added_at: list[int] | None = None  # an online run's: steps run before each request was added
        self.unreconstructed = 0  # an online run's recorded steps that its reconstruction does not match

    def start(self) -> None:
        capacity = (self.num_blocks - 1) * self.config.block_size  # the scratch block comes on top
        self.llm = LLM(shared_model=self.model, **{**self.config.to_dict(), "kv_cache_capacity": capacity})
        self.tags["cuda_graphs_mode"] = self.llm.graph_mode
        if self.llm.graph_mode == "cuda_graphs":
            self.plan = labelled(self.plan, self.config.max_num_seqs, cuda_graphs=True)

    def gate(self, settings: GateSettings, prompts: list[list[int]], seed: int) -> GateReport | str:
        if self.unreconstructed:
            return (
                f"{self.unreconstructed} of the online run's steps differ from their reconstruction, so the steps "
                "it executed are not known well enough to check every kind"
            )
        self.close()  # the timed engine's cache and graphs go before the gate's engines come
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        sequences = forced_sequences(prompts, self.workload.output_lens(), self.model.config.vocab_size)
        return check_backend(self.config, self.model, self.plan, sequences, settings, seed)

    def generate(
        self, prompts: list[list[int]], output_lens: list[int], on_tokens: Callable[[int], None]
    ) -> list[list[int]]:
        self._planned_for(prompts)
        params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in output_lens]
        return [o.token_ids for o in self._llm.generate(prompts, params, on_step=on_tokens)]

    def serve(
        self,
        prompts: list[list[int]],
        output_lens: list[int],
        arrivals: list[float],
        max_concurrency: int | None,
        on_tokens: Callable[[int], None],
    ) -> tuple[list[list[int]], list[RequestTiming]]:
        self._planned_for(prompts)
        stepper = _Stepper(self._llm)
        timings = arrival_loop.serve(stepper, prompts, output_lens, arrivals, max_concurrency, on_tokens)
        self.added_at = [stepper.added_at[i] for i in range(len(prompts))]
        return [stepper.seqs[i].output_token_ids for i in range(len(prompts))], timings

    def begin_timed(self) -> None:
        llm = self._llm
        _synchronize(self.device)
        llm.step_stats.clear()
        llm.reset_prefix_cache()  # the timed run starts cold, as its plan does
        self.timed_prompts = []  # the next call's prompts are the timed run's
        self._preemptions = llm.scheduler.num_preemptions
        self._counters = llm.backend_counters()
        self._allocs = _allocator_counts(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def end_timed(self) -> dict[str, float]:
        llm = self._llm
        _synchronize(self.device)
        counters, allocs, stats = llm.backend_counters(), _allocator_counts(self.device), llm.step_stats
        if self.added_at is not None:
            self.plan = self._reconstructed(self.added_at)
        ran = [(s.num_seqs, s.num_decode_tokens, s.num_prefill_tokens) for s in stats]
        planned = [(p.num_seqs, p.num_decodes, p.tokens - p.num_decodes) for p in self.plan]
        steps_off = sum(r != p for r, p in zip(ran, planned)) + abs(len(ran) - len(planned))
        # Offline, a run off its plan is off the caliber; online, the plan is the run's reconstruction.
        if self.added_at is not None:
            self.unreconstructed = steps_off
        metrics: dict[str, float] = {
            "prefill_tokens": sum(s.num_prefill_tokens for s in stats),
            "decode_tokens": sum(s.num_decode_tokens for s in stats),
            "num_steps": len(stats),
            "reconstructed_steps_off" if self.added_at is not None else "schedule_steps_off": steps_off,
            "num_preemptions": llm.scheduler.num_preemptions - self._preemptions,
            "peak_memory_bytes": peak_memory_bytes(self.device),
            "timed_cuda_mallocs": allocs["cuda_mallocs"] - self._allocs["cuda_mallocs"],
            "timed_tensor_allocs": allocs["tensor_allocs"] - self._allocs["tensor_allocs"],
            "kv_cache_blocks": llm.block_manager.num_blocks,
            # The host's own work per step (waits for the device excluded), and the share of it that ran while
            # the device was still busy with the step before (asynchronous scheduling; 0 without).
            "host_us_per_step": statistics.median(s.host_s for s in stats) * 1e6 if stats else 0.0,
            "host_hidden_fraction": sum(s.hidden_s for s in stats) / max(sum(s.host_s for s in stats), 1e-12),
        }
        cache = llm.block_manager.cache
        if cache is not None:  # prefix caching: what the timed run found cached (first admissions), and evicted
            metrics |= {
                "prefix_hit_rate_tokens": cache.hit_tokens / max(cache.query_tokens, 1),
                "prefix_hit_rate_blocks": cache.hit_blocks / max(cache.query_blocks, 1),
                "prefix_hit_tokens": cache.hit_tokens,
                "prefix_preempted_hit_tokens": cache.preempted_hit_tokens,
                "prefix_blocks_evicted": cache.evicted,
            }
        for name in set(self._counters) | set(counters):
            metrics[f"timed_{name}"] = counters.get(name, 0) - self._counters.get(name, 0)
        if steps_off:
            self.tags["phases_cover"] = "none: the run's steps differ from the plan the phases are sampled from"
            return metrics
        started = time.perf_counter()
        phases, self.breakdown, self.tags["phases_cover"] = measure_phases(llm, self.plan, [s.seconds for s in stats])
        metrics.update({f"phase_{p}_s": phases[p] for p in PHASES}, phases_seconds=time.perf_counter() - started)
        return metrics

    def close(self) -> None:
        self.llm = None
        gc.collect()

    def _reconstructed(self, added_at: list[int]) -> list[PlannedStep]:
        """The online run's steps, rebuilt from when each request was added (novainfer.ab.trial.schedule)."""
        return self._plan(added_at)

    def _plan(self, added_at: list[int] | None = None) -> list[PlannedStep]:
        """The run's steps (novainfer.ab.trial.schedule). With prefix caching the prompts' ids decide which
        prefixes are shared, so the plan is made from the timed run's prompts once they are known."""
        prompts = self.timed_prompts or self.workload.prompts()
        plan = plan_schedule(
            [len(p) for p in prompts], self.workload.output_lens(), num_blocks=self.num_blocks,
            block_size=self.config.block_size, max_num_seqs=self.config.max_num_seqs,
            max_num_batched_tokens=self.config.max_num_batched_tokens, max_model_len=self.config.max_model_len,
            cuda_graphs=False, added_at=added_at,
            prompts=[list(p) for p in prompts] if self.config.enable_prefix_caching else None,
        )
        graphs = self.llm is not None and self.llm.graph_mode == "cuda_graphs"
        return labelled(plan, self.config.max_num_seqs, cuda_graphs=True) if graphs else plan

    def _planned_for(self, prompts: list[list[int]]) -> None:
        """Re-plan for the timed run's own prompts, with prefix caching (without, only lengths matter)."""
        if self.timed_prompts == [] and self.config.enable_prefix_caching:
            self.timed_prompts = prompts
            self.plan = self._plan()

    @property
    def _llm(self) -> LLM:
        if self.llm is None:
            raise RuntimeError("the engine is not started")
        return self.llm


class _Stepper:
    """Our engine as the arrival loop's Stepper: tokens known to the host are the sequences' own output tokens,
    read after each step; a request has finished when a step returns it."""

    def __init__(self, llm: LLM) -> None:
        self.llm = llm
        self.seqs: dict[int, Sequence] = {}
        self.added_at: dict[int, int] = {}
        self.finished: set[int] = set()

    def add(self, index: int, prompt: list[int], max_tokens: int) -> None:
        self.added_at[index] = len(self.llm.step_stats)
        self.seqs[index] = self.llm.add_request(prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True))

    def step(self) -> None:
        self.finished.update(seq.seq_id for seq in self.llm.step())

    def progress(self, index: int) -> tuple[int, bool]:
        seq = self.seqs[index]
        return seq.num_output_tokens, seq.seq_id in self.finished

    def abort(self) -> None:
        self.llm.scheduler.abort([s for s in self.seqs.values() if s.seq_id not in self.finished])


def _params(config: EngineConfig, plugin: str, plugin_version: str) -> dict[str, str]:
    """The config, flat, and the versions the arm runs on: ours, torch's and the selected backend's own kernel
    libraries, as its plugin reports them (BackendSpec.versions), one `<library>_version` each."""
    params = {f"engine.{k}": json.dumps(v) if isinstance(v, dict) else str(v) for k, v in config.to_dict().items()}
    # The core's own backends are found without loading any plugin (discovery is cached for the process).
    backend = discover_backends(installed=False).get(config.backend) or discover_backends()[config.backend]
    params.update(
        backend=config.backend,
        plugin=plugin,
        plugin_version=plugin_version,
        novainfer_version=package_version("novainfer"),
        torch_version=torch.__version__,
    )
    params.update({f"{library}_version": v for library, v in backend.spec.versions().items()})
    return params


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _allocator_counts(device: torch.device) -> dict[str, int]:
    """The caching allocator's cumulative counters: device mallocs (segments) and tensor allocations."""
    if device.type != "cuda":
        return {"cuda_mallocs": 0, "tensor_allocs": 0}
    stats = torch.cuda.memory_stats(device)
    return {
        "cuda_mallocs": stats.get("segment.all.allocated", 0),
        "tensor_allocs": stats.get("allocation.all.allocated", 0),
    }
