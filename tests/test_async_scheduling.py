"""Asynchronous scheduling changes when the host learns tokens, never which tokens: an overlapping engine's output
equals the synchronous one's token for token, and the overlap is observed, not assumed."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import write_qwen2_checkpoint

from novainfer import LLM, SamplingParams
from novainfer.backend_api import CONTRACT_VERSION, AttentionContext, BackendSpec, Capabilities, StepBatch, hookimpl
from novainfer_native.backend import NativeBackend

# A cache of 8 blocks of 16 for three sequences of up to 96 tokens, and a budget of 24 tokens a step: prompts
# are chunked, chunks share steps with decodes, and sequences are preempted and recomputed.
TIGHT: dict[str, Any] = dict(
    device="cpu", max_num_seqs=3, max_model_len=128, max_num_batched_tokens=24, kv_cache_capacity=128
)


def pair(model: str = "random:qwen2-tiny-wide", **settings: Any) -> tuple[LLM, LLM]:
    """The same engine twice: overlapping (async_scheduling) and not."""
    return (LLM(model, async_scheduling=True, **settings), LLM(model, async_scheduling=False, **settings))


def assert_idle(llm: LLM) -> None:
    assert not llm.has_unfinished()
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_usable_blocks, "KV blocks not returned"


def workload(seed: int, count: int) -> tuple[list[list[int]], list[int]]:
    """`count` prompts of 1 to 60 tokens and output lengths of 1 to 40, the first 1 (a request done by its prefill)."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(10240) for _ in range(rng.choice((1, rng.randint(20, 60))))] for _ in range(count)]
    return prompts, [1] + [rng.randint(2, 40) for _ in prompts[1:]]


@pytest.mark.parametrize("padded", [False, True], ids=["eager", "graph-padded"])
def test_overlapped_tokens_equal_synchronous_ones_through_chunks_mixed_steps_and_preemption(padded: bool) -> None:
    overlapped, synchronous = pair(pad_decodes=padded, **TIGHT)
    prompts, lengths = workload(seed=1, count=9)
    greedy = [SamplingParams(max_tokens=n, ignore_eos=True) for n in lengths]
    seeded = [SamplingParams(max_tokens=n, ignore_eos=True, temperature=0.9, top_p=0.9, seed=i)
              for i, n in enumerate(lengths)]
    for params in (greedy, seeded):
        want = [o.token_ids for o in synchronous.generate(prompts, params)]
        got = [o.token_ids for o in overlapped.generate(prompts, params)]
        assert got == want
        assert [len(t) for t in got] == lengths
    for llm in (overlapped, synchronous):
        assert_idle(llm)
        stats = llm.step_stats
        assert any(s.num_prefill_tokens and s.num_decode_tokens for s in stats), "no mixed step"
        assert llm.scheduler.num_preemptions > 0, "nothing was preempted"
        # Decode steps repeating the one before advanced their inputs on the device, some into new blocks.
        assert llm.runner.num_advanced_on_device > 0 and llm.runner.num_block_fixes > 0
    # Same schedule, step for step: the scheduler decides from counts, which overlap does not change.
    shape = [[(s.num_prefill_tokens, s.num_decode_tokens, s.num_seqs) for s in llm.step_stats]
             for llm in (overlapped, synchronous)]
    assert shape[0] == shape[1]
    # One-token prompts run as decodes whose input the host has, beside decodes whose input is on the device;
    # prompts longer than the budget are chunked.
    assert any(len(p) == 1 for p in prompts) and any(len(p) > 24 for p in prompts)


@pytest.mark.parametrize("padded", [False, True], ids=["eager", "graph-padded"])
@pytest.mark.parametrize("overlap", [True, False], ids=["async", "sync"])
def test_decode_steps_laid_out_on_the_device_give_the_logits_of_a_one_pass_prefill(overlap: bool, padded: bool) -> None:
    """Overlapping or not, decode inputs advanced on the device (positions, slots, lengths, new blocks, tokens from
    the step before) must give the logits the same tokens get laid out from scratch: teacher-forced decodes against
    one prefill pass over prompt and continuation (LLM.prefill_logits, every step laid out on the host)."""
    llm = LLM("random:qwen2-tiny-wide", async_scheduling=overlap, pad_decodes=padded, **TIGHT)
    prompts, lengths = workload(seed=3, count=6)
    rng = random.Random(4)
    continuations = [[rng.randrange(10240) for _ in range(n)] for n in lengths]
    decoded = llm.teacher_forced_logits(prompts, continuations)
    assert llm.runner.num_advanced_on_device > 0 and llm.runner.num_block_fixes > 0
    full = [p + c for p, c in zip(prompts, continuations)]
    for rows, logits in llm.prefill_logits(full, [len(p) for p in prompts]):
        for (i, position), row in zip(rows, logits):
            torch.testing.assert_close(row, decoded[i][position - len(prompts[i]) + 1], rtol=1e-4, atol=1e-4)
    assert_idle(llm)


