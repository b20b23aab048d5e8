"""The check of what a timed run produced: every output token against the core's reference, in a process of its own.

A check the backend can see can be told apart from the run it vouches for (another engine, a smaller cache, a
module on the call stack, a call count), so this one looks at nothing the backend controls but its tokens. After
the trial process has exited, the executor starts this module as a fresh process that loads no backend plugin
(the reference is the core's own, novainfer.reference: no entry point is loaded, which the report records). It
rebuilds the trial's prompts from the recorded token seed, and teacher-forces each request's prompt and produced
tokens through two engines in lockstep, each in one prefill pass (LLM.prefill_logits):

- the reference: float32 weights, a float32 cache, attention computed exactly in float64;
- the floor: the arm's own dtypes (weights and cache), attention by PyTorch's SDPA in the cache's dtype: an
  honest implementation of the arm's configuration, whose distance from the reference is what the arm's
  rounding alone costs.

Greedy tokens (every arm of the fixed caliber decodes greedily): a produced token t at a position passes when
its gap under the reference, max(ref logits) - ref[t], is within the margin. An honest arm's logits differ from
the reference's by some delta per entry, and it picks its own argmax, so its token's gap is at most 2 x delta.
The margin is floor_margin x 2 x the floor's delta, measured on these very tokens: the largest absolute logit
difference between the floor and the reference over every checked row (a per-row bound would let one flat row
set its own bar). No constant enters it. A wrong backend picks tokens its own corrupted logits favour; under the
reference their gaps are many times the rounding.

Sampled tokens: the caliber has none today. When it has, the same gap applies in the sampler's own terms: our
sampler picks argmax(p / q) with q ~ Exp(1) drawn from the request's seeded generator, so the check replays
the request's noise from its seed and measures the gap of log(p_ref / q) at the produced token, in units of
1 / temperature (a peer whose seed rules cannot be replayed is then checked only for non-negligible reference
probability).

The report: tokens produced and checked (every output token of every request; one not checked makes the trial
at best unverified), tokens outside the margin, the worst token (request, output position, its gap, the margin)
and the check's seconds beside the timed run's (of them, building the engines; and the steps it took).
"""

from __future__ import annotations

import json
import math
import sys
import time
from importlib.metadata import entry_points
from typing import Any

import torch

from novainfer import LLM
from novainfer.ab.trial.gate import is_worse, worse
from novainfer.ab.wire import OutputCheck
from novainfer.config import EngineConfig
from novainfer.engine import resolve_device, resolve_dtype
from novainfer.models.qwen2 import in_dtype

# Logits of at least this many elements (float32) are held at once per engine, and of at most the larger one
# where a GPU's free memory allows: steps of more tokens spend less host work per token (on the H200 the headline's
# check took 45.8 s at 2^27, 37.2 s at 2^29: bench/RESULTS.md). A step holds at most three logits-sized tensors
# of at most 4 bytes an element (the reference's logits, the floor's, their difference), so 1/64 of the free
# memory in elements keeps them within a fifth of it.
LOGITS_ELEMENTS = 1 << 27
LOGITS_ELEMENTS_GPU = 1 << 29


