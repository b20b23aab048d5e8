"""The step gate: an arm's backend against the reference, teacher-forced, on the arm's own step shapes.

Whether the timed run's tokens are right is settled by the output check (novainfer.ab.trial.output_check), in a
process the backend never ran in. The gate's job is to say which kind of step is wrong, and to check logits
row by row where tokens alone could hide an error. A backend can be wrong only in some step shapes (decodes
mixed with prefill chunks, chunks continuing a cached prefix, long contexts, one CUDA-graph bucket): a gate
that runs a shape of its own would pass it. So after the timed run the gate replays steps of the arm's
planned schedule (novainfer.ab.trial.schedule), the very steps the timed run executed, with the arm's settings
(block size, max_num_seqs, max_num_batched_tokens, CUDA graphs and their buckets, the cache dtype, the backend
options), on three engines in lockstep:

- the tested engine: the arm's backend, replaying decode-only steps through its captured graphs, padded to
  the bucket as in the timed run;
- the reference: the core's own attention (novainfer.reference), computed exactly (float64) from the cache;
- the floor: the same with attention in the cache's dtype (PyTorch's own kernels), an honest
  implementation whose distance from the reference is what that dtype's rounding alone costs.

All three run float32 weights and attention over a cache of the arm's dtype, so only attention rounds
differently: with the whole model in bfloat16, 28 layers of GEMM rounding would amplify any one-ulp
difference in attention into a few percent for every backend alike and hide real errors. (On CUDA the
float32 matrix products run in TF32, whose rounding, 2^-11, sits below the differences a bfloat16 cache
makes; all three engines share it, and the floor measures it with the rest.)

Every token row of a replayed step, not only the rows that sample, is compared by its next-token logits:
relative error ||got - want|| / ||want|| per row, the worst row of each step deciding, so a few bad rows
cannot be averaged away. A step passes when its worst row is within max(bar, floor_margin x the floor's worst
row in that step): rounding grows with the caliber (bfloat16 attention over a thousand keys through 28 layers
moves the worst of ten thousand rows by about 2e-2, for native, cuDNN and flashinfer alike, measured on the
H200), and a bar below it would fail every honest backend; a wrong step is off by tens of percent. The bar is
the smaller of the file's max_rel_err and the attention dtype's own minimum (MIN_BAR), so a float32 cache is
checked at float32's precision however loose the file is.

The sample: every step kind the plan has (see novainfer.ab.trial.schedule) is checked `steps_per_kind` times (or
as often as the run has it), the steps of each kind chosen at random from a seed drawn after the timed run
(recorded), so no backend can know beforehand which of its steps will be looked at. A sampled step runs from
a prepared state: each of its sequences holds the trial's prompt followed by deterministic random "forced"
output tokens, and its cached prefix is filled with the same random keys and values in all three engines (any
cache content is a valid input to attention, and the rows' logits are a deterministic function of it), so no
earlier step need run.
"""

from __future__ import annotations

import copy
import gc
import math
import random
import time
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from novainfer import LLM
from novainfer.ab.trial.schedule import PlannedStep, kind_counts
from novainfer.ab.wire import GateSettings
from novainfer.config import EngineConfig
from novainfer.engine import resolve_device, resolve_dtype
from novainfer.models.qwen2 import Qwen2ForCausalLM
from novainfer.testing import MIN_BAR, StepSeq, allowed_error, fill_cached, prepared, run, worst_row

REFERENCE_BACKEND = "reference"  # the core's own attention (novainfer.reference): no plugin is needed
REFERENCE_OPTIONS = {"precision": "float64"}
# The gate's engines, each by how it differs from the one config they share (the arm's, see check_backend).
GATE_ENGINES: dict[str, dict[str, Any]] = {
    "reference": {"backend": REFERENCE_BACKEND, "backend_options": REFERENCE_OPTIONS, "cuda_graphs": False,
                  "enable_prefix_caching": False},
    "floor": {"backend": REFERENCE_BACKEND, "backend_options": {"precision": "cache"}, "cuda_graphs": False,
              "enable_prefix_caching": False},
    "tested": {},
}
# Logits are compared in chunks of rows of at most this many elements (float32), to bound memory.
_CHUNK_ELEMENTS = 1 << 26


@dataclass
class KindCoverage:
    """One step kind: how many steps of the run have it, how many the gate replayed, the worst row's error
    and the floor's worst row in those steps."""

    run_steps: int
    checked: int = 0
    max_rel_err: float = 0.0
    floor_rel_err: float = 0.0


METHOD = (
    "a random sample of the arm's planned steps, every step kind, teacher-forced against the core's reference "
    "(float64 attention), next-token logits of every row, each step within max(bar, floor_margin x its floor: "
    "SDPA in the cache's dtype)"
)


