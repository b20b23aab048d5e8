"""The fused elementwise kernels (novainfer.fused_ops) against their plain-PyTorch references.

Without CUDA the kernels run on the CPU under the Triton interpreter (conftest.py selects it); with
CUDA they run natively. Norms must match the reference to one ulp in half precision (the kernels
keep its rounding points; only the float32 sum of squares is reduced in another order), rotary and
silu_and_mul to the relative tolerances of their dtype. Sizes are small but ragged: non-power-of-two
hidden sizes, head counts and head dims, and 0 or 1 tokens.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from novainfer import LLM, fused_ops
from novainfer.layers import RMSNorm, RotaryEmbedding

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HALF_DTYPES = (torch.bfloat16, torch.float16)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MANTISSA_BITS = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}
# Half precision: the final rounding hides the float32 sum's order, except on a rare tie (<= 1 ulp
# on at most this share of elements). Float32 keeps it: a few ulps.
MAX_HALF_MISMATCH_SHARE = 0.01
MAX_FP32_NORM_ULPS = 4
# (rtol, atol) for rotary and silu_and_mul.
TOLERANCE = {torch.bfloat16: (1e-2, 1e-2), torch.float16: (1e-3, 1e-3), torch.float32: (1e-5, 1e-5)}
EPS = 1e-6


@pytest.fixture(autouse=True)
def round_bf16_to_nearest_even(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Make the interpreter round float32 -> bfloat16 to nearest even, as GPUs (and PyTorch) do.

    triton's interpreter truncates that cast (its default rounding mode is None), so every
    bfloat16 result would be off by up to one ulp from what the compiled kernel produces.
    """
    if os.environ.get("TRITON_INTERPRET") == "1":
        import triton.language as tl
        from triton.runtime import interpreter

        original = interpreter.InterpreterBuilder.cast_impl

        def cast_impl(
            self: interpreter.InterpreterBuilder, src: interpreter.TensorHandle, dst_type: tl.dtype
        ) -> interpreter.TensorHandle:
            if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
                rounded = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16)
                return interpreter.TensorHandle(rounded.view(torch.int16).numpy().view(np.uint16), tl.bfloat16)
            return original(self, src, dst_type)

        monkeypatch.setattr(interpreter.InterpreterBuilder, "cast_impl", cast_impl)
    yield


def ulp_errors(actual: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """|actual - expected| in units in the last place of `expected`'s dtype at `expected`, elementwise."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    exp = expected.double()
    _, exponent = torch.frexp(exp.abs().clamp_min(torch.finfo(expected.dtype).tiny))
    ulp = torch.ldexp(torch.ones_like(exp), exponent - 1 - MANTISSA_BITS[expected.dtype])
    return (actual.double() - exp).abs() / ulp


def assert_within_ulps(actual: torch.Tensor, expected: torch.Tensor) -> None:
    if expected.numel() == 0:
        assert actual.shape == expected.shape
        return
    errors = ulp_errors(actual, expected)
    if expected.dtype in HALF_DTYPES:
        assert errors.max().item() <= 1
        assert (errors > 0).double().mean().item() <= MAX_HALF_MISMATCH_SHARE
    else:
        assert errors.max().item() <= MAX_FP32_NORM_ULPS


def assert_norm_matches(
    run: Callable[[torch.Tensor], torch.Tensor], reference: Callable[[torch.Tensor], torch.Tensor], weight: torch.Tensor
) -> None:
    """Check a norm kernel (`run(weight)` -> normed) in two steps, each against its own bound.

    With a unit weight the output is the normalised row rounded to the dtype: within an ulp of the
    reference. The weight then scales that rounded value with one more rounding, as the reference
    does, so the kernel's weighted output equals weight * its unit-weight output bitwise. (Compared
    in one step, one ulp of the normalised value can be two of the output where |weight| < 1.)
    """
    normalised = run(torch.ones_like(weight))
    assert_within_ulps(normalised, reference(torch.ones_like(weight)))
    assert torch.equal(run(weight), weight * normalised)


def randn(*shape: int, dtype: torch.dtype, gen: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen) * scale).to(device=DEVICE, dtype=dtype)


def norm_inputs(
    num_tokens: int, hidden: int, dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (wide, so rstd is far from 1), residual, and a weight that is not all ones."""
    gen = torch.Generator().manual_seed(seed)
    return (
        randn(num_tokens, hidden, dtype=dtype, gen=gen, scale=3.0),
        randn(num_tokens, hidden, dtype=dtype, gen=gen),
        (1 + randn(hidden, dtype=torch.float32, gen=gen, scale=0.3)).to(dtype),
    )


