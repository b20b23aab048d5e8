"""Backends built to slip past a weak verdict: each is native's attention, made wrong in one way only.

wrong-when-mixed:        zeros in every step that mixes decodes with prefill chunks.
wrong-when-continued:    zeros for prefill chunks that continue a prefix already in the cache.
wrong-past-48-keys:      zeros for sequences longer than 48 tokens.
wrong-in-graphs:         halves the output only inside a captured CUDA graph (eager calls are right).
drops-token:             right attention, but the engine returns request 0 one token short.
moves-token:             right attention, but one token of request 0 is reported as request 1's (total unchanged).
slow-but-right:          right, and 20 ms slower per step: an honest backend a sweep must keep "ok".
wrong-in-first-engine:   zeros in every step of the process's first instance only (the timed engine is built first).
wrong-after-24-steps:    zeros once the process has run more than 24 steps of it, over all its instances.
wrong-with-large-cache:  zeros when the engine's KV cache has more than 32 blocks; right in small caches.
wrong-unless-checked:    zeros unless a module named novainfer.ab.trial.gate* is on the call stack (the gate).
wrong-every-12th-step:   zeros in every 12th step of the process (12, 24, 36, ...), over all its instances.
wrong-at-max-seqs:       zeros in decode-only steps whose real sequences number exactly max_num_seqs.
wrong-in-row-3:          zeros row 3 only (the 4th decode) of decode-only steps of at least 4 sequences.
wrong-for-lengths-39-46: zeros for sequences whose length (cached prefix + this step's tokens) is 39 to 46.
small-uniform-error:     scales every attention output by 1.006: a 0.6% error everywhere, no row zeroed.
reuses-colliding-prefix: right attention, but the engine's prefix cache names a block by its place in the prompt
                         alone (a hash that collides): a request reuses another prompt's first blocks.
reuses-evicted-block:    right attention, but the engine's prefix cache keeps a block's name when the block is
                         handed out again: a request reuses a prefix whose tokens were overwritten.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

import novainfer.prefix_cache
import novainfer.sequence
from novainfer.backend_api import AttentionContext, BackendSpec, Capabilities, StepBatch, hookimpl
from novainfer.engine import LLM, RequestOutput
from novainfer_native.backend import NativeBackend

WRONG_PAST_KEYS = 48
WRONG_AFTER_STEPS = 24
LARGE_CACHE_BLOCKS = 32
WRONG_EVERY_STEPS = 12
WRONG_ROW = 3
WRONG_SEQ_LENS = range(39, 47)
CHECKER_MODULE = "novainfer.ab.trial.gate"
UNIFORM_ERROR = 1.006

# Process-wide state, on purpose: these fixtures cheat by behaving differently in different engines
# of one process, or later in its life, which only state shared by every instance can model. An
# honest backend never does this; a checker in the same process must not be fooled by it.
_first_engine_instances = 0  # WrongInFirstEngine instances created so far
_steps_run: dict[str, int] = {}  # per StepCounted class: prepare_attention_metadata calls, all instances


@dataclass(frozen=True)
class WithBatch:
    native: Any
    batch: StepBatch


class Adversary(NativeBackend):
    """Native attention with the rows `wrong_rows` names zeroed."""

    def wrong_rows(self, batch: StepBatch) -> list[tuple[int, int]]:
        return []

    @hookimpl
    def prepare_attention_metadata(self, batch: StepBatch) -> WithBatch:
        return WithBatch(super().prepare_attention_metadata(batch=batch), batch)

    @hookimpl
    def attention(
        self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: Any, scale: float, output: torch.Tensor
    ) -> bool:
        super().attention(query=query, kv_cache=kv_cache, metadata=metadata.native, scale=scale, output=output)
        for start, end in self.wrong_rows(metadata.batch):
            output[start:end] = 0
        return True


def _sequences(batch: StepBatch) -> list[tuple[int, int, int, int]]:
    """(first row, last row + 1, query length, sequence length) of every sequence of the step, from host copies."""
    starts, lens = batch.query_start_loc_cpu.tolist(), batch.seq_lens_cpu.tolist()
    return [(starts[b], starts[b + 1], starts[b + 1] - starts[b], lens[b]) for b in range(batch.num_seqs)]


class WrongWhenMixed(Adversary):
    def wrong_rows(self, batch: StepBatch) -> list[tuple[int, int]]:
        return [(0, batch.num_tokens)] if batch.num_decodes and batch.num_prefills else []


class WrongWhenContinued(Adversary):
    def wrong_rows(self, batch: StepBatch) -> list[tuple[int, int]]:
        prefills = _sequences(batch)[batch.num_decodes :]
        return [(start, end) for start, end, q_len, seq_len in prefills if seq_len > q_len]


class WrongPastKeys(Adversary):
    def wrong_rows(self, batch: StepBatch) -> list[tuple[int, int]]:
        return [(start, end) for start, end, _, seq_len in _sequences(batch) if seq_len > WRONG_PAST_KEYS]


class WrongInGraphs(NativeBackend):
    @hookimpl
    def attention(
        self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: Any, scale: float, output: torch.Tensor
    ) -> bool:
        super().attention(query=query, kv_cache=kv_cache, metadata=metadata, scale=scale, output=output)
        if torch.cuda.is_current_stream_capturing():
            output.mul_(0.5)
        return True


class SlowButRight(NativeBackend):
    @hookimpl
    def prepare_attention_metadata(self, batch: StepBatch) -> Any:
        time.sleep(0.02)
        return super().prepare_attention_metadata(batch=batch)


def _decode_only(batch: StepBatch) -> bool:
    """Whether the step holds decodes only (a graph batch always does: its padding rows are dummy decodes)."""
    return not batch.num_prefills


def _called_from(prefix: str) -> bool:
    """Whether any frame on the call stack runs code of a module whose name starts with `prefix`."""
    frame = sys._getframe(1)
    while frame is not None:
        if str(frame.f_globals.get("__name__", "")).startswith(prefix):
            return True
        frame = frame.f_back
    return False


class StepCounted(Adversary):
    """An adversary that numbers its steps process-wide (1, 2, ...), over every instance of its class."""

    step = 0

    @hookimpl
    def prepare_attention_metadata(self, batch: StepBatch) -> WithBatch:
        # Once per step; the step's attention calls (one per layer) then read self.step.
        name = type(self).__name__
        _steps_run[name] = self.step = _steps_run.get(name, 0) + 1
        return super().prepare_attention_metadata(batch=batch)


class WrongInFirstEngine(Adversary):
    """Wrong in the first instance the process creates, right in every later one."""

    def __init__(self, context: AttentionContext) -> None:
        global _first_engine_instances
        super().__init__(context)
        self.instance = _first_engine_instances
        _first_engine_instances += 1

    def wrong_rows(self, batch: StepBatch) -> list[tuple[int, int]]:
        return [(0, batch.num_tokens)] if self.instance == 0 else []


class WrongAfterSteps(StepCounted):
    """Right for the process's first 24 steps of it, wrong from step 25 on."""

    def wrong_rows(self, batch: StepBatch) -> list[tuple[int, int]]:
        return [(0, batch.num_tokens)] if self.step > WRONG_AFTER_STEPS else []


