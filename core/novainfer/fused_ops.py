"""Fused elementwise ops of a Qwen2 layer: one Triton kernel each on CUDA, plain PyTorch elsewhere.

Unfused, a decode layer launches about 40 tiny kernels (RMSNorm in float32 alone is seven); at small
batch their launch latency, not their arithmetic, sets the step time. Each op here is one kernel.

Every op has three public forms:
    <op>            dispatches: the Triton kernel when the tensor is on CUDA and triton is importable,
                    else the reference;
    <op>_reference  plain PyTorch, the numerics the model had before fusion (the CPU path, and what
                    the tests and bench/fused_ops_gpu.py compare against);
    <op>_triton     the kernel launcher, callable on CPU tensors under TRITON_INTERPRET=1 (tests).

The kernels keep the reference's rounding points (compute in float32, round to the tensor dtype
where the reference does), so norms match it bitwise or within one ulp; silu_and_mul is the one
exception (it rounds once, see there). Launchers allocate nothing but their outputs, so they can be
captured in a CUDA graph, and launch nothing for zero rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional: without it every op takes its PyTorch path
    triton = None

# One program normalises a whole row in registers; wider rows would spill.
MAX_NORM_SIZE = 8192
# Columns of silu_and_mul per program: an intermediate size is split over several programs, so even
# one token spreads over the GPU.
SILU_BLOCK = 1024


def _use_triton(x: torch.Tensor) -> bool:
    return triton is not None and x.is_cuda


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, last dim] (a view where possible), checked to have unit stride in the last dim."""
    x2d = x.reshape(-1, x.shape[-1])
    assert x2d.stride(-1) == 1, "the last dim must have unit stride"
    return x2d


# --------------------------------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------------------------------


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * normalise(x): normalise in float32, cast back to x.dtype, then scale (Qwen2's order)."""
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def fused_add_rms_norm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual), the sum rounded to x.dtype."""
    residual = (x + residual).to(x.dtype)
    return rms_norm_reference(residual, weight, eps), residual


def _rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def apply_rotary_reference(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half rotary embedding in float32, out of place; see apply_rotary for the shapes."""
    cos = cos[positions].unsqueeze(1)
    sin = sin[positions].unsqueeze(1)
    return _rotate_half(q, cos, sin), _rotate_half(k, cos, sin)


