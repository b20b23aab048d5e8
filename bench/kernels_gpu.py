"""Check and time the native backend's Triton kernels on a CUDA GPU.

Shape: DeepSeek-R1-Distill-Qwen-1.5B attention (12 query heads, 2 KV heads, head_dim 128), bf16,
block size 16, blocks handed out in shuffled order. Each kernel is first checked on fresh random
inputs against a plain-PyTorch reference (relative error ||out - ref|| / ||ref|| <= 1e-2, output
poisoned with NaN first), then timed with triton.testing.do_bench (median). The last thing printed is
a table; "KV GB/s" counts each sequence's K and V bytes once (re-reads served from L2 are free).
Each launcher is also captured in a CUDA graph (which fails on a host sync or a stray allocation),
checked again as a replay, and timed that way too, without Python's launch overhead.

Standalone: loads triton_ops.py by path, so neither the core nor the plugin needs to be installed.

    python bench/kernels_gpu.py [--quick]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention

OPS_PATH = Path(__file__).resolve().parents[1] / "plugins/native/novainfer_native/triton_ops.py"
_spec = importlib.util.spec_from_file_location("novainfer_triton_ops", OPS_PATH)
ops = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = ops  # dataclasses look their module up while the class is built
_spec.loader.exec_module(ops)

NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 12, 2, 128, 16
DTYPE = torch.bfloat16
MAX_REL_ERROR = 1e-2
GRAPH_REPEATS = 10
DEVICE = "cuda"


@dataclass
class Batch:
    """One step's attention inputs over a freshly filled paged cache."""

    query: torch.Tensor  # [num_tokens, Hq, D]
    kv_cache: torch.Tensor  # [2, num_blocks, BLOCK_SIZE, Hkv, D]
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32
    seq_lens: torch.Tensor  # [num_seqs] int32
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    query_lens: list[int]
    seq_lens_list: list[int]


def kv_bytes(seq_lens: list[int]) -> int:
    """K and V bytes of every sequence's context, each counted once."""
    return sum(seq_lens) * NUM_KV_HEADS * HEAD_DIM * 2 * DTYPE.itemsize


