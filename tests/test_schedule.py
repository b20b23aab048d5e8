"""The planned schedule is the run's schedule, step for step, and its kinds name what each step exercises."""

from __future__ import annotations

import pytest

from novainfer import LLM, SamplingParams
from novainfer.ab.trial.schedule import (
    CONTINUED_CHUNK,
    FIRST_CHUNK,
    LONGEST_CONTEXT,
    MIXED,
    PREFILL,
    decode_class,
    plan_schedule,
)
from novainfer.ab.workload import Workload

WORKLOAD = Workload(num_seqs=8, input_len=(16, 64), output_len=(8, 32), seed=3)


@pytest.mark.parametrize(
    ("settings", "preempts"),
    [
        (dict(max_num_seqs=8, max_num_batched_tokens=512, kv_cache_capacity=1024), False),  # no chunking
        (dict(max_num_seqs=8, max_num_batched_tokens=40, kv_cache_capacity=1024), False),  # chunked prefill
        (dict(max_num_seqs=3, max_num_batched_tokens=64, block_size=8, kv_cache_capacity=1024), False),
        (dict(max_num_seqs=8, max_num_batched_tokens=64, kv_cache_capacity=192), True),  # preemption
    ],
)
def test_the_plan_is_the_steps_the_engine_takes(settings: dict, preempts: bool) -> None:
    llm = LLM("random:qwen2-tiny", device="cpu", max_model_len=128, warm_up=False, **settings)
    prompts, lens = WORKLOAD.prompts(), WORKLOAD.output_lens()
    plan = plan_schedule(
        [len(p) for p in prompts], lens, num_blocks=llm.block_manager.num_blocks,
        block_size=llm.config.block_size, max_num_seqs=llm.config.max_num_seqs,
        max_num_batched_tokens=llm.config.max_num_batched_tokens, max_model_len=128, cuda_graphs=False,
    )
    llm.generate(prompts, [SamplingParams(max_tokens=n, ignore_eos=True) for n in lens])
    ran = [(s.num_seqs, s.num_decode_tokens, s.num_prefill_tokens) for s in llm.step_stats]
    assert ran == [(p.num_seqs, p.num_decodes, p.tokens - p.num_decodes) for p in plan]
    assert (llm.scheduler.num_preemptions > 0) is preempts
    # Every request's outputs are accounted for: one sampled token per step that reaches its end.
    sampled = sum(1 for step in plan for e in step.entries if e.num_computed + e.num_new == e.length)
    assert sampled == sum(lens)


def test_kinds_name_what_each_step_exercises() -> None:
    prompts = [40, 40, 40]
    plan = plan_schedule(
        prompts, [4, 4, 20], num_blocks=64, block_size=16, max_num_seqs=4, max_num_batched_tokens=48,
        max_model_len=128, cuda_graphs=False,
    )
    first = plan[0]
    assert first.step_class == PREFILL and first.kinds == {PREFILL, FIRST_CHUNK}  # 40 + the first 8 of the next
    second = plan[1]
    # The second prompt continues (32 more), the third starts; the first now decodes beside them.
    assert {CONTINUED_CHUNK, FIRST_CHUNK, MIXED} <= second.kinds
    decode_only = [s for s in plan if s.step_class != PREFILL]
    assert decode_only and all(s.step_class == decode_class(s.num_seqs, 4) for s in decode_only)
    assert {s.step_class for s in decode_only} >= {"decode-b1", "decode-b4"}
    longest = [s for s in plan if LONGEST_CONTEXT in s.kinds]
    assert [s.index for s in longest] == [plan[-1].index] and longest[0].context == 59
    assert decode_class(3, 256) == "decode-b4" and decode_class(17, 256) == "decode-b32"
