"""Experiment files: the TOML that fixes a sweep's caliber, validated into arms and an ordered trial plan.

A file has four tables (unknown keys are rejected everywhere, so a typo never silently becomes a default):

    [workload]  name (optional), num_seqs, input_len = [lo, hi], output_len = [lo, hi], seed = 0
                (nano-vllm bench.py's random workload; EOS is always ignored), or, in place of the two
                ranges, [workload.lengths] mix = "random" | "sharegpt" | "shared_prefix" and the mix's own
                keys (novainfer.ab.lengths: LENGTH_TABLES below);
                [workload.arrivals] rate (requests/s; a list of rates is an axis of its own, "rate"),
                burstiness = 1.0, max_concurrency (optional): an online caliber (novainfer.ab.serving)
    [metrics]   online calibers only: steady_state = [0.1, 0.9] (the requests' fractions, in arrival order,
                whose latencies count), [metrics.slo] ttft_ms, tpot_ms, e2e_ms (each optional), attainment = 0.9
    [engine]    any EngineConfig field; the arms start from these values
    [sweep]     axes (required: axis -> list of values; an axis is `backend` or any EngineConfig field),
                exclude = [{axis = value, ...}, ...] (combinations of the axes left out), repeats = 3,
                order = "interleaved" | "blocked", baseline = {axis = value, ...} (default: the first arm),
                trial_timeout_s = 1800, warmup_seqs (default min(num_seqs, 8)),
                [sweep.correctness] enabled = true, max_rel_err = 1e-2, floor_margin = 2.0, steps_per_kind = 1,
                [[sweep.peers]] peer = "vllm" | "transformers", then any EngineConfig field but backend and
                backend_options (overrides of [engine] for this arm), then the peer's own settings
                (novainfer.ab.trial.peers; transformers: attn_implementation = "sdpa"),
                executor = "local" | "ray", [sweep.ray] gpus_per_trial, cpus_per_trial (novainfer.ab.sweep.ray_executor)
    [mlflow]    experiment = "nova-ab", tracking_uri (optional; None lets the tracker pick its default store)

The axes' cartesian product, less every combination an `exclude` entry matches (all its axes equal, as in a
GitHub Actions matrix: `exclude = [{ backend = "cudnn", async_scheduling = false }]`), gives our engine's arms;
an entry must name axes and values the file has, and leave out at least one arm, so a typo is an error. Each
[[sweep.peers]] entry adds one arm that runs another engine on the same workload, labelled by what the entry says
("peer=vllm", "peer=transformers,cuda_graphs=false"), not crossed with the axes. A baseline may name a peer:
baseline = { peer = "vllm" }.

Bounds, so that a typo (an extra zero, `inf`) is a file error instead of a MemoryError or hours of work; each
is far above any sweep we run:
    workload.num_seqs <= 100,000 and token lengths <= 1,000,000 (longer than any model's context);
    sweep.repeats <= 1,000, and arms x repeats <= 10,000 trials (checked before the arms or the plan are built);
    sweep.trial_timeout_s <= 604,800 (7 days); no float anywhere may be inf or nan.
A numeric kv_cache_capacity must hold the workload's longest request (input hi + output hi tokens) on its own.
    workload.arrivals.rate <= 1,000,000 requests/s, at most 100 rates.

Every problem is reported as one `ExperimentError` line, `<file>: <field>: <problem>`, the field a dotted path
into the file (`workload.input_len`, `sweep.axes.block_size`), so the CLI can print it and exit 2.

This module judges the file alone and imports no torch (the sweep process never does). Whether each arm's
backend takes its settings, and whether it runs on this machine, is judged after it, for all arms at once, in a
process that may import torch (novainfer.ab.sweep.arm_checks).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import MISSING, dataclass, fields, replace
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal, get_type_hints

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, create_model, field_validator

from novainfer.ab.lengths import SHAREGPT_CLIP, SHAREGPT_INPUT_MEAN, SHAREGPT_OUTPUT_MEAN, LengthMix
from novainfer.ab.serving import Arrivals, ServingSettings, Slo
from novainfer.ab.trial.peers import PEERS
from novainfer.ab.workload import MAX_TOKEN_ID, Workload
from novainfer.block_manager import blocks_for
from novainfer.config import ConfigError, EngineConfig
from novainfer.models.presets import PRESETS, RANDOM_PREFIX

DEFAULT_WARMUP_SEQS = 8
# The bounds of the module docstring.
MAX_NUM_SEQS = 100_000
MAX_TOKEN_LEN = 1_000_000
MAX_REPEATS = 1_000
MAX_TRIALS = 10_000
MAX_TRIAL_TIMEOUT_S = 7 * 24 * 3600
MAX_RATE = 1_000_000.0
MAX_RATES = 100
RATE_AXIS = "rate"  # the axis a list of arrival rates makes (its arms' label reads "...,rate=10")
NAME_PATTERN = r"^[A-Za-z0-9._-]+$"
ENGINE_FIELDS = tuple(f.name for f in fields(EngineConfig))


class ExperimentError(ValueError):
    """A bad experiment file; str() is the one line `<file>: <field>: <problem>`."""

    def __init__(self, file: str | Path, field: str, problem: str) -> None:
        # One line, always: the CLI's contract is a single stderr line per error.
        problem = " ".join(problem.splitlines())
        super().__init__(f"{file}: {field}: {problem}")
        self.file = str(file)
        self.field = field
        self.problem = problem


# ---------------------------------------------------------------------------------------------------------------
# The file's schema. Strict: TOML already types its values, so "16" for an integer is a mistake, not a conversion.


class _Table(BaseModel):
    # TOML has inf and nan; neither is a meaningful value for any float in the file.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


def _length_range(value: Any) -> tuple[int, int]:
    """An inclusive [lo, hi] token-length range, 1 <= lo <= hi <= MAX_TOKEN_LEN."""
    if (
        not isinstance(value, list | tuple)
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise ValueError(f"expected [lo, hi], two integers, got {_show(value)}")
    lo, hi = value
    if lo < 1:
        raise ValueError(f"lengths must be at least 1, got [{lo}, {hi}]")
    if lo > hi:
        raise ValueError(f"lo ({lo}) > hi ({hi})")
    if hi > MAX_TOKEN_LEN:
        raise ValueError(f"lengths must be at most {MAX_TOKEN_LEN:,}, got [{lo}, {hi}]")
    return lo, hi


class ArrivalsTable(_Table):
    """[workload.arrivals]: an online caliber (novainfer.ab.serving.Arrivals); a list of rates is an axis."""

    rate: float | list[float]
    burstiness: float = Field(1.0, gt=0, le=1000)
    max_concurrency: int | None = Field(None, ge=1, le=MAX_NUM_SEQS)

    @field_validator("rate")
    @classmethod
    def check_rate(cls, value: float | list[float]) -> float | list[float]:
        rates = value if isinstance(value, list) else [value]
        if not 1 <= len(rates) <= MAX_RATES:
            raise ValueError(f"a list of 1 to {MAX_RATES} rates, got {len(rates)}")
        if any(not 0 < r <= MAX_RATE for r in rates):
            raise ValueError(f"a rate is requests per second, > 0 and <= {MAX_RATE:,.0f}, got {_show(value)}")
        if len(set(rates)) != len(rates):
            raise ValueError(f"duplicate rate in {_show(value)}")
        return value


class WorkloadTable(_Table):
    """[workload]: nano-vllm bench.py's random workload, or a length mix ([workload.lengths]); arrivals make it
    online."""

    # The name becomes part of the sweep's directory name (and a glob pattern), hence the plain characters.
    name: str | None = Field(None, pattern=NAME_PATTERN)
    num_seqs: int = Field(gt=0, le=MAX_NUM_SEQS)
    input_len: tuple[int, int] | None = None  # required unless [workload.lengths] sets the lengths (_workload)
    output_len: tuple[int, int] | None = None
    seed: int = 0
    lengths: dict[str, Any] | None = None  # validated against its mix's table on load (_length_mix)
    arrivals: ArrivalsTable | None = None

    @field_validator("input_len", "output_len", mode="before")
    @classmethod
    def check_range(cls, value: Any) -> tuple[int, int]:
        return _length_range(value)


class _LengthsTable(_Table):
    input_len: int = Field(ge=1, le=MAX_TOKEN_LEN)
    output_len: int = Field(ge=1, le=MAX_TOKEN_LEN)


class RandomLengths(_LengthsTable):
    """mix = "random": vLLM's random dataset, lengths uniform in [L (1 - range_ratio), L (1 + range_ratio)]."""

    mix: Literal["random"]
    range_ratio: float = Field(0.0, ge=0, lt=1)