@dataclass
class GateReport:
    """What the gate checked and found.

    method: how, in a line (the trial's correctness_gate tag). max_rel_err, floor_rel_err: the worst row
    of the tested engine and of the floor over every replayed step. bar: the least any step was allowed (the
    file's max_rel_err or the dtype's MIN_BAR, the smaller). run_steps: the steps of the run. worst_ratio:
    the worst step's worst row
    over what that step allowed (passing is <= 1); worst_step (its plan index, None when the check is not
    of planned steps), worst_kinds and worst_allowed describe it. seconds: the whole gate; setup_seconds:
    building its engines (a backend's own set-up, JIT compiles and graph captures included); parts: the
    replays' seconds by part (fill: the random prefixes; reference, floor, tested: each engine's runs;
    compare: the logits of every row).
    """

    coverage: dict[str, KindCoverage]
    method: str = METHOD
    bar: float = 0.0
    run_steps: int = 0
    steps: int = 0
    rows: int = 0
    seconds: float = 0.0
    setup_seconds: float = 0.0
    max_rel_err: float = 0.0
    floor_rel_err: float = 0.0
    worst_ratio: float = 0.0
    worst_step: int | None = None
    worst_kinds: tuple[str, ...] = field(default_factory=tuple)
    worst_allowed: float = 0.0
    parts: dict[str, float] = field(default_factory=dict)

    def passed(self) -> bool:
        return self.worst_ratio <= 1.0  # NaN fails

    def problem(self) -> str:
        where = f" in step {self.worst_step} ({', '.join(self.worst_kinds)})" if self.worst_step is not None else ""
        return (
            "teacher-forced logits differ from the reference: worst row relative error "
            f"{self.worst_ratio * self.worst_allowed:.3g} > {self.worst_allowed:.3g} allowed{where}"
        )

    def judge(
        self,
        kinds: Iterable[str],
        errors: torch.Tensor,
        floor_errors: torch.Tensor | None,
        settings: GateSettings,
        step_index: int | None = None,
    ) -> None:
        """Take in one checked step's row errors (and the floor's, where there is a floor) and its kinds; the
        step is held to max(self.bar, floor_margin x its floor)."""
        kinds = tuple(sorted(kinds))
        worst = worst_row(errors)
        floor = worst_row(floor_errors) if floor_errors is not None else 0.0
        allowed = allowed_error(self.bar, settings.floor_margin, floor)
        ratio = worst / allowed
        for kind in kinds:
            cov = self.coverage[kind]
            cov.checked += 1
            cov.max_rel_err = worse(cov.max_rel_err, worst)
            cov.floor_rel_err = worse(cov.floor_rel_err, floor)
        self.max_rel_err = worse(self.max_rel_err, worst)
        self.floor_rel_err = worse(self.floor_rel_err, floor)
        if self.steps == 0 or is_worse(ratio, self.worst_ratio):
            self.worst_ratio, self.worst_allowed = ratio, allowed
            self.worst_step, self.worst_kinds = step_index, kinds
        self.steps += 1
        self.rows += len(errors)

    def metrics(self) -> dict[str, float]:
        """Flat metrics for the record (see novainfer.ab.wire.gate_coverage for reading them back)."""
        metrics = {
            "max_rel_err": self.max_rel_err, "gate_floor_rel_err": self.floor_rel_err,
            "gate_worst_ratio": self.worst_ratio, "gate_steps": self.steps, "gate_rows": self.rows,
            "gate_run_steps": self.run_steps, "gate_bar": self.bar,
            "gate_seconds": self.seconds, "gate_setup_seconds": self.setup_seconds,
            **{f"gate_{part}_seconds": seconds for part, seconds in self.parts.items()},
        }
        for kind, cov in self.coverage.items():
            metrics.update({
                f"gate.{kind}.run_steps": cov.run_steps, f"gate.{kind}.checked": cov.checked,
                f"gate.{kind}.max_rel_err": cov.max_rel_err, f"gate.{kind}.floor_rel_err": cov.floor_rel_err,
            })
        return metrics


def choose_sample(plan: list[PlannedStep], steps_per_kind: int, seed: int) -> list[PlannedStep]:
    """The steps the gate replays, in plan order: every kind covered min(steps_per_kind, its count) times, each
    kind's steps drawn at random (from `seed`) among the plan's steps of that kind."""
    rng = random.Random(seed)
    need = {kind: min(steps_per_kind, n) for kind, n in kind_counts(plan).items()}
    chosen: set[int] = set()
    for kind in rng.sample(sorted(need), len(need)):
        candidates = [step for step in plan if kind in step.kinds and step.index not in chosen]
        while need[kind] > 0:
            step = candidates.pop(rng.randrange(len(candidates)))
            chosen.add(step.index)
            for covered in step.kinds:
                need[covered] = max(0, need[covered] - 1)
    return [step for step in plan if step.index in chosen]


def forced_sequences(prompts: list[list[int]], output_lens: list[int], vocab_size: int) -> list[list[int]]:
    """Each request's prompt followed by its teacher-forced outputs: deterministic random ids over the
    whole vocabulary, the same on every machine."""
    sequences = []
    for i, (prompt, n) in enumerate(zip(prompts, output_lens)):
        rng = random.Random(i)
        sequences.append(list(prompt) + [rng.randrange(vocab_size) for _ in range(n)])
    return sequences