NUM_TOKENS = [0, 1, 5, 33]
# 96 and 1536 are not powers of two (masked columns); 8192 is the widest row the kernel takes.
HIDDEN = [96, 64, 1536, 8192]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
def test_rms_norm_matches_reference(num_tokens: int, hidden: int, dtype: torch.dtype) -> None:
    x, _, weight = norm_inputs(num_tokens, hidden, dtype, seed=0)
    assert_norm_matches(
        lambda w: fused_ops.rms_norm_triton(x, w, EPS), lambda w: fused_ops.rms_norm_reference(x, w, EPS), weight
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
def test_fused_add_rms_norm_matches_reference(num_tokens: int, hidden: int, dtype: torch.dtype) -> None:
    x, residual, weight = norm_inputs(num_tokens, hidden, dtype, seed=1)
    x_before, residual_before = x.clone(), residual.clone()
    check_fused_add(x, residual, weight)
    assert torch.equal(x, x_before) and torch.equal(residual, residual_before), "inputs must not change"


def check_fused_add(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor) -> None:
    _, new_residual = fused_ops.fused_add_rms_norm_triton(x, residual, weight, EPS)
    # The sum is one rounding of an exact float32 add: bitwise.
    assert torch.equal(new_residual, fused_ops.fused_add_rms_norm_reference(x, residual, weight, EPS)[1])
    assert_norm_matches(
        lambda w: fused_ops.fused_add_rms_norm_triton(x, residual, w, EPS)[0],
        lambda w: fused_ops.fused_add_rms_norm_reference(x, residual, w, EPS)[0],
        weight,
    )


def test_norms_take_strided_rows_and_leading_dims() -> None:
    # x and residual as column slices of wider tensors (row stride > hidden), with two leading dims.
    gen = torch.Generator().manual_seed(2)
    wide = randn(2, 3, 160, dtype=torch.bfloat16, gen=gen)
    x, residual = wide[..., :96], wide[..., 64:]
    weight = randn(96, dtype=torch.bfloat16, gen=gen)
    assert not x.is_contiguous()
    assert_norm_matches(
        lambda w: fused_ops.rms_norm_triton(x, w, EPS), lambda w: fused_ops.rms_norm_reference(x, w, EPS), weight
    )
    check_fused_add(x, residual, weight)


def test_rms_norm_rejects_rows_wider_than_one_program() -> None:
    x = torch.zeros(1, fused_ops.MAX_NORM_SIZE + 1, device=DEVICE)
    with pytest.raises(ValueError, match="up to 8192"):
        fused_ops.rms_norm_triton(x, torch.ones(x.shape[1], device=DEVICE), EPS)


def qkv_views(
    num_tokens: int, heads: tuple[int, int], head_dim: int, dtype: torch.dtype, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused QKV projection's output [T, (Hq + 2 Hkv) * D] and its q and k views, as the model splits it."""
    num_q_heads, num_kv_heads = heads
    q_size, kv_size = num_q_heads * head_dim, num_kv_heads * head_dim
    qkv = randn(num_tokens, q_size + 2 * kv_size, dtype=dtype, gen=gen)
    q, k, _ = qkv.split([q_size, kv_size, kv_size], dim=-1)
    return qkv, q.view(-1, num_q_heads, head_dim), k.view(-1, num_kv_heads, head_dim)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [16, 24, 128])  # 24: half of it (12) is not a power of two
@pytest.mark.parametrize("heads", [(12, 2), (4, 2), (6, 1)], ids=["12x2", "4x2", "6x1"])
@pytest.mark.parametrize("num_tokens", [0, 1, 7])
def test_rotary_matches_reference_in_place_on_qkv_views(
    num_tokens: int, heads: tuple[int, int], head_dim: int, dtype: torch.dtype
) -> None:
    gen = torch.Generator().manual_seed(3)
    max_positions = 300
    rotary = RotaryEmbedding(head_dim, max_positions, theta=10000.0).to(DEVICE)
    qkv, q, k = qkv_views(num_tokens, heads, head_dim, dtype, gen)
    if num_tokens > 1:
        assert not q.is_contiguous() and not k.is_contiguous()
    positions = torch.randint(0, max_positions, (num_tokens,), generator=gen).to(DEVICE)
    before = qkv.clone()
    want_q, want_k = fused_ops.apply_rotary_reference(positions, q, k, rotary.cos, rotary.sin)

    got_q, got_k = fused_ops.apply_rotary_triton(positions, q, k, rotary.cos, rotary.sin)
    assert got_q is q and got_k is k, "the kernel rotates in place and returns its inputs"
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(got_q, want_q, rtol=rtol, atol=atol)
    torch.testing.assert_close(got_k, want_k, rtol=rtol, atol=atol)
    # V, the rest of the fused row, is untouched.
    v_start = q.shape[1] * head_dim + k.shape[1] * head_dim
    assert torch.equal(qkv[:, v_start:], before[:, v_start:])


def test_rotary_through_the_module_on_int32_positions() -> None:
    # The module hands its float32 tables to the op; int32 positions index them like int64.
    gen = torch.Generator().manual_seed(4)
    rotary = RotaryEmbedding(32, 64, theta=1e6).to(DEVICE)
    _, q, k = qkv_views(5, (4, 2), 32, torch.float32, gen)
    positions = torch.tensor([0, 63, 1, 17, 40], dtype=torch.int32, device=DEVICE)
    want_q, want_k = rotary(positions.long(), q.clone(), k.clone())
    got_q, got_k = fused_ops.apply_rotary_triton(positions, q, k, rotary.cos, rotary.sin)
    torch.testing.assert_close(got_q, want_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_k, want_k, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
# 1500 spans two column blocks of SILU_BLOCK with a ragged end; 96 is not a power of two.
@pytest.mark.parametrize("size", [96, 160, 1500])
@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
def test_silu_and_mul_matches_reference(num_tokens: int, size: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(5)
    # Gate values from -6 to 6 cover silu's flat, curved and linear parts.
    gate_up = randn(num_tokens, 2 * size, dtype=dtype, gen=gen, scale=2.0)
    got = fused_ops.silu_and_mul_triton(gate_up)
    assert got.shape == (num_tokens, size) and got.dtype == dtype
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(got, fused_ops.silu_and_mul_reference(gate_up), rtol=rtol, atol=atol)
    if dtype in HALF_DTYPES and num_tokens:
        # The kernel rounds once: to within an ulp of the float32 result rounded to the dtype (the
        # reference's two roundings can be further off). In float32 the bound would only measure
        # how two exp implementations differ.
        gate, up = gate_up.float().chunk(2, dim=-1)
        assert ulp_errors(got, (F.silu(gate) * up).to(dtype)).max().item() <= 1


def test_silu_and_mul_takes_strided_rows() -> None:
    gen = torch.Generator().manual_seed(6)
    wide = randn(4, 3 * 96, dtype=torch.bfloat16, gen=gen)
    gate_up = wide[:, : 2 * 96]
    assert not gate_up.is_contiguous()
    rtol, atol = TOLERANCE[torch.bfloat16]
    got = fused_ops.silu_and_mul_triton(gate_up)
    torch.testing.assert_close(got, fused_ops.silu_and_mul_reference(gate_up), rtol=rtol, atol=atol)


def test_rms_norm_module_passes_the_residual_like_vllm() -> None:
    gen = torch.Generator().manual_seed(7)
    norm = RMSNorm(96, EPS).to(DEVICE)
    norm.weight.data = randn(96, dtype=torch.float32, gen=gen)
    x, residual = randn(3, 96, dtype=torch.float32, gen=gen), randn(3, 96, dtype=torch.float32, gen=gen)
    normed, new_residual = norm(x, residual)
    assert torch.equal(new_residual, x + residual)
    torch.testing.assert_close(normed, norm(x + residual), rtol=0, atol=0)


@pytest.mark.skipif(DEVICE == "cuda", reason="checks the CPU dispatch")
def test_cpu_tensors_take_the_reference_path(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every public op must leave the kernels alone on the CPU, even with triton importable.
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a Triton launcher ran on CPU tensors")

    for name in ("rms_norm_triton", "fused_add_rms_norm_triton", "apply_rotary_triton", "silu_and_mul_triton"):
        monkeypatch.setattr(fused_ops, name, refuse)
    gen = torch.Generator().manual_seed(8)
    x, residual, weight = norm_inputs(3, 64, torch.float32, seed=8)
    assert torch.equal(fused_ops.rms_norm(x, weight, EPS), fused_ops.rms_norm_reference(x, weight, EPS))
    fused_ops.fused_add_rms_norm(x, residual, weight, EPS)
    rotary = RotaryEmbedding(16, 8, theta=10000.0)
    _, q, k = qkv_views(3, (4, 2), 16, torch.float32, gen)
    fused_ops.apply_rotary(torch.zeros(3, dtype=torch.long), q, k, rotary.cos, rotary.sin)
    fused_ops.silu_and_mul(x)


def test_core_imports_and_runs_without_triton() -> None:
    # A fresh interpreter where `import triton` fails: the layers still build and run (on the CPU).
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from novainfer import fused_ops\n"
        "from novainfer.layers import RMSNorm, RotaryEmbedding, silu_and_mul\n"
        "assert fused_ops.triton is None\n"
        "x = torch.randn(3, 32)\n"
        "normed, residual = RMSNorm(32, 1e-6)(x, x)\n"
        "q, k = RotaryEmbedding(16, 8, 10000.0)(torch.zeros(3, dtype=torch.long), x.view(3, 2, 16), x.view(3, 2, 16))\n"
        "assert silu_and_mul(x).shape == (3, 16)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=Path(__file__).parent
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(DEVICE == "cuda", reason="forces the kernels onto CPU tensors")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_model_through_the_kernels_matches_the_reference_path(dtype: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole model (chunked prefill and decode) with every fused op on its kernel, under the interpreter.

    Catches what op-level tests cannot: rotary writing into the QKV output in place, and the
    residual stream handed from layer to layer.
    """
    rng = random.Random(9)
    prompts = [[rng.randrange(10000) for _ in range(rng.randint(2, 30))] for _ in range(4)]
    continuations = [[rng.randrange(10000) for _ in range(5)] for _ in prompts]
    settings = dict(device="cpu", dtype=dtype, max_model_len=64, max_num_batched_tokens=32, block_size=4)
    want = LLM("random:qwen2-tiny", **settings).teacher_forced_logits(prompts, continuations)
    monkeypatch.setattr(fused_ops, "_use_triton", lambda x: True)
    got = LLM("random:qwen2-tiny", **settings).teacher_forced_logits(prompts, continuations)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-5 if dtype == "float32" else 1e-2)
