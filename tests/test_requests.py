"""The engine refuses a bad request before queueing anything, and a call that fails part-way leaves the engine
usable: every case ends with a good call whose output must equal a fresh engine's."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from novainfer import LLM, SamplingParams
from novainfer.backend_api import CONTRACT_VERSION, AttentionContext, BackendSpec, Capabilities, StepBatch, hookimpl
from novainfer_native.backend import NativeBackend

SETTINGS: dict[str, Any] = dict(device="cpu", max_model_len=64, kv_cache_capacity=256, warm_up=False)
GOOD_PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9], [10239, 0, 42, 17]]
GOOD_PARAMS = SamplingParams(max_tokens=6, ignore_eos=True)
CONTINUATIONS = [[3, 1, 4], [1, 5], [9, 2, 6, 5]]


def engine(**overrides: Any) -> LLM:
    return LLM("random:qwen2-tiny", **{**SETTINGS, **overrides})


@pytest.fixture(scope="module")
def fresh_outputs() -> list[list[int]]:
    """What a fresh engine generates for the good prompts (greedy, so deterministic)."""
    return [out.token_ids for out in engine().generate(GOOD_PROMPTS, GOOD_PARAMS)]


def assert_idle_and_correct(llm: LLM, fresh_outputs: list[list[int]]) -> None:
    """Nothing queued, every KV block free, and a good call gives a fresh engine's output."""
    scheduler = llm.scheduler
    assert not scheduler.waiting and not scheduler.running
    assert scheduler.block_manager.num_free_blocks == scheduler.block_manager.num_usable_blocks
    assert [out.token_ids for out in llm.generate(GOOD_PROMPTS, GOOD_PARAMS)] == fresh_outputs


# (engine overrides, prompts, params, the whole message)
BAD_CALLS: dict[str, tuple[dict[str, Any], list[Any], SamplingParams, str]] = {
    "id_past_vocab": (
        {}, [[1, 2], [3], [1, 2, 3, 4, 5, 10240]], GOOD_PARAMS,
        "prompt 2: token id 10240 at position 5 is outside the vocabulary [0, 10240)",
    ),
    "negative_id": (
        {}, [[1, -1, 2]], GOOD_PARAMS, "prompt 0: token id -1 at position 1 is outside the vocabulary [0, 10240)"
    ),
    "float_id": ({}, [[1, 2], [3, 4.0]], GOOD_PARAMS, "prompt 1: token id 4.0 at position 1 is not an int"),
    "bool_id": ({}, [[True]], GOOD_PARAMS, "prompt 0: token id True at position 0 is not an int"),
    "empty_prompt": (
        {}, [[1], []], GOOD_PARAMS, "prompt 1: the prompt is empty; a request needs at least one prompt token"
    ),
    "too_long": (
        {}, [[1], [5] * 60], SamplingParams(max_tokens=8),
        "prompt 1: request of 60 prompt tokens + 8 output tokens = 68 exceeds max_model_len 64",
    ),
    "bigger_than_the_cache": (
        {"kv_cache_capacity": 32}, [[1], [5] * 40], SamplingParams(max_tokens=8),
        "prompt 1: request needs 3 KV blocks but the cache has 2",
    ),
    "params_count": ({}, [[1], [2]], [GOOD_PARAMS], "2 prompts but 1 sampling params"),
}


@pytest.mark.parametrize("name", BAD_CALLS)
def test_bad_request_is_refused_and_the_engine_still_serves(name: str, fresh_outputs: list[list[int]]) -> None:
    overrides, prompts, params, message = BAD_CALLS[name]
    llm = engine(**overrides)
    llm.generate([[11, 12, 13]], GOOD_PARAMS)  # an engine that has served a call already
    with pytest.raises(ValueError) as info:
        llm.generate(prompts, params)
    assert str(info.value) == message
    assert_idle_and_correct(llm, fresh_outputs)


