"""The batch-info object of one engine step, handed to the backend's metadata hook and every layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StepBatch:
    """One step's scheduled tokens, laid out for attention. B sequences, T tokens in all.

    Sequences are ordered decodes first (query length 1), then prefill chunks. Device tensors are
    views into the engine's persistent step buffers: valid for this step only, never reallocated.

    input_ids:       [T] int64, device.
    positions:       [T] int64, device; absolute position of each token in its sequence.
    slot_mapping:    [T] int64, device; flat cache slot (block * block_size + offset) of each token.
    query_start_loc: [B + 1] int32, device; sequence b's tokens are rows query_start_loc[b]:[b + 1].
    seq_lens:        [B] int32, device; tokens in the cache for each sequence once this step's are
                     written (the cached prefix plus this step's query tokens).
    block_tables:    [B, max_blocks_per_seq] int32, device; each row's unused tail is 0 (scratch block).
    query_start_loc_cpu, seq_lens_cpu, block_tables_cpu: the same values on the host (pinned), so a
                     backend can plan without a device-to-host copy.
    logits_indices:  [S] int64, device; the rows whose next-token logits are sampled (the last
                     token of each sequence whose tokens this step completes).
    num_decodes:     how many of the B sequences are decodes; they hold the first num_decodes tokens.
    max_query_len, max_seq_len: maxima over the batch, as host ints.
    block_size:      tokens per block.
    cuda_graph:      True for a decode batch padded to a CUDA-graph bucket; its tensors are the same
                     storage every step. Rows past the real ones are dummy decodes (query length 1,
                     seq_len 1) that read and write the scratch block; num_decodes counts only the
                     real ones, so a backend treats every row of such a batch as a decode.
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    query_start_loc_cpu: torch.Tensor
    seq_lens_cpu: torch.Tensor
    block_tables_cpu: torch.Tensor
    logits_indices: torch.Tensor
    num_decodes: int
    max_query_len: int
    max_seq_len: int
    block_size: int
    cuda_graph: bool = False

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_prefills(self) -> int:
        return self.num_seqs - self.num_decodes