class ShareGptLengths(_LengthsTable):
    """mix = "sharegpt": a clipped log-normal with ShareGPT's published means (novainfer.ab.lengths)."""

    mix: Literal["sharegpt"]
    input_len: int = Field(SHAREGPT_INPUT_MEAN, ge=1, le=MAX_TOKEN_LEN)
    output_len: int = Field(SHAREGPT_OUTPUT_MEAN, ge=1, le=MAX_TOKEN_LEN)
    sigma: float = Field(1.0, gt=0, le=3)
    input_clip: tuple[int, int] = SHAREGPT_CLIP
    output_clip: tuple[int, int] = SHAREGPT_CLIP

    @field_validator("input_clip", "output_clip", mode="before")
    @classmethod
    def check_range(cls, value: Any) -> tuple[int, int]:
        return _length_range(value)


class SharedPrefixLengths(RandomLengths):
    """mix = "shared_prefix": num_groups system prompts of prefix_len tokens, each before random questions."""

    mix: Literal["shared_prefix"]  # type: ignore[assignment]  # narrows the random table's tag
    num_groups: int = Field(ge=1, le=MAX_NUM_SEQS)
    prefix_len: int = Field(ge=1, le=MAX_TOKEN_LEN)


# [workload.lengths] by its mix: which table it is validated against.
LENGTH_TABLES: dict[str, type[_LengthsTable]] = {
    "random": RandomLengths, "sharegpt": ShareGptLengths, "shared_prefix": SharedPrefixLengths,
}


class SloTable(_Table):
    """[metrics.slo]: latency targets in milliseconds and the attainment that meets them (novainfer.ab.serving.Slo)."""

    ttft_ms: float | None = Field(None, gt=0)
    tpot_ms: float | None = Field(None, gt=0)
    e2e_ms: float | None = Field(None, gt=0)
    attainment: float = Field(0.9, gt=0, le=1)


