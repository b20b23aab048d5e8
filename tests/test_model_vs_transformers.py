"""Our Qwen2 against transformers' Qwen2ForCausalLM on the same checkpoint, in float32 on the CPU."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from novainfer import LLM, SamplingParams


def hf_model(path: Path) -> torch.nn.Module:
    from transformers import Qwen2ForCausalLM

    return Qwen2ForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()


@pytest.mark.parametrize("which", ["tied_checkpoint", "untied_checkpoint"])
def test_teacher_forced_logits_match_transformers(which: str, request: pytest.FixtureRequest) -> None:
    path: Path = request.getfixturevalue(which)
    if which == "untied_checkpoint":
        assert len(list(path.glob("*.safetensors"))) > 1, "the untied checkpoint should be sharded"
    rng = random.Random(1)
    sequences = [[rng.randrange(512) for _ in range(n)] for n in (37, 5, 64)]
    split = [20, 2, 33]  # prefill length; the rest goes through decode steps
    # A small token budget and block size so the prefill is chunked and blocks are scattered.
    llm = LLM(str(path), backend="native", block_size=4, max_num_batched_tokens=16, max_model_len=128, device="cpu")
    prompts = [s[:k] for s, k in zip(sequences, split)]
    ours = llm.teacher_forced_logits(prompts, [s[k:] for s, k in zip(sequences, split)])
    hf = hf_model(path)
    for seq, k, got in zip(sequences, split, ours):
        with torch.no_grad():
            ref = hf(torch.tensor([seq])).logits[0, k - 1 : len(seq) - 1]
        assert got.shape == ref.shape
        assert (got - ref).abs().max().item() <= 1e-4


def test_greedy_generation_matches_transformers_under_chunking_and_preemption(untied_checkpoint: Path) -> None:
    rng = random.Random(7)
    prompts = [[rng.randrange(512) for _ in range(rng.randint(3, 60))] for _ in range(12)]
    max_tokens = [rng.randint(5, 40) for _ in prompts]
    llm = LLM(
        str(untied_checkpoint), backend="native", block_size=4, max_num_batched_tokens=48, max_num_seqs=8,
        max_model_len=128, kv_cache_capacity=160, device="cpu",
    )
    outs = llm.generate(prompts, [SamplingParams(max_tokens=m, ignore_eos=True) for m in max_tokens])
    assert llm.scheduler.num_preemptions > 0, "the KV cache was meant to be small enough to force preemption"
    assert any(s.num_prefill_tokens and s.num_decode_tokens for s in llm.step_stats), "expected mixed steps"
    assert max(len(p) for p in prompts) > 48, "expected at least one chunked prompt"
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_usable_blocks, "blocks leaked"
    hf = hf_model(untied_checkpoint)
    for prompt, m, out in zip(prompts, max_tokens, outs):
        assert out.num_output_tokens == m
        with torch.no_grad():
            ref = hf.generate(
                torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=m, min_new_tokens=m, do_sample=False, pad_token_id=0,
            )[0, len(prompt) :].tolist()
        assert out.token_ids == ref
