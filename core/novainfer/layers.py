"""The building blocks of a Qwen2 layer: PyTorch modules over the fused ops (Triton on CUDA)."""

from __future__ import annotations

import torch
from torch import nn

from novainfer.fused_ops import apply_rotary, fused_add_rms_norm, rms_norm, silu_and_mul

__all__ = ["FusedLinear", "RMSNorm", "RotaryEmbedding", "silu_and_mul"]


class RMSNorm(nn.Module):
    """Qwen2's RMSNorm (normalise in float32, scale in the input dtype), optionally fused with the
    residual add before it."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """norm(x); or, given the residual stream, (norm(x + residual), x + residual) as vLLM's RMSNorm."""
        if residual is None:
            return rms_norm(x, self.weight, self.eps)
        return fused_add_rms_norm(x, residual, self.weight, self.eps)


class FusedLinear(nn.Linear):
    """Several projections of one input stored as one matrix (q/k/v, gate/up): one GEMM instead of three.

    `shard_sizes` are the output sizes of the parts, in order, so checkpoint tensors stored
    separately can be loaded into their slice.
    """

    def __init__(self, in_features: int, shard_sizes: list[int], bias: bool) -> None:
        super().__init__(in_features, sum(shard_sizes), bias=bias)
        self.shard_sizes = shard_sizes

    def shard_slice(self, shard: int) -> slice:
        start = sum(self.shard_sizes[:shard])
        return slice(start, start + self.shard_sizes[shard])


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (the rotate-half form Qwen2 uses), with cos/sin precomputed per position."""

    def __init__(self, head_dim: int, max_positions: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.max_positions, self.theta = head_dim, max_positions, theta
        self.register_buffer("cos", torch.empty(max_positions, head_dim // 2), persistent=False)
        self.register_buffer("sin", torch.empty(max_positions, head_dim // 2), persistent=False)
        self.fill()

    def fill(self) -> None:
        """Compute the tables into the buffers (again after a model built on the meta device is materialized)."""
        if self.cos.is_meta:
            return
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim))
        freqs = torch.outer(torch.arange(self.max_positions, dtype=torch.float32), inv_freq)
        self.cos.copy_(freqs.cos())
        self.sin.copy_(freqs.sin())

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate q [T, Hq, head_dim] and k [T, Hkv, head_dim] by their tokens' positions.

        May rotate in place (see fused_ops.apply_rotary): use the returned tensors.
        """
        return apply_rotary(positions, q, k, self.cos, self.sin)
