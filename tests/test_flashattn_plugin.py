"""The flashattn plugin where CI runs it: no GPU, neither flash-attn-4 nor flash-attn.

Checked here for real: the kernel arguments each step gets (page table rows, seqused_k, cu_seqlens_q,
flash-attn 2's prefill offsets, the padded CUDA-graph rows and bounds) against the engine's own block
tables and slot mapping, by index arithmetic; the backend's dispatch run through the real engine with
FlashAttention's calls emulated from their documented semantics, against native's logits; that warm-up
meets every kernel variant a run does; the options, the availability reasons and flash-attn 2's
block-size rule; and the plugin installed by pip, found through its entry point and listed by
`nova-ab backends`. The kernels themselves are checked on a GPU by bench/check_flashattn_gpu.py.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import random
import subprocess
import sys
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from novainfer import LLM, SamplingParams
from novainfer.backend_api import (
    CONTRACT_VERSION,
    BackendError,
    BackendSpec,
    Capabilities,
    Settings,
    StepBatch,
    hookimpl,
)
from novainfer.backend_options import parse_options
from novainfer.testing import StepSeq, prepared
from novainfer.testing import batch as served_batch

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "plugins" / "flashattn"
# CI installs only the core and the native plugin; the modules tested here import no FlashAttention.
if importlib.util.find_spec("novainfer_flashattn") is None:
    sys.path.insert(0, str(PLUGIN))

from novainfer_flashattn.backend import FlashAttnBackend, Kernels  # noqa: E402
from novainfer_flashattn.checks import (  # noqa: E402
    Options,
    block_size_reason,
    check,
    choose_generation,
    generation_reason,
)
from novainfer_flashattn.metadata import MetadataBuilder, Rows, StepArgs, warmup_shapes  # noqa: E402

MAX_MODEL_LEN = 256


@contextmanager
def engine_batch(llm: LLM, seqs: list[tuple[int, int, list[int]]], num_decodes: int) -> Iterator[StepBatch]:
    """The StepBatch the engine builds for a step of (cached tokens, new tokens, block table) per sequence, as
    served (novainfer.testing): a decode-only step is padded to its CUDA-graph size."""
    with prepared(llm, [StepSeq(c, n, blocks=tuple(table)) for c, n, table in seqs], num_decodes) as step:
        yield served_batch(llm, step)


@pytest.fixture(scope="module")
def tiny_llm() -> LLM:
    """Decode-only steps padded as CUDA-graph replays would be, run eagerly."""
    return LLM("random:qwen2-tiny", device="cpu", block_size=16, max_model_len=MAX_MODEL_LEN, max_num_seqs=8,
               max_num_batched_tokens=64, pad_decodes=True, warm_up=False)


def build(batch: StepBatch, generation: str) -> StepArgs:
    builder = MetadataBuilder(generation, batch.block_tables.shape[0] + 4, torch.device("cpu"))
    return builder.build(batch)


def flat(t: torch.Tensor) -> list[int]:
    return t.reshape(-1).tolist()


def check_rows(batch: StepBatch, rows: Rows, first_seq: int, first_row: int, max_model_len: int) -> None:
    """A call's arguments locate every query row's own key and every key of its sequence where the engine put them.

    first_seq, first_row: the call's sequence 0 is the batch's sequence first_seq, its query row 0 the
    step's row first_row.
    """
    bs = batch.block_size
    engine_tables = batch.block_tables_cpu
    count = rows.seqused_k.shape[0]
    assert rows.cu_seqlens_q.shape == (count + 1,) and rows.page_table.shape[0] == count
    assert all(t.dtype == torch.int32 for t in (rows.cu_seqlens_q, rows.seqused_k, rows.page_table))
    assert rows.page_table.stride(-1) == 1 and rows.cu_seqlens_q.stride(0) == 1 and rows.seqused_k.stride(0) == 1
    cu_q = rows.cu_seqlens_q.tolist()
    assert cu_q[0] == 0 and cu_q == sorted(cu_q)
    key_lens = rows.seqused_k.tolist()
    if rows.cu_seqlens_k is not None:
        cu_k = rows.cu_seqlens_k.tolist()
        assert cu_k[0] == 0 and [b - a for a, b in itertools.pairwise(cu_k)] == key_lens
    for b in range(count):
        seq = first_seq + b
        q_len, k_len = cu_q[b + 1] - cu_q[b], key_lens[b]
        assert 1 <= q_len <= k_len == int(batch.seq_lens_cpu[seq])
        assert q_len <= rows.max_seqlen_q and k_len <= rows.max_seqlen_k <= max_model_len
        # Every key of the sequence: its page is the engine's block for that position.
        pages = -(-k_len // bs)
        assert flat(rows.page_table[b, :pages]) == flat(engine_tables[seq, :pages])
        # Bottom-right causal: query i of the call's rows sits at key position k_len - q_len + i; that key
        # is in the slot the engine wrote this step's token to.
        step_rows = range(first_row + cu_q[b], first_row + cu_q[b + 1])
        positions = [k_len - q_len + i for i in range(q_len)]
        assert positions == [int(batch.positions[r]) for r in step_rows]
        slots = [int(rows.page_table[b, p // bs]) * bs + p % bs for p in positions]
        assert slots == [int(batch.slot_mapping[r]) for r in step_rows]


def check_step(batch: StepBatch, args: StepArgs, generation: str, num_real: int,
               max_model_len: int = MAX_MODEL_LEN) -> None:
    """Everything either generation will be told about a step, against the engine's tables and slots."""
    num_seqs = batch.num_seqs
    starts = batch.query_start_loc_cpu.tolist()
    assert args.num_decodes == (num_seqs if batch.cuda_graph else batch.num_decodes)
    assert all(starts[b + 1] - starts[b] == 1 for b in range(args.num_decodes))
    if generation == "4":
        assert args.decodes is None and args.prefills is None
        check_rows(batch, args.every, 0, 0, max_model_len)
        assert args.every.cu_seqlens_q.shape == (num_seqs + 1,) and starts[-1] == batch.num_tokens
        called = [args.every]
    else:
        assert args.every is None
        called = []
        if args.num_decodes:
            check_rows(batch, args.decodes, 0, 0, max_model_len)
            assert args.decodes.max_seqlen_q == 1 and args.decodes.seqused_k.shape == (args.num_decodes,)
            called.append(args.decodes)
        else:
            assert args.decodes is None
        if args.num_decodes < num_seqs:
            check_rows(batch, args.prefills, args.num_decodes, starts[args.num_decodes], max_model_len)
            assert args.prefills.seqused_k.shape == (num_seqs - args.num_decodes,)
            called.append(args.prefills)
        else:
            assert args.prefills is None
    if batch.cuda_graph:
        # Bounds every replay of the captured graph keeps; padding rows: one token at position 0 of block 0.
        assert all((rows.max_seqlen_q, rows.max_seqlen_k) == (1, max_model_len) for rows in called)
        rows = called[0]
        for b in range(num_real, num_seqs):
            assert int(rows.seqused_k[b]) == 1 and flat(rows.page_table[b]) == [0] * rows.page_table.shape[1]
            assert int(batch.slot_mapping[starts[b]]) == 0
    else:
        # Eager bounds are the step's own maxima, as tight as they come.
        assert max(rows.max_seqlen_q for rows in called) == batch.max_query_len
        assert max(rows.max_seqlen_k for rows in called) == batch.max_seq_len