class WrongWithLargeCache(Adversary):
    """Wrong in engines whose KV cache has more than 32 blocks: a check with a small cache passes it."""

    def wrong_rows(self, batch: StepBatch) -> list[tuple[int, int]]:
        return [(0, batch.num_tokens)] if self.context.num_blocks > LARGE_CACHE_BLOCKS else []


class WrongUnlessChecked(Adversary):
    """Right while the correctness gate is on the call stack, wrong everywhere else."""

    checked = False

    @hookimpl
    def prepare_attention_metadata(self, batch: StepBatch) -> WithBatch:
        # One stack walk per step, not one per layer: the stack is the same for all of its layers.
        self.checked = _called_from(CHECKER_MODULE)
        return super().prepare_attention_metadata(batch=batch)

    def wrong_rows(self, batch: StepBatch) -> list[tuple[int, int]]:
        return [] if self.checked else [(0, batch.num_tokens)]


class WrongEveryNthStep(StepCounted):
    """Wrong in the process's steps 12, 24, 36, ... of it: a check of a few steps likely misses them."""

    def wrong_rows(self, batch: StepBatch) -> list[tuple[int, int]]:
        return [(0, batch.num_tokens)] if self.step % WRONG_EVERY_STEPS == 0 else []


class WrongAtMaxSeqs(Adversary):
    """Wrong in decode-only steps that hold exactly max_num_seqs real sequences, the full batch."""

    def wrong_rows(self, batch: StepBatch) -> list[tuple[int, int]]:
        full = _decode_only(batch) and batch.num_actual_seqs == self.context.max_num_seqs
        return [(0, batch.num_tokens)] if full else []


