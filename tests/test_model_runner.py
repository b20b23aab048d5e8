"""The model runner's step and output buffers are reused every step, its warm-up runs the largest step, and its
graph API pads decode-only steps to their CUDA-graph size."""

from __future__ import annotations

from typing import Any

import torch

from novainfer import LLM, SamplingParams
from novainfer.backend_api import CONTRACT_VERSION, AttentionContext, BackendSpec, Capabilities, StepBatch, hookimpl
from novainfer.block_manager import scratch_sequence
from novainfer.cuda_graphs import capture_refusal
from novainfer.scheduler import ScheduledSeq, SchedulerOutput

LIMITS = dict(device="cpu", max_model_len=48, max_num_seqs=6, max_num_batched_tokens=40, kv_cache_capacity=512)


class RecordingBackend:
    """Native attention, plus a record of every step's batch as the backend sees it."""

    def __init__(self, context: AttentionContext) -> None:
        from novainfer_native.backend import NativeBackend

        self.context = context
        self.native = NativeBackend(context)
        self.batches: list[StepBatch] = []
        self.outputs: list[tuple[torch.Tensor, torch.Tensor]] = []  # (query, output) of every attention call

    @hookimpl
    def prepare_attention_metadata(self, batch: StepBatch) -> Any:
        self.batches.append(batch)
        return self.native.prepare_attention_metadata(batch=batch)

    @hookimpl
    def attention(
        self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: Any, scale: float, output: torch.Tensor
    ) -> bool:
        self.outputs.append((query, output))
        return self.native.attention(query=query, kv_cache=kv_cache, metadata=metadata, scale=scale, output=output)


class RecordingPlugin:
    def __init__(self) -> None:
        self.backend: RecordingBackend | None = None

    def create(self, context: AttentionContext) -> RecordingBackend:
        self.backend = RecordingBackend(context)
        return self.backend

    @hookimpl
    def register_backends(self, register: Any) -> None:
        register(
            BackendSpec(
                "recording",
                self.create,
                Capabilities(devices=("cpu",), dtypes=("float32",)),
                contract_version=CONTRACT_VERSION,
            )
        )


def engine(**settings: Any) -> tuple[LLM, RecordingBackend]:
    plugin = RecordingPlugin()
    llm = LLM("random:qwen2-tiny", backend="recording", plugins=[plugin], **LIMITS, **settings)
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


def test_warm_up_never_builds_a_step_longer_than_the_limits_allow_and_the_engine_serves() -> None:
    # Four sequences of at most 96 tokens cannot fill the default budget of 16384 tokens: warm-up's largest step
    # is theirs, 4 chunks of 96, not a budget's worth of over-long dummy prompts.
    plugin = RecordingPlugin()
    llm = LLM("random:qwen2-tiny-wide", backend="recording", plugins=[plugin], device="cpu", max_num_seqs=4,
              max_model_len=96)
    warm = plugin.backend.batches[0]
    assert (warm.num_tokens, warm.num_seqs, int(warm.seq_lens_cpu.max())) == (384, 4, 96)
    outputs = llm.generate([[1] * 90, [2] * 5], SamplingParams(max_tokens=6, ignore_eos=True))
    assert [len(o.token_ids) for o in outputs] == [6, 6]


def test_every_step_batch_is_a_view_of_the_same_persistent_buffers() -> None:
    llm, backend = engine()
    prompts = [[(7 * i + j) % 500 for j in range(5 + 9 * i)] for i in range(5)]
    llm.generate(prompts, SamplingParams(max_tokens=6, ignore_eos=True))
    buffers = llm.runner.buffers
    owners = {t.untyped_storage().data_ptr() for t in (buffers.dev64, buffers.dev32, *buffers.host64, *buffers.host32)}
    assert len(backend.batches) > 5
    for batch in backend.batches:
        for name in ("input_ids", "positions", "slot_mapping", "query_start_loc", "seq_lens", "block_tables",
                     "logits_indices", "seq_lens_cpu", "query_start_loc_cpu", "block_tables_cpu"):
            assert getattr(batch, name).untyped_storage().data_ptr() in owners, f"{name} was allocated"


def test_attention_writes_every_step_into_the_runners_one_output_buffer() -> None:
    llm, backend = engine()
    llm.generate([[3, 1, 4, 1, 5, 9, 2, 6], [5, 3]], SamplingParams(max_tokens=5, ignore_eos=True))
    buffer = llm.runner.attn_output
    assert len(backend.outputs) > 5 * llm.model_config.num_hidden_layers
    for query, output in backend.outputs:
        assert output.data_ptr() == buffer.data_ptr() and output.is_contiguous(), "the output was allocated"
        assert output.shape == query.shape and output.dtype == query.dtype


def test_padded_decode_steps_run_at_their_graph_size_through_the_runners_graph_api() -> None:
    llm, backend = engine(pad_decodes=True)
    runner, block_size = llm.runner, llm.config.block_size
    assert llm.graph_mode == runner.graph_mode == "padded (eager)" and runner.graph_sizes == (1, 2, 4, 6)

    def step(num_decodes: int, num_prefills: int = 0) -> SchedulerOutput:
        entries = [ScheduledSeq.of(scratch_sequence(1, block_size), 1) for _ in range(num_decodes)]
        entries += [ScheduledSeq.of(scratch_sequence(3, block_size), 3) for _ in range(num_prefills)]
        return SchedulerOutput.of(entries, num_decodes)

    assert [runner.bucket_for(step(n)) for n in range(1, 7)] == [1, 2, 4, 4, 6, 6]
    assert runner.bucket_for(step(2, num_prefills=1)) is None
    logits, hidden = runner.replay(runner.prepare(step(3), pad_to=4))
    assert logits.shape[0] == hidden.shape[0] == 4
    batch = backend.batches[-1]
    assert batch.cuda_graph and (batch.num_seqs, batch.num_actual_seqs, batch.num_decodes) == (4, 3, 4)
    eager, _ = engine()
    assert eager.graph_mode == "eager" and eager.runner.bucket_for(step(3)) is None


def test_graph_mode_says_why_decode_steps_run_eagerly_and_the_backend_knows_when_graph_batches_come() -> None:
    llm, backend = engine(cuda_graphs=True)
    assert llm.graph_mode == "eager (CUDA graphs need a CUDA device)" and not backend.context.cuda_graphs
    assert capture_refusal(torch.device("cuda"), llm.backend.spec) == "recording does not support CUDA graphs"
    padded, backend = engine(pad_decodes=True)
    assert backend.context.cuda_graphs and backend.context.cuda_graph_sizes == padded.runner.graph_sizes
