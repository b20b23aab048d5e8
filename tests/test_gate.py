"""The correctness gate on the arm's own steps: what it samples, and that it sees a fault in one row of one kind."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch

from novainfer.ab.trial.gate import GateReport, KindCoverage, check_backend, choose_sample, forced_sequences
from novainfer.ab.trial.schedule import CONTINUED_CHUNK, MIXED, kind_counts, labelled, plan_schedule
from novainfer.ab.wire import GateSettings
from novainfer.ab.workload import Workload
from novainfer.backend_api import CONTRACT_VERSION, BackendSpec, Capabilities, StepBatch, hookimpl
from novainfer.config import EngineConfig
from novainfer.models.qwen2 import build_model
from novainfer_native.backend import NativeBackend

WORKLOAD = Workload(num_seqs=8, input_len=(16, 64), output_len=(8, 32), seed=0)
CONFIG = EngineConfig(
    model="random:qwen2-tiny-wide", device="cpu", dtype="float32", max_model_len=128, max_num_seqs=8,
    max_num_batched_tokens=64, kv_cache_capacity=1024,
)


def plan_for(config: EngineConfig) -> list:
    return plan_schedule(
        [len(p) for p in WORKLOAD.prompts()], WORKLOAD.output_lens(), num_blocks=1024 // 16 + 1,
        block_size=config.block_size, max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens, max_model_len=config.max_model_len,
        cuda_graphs=False,
    )


class Zeroing(NativeBackend):
    """Native, with the rows `rows(batch)` names overwritten by `fill`."""

    def __init__(self, context: Any, rows: Callable[[StepBatch], list[int]], fill: float) -> None:
        super().__init__(context)
        self.rows, self.fill = rows, fill

    @hookimpl
    def prepare_attention_metadata(self, batch: StepBatch) -> Any:
        return (super().prepare_attention_metadata(batch=batch), batch)

    @hookimpl
    def attention(
        self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: Any, scale: float, output: torch.Tensor
    ) -> bool:
        native, batch = metadata
        super().attention(query=query, kv_cache=kv_cache, metadata=native, scale=scale, output=output)
        output[self.rows(batch)] = self.fill
        return True


def first_row_of_continued_chunks(batch: StepBatch) -> list[int]:
    """One row only: the first query of every prefill chunk that continues a cached prefix."""
    starts, lens = batch.query_start_loc_cpu.tolist(), batch.seq_lens_cpu.tolist()
    return [starts[b] for b in range(batch.num_decodes, batch.num_seqs) if lens[b] > starts[b + 1] - starts[b]]


def every_row_when_mixed(batch: StepBatch) -> list[int]:
    return list(range(batch.num_tokens)) if batch.num_decodes and batch.num_prefills else []


class Plugin:
    def __init__(self, name: str, rows: Callable[[StepBatch], list[int]], fill: float = 0.0) -> None:
        self.name, self.rows, self.fill = name, rows, fill

    @hookimpl
    def register_backends(self, register: Callable[[BackendSpec], None]) -> None:
        def create(context: Any) -> object:
            return Zeroing(context, self.rows, self.fill)

        caps = Capabilities(devices=("cpu",), dtypes=("float32", "bfloat16"))
        register(BackendSpec(self.name, create, caps, contract_version=CONTRACT_VERSION))


def run_gate(config: EngineConfig, monkeypatch: pytest.MonkeyPatch, plugin: Plugin | None = None) -> Any:
    """check_backend on the workload's plan, with `plugin` registered in-process."""
    if plugin is not None:
        from novainfer import engine

        select = engine.select_backend
        def with_plugin(name: str, device: Any, dtype: Any, block_size: int, extra: Any = ()) -> Any:
            return select(name, device, dtype, block_size, [plugin])

        monkeypatch.setattr(engine, "select_backend", with_plugin)
    model = build_model(config.model, config.seed, torch.float32, torch.device("cpu"), config.max_model_len)
    sequences = forced_sequences(WORKLOAD.prompts(), WORKLOAD.output_lens(), model.config.vocab_size)
    return check_backend(config, model, plan_for(config), sequences, GateSettings(), seed=0)