# ---------------------------------------------------------------------------------------------------
# The metadata layout


def test_a_worked_example(tiny_llm: LLM) -> None:
    # Two decodes (17 and 1 tokens) and a 5-token chunk after 28 cached tokens, block size 16.
    with engine_batch(tiny_llm, [(16, 1, [5, 7]), (0, 1, [2]), (28, 5, [9, 3, 4])], num_decodes=2) as batch:
        fa4 = build(batch, "4")
        assert flat(fa4.every.cu_seqlens_q) == [0, 1, 2, 7]
        assert flat(fa4.every.seqused_k) == [17, 1, 33]
        assert [flat(fa4.every.page_table[b, :3]) for b in range(3)] == [[5, 7, 0], [2, 0, 0], [9, 3, 4]]
        assert (fa4.every.max_seqlen_q, fa4.every.max_seqlen_k) == (5, 33)
        check_step(batch, fa4, "4", num_real=3)
        fa2 = build(batch, "2")
        assert fa2.num_decodes == 2
        assert flat(fa2.decodes.seqused_k) == [17, 1]
        assert (fa2.decodes.max_seqlen_q, fa2.decodes.max_seqlen_k) == (1, 17)
        assert flat(fa2.prefills.cu_seqlens_q) == [0, 5] and flat(fa2.prefills.cu_seqlens_k) == [0, 33]
        assert flat(fa2.prefills.page_table[0, :3]) == [9, 3, 4]
        assert (fa2.prefills.max_seqlen_q, fa2.prefills.max_seqlen_k) == (5, 33)
        check_step(batch, fa2, "2", num_real=3)