def attention_flops(query_lens: list[int], seq_lens: list[int]) -> int:
    """Matmul FLOPs of causal attention: QK^T and PV, 2 * D each, per visible (query, key) pair."""
    pairs = sum(q * (s - q) + q * (q + 1) // 2 for q, s in zip(query_lens, seq_lens, strict=True))
    return 4 * HEAD_DIM * NUM_Q_HEADS * pairs


def make_batch(query_lens: list[int], seq_lens: list[int], gen: torch.Generator) -> Batch:
    """Random queries and cache; each sequence owns randomly chosen blocks (block 0 stays scratch)."""
    blocks_per_seq = [-(-s // BLOCK_SIZE) for s in seq_lens]
    num_blocks = 1 + sum(blocks_per_seq)
    kv_cache = torch.randn(
        2, num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, generator=gen, device=DEVICE, dtype=DTYPE
    )
    ids = torch.randperm(num_blocks - 1, generator=gen, device=DEVICE).to(torch.int32) + 1
    block_tables = torch.zeros(len(seq_lens), max(blocks_per_seq), dtype=torch.int32, device=DEVICE)
    offset = 0
    for b, n in enumerate(blocks_per_seq):
        block_tables[b, :n] = ids[offset : offset + n]
        offset += n
    query = torch.randn(sum(query_lens), NUM_Q_HEADS, HEAD_DIM, generator=gen, device=DEVICE, dtype=DTYPE)
    starts = torch.tensor([0, *query_lens], dtype=torch.int32, device=DEVICE).cumsum(0, dtype=torch.int32)
    return Batch(
        query=query,
        kv_cache=kv_cache,
        block_tables=block_tables,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        query_start_loc=starts,
        query_lens=query_lens,
        seq_lens_list=seq_lens,
    )


def reference(batch: Batch, scale: float) -> torch.Tensor:
    """Causal attention per sequence in fp32 over K/V gathered through the block table."""
    group = NUM_Q_HEADS // NUM_KV_HEADS
    out = torch.empty(batch.query.shape, dtype=torch.float32, device=DEVICE)
    start = 0
    for b, (q_len, seq_len) in enumerate(zip(batch.query_lens, batch.seq_lens_list, strict=True)):
        blocks = batch.block_tables[b, : -(-seq_len // BLOCK_SIZE)].long()
        k = batch.kv_cache[0, blocks].reshape(-1, NUM_KV_HEADS, HEAD_DIM)[:seq_len].float()
        v = batch.kv_cache[1, blocks].reshape(-1, NUM_KV_HEADS, HEAD_DIM)[:seq_len].float()
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        q = batch.query[start : start + q_len].float()
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        positions = seq_len - q_len + torch.arange(q_len, device=DEVICE)
        scores.masked_fill_(torch.arange(seq_len, device=DEVICE)[None, :] > positions[:, None], float("-inf"))
        out[start : start + q_len] = torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), v)
        start += q_len
    return out


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected).norm() / expected.norm()).item()


def check(name: str, run: Callable[[], None], out: torch.Tensor, expected: torch.Tensor) -> None:
    out.fill_(float("nan"))
    run()
    torch.cuda.synchronize()
    error = relative_error(out, expected)
    status = "ok" if error <= MAX_REL_ERROR else "FAIL"
    print(f"check {name:<40} rel err {error:.2e} {status}", flush=True)
    if error > MAX_REL_ERROR:
        raise SystemExit(f"{name}: relative error {error:.3e} > {MAX_REL_ERROR}")


def bench_ms(run: Callable[[], None]) -> float:
    return triton.testing.do_bench(run, warmup=25, rep=100, return_mode="median")


def capture(run: Callable[[], None]) -> torch.cuda.CUDAGraph:
    """Record GRAPH_REPEATS calls of an already compiled launcher in one CUDA graph.

    Capture fails on a host sync or a disallowed allocation, so this also proves the launcher can
    live in the engine's graphs; timing the replay leaves out Python launch overhead, which
    dominates small decode batches when launched eagerly.
    """
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(GRAPH_REPEATS):
            run()
    return graph


def measure(
    name: str, run: Callable[[], None], out: torch.Tensor, expected: torch.Tensor
) -> tuple[float, float]:
    """Check the launcher eagerly and as a graph replay; return (eager ms, graph ms) per call."""
    check(name, run, out, expected)
    eager = bench_ms(run)
    graph = capture(run)
    check(name + " (graph)", graph.replay, out, expected)
    return eager, bench_ms(graph.replay) / GRAPH_REPEATS


@dataclass
class Row:
    kernel: str
    shape: str
    splits: int | str
    eager_ms: float
    graph_ms: float
    bytes: int
    flops: int | None = None


def bench_write_kv(num_tokens: int, gen: torch.Generator, rows: list[Row]) -> None:
    num_blocks = 1 + num_tokens // BLOCK_SIZE + 1
    kv_cache = torch.zeros(2, num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, device=DEVICE, dtype=DTYPE)
    # K and V as views of a fused QKV projection output, as the model produces them.
    width = (NUM_Q_HEADS + 2 * NUM_KV_HEADS) * HEAD_DIM
    qkv = torch.randn(num_tokens, width, generator=gen, device=DEVICE, dtype=DTYPE)
    kv_width = NUM_KV_HEADS * HEAD_DIM
    q_width = NUM_Q_HEADS * HEAD_DIM
    key = qkv[:, q_width : q_width + kv_width].view(num_tokens, NUM_KV_HEADS, HEAD_DIM)
    value = qkv[:, q_width + kv_width :].view(num_tokens, NUM_KV_HEADS, HEAD_DIM)
    slots = (
        torch.randperm((num_blocks - 1) * BLOCK_SIZE, generator=gen, device=DEVICE)[:num_tokens] + BLOCK_SIZE
    )

    def run() -> None:
        ops.write_kv(key, value, kv_cache, slots)

    def check_exact(name: str, launch: Callable[[], None]) -> None:
        kv_cache.fill_(float("nan"))
        launch()
        torch.cuda.synchronize()
        flat = kv_cache.view(2, -1, NUM_KV_HEADS, HEAD_DIM)
        exact = torch.equal(flat[0, slots], key) and torch.equal(flat[1, slots], value)
        print(f"check {name:<40} {'exact' if exact else 'FAIL'}", flush=True)
        if not exact:
            raise SystemExit(f"{name}: cache differs from the scattered keys/values")

    shape = f"T={num_tokens}"
    check_exact(f"write_kv {shape}", run)
    eager = bench_ms(run)
    graph = capture(run)
    check_exact(f"write_kv {shape} (graph)", graph.replay)
    moved = 2 * 2 * num_tokens * kv_width * kv_cache.element_size()  # K and V, read and written
    rows.append(Row("write_kv", shape, "-", eager, bench_ms(graph.replay) / GRAPH_REPEATS, moved))


def bench_decode(batch_size: int, ctx: str, gen: torch.Generator, num_sms: int, rows: list[Row]) -> None:
    if ctx == "mixed":
        lens = torch.randint(100, 2049, (batch_size,), generator=gen, device=DEVICE).tolist()
    else:
        lens = [int(ctx)] * batch_size
    # Two CUDA-graph padding rows follow the real ones: block-table entries 0, seq_len 0 and 1. Their
    # output is garbage by contract, so only the real rows are compared.
    batch = make_batch([1] * (batch_size + 2), [*lens, 0, 1], gen)
    batch.block_tables[batch_size:] = 0
    scale = HEAD_DIM**-0.5
    out = torch.empty_like(batch.query)
    expected = reference(batch, scale)[:batch_size]
    chosen = ops.choose_num_splits(batch_size, NUM_KV_HEADS, num_sms, max(lens))
    workspace = ops.decode_workspace(batch_size + 2, NUM_Q_HEADS, HEAD_DIM, 16, DEVICE)
    shape = f"B={batch_size} ctx={ctx}"
    for splits in sorted({1, chosen}):

        def run(splits: int = splits) -> None:
            ops.paged_decode_attention(
                batch.query,
                batch.kv_cache,
                batch.block_tables,
                batch.seq_lens,
                scale,
                out,
                workspace=workspace,
                num_splits=splits,
            )

        eager, graph = measure(f"decode {shape} splits={splits}", run, out[:batch_size], expected)
        label = f"{splits}*" if splits == chosen else splits
        rows.append(Row("decode", shape, label, eager, graph, kv_bytes(lens)))


def bench_prefill(
    name: str, query_lens: list[int], ctx_lens: list[int], gen: torch.Generator, rows: list[Row]
) -> None:
    seq_lens = [c + q for c, q in zip(ctx_lens, query_lens, strict=True)]
    batch = make_batch(query_lens, seq_lens, gen)
    scale = HEAD_DIM**-0.5
    out = torch.empty_like(batch.query)
    expected = reference(batch, scale)

    def run() -> None:
        ops.paged_prefill_attention(
            batch.query,
            batch.kv_cache,
            batch.block_tables,
            batch.query_start_loc,
            batch.seq_lens,
            max(query_lens),
            scale,
            out,
        )

    eager, graph = measure(f"prefill {name}", run, out, expected)
    rows.append(
        Row("prefill", name, "-", eager, graph, kv_bytes(seq_lens), attention_flops(query_lens, seq_lens))
    )


def bench_dense_flash(num_seqs: int, seq_len: int, gen: torch.Generator, rows: list[Row]) -> None:
    """A yardstick, not a check: PyTorch's FlashAttention on the same fresh prompts, dense and unpaged."""
    q = torch.randn(num_seqs, NUM_Q_HEADS, seq_len, HEAD_DIM, generator=gen, device=DEVICE, dtype=DTYPE)
    k, v = (
        torch.randn(
            num_seqs, NUM_KV_HEADS, seq_len, HEAD_DIM, generator=gen, device=DEVICE, dtype=DTYPE
        ).repeat_interleave(NUM_Q_HEADS // NUM_KV_HEADS, dim=1)
        for _ in range(2)
    )

    def run() -> None:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            scaled_dot_product_attention(q, k, v, is_causal=True)

    run()
    graph = capture(run)
    lens = [seq_len] * num_seqs
    name = f"{num_seqs} x {seq_len} dense flash"
    graph_ms = bench_ms(graph.replay) / GRAPH_REPEATS
    rows.append(Row("sdpa", name, "-", bench_ms(run), graph_ms, kv_bytes(lens), attention_flops(lens, lens)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer decode shapes")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    props = torch.cuda.get_device_properties(0)
    print(f"{props.name}, {props.multi_processor_count} SMs")
    print(f"torch {torch.__version__}, triton {triton.__version__}")
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    rows: list[Row] = []

    bench_write_kv(16384, gen, rows)
    contexts = ["100", "2048", "mixed"] if args.quick else ["100", "512", "1024", "2048", "mixed"]
    for batch_size in (8, 64, 256):
        for ctx in contexts:
            bench_decode(batch_size, ctx, gen, props.multi_processor_count, rows)
    # ~16k query tokens over several sequences: fresh prompts (with PyTorch's dense FlashAttention on
    # the same shape as a yardstick), chunks over a cached prefix, and a mixed step (64 decodes first,
    # then prefill chunks) as the engine could send it whole.
    bench_prefill("8 x 2048 new", [2048] * 8, [0] * 8, gen, rows)
    bench_dense_flash(8, 2048, gen, rows)
    bench_prefill("4 x 4096 new", [4096] * 4, [0] * 4, gen, rows)
    bench_prefill("8 x 2048 over 2048 cached", [2048] * 8, [2048] * 8, gen, rows)
    decode_ctx = torch.randint(100, 2048, (64,), generator=gen, device=DEVICE).tolist()
    # The last sequence is padding: no queries, no keys.
    bench_prefill(
        "64 decodes + 8 x 2000 chunks", [*[1] * 64, *[2000] * 8, 0], [*decode_ctx, *[512] * 8, 0], gen, rows
    )

    print()
    columns = ("splits", "eager us", "graph us", "KV GB/s", "TFLOP/s")
    print(f"{'kernel':<9} {'shape':<30} {columns[0]:>6} " + " ".join(f"{c:>9}" for c in columns[1:]))
    for r in rows:
        tflops = f"{r.flops / r.graph_ms / 1e9:9.1f}" if r.flops is not None else ""
        print(
            f"{r.kernel:<9} {r.shape:<30} {r.splits!s:>6} {r.eager_ms * 1e3:9.1f} {r.graph_ms * 1e3:9.1f} "
            f"{r.bytes / r.graph_ms / 1e6:9.0f} {tflops}"
        )
    print(
        "GB/s and TFLOP/s use graph time; KV GB/s counts each sequence's K/V once (write_kv: read + written);"
        " splits: * marks choose_num_splits' pick"
    )


if __name__ == "__main__":
    main()
