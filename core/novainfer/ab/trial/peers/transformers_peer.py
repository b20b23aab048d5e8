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

Correctness gate: transformers' model forward over each whole gate sequence (the workload's first requests, their
prompts cut to GATE_PROMPT_LEN tokens, then GATE_OUTPUT_LEN teacher-forced tokens), against our engine's
teacher-forced logits on the same checkpoint, both in float32 on the trial's device, every row compared on its
own. It proves the peer runs the same model on the same weights; it does not run the paged attention of
continuous batching (the per-request caliber check covers that path's lengths only). float32 because two
correct implementations of one model disagree by about 2e-2 in bfloat16 (rounding at different points in every
layer), above the gate's threshold, while in float32 they agree to about 1e-6.
"""

from __future__ import annotations

import dataclasses
import gc
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from novainfer import LLM
from novainfer.ab.trial.engines import EngineUnavailable
from novainfer.ab.trial.environment import device_tags, package_version, peak_memory_bytes
from novainfer.ab.trial.gate import REFERENCE_BACKEND, REFERENCE_OPTIONS, GateReport, KindCoverage, forced_sequences
from novainfer.ab.trial.peers.base import PeerEngine
from novainfer.ab.wire import GateSettings, TrialRequest
from novainfer.engine import resolve_dtype
from novainfer.models.presets import Qwen2Config

GATE_METHOD = (
    "float32 model forward (not the paged path) against the core's reference: logits of every row within max_rel_err"
)
GATE_SEQS = 4
GATE_PROMPT_LEN = 64
GATE_OUTPUT_LEN = 16
# How long one wait for a result may take before the manager's health is checked again.
_POLL_S = 1.0


def open_engine(request: TrialRequest) -> TransformersEngine:
    return TransformersEngine(request)


class TransformersEngine(PeerEngine):
    name = "transformers"
    package = "transformers"

    def __init__(self, request: TrialRequest) -> None:
        super().__init__(request)
        self.manager: Any = None

    def gate(self, settings: GateSettings, prompts: list[list[int]], seed: int) -> GateReport:
        """Per-row relative error of transformers' logits against our reference, teacher-forced, on the
        bench.py prompts (the whole model forward has no step shapes to sample: `prompts` and `seed` unused)."""
        started = time.perf_counter()
        config, device = self.config, self.device
        n = min(GATE_SEQS, self.workload.num_seqs)
        prompts = [p[:GATE_PROMPT_LEN] for p in self.workload.prompts()[:n]]
        vocab = Qwen2Config.from_dir(self.model_dir).vocab_size
        sequences = forced_sequences(prompts, [GATE_OUTPUT_LEN] * n, vocab)
        continuations = [seq[len(p) :] for seq, p in zip(sequences, prompts)]
        reference = LLM(
            str(self.model_dir), backend=REFERENCE_BACKEND, backend_options=REFERENCE_OPTIONS, dtype="float32",
            device=config.device, block_size=config.block_size, max_model_len=config.max_model_len,
            max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
            kv_cache_capacity=n * (GATE_PROMPT_LEN + GATE_OUTPUT_LEN + config.block_size),
        )
        expected = reference.teacher_forced_logits(prompts, continuations)
        del reference
        model = _load(self.model_dir, torch.float32, "sdpa", device)
        report = GateReport({"model-forward": KindCoverage(run_steps=0)}, method=GATE_METHOD, bar=settings.max_rel_err)
        report.setup_seconds = time.perf_counter() - started
        with torch.inference_mode():
            for prompt, continuation, want in zip(prompts, continuations, expected):
                ids = torch.tensor([prompt + continuation], device=device)
                # Position i predicts token i + 1: the rows that predict the continuation.
                logits = model(ids).logits[0, len(prompt) - 1 : len(prompt) + len(continuation) - 1].float().cpu()
                errors = (logits - want).norm(dim=-1) / want.norm(dim=-1).clamp_min(1e-30)
                report.judge(("model-forward",), errors, None, settings)
        del model
        _free(device)
        report.seconds = time.perf_counter() - started
        return report

    def start(self) -> None:
        try:
            from transformers import ContinuousBatchingConfig, GenerationConfig
            from transformers.generation.continuous_batching.utils import WorkloadHints
        except ImportError as error:
            raise EngineUnavailable(
                f"transformers {package_version('transformers')} lacks the continuous-batching API this peer uses "
                f"(written for 5.24): {error}"
            ) from None
        config, device = self.config, self.device
        dtype = resolve_dtype(config.dtype, device)
        attn = self.options["attn_implementation"]
        try:
            model = _load(self.model_dir, dtype, attn, device)
        except ImportError as error:  # the implementation's kernel package is absent, like a backend of ours
            detail = " ".join(str(error).split())
            raise EngineUnavailable(f"transformers cannot run attn_implementation {attn!r} here: {detail}") from None
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
        self.manager = manager
        self.params["transformers.attn_implementation"] = attn
        self.params.update({f"transformers.{k}": str(v) for k, v in args.items()})
        resolved = manager.continuous_batching_config
        varlen, decode = resolved.use_cuda_graph
        self.tags.update(
            device_tags(device),
            # What ran, after the manager's own choices (it maps "eager" to "paged|eager").
            attention_backend=str(model.config._attn_implementation),
            cuda_graphs_mode=f"varlen={varlen}, decode={decode}, async_batching={resolved.use_async_batching}",
        )
        self.num_blocks = resolved.num_blocks

    def generate(
        self, prompts: list[list[int]], output_lens: list[int], on_tokens: Callable[[int], None]
    ) -> list[list[int]]:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        ids = [
            self.manager.add_request(prompt, max_new_tokens=n, eos_token_id=-1)
            for prompt, n in zip(prompts, output_lens)
        ]
        produced: dict[str, list[int]] = {}
        while len(produced) < len(ids):
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
            produced[result.request_id] = list(result.generated_tokens)
            on_tokens(len(produced[result.request_id]))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return [produced[i] for i in ids]

    def end_timed(self) -> dict[str, float]:
        return {"peak_memory_bytes": peak_memory_bytes(self.device), "kv_cache_blocks": self.num_blocks}

    def close(self) -> None:
        if self.manager is not None:
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