def test_several_prefill_chunks_are_counted_from_zero(tiny_llm: LLM) -> None:
    with engine_batch(tiny_llm, [(31, 1, [4, 6]), (0, 7, [8]), (40, 8, [1, 2, 10]), (3, 1, [12])], 1) as batch:
        fa2 = build(batch, "2")
        assert flat(fa2.prefills.cu_seqlens_q) == [0, 7, 15, 16]
        assert flat(fa2.prefills.cu_seqlens_k) == [0, 7, 55, 59]
        check_step(batch, fa2, "2", num_real=4)
        check_step(batch, build(batch, "4"), "4", num_real=4)


@pytest.mark.parametrize("generation", ["4", "2"])
def test_a_padded_graph_batch_is_all_decodes_with_bounds_for_every_replay(tiny_llm: LLM, generation: str) -> None:
    # Five decodes: the engine pads them to its graph size 8.
    seqs = [(20, 1, [5, 6]), (3, 1, [7]), (9, 1, [8]), (16, 1, [9, 10]), (31, 1, [11, 12])]
    with engine_batch(tiny_llm, seqs, num_decodes=5) as batch:
        assert batch.cuda_graph and batch.num_seqs == 8 and batch.num_actual_seqs == 5
        args = build(batch, generation)
        rows = args.every if generation == "4" else args.decodes
        assert args.num_decodes == 8 and flat(rows.seqused_k) == [21, 4, 10, 17, 32, 1, 1, 1]
        assert (rows.max_seqlen_q, rows.max_seqlen_k) == (1, MAX_MODEL_LEN)
        check_step(batch, args, generation, num_real=5)


@pytest.mark.parametrize("generation", ["4", "2"])
def test_a_graph_buckets_arguments_keep_their_storage(tiny_llm: LLM, generation: str) -> None:
    """A captured graph reads its arguments at fixed addresses: two batches of one bucket must share them."""
    builder = MetadataBuilder(generation, 8, torch.device("cpu"))

    def pointers(args: StepArgs) -> list[tuple[int, tuple[int, ...]]]:
        rows = args.every or args.decodes
        return [(t.data_ptr(), tuple(t.shape)) for t in (rows.cu_seqlens_q, rows.seqused_k, rows.page_table)]

    # Three short decodes and four long ones: both padded to the engine's graph size 4.
    with engine_batch(tiny_llm, [(0, 1, [5]), (2, 1, [6]), (4, 1, [7])], 3) as batch:
        short = pointers(builder.build(batch))
    long_seqs = [(100, 1, [5, 6, 7, 8, 9, 10, 11]), (40, 1, [1, 2, 3]), (50, 1, [12, 13, 14, 15]), (20, 1, [16, 17])]
    with engine_batch(tiny_llm, long_seqs, 4) as batch:
        assert batch.num_seqs == 4
        long = pointers(builder.build(batch))
    assert short == long


