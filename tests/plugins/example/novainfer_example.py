"""A third-party backend written from novainfer.backend_api's docstrings alone: plain PyTorch, one sequence at a
time, every rule taken from the StepBatch and hook documentation (decodes first, query_start_loc rows, seq_lens
counting this step's tokens, block tables mapping positions to blocks, causal chunks over a cached prefix).

It keeps the core's KV write (it leaves `write_kv` out) and cannot run in CUDA graphs (it reads host values).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from novainfer.backend_api import AttentionContext, BackendSpec, Capabilities, StepBatch, hookimpl


class ExampleBackend:
    def __init__(self, context: AttentionContext) -> None:
        self.context = context

    @hookimpl
    def prepare_attention_metadata(self, batch: StepBatch) -> StepBatch:
        return batch  # the docs allow the batch itself as metadata

    @hookimpl
    def attention(
        self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: StepBatch, scale: float, output: torch.Tensor
    ) -> bool:
        batch = metadata
        starts, lens = batch.query_start_loc_cpu.tolist(), batch.seq_lens_cpu.tolist()
        tables = batch.block_tables_cpu
        group = query.shape[1] // kv_cache.shape[-2]  # query heads per KV head
        for b in range(batch.num_seqs):
            first, last, seq_len = starts[b], starts[b + 1], lens[b]
            positions = torch.arange(seq_len)
            slots = tables[b, positions // batch.block_size].long() * batch.block_size + positions % batch.block_size
            slots = slots.to(kv_cache.device)
            keys = kv_cache[0].flatten(0, 1)[slots].repeat_interleave(group, dim=1)  # [S, Hq, D]
            values = kv_cache[1].flatten(0, 1)[slots].repeat_interleave(group, dim=1)
            q = query[first:last].float()  # [n, Hq, D]
            scores = torch.einsum("nhd,shd->hns", q, keys.float()) * scale
            # The step's n query tokens are the sequence's last n: query i sits at position seq_len - n + i.
            q_pos = torch.arange(seq_len - (last - first), seq_len, device=query.device)
            allowed = positions.to(query.device).unsqueeze(0) <= q_pos.unsqueeze(1)  # [n, S]
            probs = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
            output[first:last] = torch.einsum("hns,shd->nhd", probs, values.float()).to(output.dtype)
        return True


@hookimpl
def register_backends(register: Callable[[BackendSpec], None]) -> None:
    register(
        BackendSpec(
            name="example", create=ExampleBackend,
            capabilities=Capabilities(devices=("cpu", "cuda"), dtypes=("float32", "bfloat16", "float16")),
            # The contract this file was written from (backend_api.CONTRACT_VERSION then), as a literal: a core
            # of another contract refuses it rather than run it on rules it never read.
            contract_version=2,
        )
    )
