"""The CUDA-graph decode path, run eagerly on the CPU: padding a decode batch to its bucket must not
change the real rows, and the bucket choice must cover every batch size."""

from __future__ import annotations

import random

import torch

from novainfer import LLM
from novainfer.backend_api import cuda_graph_sizes

SETTINGS = dict(device="cpu", max_model_len=96, max_num_seqs=24, max_num_batched_tokens=256, block_size=4)


def test_buckets_cover_every_batch_size() -> None:
    assert cuda_graph_sizes(256)[:5] == (1, 2, 4, 8, 16) and cuda_graph_sizes(256)[-1] == 256
    for max_seqs in (1, 3, 24, 100, 256):
        buckets = cuda_graph_sizes(max_seqs)
        assert list(buckets) == sorted(set(buckets)) and buckets[-1] == max_seqs
        assert all(any(b >= n for b in buckets) for n in range(1, max_seqs + 1))
    assert len(cuda_graph_sizes(256)) == 20, "the bucket set must stay small: each costs a capture"


def test_padded_decode_steps_give_the_same_logits_as_unpadded() -> None:
    rng = random.Random(3)
    prompts = [[rng.randrange(10000) for _ in range(rng.randint(4, 30))] for _ in range(11)]
    continuations = [[rng.randrange(10000) for _ in range(12)] for _ in prompts]
    plain = LLM("random:qwen2-tiny", **SETTINGS)
    padded = LLM("random:qwen2-tiny", pad_decodes=True, **SETTINGS)
    assert (plain.graph_mode, padded.graph_mode) == ("eager", "padded (eager)")
    used: set[int] = set()
    original = padded.runner.bucket_for

    def spy(out):
        bucket = original(out)
        if bucket is not None:
            used.add(bucket - out.num_seqs)
        return bucket

    padded.runner.bucket_for = spy
    want = plain.teacher_forced_logits(prompts, continuations)
    got = padded.teacher_forced_logits(prompts, continuations)
    assert any(extra > 0 for extra in used), "no step was actually padded"
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-5)


def test_native_triton_kernels_match_the_torch_reference_through_the_engine() -> None:
    """Chunked prefills, mixed steps, split decodes and padded decode batches, kernels under the interpreter."""
    rng = random.Random(5)
    prompts = [[rng.randrange(10000) for _ in range(rng.randint(2, 40))] for _ in range(6)]
    continuations = [[rng.randrange(10000) for _ in range(6)] for _ in prompts]
    settings = {**SETTINGS, "max_num_batched_tokens": 32}
    reference = LLM("random:qwen2-tiny", backend_options={"kernels": "torch"}, **settings)
    triton = LLM("random:qwen2-tiny", backend_options={"kernels": "triton"}, pad_decodes=True, **settings)
    want = reference.teacher_forced_logits(prompts, continuations)
    got = triton.teacher_forced_logits(prompts, continuations)
    assert any(s.num_prefill_tokens and s.num_decode_tokens for s in triton.step_stats), "expected mixed steps"
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-4)