def test_flash_attn_2_prefill_offsets_live_in_the_builders_buffers(tiny_llm: LLM) -> None:
    builder = MetadataBuilder("2", 8, torch.device("cpu"))
    with engine_batch(tiny_llm, [(0, 9, [1]), (4, 3, [2])], 0) as batch:
        first = builder.build(batch).prefills
    with engine_batch(tiny_llm, [(7, 1, [3]), (0, 20, [4, 5])], 1) as batch:
        second = builder.build(batch).prefills
    assert first.cu_seqlens_q.data_ptr() == second.cu_seqlens_q.data_ptr() == builder.prefill_cu_seqlens_q.data_ptr()
    assert first.cu_seqlens_k.data_ptr() == second.cu_seqlens_k.data_ptr() == builder.prefill_cu_seqlens_k.data_ptr()
    assert flat(second.cu_seqlens_q) == [0, 20] and flat(second.cu_seqlens_k) == [0, 20]


@pytest.mark.parametrize("block_size", [1, 3, 16])
def test_every_step_of_a_run_matches_the_engines_slots(block_size: int) -> None:
    """A real run: chunked prefills, mixed steps, and decode steps padded to graph buckets (run eagerly)."""
    rng = random.Random(block_size)
    builders = {g: MetadataBuilder(g, 12, torch.device("cpu")) for g in ("4", "2")}
    seen = {"mixed": 0, "padded": 0, "prefill-only": 0}

    class Checked:
        """Sees every batch the engine hands the backend's hooks (a hook wrapper, as novainfer.observers)."""

        @hookimpl(wrapper=True)
        def prepare_attention_metadata(self, batch: StepBatch) -> Generator[None, Any, Any]:
            for generation, builder in builders.items():
                check_step(batch, builder.build(batch), generation, num_real=batch.num_actual_seqs, max_model_len=96)
            seen["mixed"] += bool(batch.num_decodes and batch.num_prefills and not batch.cuda_graph)
            seen["padded"] += batch.cuda_graph and batch.num_actual_seqs < batch.num_seqs
            seen["prefill-only"] += batch.num_decodes == 0
            return (yield)

    # No warm-up: its dummy step would be counted among the run's.
    llm = LLM("random:qwen2-tiny", device="cpu", block_size=block_size, max_model_len=96, max_num_seqs=12,
              max_num_batched_tokens=24, pad_decodes=True, warm_up=False, observers=[Checked()])
    prompts = [[rng.randrange(10000) for _ in range(rng.randint(1, 40))] for _ in range(10)]
    llm.generate(prompts, [SamplingParams(max_tokens=rng.randint(1, 20), ignore_eos=True) for _ in prompts])
    assert all(seen.values()), seen


# ---------------------------------------------------------------------------------------------------
# The backend through the engine, FlashAttention's calls emulated


def paged_causal(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, table: torch.Tensor, length: int,
                 scale: float) -> torch.Tensor:
    """Queries q [n, Hq, D] at the last n of `length` keys, which page table row `table` locates."""
    page_size = k_cache.shape[1]
    pos = torch.arange(length)
    pages, offsets = table[pos // page_size].long(), pos % page_size
    k, v = k_cache[pages, offsets].float(), v_cache[pages, offsets].float()  # [length, Hkv, D]
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    n = q.shape[0]
    visible = pos[None, :] <= (length - n + torch.arange(n))[:, None]  # causal, aligned bottom-right
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).to(q.dtype)


def check_int32(*tensors: torch.Tensor) -> None:
    assert all(t.dtype == torch.int32 and t.stride(-1) == 1 for t in tensors)


