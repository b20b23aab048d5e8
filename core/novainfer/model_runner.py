"""Turns a scheduled step into tensors, runs the model through the backend hooks, and samples; captures and
replays the decode steps' CUDA graphs (novainfer.cuda_graphs)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pluggy
import torch

from novainfer.backend_api import BackendSpec, StepBatch, cuda_graph_sizes
from novainfer.block_manager import BlockManager, scratch_sequence
from novainfer.cuda_graphs import DecodeGraphs, Outputs, capture_refusal
from novainfer.models.qwen2 import Qwen2ForCausalLM, StepContext
from novainfer.plugins import resolve_hook
from novainfer.sampler import sample
from novainfer.scheduler import ScheduledSeq, SchedulerOutput
from novainfer.sequence import Sequence

# How decode-only steps run (ModelRunner's `cuda_graphs`):
#   "off":     eagerly, as scheduled;
#   "capture": replayed from CUDA graphs captured at start, where the device and the backend allow (else
#              eagerly, and graph_mode says why);
#   "padded":  eagerly, padded to their graph's size and run exactly as a replay runs them, nothing captured:
#              how tests on the CPU exercise the graph path.
CUDA_GRAPH_SETTINGS = ("off", "capture", "padded")
CAPTURED, PADDED = "cuda_graphs", "padded (eager)"  # graph_mode of "capture" where it can, and of "padded"

Hooks = tuple[Callable[..., Any], Callable[..., Any]]  # (write_kv, attention)


class StepBuffers:
    """Host staging and device tensors for a step's batch, allocated once at their largest size.

    All int64 fields share one buffer and all int32 fields another, so a step uploads with two
    non-blocking copies from pinned memory and allocates nothing. On the CPU the host buffers are
    the device buffers.
    """

    def __init__(self, max_tokens: int, max_seqs: int, max_blocks_per_seq: int, device: torch.device) -> None:
        self.max_tokens, self.max_seqs, self.width = max_tokens, max_seqs, max_blocks_per_seq
        pin = device.type == "cuda"
        n64 = 3 * max_tokens + max_seqs
        n32 = 2 * max_seqs + 1 + max_seqs * max_blocks_per_seq
        self.host64 = torch.zeros(n64, dtype=torch.int64, pin_memory=pin)
        self.host32 = torch.zeros(n32, dtype=torch.int32, pin_memory=pin)
        self.dev64 = self.host64 if device.type == "cpu" else torch.zeros(n64, dtype=torch.int64, device=device)
        self.dev32 = self.host32 if device.type == "cpu" else torch.zeros(n32, dtype=torch.int32, device=device)
        self.np64 = self.host64.numpy()
        self.np32 = self.host32.numpy()

    # Field offsets: int64 = [input_ids | positions | slot_mapping | logits_indices],
    # int32 = [query_start_loc | seq_lens | block_tables].
    def views64(self, t: torch.Tensor | np.ndarray, tokens: int, logits: int) -> tuple:
        m = self.max_tokens
        return t[:tokens], t[m : m + tokens], t[2 * m : 2 * m + tokens], t[3 * m : 3 * m + logits]

    def views32(self, t: torch.Tensor | np.ndarray, seqs: int) -> tuple:
        s = self.max_seqs
        tables = t[2 * s + 1 :].reshape(s, self.width)
        return t[: seqs + 1], t[s + 1 : s + 1 + seqs], tables[:seqs]

    def upload(self) -> None:
        if self.dev64 is not self.host64:
            self.dev64.copy_(self.host64, non_blocking=True)
            self.dev32.copy_(self.host32, non_blocking=True)


class ModelRunner:
    """Runs scheduled steps through the model; owns the step buffers, attention's output buffer and the decode
    CUDA graphs.

    Creating it runs the warm-up step (unless `warm_up` is False) and, where `cuda_graphs` is "capture" and the
    device and backend allow, captures the graphs: `graph_mode` then says what decode steps do ("cuda_graphs",
    "padded (eager)", "eager", or "eager (why not graphs)").
    """

    def __init__(
        self,
        model: Qwen2ForCausalLM,
        kv_caches: list[torch.Tensor],
        block_manager: BlockManager,
        pm: pluggy.PluginManager,
        backend: BackendSpec,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        device: torch.device,
        cuda_graphs: str = "off",
        warm_up: bool = True,
    ) -> None:
        if cuda_graphs not in CUDA_GRAPH_SETTINGS:
            raise ValueError(f"cuda_graphs must be one of {', '.join(CUDA_GRAPH_SETTINGS)}, got {cuda_graphs!r}")
        self.model = model
        self.kv_caches = kv_caches
        self.block_manager = block_manager
        self.block_size = block_manager.block_size
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.device = device
        self.graph_sizes = cuda_graph_sizes(max_num_seqs)
        # A padded decode step has a row per sequence of its graph, which may pass the token budget.
        max_rows = max(max_num_batched_tokens, self.graph_sizes[-1])
        self.buffers = StepBuffers(max_rows, max_num_seqs, -(-max_model_len // self.block_size), device)
        # What the attention hook writes into, every layer of every step: a step allocates nothing for it, and a
        # captured graph writes the same storage at every replay.
        mc = model.config
        self.attn_output = torch.empty(
            max_rows, mc.num_attention_heads, mc.head_dim, dtype=kv_caches[0].dtype, device=device
        )
        self.prepare_metadata = resolve_hook(pm, "prepare_attention_metadata")
        self.write_kv = resolve_hook(pm, "write_kv")
        self.attention = resolve_hook(pm, "attention")
        # A graph step calls the backend's hooks without observers: events and timers cannot be recorded inside a
        # capture. A "padded" step calls the same, to run as a replay would.
        self.graph_hooks: Hooks = (
            resolve_hook(pm, "write_kv", observed=False), resolve_hook(pm, "attention", observed=False)
        )
        self.graph_mode = _graph_mode(cuda_graphs, device, backend, pm)
        self.graphs: DecodeGraphs | None = None
        if warm_up:
            self.warm_up()  # before capture: the graphs' pool comes after the peak
        if self.graph_mode == CAPTURED:
            self.graphs = DecodeGraphs(self.graph_sizes, self._capture_step)
            if warm_up:
                # torch.cuda.graph empties the allocator's cache as it starts capturing, which gave the
                # peak step's memory back to the device: the run's first large step would map it again
                # (bench/mallocs_gpu.py saw 3 segments, 1.1 GiB, in the headline run's first step).
                self.warm_up()

    def prepare(self, out: SchedulerOutput, pad_to: int | None = None) -> StepBatch:
        """Fill the step buffers from the scheduled sequences and upload them.

        With `pad_to` (a decode-only step and a CUDA-graph bucket size), rows past the real ones
        become dummy decodes of length 1 that read and write the scratch block.
        """
        buf = self.buffers
        entries = out.entries
        num_seqs = pad_to or len(entries)
        num_tokens = pad_to or out.num_tokens
        num_logits = pad_to or sum(e.samples for e in entries)
        ids, positions, slots, logits_idx = buf.views64(buf.np64, num_tokens, num_logits)
        query_start, seq_lens, tables = buf.views32(buf.np32, num_seqs)
        tables[:] = 0
        bs = self.block_size
        t = 0
        j = 0
        query_start[0] = 0
        for i, entry in enumerate(entries):
            seq, n = entry.seq, entry.num_new_tokens
            start = seq.num_computed_tokens
            table = seq.block_table
            tables[i, : len(table)] = table
            if n == 1:
                ids[t] = seq.token_ids[start]
                positions[t] = start
                slots[t] = table[start // bs] * bs + start % bs
            else:
                pos = np.arange(start, start + n)
                ids[t : t + n] = seq.token_ids[start : start + n]
                positions[t : t + n] = pos
                slots[t : t + n] = tables[i, pos // bs].astype(np.int64) * bs + pos % bs
            t += n
            query_start[i + 1] = t
            seq_lens[i] = start + n
            if entry.samples:
                logits_idx[j] = t - 1
                j += 1
        if pad_to is not None:
            pad = slice(len(entries), pad_to)
            ids[pad] = positions[pad] = slots[pad] = 0
            seq_lens[pad] = 1
            query_start[len(entries) + 1 : pad_to + 1] = np.arange(len(entries) + 1, pad_to + 1)
            logits_idx[:] = np.arange(pad_to)
        buf.upload()
        d_ids, d_pos, d_slots, d_logits = buf.views64(buf.dev64, num_tokens, num_logits)
        d_qsl, d_lens, d_tables = buf.views32(buf.dev32, num_seqs)
        h_qsl, h_lens, h_tables = buf.views32(buf.host32, num_seqs)
        graph = pad_to is not None
        # A graph batch's values hold for every step its graph replays (see StepBatch.cuda_graph).
        return StepBatch(
            input_ids=d_ids, positions=d_pos, slot_mapping=d_slots, query_start_loc=d_qsl,
            seq_lens=d_lens, block_tables=d_tables, query_start_loc_cpu=h_qsl, seq_lens_cpu=h_lens,
            block_tables_cpu=h_tables, logits_indices=d_logits,
            num_decodes=num_seqs if graph else out.num_decodes, num_actual_seqs=len(entries),
            max_query_len=1 if graph else max(e.num_new_tokens for e in entries),
            max_seq_len=self.max_model_len if graph else int(seq_lens.max()), block_size=bs, cuda_graph=graph,
        )

    def forward(self, batch: StepBatch, metadata: Any, hooks: Hooks | None = None) -> torch.Tensor:
        """Final hidden states [num_tokens, hidden] of one prepared step, every token row; `hooks` stand in for
        the backend's (write_kv, attention), as the phase breakdown's timers do."""
        write_kv, attention = hooks or (self.write_kv, self.attention)
        output = self.attn_output[: batch.num_tokens]
        step = StepContext(metadata, batch.slot_mapping, self.kv_caches, write_kv, attention, output)
        return self.model(batch.input_ids, batch.positions, step)

    def logits(self, batch: StepBatch, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits [len(logits_indices), vocab] of the rows that sample."""
        return self.model.compute_logits(hidden[batch.logits_indices])

    def warm_up(self) -> None:
        """Run one dummy step at the largest shape the limits allow, before serving.

        Like vLLM's profile run: the caching allocator reaches its peak here, so no step of the run
        asks the device for memory, and every kernel the eager path can need (decodes mixed with
        prefill chunks, the widest token count, all sequences sampling) is loaded or compiled here
        rather than inside a timed window. The dummy sequences live in the scratch block.
        """
        max_seqs, max_tokens = self.buffers.max_seqs, self.max_num_batched_tokens
        num_prefills = min(max_seqs, -(-max_tokens // self.max_model_len))
        num_decodes = min(max_seqs - num_prefills, max_tokens - num_prefills)
        prefill_tokens = max_tokens - num_decodes
        entries = [ScheduledSeq(scratch_sequence(1, self.block_size), 1) for _ in range(num_decodes)]
        for i in range(num_prefills):
            n = prefill_tokens // num_prefills + (i < prefill_tokens % num_prefills)
            entries.append(ScheduledSeq(scratch_sequence(n, self.block_size), n))
        self.execute(SchedulerOutput(entries=entries, num_decodes=num_decodes))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def bucket_for(self, out: SchedulerOutput) -> int | None:
        """The graph size a step replays (in "padded" mode, is padded to), or None when it runs as scheduled:
        graphs are off, or the step has prefill chunks."""
        n = len(out.entries)
        if self.graph_mode not in (CAPTURED, PADDED) or out.num_decodes != n:
            return None
        return next(size for size in self.graph_sizes if size >= n)

    def replay(self, batch: StepBatch) -> Outputs:
        """Run one padded decode batch (`prepare(out, pad_to=bucket_for(out))`) as its graph runs: its metadata
        built eagerly, then the captured graph replayed, or in "padded" mode the same forward run eagerly.

        Returns (logits [size, vocab], hidden states [size, hidden]); rows past the real ones are padding. A
        replay's tensors are the graph's static outputs, valid until its next replay.
        """
        metadata = self.prepare_metadata(batch=batch)  # outside the graph: backends may re-plan
        if self.graphs is None:
            return self._graph_forward(batch, metadata)
        return self.graphs.replay(batch.num_seqs)

    def run(self, out: SchedulerOutput) -> Outputs:
        """Run one step: (logits [S, vocab] of the sequences that sample, in entry order; hidden states of
        every token row, [num_tokens, hidden]). A graph-replayed step's tensors are the graph's static outputs,
        valid until the next replay, and have padded rows past the real ones."""
        bucket = self.bucket_for(out)
        if bucket is not None:
            logits, hidden = self.replay(self.prepare(out, pad_to=bucket))
            return logits[: len(out.entries)], hidden
        batch = self.prepare(out)
        hidden = self.forward(batch, self.prepare_metadata(batch=batch))
        return self.logits(batch, hidden), hidden

    def execute(self, out: SchedulerOutput) -> tuple[list[Sequence], list[int], torch.Tensor]:
        """Run one step: the sequences that sampled, their new tokens, and their logits [S, vocab]."""
        logits, _ = self.run(out)
        sampling = [e.seq for e in out.entries if e.samples]
        tokens = sample(logits, [s.params for s in sampling], [s.generator for s in sampling])
        return sampling, tokens.tolist(), logits

    def _graph_forward(self, batch: StepBatch, metadata: Any) -> Outputs:
        hidden = self.forward(batch, metadata, self.graph_hooks)
        return self.logits(batch, hidden), hidden

    def _capture_step(self, size: int) -> Callable[[], Outputs]:
        """The forward DecodeGraphs captures for `size`: over `size` dummy decodes in the scratch block, their
        metadata built now, outside the graph."""
        decodes = [ScheduledSeq(scratch_sequence(1, self.block_size), 1) for _ in range(size)]
        batch = self.prepare(SchedulerOutput(entries=decodes, num_decodes=size), pad_to=size)
        metadata = self.prepare_metadata(batch=batch)
        return lambda: self._graph_forward(batch, metadata)


def _graph_mode(setting: str, device: torch.device, backend: BackendSpec, pm: pluggy.PluginManager) -> str:
    """What decode steps do under `setting` with this backend here (LLM.graph_mode records it with every run)."""
    if setting == "off":
        return "eager"
    if setting == "padded":
        return PADDED
    reason = capture_refusal(device, backend) or pm.hook.cuda_graph_unsupported()
    return f"eager ({reason})" if reason else CAPTURED
