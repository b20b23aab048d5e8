"""The flashattn backend: FlashAttention's paged forward over the core's BLOCK cache, no copy of it.

flash-attn-4 runs each layer's attention as one ``flash_attn.cute.flash_attn_varlen_func`` call over
the whole step (decodes and prefill chunks mixed), flash-attn 2 as ``flash_attn_with_kvcache`` over the
decodes and ``flash_attn_varlen_func(block_table=...)`` over the chunks; metadata.py says what each is
given. Per step, ``prepare_attention_metadata`` builds those arguments once (views of the engine's step
buffers, plus flash-attn 2's prefill offsets computed on the device); the per-layer hook only calls the
kernel. The KV write is left to the core's indexed scatter (this backend has no ``write_kv``): the
cache layout is the core's.

Compiles: flash-attn-4 compiles a kernel (CUTLASS Python DSL, seconds each) the first time it meets a
new variant, chosen from the dtype, head shape, and thresholds on the batch size and longest query.
Creating the backend calls it on every shape of ``metadata.warmup_shapes`` over a one-page dummy cache,
so the run compiles nothing; ``backend_counters`` reports the compiled kernels, which must not change
while a run is timed. flash-attn 2 ships compiled kernels; warm-up only loads them. Setting
FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1 lets flash-attn-4 keep compiled kernels on disk across runs.

CUDA graphs: both generations launch from the arguments' device tensors, and a CUDA-graph batch's
arguments are the engine's step buffers of its bucket with host bounds (1, max_model_len) that hold
for every replay, so a captured decode forward replays on any batch of its bucket.

Output: neither generation's public entry points take an output tensor (each allocates its own), so
``attention`` copies the result into the core's ``output``: one [rows, Hq, D] copy per call. Inside a
CUDA graph the library's allocation comes from the graph's pool at capture and is reused by every replay.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from novainfer.backend_api import AttentionContext, BackendError, StepBatch, hookimpl
from novainfer_flashattn.checks import Options
from novainfer_flashattn.metadata import MetadataBuilder, Rows, StepArgs, warmup_shapes

PACKAGES = {"4": "flash-attn-4", "2": "flash-attn 2"}


@dataclass(frozen=True)
class Kernels:
    """The FlashAttention entry points one generation is run through, called with keyword arguments.

    varlen: flash_attn_varlen_func; flash-attn-4's returns (out, lse), flash-attn 2's out.
    with_kvcache: flash-attn 2's flash_attn_with_kvcache; None for flash-attn-4.
    compiled: flash-attn-4: how many kernels its in-process JIT caches hold (compiled, or loaded from its
        disk cache, in this process by anyone); None for flash-attn 2.
    """

    generation: str
    varlen: Callable[..., Any]
    with_kvcache: Callable[..., Any] | None = None
    compiled: Callable[[], int] | None = None


def load_kernels(generation: str) -> Kernels:
    """Import the generation's package: the only place this plugin does."""
    if generation == "4":
        from flash_attn.cute import interface

        # Each compiling entry point keeps its kernels in a `compile_cache` attribute: a dict in early
        # 4.0 betas, a JITCache (its dict in `.cache`) later.
        caches = [fn.compile_cache for fn in vars(interface).values() if hasattr(fn, "compile_cache")]
        return Kernels(
            "4", interface.flash_attn_varlen_func,
            compiled=lambda: sum(len(getattr(cache, "cache", cache)) for cache in caches),
        )
    from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache

    return Kernels("2", flash_attn_varlen_func, with_kvcache=flash_attn_with_kvcache)


