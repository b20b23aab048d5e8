"""The user-facing engine: `LLM(...).generate(prompts, params)`, like vLLM's offline API."""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from novainfer.backend_api import AttentionContext, cuda_graph_sizes
from novainfer.block_manager import BlockManager, blocks_for
from novainfer.config import EngineConfig
from novainfer.cuda_graphs import capture_refusal
from novainfer.kv_cache import allocate_kv_caches, num_kv_blocks
from novainfer.model_runner import Launched, ModelRunner
from novainfer.models.presets import RANDOM_PREFIX
from novainfer.models.qwen2 import Qwen2ForCausalLM, build_model
from novainfer.plugins import RegisteredBackend, engine_plugin_manager, select_backend
from novainfer.scheduler import Scheduler
from novainfer.sequence import SamplingParams, Sequence

T = TypeVar("T")


@dataclass(frozen=True)
class RequestOutput:
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str | None = None

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class StepStats:
    """One launched step: its shape, and the host's seconds on it.

    schedule_s, prepare_s, launch_s: scheduling it, laying out its inputs, launching its device work (on CUDA,
        the kernel launches or the graph replay);
    wait_s:   the host waiting for its device work when its tokens were wanted (on the CPU without overlap, the
        device work itself, run there and then);
    update_s: taking its tokens in;
    hidden_s: how much of schedule_s + prepare_s + launch_s ran while the step before was still on the device
        (a lower bound: the time counts only when that step was seen unfinished once the launch was done);
    seconds:  wall time of the engine call that launched it.
    """

    num_prefill_tokens: int
    num_decode_tokens: int
    num_seqs: int
    num_sampled: int  # output tokens this step produces
    schedule_s: float = 0.0
    prepare_s: float = 0.0
    launch_s: float = 0.0
    wait_s: float = 0.0
    update_s: float = 0.0
    hidden_s: float = 0.0
    seconds: float = 0.0

    @property
    def host_s(self) -> float:
        """The host's own work on the step (waiting for the device excluded)."""
        return self.schedule_s + self.prepare_s + self.launch_s + self.update_s


@dataclass
class _Launched:
    launched: Launched
    stats: StepStats
    sampled: list[Sequence] | None  # the sampled rows' sequences, when their logits are wanted


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but CUDA is not available here")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


