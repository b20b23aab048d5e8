"""The vLLM peer: vLLM's offline `LLM.generate` on the workload's token ids.

Every request is a TokensPrompt of the workload's ids with its own SamplingParams(max_tokens=<its length>,
ignore_eos=True, temperature=0); no tokenizer is loaded (skip_tokenizer_init), none is needed. The engine is
built (weights, memory profiling, torch.compile, CUDA graph capture) before the warm-up requests, and the same
engine serves the timed run; `generate` returns when every request is done.

Engine settings map onto vLLM's engine arguments:
    max_model_len, max_num_seqs, max_num_batched_tokens, block_size, gpu_memory_utilization, seed -> the same names
    cuda_graphs       -> enforce_eager = not cuda_graphs
    kv_cache_capacity -> num_gpu_blocks_override = ceil(capacity / block_size); "auto" lets vLLM profile
    dtype             -> dtype ("auto" resolved as our engine resolves it: bfloat16 on CUDA)
    device            -> checked against the platform this vLLM build runs on (skipped when they differ)
and, always: enable_prefix_caching = False (our engine has none, and the warm-up requests, which are the
workload's first ones, would otherwise be cached for the timed run).

The attention backend vLLM chose is read from its own log, the one place every version states it: the trial
points VLLM_LOGGING_CONFIG_PATH at a logging config that sends vLLM's records to the trial's stderr (its log
file in the sweep directory) and to a scratch file, which the engine's worker processes inherit, and after
the engine is built takes the last "Using ... backend" line of that file ("unknown" when there is none).

Memory: the engine runs in worker processes, so this process cannot see its allocator; the metric is
device_memory_used_bytes (the whole device after the run, vLLM's preallocated share included), not
peak_memory_bytes. Correctness gate: none (vLLM returns no teacher-forced logits), so its trials are at best
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

from novainfer.ab.trial.engines import EngineUnavailable
from novainfer.ab.trial.environment import device_tags
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
            "enable_prefix_caching": False,
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
