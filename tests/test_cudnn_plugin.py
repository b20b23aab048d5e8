"""The cudnn plugin on the CPU (CI has no GPU and no cuDNN frontend).

What can be checked without cuDNN is checked here: the graph keys (every step the engine's limits allow
maps to a key built at start, and the set stays small), the per-step metadata layout in its persistent
buffers, the step's split into graph calls (run through the real engine with each graph call emulated
from cuDNN's documented semantics, against the native backend's logits), and the availability reason.
What needs the GPU (cuDNN accepting these graphs, their numbers, capture) is bench/check_cudnn_gpu.py.
"""

from __future__ import annotations

import importlib.util
import itertools
import math
import os
import random
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from novainfer import LLM
from novainfer.backend_api import (
    CONTRACT_VERSION,
    AttentionContext,
    BackendError,
    BackendSpec,
    Capabilities,
    StepBatch,
    cuda_graph_sizes,
    hookimpl,
)
from novainfer.backend_options import parse_options

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "plugins" / "cudnn"
# CI installs only the core and the native plugin; the modules tested here need neither cuDNN nor CUDA.
if importlib.util.find_spec("novainfer_cudnn") is None:
    sys.path.insert(0, str(PLUGIN))

from novainfer_cudnn import unavailable, unavailable_reason  # noqa: E402
from novainfer_cudnn.buckets import (  # noqa: E402
    GraphKey,
    GraphKeys,
    Limits,
    Options,
    StepPlan,
    plan_step,
    prebuilt_keys,
    resolve_prebuild,
)
from novainfer_cudnn.layout import GraphInputs, Layout  # noqa: E402

HEADLINE = Limits(max_num_seqs=256, max_num_batched_tokens=16384, max_model_len=4096, block_size=16)
SMALL_LIMITS = [
    Limits(max_num_seqs=4, max_num_batched_tokens=16, max_model_len=12, block_size=4),
    Limits(max_num_seqs=6, max_num_batched_tokens=9, max_model_len=40, block_size=2),
    Limits(max_num_seqs=3, max_num_batched_tokens=70, max_model_len=70, block_size=16),
    Limits(max_num_seqs=5, max_num_batched_tokens=8, max_model_len=8, block_size=16),
    Limits(max_num_seqs=2, max_num_batched_tokens=1, max_model_len=4, block_size=4),
]


# ---------------------------------------------------------------------------------------------------
# Graph keys


def reachable_steps(limits: Limits) -> list[tuple[int, tuple[int, ...]]]:
    """Every (decodes, prefill chunk lengths) a step can have: at most max_num_seqs sequences and
    max_num_batched_tokens tokens, chunks of 2 tokens (one is a decode) up to max_model_len."""
    longest = min(limits.max_num_batched_tokens, limits.max_model_len)
    steps = []
    for decodes in range(min(limits.max_num_seqs, limits.max_num_batched_tokens) + 1):
        budget = limits.max_num_batched_tokens - decodes
        for chunks in range(limits.max_num_seqs - decodes + 1):
            for lens in itertools.combinations_with_replacement(range(2, longest + 1), chunks):
                if decodes + chunks and sum(lens) <= budget:
                    steps.append((decodes, lens))
    return steps


def check_plan(keys: GraphKeys, decodes: int, lens: tuple[int, ...], plan: StepPlan) -> None:
    built = set(keys.all())
    assert plan.num_decodes == decodes
    if decodes:
        assert plan.decode in built and plan.decode.kind == "decode" and plan.decode.max_query_len == 1
        assert plan.decode.batch >= decodes
        # A CUDA-graph bucket gets a graph of exactly its size: no staging, nothing padded inside.
        assert plan.stages_decodes == (decodes not in keys.decode_batches)
    else:
        assert plan.decode is None
    if lens:
        assert plan.prefill in built and plan.prefill.kind == "prefill"
        assert plan.prefill.batch >= len(lens) and plan.prefill.max_query_len >= max(lens)
    else:
        assert plan.prefill is None


@pytest.mark.parametrize("limits", SMALL_LIMITS, ids=str)
def test_every_reachable_step_has_a_prebuilt_graph_and_every_graph_is_reachable(limits: Limits) -> None:
    keys = GraphKeys.for_limits(limits)
    used: set[GraphKey] = set()
    for decodes, lens in reachable_steps(limits):
        plan = plan_step(keys, decodes, len(lens), max(lens, default=0))
        check_plan(keys, decodes, lens, plan)
        used |= {key for key in (plan.decode, plan.prefill) if key is not None}
    assert set(prebuilt_keys(keys, "all")) >= used
    # Tight as well as complete: no graph is built that no step can use (each costs ~1.2 s at start), but
    # for the engine's CUDA-graph buckets, which it captures even past the token budget.
    unused = set(keys.all()) - used
    assert all(key.kind == "decode" and key.batch > limits.max_num_batched_tokens for key in unused), unused