@pytest.mark.parametrize("overlap", [True, False], ids=["async", "sync"])
def test_a_budget_that_leaves_one_token_chunks_mid_prompt_gives_the_logits_of_an_unchunked_run(overlap: bool) -> None:
    """A token budget of 16 over 16 running sequences leaves prompts chunks of one token that do not end them:
    they run beside the decodes but sample nothing (a bug once counted them as decodes that sample)."""
    settings = dict(device="cpu", max_model_len=128, kv_cache_capacity=2048, max_num_seqs=16)
    chunked = LLM("random:qwen2-tiny-wide", async_scheduling=overlap, max_num_batched_tokens=16, **settings)
    whole = LLM("random:qwen2-tiny-wide", async_scheduling=overlap, max_num_batched_tokens=512, **settings)
    rng = random.Random(6)
    prompts = [[rng.randrange(10240) for _ in range(rng.randint(24, 72))] for _ in range(16)]
    continuations = [[rng.randrange(10240) for _ in range(rng.randint(4, 12))] for _ in prompts]
    schedule, one_token_chunks = chunked.scheduler.schedule, []

    def schedule_and_note() -> Any:
        out = schedule()
        one_token_chunks.extend(e for e in out.prefills if e.num_new_tokens == 1 and not e.samples)
        return out

    chunked.scheduler.schedule = schedule_and_note
    got = chunked.teacher_forced_logits(prompts, continuations)
    want = whole.teacher_forced_logits(prompts, continuations)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    assert one_token_chunks, "no step ran a one-token chunk mid-prompt: the case is not exercised"
    for llm in (chunked, whole):
        assert_idle(llm)


def test_one_token_requests_and_teacher_forcing_overlap_exactly() -> None:
    overlapped, synchronous = pair(**TIGHT)
    prompts, _ = workload(seed=2, count=7)
    params = SamplingParams(max_tokens=1, ignore_eos=True)
    assert [o.token_ids for o in overlapped.generate(prompts, params)] == [
        o.token_ids for o in synchronous.generate(prompts, params)
    ]
    continuations = [[(7 * i + j) % 10240 for j in range(1 + i % 5)] for i in range(len(prompts))]
    got = overlapped.teacher_forced_logits(prompts, continuations)
    want = synchronous.teacher_forced_logits(prompts, continuations)
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    for llm in (overlapped, synchronous):
        assert_idle(llm)


@pytest.fixture(scope="module")
def eos_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """A checkpoint written by transformers whose EOS id is a token its greedy outputs produce."""
    from transformers import Qwen2Config

    path = write_qwen2_checkpoint(tmp_path_factory.mktemp("eos"), tied=True, heads=4, kv_heads=2, seed=3)
    free_running = LLM(str(path), device="cpu", max_model_len=96, kv_cache_capacity=1024)
    outputs = free_running.generate(PROMPTS_512, SamplingParams(max_tokens=24, ignore_eos=True))
    eos = outputs[0].token_ids[5]
    config = Qwen2Config.from_pretrained(path)
    config.eos_token_id = eos
    config.save_pretrained(path)
    return path, eos


PROMPTS_512 = [[(13 * i + 7 * j) % 512 for j in range(3 + 5 * i)] for i in range(6)]


def test_an_eos_learned_a_step_late_ends_the_request_where_the_synchronous_engine_ends_it(
    eos_checkpoint: tuple[Path, int],
) -> None:
    path, eos = eos_checkpoint
    overlapped, synchronous = pair(str(path), device="cpu", max_model_len=96, kv_cache_capacity=1024)
    params = SamplingParams(max_tokens=24)
    want = [o.token_ids for o in synchronous.generate(PROMPTS_512, params)]
    got = [o.token_ids for o in overlapped.generate(PROMPTS_512, params)]
    assert got == want
    stopped = [t for t in want if t[-1] == eos]
    assert stopped and all(eos not in t[:-1] for t in want), "EOS must end requests, at its first occurrence"
    assert any(len(t) < 24 for t in want)
    for llm in (overlapped, synchronous):
        assert_idle(llm)
    # Overlapping, a request that stops on EOS was scheduled once more before its EOS was known.
    assert sum(s.num_seqs for s in overlapped.step_stats) > sum(s.num_seqs for s in synchronous.step_stats)


