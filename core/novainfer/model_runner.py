"""Turns a scheduled step into tensors, runs the model through the backend hooks, and samples."""

from __future__ import annotations

from typing import Any

import numpy as np
import pluggy
import torch

from novainfer.backend_api import StepBatch
from novainfer.block_manager import BlockManager, scratch_sequence
from novainfer.cuda_graphs import DecodeGraphs, HookCallers
from novainfer.models.qwen2 import Qwen2ForCausalLM, StepContext
from novainfer.plugins import resolve_hook
from novainfer.sampler import sample
from novainfer.scheduler import ScheduledSeq, SchedulerOutput
from novainfer.sequence import Sequence


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
    def __init__(
        self,
        model: Qwen2ForCausalLM,
        kv_caches: list[torch.Tensor],
        block_manager: BlockManager,
        pm: pluggy.PluginManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        device: torch.device,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_manager = block_manager
        self.block_size = block_manager.block_size
        self.max_model_len = max_model_len
        self.device = device
        self.buffers = StepBuffers(
            max_num_batched_tokens, max_num_seqs, -(-max_model_len // self.block_size), device
        )
        self.prepare_metadata = resolve_hook(pm, "prepare_attention_metadata")
        self.write_kv = resolve_hook(pm, "write_kv")
        self.attention = resolve_hook(pm, "attention")
        self.graphs: DecodeGraphs | None = None  # set by the engine when decode runs in CUDA graphs

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

    def forward(self, batch: StepBatch, metadata: Any, hooks: HookCallers | None = None) -> torch.Tensor:
        """Final hidden states [num_tokens, hidden] of one prepared step, every token row."""
        write_kv, attention = hooks or (self.write_kv, self.attention)
        step = StepContext(metadata, batch.slot_mapping, self.kv_caches, write_kv, attention)
        return self.model(batch.input_ids, batch.positions, step)

    def logits(self, batch: StepBatch, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits [len(logits_indices), vocab] of the rows that sample."""
        return self.model.compute_logits(hidden[batch.logits_indices])

    def warm_up(self, max_model_len: int) -> None:
        """Run one dummy step at the largest shape the limits allow, before serving.

        Like vLLM's profile run: the caching allocator reaches its peak here, so no step of the run
        asks the device for memory, and every kernel the eager path can need (decodes mixed with
        prefill chunks, the widest token count, all sequences sampling) is loaded or compiled here
        rather than inside a timed window. The dummy sequences live in the scratch block.
        """
        buf = self.buffers
        num_prefills = min(buf.max_seqs, -(-buf.max_tokens // max_model_len))
        num_decodes = min(buf.max_seqs - num_prefills, buf.max_tokens - num_prefills)
        prefill_tokens = buf.max_tokens - num_decodes
        entries = [ScheduledSeq(scratch_sequence(1, self.block_size), 1) for _ in range(num_decodes)]
        for i in range(num_prefills):
            n = prefill_tokens // num_prefills + (i < prefill_tokens % num_prefills)
            entries.append(ScheduledSeq(scratch_sequence(n, self.block_size), n))
        self.execute(SchedulerOutput(entries=entries, num_decodes=num_decodes))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def run(self, out: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """Run one step: (logits [S, vocab] of the sequences that sample, in entry order; hidden states of
        every token row, [num_tokens, hidden]). A graph-replayed step's tensors are the graph's static outputs,
        valid until the next replay, and have padded rows past the real ones."""
        bucket = self.graphs.bucket_for(out) if self.graphs is not None else None
        if bucket is not None:
            logits, hidden = self.graphs.run(self.prepare(out, pad_to=bucket))
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