class MetricsTable(_Table):
    """[metrics]: what an online caliber reports: the steady window (fractions of the requests in arrival
    order) and the SLO."""

    steady_state: tuple[float, float] = (0.1, 0.9)
    slo: SloTable = SloTable()

    @field_validator("steady_state", mode="before")
    @classmethod
    def check_window(cls, value: Any) -> tuple[float, float]:
        if (
            not isinstance(value, list | tuple) or len(value) != 2
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
        ):
            raise ValueError(f"expected [lo, hi], two fractions of the requests, got {_show(value)}")
        lo, hi = value
        if not 0 <= lo < hi <= 1:
            raise ValueError(f"must satisfy 0 <= lo < hi <= 1, got [{lo}, {hi}]")
        return float(lo), float(hi)


class CorrectnessTable(_Table):
    """[sweep.correctness]: the checks that make a trial "verified": every output token of the timed run
    against the core's reference in a process of its own (novainfer.ab.trial.output_check), and the step gate's
    teacher-forced logits on a random sample of the run's own steps (novainfer.ab.trial.gate).

    A replayed step passes when its worst row's relative error is within max(bar, floor_margin x the worst row
    of the floor: PyTorch's own attention in the cache's dtype, on the same step), the bar being the smaller of
    max_rel_err (at most 1e-2: it can tighten the bar, never loosen it past bfloat16's) and the attention
    dtype's own minimum (1e-5 for float32). An output token passes within floor_margin x twice the floor's
    largest logit difference. steps_per_kind: how many steps of each kind the gate replays (at most as many as
    the run has). enabled = false runs neither check and makes every arm's trials "unverified".
    """

    enabled: bool = True
    max_rel_err: float = Field(1e-2, gt=0, le=1e-2)
    floor_margin: float = Field(2.0, ge=1, le=10)
    steps_per_kind: int = Field(1, ge=1)


class RayTable(_Table):
    """[sweep.ray]: what one trial holds on a Ray cluster (`executor = "ray"`, novainfer.ab.sweep.ray_executor).

    gpus_per_trial: GPUs per trial; default 1 when any arm runs on CUDA, else 0 (a CPU caliber).
    cpus_per_trial: CPUs per trial (a CPU caliber's share of a node).
    """

    gpus_per_trial: float | None = Field(None, ge=0)
    cpus_per_trial: float = Field(1.0, gt=0)


class SweepTable(_Table):
    """[sweep]: what varies, how often, in what order, against which baseline.

    warmup_seqs: the workload's first warmup_seqs requests are generated once, untimed, in the trial's engine
    before the timed run (kernel compilation, graph capture, allocator growth); None means
    min(num_seqs, 8) and is resolved on load.
    peers: one table per peer arm, as written; each is validated against its peer's own schema on load
        (`_peer_arms`: which schema applies depends on its `peer` value) and replaced by its resolved form,
        the peer's defaults filled in.
    executor: "local" (one trial after another on this machine) or "ray" (repeat blocks spread over a Ray
        cluster's GPUs); where a sweep runs is not what it measures, so it is not part of the sweep's id,
        and a sweep started with one executor resumes with the other.
    """

    axes: dict[str, Annotated[list[Any], Field(min_length=1)]] = Field(min_length=1)
    exclude: list[Annotated[dict[str, Any], Field(min_length=1)]] = []
    repeats: int = Field(3, ge=1, le=MAX_REPEATS)
    order: Literal["interleaved", "blocked"] = "interleaved"
    baseline: dict[str, Any] | None = None
    trial_timeout_s: float = Field(1800.0, gt=0, le=MAX_TRIAL_TIMEOUT_S)
    warmup_seqs: int | None = Field(None, ge=0)
    correctness: CorrectnessTable = CorrectnessTable()
    peers: list[dict[str, Any]] = []
    executor: Literal["local", "ray"] = "local"
    ray: RayTable = RayTable()


class MlflowTable(_Table):
    """[mlflow]: where results are logged; not part of the sweep's identity."""

    experiment: str = Field("nova-ab", min_length=1)
    tracking_uri: str | None = None


def _engine_table() -> type[BaseModel]:
    """[engine] as a pydantic model built from EngineConfig's own fields, types and defaults.

    The types catch wrong TOML types with a clear message; EngineConfig's __post_init__ stays the one place
    that knows the valid values.
    """
    hints = get_type_hints(EngineConfig)
    table: dict[str, Any] = {}
    for f in fields(EngineConfig):
        default = Field(default_factory=f.default_factory) if f.default is MISSING else f.default
        table[f.name] = (hints[f.name], default)
    return create_model("EngineTable", __base__=_Table, **table)


EngineTable = _engine_table()


class ExperimentFile(_Table):
    workload: WorkloadTable
    engine: EngineTable = EngineTable()
    sweep: SweepTable
    mlflow: MlflowTable = MlflowTable()
    metrics: MetricsTable | None = None


@cache
def _engine_field_adapter(name: str) -> TypeAdapter[Any]:
    """Validates one axis value as the EngineConfig field it sets."""
    return TypeAdapter(get_type_hints(EngineConfig)[name], config=ConfigDict(strict=True))


# A peer runs its own attention, so our backend settings mean nothing to it.
PEER_ENGINE_FIELDS = tuple(f for f in ENGINE_FIELDS if f not in ("backend", "backend_options"))


@cache
def _peer_table(name: str) -> type[BaseModel]:
    """One [[sweep.peers]] entry of peer `name`: its own settings plus optional [engine] overrides."""
    hints = get_type_hints(EngineConfig)
    overrides: dict[str, Any] = {f: (hints[f] | None, None) for f in PEER_ENGINE_FIELDS}
    return create_model(
        f"{name}PeerTable", __base__=PEERS[name].options, peer=(Literal[name], ...), **overrides
    )


