"""The BLOCK cache's storage: how many blocks fit, and one tensor per layer."""

from __future__ import annotations

import os

import torch

from novainfer.block_manager import blocks_for
from novainfer.config import EngineConfig
from novainfer.models.presets import Qwen2Config

# Memory left for activations, workspaces and CUDA graphs on top of the estimate below.
_CUDA_HEADROOM_BYTES = 2 << 30
# Without a device to ask, "auto" takes at most this share of the host's memory.
_CPU_MEMORY_SHARE = 0.25


def block_bytes(model: Qwen2Config, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one block across all layers (K and V)."""
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * model.num_hidden_layers * block_size * model.num_key_value_heads * model.head_dim * element


def activation_bytes(model: Qwen2Config, config: EngineConfig, dtype: torch.dtype) -> int:
    """A generous estimate of one step's peak activations: the widest layer tensors plus logits."""
    element = torch.empty((), dtype=dtype).element_size()
    width = 4 * model.hidden_size + 3 * model.intermediate_size + model.num_attention_heads * model.head_dim
    return config.max_num_batched_tokens * width * element + 3 * config.max_num_seqs * model.vocab_size * 4


def num_kv_blocks(
    config: EngineConfig, model: Qwen2Config, device: torch.device, dtype: torch.dtype, kv_dtype: torch.dtype
) -> int:
    """Blocks to allocate, counting the scratch block (`dtype` is the model's, `kv_dtype` the cache's).

    A given capacity (tokens) is honoured exactly. "auto" takes what every running sequence could
    need at full length, or what the memory budget allows if that is less.
    """
    if config.kv_cache_capacity != "auto":
        return blocks_for(config.kv_cache_capacity, config.block_size) + 1
    needed = config.max_num_seqs * blocks_for(config.max_model_len, config.block_size) + 1
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget = total * config.gpu_memory_utilization - (total - free)
        budget -= activation_bytes(model, config, dtype) + _CUDA_HEADROOM_BYTES
    else:
        budget = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * _CPU_MEMORY_SHARE
    affordable = int(budget // block_bytes(model, config.block_size, kv_dtype))
    if affordable < 2:
        raise RuntimeError(
            f"no memory left for the KV cache (budget {budget / 2**30:.2f} GiB); "
            "lower max_num_batched_tokens or raise gpu_memory_utilization"
        )
    return min(needed, affordable)


def allocate_kv_caches(
    model: Qwen2Config, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
) -> list[torch.Tensor]:
    """One tensor per layer, [2, num_blocks, block_size, num_kv_heads, head_dim]; K is [0], V is [1]."""
    shape = (2, num_blocks, block_size, model.num_key_value_heads, model.head_dim)
    return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(model.num_hidden_layers)]
