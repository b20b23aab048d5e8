"""The transformers peer: Hugging Face transformers' continuous batching, driven through its manager.

`generate_batch` takes one max_new_tokens for the whole batch, so the trial uses the manager it wraps
(`init_continuous_batching`), adding each request with its own max_new_tokens and EOS disabled (-1), and
collecting results until every request is finished. The manager is started (cache allocated, CUDA graphs
warmed up) before the warm-up requests, and the same manager serves the timed run. Written against
transformers 5.24 (ContinuousBatchingConfig, WorkloadHints) and run on 5.17 too (which names the page size
block_size and has no automatic switch to flash); a transformers without them is skipped.

Engine settings map onto ContinuousBatchingConfig:
    block_size             -> page_size (tokens per cache page; block_size before 5.24)
    max_num_batched_tokens -> max_batch_tokens
    max_num_seqs           -> max_requests_per_batch
    kv_cache_capacity      -> num_blocks = ceil(capacity / block_size); "auto" on CUDA leaves transformers to size
                              it, with gpu_memory_utilization as its max_memory_percent (a fraction of the memory
                              left after the weights, transformers' meaning); "auto" on the CPU takes what every
                              running sequence needs at full length, as our engine does (transformers would take
                              60% of the host's memory)
    max_model_len          -> WorkloadHints(max_prompt_length), which sizes the decode block table
    cuda_graphs            -> use_cuda_graph (on CUDA only)
    dtype, device          -> the model's
and, always: no prefix sharing (allow_block_sharing = False: our engine has none, and the warm-up requests,
which are the workload's first ones, would otherwise be cached for the timed run), no automatic switch to
flash attention (the arm measures the attn_implementation it names). `seed` does not apply: decoding is greedy.

Correctness gate: transformers' model forward over each whole gate sequence (prompt + continuation), against our
engine's teacher-forced logits on the same checkpoint, both in float32 on the trial's device. It proves the peer
runs the same model on the same weights; it does not run the paged attention of continuous batching (the
caliber check covers that path's lengths only). float32 because two correct implementations of one model
disagree by about 2e-2 in bfloat16 (rounding at different points in every layer), above the gate's threshold,
while in float32 they agree to about 1e-6.
"""

from __future__ import annotations

import dataclasses
import gc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from novainfer import LLM
from novainfer.ab.environment import package_version
from novainfer.ab.peers import PeerUnavailable
from novainfer.ab.trial import REFERENCE_BACKEND, REFERENCE_OPTIONS, GateSettings, peak_memory_bytes, relative_error
from novainfer.ab.workload import teacher_forcing_inputs
from novainfer.config import EngineConfig
from novainfer.engine import resolve_device, resolve_dtype
from novainfer.models.presets import Qwen2Config

GATE = f"float32 teacher-forced logits, transformers' forward against {REFERENCE_BACKEND}"
# The seed of the gate's inputs: correctness_gate's, so peers and our backends are checked on the same sequences.
GATE_SEED = 1234
# How long one wait for a result may take before the manager's health is checked again.
_POLL_S = 1.0


def correctness(config: EngineConfig, model_dir: Path, gate: GateSettings) -> float:
    """Largest relative error of transformers' logits against our native reference under teacher forcing."""
    device = resolve_device(config.device)
    prompts, continuations = teacher_forcing_inputs(
        seed=GATE_SEED, num_seqs=gate.num_seqs, prompt_len=gate.prompt_len, decode_steps=gate.decode_steps,
        vocab_size=Qwen2Config.from_dir(model_dir).vocab_size,
    )
    reference = LLM(
        str(model_dir), backend=REFERENCE_BACKEND, backend_options=REFERENCE_OPTIONS, dtype="float32",
        device=config.device, block_size=config.block_size, max_model_len=config.max_model_len,
        max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
        kv_cache_capacity=gate.num_seqs * (gate.prompt_len + gate.decode_steps + config.block_size),
    )
    expected = reference.teacher_forced_logits(prompts, continuations)
    del reference
    model = _load(model_dir, torch.float32, "sdpa", device)
    errors = []
    with torch.inference_mode():
        for prompt, continuation, want in zip(prompts, continuations, expected):
            ids = torch.tensor([prompt + continuation], device=device)
            # Position i predicts token i + 1: the rows that predict the continuation.
            logits = model(ids).logits[0, len(prompt) - 1 : len(prompt) + len(continuation) - 1]
            errors.append(relative_error(logits.float().cpu(), want))
    del model
    _free(device)
    return max(errors)


