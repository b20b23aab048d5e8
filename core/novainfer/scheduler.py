"""Continuous batching in the style of vLLM v1: one token budget per step, running requests first.

Each step, running requests (decodes, and prompts part-way through chunked prefill) are served in admission
order, then waiting requests are admitted while the token budget and the sequence cap allow. A prompt longer
than the remaining budget is split into chunks. When blocks run out, the most recently admitted running request
is preempted: its blocks are freed and it is recomputed later from its tokens so far, so nothing is lost and
nothing crashes.

The scheduler decides from counts alone, never from token values, so it can schedule the next step while this
one runs (asynchronous scheduling, as vLLM's): `schedule` advances each sequence's counts as if the step had
run, counting a sampled token before its value is known, and retires a sequence that reaches its length then;
`update` takes in the sampled values when they arrive (a step late when the engine overlaps), and only an EOS
stop is learned there, one step late: the token the next step samples for that sequence is dropped. Running
sequences live in rows of a RunningBatch, so a step's bookkeeping is numpy over rows; only a change (an
admission, a finish, a preemption, a new block) costs Python per sequence.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from novainfer.block_manager import BlockManager, blocks_for
from novainfer.running_batch import RunningBatch
from novainfer.sequence import Sequence, SequenceStatus

_NO_ROWS = np.zeros(0, dtype=np.int64)


@dataclass(frozen=True)
class ScheduledSeq:
    """One sequence of a step: `num_new_tokens` tokens from position `start`; it `samples` when they reach the
    end of its tokens, so the step yields its next token."""

    seq: Sequence
    num_new_tokens: int
    start: int
    samples: bool

    @classmethod
    def of(cls, seq: Sequence, num_new_tokens: int) -> ScheduledSeq:
        """`seq`'s next `num_new_tokens` tokens, from its count of computed tokens now."""
        start = seq.num_computed_tokens
        return cls(seq, num_new_tokens, start, start + num_new_tokens == seq.num_tokens)


@dataclass(frozen=True, eq=False)
class SchedulerOutput:
    """One step's batch: decodes first, then prefill chunks, each in admission order. A decode is one new token
    that completes its sequence's tokens (it samples); a chunk may be one token too, left by the budget mid-prompt.

    From the scheduler, the decodes are rows of its RunningBatch (`decode_rows`, at positions `decode_starts`):
    no Python object per sequence. `sample_rows`, `sample_ids` and `sample_positions` say where each token the
    step samples goes (the decodes', then those of the prefill chunks that sample), for `Scheduler.update`.
    `entries` lists every sequence as a ScheduledSeq, for checks and plans: built on first use, from the rows as
    they are then, so read it before the scheduler's next step. A step built by hand (`SchedulerOutput.of`) has
    its entries and no rows.
    """

    prefills: tuple[ScheduledSeq, ...]
    num_decodes: int
    batch: RunningBatch | None = None
    decode_rows: np.ndarray = field(default_factory=lambda: _NO_ROWS)
    decode_starts: np.ndarray = field(default_factory=lambda: _NO_ROWS)
    sample_rows: np.ndarray = field(default_factory=lambda: _NO_ROWS)
    sample_ids: np.ndarray = field(default_factory=lambda: _NO_ROWS)
    sample_positions: np.ndarray = field(default_factory=lambda: _NO_ROWS)
    given_decodes: tuple[ScheduledSeq, ...] = ()
    index: int = -1  # the scheduler's count of steps before this one

    @classmethod
    def of(cls, entries: Seq[ScheduledSeq], num_decodes: int) -> SchedulerOutput:
        """A step of these sequences (its first `num_decodes` are its decodes), outside any scheduler."""
        return cls(tuple(entries[num_decodes:]), num_decodes, given_decodes=tuple(entries[:num_decodes]))

    @cached_property
    def entries(self) -> list[ScheduledSeq]:
        if self.batch is None:
            return [*self.given_decodes, *self.prefills]
        seqs = self.batch.seqs
        rows, starts = self.decode_rows.tolist(), self.decode_starts.tolist()
        decodes = [ScheduledSeq(seqs[r], 1, s, True) for r, s in zip(rows, starts)]
        return [*decodes, *self.prefills]

    @cached_property
    def num_tokens(self) -> int:
        return self.num_decodes + sum(e.num_new_tokens for e in self.prefills)

    @property
    def num_seqs(self) -> int:
        return self.num_decodes + len(self.prefills)

    @cached_property
    def num_sampled(self) -> int:
        """Tokens the step samples: one per sequence whose tokens it completes."""
        if self.batch is not None:
            return len(self.sample_rows)
        return sum(e.samples for e in self.entries)