class WrongInRow(Adversary):
    """Wrong in one row only, the 4th decode's, so a check of a step's first rows or its mean misses it."""

    def wrong_rows(self, batch: StepBatch) -> list[tuple[int, int]]:
        if _decode_only(batch) and batch.num_actual_seqs > WRONG_ROW:
            return [(WRONG_ROW, WRONG_ROW + 1)]
        return []


class WrongForLengths(Adversary):
    """Wrong for sequences of lengths 39 to 46 only, a band a check of short and long prompts skips."""

    def wrong_rows(self, batch: StepBatch) -> list[tuple[int, int]]:
        return [(start, end) for start, end, _, seq_len in _sequences(batch) if seq_len in WRONG_SEQ_LENS]


class SmallUniformError(NativeBackend):
    """Every output 0.6% too large: no row stands out, and a loose tolerance passes it."""

    @hookimpl
    def attention(
        self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: Any, scale: float, output: torch.Tensor
    ) -> bool:
        super().attention(query=query, kv_cache=kv_cache, metadata=metadata, scale=scale, output=output)
        output.mul_(UNIFORM_ERROR)
        return True


def _patch_outputs(change: Callable[[list[RequestOutput]], list[RequestOutput]]) -> None:
    """Make every LLM.generate of this process return `change(outputs)`: an engine that misreports tokens."""
    generate = LLM.generate
    if getattr(generate, "adversarial", False):
        return

    def patched(self: LLM, *args: Any, **kwargs: Any) -> list[RequestOutput]:
        return change(generate(self, *args, **kwargs))

    patched.adversarial = True  # type: ignore[attr-defined]
    LLM.generate = patched  # type: ignore[method-assign]


def _drop(outputs: list[RequestOutput]) -> list[RequestOutput]:
    return [replace(outputs[0], token_ids=outputs[0].token_ids[:-1]), *outputs[1:]]


def _move(outputs: list[RequestOutput]) -> list[RequestOutput]:
    if len(outputs) < 2:
        return outputs
    first, second = outputs[0], outputs[1]
    moved = [replace(first, token_ids=first.token_ids[:-1]), replace(second, token_ids=[*second.token_ids, 0])]
    return [*moved, *outputs[2:]]


def _colliding_names(tokens: Any, block_size: int) -> list[bytes]:
    return [index.to_bytes(16, "little") for index in range(len(tokens) // block_size)]


def _broken_prefix_cache(breakage: str) -> Callable[[AttentionContext], object]:
    """A backend whose creation breaks this process's prefix cache the way `breakage` says (the engine's
    blocks are the core's, so only patching the core can model a broken reuse)."""

    def create(context: AttentionContext) -> object:
        if breakage == "collide":
            novainfer.sequence.chain_hashes = _colliding_names
        else:
            novainfer.prefix_cache.PrefixCache.evict = lambda self, block: None
        return NativeBackend(context)

    return create


def _misreporting(change: Callable[[list[RequestOutput]], list[RequestOutput]]) -> Callable[[AttentionContext], object]:
    def create(context: AttentionContext) -> object:
        _patch_outputs(change)
        return NativeBackend(context)

    return create


@hookimpl
def register_backends(register: Callable[[BackendSpec], None]) -> None:
    caps = Capabilities(devices=("cpu", "cuda"), dtypes=("float32", "bfloat16", "float16"), cuda_graphs=True)
    backends: dict[str, Callable[[AttentionContext], object]] = {
        "wrong-when-mixed": WrongWhenMixed,
        "wrong-when-continued": WrongWhenContinued,
        "wrong-past-48-keys": WrongPastKeys,
        "wrong-in-graphs": WrongInGraphs,
        "drops-token": _misreporting(_drop),
        "moves-token": _misreporting(_move),
        "slow-but-right": SlowButRight,
        "wrong-in-first-engine": WrongInFirstEngine,
        "wrong-after-24-steps": WrongAfterSteps,
        "wrong-with-large-cache": WrongWithLargeCache,
        "wrong-unless-checked": WrongUnlessChecked,
        "wrong-every-12th-step": WrongEveryNthStep,
        "wrong-at-max-seqs": WrongAtMaxSeqs,
        "wrong-in-row-3": WrongInRow,
        "wrong-for-lengths-39-46": WrongForLengths,
        "small-uniform-error": SmallUniformError,
        "reuses-colliding-prefix": _broken_prefix_cache("collide"),
        "reuses-evicted-block": _broken_prefix_cache("keep names"),
    }
    for name, create in backends.items():
        register(BackendSpec(name, create, caps, contract_version=2))