class EmulatedKernels:
    """flash-attn-4's and flash-attn 2's paged entry points as their docstrings define them, in PyTorch.

    Each asserts the contract the library checks (shapes, int32 indices, bounds, flash-attn 2's page
    size rule). flash-attn-4's `compiled` counts variants keyed like the library's compile key: by
    thresholds on the batch size and on the longest query times the query heads per KV head.
    """

    def __init__(self) -> None:
        self.variants: set[tuple[bool, bool, bool]] = set()
        self.calls: list[str] = []

    def kernels(self, generation: str) -> Kernels:
        if generation == "4":
            return Kernels("4", self.fa4_varlen, compiled=lambda: len(self.variants))
        return Kernels("2", self.fa2_varlen, with_kvcache=self.fa2_with_kvcache)

    def fa4_varlen(self, *, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                   seqused_k: torch.Tensor, page_table: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                   softmax_scale: float, causal: bool) -> tuple[torch.Tensor, None]:
        batch = seqused_k.shape[0]
        assert causal and k.shape == v.shape and k.dim() == 4 and cu_seqlens_q.shape == (batch + 1,)
        assert page_table.shape[0] == batch and int(cu_seqlens_q[-1]) == q.shape[0]
        check_int32(cu_seqlens_q, seqused_k, page_table)
        group = q.shape[1] // k.shape[2]
        self.variants.add((batch > 3, max_seqlen_q * group > 5, max_seqlen_q == 1))
        self.calls.append("fa4")
        out = torch.empty_like(q)
        for b in range(batch):
            r0, r1, length = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1]), int(seqused_k[b])
            assert r1 - r0 <= max_seqlen_q and length <= max_seqlen_k
            out[r0:r1] = paged_causal(q[r0:r1], k, v, page_table[b], length, softmax_scale)
        return out, None

    def fa2_with_kvcache(self, *, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         cache_seqlens: torch.Tensor, block_table: torch.Tensor, softmax_scale: float,
                         causal: bool) -> torch.Tensor:
        batch = q.shape[0]
        assert causal and k_cache.shape[1] % 256 == 0, "Paged KV cache block size must be divisible by 256"
        assert cache_seqlens.shape == (batch,) and block_table.shape[0] == batch
        check_int32(cache_seqlens, block_table)
        self.calls.append("fa2 with_kvcache")
        out = torch.empty_like(q)
        for b in range(batch):
            out[b] = paged_causal(q[b], k_cache, v_cache, block_table[b], int(cache_seqlens[b]), softmax_scale)
        return out

    def fa2_varlen(self, *, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                   cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float,
                   causal: bool, block_table: torch.Tensor) -> torch.Tensor:
        batch = block_table.shape[0]
        assert causal and k.shape[1] % 256 == 0, "Paged KV cache block size must be divisible by 256"
        assert cu_seqlens_q.shape == cu_seqlens_k.shape == (batch + 1,) and int(cu_seqlens_q[-1]) == q.shape[0]
        check_int32(cu_seqlens_q, cu_seqlens_k, block_table)
        self.calls.append("fa2 varlen")
        out = torch.empty_like(q)
        for b in range(batch):
            r0, r1 = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
            length = int(cu_seqlens_k[b + 1] - cu_seqlens_k[b])
            assert r1 - r0 <= max_seqlen_q and length <= max_seqlen_k
            out[r0:r1] = paged_causal(q[r0:r1], k, v, block_table[b], length, softmax_scale)
        return out


class EmulatedPlugin:
    """The real FlashAttnBackend (metadata, dispatch, warm-up, counters) on the emulated kernels."""

    def __init__(self, generation: str) -> None:
        self.generation = generation
        self.emulated = EmulatedKernels()
        self.instances: list[FlashAttnBackend] = []

    def create(self, context: Any) -> FlashAttnBackend:
        backend = FlashAttnBackend(context, Options(self.generation), self.emulated.kernels(self.generation))
        self.instances.append(backend)
        return backend

    @hookimpl
    def register_backends(self, register: Callable[[BackendSpec], None]) -> None:
        register(BackendSpec(f"flashattn-emulated-{self.generation}", self.create,
                             Capabilities(devices=("cpu",), dtypes=("float32",), cuda_graphs=True),
                             contract_version=CONTRACT_VERSION))


