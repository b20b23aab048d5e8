"""The validated experiment: an experiment file (novainfer.ab.sweep.experiment_file: its format, schema and
bounds) resolved into arms, a baseline, the sweep's identity and its ordered trial plan.

Past the schema, the checks here need more than one table: axis values as the engine settings they set, exclude
entries against the axes, peers against their own schemas, models (a preset, or a checkpoint directory), every
arm's max_model_len and KV capacity against the workload's longest request, the baseline among the arms. Every
problem is one `ExperimentError` line, `<file>: <field>: <problem>`. No torch is imported here.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from novainfer.ab.lengths import LengthMix
from novainfer.ab.serving import Arrivals, ServingSettings, Slo
from novainfer.ab.sweep.experiment_file import (
    ENGINE_FIELDS,
    LENGTH_TABLES,
    MAX_TOKEN_LEN,
    MAX_TRIALS,
    PEER_ENGINE_FIELDS,
    RATE_AXIS,
    ExperimentError,
    ExperimentFile,
    MetricsTable,
    MlflowTable,
    SweepTable,
    WorkloadTable,
    describe_error,
    engine_field_adapter,
    error_problem,
    peer_table,
    read_experiment_file,
    show,
)
from novainfer.ab.trial.peers import PEERS
from novainfer.ab.workload import MAX_TOKEN_ID, Workload
from novainfer.block_manager import blocks_for
from novainfer.config import ConfigError, EngineConfig
from novainfer.models.presets import PRESETS, RANDOM_PREFIX

DEFAULT_WARMUP_SEQS = 8


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
    return _resolve(path, read_experiment_file(path))


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
    _check_peer_settings(path, peer_arms, arms, axes)
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
        raise ExperimentError(path, "workload.lengths.mix", f"unknown mix {show(mix)}; mixes: {mixes}")
    schema = LENGTH_TABLES[mix]
    try:
        resolved = schema.model_validate(table)
    except ValidationError as error:
        field, problem = describe_error(error, table, schema)
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
    adapter = engine_field_adapter(axis)
    seen = set()
    for value in values:
        try:
            adapter.validate_python(value)
        except ValidationError as error:
            raise ExperimentError(path, field, error_problem(error.errors())) from None
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
            raise ExperimentError(path, f"{source}.peer", f"unknown peer {show(name)}; peers: {', '.join(PEERS)}")
        schema = peer_table(name)
        try:
            table = schema.model_validate(entry)
        except ValidationError as error:
            field, problem = describe_error(error, entry, schema)
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


def _check_peer_settings(path: Path, peer_arms: list[Arm], arms: list[Arm], axes: Mapping[str, list]) -> None:
    """A peer takes the [engine] table's settings unless its own table names them. Where an axis puts every arm
    of ours on one value and the peer would take another from [engine] (an axis `cuda_graphs = [true]` over an
    engine left eager ran vLLM with enforce_eager), the comparison is of unlike engines that the file never
    asked for: the peer's table must say which it means."""
    for peer in peer_arms:
        for field in axes:
            if field not in PEER_ENGINE_FIELDS or field in peer.params:
                continue
            ours = {getattr(arm.config, field) for arm in arms}
            theirs = getattr(peer.config, field)
            if len(ours) == 1 and theirs not in ours:
                value = json.dumps(next(iter(ours)))
                raise ExperimentError(
                    path, f"{peer.source}.{field}",
                    f"every arm runs {field} = {value} (sweep.axes) but this peer would take {json.dumps(theirs)} "
                    f"from [engine]; set it in the peer's table ({field} = {value} to compare like with like)",
                )


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
