"""The flashinfer plugin where CI runs it: no GPU, no flashinfer.

What can be checked here is checked for real: the paged-KV index arithmetic against the engine's own
block tables and slot mapping, the options, the availability reasons, and the plugin installed by pip
and listed by `nova-ab backends`. Its attention itself is checked on a GPU by
bench/check_flashinfer_gpu.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from novainfer import LLM, SamplingParams
from novainfer.backend_api import BackendError, StepBatch, hookimpl
from novainfer.backend_options import parse_options
from novainfer.testing import StepSeq, prepared
from novainfer.testing import batch as served_batch

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "plugins" / "flashinfer"


def load(module: str) -> ModuleType:
    """One of the plugin's pure modules, by path: the plugin is not installed in the dev environment."""
    spec = importlib.util.spec_from_file_location(
        f"novainfer_flashinfer_{module}", PLUGIN / "novainfer_flashinfer" / f"{module}.py"
    )
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = loaded  # dataclasses look their module up while the class is built
    spec.loader.exec_module(loaded)
    return loaded


metadata = load("metadata")
checks = load("checks")


def build(batch: StepBatch, num_decodes: int, token_coords: bool = True) -> tuple[np.ndarray, Any]:
    """The builder run on a step's host arrays, into a buffer poisoned with -1 so unwritten fields show."""
    tables = batch.block_tables.numpy()  # on the CPU the device tensor is the host copy
    num_seqs, width = tables.shape
    buf = np.full(metadata.staging_size(num_seqs, batch.num_tokens, num_seqs * width), -1, dtype=np.int32)
    step = metadata.build_step_indices(
        buf, tables, batch.seq_lens_cpu.numpy(), batch.query_start_loc_cpu.numpy(), batch.block_size,
        num_decodes, token_coords,
    )
    return buf, step