def silu_and_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up in the input dtype: rounds twice (after silu and after the product)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _rms_norm_kernel(
        x_ptr,
        residual_ptr,
        weight_ptr,
        out_ptr,
        residual_out_ptr,
        stride_x,
        stride_r,
        stride_o,
        stride_ro,
        eps,
        N: tl.constexpr,
        BLOCK: tl.constexpr,
        ADD_RESIDUAL: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        if ADD_RESIDUAL:
            r = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0)
            # The sum is rounded to x's dtype before it is normalised, as the unfused add stored it.
            x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
            tl.store(residual_out_ptr + row * stride_ro + cols, x, mask=mask)
        xf = x.to(tl.float32)
        # Masked columns load as 0 and add nothing to the sum of squares.
        rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / N + eps)
        normed = (xf * rstd).to(x_ptr.dtype.element_ty)
        w = tl.load(weight_ptr + cols, mask=mask, other=0.0)
        out = w.to(tl.float32) * normed.to(tl.float32)
        tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rotate_heads(
        base,
        stride_h,
        cos,
        sin,
        H: tl.constexpr,
        HALF: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_HALF: tl.constexpr,
    ):
        heads = tl.arange(0, BLOCK_H)
        dims = tl.arange(0, BLOCK_HALF)
        mask = (heads < H)[:, None] & (dims < HALF)[None, :]
        first = base + heads[:, None] * stride_h + dims[None, :]
        second = first + HALF
        x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(second, mask=mask, other=0.0).to(tl.float32)
        tl.store(first, (x1 * cos - x2 * sin).to(base.dtype.element_ty), mask=mask)
        tl.store(second, (x2 * cos + x1 * sin).to(base.dtype.element_ty), mask=mask)

    @triton.jit
    def _rotary_kernel(
        positions_ptr,
        q_ptr,
        k_ptr,
        cos_ptr,
        sin_ptr,
        stride_qt,
        stride_qh,
        stride_kt,
        stride_kh,
        stride_cos,
        stride_sin,
        HQ: tl.constexpr,
        HKV: tl.constexpr,
        HALF: tl.constexpr,
        BLOCK_HQ: tl.constexpr,
        BLOCK_HKV: tl.constexpr,
        BLOCK_HALF: tl.constexpr,
    ):
        # One program per token: its cos/sin row is read once for all of its q and k heads.
        token = tl.program_id(0).to(tl.int64)
        pos = tl.load(positions_ptr + token).to(tl.int64)
        dims = tl.arange(0, BLOCK_HALF)
        d_mask = dims < HALF
        cos = tl.load(cos_ptr + pos * stride_cos + dims, mask=d_mask, other=0.0).to(tl.float32)[None, :]
        sin = tl.load(sin_ptr + pos * stride_sin + dims, mask=d_mask, other=0.0).to(tl.float32)[None, :]
        _rotate_heads(q_ptr + token * stride_qt, stride_qh, cos, sin, HQ, HALF, BLOCK_HQ, BLOCK_HALF)
        _rotate_heads(k_ptr + token * stride_kt, stride_kh, cos, sin, HKV, HALF, BLOCK_HKV, BLOCK_HALF)

    @triton.jit
    def _silu_and_mul_kernel(in_ptr, out_ptr, stride_in, stride_out, SIZE: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < SIZE
        gate = tl.load(in_ptr + row * stride_in + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(in_ptr + row * stride_in + SIZE + cols, mask=mask, other=0.0).to(tl.float32)
        out = gate * tl.sigmoid(gate) * up
        tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def _norm_launch(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    out: torch.Tensor,
    residual_out: torch.Tensor | None,
) -> None:
    size = x.shape[-1]
    if size > MAX_NORM_SIZE:
        raise ValueError(f"the fused RMSNorm handles rows of up to {MAX_NORM_SIZE} elements, got {size}")
    assert weight.shape == (size,) and weight.stride(0) == 1
    x2d, out2d = _rows(x), out.view(-1, size)
    if x2d.shape[0] == 0:
        return
    if residual is None:
        # Unused when ADD_RESIDUAL is off; any tensor satisfies the signature.
        r2d, rout2d = x2d, out2d
    else:
        assert residual.shape == x.shape and residual_out is not None
        r2d, rout2d = _rows(residual), residual_out.view(-1, size)
    block = triton.next_power_of_2(size)
    _rms_norm_kernel[(x2d.shape[0],)](
        x2d,
        r2d,
        weight,
        out2d,
        rout2d,
        x2d.stride(0),
        r2d.stride(0),
        out2d.stride(0),
        rout2d.stride(0),
        eps,
        N=size,
        BLOCK=block,
        ADD_RESIDUAL=residual is not None,
        # Untuned: about 8 elements per thread (2048 columns, Qwen2-1.5B's 1536 padded, get 8 warps).
        num_warps=min(max(block // 256, 1), 16),
    )


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    _norm_launch(x, None, weight, eps, out, None)
    return out


def fused_add_rms_norm_triton(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    residual_out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _norm_launch(x, residual, weight, eps, out, residual_out)
    return out, residual_out


def apply_rotary_triton(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    half = head_dim // 2
    assert k.shape == (num_tokens, num_kv_heads, head_dim) and positions.shape == (num_tokens,)
    assert head_dim % 2 == 0 and cos.shape[1] == half and sin.shape[1] == half
    assert q.stride(2) == 1 and k.stride(2) == 1 and cos.stride(1) == 1 and sin.stride(1) == 1
    assert positions.is_contiguous()
    if num_tokens == 0:
        return q, k
    _rotary_kernel[(num_tokens,)](
        positions,
        q,
        k,
        cos,
        sin,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        cos.stride(0),
        sin.stride(0),
        HQ=num_q_heads,
        HKV=num_kv_heads,
        HALF=half,
        BLOCK_HQ=triton.next_power_of_2(num_q_heads),
        BLOCK_HKV=triton.next_power_of_2(num_kv_heads),
        BLOCK_HALF=triton.next_power_of_2(half),
        num_warps=4,
    )
    return q, k


def silu_and_mul_triton(gate_up: torch.Tensor) -> torch.Tensor:
    size = gate_up.shape[-1] // 2
    assert gate_up.shape[-1] == 2 * size
    out = torch.empty((*gate_up.shape[:-1], size), dtype=gate_up.dtype, device=gate_up.device)
    in2d, out2d = _rows(gate_up), out.view(-1, size)
    if in2d.shape[0] == 0:
        return out
    block = min(SILU_BLOCK, triton.next_power_of_2(size))
    _silu_and_mul_kernel[(in2d.shape[0], triton.cdiv(size, block))](
        in2d, out2d, in2d.stride(0), out2d.stride(0), SIZE=size, BLOCK=block, num_warps=4
    )
    return out


# --------------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim (up to MAX_NORM_SIZE on CUDA): x [..., N], weight [N] -> [..., N].

    Normalises in float32, rounds to x.dtype, then multiplies by the weight (result dtype: x's and the
    weight's promoted, as in PyTorch).
    """
    if _use_triton(x):
        return rms_norm_triton(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(normed, new_residual): new_residual = x + residual rounded to x.dtype, normed = rms_norm(new_residual).

    One kernel reads x and residual once and writes both results: the residual add of a decoder
    layer fused into the norm that follows it (vLLM's fused_add_rms_norm, out of place).
    """
    if _use_triton(x):
        return fused_add_rms_norm_triton(x, residual, weight, eps)
    return fused_add_rms_norm_reference(x, residual, weight, eps)


def apply_rotary(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half rotary embedding of q [T, Hq, D] and k [T, Hkv, D] by positions [T].

    cos, sin: [max_positions, D/2] float32 tables. q and k may be strided views (the fused QKV
    projection's output: any token and head stride, unit stride in D). Computes in float32 and
    rounds to each tensor's dtype.

    The Triton path rotates q and k IN PLACE and returns them (they are fresh projection outputs, so
    nothing else reads the unrotated values); the reference returns new tensors. Either way use the
    returned pair and do not reuse the inputs.
    """
    if _use_triton(q):
        return apply_rotary_triton(positions, q, k, cos, sin)
    return apply_rotary_reference(positions, q, k, cos, sin)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up [..., 2I] split into halves -> [..., I].

    The Triton path computes in float32 and rounds once; the reference rounds after silu and again
    after the product, so in half precision the two can differ by about one ulp.
    """
    if _use_triton(gate_up):
        return silu_and_mul_triton(gate_up)
    return silu_and_mul_reference(gate_up)
