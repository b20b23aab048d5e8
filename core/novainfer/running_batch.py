"""The running sequences as rows of host arrays: the scheduler's half of the persistent batch.

A sequence the scheduler admits takes a free row and keeps it until it finishes or is preempted; its token ids,
counters and block table live there meanwhile (novainfer.sequence reads them through its properties). A step's
bookkeeping for every running sequence (advancing counts, placing the tokens a step sampled, finding the
sequences that need a new block or reach their length) is then a few numpy operations over rows whatever the
batch size, and only what changed (a sequence admitted, finished or preempted, a block filled) costs Python per
sequence. The model runner keeps the device half: each row's last sampled token, on the device.
"""

from __future__ import annotations

import numpy as np

from novainfer.sequence import Sequence


class RunningBatch:
    """Rows of per-sequence state for at most `max_rows` running sequences.

    tokens:       [rows, max_model_len] the known token ids (prompt, then outputs received);
    num_known:    how many of them are known;
    num_tokens:   tokens so far, counting sampled ones still in flight (asynchronous scheduling);
    num_computed: tokens whose K/V are in the cache or being written by a scheduled step;
    limit:        the length at which the sequence stops (prompt + max_tokens);
    stops_on_eos: whether an EOS token ends it;
    random:       whether it samples at a temperature (else greedily);
    forced:       whether it is teacher-forced (its tokens are given, not sampled);
    tables:       [rows, max_blocks_per_seq] its KV blocks, 0 (the scratch block) past num_blocks;
    prompt_len:   its prompt's length;
    named:        how many of its blocks the prefix cache names (its full prompt blocks computed so far);
    seq_ids:      the sequence holding each row, -1 for a free row.
    """

    def __init__(self, max_rows: int, max_model_len: int, max_blocks_per_seq: int, block_size: int) -> None:
        self._block_size = block_size
        self.tokens = np.zeros((max_rows, max_model_len), dtype=np.int32)
        self.num_known = np.zeros(max_rows, dtype=np.int64)
        self.num_tokens = np.zeros(max_rows, dtype=np.int64)
        self.num_computed = np.zeros(max_rows, dtype=np.int64)
        self.limit = np.zeros(max_rows, dtype=np.int64)
        self.stops_on_eos = np.zeros(max_rows, dtype=bool)
        self.random = np.zeros(max_rows, dtype=bool)
        self.forced = np.zeros(max_rows, dtype=bool)
        self.tables = np.zeros((max_rows, max_blocks_per_seq), dtype=np.int32)
        self.num_blocks = np.zeros(max_rows, dtype=np.int64)
        self.prompt_len = np.zeros(max_rows, dtype=np.int64)
        self.named = np.zeros(max_rows, dtype=np.int64)
        self.seq_ids = np.full(max_rows, -1, dtype=np.int64)
        self.seqs: list[Sequence | None] = [None] * max_rows
        self._free_rows = list(range(max_rows - 1, -1, -1))  # popped from the end: lowest row first

    def attach(self, seq: Sequence) -> int:
        """Move `seq`'s state into a free row; returns the row."""
        if seq.num_tokens != len(seq.token_ids):
            raise RuntimeError(f"sequence {seq.seq_id} has a token in flight; it cannot take a row")
        row = self._free_rows.pop()
        tokens, blocks = seq.token_ids, seq.block_table
        self.tokens[row, : len(tokens)] = tokens
        self.num_known[row] = self.num_tokens[row] = len(tokens)
        self.num_computed[row] = seq.num_computed_tokens
        self.limit[row] = seq.num_prompt_tokens + seq.params.max_tokens
        self.stops_on_eos[row] = not seq.params.ignore_eos
        self.random[row] = seq.params.temperature > 0
        self.forced[row] = seq.forced_tokens is not None
        self.tables[row, : len(blocks)] = blocks
        self.tables[row, len(blocks) :] = 0
        self.num_blocks[row] = len(blocks)
        self.prompt_len[row] = seq.num_prompt_tokens
        self.named[row] = min(seq.num_computed_tokens, seq.num_prompt_tokens) // self._block_size
        self.seq_ids[row] = seq.seq_id
        self.seqs[row] = seq
        seq.batch, seq.row = self, row
        return row

    def detach(self, seq: Sequence) -> None:
        """Move `seq`'s state back into the sequence and free its row."""
        row = seq.row
        seq.token_ids  # noqa: B018  (reading it brings the known tokens into the sequence's own list)
        blocks = seq.block_table
        num_tokens, num_computed = int(self.num_tokens[row]), int(self.num_computed[row])
        seq.batch, seq.row = None, -1
        seq.block_table = blocks
        seq.num_tokens, seq.num_computed_tokens = num_tokens, num_computed
        self.seq_ids[row] = -1
        self.seqs[row] = None
        self._free_rows.append(row)

    def add_blocks(self, row: int, blocks: list[int]) -> None:
        n = int(self.num_blocks[row])
        self.tables[row, n : n + len(blocks)] = blocks
        self.num_blocks[row] = n + len(blocks)

    def clear_blocks(self, row: int) -> None:
        self.tables[row, : self.num_blocks[row]] = 0
        self.num_blocks[row] = 0