@pytest.mark.parametrize(
    ("generation", "block_size", "prompt_lens"),
    # flash-attn 2 pages in blocks of 256: prompts long enough to span several, chunked across steps.
    [("4", 16, (2, 60)), ("4", 1, (2, 30)), ("2", 256, (200, 700))],
    ids=["fa4-block16", "fa4-block1", "fa2-block256"],
)
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "cuda-graph-padding"])
def test_the_backend_gives_the_native_logits(generation: str, block_size: int, prompt_lens: tuple[int, int],
                                            graphs: bool) -> None:
    rng = random.Random(block_size)
    settings = dict(device="cpu", dtype="float32", block_size=block_size, max_model_len=1024, max_num_seqs=6,
                    max_num_batched_tokens=128)
    prompts = [[rng.randrange(10000) for _ in range(rng.randint(*prompt_lens))] for _ in range(7)]
    continuations = [[rng.randrange(10000) for _ in range(6)] for _ in prompts]
    plugin = EmulatedPlugin(generation)
    native = LLM("random:qwen2-tiny", backend_options={"kernels": "torch"}, **settings)
    # With graphs, the padded CUDA-graph decode path, run eagerly.
    emulated = LLM("random:qwen2-tiny", backend=f"flashattn-emulated-{generation}", plugins=[plugin],
                   pad_decodes=graphs, **settings)
    before = emulated.backend_counters()
    calls_before = len(plugin.emulated.calls)
    want = native.teacher_forced_logits(prompts, continuations)
    got = emulated.teacher_forced_logits(prompts, continuations)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-4)
    calls = set(plugin.emulated.calls[calls_before:])
    assert calls == ({"fa4"} if generation == "4" else {"fa2 with_kvcache", "fa2 varlen"})
    # Warm-up met every kernel variant the run did: nothing "compiled" while it ran.
    assert emulated.backend_counters() == before
    if generation == "4":
        assert before["flashattn_compiled_kernels"] == len(plugin.emulated.variants) > 1


def test_warm_up_lands_on_both_sides_of_every_threshold() -> None:
    """Variants keyed by a batch-size and a longest-query threshold anywhere in the limits: warm-up meets
    every variant a step meets, but a step just under the token budget past both thresholds at once."""
    max_seqs, max_tokens, longest = 24, 100, 90
    shapes = warmup_shapes(max_seqs, max_tokens, longest)
    assert (1, 1) in shapes and (24, 1) in shapes and (1, 90) in shapes and (8, 64) in shapes and (24, 77) in shapes
    assert all(1 <= seqs <= max_seqs and 1 <= query <= longest for seqs, query in shapes)
    assert all(seqs - 1 + query <= max_tokens for seqs, query in shapes)
    assert len(shapes) == len(set(shapes)) < 60

    def reachable(seqs: int, query: int) -> bool:
        return seqs <= max_seqs and query <= longest and (seqs - 1 + query <= max_tokens or query == 1)

    steps = [(s, q) for s in range(1, max_seqs + 1) for q in range(1, longest + 1) if reachable(s, q)]
    for t_seqs, t_query in itertools.product(range(max_seqs), range(longest)):
        met = {(s > t_seqs, q > t_query) for s, q in shapes}
        for s, q in steps:
            past_both_with_room = reachable(min(2 * t_seqs + 2, max_seqs), min(2 * t_query + 2, longest))
            assert (s > t_seqs, q > t_query) in met or not past_both_with_room, (t_seqs, t_query, s, q)
    # Decode batches go past the token budget, as the engine's CUDA-graph buckets do.
    assert (200, 1) in warmup_shapes(200, 64, 64) and (128, 1) in warmup_shapes(200, 64, 64)


# ---------------------------------------------------------------------------------------------------
# Options and availability


def test_options_are_checked_with_the_valid_values() -> None:
    """The plugin declares its options' type; the core parses an arm's table into it (as the registry does before
    the backend is created). A number for the generation is the plugin's own rule: it means the same string."""

    def parse(raw: dict[str, Any]) -> Any:
        return parse_options("flashattn", Options, raw)

    assert parse({}) == Options("auto")
    assert parse({"generation": "4"}) == Options("4") == parse({"generation": 4})
    assert parse({"generation": 2}) == Options("2")
    with pytest.raises(BackendError, match=r"^flashattn: unknown backend option\(s\) kernels; known: generation$"):
        parse({"kernels": "triton"})
    with pytest.raises(BackendError, match=r"^flashattn: generation must be one of auto, 4, 2, got '3'$"):
        parse({"generation": "3"})
    with pytest.raises(BackendError, match=r"^flashattn: generation must be one of auto, 4, 2, got True$"):
        parse({"generation": True})