def logits_budget(free_bytes: int | None) -> int:
    """Logits elements each engine holds at once: LOGITS_ELEMENTS, or up to LOGITS_ELEMENTS_GPU on a device
    with `free_bytes` free once the reference's weights are in (None: not a GPU, whose host memory is not asked)."""
    if free_bytes is None:
        return LOGITS_ELEMENTS
    return min(LOGITS_ELEMENTS_GPU, max(LOGITS_ELEMENTS, free_bytes // 64))


def check_outputs(
    config: EngineConfig, prompts: list[list[int]], outputs: list[list[int]], floor_margin: float
) -> OutputCheck:
    """Check every token of `outputs` (request i's produced tokens after prompts[i]) against the reference."""
    started = time.perf_counter()
    report = OutputCheck(tokens_produced=sum(len(o) for o in outputs))
    todo = [i for i, out in enumerate(outputs) if out]
    sequences = [prompts[i] + outputs[i] for i in todo]
    starts = [len(prompts[i]) for i in todo]
    if not todo:
        report.seconds = time.perf_counter() - started
        return report
    device = resolve_device(config.device)
    arm_dtype = resolve_dtype(config.dtype, device)
    dtype = str(arm_dtype).removeprefix("torch.")
    kv_dtype = dtype if config.kv_cache_dtype == "auto" else config.kv_cache_dtype
    longest = max(len(s) for s in sequences)
    common = dict(
        model=config.model, device=config.device, seed=config.seed, block_size=config.block_size,
        max_model_len=max(config.max_model_len, longest), max_num_seqs=config.max_num_seqs, warm_up=False,
        backend="reference",
    )
    with torch.inference_mode():
        probe = LLM(**common, dtype="float32", kv_cache_capacity=config.block_size)
        vocab = probe.model_config.vocab_size
        free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
        budget = max(config.block_size, min(logits_budget(free) // vocab, 8192))
        capacity = max(budget, longest) + config.max_num_seqs * config.block_size
        limits = dict(max_num_batched_tokens=budget, kv_cache_capacity=capacity)
        reference = LLM(
            **common, **limits, dtype="float32", kv_cache_dtype="float32", shared_model=probe.model,
            backend_options={"precision": "float64"},
        )
        del probe
        floor = LLM(
            **common, **limits, dtype=dtype, kv_cache_dtype=kv_dtype, backend_options={"precision": "cache"},
            shared_model=in_dtype(reference.model, arm_dtype),  # the arm's weights, not drawn again
        )
        report.build_seconds = time.perf_counter() - started
        gaps: list[tuple[torch.Tensor, list[tuple[int, int]], torch.Tensor, torch.Tensor]] = []
        floor_delta = 0.0
        for (rows, want), (floor_rows, got) in zip(
            reference.prefill_logits(sequences, starts), floor.prefill_logits(sequences, starts)
        ):
            if floor_rows != rows:
                raise RuntimeError("the reference and floor engines scheduled different rows")
            report.steps += 1
            floor_delta = worse(floor_delta, float((got - want).abs_().amax()))
            produced = torch.tensor([sequences[i][p + 1] for i, p in rows], device=want.device)
            top, top_token = want.max(dim=-1)
            gap = top - want.gather(1, produced.unsqueeze(1)).squeeze(1)
            gaps.append((gap.cpu(), rows, produced.cpu(), top_token.cpu()))
    report.floor_delta = floor_delta
    report.margin = floor_margin * 2 * floor_delta
    for gap, rows, produced, top_token in gaps:
        report.tokens_checked += len(rows)
        ratio = gap / report.margin if report.margin > 0 else torch.where(gap > 0, math.inf, 0.0)
        ratio = torch.where(gap.isnan(), math.nan, ratio)
        report.tokens_outside += int((~(ratio <= 1.0)).sum())
        worst = int(ratio.nan_to_num(math.inf).argmax())
        if is_worse(float(ratio[worst]), report.worst_ratio) or report.worst_request < 0:
            i, position = rows[worst]
            report.worst_ratio, report.worst_gap = float(ratio[worst]), float(gap[worst])
            report.worst_request, report.worst_position = todo[i], position + 1 - starts[i]
            report.worst_token, report.reference_token = int(produced[worst]), int(top_token[worst])
    report.plugins_loaded = plugin_modules_loaded()
    report.seconds = time.perf_counter() - started
    return report


def plugin_modules_loaded() -> tuple[str, ...]:
    """Top-level modules of installed backend plugins (entry-point group `novainfer`) present in this process.
    Reading the entry points' names loads none of them."""
    from novainfer.plugins import ENTRY_POINT_GROUP

    names = {ep.value.split(":")[0].split(".")[0] for ep in entry_points(group=ENTRY_POINT_GROUP)}
    return tuple(sorted(name for name in names if name in sys.modules))


def main() -> int:
    """stdin: {"config", "prompts", "outputs", "floor_margin"} as JSON; stdout: the OutputCheck as JSON."""
    request: dict[str, Any] = json.loads(sys.stdin.read())
    report = check_outputs(
        EngineConfig(**request["config"]), request["prompts"], request["outputs"], request["floor_margin"]
    )
    print(report.to_json(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
