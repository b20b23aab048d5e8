"""Continuous batching in the style of vLLM v1: one token budget per step, running requests first.

Each step, running requests (decodes, and prompts part-way through chunked prefill) are served
in admission order, then waiting requests are admitted while the token budget and the sequence
cap allow. A prompt longer than the remaining budget is split into chunks. When blocks run out,
the most recently admitted running request is preempted: its blocks are freed and it is
recomputed later from its tokens so far, so nothing is lost and nothing crashes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence as Seq
from dataclasses import dataclass

from novainfer.block_manager import BlockManager, blocks_for
from novainfer.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # this step's query length

    @property
    def samples(self) -> bool:
        """Whether this step reaches the end of the sequence's tokens, so it yields a new token."""
        return self.seq.num_computed_tokens + self.num_new_tokens == len(self.seq)


@dataclass(frozen=True)
class SchedulerOutput:
    """One step's batch: decodes (query length 1) first, then prefill chunks."""

    entries: list[ScheduledSeq]
    num_decodes: int

    @property
    def num_tokens(self) -> int:
        return sum(e.num_new_tokens for e in self.entries)


class Scheduler:
    def __init__(
        self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int
    ) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.num_preemptions = 0

    def check(self, seq: Sequence) -> None:
        """Raise ValueError (one line) for a request that could never run: an empty prompt, one longer than
        max_model_len, or one whose full length needs more KV blocks than the cache has. The one place these
        rules live: `add` applies them, and the engine calls this to refuse a whole batch before queueing any."""
        if seq.num_prompt_tokens == 0:
            raise ValueError("the prompt is empty; a request needs at least one prompt token")
        total = seq.num_prompt_tokens + seq.params.max_tokens
        if total > self.max_model_len:
            raise ValueError(
                f"request of {seq.num_prompt_tokens} prompt tokens + {seq.params.max_tokens} output tokens "
                f"= {total} exceeds max_model_len {self.max_model_len}"
            )
        blocks = blocks_for(total, self.block_manager.block_size)
        if blocks > self.block_manager.num_usable_blocks:
            raise ValueError(
                f"request needs {blocks} KV blocks but the cache has {self.block_manager.num_usable_blocks}"
            )

    def add(self, seq: Sequence) -> None:
        """Queue a request; rejects one that could never run (see `check`)."""
        self.check(seq)
        self.waiting.append(seq)

    def abort(self, seqs: Seq[Sequence]) -> None:
        """Drop requests that will not be finished (the call that queued them failed): take them out of the
        waiting and running queues and give their KV blocks back, so the scheduler is as if they never came.
        They are marked FINISHED, so aborting twice is harmless; requests already finished are left alone."""
        ids = {seq.seq_id for seq in seqs if seq.status is not SequenceStatus.FINISHED}
        self.waiting = deque(seq for seq in self.waiting if seq.seq_id not in ids)
        self.running = [seq for seq in self.running if seq.seq_id not in ids]
        for seq in seqs:
            if seq.seq_id in ids:
                self.block_manager.free(seq)
                seq.status = SequenceStatus.FINISHED

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed_tokens, budget)
            while not self.block_manager.can_allocate(seq, seq.num_computed_tokens + n):
                victim = self.running.pop()  # the most recently admitted; never one already scheduled
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                self.block_manager.allocate(seq, seq.num_computed_tokens + n)
                scheduled.append(ScheduledSeq(seq, n))
                budget -= n
                i += 1
                continue
            break
        # Admitting new requests in a step that had to preempt would only preempt again.
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            n = min(seq.num_uncomputed_tokens, budget)
            if not self.block_manager.can_allocate(seq, n):
                break
            self.waiting.popleft()
            self.block_manager.allocate(seq, n)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append(ScheduledSeq(seq, n))
            budget -= n
        decodes = [e for e in scheduled if e.num_new_tokens == 1]
        prefills = [e for e in scheduled if e.num_new_tokens != 1]
        return SchedulerOutput(entries=decodes + prefills, num_decodes=len(decodes))

    def update(self, output: SchedulerOutput, sampled: dict[int, int], eos_token_id: int | None) -> list[Sequence]:
        """Record a finished step: advance computed counts, append sampled tokens, retire finished requests."""
        finished = []
        for entry in output.entries:
            seq = entry.seq
            samples = entry.samples
            seq.num_computed_tokens += entry.num_new_tokens
            if not samples:
                continue
            token = sampled[seq.seq_id]
            seq.token_ids.append(token)
            hit_eos = not seq.params.ignore_eos and eos_token_id is not None and token == eos_token_id
            if hit_eos or seq.num_output_tokens >= seq.params.max_tokens:
                seq.status = SequenceStatus.FINISHED
                self.block_manager.free(seq)
                self.running.remove(seq)
                finished.append(seq)
        return finished

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
