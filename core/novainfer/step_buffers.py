"""The step buffers: where a step's batch is laid out, on the host and on the device, allocated once."""

from __future__ import annotations

from typing import Any

import torch


class StepBuffers:
    """Host staging and device tensors for a step's batch, allocated once at their largest size.

    The int64 fields share one buffer and the int32 fields another, so a step uploads with two non-blocking copies
    and allocates nothing. The host side is doubled: consecutive steps fill alternate stages, so the host fills
    one step's while the device may still be reading the step before's (the engine takes a step's tokens in
    before it launches the step after next, which is when a stage comes round again). Fields (T rows, S seqs):
        int64: input_ids, positions, slot_mapping, logits_indices [T]; decode_rows, sample_rows, from_device,
               fix_index, fix_slot, fix_cell [S] (where the decodes' tokens come from and go, see ModelRunner.launch);
        int32: query_start_loc [S + 1], seq_lens [S], block_tables [S x width], fix_block [S].
    """

    def __init__(self, max_tokens: int, max_seqs: int, max_blocks_per_seq: int, device: torch.device) -> None:
        self.max_tokens, self.max_seqs, self.width = max_tokens, max_seqs, max_blocks_per_seq
        t, s = max_tokens, max_seqs
        self.fields64 = _offsets(
            [("input_ids", t), ("positions", t), ("slot_mapping", t), ("logits_indices", t), ("decode_rows", s),
             ("sample_rows", s), ("from_device", s), ("fix_index", s), ("fix_slot", s), ("fix_cell", s)]
        )
        self.fields32 = _offsets(
            [("query_start_loc", s + 1), ("seq_lens", s), ("block_tables", s * max_blocks_per_seq), ("fix_block", s)]
        )
        n64, n32 = self.fields64["end"][0], self.fields32["end"][0]
        pin = device.type == "cuda"
        self.host64 = [torch.zeros(n64, dtype=torch.int64, pin_memory=pin) for _ in range(2)]
        self.host32 = [torch.zeros(n32, dtype=torch.int32, pin_memory=pin) for _ in range(2)]
        self.np64 = [t.numpy() for t in self.host64]
        self.np32 = [t.numpy() for t in self.host32]
        self.dev64 = torch.zeros(n64, dtype=torch.int64, device=device)
        self.dev32 = torch.zeros(n32, dtype=torch.int32, device=device)
        # Each stage's sampled token ids come back here (pinned: the copy does not hold the host).
        self.sampled = [torch.zeros(s, dtype=torch.int64, pin_memory=pin) for _ in range(2)]
        # Every field as a whole-length view, made once: a step slices them (block_tables is [S, width]).
        self.host = [self._views(self.np64[k], self.np32[k]) for k in range(2)]  # numpy, to fill
        self.host_tensors = [self._views(self.host64[k], self.host32[k]) for k in range(2)]  # torch, for backends
        self.dev = self._views(self.dev64, self.dev32)

    def _views(self, t64: Any, t32: Any) -> dict[str, Any]:
        views = {}
        for fields, t in ((self.fields64, t64), (self.fields32, t32)):
            for name, (offset, size) in fields.items():
                views[name] = t[offset : offset + size]
        views["block_tables"] = views["block_tables"].reshape(self.max_seqs, self.width)
        return views

    def upload(self, stage: int, names: tuple[str, ...] = ()) -> None:
        """Copy a host stage to the device: all of it, or only the named int64 and int32 fields."""
        if not names:
            self.dev64.copy_(self.host64[stage], non_blocking=True)
            self.dev32.copy_(self.host32[stage], non_blocking=True)
            return
        for name in names:
            self.dev[name].copy_(self.host_tensors[stage][name], non_blocking=True)


def _offsets(fields: list[tuple[str, int]]) -> dict[str, tuple[int, int]]:
    """(offset, size) of each field laid end to end; "end" gives the total."""
    layout, offset = {}, 0
    for name, size in fields:
        layout[name] = (offset, size)
        offset += size
    layout["end"] = (offset, 0)
    return layout


def per_sequence(views: dict[str, Any], num_seqs: int) -> tuple[Any, Any, Any]:
    """query_start_loc, seq_lens and block_tables of a step of `num_seqs` sequences."""
    return views["query_start_loc"][: num_seqs + 1], views["seq_lens"][:num_seqs], views["block_tables"][:num_seqs]