def check_step(batch: StepBatch, num_real: int) -> None:
    """Everything flashinfer will be told about a step, against the engine's tables and slots."""
    bs = batch.block_size
    tables = batch.block_tables.numpy()
    seq_lens = batch.seq_lens_cpu.numpy()
    starts = batch.query_start_loc_cpu.numpy()
    num_decodes = batch.num_seqs if batch.cuda_graph else batch.num_decodes
    buf, step = build(batch, num_decodes)
    indptr, last = buf[step.indptr], buf[step.last_page_len]
    rows, positions, indices = buf[step.batch_indices], buf[step.positions], buf[step.indices]

    # Sequence b's pages are its block-table prefix, holding exactly seq_len tokens.
    assert indptr[0] == 0 and len(indices) == indptr[-1]
    for b, seq_len in enumerate(seq_lens):
        pages = -(-int(seq_len) // bs)
        assert indices[indptr[b] : indptr[b + 1]].tolist() == tables[b, :pages].tolist()
        assert 1 <= last[b] <= bs and (pages - 1) * bs + last[b] == seq_len
    # Every token, located through the paged arrays, is the slot the engine writes and reads.
    assert rows.tolist() == np.repeat(np.arange(batch.num_seqs), np.diff(starts)).tolist()
    assert positions.tolist() == batch.positions.tolist()
    page = indices[indptr[rows] + positions // bs]
    assert (page * bs + positions % bs).tolist() == batch.slot_mapping.tolist()
    # Decodes: the first num_decodes rows, one query each, the first num_decode_pages pages.
    assert (np.diff(starts[: num_decodes + 1]) == 1).all()
    assert step.num_decode_pages == indptr[num_decodes]
    # Prefill chunks: the remaining rows and pages, both counted again from 0.
    assert (buf[step.prefill_qo_indptr] + starts[num_decodes]).tolist() == starts[num_decodes:].tolist()
    assert (buf[step.prefill_kv_indptr] + indptr[num_decodes]).tolist() == indptr[num_decodes:].tolist()
    # Padding rows of a CUDA-graph batch: one token at position 0 of the scratch block 0.
    for b in range(num_real, batch.num_seqs):
        assert indices[indptr[b] : indptr[b + 1]].tolist() == [0] and last[b] == 1
        assert positions[starts[b]] == 0
    # What is uploaded is one span, ahead of the host-only prefill arrays.
    uploaded = (step.indptr, step.last_page_len, step.batch_indices, step.positions, step.indices)
    assert all(s.stop <= step.upload_end for s in uploaded)
    assert step.prefill_qo_indptr.start >= step.upload_end


@contextmanager
def engine_batch(llm: LLM, seqs: list[tuple[int, int, list[int]]], num_decodes: int) -> Iterator[StepBatch]:
    """The StepBatch the engine builds for a step of (cached tokens, new tokens, block table) per sequence, as
    served (novainfer.testing): a decode-only step is padded to its CUDA-graph size."""
    with prepared(llm, [StepSeq(c, n, blocks=tuple(table)) for c, n, table in seqs], num_decodes) as step:
        yield served_batch(llm, step)


@pytest.fixture(scope="module")
def tiny_llm() -> LLM:
    """Decode-only steps padded as CUDA-graph replays would be, run eagerly."""
    return LLM("random:qwen2-tiny", device="cpu", block_size=16, max_model_len=256, max_num_seqs=8,
               max_num_batched_tokens=64, pad_decodes=True, warm_up=False)


def test_a_worked_example(tiny_llm: LLM) -> None:
    # Two decodes (17 and 1 tokens) and a 5-token chunk after 28 cached tokens, block size 16.
    with engine_batch(tiny_llm, [(16, 1, [5, 7]), (0, 1, [2]), (28, 5, [9, 3, 4])], num_decodes=2) as batch:
        buf, step = build(batch, num_decodes=2)
        assert buf[step.indptr].tolist() == [0, 2, 3, 6]
        assert buf[step.indices].tolist() == [5, 7, 2, 9, 3, 4]
        assert buf[step.last_page_len].tolist() == [1, 1, 1]
        assert buf[step.batch_indices].tolist() == [0, 1, 2, 2, 2, 2, 2]
        assert buf[step.positions].tolist() == [16, 0, 28, 29, 30, 31, 32]
        assert buf[step.prefill_qo_indptr].tolist() == [0, 5]
        assert buf[step.prefill_kv_indptr].tolist() == [0, 3]
        assert step.num_decode_pages == 3
        check_step(batch, num_real=3)
        # Without token coordinates (kv_write="native") the indices follow the page lengths directly.
        buf, step = build(batch, num_decodes=2, token_coords=False)
        assert step.batch_indices.start == step.batch_indices.stop == step.positions.stop == step.indices.start
        assert buf[step.indices].tolist() == [5, 7, 2, 9, 3, 4]


def test_exactly_full_last_pages(tiny_llm: LLM) -> None:
    seqs = [(15, 1, [3]), (31, 1, [4, 6]), (0, 32, [8, 9]), (40, 8, [1, 2, 10])]
    with engine_batch(tiny_llm, seqs, 2) as batch:
        buf, step = build(batch, num_decodes=2)
        assert buf[step.last_page_len].tolist() == [16, 16, 16, 16]
        assert buf[step.indptr].tolist() == [0, 1, 3, 5, 8]
        check_step(batch, num_real=4)


def test_a_padded_graph_batch_points_its_padding_at_block_0(tiny_llm: LLM) -> None:
    # Five decodes: the engine pads them to its graph size 8.
    seqs = [(20, 1, [5, 6]), (3, 1, [7]), (9, 1, [8]), (16, 1, [9, 10]), (31, 1, [11, 12])]
    with engine_batch(tiny_llm, seqs, num_decodes=5) as batch:
        assert batch.cuda_graph and batch.num_seqs == 8 and batch.num_actual_seqs == 5
        buf, step = build(batch, num_decodes=batch.num_seqs)
        assert buf[step.indptr].tolist() == [0, 2, 3, 4, 6, 8, 9, 10, 11]
        assert buf[step.indices].tolist() == [5, 6, 7, 8, 9, 10, 11, 12, 0, 0, 0]
        assert buf[step.last_page_len].tolist() == [5, 4, 10, 1, 16, 1, 1, 1]
        assert buf[step.positions].tolist() == [20, 3, 9, 16, 31, 0, 0, 0]
        check_step(batch, num_real=5)


def test_a_graph_buckets_device_fields_keep_their_offsets(tiny_llm: LLM) -> None:
    """A captured graph reads the uploaded fields at fixed addresses: they may depend on the bucket only."""
    # Three short decodes and four long ones: both padded to the engine's graph size 4.
    with engine_batch(tiny_llm, [(0, 1, [5]), (2, 1, [6]), (4, 1, [7])], 3) as batch:
        short = build(batch, 4)[1]
    long_seqs = [(100, 1, [5, 6, 7, 8, 9, 10, 11]), (40, 1, [1, 2, 3]), (50, 1, [12, 13, 14, 15]), (20, 1, [16, 17])]
    with engine_batch(tiny_llm, long_seqs, 4) as batch:
        assert batch.num_seqs == 4
        long = build(batch, 4)[1]
    for field in ("indptr", "last_page_len", "batch_indices", "positions"):
        assert getattr(short, field) == getattr(long, field)
    assert short.indices.start == long.indices.start and short.indices.stop < long.indices.stop


@pytest.mark.parametrize("block_size", [1, 3, 4, 16])
def test_every_step_of_a_run_matches_the_engines_slots(block_size: int) -> None:
    """A real run: chunked prefills, mixed steps, and decode steps padded to graph buckets (run eagerly)."""
    rng = random.Random(block_size)
    seen = {"mixed": 0, "padded": 0, "partial": 0, "full": 0}

    class Checked:
        """Sees every batch the engine hands the backend's hooks (a hook wrapper, as novainfer.observers)."""

        @hookimpl(wrapper=True)
        def prepare_attention_metadata(self, batch: StepBatch) -> Generator[None, Any, Any]:
            check_step(batch, num_real=batch.num_actual_seqs)
            seen["mixed"] += bool(batch.num_decodes and batch.num_prefills and not batch.cuda_graph)
            seen["padded"] += batch.cuda_graph and batch.num_actual_seqs < batch.num_seqs
            last = (batch.seq_lens_cpu.numpy() - 1) % block_size + 1
            seen["partial"] += bool((last < block_size).any())
            seen["full"] += bool((last == block_size).any())
            return (yield)

    # No warm-up: its dummy step would be counted among the run's.
    llm = LLM("random:qwen2-tiny", device="cpu", block_size=block_size, max_model_len=96, max_num_seqs=12,
              max_num_batched_tokens=24, pad_decodes=True, warm_up=False, observers=[Checked()])
    prompts = [[rng.randrange(10000) for _ in range(rng.randint(1, 40))] for _ in range(10)]
    llm.generate(prompts, [SamplingParams(max_tokens=rng.randint(1, 20), ignore_eos=True) for _ in prompts])
    assert seen["mixed"] and seen["padded"] and seen["full"], seen
    assert seen["partial"] or block_size == 1, seen


def test_options_are_checked_with_the_valid_values() -> None:
    """The plugin declares its options' types; the core parses an arm's table into them (as the registry does
    before the backend is created), each message starting with the backend's name."""

    def parse(raw: dict[str, Any]) -> Any:
        return parse_options("flashinfer", checks.Options, raw)

    assert parse({}) == checks.Options("native", "auto", "auto", "fast")
    assert parse({"kv_write": "append", "tensor_cores": True, "prefill_backend": "fa2"}) == (
        checks.Options("append", True, "fa2", "fast")
    )
    with pytest.raises(BackendError, match=r"^flashinfer: unknown backend option\(s\) kernels; known: kv_write, "
                                           r"tensor_cores, prefill_backend, decode_plan$"):
        parse({"kernels": "triton"})
    with pytest.raises(BackendError, match=r"kv_write must be one of native, append, got 'scatter'"):
        parse({"kv_write": "scatter"})
    with pytest.raises(BackendError, match=r"tensor_cores must be true, false or \"auto\", got 'yes'"):
        parse({"tensor_cores": "yes"})
    with pytest.raises(BackendError, match=r"tensor_cores must be true, false or \"auto\", got 1"):
        parse({"tensor_cores": 1})
    with pytest.raises(BackendError, match=r"prefill_backend must be one of auto, fa2, fa3, got 'cudnn'"):
        parse({"prefill_backend": "cudnn"})
    with pytest.raises(BackendError, match=r"decode_plan must be one of fast, wrapper, got 'slow'"):
        parse({"decode_plan": "slow"})


def test_tensor_cores_auto_follows_the_query_heads_per_kv_head() -> None:
    assert checks.use_tensor_cores("auto", 12, 2) and checks.use_tensor_cores("auto", 14, 2)  # 6 and 7 per KV head
    assert not checks.use_tensor_cores("auto", 8, 2) and not checks.use_tensor_cores("auto", 4, 4)
    assert checks.use_tensor_cores(True, 4, 4) and not checks.use_tensor_cores(False, 12, 2)


def test_availability_reasons() -> None:
    reason = checks.unavailable_reason
    assert reason(None, True, (9, 0)) == "flashinfer-python is not installed (pip install flashinfer-python)"
    assert reason("0.5.3", True, (9, 0)) == "flashinfer-python 0.5.3 is too old; needs 0.6.13 or newer"
    assert reason("0.6.9", False, None) == "flashinfer-python 0.6.9 is too old; needs 0.6.13 or newer"
    assert reason("0.7.2.post1", False, None) == "needs a CUDA GPU; torch sees none"
    assert reason("0.6.13", True, (7, 5)) == (
        "needs compute capability 8.0 or newer (Ampere+); this GPU has 7.5"
    )
    assert reason("0.6.13", True, (8, 0)) is None
    assert reason("0.7.2.post1", True, (9, 0)) is None
    assert checks.release("0.7.2.post1") == (0, 7, 2) and checks.release("0.10.0") > checks.release("0.9.9")


@pytest.fixture(scope="module")
def plugin_site(pip_install: Callable[[Path], Path]) -> Path:
    return pip_install(PLUGIN)


def run_with_plugin(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """`python *args` in a fresh interpreter that sees the pip-installed plugin."""
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(site), "COLUMNS": "250", "MLFLOW_DISABLE_TELEMETRY": "true"},
    )


INSTALLED_CHECK = """
import json
import torch
from novainfer import LLM
from novainfer.backend_api import AttentionContext, BackendError
from novainfer.plugins import discover_backends

backend = discover_backends()["flashinfer"]
caps = backend.spec.capabilities
result = {"plugin": backend.plugin, "version": backend.version, "devices": caps.devices,
          "graphs": caps.cuda_graphs, "reason": backend.spec.unavailable()}
try:
    LLM("random:qwen2-tiny", device="cpu", backend="flashinfer")
except BackendError as error:
    result["engine"] = str(error)
# Options are checked before flashinfer is imported, so a typo is reported even here.
context = AttentionContext(
    12, 2, 128, 1, 16, 8, 4, 64, 128, 8, torch.bfloat16, torch.device("cuda"), options={"kernels": 1}
)
try:
    backend.spec.create(context)
except BackendError as error:
    result["create"] = str(error)
print(json.dumps(result))
"""


@pytest.mark.skipif(importlib.util.find_spec("flashinfer") is not None, reason="checks the reason without flashinfer")
def test_pip_installed_plugin_is_found_and_says_why_it_cannot_run(plugin_site: Path, tmp_path: Path) -> None:
    result = run_with_plugin(plugin_site, tmp_path, "-c", INSTALLED_CHECK)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert found["plugin"] == "novainfer-plugin-flashinfer" and found["version"] == "0.1.0"
    assert found["devices"] == ["cuda"] and found["graphs"] is True
    assert found["reason"] == "flashinfer-python is not installed (pip install flashinfer-python)"
    assert found["engine"].startswith(
        "backend 'flashinfer' is not available: flashinfer-python is not installed (pip install flashinfer-python); "
        "available backends: "
    )
    assert found["create"] == (
        "flashinfer: unknown backend option(s) kernels; known: kv_write, tensor_cores, prefill_backend, decode_plan"
    )
    listing = run_with_plugin(plugin_site, tmp_path, "-m", "novainfer.ab.sweep.cli", "backends")
    assert listing.returncode == 0, listing.stderr
    row = next(line for line in listing.stdout.splitlines() if "novainfer-plugin-flashinfer" in line)
    assert row.split()[1] == "flashinfer" and "flashinfer-python is not installed" in row