def test_the_sample_covers_every_kind_the_run_has() -> None:
    plan = plan_for(CONFIG)
    counts = kind_counts(plan)
    assert {MIXED, CONTINUED_CHUNK} <= set(counts)
    # An eager run: every distinct decode batch size is a kind of its own.
    sizes = {s.num_seqs for s in plan if s.num_decodes == s.num_seqs}
    assert {f"decode-n{n}" for n in sizes} <= set(counts) and len(sizes) > 1
    for per_kind in (1, 2, 3):
        for seed in range(5):
            sample = choose_sample(plan, per_kind, seed)
            covered = kind_counts(sample)
            assert all(covered[kind] >= min(per_kind, n) for kind, n in counts.items()), (per_kind, covered, counts)
            assert [s.index for s in sample] == sorted({s.index for s in sample})  # plan order, no repeats
    # Fewer steps than the run; the same choice for the same seed, another choice for others.
    assert len(choose_sample(plan, 1, 0)) < len(plan) / 2
    assert choose_sample(plan, 1, 7) == choose_sample(plan_for(CONFIG), 1, 7)
    assert len({tuple(s.index for s in choose_sample(plan, 1, seed)) for seed in range(5)}) > 1


def test_a_graph_run_checks_the_fewest_and_the_most_sequences_of_every_bucket() -> None:
    plan = labelled(plan_for(CONFIG), CONFIG.max_num_seqs, cuda_graphs=True)
    counts = kind_counts(plan)
    assert not any(kind.startswith("decode-n") for kind in counts)
    for bucket in {s.step_class for s in plan if s.step_class != "prefill"}:
        sizes = [s.num_seqs for s in plan if s.step_class == bucket]
        fewest = {s.index for s in plan if f"{bucket}-fewest" in s.kinds}
        most = {s.index for s in plan if f"{bucket}-most" in s.kinds}
        assert fewest == {s.index for s in plan if s.step_class == bucket and s.num_seqs == min(sizes)}
        assert most == {s.index for s in plan if s.step_class == bucket and s.num_seqs == max(sizes)}
    # The run's commonest decode shape, max_num_seqs sequences, is a kind the gate must check.
    full = [s for s in plan if s.step_class != "prefill" and s.num_seqs == CONFIG.max_num_seqs]
    assert full and counts[f"decode-b{CONFIG.max_num_seqs}-most"] == len(full)


def test_native_triton_kernels_pass_on_every_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    config = EngineConfig(**{**CONFIG.to_dict(), "backend_options": {"kernels": "triton"}})
    report = run_gate(config, monkeypatch)
    assert report.passed()
    assert 0 < report.max_rel_err < 1e-4  # a different kernel: not bitwise the reference, but float32-close
    assert all(cov.checked >= 1 for cov in report.coverage.values())
    assert report.rows == sum(s.tokens for s in choose_sample(plan_for(config), 1, 0))  # every row, not only sampled


def test_one_wrong_row_per_continued_chunk_fails_the_gate(monkeypatch: pytest.MonkeyPatch) -> None:
    report = run_gate(
        EngineConfig(**{**CONFIG.to_dict(), "backend": "one-row"}), monkeypatch,
        Plugin("one-row", first_row_of_continued_chunks),
    )
    assert not report.passed()
    assert CONTINUED_CHUNK in report.worst_kinds
    assert report.coverage[CONTINUED_CHUNK].max_rel_err > 1e-2
    # Decode-only steps were right, and the report says so kind by kind.
    assert all(cov.max_rel_err < 1e-5 for kind, cov in report.coverage.items() if kind.startswith("decode-b"))
    assert "worst row relative error" in report.problem() and CONTINUED_CHUNK in report.problem()


def test_wrong_only_when_mixed_is_caught_in_the_mixed_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    report = run_gate(
        EngineConfig(**{**CONFIG.to_dict(), "backend": "mixed"}), monkeypatch, Plugin("mixed", every_row_when_mixed)
    )
    assert report.coverage[MIXED].max_rel_err > 1e-2 and not report.passed()