class Scheduler:
    def __init__(
        self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int
    ) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        bs = block_manager.block_size
        self.batch = RunningBatch(max_num_seqs, max_model_len, blocks_for(max_model_len, bs), bs)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self._rows = _NO_ROWS  # their rows, in the same order
        # Sequences that left their rows (finished, preempted) while a step that samples for them may still be
        # in flight, with the number of steps scheduled when they left: their tokens arrive here.
        self._departed: dict[int, tuple[Sequence, int]] = {}
        self._retiring: list[Sequence] = []
        self._steady = False  # see `_schedule_same_decodes`
        self._row_ids = _NO_ROWS
        self.num_scheduled = 0
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

    def has_work(self) -> bool:
        """Whether a step can be scheduled: requests waiting, or running and not retiring."""
        return bool(self.waiting) or len(self.running) > len(self._retiring)

    def has_unfinished(self) -> bool:
        """Whether any request is not finished: waiting, running, or retired by length with its last token due."""
        return (
            self.has_work()
            or bool(self._retiring)
            or any(s.status is SequenceStatus.RUNNING for s, _ in self._departed.values())
        )

    def schedule(self) -> SchedulerOutput:
        """The next step, with every scheduled sequence's counts advanced past it (see the module docstring)."""
        self._retire()
        if self._steady and (not self.waiting or len(self.running) >= self.max_num_seqs):
            out = self._schedule_same_decodes()
            if out is not None:
                return out
        b, bm = self.batch, self.block_manager
        budget = self.max_num_batched_tokens
        rows = self._rows
        want = b.num_tokens[rows] - b.num_computed[rows]
        take = np.minimum(want, np.clip(budget - (np.cumsum(want) - want), 0, None))
        new_blocks = np.maximum(-(-(b.num_computed[rows] + take) // bm.block_size) - b.num_blocks[rows], 0)
        preempted = False
        if int(new_blocks.sum()) <= bm.num_free_blocks:
            self._allocate(rows, new_blocks)
        else:
            take, preempted = self._schedule_running_with_preemption(budget)
            rows = self._rows
        budget -= int(take.sum())
        scheduled = take > 0
        rows, take = rows[scheduled], take[scheduled]
        # Admitting new requests in a step that had to preempt would only preempt again.
        admitted: list[tuple[int, int]] = []
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            # With prefix caching, the longest cached run of its prompt's blocks is taken as computed.
            hits = bm.cached_prefix(seq)
            cached = len(hits) * bm.block_size
            n = min(seq.num_tokens - cached, budget)
            if blocks_for(cached + n, bm.block_size) - len(hits) + bm.num_reclaimed(hits) > bm.num_free_blocks:
                break
            self.waiting.popleft()
            if bm.cache is not None:
                looked_up = min(seq.num_prompt_tokens, seq.num_tokens - 1) // bm.block_size
                bm.cache.record(seq.num_prompt_tokens, looked_up, len(hits), bm.block_size, seq.num_admissions > 0)
            bm.share(seq, hits)
            seq.num_computed_tokens = seq.num_cached_tokens = cached
            seq.num_admissions += 1
            bm.allocate(seq, cached + n)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            admitted.append((b.attach(seq), n))
            budget -= n
        if admitted:
            new_rows, new_take = np.array(admitted, dtype=np.int64).T
            self._rows = np.concatenate([self._rows, new_rows])
            rows, take = np.concatenate([rows, new_rows]), np.concatenate([take, new_take])
        out = self._advance(rows, take)
        # Every running sequence decoded and sampled, and none came or went: the next step, unless one does,
        # is the same sequences' decodes again (`_schedule_same_decodes`).
        self._steady = out.num_decodes == len(self._rows) == len(out.sample_rows) and not self._retiring
        self._row_ids = out.sample_ids
        self.num_scheduled += 1
        return out

    def _schedule_same_decodes(self) -> SchedulerOutput | None:
        """The step after a steady one (every running sequence decoded, none came or went since): the same
        decodes, as the general path would schedule them, in a handful of array operations. None when the budget
        or the free blocks fall short, for the general path to handle."""
        b, bm, rows = self.batch, self.block_manager, self._rows
        if len(rows) > self.max_num_batched_tokens:
            return None
        starts = b.num_computed[rows]
        grow = np.flatnonzero(starts >= b.num_blocks[rows] * bm.block_size)  # entering a block they lack
        if len(grow) > bm.num_free_blocks:
            return None
        if len(grow):
            grown = rows[grow]
            b.tables[grown, b.num_blocks[grown]] = bm.take(len(grow))
            b.num_blocks[grown] += 1
        positions = starts + 1
        b.num_computed[rows] = positions
        b.num_tokens[rows] = positions + 1
        out = SchedulerOutput(
            (), len(rows), b, rows, starts, rows, self._row_ids, positions, index=self.num_scheduled
        )
        done = np.flatnonzero(positions + 1 >= b.limit[rows])
        if len(done):
            self._retiring = [b.seqs[row] for row in rows[done].tolist()]
            self._steady = False
        self.num_scheduled += 1
        return out

    def _allocate(self, rows: np.ndarray, new_blocks: np.ndarray) -> None:
        """Give `rows` their `new_blocks` counts of blocks at once (the caller checked there are enough)."""
        grow = np.flatnonzero(new_blocks)
        if grow.size == 0:
            return
        b = self.batch
        rows, counts = rows[grow], new_blocks[grow]
        blocks = self.block_manager.take(int(counts.sum()))
        first = np.cumsum(counts) - counts
        columns = np.repeat(b.num_blocks[rows], counts) + np.arange(len(blocks)) - np.repeat(first, counts)
        b.tables[np.repeat(rows, counts), columns] = blocks
        b.num_blocks[rows] += counts

    def _schedule_running_with_preemption(self, budget: int) -> tuple[np.ndarray, bool]:
        """The running requests one by one, preempting the newest whenever blocks run out: the take of each
        request still running, in order, and whether any was preempted."""
        bm = self.block_manager
        take: list[int] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed_tokens, budget)
            while not bm.can_allocate(seq, seq.num_computed_tokens + n):
                victim = self.running.pop()  # the most recently admitted; never one already scheduled
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                bm.allocate(seq, seq.num_computed_tokens + n)
                take.append(n)
                budget -= n
                i += 1
                continue
            break
        self._rows = np.array([s.row for s in self.running], dtype=np.int64)
        return np.array(take + [0] * (len(self.running) - len(take)), dtype=np.int64), preempted

    def _advance(self, rows: np.ndarray, take: np.ndarray) -> SchedulerOutput:
        """Count the step in: computed tokens advance, a sampled token is counted (its value comes to `update`),
        and a sequence that reaches its length leaves its row now, before the next step is scheduled."""
        b = self.batch
        starts = b.num_computed[rows]
        b.num_computed[rows] = starts + take
        samples = starts + take == b.num_tokens[rows]
        # A decode is one token that completes its sequence's tokens, so it samples; a one-token chunk left by
        # the budget in the middle of a prompt is a prefill chunk (it samples nothing).
        decode = (take == 1) & samples
        prefill = np.flatnonzero(~decode)
        prefills = tuple(
            ScheduledSeq(b.seqs[r], n, s, smp)
            for r, n, s, smp in zip(rows[prefill].tolist(), take[prefill].tolist(), starts[prefill].tolist(),
                                    samples[prefill].tolist())
        )
        sample_rows = np.concatenate([rows[decode], rows[prefill][samples[prefill]]])
        positions = b.num_tokens[sample_rows]
        b.num_tokens[sample_rows] = positions + 1
        out = SchedulerOutput(
            prefills, int(decode.sum()), b, rows[decode], starts[decode], sample_rows, b.seq_ids[sample_rows],
            positions, index=self.num_scheduled,
        )
        if self.block_manager.cache is not None:
            self._name_full_prompt_blocks(rows, starts + take)
        # Finished by length, their last token in flight: they leave their rows before anything else happens
        # (the next schedule or update), so `out.entries` can still be read until then.
        self._retiring = [b.seqs[row] for row in sample_rows[positions + 1 >= b.limit[sample_rows]].tolist()]
        return out

    def _name_full_prompt_blocks(self, rows: np.ndarray, computed: np.ndarray) -> None:
        """Enter in the prefix cache the prompt blocks this step fills. A request admitted in a later step can
        then share them (one admitted in this step does not: its lookup came first)."""
        b, bs = self.batch, self.block_manager.block_size
        full = np.minimum(computed, b.prompt_len[rows]) // bs
        for i in np.flatnonzero(full > b.named[rows]).tolist():
            row, first, last = int(rows[i]), int(b.named[rows[i]]), int(full[i])
            names = b.seqs[row].prompt_block_names(bs)[first:last]
            self.block_manager.name_blocks(b.tables[row, first:last].tolist(), names)
            b.named[row] = last

    def _retire(self) -> None:
        for seq in self._retiring:
            self._leave(seq)
        self._retiring = []

    def update(self, out: SchedulerOutput, tokens: Seq[int] | np.ndarray, eos_token_id: int | None) -> list[Sequence]:
        """Take in the values of the tokens a step sampled (`tokens`, in `out.sample_rows` order), however late
        they come; returns the requests this finishes (their last token in, or an EOS). Out of the scheduler's
        hands by now: a token for a sequence that has finished (by EOS, or aborted) is dropped."""
        self._retire()
        b = self.batch
        values = np.asarray(tokens, dtype=np.int64)
        rows, ids, positions = out.sample_rows, out.sample_ids, out.sample_positions
        here = b.seq_ids[rows] == ids
        away = [] if here.all() else np.flatnonzero(~here).tolist()  # sequences that left their rows since
        held = values
        if away:
            rows, positions, held = rows[here], positions[here], values[here]
        b.tokens[rows, positions] = held
        b.num_known[rows] = positions + 1
        finished: list[Sequence] = []
        if eos_token_id is not None:
            for row in rows[(held == eos_token_id) & b.stops_on_eos[rows]].tolist():
                seq = b.seqs[row]
                self._leave(seq)
                seq.num_tokens = len(seq.token_ids)  # a token the next step samples for it is dropped
                seq.status = SequenceStatus.FINISHED
                finished.append(seq)
        for i in away:
            seq = self._departed[int(ids[i])][0]
            if seq.status is SequenceStatus.FINISHED:
                continue
            token = int(values[i])
            seq.receive(token)
            eos = eos_token_id is not None and token == eos_token_id and not seq.params.ignore_eos
            if eos or seq.num_output_tokens >= seq.params.max_tokens:
                if seq.status is SequenceStatus.WAITING:  # preempted with this token in flight
                    self.waiting.remove(seq)
                seq.num_tokens = len(seq.token_ids)
                seq.status = SequenceStatus.FINISHED
                finished.append(seq)
        # Steps scheduled after a sequence left cannot sample for it: once this one is in, forget those left before.
        self._departed = {k: v for k, v in self._departed.items() if v[1] > out.index}
        return finished

    def abort(self, seqs: Seq[Sequence]) -> None:
        """Drop requests that will not be finished (the call that queued them failed): take them out of the
        waiting and running queues and give their KV blocks back, so the scheduler is as if they never came.
        They are marked FINISHED, so aborting twice is harmless, and a token still in flight for one is dropped;
        requests already finished are left alone."""
        self._retire()
        for seq in seqs:
            if seq.status is SequenceStatus.FINISHED:
                continue
            if seq.batch is not None:
                self._leave(seq)
            elif seq.status is SequenceStatus.WAITING and seq in self.waiting:
                self.waiting.remove(seq)
            self.block_manager.free(seq)
            seq.status = SequenceStatus.FINISHED

    def recover(self) -> None:
        """Forget every step not yet taken in (a step failed, so their tokens will never come): each unfinished
        request goes back to waiting, to be recomputed from the tokens it has, as a preempted one is."""
        self._retire()
        for seq in reversed(list(self.running)):
            self.running.remove(seq)
            self._preempt(seq, counted=False)
        self._rows = _NO_ROWS
        for seq, _ in self._departed.values():
            if seq.status is SequenceStatus.RUNNING:  # retired by length, its last token lost
                seq.status = SequenceStatus.WAITING
                self.waiting.appendleft(seq)
        for seq in self.waiting:
            seq.num_tokens = len(seq.token_ids)
        self._departed.clear()

    def _leave(self, seq: Sequence) -> None:
        """Take a running `seq` out of the running requests and its row, its blocks freed; a token a scheduled
        step samples for it will come to `update` through `_departed`."""
        self.running.remove(seq)
        self._rows = self._rows[self._rows != seq.row]
        self._steady = False
        self.block_manager.free(seq)
        self.batch.detach(seq)
        self._departed[seq.seq_id] = (seq, self.num_scheduled)

    def _preempt(self, seq: Sequence, counted: bool = True) -> None:
        """Back to waiting, blocks freed, to be recomputed from its tokens when it is admitted again (by then any
        token in flight for it has come)."""
        self._steady = False
        self.block_manager.free(seq)
        self.batch.detach(seq)
        self._departed[seq.seq_id] = (seq, self.num_scheduled)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += counted