FA4_MISSING = "flash-attn-4 is not installed (pip install 'novainfer-plugin-flashattn[fa4]')"
FA2_MISSING = "flash-attn is not installed (pip install --no-build-isolation 'novainfer-plugin-flashattn[fa2]')"
NEITHER = (
    "neither flash-attn-4 nor flash-attn is installed (pip install 'novainfer-plugin-flashattn[fa4]' for "
    "Hopper/Blackwell, pip install --no-build-isolation 'novainfer-plugin-flashattn[fa2]' for Ampere+)"
)
BLOCK_16 = "flash-attn 2 pages the KV cache only in blocks of a multiple of 256 tokens, not 16 (flash-attn-4 takes " \
           "any block size)"
FA4_GPU = "flash-attn-4 pages the KV cache on compute capability 9.x (Hopper) and 10.x/11.x (Blackwell) only; "


def test_the_block_size_rule_of_flash_attn_2() -> None:
    assert block_size_reason(16) == BLOCK_16
    assert block_size_reason(128).startswith("flash-attn 2 pages the KV cache only in blocks of a multiple of 256")
    assert all(block_size_reason(n) is None for n in (256, 512, 768, 4096))
    # Only the flash-attn 2 arm has the rule; it is left out while the block size is unknown.
    assert generation_reason("2", "2.8.3", (9, 0), 16) == BLOCK_16
    assert generation_reason("2", "2.8.3", (9, 0), 512) is None
    assert generation_reason("2", "2.8.3", (9, 0), None) is None
    assert generation_reason("4", "4.0.0b36", (9, 0), 1) is None
    # As the backend's settings check (BackendSpec.check): a file error wherever the sweep runs, before any trial;
    # "auto" is left to the machine (flash-attn-4 takes any block size).
    assert check(Settings("cuda", "bfloat16", 16, True, Options("2"))) == BLOCK_16
    assert check(Settings("cuda", "bfloat16", 512, True, Options("2"))) is None
    assert check(Settings("cuda", "bfloat16", 16, True, Options("auto"))) is None
    assert check(Settings("cuda", "bfloat16", 16, True, Options("4"))) is None


def test_availability_reasons() -> None:
    choose = choose_generation
    # Neither package, whatever the GPU.
    assert choose("auto", None, None, (9, 0), 16) == (None, NEITHER)
    assert choose("auto", None, None, None, None) == (None, NEITHER)
    # flash-attn-4 wherever it runs; any block size.
    assert choose("auto", "4.0.0b36", None, (9, 0), 16) == ("4", None)
    assert choose("auto", "4.0.0b5", "2.8.3", (10, 0), 1) == ("4", None)
    assert choose("auto", "4.0.0b36", None, None, 16) == (None, "needs a CUDA GPU; torch sees none")
    assert choose("auto", "4.0.0b36", None, (8, 0), 16) == (None, FA4_GPU + "this GPU has 8.0")
    assert choose("auto", "4.0.0b36", None, (12, 0), 16) == (None, FA4_GPU + "this GPU has 12.0")
    assert choose("auto", "4.0.0b3", None, (9, 0), 16) == (
        None, "flash-attn-4 4.0.0b3 is too old; needs 4.0.0b5 or newer"
    )
    # Only flash-attn 2: the block-size rule names itself.
    assert choose("auto", None, "2.8.3", (9, 0), 16) == (None, BLOCK_16)
    assert choose("auto", None, "2.8.3", (8, 0), 256) == ("2", None)
    assert choose("auto", None, "2.8.3", (7, 5), 256) == (
        None, "flash-attn 2 needs compute capability 8.0 or newer (Ampere+); this GPU has 7.5"
    )
    assert choose("auto", None, "2.5.9", (8, 0), 256) == (None, "flash-attn 2.5.9 is too old; needs 2.6 or newer")
    # Both installed: 4 where it runs, else 2 where it runs, else both reasons.
    assert choose("auto", "4.0.0b36", "2.8.3", (8, 6), 512) == ("2", None)
    assert choose("auto", "4.0.0b36", "2.8.3", (8, 6), 16) == (
        None, f"flash-attn-4: {FA4_GPU}this GPU has 8.6; flash-attn: {BLOCK_16}"
    )
    # A chosen generation is that generation or its reason, never the other one.
    assert choose("2", "4.0.0b36", "2.8.3", (9, 0), 16) == (None, BLOCK_16)
    assert choose("2", "4.0.0b36", None, (9, 0), 256) == (None, FA2_MISSING)
    assert choose("4", None, "2.8.3", (8, 0), 256) == (None, FA4_MISSING)
    assert choose("4", "4.0.0b36", "2.8.3", (9, 0), 256) == ("4", None)
    assert choose("4", "not-a-version", None, (9, 0), 16) == (
        None, "flash-attn-4 reports an unreadable version 'not-a-version'; needs 4.0.0b5 or newer"
    )