def test_a_nan_row_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    report = run_gate(
        EngineConfig(**{**CONFIG.to_dict(), "backend": "nan"}), monkeypatch,
        Plugin("nan", first_row_of_continued_chunks, fill=math.nan),
    )
    assert math.isnan(report.max_rel_err) and not report.passed()
    assert math.isnan(report.metrics()[f"gate.{CONTINUED_CHUNK}.max_rel_err"])


def test_forced_sequences_are_the_prompts_then_fixed_random_outputs() -> None:
    prompts, lens = WORKLOAD.prompts(), WORKLOAD.output_lens()
    sequences = forced_sequences(prompts, lens, 10240)
    assert sequences == forced_sequences(prompts, lens, 10240)
    assert all(s[: len(p)] == p and len(s) == len(p) + n for s, p, n in zip(sequences, prompts, lens))
    assert all(0 <= t < 10240 for s in sequences for t in s)
    assert len({tuple(s[len(p) :]) for s, p in zip(sequences, prompts)}) == len(prompts)


def test_a_step_may_be_off_by_its_floor_times_the_margin_not_more() -> None:
    settings = GateSettings(max_rel_err=1e-2, floor_margin=2.0)
    report = GateReport({"decode-b4": KindCoverage(run_steps=3)}, bar=1e-2)
    floor = torch.tensor([0.01, 0.02])
    report.judge(("decode-b4",), torch.tensor([0.01, 0.039]), floor, settings)
    assert report.passed() and report.worst_allowed == pytest.approx(0.04)
    report.judge(("decode-b4",), torch.tensor([0.041]), floor, settings)
    assert not report.passed() and report.worst_ratio == pytest.approx(0.041 / 0.04)
    # Without a floor (float32 everywhere), the bar itself.
    exact = GateReport({"prefill": KindCoverage(run_steps=1)}, bar=1e-2)
    exact.judge(("prefill",), torch.tensor([0.011]), torch.tensor([0.0]), settings)
    assert not exact.passed() and exact.worst_allowed == 1e-2
    assert exact.coverage["prefill"].checked == 1 and exact.coverage["prefill"].max_rel_err == pytest.approx(0.011)


def test_a_half_precision_cache_is_judged_against_its_own_floor(monkeypatch: pytest.MonkeyPatch) -> None:
    # float16: Triton's CPU interpreter multiplies bfloat16 as raw integers in tl.dot (see test_triton_ops).
    settings = {"kv_cache_dtype": "float16", "backend_options": {"kernels": "triton"}}
    config = EngineConfig(**{**CONFIG.to_dict(), **settings})
    report = run_gate(config, monkeypatch)
    assert report.floor_rel_err > 1e-4  # PyTorch's float16 attention is not the float32 reference
    assert all(cov.floor_rel_err > 0 for cov in report.coverage.values())
    assert report.passed(), report.problem()


def test_the_exact_reference_computes_the_same_attention_as_sdpa(monkeypatch: pytest.MonkeyPatch) -> None:
    """The core's float64 reference against its SDPA path (the floor) on a float32 cache, mixed and chunked
    steps, its query rows taken a few at a time."""
    from novainfer import LLM, reference

    monkeypatch.setattr(reference, "_EXACT_QUERY_CHUNK", 5)
    settings = dict(device="cpu", max_model_len=128, max_num_batched_tokens=48, kv_cache_capacity=1024, warm_up=False)
    prompts, lens = WORKLOAD.prompts(), WORKLOAD.output_lens()
    continuations = [s[len(p) :] for s, p in zip(forced_sequences(prompts, lens, 10240), prompts)]
    logits = [
        LLM("random:qwen2-tiny-wide", backend="reference", backend_options=options, **settings)
        .teacher_forced_logits(prompts, continuations)
        for options in ({"precision": "float64"}, {"precision": "cache"})
    ]
    for exact, sdpa in zip(*logits):
        assert ((exact - sdpa).norm(dim=-1) / exact.norm(dim=-1)).max() < 1e-5