class FlashAttnBackend:
    """Answers the attention hooks for one engine, on one FlashAttention generation."""

    def __init__(self, context: AttentionContext, options: Options, kernels: Kernels) -> None:
        self.context = context
        self.options = options
        self.kernels = kernels
        self.generation = kernels.generation
        self.builder = MetadataBuilder(self.generation, context.max_num_seqs, context.device)
        self.warmup_calls = 0
        self._warm_up()

    def _warm_up(self) -> None:
        """Call the kernels on every shape a run can bring (flash-attn-4) or on each call kind (flash-attn 2).

        Each shape is a step of seqs - 1 decodes and one sequence of `longest` new tokens over a cache of
        one block, which every page-table entry points at; a decode-only shape also runs as a CUDA-graph
        batch (bounds 1 and max_model_len, as the core sets them). The arguments come from the same builder
        as a run's.
        """
        ctx = self.context
        device = ctx.device
        kv = torch.zeros(2, 1, ctx.block_size, ctx.num_kv_heads, ctx.head_dim, dtype=ctx.dtype, device=device)
        longest_chunk = min(ctx.max_num_batched_tokens, ctx.max_model_len)
        if self.generation == "4":
            shapes = warmup_shapes(ctx.max_num_seqs, ctx.max_num_batched_tokens, longest_chunk)
        else:
            shapes = [(1, 1), (2, min(2, longest_chunk))]  # decodes alone; a decode beside a chunk
        width = -(-ctx.max_model_len // ctx.block_size)
        rows = max(seqs - 1 + longest for seqs, longest in shapes)
        query = torch.zeros(rows, ctx.num_q_heads, ctx.head_dim, dtype=ctx.dtype, device=device)
        output = torch.empty_like(query)
        try:
            for seqs, longest in shapes:
                steps = [dummy_batch([1] * (seqs - 1) + [longest], width, ctx.block_size, device)]
                if longest == 1:  # as a graph batch too: the core sets its flag and its bound, nothing else
                    steps.append(replace(steps[0], cuda_graph=True, max_seq_len=ctx.max_model_len))
                for step in steps:
                    self.attention(query=query[: step.num_tokens], kv_cache=kv, metadata=self.builder.build(step),
                                   scale=ctx.head_dim**-0.5, output=output[: step.num_tokens])
                    self.warmup_calls += 1
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        except Exception as error:
            # Re-raised with the shape and generation, which the library's own assertion leaves out.
            raise BackendError(
                f"flashattn: {PACKAGES[self.generation]} cannot run {ctx.num_q_heads} query / {ctx.num_kv_heads} "
                f"KV heads of dim {ctx.head_dim} in {ctx.dtype}, block size {ctx.block_size}: "
                f"{type(error).__name__}: {error}"
            ) from error

    @hookimpl
    def cuda_graph_unsupported(self) -> str | None:
        return None  # capturable: see the module docstring

    @hookimpl
    def prepare_attention_metadata(self, batch: StepBatch) -> StepArgs:
        return self.builder.build(batch)

    @hookimpl
    def attention(
        self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: StepArgs, scale: float, output: torch.Tensor
    ) -> bool:
        # Each call's result is copied into `output`: neither generation takes one (see the module's docstring).
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        if metadata.every is not None:
            rows = metadata.every
            out, _ = self.kernels.varlen(
                q=query, k=k_cache, v=v_cache, cu_seqlens_q=rows.cu_seqlens_q, seqused_k=rows.seqused_k,
                page_table=rows.page_table, max_seqlen_q=rows.max_seqlen_q, max_seqlen_k=rows.max_seqlen_k,
                softmax_scale=scale, causal=True,
            )
            output.copy_(out)
            return True
        num_decodes = metadata.num_decodes
        if metadata.decodes is not None:
            rows = metadata.decodes
            out = self.kernels.with_kvcache(
                q=query[:num_decodes].unsqueeze(1), k_cache=k_cache, v_cache=v_cache, cache_seqlens=rows.seqused_k,
                block_table=rows.page_table, softmax_scale=scale, causal=True,
            )
            output[:num_decodes].copy_(out.squeeze(1))
        if metadata.prefills is not None:
            out = self._prefill_fa2(query[num_decodes:], k_cache, v_cache, metadata.prefills, scale)
            output[num_decodes:].copy_(out)
        return True

    def _prefill_fa2(
        self, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, rows: Rows, scale: float
    ) -> torch.Tensor:
        return self.kernels.varlen(
            q=query, k=k_cache, v=v_cache, cu_seqlens_q=rows.cu_seqlens_q, cu_seqlens_k=rows.cu_seqlens_k,
            max_seqlen_q=rows.max_seqlen_q, max_seqlen_k=rows.max_seqlen_k, softmax_scale=scale, causal=True,
            block_table=rows.page_table,
        )

    @hookimpl
    def backend_counters(self) -> dict[str, int]:
        """Cumulative counts; the runner logs their change over the timed window, which must be 0.

        flashattn_compiled_kernels: flash-attn-4 only: kernels its JIT caches hold in this process
            (compiled, or loaded from its disk cache), by anyone. Warm-up meets every variant a run can
            need, so it changes afterwards only if warm-up missed one.
        flashattn_warmup_calls: kernel calls warm-up made (one per shape and bound); fixed after creation.
        """
        counters = {"flashattn_warmup_calls": self.warmup_calls}
        if self.kernels.compiled is not None:
            counters["flashattn_compiled_kernels"] = self.kernels.compiled()
        return counters


def dummy_batch(query_lens: list[int], width: int, block_size: int, device: torch.device) -> StepBatch:
    """An eager step of one sequence per query length, each holding just its new tokens, all in block 0.

    Sequences of one token count as decodes. Only the fields the attention metadata reads are filled.
    """
    lens = torch.tensor(query_lens, dtype=torch.int32)
    starts = torch.zeros(len(query_lens) + 1, dtype=torch.int32)
    torch.cumsum(lens, 0, out=starts[1:])
    tables = torch.zeros(len(query_lens), width, dtype=torch.int32)
    tokens = int(starts[-1])
    empty = torch.zeros(tokens, dtype=torch.int64, device=device)
    return StepBatch(
        input_ids=empty, positions=empty, slot_mapping=empty, query_start_loc=starts.to(device),
        seq_lens=lens.to(device), block_tables=tables.to(device), query_start_loc_cpu=starts, seq_lens_cpu=lens,
        block_tables_cpu=tables, logits_indices=empty, num_decodes=sum(n == 1 for n in query_lens),
        num_actual_seqs=len(query_lens), max_query_len=max(query_lens), max_seq_len=max(query_lens),
        block_size=block_size,
    )
