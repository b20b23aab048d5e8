"""Prefix caching: a prompt prefix cached by one request is computed once, shared by the requests after it, kept
after they finish and evicted least recently used first; the outputs are those of an engine without it."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import write_qwen2_checkpoint

from novainfer import LLM, SamplingParams
from novainfer.block_manager import BlockManager
from novainfer.prefix_cache import chain_hashes
from novainfer.sequence import Sequence
from novainfer.testing import MIN_BAR, relative_errors

BS = 16


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_qwen2_checkpoint(tmp_path_factory.mktemp("prefix"), tied=False, heads=4, kv_heads=2, seed=5)


def shared_prefix_prompts(seed: int, groups: int, per_group: int, prefix: int) -> list[list[int]]:
    """`groups` system prompts of `prefix` tokens, each followed by `per_group` questions of 5 to 40 tokens;
    request i belongs to group i % groups."""
    rng = random.Random(seed)
    heads = [[rng.randrange(512) for _ in range(prefix)] for _ in range(groups)]
    return [heads[i % groups] + [rng.randrange(512) for _ in range(rng.randint(5, 40))]
            for i in range(groups * per_group)]


def engines(checkpoint: Path, **settings: Any) -> tuple[LLM, LLM]:
    """(with prefix caching, without), otherwise alike."""
    base = dict(device="cpu", max_model_len=160, **settings)
    return LLM(str(checkpoint), enable_prefix_caching=True, **base), LLM(str(checkpoint), **base)


def assert_no_block_held(llm: LLM) -> None:
    bm = llm.block_manager
    assert bm.num_free_blocks == bm.num_usable_blocks and not any(bm._refs), "a KV block leaked"


@pytest.mark.parametrize(
    "settings",
    [
        dict(kv_cache_capacity=4096),  # room for every prefix: nothing evicted
        dict(kv_cache_capacity=480, max_num_seqs=4),  # 30 blocks: cached prefixes evicted to make room
        dict(kv_cache_capacity=320, max_num_seqs=4, max_num_batched_tokens=48),  # and preempted, and chunked
        dict(kv_cache_capacity=320, max_num_seqs=4, max_num_batched_tokens=48, pad_decodes=True),  # as graphs run
    ],
    ids=["roomy", "evicting", "preempting", "preempting-graph-padded"],
)
@pytest.mark.parametrize("overlap", [True, False], ids=["async", "sync"])
def test_cached_prefixes_give_the_tokens_and_logits_of_an_engine_that_recomputes_them(
    checkpoint: Path, settings: dict[str, Any], overlap: bool
) -> None:
    cached, plain = engines(checkpoint, async_scheduling=overlap, **settings)
    prompts = shared_prefix_prompts(seed=1, groups=3, per_group=5, prefix=50)
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in random.Random(2).choices(range(1, 30), k=15)]
    # Two calls: the second finds the first's prefixes cached (or evicted), besides sharing within itself.
    for half in (slice(0, 6), slice(6, None)):
        want = [o.token_ids for o in plain.generate(prompts[half], params[half])]
        assert [o.token_ids for o in cached.generate(prompts[half], params[half])] == want
    stats = cached.block_manager.cache
    assert stats.hit_tokens > 0
    if "max_num_batched_tokens" in settings:
        assert cached.scheduler.num_preemptions > 0
    if settings["kv_cache_capacity"] < 4096:
        assert stats.evicted > 0
    continuations = [[(7 * i + j) % 512 for j in range(9)] for i in range(len(prompts))]
    got = cached.teacher_forced_logits(prompts, continuations)
    want = plain.teacher_forced_logits(prompts, continuations)
    worst = max(float(relative_errors(w, g).max()) for w, g in zip(want, got))
    assert worst <= MIN_BAR["float32"], f"teacher-forced logits {worst:.2e} apart"
    for llm in (cached, plain):
        assert_no_block_held(llm)


def test_the_hit_rate_of_a_known_shared_prefix_is_exact(checkpoint: Path) -> None:
    # One request computes a 40-token system prompt (2 full blocks of 16, the rest partial); the 6 that come
    # after it find those 2 blocks, 32 tokens each, and nothing more (their questions differ).
    llm = LLM(str(checkpoint), device="cpu", max_model_len=160, kv_cache_capacity=2048, enable_prefix_caching=True)
    prompts = shared_prefix_prompts(seed=3, groups=1, per_group=7, prefix=40)
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    llm.generate(prompts[:1], params)
    llm.generate(prompts[1:], params)
    stats = llm.block_manager.cache
    assert stats.query_tokens == sum(len(p) for p in prompts)
    assert stats.hit_tokens == 6 * 32 and stats.hit_blocks == 6 * 2
    assert stats.query_blocks == sum(len(p) // BS for p in prompts)
    assert stats.evicted == 0 and stats.preempted_hit_tokens == 0
    # A request whose whole prompt is cached still computes its last token (its last block is recomputed).
    llm.reset_prefix_cache()
    whole = prompts[0][:32]
    llm.generate([whole], params)
    llm.generate([whole], params)
    assert (stats.query_tokens, stats.hit_tokens) == (64, 16)
    assert_no_block_held(llm)


def test_blocks_are_shared_by_reference_and_freed_least_recently_used_first() -> None:
    bm = BlockManager(num_blocks=9, block_size=4, prefix_caching=True)
    first = Sequence(list(range(13)), SamplingParams(max_tokens=1))
    bm.allocate(first, 13)  # 4 blocks: 3 full prompt blocks, named, and a partial one
    bm.name_blocks(first.block_table[:3], first.prompt_block_names(4))
    second = Sequence([*list(range(12)), 99, 98], SamplingParams(max_tokens=1))
    hits = bm.cached_prefix(second)
    assert hits == first.block_table[:3] and bm.num_reclaimed(hits) == 0
    bm.share(second, hits)
    bm.allocate(second, 14)
    assert second.block_table[:3] == first.block_table[:3] and bm.num_free_blocks == 3  # one new block
    partial, shared = first.block_table[3], first.block_table[:3]
    bm.free(first)  # the shared blocks stay held by `second`; the partial block is free, unnamed: handed out first
    assert bm.num_free_blocks == 4 and next(iter(bm._free)) == partial
    bm.free(second)  # now the named blocks are free too, kept (behind the unnamed ones), last block first
    assert list(bm._free)[-3:] == shared[::-1] and bm.num_free_blocks == 8 and len(bm.cache) == 3
    third = Sequence([*list(range(12)), 7], SamplingParams(max_tokens=1))
    hits = bm.cached_prefix(third)
    assert len(hits) == 3 and bm.num_reclaimed(hits) == 3  # free, so sharing them takes them off the free list
    taken = bm.take(8 - 3)  # the unnamed free blocks first: nothing evicted
    assert not set(taken) & set(hits) and bm.cache.evicted == 0
    bm.take(1)  # then the least recently freed named block: the prefix's tail, so its head stays findable
    assert bm.cache.evicted == 1 and len(bm.cached_prefix(third)) == 2
    with pytest.raises(RuntimeError, match="freed twice"):
        twice = Sequence([1], SamplingParams())
        twice.add_blocks([hits[0]] * 2)
        bm.free(twice)


def test_block_names_are_the_same_in_every_process_and_chain_the_whole_prefix() -> None:
    tokens = list(range(100, 140))
    here = [h.hex() for h in chain_hashes(tokens, BS)]
    code = "from novainfer.prefix_cache import chain_hashes; print([h.hex() for h in chain_hashes(%r, %d)])"
    there = subprocess.run(
        [sys.executable, "-c", code % (tokens, BS)], capture_output=True, text=True, check=True,
        env={"PYTHONHASHSEED": "random", "PATH": ""},
    ).stdout.strip()
    assert there == str(here) and len(here) == 2
    # A block's name covers everything before it: the same second block after a different first is another name.
    other = chain_hashes([0, *tokens[1:]], BS)
    assert other[0] != chain_hashes(tokens, BS)[0] and other[1].hex() != here[1]
    assert chain_hashes(tokens, BS)[1].hex() == here[1]


PREFIX_SWEEP = """
[workload]
name = "prefix"
num_seqs = 12
seed = 0