# ---------------------------------------------------------------------------------------------------------------
# The validated experiment.


@dataclass(frozen=True)
class Arm:
    """One arm: a combination of axis values, or one [[sweep.peers]] entry.

    label: "axis=value,..." in axis order, e.g. "backend=native,block_size=16" (trial ids and MLflow use it);
        a peer's is "peer=<name>" then its entry's other keys in file order.
    params: the axis values, e.g. {"backend": "native", "block_size": 16}; a peer's: its entry as written.
    config: the [engine] table with the axis values (a peer: its overrides) applied, validated; a relative model
        path is resolved against the experiment file's directory.
    peer: None for our engine; for a peer arm, {"peer": name, **its own settings with defaults}.
    source: where the arm's own values are in the file ("sweep.axes", "sweep.peers[0]"), for error messages.
    """

    label: str
    params: dict[str, Any]
    config: EngineConfig
    peer: dict[str, Any] | None = None
    source: str = "sweep.axes"


@dataclass(frozen=True)
class TrialSpec:
    """One run of one arm: trial_id = f"{arm.label}#{repeat}"; order = its 0-based position in the plan."""

    trial_id: str
    arm: Arm
    repeat: int
    order: int


@dataclass(frozen=True)
class Experiment:
    """A validated experiment file.

    name: the workload's name, or the file's stem made safe for a directory name.
    workload: the fixed workload every trial runs.
    engine: the [engine] table as written plus defaults (each arm overrides its axes).
    sweep: the [sweep] table, defaults filled in and warmup_seqs resolved to a number.
    arms: the cartesian product of the axes, in file order (first axis slowest).
    baseline: the arm the others are compared with.
    sweep_id: 12 hex digits of SHA-256 over the canonical JSON of to_dict(), what is measured: the same
        experiment, written with or without defaults, comments or reordered tables, gets the same id; the
        workload's name and [mlflow] (labels and destinations) are not part of it.
    serving: an online caliber's arrivals (the first rate when the rate is an axis), SLO and steady window;
        None: offline. Each arm's own is serving_for(arm).
    rates: the rate axis's values, or None when the rate is not an axis.
    """

    path: Path
    name: str
    workload: Workload
    engine: EngineConfig
    sweep: SweepTable
    mlflow: MlflowTable
    arms: tuple[Arm, ...]
    baseline: Arm
    sweep_id: str
    serving: ServingSettings | None = None
    rates: tuple[float, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The resolved content that defines the sweep (what sweep_id hashes)."""
        return _identity(self.workload, self.engine, self.sweep, self.baseline, self.serving, self.rates)

    def serving_for(self, arm: Arm) -> ServingSettings | None:
        """The online settings an arm's trials run with: its own rate where the rate is an axis."""
        if self.serving is None or RATE_AXIS not in arm.params:
            return self.serving
        return replace(self.serving, arrivals=replace(self.serving.arrivals, rate=float(arm.params[RATE_AXIS])))

    @property
    def baseline_arm(self) -> str:
        """The baseline arm's label (what records and the comparison name it by)."""
        return self.baseline.label

    def flat_params(self) -> dict[str, Any]:
        """The settings as flat dotted keys ("workload.num_seqs", "sweep.axes.backend", ...), for MLflow."""
        content = self.to_dict()
        content["sweep"]["axes"] = dict(self.sweep.axes)
        content["mlflow"] = {"experiment": self.mlflow.experiment}
        flat: dict[str, Any] = {"name": self.name}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict) and value:
                for key, item in value.items():
                    walk(f"{prefix}.{key}", item)
            else:
                flat[prefix] = value

        for key, value in content.items():
            walk(key, value)
        return flat


def _identity(
    workload: Workload, engine: EngineConfig, sweep: SweepTable, baseline: Arm,
    serving: ServingSettings | None = None, rates: tuple[float, ...] | None = None,
) -> dict[str, Any]:
    sweep_dict = sweep.model_dump(mode="json", exclude={"axes", "exclude", "baseline", "peers", "executor", "ray"})
    # Axis order decides arm labels and trial order, so it is part of the identity: a dict would be key-sorted.
    sweep_dict["axes"] = [[axis, values] for axis, values in sweep.axes.items()]
    if sweep.exclude:  # only when present, so a sweep without exclusions keeps the id it had before they existed
        sweep_dict["exclude"] = sweep.exclude
    sweep_dict["baseline"] = baseline.label
    if sweep.peers:  # only when present, so a sweep without peers keeps the id it had before peers existed
        sweep_dict["peers"] = sweep.peers
    identity = {"workload": workload.recipe(), "engine": engine.to_dict(), "sweep": sweep_dict}
    if serving is not None:  # only online calibers carry it, so an offline sweep keeps the id it had
        online = serving.to_dict()
        if rates is not None:
            online["arrivals"]["rate"] = list(rates)
        identity["serving"] = online
    return identity


