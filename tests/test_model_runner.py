"""The model runner's step buffers are reused every step, and its warm-up runs the largest step."""

from __future__ import annotations

from typing import Any

import torch

from novainfer import LLM, SamplingParams
from novainfer.backend_api import AttentionContext, BackendSpec, Capabilities, StepBatch, hookimpl

LIMITS = dict(device="cpu", max_model_len=48, max_num_seqs=6, max_num_batched_tokens=40, kv_cache_capacity=512)


class RecordingBackend:
    """Native attention, plus a record of every step's batch as the backend sees it."""

    def __init__(self, context: AttentionContext) -> None:
        from novainfer_native.backend import NativeBackend

        self.native = NativeBackend(context)
        self.batches: list[StepBatch] = []

    @hookimpl
    def prepare_attention_metadata(self, batch: StepBatch) -> Any:
        self.batches.append(batch)
        return self.native.prepare_attention_metadata(batch=batch)

    @hookimpl
    def attention(self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: Any, scale: float) -> torch.Tensor:
        return self.native.attention(query=query, kv_cache=kv_cache, metadata=metadata, scale=scale)


class RecordingPlugin:
    def __init__(self) -> None:
        self.backend: RecordingBackend | None = None

    def create(self, context: AttentionContext) -> RecordingBackend:
        self.backend = RecordingBackend(context)
        return self.backend

    @hookimpl
    def register_backends(self, register: Any) -> None:
        register(BackendSpec("recording", self.create, Capabilities(devices=("cpu",), dtypes=("float32",))))


def engine() -> tuple[LLM, RecordingBackend]:
    plugin = RecordingPlugin()
    llm = LLM("random:qwen2-tiny", backend="recording", plugins=[plugin], **LIMITS)
    assert plugin.backend is not None
    return llm, plugin.backend


def test_warm_up_runs_the_largest_step_the_limits_allow_in_the_scratch_block() -> None:
    llm, backend = engine()
    assert len(backend.batches) == 1 and not llm.step_stats
    warm = backend.batches[0]
    assert warm.num_tokens == LIMITS["max_num_batched_tokens"]
    assert warm.num_seqs == LIMITS["max_num_seqs"]
    assert 0 < warm.num_decodes < warm.num_seqs  # decodes mixed with prefill chunks
    assert int(warm.block_tables.max()) == 0 and int(warm.slot_mapping.max()) < llm.config.block_size
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_usable_blocks  # none taken


def test_every_step_batch_is_a_view_of_the_same_persistent_buffers() -> None:
    llm, backend = engine()
    prompts = [[(7 * i + j) % 500 for j in range(5 + 9 * i)] for i in range(5)]
    llm.generate(prompts, SamplingParams(max_tokens=6, ignore_eos=True))
    buffers = llm.runner.buffers
    owners = {buffers.dev64.untyped_storage().data_ptr(), buffers.dev32.untyped_storage().data_ptr()}
    assert len(backend.batches) > 5
    for batch in backend.batches:
        for name in ("input_ids", "positions", "slot_mapping", "query_start_loc", "seq_lens", "block_tables",
                     "logits_indices", "seq_lens_cpu", "query_start_loc_cpu", "block_tables_cpu"):
            assert getattr(batch, name).untyped_storage().data_ptr() in owners, f"{name} was allocated"