def check_backend(
    config: EngineConfig,
    model: Qwen2ForCausalLM,
    plan: list[PlannedStep],
    sequences: list[list[int]],
    settings: GateSettings,
    seed: int,
) -> GateReport:
    """Replay a sample of `plan` (chosen from `seed`) on the arm's backend, the reference and the floor;
    `model` is the arm's (its weights are used in float32, copied when they are not already)."""
    started = time.perf_counter()
    device = resolve_device(config.device)
    attention_dtype = config.kv_cache_dtype if config.kv_cache_dtype != "auto" else config.dtype
    attention_dtype = str(resolve_dtype(attention_dtype, device)).removeprefix("torch.")
    sample = choose_sample(plan, settings.steps_per_kind, seed)
    bs = config.block_size
    blocks = max(sum(-(-(e.num_computed + e.num_new) // bs) for e in step.entries) for step in sample)
    report = GateReport(
        {kind: KindCoverage(n) for kind, n in sorted(kind_counts(plan).items())},
        bar=min(settings.max_rel_err, MIN_BAR[attention_dtype]), run_steps=len(plan),
    )
    with _tf32_matmuls(device), torch.inference_mode():
        weights = model if next(model.parameters()).dtype == torch.float32 else copy.deepcopy(model).float()
        # One config for all three: the arm's, with float32 weights, attention in the cache's dtype and a cache
        # sized to the sample; each engine then differs from it only as GATE_ENGINES declares.
        base = replace(
            config, dtype="float32", kv_cache_dtype=attention_dtype, kv_cache_capacity=blocks * bs
        ).to_dict()
        engines = {
            name: LLM(**{**base, **differs}, shared_model=weights, warm_up=False)
            for name, differs in GATE_ENGINES.items()
        }
        report.setup_seconds = time.perf_counter() - started
        for step in sample:
            hidden = _replay(engines, step, sequences, report.parts)
            with _part(report.parts, "compare"):
                errors, floor_errors = _row_errors(weights, hidden["reference"], hidden["tested"], hidden["floor"])
            report.judge(step.kinds, errors, floor_errors, settings, step.index)
    del engines, weights
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    report.seconds = time.perf_counter() - started
    return report


@contextmanager
def _tf32_matmuls(device: torch.device) -> Iterator[None]:
    """float32 matrix products in TF32 on CUDA (see the module docstring), restored after."""
    if device.type != "cuda":
        yield
        return
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def _replay(
    engines: dict[str, LLM], step: PlannedStep, sequences: list[list[int]], parts: dict[str, float]
) -> dict[str, torch.Tensor]:
    """Each engine's hidden states [step.tokens, hidden] of one planned step run from a prepared state (the
    kit's, novainfer.testing); the seconds of each part (the cache fill, each engine's run) are added to
    `parts`. The engines' caches hold the same random prefix: one draw per step."""
    seqs = [
        StepSeq(e.num_computed, e.num_new, tuple(sequences[e.request][: e.length])) for e in step.entries
    ]
    with ExitStack() as stack:
        steps = {name: stack.enter_context(prepared(llm, seqs, step.num_decodes)) for name, llm in engines.items()}
        with _part(parts, "fill"):
            fill_cached([(engines[name], steps[name]) for name in engines], seed=step.index)
        hidden = {}
        for name, llm in engines.items():
            with _part(parts, name):
                hidden[name] = run(llm, steps[name])
        return hidden


@contextmanager
def _part(parts: dict[str, float], name: str) -> Iterator[None]:
    """Add the seconds the block takes, its device work included (the gate is not timed: syncing is free)."""
    started = time.perf_counter()
    yield
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    parts[name] = parts.get(name, 0.0) + time.perf_counter() - started


def _row_errors(model: Qwen2ForCausalLM, want: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """For each of `others`, the relative error of each row's next-token logits against `want`'s, [rows] on
    the CPU."""
    rows = max(1, _CHUNK_ELEMENTS // model.config.vocab_size)
    errors: list[list[torch.Tensor]] = [[] for _ in others]
    for i in range(0, want.shape[0], rows):
        expected = model.compute_logits(want[i : i + rows])
        norm = expected.norm(dim=-1).clamp_min(1e-30)
        for out, other in zip(errors, others):
            out.append(((model.compute_logits(other[i : i + rows]) - expected).norm(dim=-1) / norm).cpu())
    return [torch.cat(e) for e in errors]


def is_worse(new: float, old: float) -> bool:
    """Whether error `new` is worse than `old`; NaN is the worst of all (a NaN row must fail the gate)."""
    return (math.isnan(new) and not math.isnan(old)) or new > old


def worse(a: float, b: float) -> float:
    return b if is_worse(b, a) else a
