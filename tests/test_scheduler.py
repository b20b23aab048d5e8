from __future__ import annotations

import pytest

from novainfer.block_manager import BlockManager
from novainfer.scheduler import Scheduler
from novainfer.sequence import SamplingParams, Sequence, SequenceStatus


def make(num_blocks: int = 64, block_size: int = 4, seqs: int = 4, tokens: int = 16, model_len: int = 64) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, block_size), seqs, tokens, model_len)


def add(s: Scheduler, prompt_len: int, max_tokens: int = 4) -> Sequence:
    seq = Sequence(list(range(prompt_len)), SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    s.add(seq)
    return seq


def run_step(s: Scheduler) -> list:
    out = s.schedule()
    s.update(out, [7] * out.num_sampled, eos_token_id=None)
    return out.entries


def test_budget_and_sequence_cap_are_respected_and_long_prompts_chunk() -> None:
    s = make(seqs=2, tokens=10)
    long, short, third = add(s, 25), add(s, 3), add(s, 3)
    out = s.schedule()
    assert out.num_tokens <= 10
    assert [(e.seq, e.num_new_tokens) for e in out.entries] == [(long, 10)]
    s.update(out, [], None)
    out = s.schedule()
    assert sum(e.num_new_tokens for e in out.entries) == 10 and len(s.running) <= 2
    assert third not in [e.seq for e in out.entries], "the sequence cap is 2"
    assert short.status is SequenceStatus.WAITING or short in s.running


def test_decodes_come_first_and_before_new_prefills() -> None:
    s = make(seqs=4, tokens=32)
    a = add(s, 5)
    run_step(s)  # a prefilled, sampled one token
    b = add(s, 6)
    out = s.schedule()
    assert [(e.seq, e.num_new_tokens) for e in out.entries] == [(a, 1), (b, 6)]
    assert out.num_decodes == 1


def test_preemption_frees_the_newest_and_it_resumes_to_completion() -> None:
    s = make(num_blocks=7, block_size=4, seqs=4, tokens=64, model_len=24)  # 6 usable blocks
    first, second = add(s, 8, max_tokens=8), add(s, 8, max_tokens=8)
    run_step(s)  # both prefilled: 4 blocks used
    preempted_at = None
    steps = 0
    while s.has_unfinished():
        run_step(s)
        steps += 1
        if preempted_at is None and s.num_preemptions:
            preempted_at = steps
            assert second.status is SequenceStatus.WAITING and second.block_table == []
            assert first.status is SequenceStatus.RUNNING
        assert steps < 100
    assert preempted_at is not None
    assert first.num_output_tokens == second.num_output_tokens == 8
    assert s.block_manager.num_free_blocks == s.block_manager.num_usable_blocks


def test_requests_that_cannot_fit_are_rejected_at_submission() -> None:
    s = make(model_len=20)
    with pytest.raises(ValueError, match="exceeds max_model_len 20"):
        add(s, 18, max_tokens=4)
    small = make(num_blocks=3, block_size=4, model_len=64)
    with pytest.raises(ValueError, match="needs 3 KV blocks but the cache has 2"):
        add(small, 8, max_tokens=4)


def test_eos_finishes_unless_ignored() -> None:
    s = make()
    seq = Sequence([1, 2, 3], SamplingParams(max_tokens=10))
    s.add(seq)
    out = s.schedule()
    finished = s.update(out, [99], eos_token_id=99)
    assert finished == [seq] and seq.output_token_ids == [99]
