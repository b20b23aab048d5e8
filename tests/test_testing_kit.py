"""novainfer.testing, the step-replay and conformance kit: steps built on an engine's own cache, the conformance
run that every backend passes (a third-party one written from the contract's docstrings included) and that a
wrong one fails, and the capture / re-plan / replay check."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from novainfer import LLM
from novainfer.backend_api import (
    CONTRACT_VERSION,
    AttentionContext,
    BackendSpec,
    Capabilities,
    StepBatch,
    core_attention,
    core_attention_metadata,
    hookimpl,
)
from novainfer.testing import (
    MIN_BAR,
    StepSeq,
    attend,
    batch,
    check_backend,
    check_graph_replay,
    fill_cached,
    kv_cache,
    prepared,
    run,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(device="cpu", max_model_len=128, max_num_seqs=8, max_num_batched_tokens=64, kv_cache_capacity=512)


def test_a_prepared_step_holds_its_blocks_only_while_used() -> None:
    llm = LLM("random:qwen2-tiny", warm_up=False, block_size=8, **{**TINY, "kv_cache_capacity": 120})
    free = llm.block_manager.num_free_blocks
    seqs = [StepSeq(20, 5, tuple(range(25))), StepSeq(30, 1, tuple(range(31)))]
    with prepared(llm, seqs) as step:
        layout = batch(llm, step)
        # The decode moved first; its blocks and the chunk's cover their lengths.
        assert layout.num_decodes == 1 and layout.seq_lens_cpu.tolist() == [31, 25]
        assert layout.query_start_loc_cpu.tolist() == [0, 1, 6]
        assert [len(b) for b in step.blocks] == [4, 4]
        assert llm.block_manager.num_free_blocks == free - 8
        assert run(llm, step).shape[0] == 6
    assert llm.block_manager.num_free_blocks == free
    # A plan's order is kept when it says how many decodes lead.
    with prepared(llm, [StepSeq(0, 1), StepSeq(3, 1)], num_decodes=1) as step:
        assert batch(llm, step).num_decodes == 1 and batch(llm, step).seq_lens_cpu.tolist() == [1, 4]


def test_a_step_on_chosen_blocks_and_one_layer_through_its_hooks() -> None:
    llm = LLM("random:qwen2-tiny", warm_up=False, block_size=8, pad_decodes=True, **TINY)
    seqs = [StepSeq(12, 1, blocks=(7, 3)), StepSeq(5, 1, blocks=(9,)), StepSeq(20, 1, blocks=(2, 11, 4))]
    with prepared(llm, seqs) as step:
        assert step.blocks == ((7, 3), (9,), (2, 11, 4))
        served, eager = batch(llm, step), batch(llm, step, as_served=False)
        assert (served.num_seqs, served.cuda_graph, eager.num_seqs, eager.cuda_graph) == (4, True, 3, False)
        assert served.block_tables_cpu[:3, :3].tolist() == [[7, 3, 0], [9, 0, 0], [2, 11, 4]]
        fill_cached([(llm, step)], seed=0)
        gen = torch.Generator().manual_seed(0)
        mc = llm.model_config
        query = torch.randn(4, mc.num_attention_heads, mc.head_dim, generator=gen)
        key, value = torch.randn(2, 4, mc.num_key_value_heads, mc.head_dim, generator=gen)
        padded = attend(llm, step, query, key, value)
        # The new keys and values are where the engine's slots put them: token 12 of the first is in block 3.
        assert torch.equal(kv_cache(llm)[0, 3, 4], key[0]) and torch.equal(kv_cache(llm)[1, 4, 4], value[2])
        unpadded = attend(llm, step, query[:3], key[:3], value[:3], as_served=False)
        torch.testing.assert_close(padded.output[:3], unpadded.output, rtol=0, atol=1e-6)
        with pytest.raises(ValueError, match="the step's batch has 4 rows, the query 3"):
            attend(llm, step, query[:3])
    with pytest.raises(ValueError, match=r"blocks \[3, 0\] are not distinct free blocks"), prepared(
        llm, [StepSeq(8, 1, blocks=(3, 0))]  # block 0 is the scratch block: never free
    ):
        pass
    with pytest.raises(ValueError, match="a sequence of 9 tokens fills 2 blocks of 8, was given 3"), prepared(
        llm, [StepSeq(8, 1, blocks=(3, 5, 6))]
    ):
        pass
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_usable_blocks


class Scaled:
    """Native's plain attention, off by `factor` in the rows `wrong(batch)` picks: a backend the kit must fail."""

    def __init__(self, factor: float, wrong: Callable[[StepBatch], bool]) -> None:
        self.factor, self.wrong = factor, wrong

    @hookimpl
    def register_backends(self, register: Callable[[BackendSpec], None]) -> None:
        register(
            BackendSpec(
                "scaled",
                self.create,
                Capabilities(devices=("cpu",), dtypes=("float32", "bfloat16")),
                contract_version=CONTRACT_VERSION,
            )
        )

    def create(self, context: AttentionContext) -> object:
        factor, wrong = self.factor, self.wrong

        class Backend:
            @hookimpl
            def prepare_attention_metadata(self, batch: StepBatch) -> Any:
                return core_attention_metadata(batch), batch

            @hookimpl
            def attention(
                self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: Any, scale: float, output: torch.Tensor
            ) -> bool:
                core_attention(query, kv_cache, metadata[0], scale, output)
                if wrong(metadata[1]):
                    output.mul_(factor)
                return True

        return Backend()


