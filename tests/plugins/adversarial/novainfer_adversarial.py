"""Backends built to slip past a weak verdict: each is native's attention, made wrong in one way only.

wrong-when-mixed:     zeros in every step that mixes decodes with prefill chunks.
wrong-when-continued: zeros for prefill chunks that continue a prefix already in the cache.
wrong-past-48-keys:   zeros for sequences longer than 48 tokens.
wrong-in-graphs:      halves the output only inside a captured CUDA graph (eager calls are right).
drops-token:          right attention, but the engine returns request 0 one token short.
moves-token:          right attention, but one token of request 0 is reported as request 1's (total unchanged).
slow-but-right:       right, and 20 ms slower per step: an honest backend a sweep must keep "ok".
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from novainfer.batch import StepBatch
from novainfer.engine import LLM, RequestOutput
from novainfer.hookspecs import hookimpl
from novainfer.plugins import AttentionContext, BackendSpec, Capabilities
from novainfer_native.backend import NativeBackend

WRONG_PAST_KEYS = 48


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
    def attention(self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: Any, scale: float) -> torch.Tensor:
        out = super().attention(query=query, kv_cache=kv_cache, metadata=metadata.native, scale=scale)
        for start, end in self.wrong_rows(metadata.batch):
            out[start:end] = 0
        return out


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
    def attention(self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: Any, scale: float) -> torch.Tensor:
        out = super().attention(query=query, kv_cache=kv_cache, metadata=metadata, scale=scale)
        return out * 0.5 if torch.cuda.is_current_stream_capturing() else out


class SlowButRight(NativeBackend):
    @hookimpl
    def prepare_attention_metadata(self, batch: StepBatch) -> Any:
        time.sleep(0.02)
        return super().prepare_attention_metadata(batch=batch)


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
    }
    for name, create in backends.items():
        register(BackendSpec(name, create, caps))