def test_a_bad_prompt_in_the_middle_queues_none_of_the_call() -> None:
    llm = engine()
    free = llm.scheduler.block_manager.num_free_blocks
    with pytest.raises(ValueError, match=r"^prompt 1: token id 99999 at position 0 "):
        llm.generate([[1, 2, 3], [99999], [4, 5, 6]], GOOD_PARAMS)
    assert not llm.scheduler.has_unfinished()
    assert llm.scheduler.block_manager.num_free_blocks == free == llm.scheduler.block_manager.num_usable_blocks
    assert llm.step_stats == [], "no step may run for a refused call"


def test_add_request_refuses_without_queueing(fresh_outputs: list[list[int]]) -> None:
    llm = engine()
    with pytest.raises(ValueError, match=r"^token id 10240 at position 2 is outside the vocabulary \[0, 10240\)$"):
        llm.add_request([1, 2, 10240], GOOD_PARAMS)
    assert_idle_and_correct(llm, fresh_outputs)


@pytest.mark.parametrize(
    ("continuations", "message"),
    [
        ([[3, 1, 4], [1, 10240]], "prompt 1: continuation token id 10240 at position 1 is outside the vocabulary"),
        ([[3, 1, 4], []], "prompt 1: the continuation is empty; teacher forcing needs at least one token"),
        ([[3]], "2 prompts but 1 continuations"),
    ],
)
def test_teacher_forcing_checks_continuations(
    continuations: list[list[int]], message: str, fresh_outputs: list[list[int]]
) -> None:
    llm = engine()
    with pytest.raises(ValueError) as info:
        llm.teacher_forced_logits(GOOD_PROMPTS[:2], continuations)
    assert str(info.value).startswith(message), str(info.value)
    assert_idle_and_correct(llm, fresh_outputs)
    want = engine().teacher_forced_logits(GOOD_PROMPTS, CONTINUATIONS)
    got = llm.teacher_forced_logits(GOOD_PROMPTS, CONTINUATIONS)
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


class FaultyBackend(NativeBackend):
    """Native attention that raises on step `fail_at_step` (counted from the last reset) while it is set."""

    def __init__(self, context: AttentionContext) -> None:
        super().__init__(context)
        self.fail_at_step: int | None = None
        self.steps = 0

    @hookimpl
    def prepare_attention_metadata(self, batch: StepBatch) -> object:
        self.steps += 1
        return super().prepare_attention_metadata(batch=batch)

    @hookimpl
    def attention(
        self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: Any, scale: float, output: torch.Tensor
    ) -> bool:
        if self.steps == self.fail_at_step:
            raise RuntimeError(f"injected fault on step {self.steps}")
        return super().attention(query=query, kv_cache=kv_cache, metadata=metadata, scale=scale, output=output)


class FaultyPlugin:
    def __init__(self) -> None:
        self.backends: list[FaultyBackend] = []

    def create(self, context: AttentionContext) -> FaultyBackend:
        self.backends.append(FaultyBackend(context))
        return self.backends[-1]

    @hookimpl
    def register_backends(self, register: Callable[[BackendSpec], None]) -> None:
        register(
            BackendSpec(
                "faulty",
                self.create,
                Capabilities(devices=("cpu",), dtypes=("float32",)),
                contract_version=CONTRACT_VERSION,
            )
        )


def test_a_backend_fault_mid_call_frees_the_call_and_the_engine_recovers(fresh_outputs: list[list[int]]) -> None:
    plugin = FaultyPlugin()
    llm = engine(backend="faulty", plugins=[plugin])
    backend = plugin.backends[-1]
    backend.steps, backend.fail_at_step = 0, 3
    with pytest.raises(RuntimeError, match="injected fault on step 3"):
        llm.generate(GOOD_PROMPTS, GOOD_PARAMS)
    # The fault hits part-way, with requests holding blocks; overlapping, the step after it was launched too.
    assert backend.steps >= 3 and 3 <= len(llm.step_stats) <= 4
    backend.fail_at_step = None
    assert_idle_and_correct(llm, fresh_outputs)


def test_a_failing_on_step_callback_also_frees_the_call(fresh_outputs: list[list[int]]) -> None:
    llm = engine()

    def stop(_: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        llm.generate(GOOD_PROMPTS, GOOD_PARAMS, on_step=stop)
    assert_idle_and_correct(llm, fresh_outputs)
