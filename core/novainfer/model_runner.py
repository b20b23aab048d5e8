"""Turns a scheduled step into tensors, runs the model through the backend hooks, and samples; captures and
replays the decode steps' CUDA graphs (novainfer.cuda_graphs)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pluggy
import torch

from novainfer.backend_api import BackendSpec, StepBatch, cuda_graph_sizes
from novainfer.block_manager import BlockManager, blocks_for, scratch_sequence
from novainfer.cuda_graphs import DecodeGraphs, Outputs, capture_refusal
from novainfer.device_queue import DeviceQueue, Pending
from novainfer.models.qwen2 import Qwen2ForCausalLM, StepContext
from novainfer.plugins import resolve_hook
from novainfer.sampler import sample
from novainfer.scheduler import ScheduledSeq, SchedulerOutput
from novainfer.sequence import SamplingParams
from novainfer.step_buffers import StepBuffers, per_sequence

# How decode-only steps run (ModelRunner's `cuda_graphs`):
#   "off":     eagerly, as scheduled;
#   "capture": replayed from CUDA graphs captured at start, where the device and the backend allow (else
#              eagerly, and graph_mode says why);
#   "padded":  eagerly, padded to their graph's size and run exactly as a replay runs them, nothing captured:
#              how tests on the CPU exercise the graph path.
CUDA_GRAPH_SETTINGS = ("off", "capture", "padded")
CAPTURED, PADDED = "cuda_graphs", "padded (eager)"  # graph_mode of "capture" where it can, and of "padded"

Hooks = tuple[Callable[..., Any], Callable[..., Any]]  # (write_kv, attention)
Sampling = tuple[list[SamplingParams], list["torch.Generator | None"]]  # per sampled row
_TOKEN_FIELDS = ("input_ids", "positions", "slot_mapping", "logits_indices")
_MIRRORS = ("query_start_loc", "seq_lens", "block_tables")  # the fields a backend also gets on the host
_FIXES = ("fix_index", "fix_slot", "fix_cell", "fix_block")


@dataclass
class Launched:
    """A step on its way: its schedule, its device work's result to come ((sampled token ids in `out.sample_rows`
    order, the sampled rows' logits when kept)), and the host seconds its preparation and launch took."""

    out: SchedulerOutput
    pending: Pending[tuple[np.ndarray, torch.Tensor | None]]
    prepare_s: float
    launch_s: float