def load_experiment(path: Path) -> Experiment:
    """Read and validate an experiment file; every problem raises ExperimentError (one line)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ExperimentError(path, "(file)", "no such file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ExperimentError(path, "(file)", f"cannot read it: {error}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ExperimentError(path, "(syntax)", f"invalid TOML: {error}") from None
    try:
        parsed = ExperimentFile.model_validate(raw)
    except ValidationError as error:
        field, problem = _describe(error, raw)
        raise ExperimentError(path, field, problem) from None
    return _resolve(path, parsed)


def plan_trials(experiment: Experiment, order_seed: int | None = None) -> list[TrialSpec]:
    """Every trial in run order: interleaved (A B C A B C ...) or blocked (A A B B C C).

    Interleaving is the default because slow drift (thermals, clocks, a neighbour's load) then spreads over
    every arm instead of biasing whichever arm ran last. With `order_seed` (a sweep draws one and records it,
    novainfer.ab.sweep.runner.order_seed_for) the arms of each interleaved repeat block run in an order shuffled
    from the seed and the repeat (C A B, B C A, ...), so that a warm-up or drift within a block favours no arm
    always; the same seed plans the same trials in the same order, which --resume relies on. None keeps the file's
    order in every block.
    """
    repeats = range(experiment.sweep.repeats)
    if experiment.sweep.order == "interleaved":
        pairs = [(arm, r) for r in repeats for arm in _block_order(experiment.arms, order_seed, r)]
    else:
        pairs = [(arm, r) for arm in experiment.arms for r in repeats]
    return [TrialSpec(f"{arm.label}#{r}", arm, r, i) for i, (arm, r) in enumerate(pairs)]


def _block_order(arms: tuple[Arm, ...], order_seed: int | None, repeat: int) -> list[Arm]:
    """The arms of repeat block `repeat`, shuffled from (order_seed, repeat); as in the file without a seed."""
    if order_seed is None:
        return list(arms)
    # A string seed is hashed by SHA-512 (random.seed, version 2): the same order on every platform and run.
    shuffled = list(arms)
    random.Random(f"nova-ab order {order_seed} {repeat}").shuffle(shuffled)
    return shuffled


# ---------------------------------------------------------------------------------------------------------------
# Checks past the schema: values, models and lengths, per arm (backends: novainfer.ab.sweep.arm_checks).


def _resolve(path: Path, parsed: ExperimentFile) -> Experiment:
    wl = parsed.workload
    serving, rates = _serving(path, parsed)
    _check_trial_count(path, parsed.sweep, len(rates) if rates else 1)
    workload = _workload(path, wl)
    engine_values = parsed.engine.model_dump()
    engine = _engine_config(path, engine_values, {})
    axes = parsed.sweep.axes
    for axis, values in axes.items():
        _check_axis(path, axis, values)
    rate_axis = {RATE_AXIS: list(rates)} if rates else {}

    excluded = _exclusions(path, parsed.sweep.exclude, axes)
    arms = []
    for combo in itertools.product(*axes.values(), *rate_axis.values()):
        params = dict(zip([*axes, *rate_axis], combo, strict=True))
        if any(_matches(params, entry) for entry in excluded):
            continue
        settings = {k: v for k, v in params.items() if k != RATE_AXIS}
        config = _engine_config(path, {**engine_values, **settings}, settings)
        arms.append(Arm(_label(params), params, config))

    arms = [_resolved_model(path, arm) for arm in arms]
    peer_arms, peers = _peer_arms(path, parsed.sweep.peers, engine_values)
    if rates:  # a peer runs at every rate too, on the same arrivals as ours
        peer_arms = [
            replace(arm, label=_label({**arm.params, RATE_AXIS: rate}), params={**arm.params, RATE_AXIS: rate})
            for arm in peer_arms for rate in rates
        ]
    arms += [_resolved_model(path, arm) for arm in peer_arms]
    _check_lengths(path, workload, arms)
    _check_kv_capacity(path, workload, arms)

    warmup = parsed.sweep.warmup_seqs
    if warmup is None:
        warmup = min(wl.num_seqs, DEFAULT_WARMUP_SEQS)
    elif warmup > wl.num_seqs:
        raise ExperimentError(
            path, "sweep.warmup_seqs", f"must be at most workload.num_seqs ({wl.num_seqs}), got {warmup}"
        )
    sweep = parsed.sweep.model_copy(update={"warmup_seqs": warmup, "peers": peers})

    # With a rate axis the baseline is named without it (it is the baseline at every rate): picked at one rate.
    at_rate = (parsed.sweep.baseline or {}).get(RATE_AXIS, rates[0]) if rates else None
    candidates = [arm for arm in arms if arm.params.get(RATE_AXIS) == at_rate] if rates else arms
    baseline = _baseline(path, parsed.sweep.baseline, {**axes, **rate_axis}, candidates)
    name = wl.name or re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem)
    identity = json.dumps(
        _identity(workload, engine, sweep, baseline, serving, rates), sort_keys=True, separators=(",", ":")
    )
    return Experiment(
        path=path, name=name, workload=workload, engine=engine, sweep=sweep, mlflow=parsed.mlflow,
        arms=tuple(arms), baseline=baseline, sweep_id=hashlib.sha256(identity.encode()).hexdigest()[:12],
        serving=serving, rates=rates,
    )


def _workload(path: Path, wl: WorkloadTable) -> Workload:
    """The workload: bench.py's uniform ranges, or a length mix whose bounds stand for the ranges."""
    if wl.lengths is None:
        for key in ("input_len", "output_len"):
            if getattr(wl, key) is None:
                raise ExperimentError(path, f"workload.{key}", "required key is missing (or a [workload.lengths] mix)")
        return Workload(wl.num_seqs, wl.input_len, wl.output_len, wl.seed)
    for key in ("input_len", "output_len"):
        if getattr(wl, key) is not None:
            raise ExperimentError(
                path, f"workload.{key}", "not with [workload.lengths]: the mix sets the lengths (its own input_len)"
            )
    mix = _length_mix(path, wl.lengths)
    (in_lo, in_hi), (out_lo, out_hi) = mix.bounds()
    if max(in_hi, out_hi) > MAX_TOKEN_LEN:
        raise ExperimentError(
            path, "workload.lengths", f"lengths up to {max(in_hi, out_hi):,} exceed {MAX_TOKEN_LEN:,}"
        )
    return Workload(wl.num_seqs, (in_lo, in_hi), (out_lo, out_hi), wl.seed, mix)


def _length_mix(path: Path, table: dict[str, Any]) -> LengthMix:
    """[workload.lengths] validated against its mix's own table (LENGTH_TABLES)."""
    mix, mixes = table.get("mix"), ", ".join(LENGTH_TABLES)
    if mix is None:
        raise ExperimentError(path, "workload.lengths.mix", f"required key is missing; mixes: {mixes}")
    if not isinstance(mix, str) or mix not in LENGTH_TABLES:
        raise ExperimentError(path, "workload.lengths.mix", f"unknown mix {_show(mix)}; mixes: {mixes}")
    schema = LENGTH_TABLES[mix]
    try:
        resolved = schema.model_validate(table)
    except ValidationError as error:
        field, problem = _describe(error, table, schema)
        raise ExperimentError(path, f"workload.lengths.{field}", problem) from None
    return LengthMix(**resolved.model_dump())


def _serving(path: Path, parsed: ExperimentFile) -> tuple[ServingSettings | None, tuple[float, ...] | None]:
    """The online settings ([workload.arrivals] and [metrics]) and the rate axis's values, if any."""
    arrivals, metrics = parsed.workload.arrivals, parsed.metrics
    if arrivals is None:
        if metrics is not None:
            raise ExperimentError(path, "metrics", "latency metrics need an online caliber: add [workload.arrivals]")
        return None, None
    # Whole rates print as integers in labels ("rate=10", not "rate=10.0").
    listed = arrivals.rate if isinstance(arrivals.rate, list) else [arrivals.rate]
    rates = [int(r) if float(r).is_integer() else r for r in listed]
    metrics = metrics or MetricsTable()
    settings = ServingSettings(
        Arrivals(float(rates[0]), arrivals.burstiness, arrivals.max_concurrency),
        Slo(**metrics.slo.model_dump()),
        metrics.steady_state,
    )
    return settings, tuple(rates) if isinstance(arrivals.rate, list) else None


def _check_trial_count(path: Path, sweep: SweepTable, rates: int = 1) -> None:
    """At most MAX_TRIALS trials, counted from the table alone: the arms and the plan are built only after.
    `rates`: the values of the rate axis, which multiply every arm, peers included."""
    num_arms = (math.prod(len(values) for values in sweep.axes.values()) + len(sweep.peers)) * rates
    trials = num_arms * sweep.repeats
    if trials <= MAX_TRIALS:
        return
    if num_arms > MAX_TRIALS:  # fewer repeats cannot help: say so where the arms come from
        raise ExperimentError(
            path, "sweep.axes", f"{num_arms:,} arms (the axes' product plus the peers) exceed {MAX_TRIALS:,} trials"
        )
    raise ExperimentError(
        path, "sweep.repeats",
        f"{num_arms} arms x {sweep.repeats} repeats = {trials:,} trials; a sweep has at most {MAX_TRIALS:,}",
    )


def source_field(name: str, params: Mapping[str, Any], source: str = "sweep.axes") -> str:
    """Where a setting's value came from: the arm's own values (axes or peer entry), or the [engine] table."""
    return f"{source}.{name}" if name in params else f"engine.{name}"


def _engine_config(
    path: Path, values: dict[str, Any], params: dict[str, Any], source: str = "sweep.axes"
) -> EngineConfig:
    try:
        return EngineConfig(**values)
    except ConfigError as error:
        if error.field in params or not params:
            raise ExperimentError(path, source_field(error.field, params, source), error.problem) from None
        # The [engine] table alone was valid, so this arm's own values broke a cross-field rule.
        raise ExperimentError(path, source, f"arm {_label(params)}: {error}") from None


def _check_axis(path: Path, axis: str, values: list[Any]) -> None:
    field = f"sweep.axes.{axis}"
    if axis not in ENGINE_FIELDS:
        hint = "; a list of rates in [workload.arrivals] makes the rate an axis" if axis == RATE_AXIS else ""
        raise ExperimentError(
            path, field, f"unknown axis; an axis is an engine setting: {', '.join(ENGINE_FIELDS)}{hint}"
        )
    adapter = _engine_field_adapter(axis)
    seen = set()
    for value in values:
        try:
            adapter.validate_python(value)
        except ValidationError as error:
            raise ExperimentError(path, field, _problem(error.errors())) from None
        shown = _show_value(value)
        if shown in seen:
            raise ExperimentError(path, field, f"duplicate value {shown}")
        seen.add(shown)


def _exclusions(path: Path, entries: list[dict[str, Any]], axes: Mapping[str, list[Any]]) -> list[dict[str, Any]]:
    """The exclude entries, each checked to name the file's axes and values and to leave out at least one arm,
    and not all of them: a typo would otherwise exclude nothing, or everything, in silence."""
    for index, entry in enumerate(entries):
        for axis, value in entry.items():
            field = f"sweep.exclude[{index}].{axis}"
            if axis not in axes:
                raise ExperimentError(path, field, f"not an axis; axes: {', '.join(axes)}")
            if value not in axes[axis]:
                shown = ", ".join(_show_value(v) for v in axes[axis])
                raise ExperimentError(path, field, f"{_show_value(value)} is not one of the axis's values ({shown})")
    combos = [dict(zip(axes, combo, strict=True)) for combo in itertools.product(*axes.values())]
    if all(any(_matches(c, entry) for entry in entries) for c in combos):
        raise ExperimentError(path, "sweep.exclude", "leaves out every combination of the axes: no arm is left")
    for index, entry in enumerate(entries):
        others = entries[:index] + entries[index + 1 :]
        if all(any(_matches(c, other) for other in others) for c in combos if _matches(c, entry)):
            raise ExperimentError(path, f"sweep.exclude[{index}]", f"{_label(entry)} leaves out no arm the others keep")
    return entries


def _matches(params: Mapping[str, Any], entry: Mapping[str, Any]) -> bool:
    """Whether an arm's axis values are those an exclude entry names."""
    return all(params[axis] == value for axis, value in entry.items())


def _peer_arms(path: Path, entries: list[dict[str, Any]], engine: dict[str, Any]) -> tuple[list[Arm], list[dict]]:
    """One arm per [[sweep.peers]] entry, and the entries resolved (the peer's defaults filled in)."""
    arms: list[Arm] = []
    resolved: list[dict[str, Any]] = []
    for i, entry in enumerate(entries):
        source = f"sweep.peers[{i}]"
        name = entry.get("peer")
        if name is None:
            raise ExperimentError(path, f"{source}.peer", f"required key is missing; peers: {', '.join(PEERS)}")
        if not isinstance(name, str) or name not in PEERS:
            raise ExperimentError(path, f"{source}.peer", f"unknown peer {_show(name)}; peers: {', '.join(PEERS)}")
        schema = _peer_table(name)
        try:
            table = schema.model_validate(entry)
        except ValidationError as error:
            field, problem = _describe(error, entry, schema)
            raise ExperimentError(path, f"{source}.{field}", problem) from None
        overrides = {k: v for k, v in entry.items() if k in PEER_ENGINE_FIELDS}
        params = {"peer": name, **{k: v for k, v in entry.items() if k != "peer"}}
        config = _engine_config(path, {**engine, **overrides}, overrides, source)
        options = table.model_dump(exclude={"peer", *PEER_ENGINE_FIELDS})
        label = _label(params)
        if any(arm.label == label for arm in arms):
            raise ExperimentError(path, source, f"duplicate arm {label}")
        arms.append(Arm(label, params, config, peer={"peer": name, **options}, source=source))
        resolved.append(table.model_dump(mode="json", exclude_none=True))
    return arms, resolved


def _resolved_model(path: Path, arm: Arm) -> Arm:
    """The arm with its model checked (a known preset, or a checkpoint directory) and a relative path resolved."""
    model = arm.config.model
    field = source_field("model", arm.params, arm.source)
    if model.startswith(RANDOM_PREFIX):
        name = model.removeprefix(RANDOM_PREFIX)
        if name not in PRESETS:
            raise ExperimentError(path, field, f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
        _check_vocab(path, field, f"preset {name!r}", PRESETS[name].vocab_size)
        return arm
    directory = Path(model).expanduser()
    if not directory.is_absolute():
        directory = path.parent / directory
    if not directory.is_dir():
        raise ExperimentError(path, field, f"missing model directory {str(directory)!r}")
    config_path = directory / "config.json"
    try:
        vocab_size = json.loads(config_path.read_text())["vocab_size"]
    except FileNotFoundError:
        raise ExperimentError(path, field, f"model directory {str(directory)!r} has no config.json") from None
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ExperimentError(path, field, f"cannot read vocab_size from {config_path}: {error!r}") from None
    _check_vocab(path, field, f"model {str(directory)!r}", vocab_size)
    return replace(arm, config=replace(arm.config, model=str(directory.resolve())))


def _check_vocab(path: Path, field: str, what: str, vocab_size: Any) -> None:
    if not isinstance(vocab_size, int) or vocab_size <= MAX_TOKEN_ID:
        raise ExperimentError(
            path, field,
            f"{what} has vocab_size {vocab_size!r}, but the workload draws token ids up to {MAX_TOKEN_ID}; "
            f"use one with vocab_size > {MAX_TOKEN_ID}",
        )


def _check_lengths(path: Path, workload: Workload, arms: Iterable[Arm]) -> None:
    longest = workload.input_len[1] + workload.output_len[1]
    for arm in arms:
        max_len = arm.config.max_model_len
        if max_len < longest:
            raise ExperimentError(
                path, source_field("max_model_len", arm.params, arm.source),
                f"{max_len} is below the longest request: input hi {workload.input_len[1]} + "
                f"output hi {workload.output_len[1]} = {longest}",
            )


def _check_kv_capacity(path: Path, workload: Workload, arms: Iterable[Arm]) -> None:
    """A numeric kv_cache_capacity must hold the longest request alone, or its arm would fail on the device.

    A capacity of C tokens gets blocks_for(C) usable blocks (novainfer.kv_cache.num_kv_blocks adds the scratch
    block on top); the longest request needs blocks_for(longest), as Scheduler.check counts it.
    """
    in_hi, out_hi = workload.input_len[1], workload.output_len[1]
    longest = in_hi + out_hi
    for arm in arms:
        capacity, block_size = arm.config.kv_cache_capacity, arm.config.block_size
        if capacity == "auto":
            continue
        usable, needed = blocks_for(capacity, block_size), blocks_for(longest, block_size)
        if needed > usable:
            raise ExperimentError(
                path, source_field("kv_cache_capacity", arm.params, arm.source),
                f"arm {arm.label}: {capacity} tokens make {usable} KV blocks of {block_size} tokens, but the longest "
                f"request (input hi {in_hi} + output hi {out_hi} = {longest} tokens) needs {needed}",
            )


def _baseline(path: Path, wanted: dict[str, Any] | None, axes: Mapping[str, list[Any]], arms: list[Arm]) -> Arm:
    if wanted is None:
        return arms[0]
    # Besides the axes, a peer entry's keys ("peer", its overrides) may pick a peer arm.
    peer_keys = sorted({key for arm in arms if arm.peer is not None for key in arm.params} - set(axes))
    for axis in wanted:
        if axis not in axes and axis not in peer_keys:
            if not peer_keys:
                raise ExperimentError(path, f"sweep.baseline.{axis}", f"not an axis; axes: {', '.join(axes)}")
            known = ", ".join([*axes, *peer_keys])
            raise ExperimentError(path, f"sweep.baseline.{axis}", f"not an axis or peer key; keys: {known}")
    missing = object()
    matches = [arm for arm in arms if all(arm.params.get(k, missing) == v for k, v in wanted.items())]
    if len(matches) != 1:
        found = "no arm" if not matches else f"{len(matches)} arms (name more axes to pick one)"
        raise ExperimentError(
            path, "sweep.baseline", f"{_label(wanted)} matches {found}; arms: {'; '.join(a.label for a in arms)}"
        )
    return matches[0]


def _show_value(value: Any) -> str:
    """An axis value as it appears in labels: strings bare, everything else as compact (TOML-like) JSON."""
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, separators=(",", ":"))


def _label(params: Mapping[str, Any]) -> str:
    return ",".join(f"{axis}={_show_value(value)}" for axis, value in params.items())


# ---------------------------------------------------------------------------------------------------------------
# Pydantic errors, translated to `field: problem` in plain words.

_EXPECTED = {
    "int_type": "an integer",
    "float_type": "a number",
    "string_type": "a string",
    "bool_type": "true or false",
    "list_type": "a list",
    "tuple_type": "a list",
    "dict_type": "a table",
    "model_type": "a table",
}
_BOUNDS = {
    "greater_than": ("gt", ">"), "greater_than_equal": ("ge", ">="), "less_than": ("lt", "<"),
    "less_than_equal": ("le", "<="),
}


def _show(value: Any) -> str:
    shown = repr(value)
    return shown if len(shown) <= 60 else shown[:57] + "..."


def _describe(error: ValidationError, raw: dict[str, Any], schema: type[BaseModel] = ExperimentFile) -> tuple[str, str]:
    """The first error's field (a dotted path of keys the file has, or lacks for "missing") and problem.

    pydantic adds union-member tags to a location ("kv_cache_capacity", "int"); walking the location through
    the file's own data stops at the first element that is not a real key, which drops them. `schema` is the
    model `raw` was validated against (default: the whole file).
    """
    errors = error.errors()
    first = errors[0]
    keys: list[str | int] = []
    data: Any = raw
    for part in first["loc"]:
        if (isinstance(data, dict) and part in data) or (isinstance(data, list) and isinstance(part, int)):
            keys.append(part)
            data = data[part]
        else:
            if first["type"] == "missing" and part == first["loc"][-1]:
                keys.append(part)
            break
    field = "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in keys).lstrip(".") or "(top level)"
    # A union reports one error per member at the same place: say what any of them would have accepted.
    same_place = [e for e in errors if e["loc"][: len(keys)] == first["loc"][: len(keys)]]
    problem = _problem(same_place)
    if first["type"] == "extra_forbidden":
        known = _known_keys(keys[:-1], schema)
        problem += f"; known keys: {', '.join(known)}" if known else ""
    return field, problem


def _problem(errors: list[Any]) -> str:
    first = errors[0]
    kind, ctx, value = first["type"], first.get("ctx", {}), first["input"]
    expected = [_EXPECTED.get(e["type"]) or e.get("ctx", {}).get("expected") for e in errors]
    if all(expected) and (kind in _EXPECTED or kind == "literal_error"):
        return f"expected {' or '.join(dict.fromkeys(expected))}, got {_show(value)}"
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    if kind == "finite_number":
        return f"must be a finite number, got {_show(value)}"
    if kind in _BOUNDS:
        key, op = _BOUNDS[kind]
        return f"must be {op} {ctx[key]}, got {_show(value)}"
    if kind in ("too_short", "string_too_short") and ctx.get("min_length") == 1:
        return "must not be empty"
    if kind == "string_pattern_mismatch" and ctx.get("pattern") == NAME_PATTERN:
        return f"use only letters, digits, '.', '_' and '-', got {_show(value)}"
    if kind == "value_error":
        return str(ctx["error"])
    return f"{first['msg']}, got {_show(value)}"


def _known_keys(table_path: list[str | int], model: Any) -> list[str]:
    """The keys `model` allows in the table at `table_path`, or [] when that is not a fixed table."""
    for part in table_path:
        annotation = model.model_fields[part].annotation if part in model.model_fields else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)
