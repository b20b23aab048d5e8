"""Experiment files: the TOML that fixes a sweep's caliber, its tables as a strict schema, and its errors in words.

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
baseline = { peer = "vllm" }. Where an axis puts every arm of ours on one value of a setting the peer would take
from [engine] with another (`cuda_graphs = [true]` over an eager [engine]), the peer's entry must name it.

Bounds, so that a typo (an extra zero, `inf`) is a file error instead of a MemoryError or hours of work; each
is far above any sweep we run:
    workload.num_seqs <= 100,000 and token lengths <= 1,000,000 (longer than any model's context);
    sweep.repeats <= 1,000, and arms x repeats <= 10,000 trials (checked before the arms or the plan are built);
    sweep.trial_timeout_s <= 604,800 (7 days); no float anywhere may be inf or nan.
A numeric kv_cache_capacity must hold the workload's longest request (input hi + output hi tokens) on its own.
    workload.arrivals.rate <= 1,000,000 requests/s, at most 100 rates.

Every problem is reported as one `ExperimentError` line, `<file>: <field>: <problem>`, the field a dotted path
into the file (`workload.input_len`, `sweep.axes.block_size`), so the CLI can print it and exit 2.

This module reads the file against its schema; novainfer.ab.sweep.experiment resolves it into arms and a plan,
with the checks that need more than one table. Neither imports torch (the sweep process never does). Whether
each arm's backend takes its settings, and whether it runs on this machine, is judged after them, for all arms
at once, in a process that may import torch (novainfer.ab.sweep.arm_checks).
"""

from __future__ import annotations

import tomllib
from dataclasses import MISSING, fields
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal, get_type_hints

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, create_model, field_validator

from novainfer.ab.lengths import SHAREGPT_CLIP, SHAREGPT_INPUT_MEAN, SHAREGPT_OUTPUT_MEAN
from novainfer.ab.trial.peers import PEERS
from novainfer.config import EngineConfig

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
        raise ValueError(f"expected [lo, hi], two integers, got {show(value)}")
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
            raise ValueError(f"a rate is requests per second, > 0 and <= {MAX_RATE:,.0f}, got {show(value)}")
        if len(set(rates)) != len(rates):
            raise ValueError(f"duplicate rate in {show(value)}")
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
            raise ValueError(f"expected [lo, hi], two fractions of the requests, got {show(value)}")
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
def engine_field_adapter(name: str) -> TypeAdapter[Any]:
    """Validates one axis value as the EngineConfig field it sets."""
    return TypeAdapter(get_type_hints(EngineConfig)[name], config=ConfigDict(strict=True))


# A peer runs its own attention, so our backend settings mean nothing to it.
PEER_ENGINE_FIELDS = tuple(f for f in ENGINE_FIELDS if f not in ("backend", "backend_options"))


@cache
def peer_table(name: str) -> type[BaseModel]:
    """One [[sweep.peers]] entry of peer `name`: its own settings plus optional [engine] overrides."""
    hints = get_type_hints(EngineConfig)
    overrides: dict[str, Any] = {f: (hints[f] | None, None) for f in PEER_ENGINE_FIELDS}
    return create_model(
        f"{name}PeerTable", __base__=PEERS[name].options, peer=(Literal[name], ...), **overrides
    )


def read_experiment_file(path: Path) -> ExperimentFile:
    """The file read and validated against the schema; every problem raises ExperimentError (one line)."""
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
        return ExperimentFile.model_validate(raw)
    except ValidationError as error:
        field, problem = describe_error(error, raw)
        raise ExperimentError(path, field, problem) from None


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


def show(value: Any) -> str:
    shown = repr(value)
    return shown if len(shown) <= 60 else shown[:57] + "..."


def describe_error(
    error: ValidationError, raw: dict[str, Any], schema: type[BaseModel] = ExperimentFile
) -> tuple[str, str]:
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
    problem = error_problem(same_place)
    if first["type"] == "extra_forbidden":
        known = _known_keys(keys[:-1], schema)
        problem += f"; known keys: {', '.join(known)}" if known else ""
    return field, problem


def error_problem(errors: list[Any]) -> str:
    first = errors[0]
    kind, ctx, value = first["type"], first.get("ctx", {}), first["input"]
    expected = [_EXPECTED.get(e["type"]) or e.get("ctx", {}).get("expected") for e in errors]
    if all(expected) and (kind in _EXPECTED or kind == "literal_error"):
        return f"expected {' or '.join(dict.fromkeys(expected))}, got {show(value)}"
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    if kind == "finite_number":
        return f"must be a finite number, got {show(value)}"
    if kind in _BOUNDS:
        key, op = _BOUNDS[kind]
        return f"must be {op} {ctx[key]}, got {show(value)}"
    if kind in ("too_short", "string_too_short") and ctx.get("min_length") == 1:
        return "must not be empty"
    if kind == "string_pattern_mismatch" and ctx.get("pattern") == NAME_PATTERN:
        return f"use only letters, digits, '.', '_' and '-', got {show(value)}"
    if kind == "value_error":
        return str(ctx["error"])
    return f"{first['msg']}, got {show(value)}"


def _known_keys(table_path: list[str | int], model: Any) -> list[str]:
    """The keys `model` allows in the table at `table_path`, or [] when that is not a fixed table."""
    for part in table_path:
        annotation = model.model_fields[part].annotation if part in model.model_fields else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)