class ModelRunner:
    """Runs scheduled steps through the model; owns the step buffers, attention's output buffer, the decode CUDA
    graphs and the device half of the persistent batch (each running row's last sampled token).

    Two ways in. `launch` is the engine's: a step of the scheduler's, its device work queued (novainfer.device_queue)
    so the host can go on, its decodes' input tokens taken on the device from the tokens the step before sampled.
    `run` is for checks (novainfer.testing, the engine's teacher-forced prefill): any step, there and then.

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
        overlap: bool = False,
    ) -> None:
        if cuda_graphs not in CUDA_GRAPH_SETTINGS:
            raise ValueError(f"cuda_graphs must be one of {', '.join(CUDA_GRAPH_SETTINGS)}, got {cuda_graphs!r}")
        self.model = model
        self.kv_caches = kv_caches
        self.block_manager = block_manager
        self.block_size = block_manager.block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.device = device
        self.queue = DeviceQueue(device, overlap)
        self.graph_sizes = cuda_graph_sizes(max_num_seqs)
        # A padded decode step has a row per sequence of its graph, which may pass the token budget.
        max_rows = max(max_num_batched_tokens, self.graph_sizes[-1])
        self.buffers = StepBuffers(max_rows, max_num_seqs, blocks_for(max_model_len, self.block_size), device)
        self._arange = np.arange(max_rows + 1, dtype=np.int64)
        # The persistent batch's device half: each RunningBatch row's last sampled token, and (on the host) the
        # position it was sampled for and by which sequence, so a decode knows whether its input token is there.
        self.last_token = torch.zeros(max_num_seqs, dtype=torch.int64, device=device)
        self._sampled_pos = np.full(max_num_seqs, -1, dtype=np.int64)
        self._sampled_by = np.full(max_num_seqs, -1, dtype=np.int64)
        # The last launch, when decode-only: (its number of sequences, id of its rows array), and the array.
        self._layout: tuple[int, int] | None = None
        self._layout_rows = np.zeros(0, dtype=np.int64)
        self._greedy_unforced = True  # whether the last launch's rows all sample greedily, none forced
        self._batch_views: dict[tuple[int, ...], tuple[torch.Tensor, ...]] = {}
        self._stage = 0
        # Launches whose inputs advanced on the device (a repeat of the launch before's decodes), and of those the
        # ones with a row entering a new block.
        self.num_advanced_on_device = self.num_block_fixes = 0
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

    # -- the engine's way in ----------------------------------------------------------------------------------

    def launch(self, out: SchedulerOutput, keep_logits: bool = False) -> Launched:
        """Prepare a scheduled step and queue its device work: forward (or graph replay), sampling, each sampled
        token written to its row on the device (the next step's decode input) and copied back to the host.

        The host's work is numpy over the step's rows, and Python only per prefill chunk. A decode step over the
        same rows as the launch before advances positions, slots and sequence lengths on the device instead of
        uploading them, uploading only the cells of blocks that rows have just entered. Nothing here waits for the
        device. With `keep_logits`, the result also holds the sampled rows' logits (valid until the next step).
        """
        t0 = time.perf_counter()
        b, buf, bs = out.batch, self.buffers, self.block_size
        if b is None:
            raise ValueError("launch takes the scheduler's steps; a step built by hand runs through `run`")
        stage = self._next_stage()
        host = buf.host[stage]
        bucket = self.bucket_for(out)
        rows, starts, nd = out.decode_rows, out.decode_starts, out.num_decodes
        num_seqs = bucket or out.num_seqs
        # The scheduler hands the very same rows array while its running set does not change, so a repeat of the
        # last launch's decodes is one identity check; otherwise, each decode's input token is on the device when
        # its row's last sample (by this sequence) was for this position.
        same = out.num_seqs == nd and self._layout is not None and self._layout == (num_seqs, id(rows))
        if not same:
            from_device = (self._sampled_pos[rows] == starts) & (self._sampled_by[rows] == b.seq_ids[rows])
            same = (
                out.num_seqs == nd and self._layout is not None and self._layout[0] == num_seqs
                and np.array_equal(self._layout_rows, rows) and bool(from_device.all())
            )
        query_start, seq_lens, tables = host["query_start_loc"], host["seq_lens"], host["block_tables"]
        query_start[: nd + 1] = self._arange[: nd + 1]
        seq_lens[:nd] = starts + 1
        np.take(b.tables, rows, axis=0, out=tables[:nd])
        num_fixes = 0
        if same:
            # Rows entering a new block: the only cells the device cannot advance by itself.
            crossing = np.flatnonzero(starts % bs == 0)
            num_fixes = len(crossing)
            self.num_advanced_on_device += 1
            if num_fixes:
                self.num_block_fixes += 1
                columns = starts[crossing] // bs
                blocks = tables[crossing, columns]
                host["fix_index"][:num_fixes] = crossing
                host["fix_slot"][:num_fixes] = blocks.astype(np.int64) * bs
                host["fix_cell"][:num_fixes] = crossing * buf.width + columns
                host["fix_block"][:num_fixes] = blocks
            if bucket is not None:
                self._pad(stage, nd, bucket, mirrors_only=True)
        else:
            host["input_ids"][:nd] = b.tokens[rows, starts]  # the values the host has; the device has the others
            host["positions"][:nd] = starts
            host["slot_mapping"][:nd] = tables[self._arange[:nd], starts // bs].astype(np.int64) * bs + starts % bs
            host["logits_indices"][:nd] = self._arange[:nd]
            host["decode_rows"][:nd] = rows
            host["from_device"][:nd] = from_device
            host["sample_rows"][: out.num_sampled] = out.sample_rows
            self._fill_entries(stage, out.prefills, nd, nd, nd)
            if bucket is not None:
                self._pad(stage, nd, bucket)
        self._sampled_pos[out.sample_rows] = out.sample_positions
        if not same:
            self._sampled_by[out.sample_rows] = out.sample_ids
            self._greedy_unforced = not (b.random[out.sample_rows].any() or b.forced[out.sample_rows].any())
        self._layout = (num_seqs, id(rows)) if out.num_seqs == nd else None
        self._layout_rows = rows  # holds the array, so its id stays its own
        batch = self._step_batch(stage, out, bucket)
        sampling = None if self._greedy_unforced else self._sampling(out)
        forced = None if self._greedy_unforced else self._forced(out)
        t1 = time.perf_counter()
        pending = self.queue.launch(
            lambda: self._device_step(batch, stage, nd, same, num_fixes, out.num_sampled, sampling, forced, keep_logits)
        )
        return Launched(out, pending, t1 - t0, time.perf_counter() - t1)

    def _device_step(
        self,
        batch: StepBatch,
        stage: int,
        num_decodes: int,
        same: bool,
        num_fixes: int,
        num_sampled: int,
        sampling: Sampling | None,
        forced: tuple[torch.Tensor, torch.Tensor] | None,
        keep_logits: bool,
    ) -> tuple[np.ndarray, torch.Tensor | None]:
        """A launched step's device work, in stream order (on the CPU, in the device worker): inputs in place,
        metadata, forward, sampling, the tokens to their rows and back to the host."""
        buf, dev = self.buffers, self.buffers.dev
        if same:
            for name in ("positions", "slot_mapping", "seq_lens"):
                dev[name][:num_decodes].add_(1)
            if num_fixes:
                buf.upload(stage, _FIXES)
                dev["slot_mapping"][dev["fix_index"][:num_fixes]] = dev["fix_slot"][:num_fixes]
                dev["block_tables"].view(-1)[dev["fix_cell"][:num_fixes]] = dev["fix_block"][:num_fixes]
        else:
            buf.upload(stage)
        if num_decodes:
            ids, rows = dev["input_ids"][:num_decodes], dev["decode_rows"][:num_decodes]
            if same:
                torch.index_select(self.last_token, 0, rows, out=ids)
            else:
                ids.copy_(torch.where(dev["from_device"][:num_decodes] != 0, self.last_token[rows], ids))
        metadata = self.prepare_metadata(batch=batch)
        if batch.cuda_graph:
            logits, _ = self.graphs.replay(batch.num_seqs) if self.graphs else self._graph_forward(batch, metadata)
        else:
            logits = self.logits(batch, self.forward(batch, metadata))
        logits = logits[:num_sampled]
        tokens = sample(logits, *sampling) if sampling else logits.argmax(dim=-1)
        if forced is not None:
            index, values = forced
            tokens[index.to(self.device)] = values.to(self.device)
        self.last_token[dev["decode_rows" if same else "sample_rows"][:num_sampled]] = tokens
        if self.device.type == "cuda":
            host = buf.sampled[stage][:num_sampled]
            host.copy_(tokens, non_blocking=True)
            return host.numpy(), logits if keep_logits else None
        return tokens.numpy(), logits if keep_logits else None

    def _sampling(self, out: SchedulerOutput) -> Sampling | None:
        """Each sampled row's params and generator, or None when every row is greedy (no Python per row then)."""
        b, rows = out.batch, out.sample_rows
        if not b.random[rows].any():
            return None
        seqs = [b.seqs[r] for r in rows.tolist()]
        return [s.params for s in seqs], [s.generator for s in seqs]

    def _forced(self, out: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Teacher-forced rows (their index among the sampled rows) and the tokens given for them, or None."""
        b, rows = out.batch, out.sample_rows
        index = np.flatnonzero(b.forced[rows])
        if not len(index):
            return None
        values = []
        for row, position in zip(rows[index].tolist(), out.sample_positions[index].tolist()):
            seq = b.seqs[row]
            values.append(seq.forced_tokens[position - seq.num_prompt_tokens])
        return torch.from_numpy(index), torch.tensor(values, dtype=torch.int64)

    def _next_stage(self) -> int:
        self._stage ^= 1
        return self._stage

    # -- any step, there and then -----------------------------------------------------------------------------

    def prepare(self, out: SchedulerOutput, pad_to: int | None = None) -> StepBatch:
        """Lay out any step (its `entries`) in the step buffers and upload it, for `run` and the checks.

        With `pad_to` (a decode-only step and a CUDA-graph bucket size), rows past the real ones become dummy
        decodes of length 1 that read and write the scratch block. Not while a launched step may be in flight.
        """
        stage = self._next_stage()
        self.buffers.host[stage]["query_start_loc"][0] = 0
        self._fill_entries(stage, out.entries, 0, 0, 0)
        if pad_to is not None:
            self._pad(stage, out.num_seqs, pad_to)
        self._layout = None
        self.buffers.upload(stage)
        return self._step_batch(stage, out, pad_to)

    def _fill_entries(self, stage: int, entries: Iterable[ScheduledSeq], i: int, t: int, j: int) -> None:
        """Lay out `entries` in a host stage from sequence row i, token row t and logits row j on (those before
        are filled, and query_start_loc[i] = t)."""
        buf, bs = self.buffers, self.block_size
        ids, positions, slots, logits, query_start, seq_lens, tables = (
            buf.host[stage][name] for name in (*_TOKEN_FIELDS, *_MIRRORS)
        )
        for entry in entries:
            seq, n, start = entry.seq, entry.num_new_tokens, entry.start
            end = start + n
            if seq.batch is None:
                table = seq.block_table
                tables[i, : len(table)] = table
                tables[i, len(table) :] = 0
                ids[t : t + n] = seq.token_ids[start:end]
            else:
                tables[i] = seq.batch.tables[seq.row]
                ids[t : t + n] = seq.batch.tokens[seq.row, start:end]
            pos = np.arange(start, end)
            positions[t : t + n] = pos
            slots[t : t + n] = tables[i, pos // bs].astype(np.int64) * bs + pos % bs
            t += n
            seq_lens[i] = end
            i += 1
            query_start[i] = t
            if entry.samples:
                logits[j] = t - 1
                j += 1

    def _pad(self, stage: int, num_real: int, size: int, mirrors_only: bool = False) -> None:
        """Rows num_real..size of a graph batch: dummy decodes of length 1 in the scratch block."""
        host = self.buffers.host[stage]
        host["query_start_loc"][num_real + 1 : size + 1] = self._arange[num_real + 1 : size + 1]
        host["seq_lens"][num_real:size] = 1
        host["block_tables"][num_real:size] = 0
        if not mirrors_only:
            for name in _TOKEN_FIELDS[:3]:
                host[name][num_real:size] = 0
            host["logits_indices"][:size] = self._arange[:size]

    def _step_batch(self, stage: int, out: SchedulerOutput, bucket: int | None) -> StepBatch:
        """The StepBatch over the buffers as laid out for `out` (padded to `bucket` when it has one)."""
        num_seqs = bucket or out.num_seqs
        num_tokens = bucket or out.num_tokens
        key = (stage, num_seqs, num_tokens, bucket or out.num_sampled)
        views = self._batch_views.get(key)
        if views is None:
            dev, host = self.buffers.dev, self.buffers.host_tensors[stage]
            views = (
                *(dev[n][:num_tokens] for n in _TOKEN_FIELDS[:3]), dev["logits_indices"][: key[3]],
                *per_sequence(dev, num_seqs), *per_sequence(host, num_seqs),
            )
            if num_tokens == num_seqs:  # slicing tensors costs more than the rest of a decode step's layout
                self._batch_views[key] = views
        ids, positions, slots, logits, query_start, seq_lens, tables, h_query_start, h_seq_lens, h_tables = views
        graph = bucket is not None
        longest_chunk = max((e.num_new_tokens for e in out.prefills), default=1 if out.num_decodes else 0)
        longest = self.max_model_len if graph else int(self.buffers.host[stage]["seq_lens"][:num_seqs].max())
        # A graph batch's values hold for every step its graph replays (see StepBatch.cuda_graph).
        return StepBatch(
            input_ids=ids, positions=positions, slot_mapping=slots, query_start_loc=query_start,
            seq_lens=seq_lens, block_tables=tables, query_start_loc_cpu=h_query_start, seq_lens_cpu=h_seq_lens,
            block_tables_cpu=h_tables, logits_indices=logits,
            num_decodes=num_seqs if graph else out.num_decodes, num_actual_seqs=out.num_seqs,
            max_query_len=1 if graph else max(longest_chunk, 1 if out.num_decodes else 0),
            max_seq_len=longest, block_size=self.block_size, cuda_graph=graph,
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
        rather than inside a timed window. The dummy sequences live in the scratch block. No step holds
        more tokens than max_num_seqs sequences of max_model_len, so neither does this one.
        """
        max_seqs, max_len = self.max_num_seqs, self.max_model_len
        max_tokens = min(self.max_num_batched_tokens, max_seqs * max_len)
        num_prefills = min(max_seqs, -(-max_tokens // max_len))
        num_decodes = min(max_seqs - num_prefills, max_tokens - num_prefills)
        prefill_tokens = max_tokens - num_decodes
        entries = [ScheduledSeq.of(scratch_sequence(1, self.block_size), 1) for _ in range(num_decodes)]
        for i in range(num_prefills):
            n = prefill_tokens // num_prefills + (i < prefill_tokens % num_prefills)
            entries.append(ScheduledSeq.of(scratch_sequence(n, self.block_size), n))
        logits, _ = self.run(SchedulerOutput.of(entries, num_decodes))
        logits.argmax(dim=-1)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def bucket_for(self, out: SchedulerOutput) -> int | None:
        """The graph size a step replays (in "padded" mode, is padded to), or None when it runs as scheduled:
        graphs are off, or the step has prefill chunks."""
        n = out.num_seqs
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
        """Run any step there and then: (logits [S, vocab] of the sequences that sample, in entry order; hidden
        states of every token row, [num_tokens, hidden]). A graph-replayed step's tensors are the graph's static
        outputs, valid until the next replay, and have padded rows past the real ones. Not while a launched step
        may be in flight."""
        bucket = self.bucket_for(out)
        if bucket is not None:
            logits, hidden = self.replay(self.prepare(out, pad_to=bucket))
            return logits[: out.num_seqs], hidden
        batch = self.prepare(out)
        hidden = self.forward(batch, self.prepare_metadata(batch=batch))
        return self.logits(batch, hidden), hidden

    def _graph_forward(self, batch: StepBatch, metadata: Any) -> Outputs:
        hidden = self.forward(batch, metadata, self.graph_hooks)
        return self.logits(batch, hidden), hidden

    def _capture_step(self, size: int) -> Callable[[], Outputs]:
        """The forward DecodeGraphs captures for `size`: over `size` dummy decodes in the scratch block, their
        metadata built now, outside the graph."""
        decodes = [ScheduledSeq.of(scratch_sequence(1, self.block_size), 1) for _ in range(size)]
        batch = self.prepare(SchedulerOutput.of(decodes, size), pad_to=size)
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
