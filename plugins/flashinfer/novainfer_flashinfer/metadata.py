"""Host-side index arithmetic: flashinfer's paged-KV arrays for one step, from the engine's block tables.

flashinfer describes a batch's pages in CSR form: sequence b owns the pages
``indices[indptr[b]:indptr[b + 1]]`` in order, and the last of them holds ``last_page_len[b]``
tokens (1..block_size). Token p of sequence b therefore sits in page ``indices[indptr[b] + p // bs]``
at offset ``p % bs``: the same slot as ``block_tables[b, p // bs] * bs + p % bs``.

Everything is computed with numpy from host copies of the step's tensors, so planning needs no
device-to-host copy. Imports neither torch's CUDA nor flashinfer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class StepIndices:
    """Where one step's arrays lie in the flat int32 staging buffer (element ranges).

    B sequences (decodes first), T tokens, P pages; D of the sequences are decodes.

    Uploaded to the device as one span, ``buf[:upload_end]``:
        indptr:        [B + 1] pages of sequence b are indices[indptr[b]:indptr[b + 1]]
        last_page_len: [B]     tokens in each sequence's last page, 1..block_size
        batch_indices: [T]     the sequence of each token (empty without token coordinates)
        positions:     [T]     each token's absolute position in its sequence (ditto)
        indices:       [P]     block ids, sequence by sequence
    Host only (flashinfer's prefill plan() reads them on the host):
        prefill_qo_indptr: [B - D + 1] query rows of the prefill sequences, counted from 0
        prefill_kv_indptr: [B - D + 1] indptr of the prefill sequences, counted from 0

    The uploaded fields' offsets depend only on B and T (indices come last), so a CUDA-graph
    bucket, whose B and T are fixed, reads the same device storage on every replay.
    """

    indptr: slice
    last_page_len: slice
    batch_indices: slice
    positions: slice
    indices: slice
    prefill_qo_indptr: slice
    prefill_kv_indptr: slice
    num_decode_pages: int  # indptr[D]: the decodes' pages are the first indices

    @property
    def upload_end(self) -> int:
        return self.indices.stop


def staging_size(max_seqs: int, max_tokens: int, max_pages: int) -> int:
    """Elements a staging buffer needs for any step (max_tokens 0 without token coordinates)."""
    return 3 * (max_seqs + 1) + max_seqs + 2 * max_tokens + max_pages


def build_step_indices(
    buf: np.ndarray,
    block_tables: np.ndarray,
    seq_lens: np.ndarray,
    query_start_loc: np.ndarray,
    block_size: int,
    num_decodes: int,
    token_coords: bool,
) -> StepIndices:
    """Fill ``buf`` (int32, at least staging_size elements) with one step's arrays.

    :param block_tables: [B, width] int32; row b's first ceil(seq_lens[b] / block_size) entries
        are its blocks.
    :param seq_lens: [B]; tokens in the cache for each sequence once this step's are written.
    :param query_start_loc: [B + 1]; sequence b's tokens are rows query_start_loc[b]:[b + 1].
    :param num_decodes: how many leading sequences go through the decode wrapper.
    :param token_coords: also fill batch_indices and positions (for append_paged_kv_cache).
    """
    num_seqs = len(seq_lens)
    pages = (seq_lens + (block_size - 1)) // block_size
    num_tokens = int(query_start_loc[num_seqs]) if token_coords else 0
    last_at = num_seqs + 1
    batch_at = last_at + num_seqs
    positions_at = batch_at + num_tokens
    indices_at = positions_at + num_tokens

    indptr = buf[:last_at]
    indptr[0] = 0
    np.cumsum(pages, out=indptr[1:])
    num_pages = int(indptr[num_seqs])
    indices_end = indices_at + num_pages
    buf[last_at:batch_at] = seq_lens - (pages - 1) * block_size
    if token_coords:
        q_lens = np.diff(query_start_loc[: num_seqs + 1])
        rows = np.repeat(np.arange(num_seqs, dtype=np.int32), q_lens)
        buf[batch_at:positions_at] = rows
        # Row t of sequence b is query token t - query_start_loc[b], at position seq_len - q_len + that.
        first_position = seq_lens - q_lens - query_start_loc[:num_seqs]
        buf[positions_at:indices_at] = np.arange(num_tokens, dtype=np.int32) + first_position[rows]
    # Only the columns some sequence uses: a step's longest sequence is usually far below max_model_len.
    width = int(pages.max())
    used = np.arange(width) < pages[:, None]
    buf[indices_at:indices_end] = block_tables[:num_seqs, :width][used]

    num_prefills = num_seqs - num_decodes
    qo_at = indices_end
    kv_at = qo_at + num_prefills + 1
    buf[qo_at:kv_at] = query_start_loc[num_decodes : num_seqs + 1] - query_start_loc[num_decodes]
    buf[kv_at : kv_at + num_prefills + 1] = indptr[num_decodes:] - indptr[num_decodes]
    return StepIndices(
        indptr=slice(0, last_at),
        last_page_len=slice(last_at, batch_at),
        batch_indices=slice(batch_at, positions_at),
        positions=slice(positions_at, indices_at),
        indices=slice(indices_at, indices_end),
        prefill_qo_indptr=slice(qo_at, kv_at),
        prefill_kv_indptr=slice(kv_at, kv_at + num_prefills + 1),
        num_decode_pages=int(indptr[num_decodes]),
    )
