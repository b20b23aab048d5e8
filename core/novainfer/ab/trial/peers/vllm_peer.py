"""The vLLM peer: vLLM's offline `LLM.generate` on the workload's token ids.

Every request is a TokensPrompt of the workload's ids with its own SamplingParams(max_tokens=<its length>,
ignore_eos=True, temperature=0); no tokenizer is loaded (skip_tokenizer_init), none is needed. The engine is
built (weights, memory profiling, torch.compile, CUDA graph capture) before the warm-up requests, and the same
engine serves the timed run; `generate` returns when every request is done.

Engine settings map onto vLLM's engine arguments:
    max_model_len, max_num_seqs, max_num_batched_tokens, block_size, gpu_memory_utilization, seed -> the same names
    cuda_graphs       -> enforce_eager = not cuda_graphs
    async_scheduling  -> async_scheduling (vLLM's own, the same idea: the next step scheduled while one runs)
    kv_cache_capacity -> num_gpu_blocks_override = ceil(capacity / block_size); "auto" lets vLLM profile
    dtype             -> dtype ("auto" resolved as our engine resolves it: bfloat16 on CUDA)
    device            -> checked against the platform this vLLM build runs on (skipped when they differ)
    enable_prefix_caching -> enable_prefix_caching (vLLM's is on by default: ours is off unless the arm says so);
with it on, the prefix cache is reset before the timed run (`LLM.reset_prefix_cache`), as ours is, so the
warm-up requests leave nothing cached for it.

The attention backend vLLM chose is read from its own log, the one place every version states it: the trial
points VLLM_LOGGING_CONFIG_PATH at a logging config that sends vLLM's records to the trial's stderr (its log
file in the sweep directory) and to a scratch file, which the engine's worker processes inherit, and after
the engine is built takes the last "Using ... backend" line of that file ("unknown" when there is none).

Memory: the engine runs in worker processes, so this process cannot see its allocator; the metric is
device_memory_used_bytes (the whole device after the run, vLLM's preallocated share included), not
peak_memory_bytes.

Online calibers: `serve` drives vLLM's own engine, the LLMEngine inside `LLM` (`add_request` / `step`), through
the arrival loop our engine's arm runs (novainfer.ab.trial.arrival_loop), on the same arrival schedule: each
step's RequestOutputs carry each request's tokens so far (vLLM's default, cumulative output), stamped on the
host clock when `step` returns them, as ours are. (With vLLM's engine core in another process,
VLLM_ENABLE_V1_MULTIPROCESSING, `step` only collects what the core has produced: the stamps are still the
moment tokens reach this process, what a server would send.)

Correctness gate: none (vLLM returns no teacher-forced logits), so its trials are at best
"unverified": shown beside ours, never a winner, never the baseline of a speedup claim.
"""

from __future__ import annotations

import gc
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from novainfer.ab.trial import arrival_loop
from novainfer.ab.trial.engines import EngineUnavailable
from novainfer.ab.trial.environment import device_tags
from novainfer.ab.trial.latency import RequestTiming
from novainfer.ab.trial.peers.base import PeerEngine
from novainfer.ab.wire import TrialRequest
from novainfer.engine import resolve_dtype

NO_GATE = "vLLM returns no teacher-forced logits"
# vLLM's own wordings, newest first: forced ("Using AttentionBackendEnum.FLASHINFER backend."), chosen
# ("Using FLASH_ATTN attention backend out of potential backends: [...]"), V1 before the enum
# ("Using Flash Attention backend on V1 engine.").
_BACKEND_LINES = (
    re.compile(r"Using AttentionBackendEnum\.(\w+) backend"),
    re.compile(r"Using (\w+) attention backend out of potential backends"),
    re.compile(r"Using ([\w ]+?) backend on V1 engine"),
)


def open_engine(request: TrialRequest) -> VllmEngine:
    return VllmEngine(request)