def test_conformance_passes_native_and_the_reference_and_fails_a_small_error() -> None:
    for backend in ("native", "reference"):
        report = check_backend(backend, device="cpu")
        assert report.passed(), report.failures()
        assert {row.step for row in report.rows} >= {"prefill", "decode", "prefill over a cached prefix", "mixed"}
        assert {row.block_size for row in report.rows} == {16, 1}
    wrong = check_backend("scaled", plugins=[Scaled(1.006, lambda b: True)], device="cpu", block_sizes=(16,))
    assert not wrong.passed() and len(wrong.failures()) == len(wrong.rows)
    assert all(row.max_rel_err > 1e-4 for row in wrong.rows)


def test_a_half_dtype_conformance_rounds_only_attention_and_still_catches_a_decode_only_error() -> None:
    """Backends that run only in a half dtype are checked with float32 weights over a bfloat16 cache: the bar is
    bfloat16's, native's rows show that dtype's rounding, and an error in decode steps alone is still caught."""
    honest = check_backend("native", device="cpu", kv_cache_dtype="bfloat16", block_sizes=(16,))
    assert honest.bar == MIN_BAR["bfloat16"] and honest.passed(), honest.failures()
    assert max(row.max_rel_err for row in honest.rows) > MIN_BAR["float32"]  # the cache did round
    decode_only = Scaled(1.05, lambda b: b.num_decodes == b.num_seqs)
    wrong = check_backend("scaled", plugins=[decode_only], device="cpu", kv_cache_dtype="bfloat16", block_sizes=(16,))
    assert [row.step for row in wrong.failures()] == ["decode"]


def test_a_third_party_backend_written_from_the_contract_passes_the_kit(pip_install: Callable[[Path], Path]) -> None:
    """tests/plugins/example, pip-installed and found through its entry point in a fresh process."""
    site = pip_install(ROOT / "tests" / "plugins" / "example")
    script = (
        "from novainfer.testing import check_backend\n"
        "report = check_backend('example', device='cpu')\n"
        "print(report.passed(), len(report.rows), max(r.max_rel_err for r in report.rows))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], env={"PYTHONPATH": str(site), "TRITON_INTERPRET": "1"}, capture_output=True,
        text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    passed, rows, worst = done.stdout.split()
    assert passed == "True" and int(rows) == 10 and float(worst) < 1e-5


def test_the_replay_check_sees_a_backend_wrong_only_in_graph_batches() -> None:
    contexts = [[5, 17, 30], [9, 2, 41], [60, 3, 3, 7, 12]]  # two steps of size 4 (three real rows), one of 8
    honest = LLM("random:qwen2-tiny-wide", pad_decodes=True, warm_up=False, **TINY)
    assert max(check_graph_replay(honest, contexts)) < 1e-5
    plugin = Scaled(1.5, lambda b: b.cuda_graph)
    wrong = LLM("random:qwen2-tiny-wide", backend="scaled", plugins=[plugin], pad_decodes=True, warm_up=False, **TINY)
    assert all(err > 1e-2 for err in check_graph_replay(wrong, contexts))