class WatchedBackend(NativeBackend):
    """Native attention that holds one decode step's device work until the engine has launched the next step,
    and records each step's input token ids, so a test sees what the host did while the device was busy."""

    def __init__(self, context: AttentionContext) -> None:
        super().__init__(context)
        self.engine: LLM | None = None
        self.hold_step: int | None = None  # the step (1-based, launched steps) to hold in its first layer
        self.steps = 0
        self.inputs: list[list[int]] = []
        self.seen: dict[str, Any] = {}
        self.launched = threading.Event()

    @hookimpl
    def prepare_attention_metadata(self, batch: StepBatch) -> object:
        self.steps += 1
        self.layer = 0
        self.batch = batch
        return super().prepare_attention_metadata(batch=batch)

    @hookimpl
    def attention(
        self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: Any, scale: float, output: torch.Tensor
    ) -> bool:
        if self.layer == 0:
            self.inputs.append(self.batch.input_ids[: self.batch.num_actual_seqs].tolist())
            if self.steps == self.hold_step:
                self._hold()
        self.layer += 1
        return super().attention(query=query, kv_cache=kv_cache, metadata=metadata, scale=scale, output=output)

    def _hold(self) -> None:
        """Wait (in the device's work, mid-forward) until the engine launches the step after this one."""
        llm = self.engine
        assert llm is not None
        deadline = 60.0 if llm.config.async_scheduling else 2.0
        self.seen["launched_next"] = _wait_for(lambda: len(llm.step_stats) > self.steps, deadline)
        # What the host knows of this step's tokens at that moment: nothing yet, since they are not sampled.
        self.seen["host_tokens"] = [seq.num_output_tokens for seq in llm.scheduler.running]


def _wait_for(condition: Callable[[], bool], seconds: float) -> bool:
    event = threading.Event()
    for _ in range(int(seconds * 100)):
        if condition():
            return True
        event.wait(0.01)
    return condition()


class WatchedPlugin:
    def __init__(self) -> None:
        self.backends: list[WatchedBackend] = []

    def create(self, context: AttentionContext) -> WatchedBackend:
        self.backends.append(WatchedBackend(context))
        return self.backends[-1]

    @hookimpl
    def register_backends(self, register: Callable[[BackendSpec], None]) -> None:
        register(
            BackendSpec(
                "watched", self.create, Capabilities(devices=("cpu",), dtypes=("float32",)),
                contract_version=CONTRACT_VERSION,
            )
        )


@pytest.mark.parametrize("overlap", [True, False])
def test_the_next_step_is_prepared_while_this_one_runs_and_its_tokens_stay_on_the_device(overlap: bool) -> None:
    plugin = WatchedPlugin()
    llm = LLM("random:qwen2-tiny-wide", backend="watched", plugins=[plugin], device="cpu", max_model_len=64,
              kv_cache_capacity=512, warm_up=False, async_scheduling=overlap)
    backend = plugin.backends[-1]
    backend.engine, backend.hold_step = llm, 4  # a decode step: prompts take the first
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6], [5, 3, 5, 8, 9, 7]]
    outputs = llm.generate(prompts, SamplingParams(max_tokens=8, ignore_eos=True))
    assert backend.seen["launched_next"] is overlap, "the next step was (not) launched while step 4 ran"
    if overlap:
        # Step 4's tokens were not on the host when step 5 was launched (step 4 had not sampled them), yet step
        # 5's inputs are exactly those tokens: they went from the sampler to step 5's input on the device.
        assert backend.seen["host_tokens"] == [3, 3, 3]
    tokens_of_step_4 = [o.token_ids[3] for o in outputs]
    assert backend.inputs[4] == tokens_of_step_4
    # And every decode step's inputs are the tokens the step before produced.
    for step in range(1, 8):
        assert backend.inputs[step] == [o.token_ids[step - 1] for o in outputs]
    assert_idle(llm)