# Three system prompts of 48 tokens (3 blocks), each followed by questions of 8..24 tokens; request i is in group
# i % 3, so a group's prefix comes back after two others have passed through the small cache.
[workload.lengths]
mix = "shared_prefix"
num_groups = 3
prefix_len = 48
input_len = 16
output_len = 6
range_ratio = 0.5

[engine]
model = "random:qwen2-tiny-wide"
device = "cpu"
dtype = "float32"
max_model_len = 96
max_num_seqs = 2
kv_cache_capacity = 192       # 12 blocks: two running requests leave room for a prefix or two, not three

[sweep]
repeats = 1
trial_timeout_s = 180
warmup_seqs = 2
baseline = { backend = "native", enable_prefix_caching = false }

[sweep.axes]
backend = ["native", "reuses-colliding-prefix", "reuses-evicted-block"]
enable_prefix_caching = [false, true]
"""


def test_a_sweep_with_prefix_caching_as_an_axis_verifies_the_honest_cache_and_catches_broken_reuse(
    tmp_path: Path, pip_install: Any
) -> None:
    from test_sweep import ledger_records, nova_ab

    from novainfer.ab.wire import TrialRecord, gate_coverage

    site = pip_install(Path(__file__).resolve().parents[1] / "tests" / "plugins" / "adversarial")
    exp = tmp_path / "prefix.toml"
    exp.write_text(PREFIX_SWEEP)
    result = nova_ab(tmp_path, "sweep", str(exp), env={"PYTHONPATH": str(site)}, timeout=900)
    by_arm = {
        (r.arm_params["backend"], r.arm_params["enable_prefix_caching"]): r
        for r in map(TrialRecord.from_dict, ledger_records(tmp_path))
    }
    assert len(by_arm) == 6, result.stderr[-3000:]
    for backend in ("native", "reuses-colliding-prefix", "reuses-evicted-block"):
        assert by_arm[(backend, False)].status == "ok", by_arm[(backend, False)].reason  # nothing reused: right
    honest = by_arm[("native", True)]
    assert honest.status == "ok", honest.reason
    assert honest.metrics["prefix_hit_rate_tokens"] > 0 and honest.metrics["prefix_blocks_evicted"] > 0
    assert honest.metrics["schedule_steps_off"] == 0
    assert gate_coverage(honest.metrics)["cached-prefix"]["checked"] >= 1  # a kind, checked like any other
    for backend in ("reuses-colliding-prefix", "reuses-evicted-block"):
        record = by_arm[(backend, True)]
        assert record.status == "incorrect", (backend, record.status, record.reason)
        assert "outside the reference's margin" in record.reason