@pytest.mark.parametrize("max_num_seqs", [1, 3, 24, 100, 256])
def test_decode_graphs_are_exactly_the_engine_cuda_graph_buckets(max_num_seqs: int) -> None:
    keys = GraphKeys.for_limits(Limits(max_num_seqs, 16384, 4096, 16))
    assert keys.decode_batches == cuda_graph_sizes(max_num_seqs)
    for bucket in cuda_graph_sizes(max_num_seqs):
        plan = plan_step(keys, bucket, 0, 0)
        assert plan.decode == GraphKey("decode", bucket, 1) and not plan.stages_decodes


def test_headline_limits_keep_the_key_set_small_and_cover_sampled_steps() -> None:
    keys = GraphKeys.for_limits(HEADLINE)
    assert len(keys.decode_batches) == 20
    assert keys.prefill_batches == (1, 4, 16, 64, 256) and keys.prefill_queries == (64, 256, 1024, 4096)
    # At ~1.2 s a build, 40 graphs are under a minute at start; hundreds would not be.
    assert len(keys.all()) == 40
    assert keys == GraphKeys.for_limits(HEADLINE), "the key set must be the same on every start"
    rng = random.Random(0)
    t, longest = HEADLINE.max_num_batched_tokens, HEADLINE.max_model_len
    corners = [
        (256, ()), (1, ()), (0, (4096,)), (0, (2,) * 256), (0, (4096,) + (2,) * 255),
        (255, (2,)), (100, (4096, 4096, 4096)), (0, (16384 // 4096,) * 256),
    ]
    samples = []
    for _ in range(20000):
        decodes = rng.randint(0, 256)
        chunks = rng.randint(0, min(256 - decodes, (t - decodes) // 2))
        budget = t - decodes - 2 * chunks
        lens = []
        for _ in range(chunks):
            extra = rng.randint(0, min(budget, longest - 2))
            lens.append(2 + extra)
            budget -= extra
        if decodes or lens:
            samples.append((decodes, tuple(lens)))
    for decodes, lens in corners + samples:
        assert decodes + len(lens) <= 256 and decodes + sum(lens) <= t
        check_plan(keys, decodes, lens, plan_step(keys, decodes, len(lens), max(lens, default=0)))


def test_steps_beyond_the_limits_are_refused_with_a_reason() -> None:
    keys = GraphKeys.for_limits(Limits(8, 64, 128, 16))
    with pytest.raises(BackendError, match=r"9 decodes in one step exceed the largest graph \(8\)"):
        plan_step(keys, 9, 0, 0)
    with pytest.raises(BackendError, match="query tokens per chunk"):
        plan_step(keys, 0, 1, 65)


def test_prebuild_option() -> None:
    """The plugin declares the option's type; the core parses an arm's table into it, as the registry does
    before the backend is created."""

    def prebuild(raw: dict[str, object]) -> str:
        return resolve_prebuild(parse_options("cudnn", Options, raw))

    keys = GraphKeys.for_limits(Limits(8, 64, 128, 16))
    assert prebuild({}) == "all" and prebuild({"prebuild": "lazy"}) == "lazy"
    assert prebuilt_keys(keys, "lazy") == () and prebuilt_keys(keys, "all") == keys.all()
    with pytest.raises(BackendError, match=r"^cudnn: prebuild must be one of all, lazy, got 'sometimes'$"):
        prebuild({"prebuild": "sometimes"})
    with pytest.raises(BackendError, match=r"^cudnn: unknown backend option\(s\) kernels; known: prebuild$"):
        prebuild({"kernels": "torch"})


# ---------------------------------------------------------------------------------------------------
# Metadata layout


def make_batch(
    q_lens: list[int], kv_lens: list[int], tables: list[list[int]], width: int, num_decodes: int, cuda_graph: bool,
    num_actual_seqs: int | None = None,
) -> StepBatch:
    """A step as the model runner lays it out, on the CPU."""
    starts = [0, *itertools.accumulate(q_lens)]
    block_tables = torch.zeros(len(q_lens), width, dtype=torch.int32)
    for row, table in zip(block_tables, tables):
        row[: len(table)] = torch.tensor(table)
    tokens = starts[-1]
    return StepBatch(
        input_ids=torch.zeros(tokens, dtype=torch.int64), positions=torch.zeros(tokens, dtype=torch.int64),
        slot_mapping=torch.zeros(tokens, dtype=torch.int64),
        query_start_loc=torch.tensor(starts, dtype=torch.int32), seq_lens=torch.tensor(kv_lens, dtype=torch.int32),
        block_tables=block_tables, query_start_loc_cpu=torch.tensor(starts, dtype=torch.int32),
        seq_lens_cpu=torch.tensor(kv_lens, dtype=torch.int32), block_tables_cpu=block_tables.clone(),
        logits_indices=torch.zeros(0, dtype=torch.int64),
        num_decodes=num_decodes, num_actual_seqs=num_actual_seqs or len(q_lens), max_query_len=max(q_lens),
        max_seq_len=max(kv_lens), block_size=4,
        cuda_graph=cuda_graph,
    )


def flat(t: torch.Tensor) -> list[int]:
    return t.flatten().tolist()


def test_layout_fills_the_persistent_buffers_in_place() -> None:
    limits = Limits(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=32, block_size=4)
    keys = GraphKeys.for_limits(limits)
    width, row = limits.table_width, 3 * 4
    layout = Layout(keys, width, num_q_heads=3, head_dim=4, dtype=torch.float32, device=torch.device("cpu"))
    # 3 decodes, then chunks of 5 (no prefix), 2 (over a 6-token prefix) and 3.
    tables = [[3, 4, 5], [6], [7, 8, 9, 10], [11, 12], [13, 14], [2]]
    batch = make_batch([1, 1, 1, 5, 2, 3], [9, 4, 13, 5, 8, 3], tables, width, num_decodes=3, cuda_graph=False)
    plan = layout.prepare(batch)
    assert plan == StepPlan(3, GraphKey("decode", 4, 1), GraphKey("prefill", 4, 32)) and plan.stages_decodes
    dec, pre = layout.inputs(plan.decode), layout.inputs(plan.prefill)
    assert dec.seq_len_q.shape == (4, 1, 1, 1) and dec.page_table.shape == (4, 1, width, 1)
    assert dec.ragged_offsets is None and pre.ragged_offsets.shape == (5, 1, 1, 1)
    assert flat(dec.seq_len_q) == [1, 1, 1, 1]
    assert flat(dec.seq_len_kv) == [9, 4, 13, 1]  # the padded row: one token ...
    assert flat(dec.page_table[3]) == [0] * width  # ... of the scratch block
    assert flat(dec.page_table[2])[:5] == [7, 8, 9, 10, 0]
    assert flat(pre.seq_len_q) == [5, 2, 3, 0]  # the padded entry is skipped ...
    assert flat(pre.seq_len_kv) == [5, 8, 3, 0]
    # ... and points past the step's last row: offsets are elements of the whole step's [T, Hq, D] rows.
    assert flat(pre.ragged_offsets) == [3 * row, 8 * row, 10 * row, 13 * row, 13 * row]
    assert flat(pre.page_table[1])[:3] == [13, 14, 0] and flat(pre.page_table[3]) == [0] * width
    pointers = [t.data_ptr() for t in (*_tensors(dec), *_tensors(pre))]

    # The next step, in the same graphs: the same storage, and last step's third chunk gone.
    batch = make_batch([1, 3, 4], [10, 3, 12], [[3, 4, 5], [16], [6, 15, 17]], width, num_decodes=1,
                       cuda_graph=False)
    plan = layout.prepare(batch)
    assert plan == StepPlan(1, GraphKey("decode", 1, 1), GraphKey("prefill", 4, 32)) and not plan.stages_decodes
    pre = layout.inputs(plan.prefill)
    assert flat(layout.inputs(plan.decode).seq_len_kv) == [10]
    assert flat(pre.seq_len_q) == [3, 4, 0, 0] and flat(pre.seq_len_kv) == [3, 12, 0, 0]
    assert flat(pre.ragged_offsets) == [1 * row, 4 * row, 8 * row, 8 * row, 8 * row]
    assert flat(pre.page_table[2]) == [0] * width
    assert [t.data_ptr() for t in (*_tensors(dec), *_tensors(pre))] == pointers
    assert layout.inputs(GraphKey("decode", 4, 1)) is dec, "a graph's input views are made once"


def _tensors(inputs: GraphInputs) -> list[torch.Tensor]:
    return [t for t in (inputs.seq_len_q, inputs.seq_len_kv, inputs.page_table, inputs.ragged_offsets) if t is not None]


def test_a_cuda_graph_batch_runs_the_decode_graph_of_its_size_over_every_row() -> None:
    limits = Limits(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=32, block_size=4)
    layout = Layout(GraphKeys.for_limits(limits), limits.table_width, 2, 8, torch.float32, torch.device("cpu"))
    # Padded by the engine to its bucket 4: 3 real decodes, one row of the scratch block (seq_len 1).
    batch = make_batch([1, 1, 1, 1], [7, 2, 5, 1], [[1, 2], [3], [4, 5], [0]], limits.table_width,
                       num_decodes=4, cuda_graph=True, num_actual_seqs=3)
    plan = layout.prepare(batch)
    assert plan == StepPlan(4, GraphKey("decode", 4, 1), None) and not plan.stages_decodes
    assert flat(layout.inputs(plan.decode).seq_len_kv) == [7, 2, 5, 1]


# ---------------------------------------------------------------------------------------------------
# The step's graph calls through the engine, with cuDNN emulated


def emulate_sdpa(key: GraphKey, inputs: GraphInputs, q: torch.Tensor, o: torch.Tensor, k: torch.Tensor,
                 v: torch.Tensor, scale: float) -> None:
    """What a graph of `key` computes, as cuDNN documents it, checking that it stays in bounds.

    q, o: token rows [rows, Hq, D]; a decode graph reads and writes exactly B of them, a prefill graph
    the rows its ragged offsets (elements) point at. k, v: [blocks, Hkv, block_size, D] containers read
    through the page table. Sequences with seq_len_q 0 are skipped; a prefill graph's mask is causal,
    aligned bottom right.
    """
    rows, heads, dim = q.shape
    kv_heads, block_size = k.shape[1], k.shape[2]
    lens_q, lens_kv, tables = flat(inputs.seq_len_q), flat(inputs.seq_len_kv), inputs.page_table[:, 0, :, 0]
    if key.kind == "decode":
        assert rows == o.shape[0] == key.batch, "a dense graph reads and writes exactly its batch of rows"
        starts = list(range(key.batch))
    else:
        offsets = flat(inputs.ragged_offsets)
        assert all(off % (heads * dim) == 0 for off in offsets)
        starts = [off // (heads * dim) for off in offsets[:-1]]
    for b in range(key.batch):
        n_q, n_kv, start = lens_q[b], lens_kv[b], starts[b]
        if n_q == 0:
            continue
        assert n_q <= key.max_query_len and start + n_q <= min(rows, o.shape[0]) and n_kv >= n_q
        pages = tables[b, : math.ceil(n_kv / block_size)].long()
        keys = k[pages].transpose(1, 2).reshape(-1, kv_heads, dim)[:n_kv].repeat_interleave(heads // kv_heads, 1)
        values = v[pages].transpose(1, 2).reshape(-1, kv_heads, dim)[:n_kv].repeat_interleave(heads // kv_heads, 1)
        scores = torch.einsum("qhd,khd->hqk", q[start : start + n_q].float(), keys.float()) * scale
        if key.kind == "prefill":
            visible = torch.arange(n_kv).view(1, -1) <= (n_kv - n_q + torch.arange(n_q)).view(-1, 1)
            scores = scores.masked_fill(~visible, float("-inf"))
        o[start : start + n_q] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), values.float()).to(o.dtype)


class EmulatedCudnn:
    """The cudnn backend's metadata and dispatch (novainfer_cudnn.layout) with each graph call emulated."""

    def __init__(self, context: AttentionContext) -> None:
        limits = Limits.from_context(context)
        self.layout = Layout(
            GraphKeys.for_limits(limits), limits.table_width, context.num_q_heads, context.head_dim,
            context.dtype, context.device,
        )
        self.steps: list[tuple[StepBatch, StepPlan]] = []
        self.runs: Counter[str] = Counter()

    @hookimpl
    def prepare_attention_metadata(self, batch: StepBatch) -> StepPlan:
        plan = self.layout.prepare(batch)
        self.steps.append((batch, plan))
        return plan

    @hookimpl
    def attention(
        self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: StepPlan, scale: float, output: torch.Tensor
    ) -> bool:
        def run(key: GraphKey, q: torch.Tensor, o: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
            assert k.data_ptr() == kv_cache[0].data_ptr() and v.data_ptr() == kv_cache[1].data_ptr(), "no copies"
            self.runs[key.kind] += 1
            emulate_sdpa(key, self.layout.inputs(key), q, o, k, v, scale)

        self.layout.attend(query, kv_cache, metadata, run, output)
        return True


class EmulatedPlugin:
    def __init__(self) -> None:
        self.instances: list[EmulatedCudnn] = []

    def create(self, context: AttentionContext) -> EmulatedCudnn:
        self.instances.append(EmulatedCudnn(context))
        return self.instances[-1]

    @hookimpl
    def register_backends(self, register: Callable[[BackendSpec], None]) -> None:
        register(
            BackendSpec(
                "cudnn-emulated",
                self.create,
                Capabilities(devices=("cpu",), dtypes=("float32",)),
                contract_version=CONTRACT_VERSION,
            )
        )


SETTINGS = dict(device="cpu", max_model_len=96, max_num_seqs=24, max_num_batched_tokens=32, block_size=4)


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "cuda-graph-padding"])
def test_the_step_split_into_graph_calls_gives_the_native_logits(graphs: bool) -> None:
    rng = random.Random(11)
    prompts = [[rng.randrange(10000) for _ in range(rng.randint(2, 40))] for _ in range(13)]
    continuations = [[rng.randrange(10000) for _ in range(10)] for _ in prompts]
    plugin = EmulatedPlugin()
    native = LLM("random:qwen2-tiny", backend_options={"kernels": "torch"}, **SETTINGS)
    # With graphs, the padded CUDA-graph decode path, run eagerly.
    emulated = LLM("random:qwen2-tiny", backend="cudnn-emulated", plugins=[plugin], pad_decodes=graphs, **SETTINGS)
    want = native.teacher_forced_logits(prompts, continuations)
    got = emulated.teacher_forced_logits(prompts, continuations)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-4)
    steps = plugin.instances[-1].steps
    # The run went through every path: mixed steps, prefill graphs with padded entries, decode rows staged
    # (eager, a count that is no bucket) and, with graphs, batches the engine padded to their bucket.
    assert any(plan.decode and plan.prefill for _, plan in steps), "expected mixed steps"
    assert any(plan.prefill and plan.prefill.batch > batch.num_prefills for batch, plan in steps)
    assert any(plan.stages_decodes for _, plan in steps)
    assert any(batch.cuda_graph and batch.num_actual_seqs < batch.num_seqs for batch, _ in steps) == graphs
    built = set(plugin.instances[-1].layout.keys.all())
    assert all({plan.decode, plan.prefill} - {None} <= built for _, plan in steps), "a graph missing from the prebuild"
    runs = plugin.instances[-1].runs
    assert runs["decode"] and runs["prefill"]


# ---------------------------------------------------------------------------------------------------
# Availability


def test_availability_reasons() -> None:
    assert unavailable_reason(False, True, 91900) == (
        "nvidia-cudnn-frontend is not installed (pip install nvidia-cudnn-frontend)"
    )
    assert unavailable_reason(True, False, None) == "needs CUDA, and no CUDA device is available here"
    assert unavailable_reason(True, True, None) == "no cuDNN library is loaded by torch"
    assert unavailable_reason(True, True, 90500) == (
        "cuDNN 9.5.0 is too old: packed queries over a paged KV cache need cuDNN >= 9.10.0"
    )
    assert unavailable_reason(True, True, 91000) is None and unavailable_reason(True, True, 91900) is None


def test_registering_imports_no_cudnn() -> None:
    code = (
        "import sys, novainfer_cudnn, novainfer_cudnn.buckets, novainfer_cudnn.layout\n"
        "novainfer_cudnn.unavailable()\n"
        "assert 'cudnn' not in sys.modules, 'cudnn imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(PLUGIN)})
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def cudnn_site(pip_install: Callable[[Path], Path]) -> Path:
    return pip_install(PLUGIN)


def test_backends_lists_cudnn_with_its_reason(tmp_path: Path, cudnn_site: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(cudnn_site), "COLUMNS": "250", "MLFLOW_DISABLE_TELEMETRY": "true"}
    result = subprocess.run([sys.executable, "-m", "novainfer.ab.sweep.cli", "backends"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    (line,) = [line for line in result.stdout.splitlines() if "novainfer-plugin-cudnn" in line]
    assert line.split()[1] == "cudnn"
    reason = unavailable()
    assert (reason or "available") in line
    if not torch.cuda.is_available():
        assert reason is not None, "the cudnn backend cannot be available without CUDA"
    # The engine refuses it the same way, naming what to do.
    code = "from novainfer import LLM\nLLM('random:qwen2-tiny', backend='cudnn', device='cpu')"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "BackendError: backend 'cudnn' is not available:" in result.stderr