def start(config: EngineConfig, options: dict[str, Any], model_dir: Path) -> TransformersEngine:
    try:
        from transformers import ContinuousBatchingConfig, GenerationConfig
        from transformers.generation.continuous_batching.utils import WorkloadHints
    except ImportError as error:
        raise PeerUnavailable(
            f"transformers {package_version('transformers')} lacks the continuous-batching API this peer uses "
            f"(written for 5.24): {error}"
        ) from None
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    attn = options["attn_implementation"]
    try:
        model = _load(model_dir, dtype, attn, device)
    except ImportError as error:  # the implementation's kernel package is absent, like a backend of ours
        detail = " ".join(str(error).split())
        raise PeerUnavailable(f"transformers cannot run attn_implementation {attn!r} here: {detail}") from None
    if config.kv_cache_capacity != "auto":
        num_blocks: int | None = -(-config.kv_cache_capacity // config.block_size)
    elif device.type == "cpu":
        num_blocks = config.max_num_seqs * -(-config.max_model_len // config.block_size)
    else:
        num_blocks = None
    fields = {field.name for field in dataclasses.fields(ContinuousBatchingConfig)}
    args: dict[str, Any] = {
        "page_size" if "page_size" in fields else "block_size": config.block_size,
        "num_blocks": num_blocks,
        "max_batch_tokens": config.max_num_batched_tokens,
        "max_requests_per_batch": config.max_num_seqs,
        "max_memory_percent": config.gpu_memory_utilization if device.type == "cuda" else None,
        "use_cuda_graph": config.cuda_graphs and device.type == "cuda",
        "allow_block_sharing": False,
    }
    if "auto_switch_to_flash" in fields:  # 5.24's switch; older releases never switch
        args["auto_switch_to_flash"] = False
    manager = model.init_continuous_batching(
        generation_config=GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=0),
        continuous_batching_config=ContinuousBatchingConfig(**args),
        workload_hints=WorkloadHints(max_prompt_length=config.max_model_len, num_requests=config.max_num_seqs),
    )
    manager.warmup()  # allocates the cache and captures CUDA graphs: before any request, so never timed
    manager.start()
    params = {"transformers.attn_implementation": attn, **{f"transformers.{k}": str(v) for k, v in args.items()}}
    return TransformersEngine(manager, model, device, params)


class TransformersEngine:
    def __init__(self, manager: Any, model: Any, device: torch.device, params: dict[str, str]) -> None:
        self.manager = manager
        self.device = device
        self.params = params
        resolved = manager.continuous_batching_config
        varlen, decode = resolved.use_cuda_graph
        self.tags = {
            # What ran, after the manager's own choices (it maps "eager" to "paged|eager").
            "attention_backend": str(model.config._attn_implementation),
            "cuda_graphs_mode": f"varlen={varlen}, decode={decode}, async_batching={resolved.use_async_batching}",
        }
        self.num_blocks = resolved.num_blocks

    def generate(
        self, prompts: list[list[int]], output_lens: list[int], on_tokens: Callable[[int], None]
    ) -> list[int]:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        ids = [
            self.manager.add_request(prompt, max_new_tokens=n, eos_token_id=-1)
            for prompt, n in zip(prompts, output_lens)
        ]
        counts: dict[str, int] = {}
        while len(counts) < len(ids):
            result = self.manager.get_result(timeout=_POLL_S)
            if result is None:
                if not self.manager.is_running():
                    error = self.manager.background_thread_status.fatal_error
                    raise RuntimeError(f"transformers' generation loop stopped ({error!r}) with requests pending")
                continue
            if not result.is_finished():
                continue
            if result.error is not None:
                raise RuntimeError(f"transformers request {result.request_id} failed: {result.error}")
            counts[result.request_id] = len(result.generated_tokens)
            on_tokens(counts[result.request_id])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return [counts[i] for i in ids]

    def metrics(self) -> dict[str, float]:
        return {"peak_memory_bytes": peak_memory_bytes(self.device), "kv_cache_blocks": self.num_blocks}

    def close(self) -> None:
        self.manager.stop(block=True, timeout=30)
        self.manager.destroy()


def _load(model_dir: Path, dtype: torch.dtype, attn: str, device: torch.device) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=attn)
    return model.to(device).eval()


def _free(device: torch.device) -> None:
    """Return the gate's memory, so the engine started next sizes its cache without it."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