class VllmEngine(PeerEngine):
    name = "vllm"
    package = "vllm"

    def __init__(self, request: TrialRequest) -> None:
        super().__init__(request)
        self.llm: Any = None
        self.scratch = Path(tempfile.mkdtemp(prefix="nova-vllm-"))

    def gate(self, settings: object, prompts: list[list[int]], seed: int) -> str:
        return NO_GATE

    def begin_timed(self) -> None:
        if self.config.enable_prefix_caching:
            self.llm.reset_prefix_cache()

    def start(self) -> None:
        config, device = self.config, self.device
        log_path = self.scratch / "vllm.log"
        config_path = self.scratch / "logging.json"
        config_path.write_text(json.dumps(_logging_config(log_path)))
        # Read when vllm is first imported, here and in every worker process it starts. vLLM refuses the path
        # when its logging setup is switched off; the backend is then "unknown".
        if os.environ.get("VLLM_CONFIGURE_LOGGING", "1") != "0":
            os.environ["VLLM_LOGGING_CONFIG_PATH"] = str(config_path)
        # This process has already asked the CUDA runtime for its devices (torch.cuda.is_available), after which a
        # forked worker may fail to start CUDA; vLLM only switches to spawn when torch has created a context.
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
        from vllm import LLM
        from vllm.platforms import current_platform

        if current_platform.device_type != device.type:
            raise EngineUnavailable(
                f"this vLLM build runs on {current_platform.device_type}, the arm asks for {device}"
            )
        args: dict[str, Any] = {
            "model": str(self.model_dir),
            "skip_tokenizer_init": True,
            "dtype": str(resolve_dtype(config.dtype, device)).removeprefix("torch."),
            "seed": config.seed,
            "max_model_len": config.max_model_len,
            "max_num_seqs": config.max_num_seqs,
            "max_num_batched_tokens": config.max_num_batched_tokens,
            "block_size": config.block_size,
            "gpu_memory_utilization": config.gpu_memory_utilization,
            "enforce_eager": not config.cuda_graphs,
            "async_scheduling": config.async_scheduling,
            "enable_prefix_caching": config.enable_prefix_caching,
        }
        if config.kv_cache_capacity != "auto":
            args["num_gpu_blocks_override"] = -(-config.kv_cache_capacity // config.block_size)
        self.llm = LLM(**args)
        self.params.update({f"vllm.{k}": str(v) for k, v in args.items()})
        # Only now: taking device properties starts CUDA in this process, which vLLM's workers, forked or
        # spawned above, must not find already started.
        self.tags.update(
            device_tags(device),
            attention_backend=_chosen_backend(log_path),
            cuda_graphs_mode=(
                "eager (enforce_eager)" if args["enforce_eager"] else "cuda_graphs (vLLM's compilation config)"
            ),
        )

    def generate(
        self, prompts: list[list[int]], output_lens: list[int], on_tokens: Callable[[int], None]
    ) -> list[list[int]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [
            SamplingParams(max_tokens=n, ignore_eos=True, temperature=0.0, detokenize=False) for n in output_lens
        ]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        produced = [list(output.outputs[0].token_ids) for output in outputs]
        on_tokens(sum(len(ids) for ids in produced))
        return produced

    def serve(
        self,
        prompts: list[list[int]],
        output_lens: list[int],
        arrivals: list[float],
        max_concurrency: int | None,
        on_tokens: Callable[[int], None],
    ) -> tuple[list[list[int]], list[RequestTiming]]:
        stepper = _EngineStepper(self.llm.llm_engine)
        timings = arrival_loop.serve(stepper, prompts, output_lens, arrivals, max_concurrency, on_tokens)
        return [stepper.tokens.get(i, []) for i in range(len(prompts))], timings

    def end_timed(self) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            metrics["device_memory_used_bytes"] = total - free
        # Best effort: where vLLM keeps the block count it settled on has moved between versions.
        engine = getattr(self.llm, "llm_engine", None)
        cache_config = getattr(getattr(engine, "vllm_config", None), "cache_config", None)
        blocks = getattr(cache_config, "num_gpu_blocks", None)
        if isinstance(blocks, int):
            metrics["kv_cache_blocks"] = blocks
        return metrics

    def close(self) -> None:
        # Dropping the last reference shuts vLLM's engine processes down.
        self.llm = None
        gc.collect()
        shutil.rmtree(self.scratch, ignore_errors=True)


class _EngineStepper:
    """vLLM's LLMEngine as the arrival loop's Stepper (novainfer.ab.trial.arrival_loop)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.tokens: dict[int, list[int]] = {}
        self.finished: set[int] = set()

    def add(self, index: int, prompt: list[int], max_tokens: int) -> None:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0, detokenize=False)
        # Ids of their own: the warm-up's requests went through LLM.generate, which numbers from 0.
        self.engine.add_request(f"nova-online-{index}", TokensPrompt(prompt_token_ids=prompt), params)
        self.tokens[index] = []

    def step(self) -> None:
        for output in self.engine.step():
            index = int(output.request_id.removeprefix("nova-online-"))
            self.tokens[index] = list(output.outputs[0].token_ids)
            if output.finished:
                self.finished.add(index)

    def progress(self, index: int) -> tuple[int, bool]:
        return len(self.tokens[index]), index in self.finished

    def abort(self) -> None:
        unfinished = [f"nova-online-{i}" for i in self.tokens if i not in self.finished]
        if unfinished:
            self.engine.abort_request(unfinished)


def _logging_config(log_path: Path) -> dict[str, Any]:
    """A standard logging dictConfig for the "vllm" logger: to stderr, as usual, and to `log_path`."""
    formatter = {"format": "%(levelname)s %(asctime)s [%(filename)s:%(lineno)d] %(message)s"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"plain": formatter},
        "handlers": {
            "stderr": {"class": "logging.StreamHandler", "stream": "ext://sys.stderr", "formatter": "plain"},
            "file": {"class": "logging.FileHandler", "filename": str(log_path), "formatter": "plain"},
        },
        "loggers": {"vllm": {"handlers": ["stderr", "file"], "level": "INFO", "propagate": False}},
    }


def _chosen_backend(log_path: Path) -> str:
    """The attention backend of the last "Using ... backend" line vLLM logged, or "unknown"."""
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return "unknown"
    found = "unknown"
    for line in text.splitlines():
        for pattern in _BACKEND_LINES:
            match = pattern.search(line)
            if match:
                found = match.group(1)
                break
    return found