# ---------------------------------------------------------------------------------------------------
# Installed by pip, found through the entry point


@pytest.fixture(scope="module")
def plugin_site(pip_install: Callable[[Path], Path]) -> Path:
    return pip_install(PLUGIN)


def run_with_plugin(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """`python *args` in a fresh interpreter that sees the pip-installed plugin (and not the source tree)."""
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(site), "COLUMNS": "250", "MLFLOW_DISABLE_TELEMETRY": "true"},
    )


INSTALLED_CHECK = """
import json
import sys
import torch
from novainfer import LLM
from novainfer.backend_api import AttentionContext, BackendError
from novainfer.plugins import discover_backends

backend = discover_backends()["flashattn"]
caps = backend.spec.capabilities
result = {"plugin": backend.plugin, "version": backend.version, "devices": caps.devices, "graphs": caps.cuda_graphs,
          "block_sizes": caps.block_sizes, "reason": backend.spec.unavailable(),
          "module": sys.modules["novainfer_flashattn"].__file__}
try:
    LLM("random:qwen2-tiny", device="cpu", backend="flashattn")
except BackendError as error:
    result["engine"] = str(error)
for name, options in (("bad option", {"generation": "3"}), ("no package", {})):
    context = AttentionContext(
        12, 2, 128, 1, 16, 8, 4, 64, 128, 8, torch.bfloat16, torch.device("cuda"), options=options
    )
    try:
        backend.spec.create(context)
    except BackendError as error:
        result[name] = str(error)
result["imported"] = sorted(m for m in sys.modules if m.split(".")[0] in ("flash_attn", "cutlass"))
print(json.dumps(result))
"""


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="checks the reasons without it")
def test_pip_installed_plugin_is_found_and_says_why_it_cannot_run(plugin_site: Path, tmp_path: Path) -> None:
    result = run_with_plugin(plugin_site, tmp_path, "-c", INSTALLED_CHECK)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert found["plugin"] == "novainfer-plugin-flashattn" and found["version"] == "0.1.0"
    assert Path(found["module"]).is_relative_to(plugin_site)
    assert found["devices"] == ["cuda"] and found["graphs"] is True and found["block_sizes"] is None
    assert found["reason"] == NEITHER
    assert found["engine"].startswith(f"backend 'flashattn' is not available: {NEITHER}; available backends: ")
    assert found["bad option"] == "flashattn: generation must be one of auto, 4, 2, got '3'"
    assert found["no package"] == f"flashattn: {NEITHER}"
    assert found["imported"] == []
    listing = run_with_plugin(plugin_site, tmp_path, "-m", "novainfer.ab.sweep.cli", "backends")
    assert listing.returncode == 0, listing.stderr
    row = next(line for line in listing.stdout.splitlines() if "novainfer-plugin-flashattn" in line)
    assert row.split()[1] == "flashattn" and "neither flash-attn-4 nor flash-attn is installed" in row