class LLM:
    """An engine over one model and one attention backend.

    `plugins` are registered in-process beside the installed ones; `observers` are hook wrappers
    (see novainfer.observers) registered with the engine's plugin manager. `shared_model` reuses
    another engine's weights (same model, dtype and device), so a reference engine for a
    correctness check costs no second copy. `warm_up=False` skips the dummy step at the largest
    shape (and its re-run after graph capture): for an engine that checks numbers, not one that is timed.
    `pad_decodes=True` (with cuda_graphs off) runs each decode-only step padded to its CUDA-graph size,
    eagerly, exactly as a replay would run it: how tests exercise the graph path on the CPU.
    `graph_mode` records what decode steps do: "cuda_graphs", "padded (eager)", "eager" or "eager (why)".
    """

    def __init__(
        self,
        model: str = "random:qwen2-tiny",
        *,
        plugins: Seq[object] = (),
        observers: Seq[object] = (),
        shared_model: Qwen2ForCausalLM | None = None,
        warm_up: bool = True,
        pad_decodes: bool = False,
        **settings: Any,
    ) -> None:
        self.config = EngineConfig(model=model, **settings)
        cfg = self.config
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        self.kv_dtype = self.dtype if cfg.kv_cache_dtype == "auto" else resolve_dtype(cfg.kv_cache_dtype, self.device)
        # Choose the backend before loading weights, so a wrong name fails at once. It runs in the
        # cache's dtype.
        self.backend: RegisteredBackend = select_backend(
            cfg.backend, self.device, self.kv_dtype, cfg.block_size, plugins
        )
        self.model = (
            shared_model
            if shared_model is not None
            else build_model(cfg.model, cfg.seed, self.dtype, self.device, cfg.max_model_len)
        )
        self.model_config = self.model.config
        mc = self.model_config
        num_blocks = num_kv_blocks(cfg, mc, self.device, self.dtype, self.kv_dtype)
        self.kv_caches = allocate_kv_caches(mc, num_blocks, cfg.block_size, self.kv_dtype, self.device)
        graphs = "capture" if cfg.cuda_graphs else "padded" if pad_decodes else "off"
        # Whether the backend will be handed graph batches (its cuda_graph_unsupported hook may still refuse).
        graph_batches = graphs == "padded" or (
            graphs == "capture" and capture_refusal(self.device, self.backend.spec) is None
        )
        context = AttentionContext(
            num_q_heads=mc.num_attention_heads, num_kv_heads=mc.num_key_value_heads, head_dim=mc.head_dim,
            num_layers=mc.num_hidden_layers, block_size=cfg.block_size, num_blocks=num_blocks,
            max_num_seqs=cfg.max_num_seqs, max_num_batched_tokens=cfg.max_num_batched_tokens,
            max_model_len=cfg.max_model_len, max_blocks_per_seq=blocks_for(cfg.max_model_len, cfg.block_size),
            dtype=self.kv_dtype, device=self.device, cuda_graphs=graph_batches,
            cuda_graph_sizes=cuda_graph_sizes(cfg.max_num_seqs),
            options=dict(cfg.backend_options),
        )
        self.pm = engine_plugin_manager(self.backend.spec.create(context), observers)
        self.block_manager = BlockManager(num_blocks, cfg.block_size, prefix_caching=cfg.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, cfg.max_num_seqs, cfg.max_num_batched_tokens, cfg.max_model_len)
        self.runner = ModelRunner(
            self.model, self.kv_caches, self.block_manager, self.pm, self.backend.spec, cfg.max_num_seqs,
            cfg.max_num_batched_tokens, cfg.max_model_len, self.device, cuda_graphs=graphs, warm_up=warm_up,
            overlap=cfg.async_scheduling,
        )
        self.graph_mode = self.runner.graph_mode
        self.tokenizer = _load_tokenizer(cfg.model)
        self.step_stats: list[StepStats] = []
        self._in_flight: deque[_Launched] = deque()  # launched, tokens not taken in yet; oldest first
        self.num_tokens_taken = 0  # output tokens taken in so far (for progress)

    def _nvtx_range(self, name: str) -> contextlib.AbstractContextManager[Any]:
        """An NVTX range on CUDA (for Nsight Systems timelines); nothing elsewhere."""
        return torch.cuda.nvtx.range(name) if self.device.type == "cuda" else contextlib.nullcontext()

    def add_request(self, prompt: list[int] | str, params: SamplingParams) -> Sequence:
        """Check one request and queue it; the next `step` or `generate` runs it.

        Raises ValueError (one line) for a request that could never run, and then queues nothing.
        """
        seq = self._new_sequence(prompt, params)
        self.scheduler.add(seq)
        return seq

    def _new_sequence(self, prompt: list[int] | str, params: SamplingParams) -> Sequence:
        """A checked request, not yet queued: tokenized, its token ids in the vocabulary, and able to run on
        this engine (`Scheduler.check`: not empty, within max_model_len, within the KV cache)."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"{self.config.model} has no tokenizer: pass prompts as token-id lists")
            prompt = self.tokenizer.encode(prompt)
        seq = Sequence(self._checked_token_ids(prompt, "token id"), params)
        self.scheduler.check(seq)
        if params.seed is not None:
            seq.generator = torch.Generator(device=self.device).manual_seed(params.seed)
        return seq

    def _forced_sequence(self, prompt: list[int], continuation: Seq[int]) -> Sequence:
        """A checked teacher-forced request: `prompt`, then exactly `continuation` appended in place of
        sampled tokens (its ids checked like a prompt's)."""
        if not continuation:
            raise ValueError("the continuation is empty; teacher forcing needs at least one token")
        forced = self._checked_token_ids(continuation, "continuation token id")
        seq = self._new_sequence(prompt, SamplingParams(max_tokens=len(forced), ignore_eos=True))
        seq.forced_tokens = forced
        return seq

    def _checked_token_ids(self, token_ids: Seq[int], what: str) -> list[int]:
        """`token_ids` as a list, after checking each is an int in [0, vocab_size).

        An id outside the vocabulary would otherwise fail inside the embedding, mid-step, with the request's
        KV blocks taken. The common case costs two C-speed passes; only a bad list is walked in Python, to
        name the first bad id and its position.
        """
        ids = list(token_ids)
        vocab = self.model_config.vocab_size
        if ids and not (set(map(type, ids)) == {int} and min(ids) >= 0 and max(ids) < vocab):
            position, token = next((i, t) for i, t in enumerate(ids) if type(t) is not int or not 0 <= t < vocab)
            problem = "is not an int" if type(token) is not int else f"is outside the vocabulary [0, {vocab})"
            raise ValueError(f"{what} {token!r} at position {position} {problem}")
        return ids

    def has_unfinished(self) -> bool:
        """Whether any request is unfinished: queued, running, or with tokens still in flight."""
        return self.scheduler.has_unfinished() or bool(self._in_flight)

    @torch.inference_mode()
    def step(self, on_logits: Callable[[Sequence, torch.Tensor], None] | None = None) -> list[Sequence]:
        """Launch the next step and take in the tokens of the one before it; returns the requests finished.

        With async_scheduling the next step is scheduled and launched before the step in flight is waited for,
        so a step's tokens come in with the next call (or the call that finds nothing left to schedule); without,
        in the call that launched it. `on_logits(seq, logits_row)` sees the next-token logits of every sequence
        that sampled; a call given it waits for its own step.
        """
        t0 = time.perf_counter()
        launched = None
        if self.scheduler.has_work():
            out = self.scheduler.schedule()
            if not out.num_seqs:
                raise RuntimeError("the scheduler could not schedule anything: the KV cache is too small")
            t1 = time.perf_counter()
            sampled = [out.batch.seqs[r] for r in out.sample_rows.tolist()] if on_logits else None
            with self._nvtx_range(f"step {out.num_tokens - out.num_decodes}p+{out.num_decodes}d"):
                step = self.runner.launch(out, keep_logits=on_logits is not None)
            stats = StepStats(
                out.num_tokens - out.num_decodes, out.num_decodes, out.num_seqs, out.num_sampled,
                schedule_s=t1 - t0, prepare_s=step.prepare_s, launch_s=step.launch_s,
            )
            if not self.runner.queue.asynchronous:  # the launch ran the device work itself
                stats.wait_s, stats.launch_s = stats.launch_s, 0.0
            self.step_stats.append(stats)
            launched = _Launched(step, stats, sampled)
            self._in_flight.append(launched)
        # Overlapping, the step just launched stays in flight; a call that launched nothing takes in everything.
        keep = 1 if launched is not None and self.config.async_scheduling and on_logits is None else 0
        finished: list[Sequence] = []
        while len(self._in_flight) > keep:
            oldest = self._in_flight[0]
            if oldest is not launched and launched is not None and not oldest.launched.pending.done():
                launched.stats.hidden_s = launched.stats.schedule_s + launched.stats.prepare_s + launched.stats.launch_s
            finished += self._take_in(oldest, on_logits)
            self._in_flight.popleft()
        if launched is not None:
            launched.stats.seconds = time.perf_counter() - t0
        return finished

    def _take_in(
        self, step: _Launched, on_logits: Callable[[Sequence, torch.Tensor], None] | None
    ) -> list[Sequence]:
        """Wait for a launched step's tokens and give them to the scheduler; the requests that finishes."""
        t0 = time.perf_counter()
        tokens, logits = step.launched.pending.result()
        t1 = time.perf_counter()
        if on_logits is not None and logits is not None and step.sampled is not None:
            for i, seq in enumerate(step.sampled):
                on_logits(seq, logits[i])
        finished = self.scheduler.update(step.launched.out, tokens, self.model_config.eos_token_id)
        self.num_tokens_taken += len(tokens)
        step.stats.wait_s += t1 - t0
        step.stats.update_s = time.perf_counter() - t1
        return finished

    def _recover(self) -> None:
        """After a failure part-way through a step: wait out the steps in flight and forget them (their tokens
        are not taken in), and put every unfinished request back to waiting, to be recomputed from its tokens."""
        for step in self._in_flight:
            with contextlib.suppress(Exception):
                step.launched.pending.result()
        self._in_flight.clear()
        self.scheduler.recover()

    def generate(
        self,
        prompts: Seq[list[int] | str],
        params: SamplingParams | Seq[SamplingParams] | None = None,
        on_step: Callable[[int], None] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in prompt order.

        `on_step(n)` is told the number of output tokens each step produced (for progress bars).
        All or nothing: every request is checked before any is queued (ValueError naming the prompt's index),
        and a failure part-way (the model, a backend, `on_step`) drops this call's requests before it is
        re-raised, so the engine serves the next call.
        """
        if params is None:
            params = SamplingParams()
        per_prompt = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(per_prompt) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(per_prompt)} sampling params")
        seqs = _each_prompt(zip(prompts, per_prompt), lambda pair: self._new_sequence(*pair))
        self._run_to_completion(seqs, on_step)
        return [
            RequestOutput(
                s.token_ids[: s.num_prompt_tokens],
                s.output_token_ids,
                self.tokenizer.decode(s.output_token_ids) if self.tokenizer else None,
            )
            for s in seqs
        ]

    def teacher_forced_logits(self, prompts: Seq[list[int]], continuations: Seq[list[int]]) -> list[torch.Tensor]:
        """Logits under teacher forcing: prefill each prompt, then decode feeding its continuation.

        Returns, per prompt, float32 logits [len(continuation), vocab] on the CPU: row i predicts
        continuation[i] given the prompt and continuation[:i]. The same token sequence goes through
        every backend, so their logits compare position by position. All or nothing, as `generate`;
        continuation tokens are checked against the vocabulary like prompt tokens.
        """
        if len(continuations) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
        seqs = _each_prompt(zip(prompts, continuations), lambda pair: self._forced_sequence(*pair))
        collected: dict[int, list[torch.Tensor]] = {seq.seq_id: [] for seq in seqs}

        def keep(seq: Sequence, row: torch.Tensor) -> None:
            collected[seq.seq_id].append(row.float().cpu())

        self._run_to_completion(seqs, None, keep)
        return [torch.stack(collected[s.seq_id]) for s in seqs]

    @torch.inference_mode()
    def prefill_logits(
        self, sequences: Seq[list[int]], starts: Seq[int]
    ) -> Iterator[tuple[list[tuple[int, int]], torch.Tensor]]:
        """Teacher forcing in one prefill pass, for checking a whole output at the cost of a prompt.

        Each token list runs as a prompt (chunked as the scheduler chunks prompts; its last token is never
        run, since nothing predicts past it). Yields, per engine step that has any: the (sequence index,
        position) of each row from position starts[i] - 1 on, and those rows' next-token logits [rows, vocab]
        (the row at position p predicts token p + 1), on the engine's device, valid until the next step. Two
        engines of the same limits and cache size yield the same rows step for step. All or nothing, as
        `generate`; stopping early drops this call's requests.
        """
        if len(starts) != len(sequences):
            raise ValueError(f"{len(sequences)} sequences but {len(starts)} starts")
        first_row = dict(enumerate(max(0, s - 1) for s in starts))
        seqs = _each_prompt(
            sequences, lambda tokens: self._new_sequence(tokens[:-1], SamplingParams(max_tokens=1, ignore_eos=True))
        )
        index = {seq.seq_id: i for i, seq in enumerate(seqs)}
        if self._in_flight:
            raise RuntimeError("prefill_logits needs the engine idle, but a step is in flight: step() it through")
        try:
            for seq in seqs:
                self.scheduler.add(seq)
            while self.scheduler.has_unfinished():
                out = self.scheduler.schedule()
                if not out.num_seqs:
                    raise RuntimeError("the scheduler could not schedule anything: the KV cache is too small")
                _, hidden = self.runner.run(out)
                rows: list[tuple[int, int]] = []
                picks: list[int] = []
                t = 0
                for entry in out.entries:
                    i, start = index[entry.seq.seq_id], entry.start
                    for k in range(max(0, first_row[i] - start), entry.num_new_tokens):
                        rows.append((i, start + k))
                        picks.append(t + k)
                    t += entry.num_new_tokens
                # Nothing is sampled: each sequence ends when its prompt is in (max_tokens 1, token 0 appended).
                self.scheduler.update(out, np.zeros(out.num_sampled, dtype=np.int64), None)
                if picks:
                    yield rows, self.model.compute_logits(hidden[torch.tensor(picks, device=hidden.device)])
        except BaseException:
            self.scheduler.abort(seqs)
            raise

    def _run_to_completion(
        self,
        seqs: list[Sequence],
        on_step: Callable[[int], None] | None,
        on_logits: Callable[[Sequence, torch.Tensor], None] | None = None,
    ) -> None:
        """Queue one call's checked requests and step until the scheduler is empty.

        Any exception part-way (KeyboardInterrupt too) aborts `seqs` in the scheduler, freeing their KV
        blocks, then propagates: a failed call must not leave requests that every later call would trip on.
        Requests queued earlier with `add_request` are not this call's and stay queued (those running go back to
        waiting, with the tokens they have: the step in flight is forgotten).
        """
        try:
            for seq in seqs:
                self.scheduler.add(seq)
            while self.has_unfinished():
                taken = self.num_tokens_taken
                self.step(on_logits)
                if on_step is not None:
                    on_step(self.num_tokens_taken - taken)
        except BaseException:
            self._recover()
            self.scheduler.abort(seqs)
            raise

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix and zero the prefix cache's counters (as vLLM's `reset_prefix_cache`), so a
        timed run starts cold whatever ran before it. Nothing to do without prefix caching."""
        if self.block_manager.cache is not None:
            self.block_manager.cache.reset()

    def backend_counters(self) -> dict[str, int]:
        merged: dict[str, int] = {}
        for counters in self.pm.hook.backend_counters():
            merged.update(counters)
        return merged


def _each_prompt(requests: Iterable[T], make: Callable[[T], Sequence]) -> list[Sequence]:
    """`make` applied to every request of one call, all checked before the caller queues any; a ValueError
    is re-raised naming the request's index in the call ("prompt 2: ...")."""
    seqs = []
    for i, request in enumerate(requests):
        try:
            seqs.append(make(request))
        except ValueError as error:
            raise ValueError(f"prompt {i}: {error}") from None
    return seqs


def _load_tokenizer(model: str) -> Any:
    """The checkpoint's tokenizer when it ships one (needs transformers); random models have none."""
    if model.startswith(RANDOM_PREFIX):
        return None
    path = Path(model)
    if not any((path / name).exists() for name in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))
